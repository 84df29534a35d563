"""Controllers on real databases: SQLite files, and the PostgreSQL server of tests/conftest.py
(each test gets a fresh database in it)."""

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'controller.sqlite'}"

    return request.getfixturevalue("postgres_database")


@pytest.fixture
def controller_config(database_url: str, tmp_path: Path, signing_key):
    from slmops.controller import config

    return config.load(
        data_dir=tmp_path / "controller",
        database_url=database_url,
        trusted_keys=[signing_key[1]],
        embedded_broker=False,
        tokens=[
            {"name": "alice", "token": "admin-token-0123456789", "role": "admin"},
            {"name": "bob", "token": "reader-token-0123456789", "role": "reader"},
        ],
    )


@pytest.fixture(scope="session")
def archive(signing_key, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A synthetic signed bundle (two variants of random files) as a pushable archive: no torch needed."""
    from support import synthetic_bundle

    from slmops.bundle import write_archive

    folder = tmp_path_factory.mktemp("archive")
    return write_archive(synthetic_bundle(folder / "tiny", signing_key[0]), folder / "tiny.tar").read_bytes()


@pytest.fixture
def client(controller_config):
    from fastapi.testclient import TestClient

    from slmops.controller.service import build_app

    with TestClient(build_app(controller_config)) as c:
        yield c


@pytest.fixture
def live_controller(controller_config) -> Iterator[str]:
    """The controller of `controller_config` serving real HTTP on a free loopback port; its URL."""
    import socket
    import threading

    import uvicorn
    from support import wait_for

    from slmops.controller.service import build_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    web = uvicorn.Server(uvicorn.Config(build_app(controller_config), log_level="warning"))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: web.started, "the controller did not start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        web.should_exit = True
        thread.join(timeout=10)
