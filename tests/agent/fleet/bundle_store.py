"""A bundle store that answers as the controller's /v1/store does (Starlette's FileResponse:
whole files, Range requests, 416 past the end), served by uvicorn on a free port."""

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from support import free_port, wait_for

STORE_TOKEN = "reader-token-0123456789"


@dataclass
class Store:
    url: str
    folders: dict[str, Path] = field(default_factory=dict)
    """digest → the folder its files are served from."""
    requests: list[tuple[str, str]] = field(default_factory=list)
    """(path, Range header) of each authorized request."""


@pytest.fixture
def store() -> Iterator[Store]:
    """A running store, empty: tests put folders in `folders`."""
    port = free_port()
    served = Store(f"http://127.0.0.1:{port}")

    async def file(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {STORE_TOKEN}":
            return JSONResponse({"error": {"message": "no"}}, status_code=401)
        path = request.path_params["path"]
        served.requests.append((path, request.headers.get("range", "")))
        folder = served.folders.get(request.path_params["digest"])
        if folder is None or not (folder / path).is_file():
            return JSONResponse({"error": {"message": "not found"}}, status_code=404)
        return FileResponse(folder / path)

    app = Starlette(routes=[Route("/v1/store/{digest}/{path:path}", file)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the store did not start")
    yield served
    server.should_exit = True
    thread.join(timeout=10)
