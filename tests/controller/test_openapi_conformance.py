"""The controller's /openapi.json is true: schemathesis, against a live controller holding a
bundle, finds no 5xx and no answer outside the documented statuses, content types and schemas."""

import socket
import threading
from pathlib import Path

import httpx
import pytest
import uvicorn
from support import conformance_run, wait_for

ADMIN = "admin-token-0123456789"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_every_answer_is_documented_and_none_is_a_server_error(controller_config, archive: bytes, tmp_path: Path):
    from slmops.controller.service import build_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    web = uvicorn.Server(uvicorn.Config(build_app(controller_config), log_level="warning"))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: web.started, "the controller did not start")
        pushed = httpx.post(f"{url}/v1/bundles", content=archive, headers={"Authorization": f"Bearer {ADMIN}"})
        assert pushed.status_code == 201, pushed.text
        code, report = conformance_run(f"{url}/openapi.json", ADMIN, tmp_path)
        assert code == 0, report
        assert "passed" in report
    finally:
        web.should_exit = True
        thread.join(timeout=10)
