"""slmops.client against a live controller: typed answers, and every failure as one ControllerError."""

from pathlib import Path

import pytest
from support import free_port

from slmops.client import ControllerClient
from slmops.controller.protocol import BundleDetail, BundleSummary
from slmops.errors import ControllerError

ADMIN, READER = "admin-token-0123456789", "reader-token-0123456789"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_answers_are_the_apis_models_and_refusals_one_exception(live_controller: str, archive: bytes, tmp_path: Path):
    (tmp_path / "tiny.tar").write_bytes(archive)
    sent: list[int] = []
    with ControllerClient(live_controller, ADMIN) as admin, ControllerClient(live_controller, READER) as reader:
        summary, new = admin.push(tmp_path / "tiny.tar", sent.append)
        assert new and isinstance(summary, BundleSummary) and sum(sent) == len(archive)
        again, new = admin.push(tmp_path / "tiny.tar")
        assert not new and again.digest == summary.digest
        assert [b.name for b in reader.bundles()] == ["tiny"]
        detail = reader.bundle("tiny", "1.0.0")
        assert isinstance(detail, BundleDetail) and detail.manifest["name"] == "tiny"
        assert reader.health().mqtt == "off"

        with pytest.raises(ControllerError) as refused:
            reader.delete_bundle("tiny", "1.0.0")
        assert (refused.value.status, refused.value.type) == (403, "permission_error")
        assert "reader" in refused.value.message
        with pytest.raises(ControllerError) as missing:
            reader.bundle("tiny", "9.9.9")
        assert missing.value.status == 404 and "9.9.9" in missing.value.message
        with pytest.raises(ControllerError) as invalid:
            admin.desire_many("tiny", "1.0.0", devices=[])
        assert invalid.value.status == 400 and invalid.value.type == "invalid_request_error"

        admin.delete_bundle("tiny", "1.0.0")
        assert admin.bundles() == []


def test_a_controller_that_is_not_there_is_a_controller_error_without_status():
    with (
        ControllerClient(f"http://127.0.0.1:{free_port()}", ADMIN, timeout_s=2) as controller,
        pytest.raises(ControllerError) as gone,
    ):
        controller.devices()
    assert gone.value.status is None and "cannot reach the controller" in gone.value.message


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_lists_come_in_pages_the_client_walks_through(live_controller: str, controller_config):
    """/v1/devices, /v1/rollouts and /v1/builds answer one page (`limit`, `offset`) and count the whole
    list in X-Total-Count; the device filters are the dashboard's; the client reads every page."""
    import httpx

    from slmops.controller.audit import Actor
    from slmops.controller.db import open_database
    from slmops.controller.fleet import Fleet
    from slmops.messages import Birth, DeviceState, HardwareProfile

    profile = HardwareProfile(cpu_model="test CPU", cpu_cores_physical=2, cpu_cores_logical=2, isa=[],
                              memory_total_bytes=4 << 30, memory_available_bytes=2 << 30, disk_free_bytes=8 << 30,
                              os="Linux", arch="x86_64", accelerators=[])  # fmt: skip
    engine = open_database(controller_config.database_url)  # the devices join as their births would record them
    fleet = Fleet(engine)
    fleet.record([(f"edge-{i}", Birth(agent_version="0.1", profile=profile)) for i in range(7)])
    fleet.record([("edge-2", DeviceState(online=False))])
    fleet.label("edge-5", Actor("alice", "admin"), {}, ["eu"])
    engine.dispose()

    with ControllerClient(live_controller, READER) as reader:
        assert [d.id for d in reader.devices(page_size=3)] == [f"edge-{i}" for i in range(7)]
        assert [d.id for d in reader.devices(page_size=3, status="offline")] == ["edge-2"]
        assert [d.id for d in reader.devices(group="eu", q="EDGE")] == ["edge-5"]
        assert reader.rollouts() == [] and reader.builds() == []
    headers = {"Authorization": f"Bearer {READER}"}
    page = httpx.get(f"{live_controller}/v1/devices", params={"limit": 2, "offset": 4}, headers=headers)
    assert [d["id"] for d in page.json()] == ["edge-4", "edge-5"] and page.headers["X-Total-Count"] == "7"
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"status": "asleep"}):
        refused = httpx.get(f"{live_controller}/v1/devices", params=bad, headers=headers)
        assert refused.status_code == 400 and next(iter(bad)) in refused.json()["error"]["message"]
