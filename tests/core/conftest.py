"""The bundle format's tests run on a synthetic signed bundle: no model, so no torch to export one."""

from pathlib import Path

import pytest
from support import synthetic_bundle


@pytest.fixture(scope="session")
def session_bundle(signing_key: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic-bundle") / "tiny"
    synthetic_bundle(out, signing_key[0])
    return out
