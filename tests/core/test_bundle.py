"""Bundle verification: every reason to refuse a bundle, folder and archive, each on its own."""

import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest

from slmops.bundle import Bundle, verify_archive, verify_bundle, write_archive
from slmops.errors import BundleFilesError, ManifestInvalid, SignatureError, UnsafeArchive
from slmops.signing import generate_keypair, load_private_key, trusted_keys

INT4_MODEL = "variants/cpu-int4/model.onnx"


def test_signed_bundle_verifies(bundle_dir: Path, trusted: list) -> None:
    bundle = verify_bundle(bundle_dir, trusted)
    assert {v.id for v in bundle.manifest.variants} == {"cpu-int4", "cpu-fp32"}


def test_missing_file_is_refused(bundle_dir: Path, trusted: list) -> None:
    (bundle_dir / INT4_MODEL).unlink()
    with pytest.raises(BundleFilesError, match=r"missing file.*cpu-int4/model\.onnx"):
        verify_bundle(bundle_dir, trusted)


def test_extra_file_is_refused(bundle_dir: Path, trusted: list) -> None:
    (bundle_dir / "variants" / "cpu-int4" / "payload.sh").write_text("echo hi\n")
    with pytest.raises(BundleFilesError, match=r"not listed.*payload\.sh"):
        verify_bundle(bundle_dir, trusted)


def test_altered_file_is_refused(bundle_dir: Path, trusted: list) -> None:
    target = bundle_dir / INT4_MODEL
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleFilesError, match=r"model\.onnx: sha256 .* does not match"):
        verify_bundle(bundle_dir, trusted)


def test_truncated_file_is_refused_by_size(bundle_dir: Path, trusted: list) -> None:
    target = bundle_dir / INT4_MODEL
    target.write_bytes(target.read_bytes()[:-10])
    with pytest.raises(BundleFilesError, match=r"size \d+ bytes, manifest says"):
        verify_bundle(bundle_dir, trusted)


def test_symlink_in_bundle_is_refused(bundle_dir: Path, trusted: list) -> None:
    os.symlink("/etc/passwd", bundle_dir / "variants" / "cpu-int4" / "link")
    with pytest.raises(UnsafeArchive, match="symbolic link"):
        verify_bundle(bundle_dir, trusted)


def test_edited_manifest_breaks_the_signature(bundle_dir: Path, trusted: list) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["variants"][0]["min_memory_bytes"] = 1
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SignatureError, match="does not match the manifest"):
        verify_bundle(bundle_dir, trusted)


