"""The agent's HTTP surfaces, one router each: OpenAI's API, Ollama's, and the agent's own
(health, metrics, admin). Handlers reach what they serve through `app.state`."""

from typing import Annotated, Any, Protocol

from fastapi import Depends, Request

from ...host import ModelHost
from ..serving import Serving


class FleetLink(Protocol):
    def status(self) -> dict[str, Any]: ...


def _host(request: Request) -> ModelHost:
    host: ModelHost = request.app.state.host
    return host


def _serving(request: Request) -> Serving:
    serving: Serving = request.app.state.serving
    return serving


Host = Annotated[ModelHost, Depends(_host)]
ServingOf = Annotated[Serving, Depends(_serving)]
