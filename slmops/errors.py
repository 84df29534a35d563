"""Every error slmops raises on purpose, so callers catch one family.

    SlmopsError
    ├── ConfigError                 a settings file or value that cannot be used
    ├── MessageInvalid              an MQTT payload that is too big, too deep, or fails its schema
    ├── BundleError                 a bundle or archive that must not be trusted (HTTP 422)
    │   ├── ManifestInvalid         manifest.json missing, not JSON, or failing the schema
    │   ├── SignatureError          no signature, a bad one, or a key we do not trust
    │   ├── BundleFilesError        missing, extra, or altered files
    │   ├── UnknownVariant          a variant id the manifest does not list
    │   └── UnsafeArchive           members with `..`, absolute paths, links or devices
    ├── BuildError                  an export, evaluation or bundle assembly that cannot go on
    │   ├── TargetError             a build target unknown, or not buildable on this machine
    │   ├── ModelSourceError        a model that cannot be found or materialized
    │   └── GateFailed              an evaluation figure outside its bound
    ├── RuntimeLoadError            a variant that cannot run here (files, provider, smoke test)
    ├── SyncError                   a desired state that failed on the device; tried again later
    │   └── Unfit                   ... and that cannot pass here, whatever is tried
    ├── TransferError               a bundle file that could not be fetched as the manifest names it
    │   └── DiskFull                ... because the device's disk refused a write
    ├── PortTaken                   the agent's HTTP port is not free
    ├── BrokerStartError            the embedded Mosquitto cannot start
    ├── Rejected                    a request that cannot be carried out as asked (HTTP 400)
    │   ├── NotFound                ... naming something that does not exist (404)
    │   └── Conflict                ... clashing with the state it would change (409)
    ├── Unavailable                 a part the request needs is not there now: the MQTT link (503)
    │   └── Unanswered              ... or a device did not answer in time (504)
    ├── HttpError                   an answer with its own status, error type and headers
    └── ControllerError             the controller refused a client's request, or could not be reached

`slmops.http` maps them to HTTP statuses in one place. Messages name the thing and the
reason, so the CLI prints them as they are.
"""

from collections.abc import Iterable, Mapping
from typing import Any


class SlmopsError(Exception):
    """Base of all deliberate slmops errors."""


class ConfigError(SlmopsError):
    pass


class MessageInvalid(SlmopsError):
    pass


class BundleError(SlmopsError):
    """A bundle that fails verification; nothing from it may be used."""


class ManifestInvalid(BundleError):
    pass


class SignatureError(BundleError):
    pass


class BundleFilesError(BundleError):
    pass


class UnknownVariant(BundleError):
    pass


class UnsafeArchive(BundleError):
    pass


class BuildError(SlmopsError):
    pass


class TargetError(BuildError):
    pass


class ModelSourceError(BuildError):
    pass


class GateFailed(BuildError):
    pass


class RuntimeLoadError(SlmopsError):
    """The variant cannot run here (missing files, or its execution provider is unavailable)."""


class SyncError(SlmopsError):
    """A desired state that failed here, and may pass when tried again."""


class Unfit(SyncError):
    """A desired state this device cannot take whatever is tried: the bundle is at fault or fits nowhere
    here. It is not tried again until another desired state comes."""


class TransferError(SlmopsError):
    pass


class DiskFull(TransferError):
    """A chunk could not be written (ENOSPC, EIO): what landed before is kept for the next attempt."""


class PortTaken(SlmopsError):
    pass


class BrokerStartError(SlmopsError):
    pass


class Rejected(SlmopsError):
    """A request the service cannot carry out as asked; the caller must change it."""


class NotFound(Rejected):
    pass


class Conflict(Rejected):
    pass


class Unavailable(SlmopsError):
    pass


class Unanswered(Unavailable):
    pass


class HttpError(SlmopsError):
    """An HTTP answer decided where it is raised: its status, error type (OpenAI's `type`), and
    optionally a `code`, the `param` at fault and response headers (Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


class ControllerError(SlmopsError):
    """What `slmops.client` raises: the controller's error envelope (status, type, code and its
    message), or `status` None when no answer came."""

    def __init__(self, message: str, status: int | None = None, type_: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.code = message, status, type_, code


def describe_validation(errors: "Iterable[Mapping[str, Any]]", skip: int = 0, root: str = "(root)") -> str:
    """pydantic's `ValidationError.errors()` as one line: `field.path: message; ...`.

    `skip` drops leading location parts (FastAPI's "body"), `root` names an empty location.
    """
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'][skip:]) or root}: {err['msg']}" for err in errors)