def test_reformatted_manifest_still_verifies(bundle_dir: Path, trusted: list) -> None:
    """The signature covers content (canonical bytes), not whitespace."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest, indent=8))
    verify_bundle(bundle_dir, trusted)


def test_corrupt_signature_is_refused(bundle_dir: Path, trusted: list) -> None:
    sig = json.loads((bundle_dir / "signature.json").read_text())
    sig["signature"] = "A" * 86 + "=="
    (bundle_dir / "signature.json").write_text(json.dumps(sig))
    with pytest.raises(SignatureError, match="does not match"):
        verify_bundle(bundle_dir, trusted)


def test_malformed_signature_file_is_refused(bundle_dir: Path, trusted: list) -> None:
    (bundle_dir / "signature.json").write_text("{not json")
    with pytest.raises(SignatureError, match="malformed"):
        verify_bundle(bundle_dir, trusted)


def test_missing_signature_is_refused(bundle_dir: Path, trusted: list) -> None:
    (bundle_dir / "signature.json").unlink()
    with pytest.raises(SignatureError, match="not signed"):
        verify_bundle(bundle_dir, trusted)


def test_unknown_key_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    _, other_public = generate_keypair(tmp_path / "stranger")
    with pytest.raises(SignatureError, match="unknown key"):
        verify_bundle(bundle_dir, trusted_keys([other_public]))


def test_no_trusted_keys_is_refused(bundle_dir: Path) -> None:
    with pytest.raises(SignatureError, match="no trusted keys"):
        verify_bundle(bundle_dir, [])


def test_resigning_with_another_key_needs_that_key(bundle_dir: Path, tmp_path: Path, trusted: list) -> None:
    private, public = generate_keypair(tmp_path / "other")
    Bundle.open(bundle_dir).sign(load_private_key(private))
    verify_bundle(bundle_dir, trusted_keys([public]))
    with pytest.raises(SignatureError, match="unknown key"):
        verify_bundle(bundle_dir, trusted)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.pop("variants"), "variants"),
        (lambda m: m["variants"][0]["files"][0].update(path="../../etc/cron.d/x"), "path"),
        (lambda m: m["variants"][0]["files"][0].update(path="/etc/passwd"), "absolute"),
        (lambda m: m["variants"][0]["files"][0].update(sha256="xyz"), "sha256"),
        (lambda m: m.update(schema_version=99), "schema_version"),
        (lambda m: m.update(surprise=True), "surprise"),
    ],
)
def test_manifest_failing_the_schema_is_refused(bundle_dir: Path, trusted: list, edit, field: str) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    edit(manifest)
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestInvalid, match=field):
        verify_bundle(bundle_dir, trusted)


def test_manifest_that_is_not_json_is_refused(bundle_dir: Path, trusted: list) -> None:
    (bundle_dir / "manifest.json").write_bytes(b"\x00\xff not json")
    with pytest.raises(ManifestInvalid, match="not valid JSON"):
        verify_bundle(bundle_dir, trusted)


# --- archives ---------------------------------------------------------------------------------


@pytest.fixture
def archive(bundle_dir: Path, tmp_path: Path) -> Path:
    return write_archive(Bundle.open(bundle_dir), tmp_path / "bundle.tar")


def test_archive_roundtrip_unpacks_a_verified_bundle(archive: Path, tmp_path: Path, trusted: list) -> None:
    dest = tmp_path / "unpacked"
    manifest = verify_archive(archive, trusted, extract_to=dest)
    assert manifest.name == "tiny"
    assert verify_bundle(dest, trusted).manifest == manifest


def test_archive_starts_with_manifest_and_signature(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[:2] == ["manifest.json", "signature.json"]


def test_archive_verifies_from_a_pipe(archive: Path, trusted: list) -> None:
    """Agents verify while the bytes arrive: no seeking back."""
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as sink:
            sink.write(archive.read_bytes())

    feeder = threading.Thread(target=feed)
    feeder.start()
    with os.fdopen(read_fd, "rb") as stream:
        assert verify_archive(stream, trusted).name == "tiny"
    feeder.join(timeout=10)


def _rewrite(archive: Path, out: Path, extra: list[tarfile.TarInfo], drop: str | None = None) -> Path:
    """Copy an archive's members, optionally dropping one, then append crafted members."""
    with tarfile.open(archive) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            if member.name == drop:
                continue
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        for info in extra:
            payload = b"evil" if info.isfile() else None
            if payload is not None:
                info.size = len(payload)
            dst.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_member("variants/cpu-int4/../../../../tmp/slmops-escape"), r"'\.\.'"),
        (_member("/tmp/slmops-absolute"), "absolute"),
        (_member("variants/cpu-int4/link", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
        (_member("variants/cpu-int4/hard", tarfile.LNKTYPE, "manifest.json"), "is a link"),
        (_member("variants/cpu-int4/dev", tarfile.CHRTYPE), "device"),
        (_member("variants/cpu-int4/fifo", tarfile.FIFOTYPE), "device or FIFO"),
    ],
)
def test_unsafe_archive_members_are_refused_and_nothing_is_written(
    archive: Path, tmp_path: Path, trusted: list, member: tarfile.TarInfo, reason: str
) -> None:
    bad = _rewrite(archive, tmp_path / "bad.tar", [member])
    dest = tmp_path / "out" / "bundle"
    with pytest.raises(UnsafeArchive, match=reason):
        verify_archive(bad, trusted, extract_to=dest)
    assert not dest.exists()
    assert list((tmp_path / "out").iterdir()) == []  # the staging folder is gone too
    assert not Path("/tmp/slmops-escape").exists() and not Path("/tmp/slmops-absolute").exists()


def test_archive_with_extra_member_is_refused(archive: Path, tmp_path: Path, trusted: list) -> None:
    bad = _rewrite(archive, tmp_path / "bad.tar", [_member("variants/cpu-int4/extra.bin")])
    with pytest.raises(BundleFilesError, match="not listed"):
        verify_archive(bad, trusted)


def test_archive_with_missing_member_is_refused(archive: Path, tmp_path: Path, trusted: list) -> None:
    bad = _rewrite(archive, tmp_path / "bad.tar", [], drop=INT4_MODEL)
    dest = tmp_path / "dest"
    with pytest.raises(BundleFilesError, match="missing"):
        verify_archive(bad, trusted, extract_to=dest)
    assert not dest.exists()


def test_archive_without_signature_is_refused(archive: Path, tmp_path: Path, trusted: list) -> None:
    bad = _rewrite(archive, tmp_path / "bad.tar", [], drop="signature.json")
    with pytest.raises(SignatureError, match="not signed"):
        verify_archive(bad, trusted)


def test_archive_signed_by_unknown_key_is_refused_before_any_file_is_written(archive: Path, tmp_path: Path) -> None:
    _, stranger = generate_keypair(tmp_path / "stranger")
    dest = tmp_path / "dest"
    with pytest.raises(SignatureError, match="unknown key"):
        verify_archive(archive, trusted_keys([stranger]), extract_to=dest)
    assert not dest.exists()


def test_truncated_archive_is_refused(archive: Path, tmp_path: Path, trusted: list) -> None:
    bad = tmp_path / "truncated.tar"
    bad.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    dest = tmp_path / "dest"
    with pytest.raises((UnsafeArchive, BundleFilesError)):
        verify_archive(bad, trusted, extract_to=dest)
    assert not dest.exists()


def test_garbage_is_not_an_archive(tmp_path: Path, trusted: list) -> None:
    bad = tmp_path / "garbage.tar"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises((UnsafeArchive, ManifestInvalid)):
        verify_archive(bad, trusted)


def test_unpack_refuses_an_existing_folder(archive: Path, tmp_path: Path, trusted: list) -> None:
    dest = tmp_path / "exists"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        verify_archive(archive, trusted, extract_to=dest)
    assert (dest / "keep.txt").read_text() == "mine"
