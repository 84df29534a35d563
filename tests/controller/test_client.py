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
