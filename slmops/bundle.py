"""A bundle on disk (a folder) and on the wire (one streaming `.tar`), and how to trust one.

    bundle/
    ├── manifest.json          what is inside (slmops.manifest), signed over its canonical bytes
    ├── signature.json         Ed25519 signature (slmops.signing)
    └── variants/<id>/...      one folder per variant, loadable by onnxruntime-genai as it is

The archive holds the same paths, manifest and signature first, so a reader checks
the signature before it reads a byte of model data, then hashes each file as it
streams by. Unpacking writes into a staging folder beside the target and renames
it into place only when every file is verified: a failure leaves nothing behind.
"""

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from slmops.errors import BundleFilesError, ManifestInvalid, SignatureError, UnsafeArchive
from slmops.manifest import (
    HASH_CHUNK_BYTES,
    MANIFEST_FILE,
    FileEntry,
    Manifest,
    check_relative_path,
    sha256_file,
)
from slmops.signing import SIGNATURE_FILE, Signature, check_signature, sign

VARIANTS_DIR = "variants"
MAX_METADATA_BYTES = 16 * 1024 * 1024
"""manifest.json and signature.json are small; a larger one is an attack, not a bundle."""


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest
    signature: Signature | None

    @classmethod
    def open(cls, root: Path) -> "Bundle":
        """Read manifest and signature; check nothing else (see `verify_bundle`)."""
        if not root.is_dir():
            raise ManifestInvalid(f"{root} is not a bundle folder")
        manifest = Manifest.load(root / MANIFEST_FILE)
        sig_path = root / SIGNATURE_FILE
        signature = Signature.parse(sig_path.read_bytes(), str(sig_path)) if sig_path.exists() else None
        return cls(root, manifest, signature)

    def variant_dir(self, variant_id: str) -> Path:
        return self.root / VARIANTS_DIR / self.manifest.variant(variant_id).id

    def sign(self, private_key: Ed25519PrivateKey) -> "Bundle":
        signature = sign(self.manifest.canonical_bytes(), private_key)
        (self.root / SIGNATURE_FILE).write_text(signature.model_dump_json(indent=2) + "\n")
        return Bundle(self.root, self.manifest, signature)


def expected_members(manifest: Manifest, variant_ids: Collection[str] | None = None) -> dict[str, FileEntry]:
    """Archive/bundle-relative path of every file the manifest lists (of `variant_ids` only, if given)."""
    return {
        f"{VARIANTS_DIR}/{v.id}/{f.path}": f
        for v in manifest.variants
        if variant_ids is None or v.id in variant_ids
        for f in v.files
    }


def verify_bundle(
    root: Path,
    keys: list[Ed25519PublicKey],
    variant_ids: Collection[str] | None = None,
    hashed: Collection[str] = (),
) -> Bundle:
    """Check signature, then that the folder holds exactly the listed files with their digests.

    With `variant_ids` the folder is a device's slot: the signed manifest of the whole bundle,
    and the files of those variants only. `hashed` names files (bundle-relative) the caller
    checked against this manifest's sha256 as it wrote them: their size is checked, their
    bytes are not read again.
    """
    bundle = Bundle.open(root)
    check_signature(bundle.manifest.canonical_bytes(), bundle.signature, keys)
    for variant_id in variant_ids or ():
        bundle.manifest.variant(variant_id)  # UnknownVariant names a variant the manifest does not have
    expected = expected_members(bundle.manifest, variant_ids)
    present: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                raise UnsafeArchive(f"{rel} is a symbolic link; bundles hold regular files only")
            if name in filenames:
                present.add(rel)
    present -= {MANIFEST_FILE, SIGNATURE_FILE}
    _check_file_sets(expected, present, where=str(root))
    for rel, entry in sorted(expected.items()):
        _check_size(rel, entry, root / rel)
        if rel not in hashed:
            _check_digest(rel, entry, root / rel)
    return bundle


def _check_file_sets(expected: dict[str, FileEntry], present: set[str], where: str) -> None:
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    if missing:
        raise BundleFilesError(f"{where}: missing file(s) listed in the manifest: {', '.join(missing)}")
    if extra:
        raise BundleFilesError(f"{where}: file(s) not listed in the manifest: {', '.join(extra)}")


def _check_size(rel: str, entry: FileEntry, path: Path) -> None:
    if (size := path.stat().st_size) != entry.size:
        raise BundleFilesError(f"{rel}: size {size} bytes, manifest says {entry.size}")


def _check_digest(rel: str, entry: FileEntry, path: Path) -> None:
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise BundleFilesError(f"{rel}: sha256 {digest} does not match the manifest")


def write_archive(bundle: Bundle, out: Path) -> Path:
    """Pack a bundle folder into one uncompressed tar: metadata first, regular files only."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    mtime = int(bundle.manifest.created.timestamp())
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        metadata = [MANIFEST_FILE] + ([SIGNATURE_FILE] if bundle.signature else [])
        for rel in metadata + sorted(expected_members(bundle.manifest)):
            info = tar.gettarinfo(str(bundle.root / rel), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            info.mtime = mtime
            with (bundle.root / rel).open("rb") as f:
                tar.addfile(info, f)
    os.replace(tmp, out)
    return out


def safe_member(member: tarfile.TarInfo) -> str:
    """The member's path, or UnsafeArchive: `..`, absolute paths, links, devices and FIFOs are refused."""
    name = member.name
    try:
        check_relative_path(name.rstrip("/") if member.isdir() else name)
    except ValueError as e:
        raise UnsafeArchive(f"archive member refused: {e}") from None
    if member.issym() or member.islnk():
        raise UnsafeArchive(f"archive member {name!r} is a link (to {member.linkname!r}); links are refused")
    if member.ischr() or member.isblk() or member.isfifo():
        raise UnsafeArchive(f"archive member {name!r} is a device or FIFO; only regular files are allowed")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchive(f"archive member {name!r} has unsupported type {member.type!r}")
    return name


