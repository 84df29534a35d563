"""Every error slmops raises on purpose, so callers catch one family.

    SlmopsError
    ├── BundleError                 a bundle or archive that must not be trusted
    │   ├── ManifestInvalid         manifest.json missing, not JSON, or failing the schema
    │   ├── SignatureError          no signature, a bad one, or a key we do not trust
    │   ├── BundleFilesError        missing, extra, or altered files
    │   ├── UnknownVariant          a variant id the manifest does not list
    │   └── UnsafeArchive           members with `..`, absolute paths, links or devices
    ├── TargetError                 a target unknown, or not buildable on this machine
    ├── ModelSourceError            a model that cannot be found or materialized
    └── GateFailed                  an evaluation figure outside its bound

Messages name the thing and the reason, so the CLI prints them as they are.
"""

from collections.abc import Iterable, Mapping
from typing import Any


class SlmopsError(Exception):
    """Base of all deliberate slmops errors."""


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


class TargetError(SlmopsError):
    pass


class ModelSourceError(SlmopsError):
    pass


class GateFailed(SlmopsError):
    pass


def describe_validation(errors: "Iterable[Mapping[str, Any]]", skip: int = 0, root: str = "(root)") -> str:
    """pydantic's `ValidationError.errors()` as one line: `field.path: message; ...`.

    `skip` drops leading location parts (FastAPI's "body"), `root` names an empty location.
    """
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'][skip:]) or root}: {err['msg']}" for err in errors)
