"""What both HTTP services share (slmops/http.py): the header deadline that closes slowloris
sockets, on a real uvicorn server."""

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from support import wait_for

from slmops.http import header_deadline, install_errors

DEADLINE_S = 0.5


@pytest.fixture
def server() -> Iterator[int]:
    app = FastAPI()
    install_errors(app, "test")

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    web = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=header_deadline(DEADLINE_S)))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: web.started, "uvicorn did not start")
    yield sock.getsockname()[1]
    web.should_exit = True
    thread.join(timeout=10)


def _closed_after(conn: socket.socket, trickle: bytes = b"", timeout_s: float = 10) -> float:
    """Seconds until the server closes `conn`, sending it `trickle` a byte every 0.1 s meanwhile."""
    started = time.monotonic()
    conn.settimeout(0.1)
    for byte in [trickle[i : i + 1] for i in range(len(trickle))] or [b""] * int(timeout_s * 10):
        try:
            if byte:
                conn.sendall(byte)
            if conn.recv(1024) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, "the server kept the connection open"
    raise AssertionError("the server kept the connection open")


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(server: int):
    with socket.create_connection(("127.0.0.1", server)) as idle:
        assert DEADLINE_S <= _closed_after(idle) < DEADLINE_S + 2


def test_headers_trickled_a_byte_at_a_time_are_cut_off(server: int):
    head = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow-and-steady\r\n" * 3
    with socket.create_connection(("127.0.0.1", server)) as slow:
        assert _closed_after(slow, head) < DEADLINE_S + 2  # sending it all would take 20 s


def test_requests_on_a_kept_alive_connection_each_get_the_deadline_afresh(server: int):
    with httpx.Client(base_url=f"http://127.0.0.1:{server}") as client:
        for _ in range(3):
            assert client.get("/ping").json() == {"ok": True}
            time.sleep(DEADLINE_S / 2)
        time.sleep(DEADLINE_S * 2)  # the server closed this idle connection; httpx opens a new one
        assert client.get("/ping").json() == {"ok": True}