def extract_safely(archive: IO[bytes], dest: Path, max_bytes: int) -> None:
    """Unpack a tar of plain files and folders into `dest` (made), every member checked first (safe_member)
    and the sum of their sizes bounded. Nothing is written when one is refused."""
    with tarfile.open(fileobj=archive, mode="r:*") as tar:
        members = tar.getmembers()
        for member in members:
            safe_member(member)
        total = sum(m.size for m in members if m.isfile())
        if total > max_bytes:
            raise UnsafeArchive(f"the archive unpacks to {total} bytes, past the {max_bytes} allowed")
        dest.mkdir(parents=True, exist_ok=True)
        tar.extractall(dest, members=members, filter="data")


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > MAX_METADATA_BYTES:
        raise ManifestInvalid(f"{member.name} is {member.size} bytes; refusing to read so much metadata")
    f = tar.extractfile(member) if member.isfile() else None
    if f is None:
        raise ManifestInvalid(f"archive member {member.name!r} is a folder; it must be a file")
    return f.read()


def verify_archive(archive: Path | IO[bytes], keys: list[Ed25519PublicKey], extract_to: Path | None = None) -> Manifest:
    """Stream through an archive, verifying signature and every file; optionally unpack it.

    With `extract_to`, the bundle appears there complete and verified, or not at all.
    """
    staging: Path | None = None
    if extract_to is not None:
        if extract_to.exists():
            raise FileExistsError(f"{extract_to} exists; unpack into a new folder")
        extract_to.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{extract_to.name}.", dir=extract_to.parent))
    try:
        try:
            manifest = _stream_verify(archive, keys, staging)
        except (tarfile.TarError, EOFError) as e:
            raise UnsafeArchive(f"the archive is corrupt or truncated: {e}") from None
        if staging is not None and extract_to is not None:
            os.replace(staging, extract_to)
            staging = None
        return manifest
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _stream_verify(archive: Path | IO[bytes], keys: list[Ed25519PublicKey], staging: Path | None) -> Manifest:
    source = {"name": archive} if isinstance(archive, Path) else {"fileobj": archive}
    with tarfile.open(mode="r|", **source) as tar:
        members = iter(tar)
        first = next(members, None)
        if first is None or safe_member(first) != MANIFEST_FILE:
            raise ManifestInvalid(f"the archive does not start with {MANIFEST_FILE}")
        manifest_bytes = _read_small(tar, first)
        manifest = Manifest.parse(manifest_bytes, origin=f"archive {MANIFEST_FILE}")
        second = next(members, None)
        signature = None
        if second is not None and safe_member(second) == SIGNATURE_FILE:
            signature = Signature.parse(_read_small(tar, second), origin=f"archive {SIGNATURE_FILE}")
            second = None
        # Checked before any model byte is read: an untrusted archive costs us nothing more.
        check_signature(manifest.canonical_bytes(), signature, keys)
        if staging is not None:
            (staging / MANIFEST_FILE).write_bytes(manifest_bytes)
            if signature is not None:
                (staging / SIGNATURE_FILE).write_text(signature.model_dump_json(indent=2) + "\n")
        expected = expected_members(manifest)
        seen: set[str] = set()
        pending = [second] if second is not None else []
        for member in _chain(pending, members):
            name = safe_member(member).rstrip("/")
            if member.isdir():
                continue
            if name not in expected or name in seen:
                raise BundleFilesError(f"archive member {name!r} is not listed in the manifest (or repeats)")
            seen.add(name)
            _copy_verified(tar, member, expected[name], name, staging)
        _check_file_sets(expected, seen, where="archive")
    return manifest


def _chain(first: list[tarfile.TarInfo], rest: Iterator[tarfile.TarInfo]) -> Iterator[tarfile.TarInfo]:
    yield from first
    yield from rest


def _copy_verified(
    tar: tarfile.TarFile, member: tarfile.TarInfo, entry: FileEntry, name: str, staging: Path | None
) -> None:
    if member.size != entry.size:
        raise BundleFilesError(f"{name}: size {member.size} bytes, manifest says {entry.size}")
    source = tar.extractfile(member)
    assert source is not None
    digest = hashlib.sha256()
    with _open_new(staging / name) if staging is not None else contextlib.nullcontext() as sink:
        while chunk := source.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            if sink is not None:
                sink.write(chunk)
    if digest.hexdigest() != entry.sha256:
        raise BundleFilesError(f"{name}: sha256 {digest.hexdigest()} does not match the manifest")


def _open_new(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("xb")


__all__ = [
    "VARIANTS_DIR",
    "Bundle",
    "SignatureError",
    "expected_members",
    "verify_archive",
    "verify_bundle",
    "write_archive",
]
