"""The bundle store: verified bundles as folders, addressed by their manifest digest.

    incoming archive ─► stage: verify_archive (signature, schema, every member) into incoming/<tmp>
                     ─► keep: rename to bundles/<digest>/ (or dropped, when that digest is stored),
                        only once the registry takes it (a push refused with 409 leaves nothing)

                     ─► chunk-sums/<digest>/<chunk size>/<path>: the sha256 of each chunk of
                        each file in the agents' default chunk size, so the chunks of a bundle
                        pushed are sent without hashing them first (controller/chunks.py)

The digest is the sha256 of the manifest's canonical JSON; the manifest lists every
file's sha256, so one digest names the whole content. Nothing unverified ever appears
under bundles/. At start, `sweep` removes what an interrupted push left in incoming/ and any
stored bundle the registry does not list.
"""

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from slmops.bundle import MANIFEST_FILE, SIGNATURE_FILE, expected_members, verify_archive
from slmops.manifest import Manifest
from slmops.messages import DEFAULT_CHUNK_BYTES

SUM_BYTES = 32


class BundleStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.bundles = root / "bundles"
        self.chunk_sums_root = root / "chunk-sums"
        for folder in (self.incoming, self.bundles, self.chunk_sums_root):
            folder.mkdir(parents=True, exist_ok=True)

    def stage(self, archive: Path | IO[bytes], keys: list[Ed25519PublicKey]) -> tuple[Manifest, Path]:
        """Verify an archive into a staging folder (BundleError: nothing is kept). `keep` stores
        it, `discard` drops it."""
        staging = self.incoming / uuid.uuid4().hex
        return verify_archive(archive, keys, extract_to=staging), staging

    def keep(self, manifest: Manifest, staging: Path) -> bool:
        """Store a staged bundle under its digest; False when that content was stored already."""
        digest = manifest.digest
        try:
            os.replace(staging, self.path(digest))
        except OSError:  # the same content is stored already (a rename cannot replace a full folder)
            return False
        for path in [MANIFEST_FILE, SIGNATURE_FILE, *expected_members(manifest)]:
            if (stored := self.file(digest, path)) is not None:
                self.save_chunk_sums(digest, path, DEFAULT_CHUNK_BYTES, hash_chunks(stored, DEFAULT_CHUNK_BYTES))
        return True

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def sweep(self, registered: set[str]) -> list[str]:
        """Remove what interrupted pushes left in incoming/, and the stored bundles (with their chunk
        sums) whose digest is not `registered`; returns what was removed."""
        removed = []
        for left in self.incoming.iterdir():
            shutil.rmtree(left) if left.is_dir() and not left.is_symlink() else left.unlink()
            removed.append(f"incoming/{left.name}")
        for folder in (self.bundles, self.chunk_sums_root):
            for stored in folder.iterdir():
                if stored.name not in registered:
                    shutil.rmtree(stored, ignore_errors=True)
                    removed.append(f"{folder.name}/{stored.name}")
        return removed

    def path(self, digest: str) -> Path:
        return self.bundles / digest

    def file(self, digest: str, path: str) -> Path | None:
        """A file of a stored bundle by its bundle-relative path; None for anything else (no such
        bundle or file, a folder, a path that climbs out of the bundle)."""
        if not digest.isalnum() or "\x00" in path:  # a NUL cannot name a file (and os calls refuse it)
            return None
        root = self.path(digest).resolve()
        target = (root / path).resolve()
        return target if target.is_relative_to(root) and target.is_file() else None

    def chunk_sums(self, digest: str, path: str, chunk_size: int) -> list[bytes] | None:
        """The sha256 of each chunk of a stored file kept by `save_chunk_sums`; None when none are
        kept (or the file holding them is damaged). `path` is one `file` found."""
        try:
            kept = self._chunk_sums_path(digest, path, chunk_size).read_bytes()
        except OSError:
            return None
        if not kept or len(kept) % SUM_BYTES:
            return None
        return [kept[i : i + SUM_BYTES] for i in range(0, len(kept), SUM_BYTES)]

    def save_chunk_sums(self, digest: str, path: str, chunk_size: int, sums: list[bytes]) -> None:
        kept = self._chunk_sums_path(digest, path, chunk_size)
        kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = kept.with_name(f".{kept.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(b"".join(sums))
        os.replace(tmp, kept)

    def _chunk_sums_path(self, digest: str, path: str, chunk_size: int) -> Path:
        return self.chunk_sums_root / digest / str(chunk_size) / path

    def delete(self, digest: str) -> None:
        shutil.rmtree(self.path(digest), ignore_errors=True)
        shutil.rmtree(self.chunk_sums_root / digest, ignore_errors=True)


def hash_chunks(path: Path, chunk_size: int) -> list[bytes]:
    """The sha256 of each `chunk_size` piece of a file; an empty file is one empty chunk."""
    sums: list[bytes] = []
    with path.open("rb", buffering=0) as f:
        while (data := f.read(chunk_size)) or not sums:
            sums.append(hashlib.sha256(data).digest())
            if len(data) < chunk_size:
                break
    return sums
