"""The distribution: import names, a wheel that holds what it should, PyPA's `build` untouched."""

import subprocess
import sys
import zipfile
from pathlib import Path

import slmops

REPO = Path(__file__).resolve().parent.parent


def test_public_surface_is_what_we_mean() -> None:
    assert sorted(slmops.__all__) == sorted(
        [
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
    )
    for name in slmops.__all__:
        assert hasattr(slmops, name)


def test_folders_map_onto_slmops_imports() -> None:
    import slmops.agent
    import slmops.build
    import slmops.controller

    assert Path(slmops.build.__file__).parent == REPO / "build"
    assert Path(slmops.agent.__file__).parent == REPO / "agent"
    assert Path(slmops.controller.__file__).parent == REPO / "controller"


def test_pypa_build_still_imports_beside_us(tmp_path: Path) -> None:
    """In the installed environment `build` is PyPA's and ours is `slmops.build`.

    (Python run from the checkout's root puts the root first on sys.path, where our
    build/ folder would shadow it; the Makefile runs Python with -P for that reason.)
    """
    script = "import build, slmops.build; print(build.ProjectBuilder.__module__, slmops.build.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True
    )
    module, ours = result.stdout.split()
    assert module.startswith("build") and Path(ours) == REPO / "build" / "__init__.py"


def test_wheel_holds_the_packages_and_nothing_is_written_into_build(tmp_path: Path) -> None:
    before = {p for p in (REPO / "build").rglob("*") if "__pycache__" not in p.parts}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    after = {p for p in (REPO / "build").rglob("*") if "__pycache__" not in p.parts}
    assert after == before, f"files appeared in build/: {sorted(after - before)}"
    (wheel,) = tmp_path.glob("slmops-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "slmops/cli.py",
        "slmops/bundle.py",
        "slmops/build/export.py",
        "slmops/agent/serve/runtime.py",
        "slmops/agent/fleet/sync.py",
        "slmops/controller/__init__.py",
        "slmops/build/data/heldout.txt",
        "slmops/controller/dashboard/templates/fleet.html",
        "slmops/controller/dashboard/static/app.js",
        "slmops/controller/dashboard/static/vendor/htmx.min.js",
        "slmops/controller/dashboard/static/vendor/VENDORED.json",
    ):
        assert module in names, module


def test_every_vendored_file_is_the_one_its_record_names() -> None:
    """The dashboard's scripts and styles (and the tests' axe-core) are what VENDORED.json says: package,
    version, licence and sha256, with the licence text beside them."""
    import hashlib
    import json

    for record in (
        REPO / "controller/dashboard/static/vendor/VENDORED.json",
        REPO / "tests/controller/vendor/VENDORED.json",
    ):
        entries = json.loads(record.read_text())
        assert {p.name for p in record.parent.iterdir()} == {e["file"] for e in entries} | {record.name}
        for entry in entries:
            data = (record.parent / entry["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["file"]
            assert entry["licence"] and entry["version"] and entry["source"].startswith("https://registry.npmjs.org/")
            assert any(e["file"].startswith("LICENSE") and e["package"] == entry["package"] for e in entries)
