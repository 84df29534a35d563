"""Where slmops keeps its files on this machine, and how a file another process reads is replaced.

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


def replace_file(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a reader sees the old bytes or the new ones, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
