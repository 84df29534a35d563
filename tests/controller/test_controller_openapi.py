"""The controller's /openapi.json is true: schemathesis, against a live controller holding a
bundle, finds no 5xx and no answer outside the documented statuses, content types and schemas."""

from pathlib import Path

import pytest
from support import conformance_run

from slmops.client import ControllerClient

ADMIN = "admin-token-0123456789"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_every_answer_is_documented_and_none_is_a_server_error(live_controller: str, archive: bytes, tmp_path: Path):
    (tmp_path / "tiny.tar").write_bytes(archive)
    with ControllerClient(live_controller, ADMIN) as controller:
        controller.push(tmp_path / "tiny.tar")
    code, report = conformance_run(f"{live_controller}/openapi.json", ADMIN, tmp_path)
    assert code == 0, report
    assert "passed" in report
