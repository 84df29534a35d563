"""The bundle store: verified bundles as folders, addressed by their manifest digest.

    incoming archive ─► verify_archive (signature, schema, every member) into incoming/<tmp>
                     ─► rename to bundles/<digest>/   (or dropped, when that digest is stored)

The digest is the sha256 of the manifest's canonical JSON; the manifest lists every
file's sha256, so one digest names the whole content. Nothing unverified ever appears
under bundles/.
"""

import os
import shutil
import uuid
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from slmops.bundle import verify_archive
from slmops.manifest import Manifest


class BundleStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.bundles = root / "bundles"
        for folder in (self.incoming, self.bundles):
            folder.mkdir(parents=True, exist_ok=True)

    def ingest(self, archive: Path | IO[bytes], keys: list[Ed25519PublicKey]) -> tuple[Manifest, str]:
        """Verify and store an archive; raises BundleError (nothing stored) when it must not be trusted."""
        staging = self.incoming / uuid.uuid4().hex
        manifest = verify_archive(archive, keys, extract_to=staging)
        digest = manifest.digest
        try:
            os.replace(staging, self.path(digest))
        except OSError:  # the same content is stored already (a rename cannot replace a full folder)
            shutil.rmtree(staging, ignore_errors=True)
        return manifest, digest

    def path(self, digest: str) -> Path:
        return self.bundles / digest

    def file(self, digest: str, path: str) -> Path | None:
        """A file of a stored bundle by its bundle-relative path; None for anything else (no such
        bundle or file, a folder, a path that climbs out of the bundle)."""
        root = self.path(digest).resolve()
        target = (root / path).resolve()
        return target if digest.isalnum() and target.is_relative_to(root) and target.is_file() else None

    def delete(self, digest: str) -> None:
        shutil.rmtree(self.path(digest), ignore_errors=True)
