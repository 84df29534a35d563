"""The one client of the controller's REST API: typed answers (the API's own response models),
timeouts on every call, and every error (the envelope, or no answer at all) as ControllerError.

    with ControllerClient("http://127.0.0.1:8700", token) as controller:
        for device in controller.devices():
            print(device.id, device.online)

The CLI, the example, the benchmarks and the end-to-end tests all go through it.
"""

from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import TypeAdapter

from slmops.controller.protocol import (
    TOTAL_HEADER,
    AuditEntry,
    BuildJobView,
    BuildLog,
    BundleDetail,
    BundleSummary,
    CommandAnswer,
    ControllerHealth,
    DesiredView,
    DeviceEnrolment,
    DeviceSummary,
    FleetDesired,
    RolloutRequest,
    RolloutView,
    TelemetryEntry,
)
from slmops.errors import ControllerError
from slmops.messages import CommandName

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8700"
UPLOAD_TIMEOUT = httpx.Timeout(30, read=600)
"""A push waits while the controller verifies the whole bundle."""


class ControllerClient:
    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout_s: float = 30) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> "ControllerClient":
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # --- the service -------------------------------------------------------------------------

    def health(self) -> ControllerHealth:
        return self._call("GET", "/health", ControllerHealth)

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        return self._call("GET", "/v1/audit", list[AuditEntry], params={"limit": limit})

    # --- bundles -----------------------------------------------------------------------------

    def push(self, archive: Path, progress: Callable[[int], None] | None = None) -> tuple[BundleSummary, bool]:
        """Upload a bundle archive; True when it is new. `progress` sees each chunk's size as it goes."""
        size = archive.stat().st_size

        def body() -> Iterator[bytes]:
            with archive.open("rb") as f:
                while chunk := f.read(1 << 20):
                    if progress is not None:
                        progress(len(chunk))
                    yield chunk

        headers = {"Content-Type": "application/x-tar", "Content-Length": str(size)}
        response = self._send("POST", "/v1/bundles", content=body(), headers=headers, timeout=UPLOAD_TIMEOUT)
        return BundleSummary.model_validate(response.json()), response.status_code == 201

    def bundles(self) -> list[BundleSummary]:
        return self._call("GET", "/v1/bundles", list[BundleSummary])

    def bundle(self, name: str, version: str) -> BundleDetail:
        return self._call("GET", f"/v1/bundles/{name}/{version}", BundleDetail)

    def delete_bundle(self, name: str, version: str) -> None:
        self._send("DELETE", f"/v1/bundles/{name}/{version}")

    # --- devices -----------------------------------------------------------------------------

    def devices(self, page_size: int = 1000, **filters: str) -> list[DeviceSummary]:
        """Every device the filters choose (status, hardware_class, group, tag, q; empty ones choose all), by
        id, `page_size` a request."""
        return self._all("/v1/devices", DeviceSummary, page_size, {k: v for k, v in filters.items() if v})

    def device(self, device_id: str) -> DeviceSummary:
        return self._call("GET", f"/v1/devices/{device_id}", DeviceSummary)

    def telemetry(self, device_id: str, limit: int = 100) -> list[TelemetryEntry]:
        return self._call("GET", f"/v1/devices/{device_id}/telemetry", list[TelemetryEntry], params={"limit": limit})

    def label(
        self, device_id: str, tags: dict[str, str] | None = None, groups: list[str] | None = None
    ) -> DeviceSummary:
        body = {key: value for key, value in (("tags", tags), ("groups", groups)) if value is not None}
        return self._call("PATCH", f"/v1/devices/{device_id}", DeviceSummary, json=body)

    def desire(self, device_id: str, bundle: str, version: str) -> DesiredView:
        body = {"bundle": bundle, "version": version}
        return self._call("PUT", f"/v1/devices/{device_id}/desired", DesiredView, json=body)

    def desire_many(
        self, bundle: str, version: str, devices: list[str] | None = None, group: str | None = None
    ) -> FleetDesired:
        """One bundle for these devices, or a group's, at once (all or none)."""
        body: dict[str, Any] = {"bundle": bundle, "version": version}
        body.update({"devices": devices} if devices is not None else {"group": group})
        return self._call("PUT", "/v1/desired", FleetDesired, json=body)

    def command(self, device_id: str, command: CommandName, timeout_s: float = 30) -> CommandAnswer:
        """Send a command and wait for the device's reply (a 504 ControllerError past `timeout_s`)."""
        body = {"command": command, "timeout_s": timeout_s}
        return self._call("POST", f"/v1/devices/{device_id}/commands", CommandAnswer, json=body, timeout=timeout_s + 10)

    def enrol(self, device_id: str) -> DeviceEnrolment:
        return self._call("POST", f"/v1/devices/{device_id}/enrolment", DeviceEnrolment)

    def revoke(self, device_id: str) -> None:
        self._send("DELETE", f"/v1/devices/{device_id}/enrolment")

    def create_rollout(self, request: RolloutRequest) -> RolloutView:
        return self._call("POST", "/v1/rollouts", RolloutView, json=request.model_dump())

    def rollouts(self) -> list[RolloutView]:
        """Every rollout, newest first, page by page."""
        return self._all("/v1/rollouts", RolloutView, 100)

    def rollout(
        self, rollout_id: int, state: str | None = None, wave: int | None = None, limit: int = 1000, offset: int = 0
    ) -> RolloutView:
        """The rollout with a page of its devices (`limit` 0: its counts by state only)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        params.update({k: v for k, v in (("state", state), ("wave", wave)) if v is not None})
        return self._call("GET", f"/v1/rollouts/{rollout_id}", RolloutView, params=params)

    def rollout_action(self, rollout_id: int, action: str) -> RolloutView:
        """pause, resume, abort, rollback or promote."""
        return self._call("POST", f"/v1/rollouts/{rollout_id}/{action}", RolloutView)

    def submit_build(self, archive: Path) -> BuildJobView:
        """Queue a recipe: `archive` is a tar with recipe.yaml at its root and the files it names."""
        headers = {"Content-Type": "application/x-tar"}
        with archive.open("rb") as f:  # streamed, as a bundle push is: recipes carry their data
            response = self._send("POST", "/v1/builds", content=f, headers=headers, timeout=UPLOAD_TIMEOUT)
        return BuildJobView.model_validate(response.json())

    def builds(self) -> list[BuildJobView]:
        """Every build job, newest first, page by page."""
        return self._all("/v1/builds", BuildJobView, 100)

    def build(self, build_id: int) -> BuildJobView:
        return self._call("GET", f"/v1/builds/{build_id}", BuildJobView)

    def build_log(self, build_id: int, offset: int = 0) -> BuildLog:
        return self._call("GET", f"/v1/builds/{build_id}/log", BuildLog, params={"offset": offset})

    def cancel_build(self, build_id: int) -> BuildJobView:
        return self._call("POST", f"/v1/builds/{build_id}/cancel", BuildJobView)

    # --- the wire ----------------------------------------------------------------------------

    def _all(self, path: str, item: type[T], page_size: int, params: dict[str, str] | None = None) -> list[T]:
        """A paged list route's items, every page (`limit`, `offset`; the X-Total-Count header)."""
        items: list[T] = []
        while True:
            asked = {**(params or {}), "limit": page_size, "offset": len(items)}
            response = self._send("GET", path, params=asked)
            page = TypeAdapter(list[item]).validate_json(response.content)  # type: ignore[valid-type]
            items.extend(page)
            if not page or len(items) >= int(response.headers.get(TOTAL_HEADER, len(items))):
                return items

    def _call(self, method: str, path: str, answer: type[T], **kwargs: Any) -> T:
        return TypeAdapter(answer).validate_json(self._send(method, path, **kwargs).content)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ControllerError(f"cannot reach the controller at {self.url}: {e}") from None
        if response.status_code >= 400:
            raise _refusal(response)
        return response


def _refusal(response: httpx.Response) -> ControllerError:
    try:
        error = response.json()["error"]
        return ControllerError(error["message"], response.status_code, error.get("type", ""), error.get("code"))
    except (ValueError, KeyError, TypeError):
        return ControllerError(response.text or response.reason_phrase, response.status_code)
