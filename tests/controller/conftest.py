"""Controllers on real databases: SQLite files, and a PostgreSQL server the tests start.

The PostgreSQL server is this machine's PostgreSQL binaries run on a free port with a
data folder of our own (initdb), never the system's instance; each test gets a fresh
database in it.
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def postgres_bin() -> Path:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[::-1]), None)
    if found is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are missing: `make test` installs postgresql")
    return Path(found).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A running PostgreSQL server of our own; yields its base URL (no database name)."""
    # Not under pytest's tmp folder: as root, the server runs as `postgres` (initdb refuses
    # root), which cannot enter root's 0700 pytest folders.
    bin_dir, root = postgres_bin(), Path(tempfile.mkdtemp(prefix="slmops-postgres-"))
    data, port = root / "data", free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(root, "postgres")
    subprocess.run(
        [*as_postgres, bin_dir / "initdb", "-D", data, "-U", "slmops", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*as_postgres, bin_dir / "pg_ctl", "-D", data, "-o", options, "-l", root / "log", "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://slmops@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_postgres, bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'controller.sqlite'}"
    import psycopg

    base = request.getfixturevalue("postgres")
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return f"{base}/{name}"


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


@pytest.fixture
def client(controller_config):
    from fastapi.testclient import TestClient

    from slmops.controller.service import build_app

    with TestClient(build_app(controller_config)) as c:
        yield c
