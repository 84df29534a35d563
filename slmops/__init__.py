"""slmops: SLMOps for edge fleets.

The core package holds what every side shares and what the lightest side (the
agent) can import: the bundle format, its signatures and archives, the target
catalogue, and the command line. The pipeline lives in `slmops.build`, the device
daemon in `slmops.agent`, the fleet service in `slmops.controller`.
"""

from slmops.bundle import Bundle, verify_archive, verify_bundle
from slmops.errors import BundleError, SlmopsError
from slmops.manifest import Manifest, Variant
from slmops.targets import TARGETS, Target

__version__ = "0.1.0"

__all__ = [
    "TARGETS",
    "Bundle",
    "BundleError",
    "Manifest",
    "SlmopsError",
    "Target",
    "Variant",
    "__version__",
    "verify_archive",
    "verify_bundle",
]
