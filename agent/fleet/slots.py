"""The device's A/B slots: verified bundles on disk, and which one is served.

    data_dir/slots/<digest>/          a verified slot (the files of one variant, the signed manifest)
    data_dir/slots/<digest>.partial/  one being fetched
    data_dir/active.json              {"active": Slot, "previous": Slot}, replaced atomically

A `kill -9` at any point leaves active.json naming a complete, verified slot (old or new): a slot
is renamed into place before active.json points at it, and active.json is replaced with os.replace.
"""

import os
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError


class Slot(BaseModel):
    """One slot active.json names: the bundle in it and the variant this device runs of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    digest: str
    variant: str
    bundle: str
    version: str


class _Pointers(BaseModel):
    active: Slot | None = None
    previous: Slot | None = None


class Slots:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "slots"
        self.root.mkdir(parents=True, exist_ok=True)
        self.active_file = data_dir / "active.json"

    def path(self, digest: str) -> Path:
        return self.root / digest

    def partial(self, digest: str) -> Path:
        return self.root / f"{digest}.partial"

    def _read(self) -> _Pointers:
        try:
            return _Pointers.model_validate_json(self.active_file.read_bytes())
        except (FileNotFoundError, ValidationError):  # none yet, or not ours: nothing is active
            return _Pointers()

    def active(self) -> Slot | None:
        """The slot to serve, or None."""
        return self._read().active

    def previous(self) -> Slot | None:
        return self._read().previous

    def set_active(self, slot: Slot) -> None:
        """Point at a complete slot, atomically; keep it and the previous one, drop older slots.
        Pointing at the active slot again keeps the previous one as it is."""
        pointers = self._read()
        active = pointers.active
        previous = pointers.previous if active is not None and active.digest == slot.digest else active
        tmp = self.active_file.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.write(_Pointers(active=slot, previous=previous).model_dump_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.active_file)
        keep = {slot.digest, previous.digest if previous else ""}
        for folder in self.root.iterdir():
            if folder.is_dir() and not folder.name.endswith(".partial") and folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)
