"""Where slmops keeps its files on this machine.

Everything lives under one home folder: the platform's user data folder, or
`SLMOPS_HOME` when set (tests and containers point it elsewhere).
"""

import os
from pathlib import Path

import platformdirs


def home() -> Path:
    configured = os.environ.get("SLMOPS_HOME")
    return Path(configured) if configured else Path(platformdirs.user_data_dir("slmops"))


def models_dir() -> Path:
    """Materialized source checkpoints (Hugging Face folders)."""
    return home() / "models"


def keys_dir() -> Path:
    """Trusted public keys, one `.pub` file each, used when no key is named."""
    return home() / "trusted-keys"
