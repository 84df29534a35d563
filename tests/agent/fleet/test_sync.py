"""The sync worker: its queue (newer desired states replace older ones, failures are tried
again), and the flow on real bundles: fetch, verify, activate, kept slots, rollback, reload."""

from pathlib import Path

import pytest

from slmops.agent import config as agent_config
from slmops.agent.fleet.sync import Sync
from slmops.agent.host import ModelHost
from slmops.bundle import Bundle
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


# --- the flow, on real bundles fetched from a store over HTTP ----------------------------------


@pytest.fixture
def fleet_sync(store, session_bundle: Path, second_bundle: Path, signing_key, tmp_path: Path):
    """(a Sync over HTTP from `store`, which holds v1 and v2 of the tiny bundle; its reports;
    the desired states of v1 and v2). The host starts empty."""
    from bundle_store import STORE_TOKEN

    states = {}
    for folder in (session_bundle, second_bundle):
        manifest = Bundle.open(folder).manifest
        store.folders[manifest.digest] = folder
        states[manifest.version] = DesiredState(bundle=manifest.name, version=manifest.version, digest=manifest.digest)
    config = agent_config.load(
        data_dir=tmp_path / "agent",
        transfer="http",
        controller_url=store.url,
        controller_token=STORE_TOKEN,
        trusted_keys=[signing_key[1]],
        smoke_min_speed_fraction=0,
    )
    host = ModelHost(config)
    host.start()
    reports: list[Reported] = []
    yield Sync(config, host, reports.append, lambda _reply: None), reports, states
    host.close()


def statuses(reports: list[Reported]) -> list[str]:
    return [r.status for r in reports]


def test_a_desired_state_is_fetched_verified_activated_and_recorded(fleet_sync, store) -> None:
    sync, reports, states = fleet_sync
    sync.apply(states["1.0.0"])
    assert statuses(reports)[0] == "downloading" and statuses(reports)[-3:] == ["verifying", "activating", "healthy"]
    assert sync.server.engine.current.model_id == "tiny:1.0.0"
    active = sync.slots.active()
    assert (active.version, active.variant) == ("1.0.0", reports[-1].variant) and sync.slots.previous() is None
    assert not list(sync.slots.root.glob("*.partial"))
    reports.clear()
    sync.apply(states["1.0.0"])  # what it serves already: nothing to fetch
    assert statuses(reports) == ["healthy"]


def test_the_previous_slot_comes_back_without_a_download_and_rollback_and_reload_use_the_slots(
    fleet_sync, store
) -> None:
    sync, reports, states = fleet_sync
    sync.apply(states["1.0.0"])
    sync.apply(states["2.0.0"])
    assert sync.server.engine.current.model_id == "tiny:2.0.0"
    assert (sync.slots.active().version, sync.slots.previous().version) == ("2.0.0", "1.0.0")

    fetched, reports[:] = len(store.requests), []
    sync.apply(states["1.0.0"])  # kept as the previous slot: switched back to, not fetched
    assert statuses(reports) == ["activating", "healthy"] and len(store.requests) == fetched
    assert sync.server.engine.current.model_id == "tiny:1.0.0"

    command = Command(correlation_id="0123456789abcdef", command="rollback")
    reply = sync.run_command(command)  # v1 is active, v2 previous: back to v2
    assert reply.ok and reply.result["serving"] == "tiny:2.0.0" and statuses(reports)[-1] == "rolled_back"
    assert sync.slots.active().version == "2.0.0"
    reload = sync.run_command(Command(correlation_id="0123456789abcdef", command="reload"))
    assert reload.ok and reload.result["serving"] == "tiny:2.0.0"


def test_a_kept_slot_that_no_longer_verifies_is_fetched_again(fleet_sync, store) -> None:
    sync, reports, states = fleet_sync
    sync.apply(states["1.0.0"])
    sync.apply(states["2.0.0"])
    rotten = next(p for p in sync.slots.path(states["1.0.0"].digest).rglob("*.onnx.data"))
    rotten.write_bytes(b"rot")
    reports.clear()
    sync.apply(states["1.0.0"])
    assert "downloading" in statuses(reports) and statuses(reports)[-1] == "healthy"
    assert sync.server.engine.current.model_id == "tiny:1.0.0"


def test_rollback_without_a_previous_slot_is_a_failed_reply_and_changes_nothing(fleet_sync) -> None:
    sync, _, states = fleet_sync
    sync.apply(states["1.0.0"])
    reply = sync.run_command(Command(correlation_id="0123456789abcdef", command="rollback"))
    assert not reply.ok and "no previous slot" in reply.error
    assert sync.server.engine.current.model_id == "tiny:1.0.0" and sync.slots.active().version == "1.0.0"
