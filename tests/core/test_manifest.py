"""The manifest schema and the signing primitives."""

import json
from pathlib import Path

import pytest

from slmops.errors import ManifestInvalid
from slmops.manifest import Manifest, check_relative_path, tree_digest
from slmops.signing import check_signature, generate_keypair, load_private_key, load_public_key, sign


@pytest.mark.parametrize("path", ["model.onnx", "sub/dir/file.bin", "a..b/c"])
def test_relative_paths_are_accepted(path: str) -> None:
    assert check_relative_path(path) == path


@pytest.mark.parametrize("path", ["", "/abs", "../up", "a/../b", "a//b", "./a", "C:/x", "a\\b", "a\x00b"])
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        check_relative_path(path)


def test_every_schema_problem_is_reported_with_its_field(session_bundle: Path) -> None:
    data = json.loads((session_bundle / "manifest.json").read_text())
    data["name"] = "Bad Name!"
    data["variants"][0]["device_class"] = "toaster"
    with pytest.raises(ManifestInvalid) as raised:
        Manifest.parse(json.dumps(data).encode())
    assert "name" in str(raised.value) and "variants.0.device_class" in str(raised.value)


def test_canonical_bytes_are_stable_and_sorted(session_bundle: Path) -> None:
    manifest = Manifest.load(session_bundle / "manifest.json")
    again = Manifest.parse((session_bundle / "manifest.json").read_bytes())
    assert manifest.canonical_bytes() == again.canonical_bytes()
    canonical = manifest.canonical_bytes()
    # canonical form is a fixed point: sorted keys, no insignificant whitespace, UTF-8
    assert (
        canonical
        == json.dumps(json.loads(canonical), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )


def test_tree_digest_changes_with_content(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    first = tree_digest(tmp_path)
    (tmp_path / "a").write_text("2")
    assert tree_digest(tmp_path) != first


def test_signature_roundtrip_and_key_files(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair(tmp_path / "k")
    assert private_path.stat().st_mode & 0o777 == 0o600
    signature = sign(b"payload", load_private_key(private_path))
    assert check_signature(b"payload", signature, [load_public_key(public_path)]) == signature.key_id
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path / "k")
