"""The sync worker's queue: newer desired states replace older ones, failures are tried again."""

from pathlib import Path

from slmops.agent import config as agent_config
from slmops.agent.fleet.sync import Sync
from slmops.agent.host import ModelHost
from slmops.messages import Command, CommandReply, DesiredState, Reported

SENT_AT = DesiredState(bundle="-", version="-", digest="0" * 64).sent_at


def desired(version: str) -> DesiredState:
    return DesiredState(bundle="tiny", version=version, digest=f"{int(version[0]):064x}", sent_at=SENT_AT)


def make_sync(tmp_path: Path, **settings: object) -> tuple[Sync, list[Reported]]:
    config = agent_config.load(data_dir=tmp_path, **settings)
    reports: list[Reported] = []
    replies: list[CommandReply] = []
    return Sync(config, ModelHost(config), reports.append, replies.append), reports


def test_a_newer_desired_state_replaces_the_queued_ones(tmp_path: Path) -> None:
    """Finding 8: the operator's valid desired state waited behind a bad one's 20 rounds."""
    sync, _ = make_sync(tmp_path)
    command = Command(correlation_id="0123456789abcdef", command="probe")
    for work in (desired("1.0.0"), desired("2.0.0"), command, desired("3.0.0")):
        sync.submit(work)
    assert [sync._next(), sync._next()] == [command, desired("3.0.0")]


def test_a_failure_that_may_pass_is_tried_again_and_a_new_desired_state_ends_the_retry(tmp_path: Path) -> None:
    sync, reports = make_sync(tmp_path, transfer="http", retry_min_s=30)  # no controller_url: it fails
    (tmp_path / "slots" / f"{9:064x}.partial").mkdir(parents=True)  # an earlier desired state's leftovers
    sync._apply_or_report(desired("1.0.0"))
    assert [r.status for r in reports] == ["downloading", "failed"]
    assert reports[-1].reason == "transfer = http needs controller_url (trying again in 30 s)"
    assert sync._retry is not None and sync._retry[0] == desired("1.0.0")
    assert not (tmp_path / "slots" / f"{9:064x}.partial").exists()
    sync._apply_or_report(desired("1.0.0"))
    assert reports[-1].reason.endswith("(trying again in 60 s)")  # the backoff doubles
    sync.submit(desired("2.0.0"))
    assert sync._retry is None and sync._next() == desired("2.0.0")
