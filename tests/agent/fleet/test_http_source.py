"""Bundle files over HTTP from a store route that answers as the controller's does (Starlette's
FileResponse: whole files, Range requests, 416 past the end), served by uvicorn on a free port."""

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from support import free_port, wait_for

from slmops.agent.fleet.sync import HttpSource
from slmops.agent.fleet.transfer import Wanted
from slmops.errors import SyncError, TransferError

DIGEST = "ab" * 32
TOKEN = "reader-token-0123456789"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """(URL, the store's folder for DIGEST, the Range headers of each request)."""
    folder = tmp_path / "store"
    folder.mkdir()
    ranges: list[str] = []

    async def file(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return JSONResponse({"error": {"message": "no"}}, status_code=401)
        ranges.append(request.headers.get("range", ""))
        target = folder / request.path_params["path"]
        if request.path_params["digest"] != DIGEST or not target.is_file():
            return JSONResponse({"error": {"message": "not found"}}, status_code=404)
        return FileResponse(target)

    app = Starlette(routes=[Route("/v1/store/{digest}/{path:path}", file)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the store did not start")
    yield f"http://127.0.0.1:{port}", folder, ranges
    server.should_exit = True
    thread.join(timeout=10)


def wanted(target: Path, data: bytes) -> Wanted:
    return Wanted(target, hashlib.sha256(data).hexdigest(), len(data))


def test_a_file_arrives_whole_and_a_partial_one_resumes_with_a_range(store, tmp_path: Path) -> None:
    url, folder, ranges = store
    data = os.urandom(3 << 20)
    (folder / "weights.bin").write_bytes(data)
    target = tmp_path / "out" / "weights.bin"
    progress: list[int] = []
    with HttpSource(url, TOKEN, DIGEST) as source:
        source.fetch({"weights.bin": wanted(target, data)}, progress.append)
    assert target.read_bytes() == data and sum(progress) == len(data) and ranges == [""]

    target.write_bytes(data[: 1 << 20])  # a download cut short
    assert HttpSource(url, TOKEN, DIGEST).on_disk(target, len(data)) == 1 << 20
    with HttpSource(url, TOKEN, DIGEST) as source:
        source.fetch({"weights.bin": wanted(target, data)}, None)
    assert target.read_bytes() == data and ranges[-1] == f"bytes={1 << 20}-"


def test_what_is_on_disk_past_the_end_starts_over(store, tmp_path: Path) -> None:
    url, folder, ranges = store
    data = os.urandom(10_000)
    (folder / "small.bin").write_bytes(data)
    target = tmp_path / "small.bin"
    target.write_bytes(os.urandom(20_000))  # longer than the file: the server answers 416
    with HttpSource(url, TOKEN, DIGEST) as source:
        source.fetch({"small.bin": wanted(target, data)}, None)
    assert target.read_bytes() == data and ranges == ["bytes=20000-", ""]


@pytest.mark.parametrize("served", ["other bytes", "more bytes than the manifest says"])
def test_a_file_served_wrong_is_refused_and_not_kept(store, tmp_path: Path, served: str) -> None:
    url, folder, _ = store
    data = os.urandom(2 << 20)
    expected = wanted(tmp_path / "out.bin", data)
    if served == "other bytes":
        (folder / "f.bin").write_bytes(os.urandom(len(data)))
    else:
        (folder / "f.bin").write_bytes(data + os.urandom(3 << 20))
    with (
        pytest.raises(TransferError, match="does not match the manifest's sha256"),
        HttpSource(url, TOKEN, DIGEST) as s,
    ):
        s.fetch({"f.bin": expected}, None)
    assert not expected.target.exists()


def test_a_missing_file_or_a_wrong_token_is_a_clear_error(store, tmp_path: Path) -> None:
    url, _, _ = store
    missing = Wanted(tmp_path / "nothing", None, None)
    with pytest.raises(SyncError, match="download of nothing answered 404"), HttpSource(url, TOKEN, DIGEST) as s:
        s.fetch({"nothing": missing}, None)
    with pytest.raises(SyncError, match="answered 401"), HttpSource(url, "wrong", DIGEST) as s:
        s.fetch({"nothing": missing}, None)
