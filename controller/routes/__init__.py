"""The controller's REST surfaces, one router each: bundles, devices, desired states, the bundle
store, audit, health. Handlers reach the registry and the fleet through `app.state`, and who
asks through `Reader` / `Admin` (`Authorization: Bearer <token>`; readers may GET, admins change)."""

import secrets
from dataclasses import dataclass
from typing import IO, Annotated, Any

from fastapi import Depends, Query, Request, Response

from slmops.errors import HttpError

from ..audit import Actor
from ..builds import Builds
from ..config import ApiToken, ControllerConfig
from ..control import FleetControl
from ..enrolment import Enrolment
from ..fleet import Fleet
from ..protocol import TOTAL_HEADER
from ..registry import Registry
from ..rollouts import Rollouts


def _actor(request: Request) -> Actor:
    tokens: list[ApiToken] = request.app.state.tokens
    scheme, _, given = request.headers.get("authorization", "").partition(" ")  # "Bearer <token>", nothing else
    for t in tokens:
        if scheme == "Bearer" and given and secrets.compare_digest(given.encode(), t.token.encode()):
            return Actor(t.name, t.role)
    raise HttpError(401, "missing or unknown API token (Authorization: Bearer ...)", "authentication_error")


def _admin(who: Annotated[Actor, Depends(_actor)]) -> Actor:
    if who.role != "admin":
        raise HttpError(403, f"{who.name} is a reader; this needs an admin token", "permission_error")
    return who


def _state(name: str) -> Any:
    """A dependency on what `create_app` put in `app.state` under `name`."""

    def get(request: Request) -> object:
        return getattr(request.app.state, name)

    return Depends(get)


Reader = Annotated[Actor, Depends(_actor)]
Admin = Annotated[Actor, Depends(_admin)]
Config = Annotated[ControllerConfig, _state("config")]
RegistryOf = Annotated[Registry, _state("registry")]
FleetOf = Annotated[Fleet, _state("fleet")]
ControlOf = Annotated[FleetControl, _state("control")]
EnrolmentOf = Annotated[Enrolment, _state("enrolment")]
RolloutsOf = Annotated[Rollouts, _state("rollouts")]
BuildsOf = Annotated[Builds, _state("builds")]


async def spool(request: Request, into: IO[bytes], max_bytes: int) -> None:
    """The request's body written to `into` (a file: uploads are large), refused with 413 past `max_bytes`;
    `into` is left at its start for the reader."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise HttpError(413, f"the upload exceeds {max_bytes} bytes", "invalid_request_error")
        into.write(chunk)
    into.seek(0)


Limit = Annotated[int, Query(ge=1, le=100_000, description="How many, newest first (at most 100,000).")]
"""A list's length, as the audit and telemetry routes take it."""


LIST_PAGE = 1000
"""Items in a page of a list route unless the request asks for fewer."""


@dataclass(frozen=True)
class Page:
    """The page of a list a request asks for (`?limit=&offset=`); `counted` puts the list's size in the
    answer's X-Total-Count header."""

    limit: int
    offset: int
    response: Response

    def counted(self, total: int) -> None:
        self.response.headers[TOTAL_HEADER] = str(total)


def _page(
    response: Response,
    limit: Annotated[int, Query(ge=1, le=LIST_PAGE, description="Items in the page.")] = LIST_PAGE,
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="Items before the page.")] = 0,
) -> Page:
    return Page(limit, offset, response)


Paged = Annotated[Page, Depends(_page)]
COUNTED: dict[int | str, dict[str, Any]] = {
    200: {
        "headers": {
            TOTAL_HEADER: {"description": "How many items the whole list holds.", "schema": {"type": "integer"}}
        }
    }
}
"""A paged list route's OpenAPI: its answer's X-Total-Count header."""
