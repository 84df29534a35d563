"""Following the desired state: fetch the one variant this device runs, verify it, switch to it.

    desired {bundle, version, digest}
      ─► already served? report healthy
      ─► its slot still here (the previous one, or the active one when something else was loaded)?
         verify it whole, load + smoke test, switch back                          report healthy
      ─► manifest + signature from the controller's store ─► signature trusted? digest matches?
      ─► rank variants for this device (choice.py) ─► disk space for the files still missing?
      ─► download each file into slots/<digest>.partial/ (chunks over MQTT or HTTP Range: a
         restart resumes, complete files are not fetched again; what an earlier attempt left
         that this variant does not list is removed), each checked against the manifest's
         sha256 (over MQTT while it lands: no second pass)                       report downloading %
      ─► rename to slots/<digest>/                                                report verifying
      ─► verify the slot (signature, exactly the files of that variant, their sizes: their
         sha256 were checked as they landed) ─► load + smoke test ─► engine.swap  report activating
      ─► active.json replaced atomically (the previous slot stays)                report healthy
    any failure: report failed (reason); what was served stays served, and unless the bundle
    itself is at fault (signature, digest, no variant fits here) the same desired state is tried
    again after a backoff (retry_min_s, doubling up to retry_max_s): a full disk, a lost link
    or a refused smoke test may pass later
    a newer desired state replaces a queued or retried older one; only its partial slot is kept

The slot is renamed into place before active.json points at it, so a `kill -9` at any point
leaves a complete, verified slot served (agent/fleet/slots.py).
"""

import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from slmops.bundle import MANIFEST_FILE, SIGNATURE_FILE, VARIANTS_DIR, expected_members
from slmops.errors import BundleError, SlmopsError, SyncError, Unfit
from slmops.manifest import Manifest, sha256_file
from slmops.messages import ActivationStatus, Command, CommandReply, DesiredState, Reported
from slmops.signing import Signature, check_signature, trusted_keys
from slmops.supervision import Supervised

from .. import choice, hardware
from ..config import AgentConfig
from ..host import ModelHost
from .slots import Slot, Slots
from .transfer import MAX_UNLISTED_BYTES, MqttFetcher, Wanted, bitmap_path, bytes_on_disk, served_wrong

log = logging.getLogger(__name__)

DOWNLOAD_CHUNK_BYTES = 1 << 20
REPORT_EVERY_PERCENT = 5.0


class Sync:
    """One worker thread applying desired states and commands in order, one at a time."""

    def __init__(
        self,
        config: AgentConfig,
        server: ModelHost,
        report: Callable[[Reported], None],
        reply: Callable[[CommandReply], None],
        fetcher: MqttFetcher | None = None,
    ) -> None:
        self.config, self.server, self.report, self.reply = config, server, report, reply
        self.fetcher = fetcher
        self.slots = Slots(config.data_dir)
        self._queue: deque[DesiredState | Command] = deque()
        self._retry: tuple[DesiredState, float] | None = None  # a failed desired state, and when to try again
        self._failures = 0  # in a row, for the backoff
        self._changed = threading.Condition()
        self._stopping = False
        self.thread = Supervised("slmops-sync", self._run)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify()
        self.thread.join(timeout=30)

    def submit(self, work: DesiredState | Command) -> None:
        """Queue work (from paho's thread: returns at once). A desired state replaces every older one
        not yet begun, and a retry waiting: only the newest is what the device should run."""
        with self._changed:
            if isinstance(work, DesiredState):
                for older in [w for w in self._queue if isinstance(w, DesiredState)]:
                    self._queue.remove(older)
                    log.info(
                        "desired %s %s is superseded by %s %s", older.bundle, older.version, work.bundle, work.version
                    )
                self._retry, self._failures = None, 0
            self._queue.append(work)
            self._changed.notify()

    def _next(self) -> DesiredState | Command | None:
        with self._changed:
            while not self._stopping:
                if self._queue:
                    return self._queue.popleft()
                if self._retry is not None and (wait := self._retry[1] - time.monotonic()) <= 0:
                    desired, self._retry = self._retry[0], None
                    log.info("trying desired %s %s again", desired.bundle, desired.version)
                    return desired
                self._changed.wait(None if self._retry is None else wait)
            return None

    def _run(self) -> None:
        while (work := self._next()) is not None:
            try:
                if isinstance(work, Command):
                    self.reply(self.run_command(work))
                else:
                    self._apply_or_report(work)
            except Exception:  # the worker outlives whatever one piece of work does
                log.exception("the sync worker could not finish %s", type(work).__name__)

    def _apply_or_report(self, desired: DesiredState) -> None:
        try:
            self.apply(desired)
        except Exception as e:  # the reason goes to the controller; the worker goes on
            reason = str(e) or type(e).__name__
            if not isinstance(e, Unfit | BundleError):
                with self._changed:
                    self._failures += 1
                    delay = min(self.config.retry_max_s, self.config.retry_min_s * 2 ** (self._failures - 1))
                    if not any(isinstance(w, DesiredState) for w in self._queue):  # else a newer one is next
                        self._retry = (desired, time.monotonic() + delay)
                reason += f" (trying again in {delay:.0f} s)"
            log.warning("desired %s %s failed: %s", desired.bundle, desired.version, reason)
            self._report(desired, "failed", reason=reason)
        else:
            with self._changed:
                self._failures = 0

    def run_command(self, command: Command) -> CommandReply:
        try:
            if command.command == "probe":
                result = hardware.probe(self.config.data_dir).model_dump(mode="json")
            elif command.command == "reload":
                result = self._serve(self.slots.active(), "nothing is active to reload")
            else:
                result = self._rollback()
        except Exception as e:  # the operator gets the reason; the agent goes on
            log.warning("command %s failed: %s", command.command, e)
            return CommandReply(correlation_id=command.correlation_id, ok=False, error=str(e))
        return CommandReply(correlation_id=command.correlation_id, ok=True, result=result)

    def _serve(self, record: Slot | None, missing: str) -> dict[str, object]:
        if record is None:
            raise SyncError(missing)
        served = self.server.load_bundle(self.slots.path(record.digest), record.variant)
        return {"serving": served.model_id, "variant": served.variant_id, "provider": served.provider}

    def _rollback(self) -> dict[str, object]:
        """Back to the previous slot (kept for this); the one rolled back from stays as previous."""
        previous = self.slots.previous()
        result = self._serve(previous, "there is no previous slot to roll back to")
        assert previous is not None
        self.slots.set_active(previous)
        desired = DesiredState(bundle=previous.bundle, version=previous.version, digest=previous.digest)
        self._report(desired, "rolled_back", variant=previous.variant)
        return result

    def _report(
        self,
        desired: DesiredState,
        status: ActivationStatus,
        variant: str | None = None,
        percent: float | None = None,
        reason: str = "",
    ) -> None:
        self.report(
            Reported(
                bundle=desired.bundle,
                version=desired.version,
                digest=desired.digest,
                status=status,
                variant=variant,
                percent=percent,
                reason=reason,
            )
        )

    def apply(self, desired: DesiredState) -> None:
        current = self.server.engine.current
        if current is not None and current.manifest.digest == desired.digest:
            self._report(desired, "healthy", variant=current.variant_id)
            return
        if self._activate_kept_slot(desired):
            return
        self._sweep_partials(keep=desired.digest)
        self._report(desired, "downloading", percent=0.0)
        log.info(
            "fetching %s:%s (%s) over %s", desired.bundle, desired.version, desired.digest[:12], self.config.transfer
        )
        partial = self.slots.partial(desired.digest)
        partial.mkdir(parents=True, exist_ok=True)
        with self._source(desired) as source:
            manifest = self._fetch_manifest(source, desired, partial)
            variant = self._choose(manifest)
            hashed = self._download(source, desired, manifest, variant, partial)
        self._report(desired, "verifying", variant=variant)
        slot = self.slots.path(desired.digest)
        shutil.rmtree(slot, ignore_errors=True)
        started = time.perf_counter()
        _sync_to_disk(partial)  # whole before it is named: a power cut after active.json points at it finds it so
        os.replace(partial, slot)
        _sync_to_disk(self.slots.root, recursive=False)
        log.info("slot on disk in %.2f s", time.perf_counter() - started)
        self._report(desired, "activating", variant=variant)
        try:
            self.server.load_bundle(slot, variant, smoke_test=True, hashed=hashed)
        except SlmopsError:
            shutil.rmtree(slot, ignore_errors=True)  # verified but unfit here: keep what is served
            raise
        self.slots.set_active(
            Slot(digest=desired.digest, variant=variant, bundle=desired.bundle, version=desired.version)
        )
        self._report(desired, "healthy", variant=variant)

    def _activate_kept_slot(self, desired: DesiredState) -> bool:
        """A desired state whose slot is still here (the previous one; or the active one when the
        device was made to serve something else): switch back to it, verified whole, without a
        download and, as a rollback, without a smoke test (it served here before). A slot that no
        longer verifies is removed and fetched again; any other failure is the desired state's."""
        kept = [r for r in (self.slots.active(), self.slots.previous()) if r and r.digest == desired.digest]
        if not kept or not self.slots.path(desired.digest).is_dir():
            return False
        record = kept[0]
        self._report(desired, "activating", variant=record.variant)
        try:
            self.server.load_bundle(self.slots.path(desired.digest), record.variant)
        except BundleError as e:
            log.warning(
                "the kept slot of %s %s does not load (%s); fetching it again", desired.bundle, desired.version, e
            )
            shutil.rmtree(self.slots.path(desired.digest), ignore_errors=True)
            return False
        self.slots.set_active(record)
        self._report(desired, "healthy", variant=record.variant)
        return True

    def _sweep_partials(self, keep: str) -> None:
        """Partial slots of other desired states go: only the one being applied may resume."""
        for partial in self.slots.root.glob("*.partial"):
            if partial.name != f"{keep}.partial":
                log.info("removing %s, a partial slot of an earlier desired state", partial.name)
                shutil.rmtree(partial, ignore_errors=True)

    def _source(self, desired: DesiredState) -> "Source":
        if self.config.transfer == "mqtt":
            if self.fetcher is None:
                raise SyncError("transfer = mqtt needs the fleet link (broker_url)")
            return MqttSource(self.fetcher, desired.digest)
        if not self.config.controller_url:
            raise SyncError("transfer = http needs controller_url")
        return HttpSource(self.config.controller_url, self.config.controller_token, desired.digest)

    def _fetch_manifest(self, source: "Source", desired: DesiredState, partial: Path) -> Manifest:
        for name in (MANIFEST_FILE, SIGNATURE_FILE):
            (partial / name).unlink(missing_ok=True)
        source.fetch({name: Wanted(partial / name, None, None) for name in (MANIFEST_FILE, SIGNATURE_FILE)}, None)
        manifest = Manifest.load(partial / MANIFEST_FILE)
        signature = Signature.parse((partial / SIGNATURE_FILE).read_bytes(), origin=f"fetched {SIGNATURE_FILE}")
        check_signature(manifest.canonical_bytes(), signature, trusted_keys(self.config.trusted_keys))
        if manifest.digest != desired.digest:
            raise Unfit(f"the manifest served for {desired.digest[:12]} has another digest")
        return manifest

    def _choose(self, manifest: Manifest) -> str:
        candidates = choice.rank(manifest, hardware.probe(self.config.data_dir), self.config)
        usable = [c for c in candidates if c.usable]
        if not usable:
            reasons = "; ".join(f"{c.variant.id}: {c.reason}" for c in candidates)
            raise Unfit(f"no variant of {manifest.name} can run here ({reasons})")
        return usable[0].variant.id

    def _download(
        self, source: "Source", desired: DesiredState, manifest: Manifest, variant_id: str, partial: Path
    ) -> set[str]:
        """Every file of the variant into `partial`, checked against the manifest; returns their
        bundle-relative paths."""
        files = manifest.variant(variant_id).files
        total = max(1, sum(f.size for f in files))
        targets = {f.path: partial / VARIANTS_DIR / variant_id / f.path for f in files}
        _sweep(partial, {partial / MANIFEST_FILE, partial / SIGNATURE_FILE, *targets.values()})
        complete = {
            f.path for f in files if _size(targets[f.path]) == f.size and sha256_file(targets[f.path]) == f.sha256
        }
        for path in complete:  # a kill may have come between a file's last chunk and its bitmap's removal
            bitmap_path(targets[path]).unlink(missing_ok=True)
        wanted = [f for f in files if f.path not in complete]
        missing = sum(f.size - source.on_disk(targets[f.path], f.size) for f in wanted)
        free = shutil.disk_usage(partial).free
        reserve = self.config.disk_reserve_bytes
        if missing + reserve > free:
            raise SyncError(
                f"not enough disk for {variant_id}: {missing / 2**20:.0f} MiB to download, "
                f"{free / 2**20:.0f} MiB free, {reserve / 2**20:.0f} MiB to keep free"
            )
        progress = {"done": total - missing, "next": 0.0}
        started = time.perf_counter()

        def advance(written: int) -> None:
            progress["done"] += written
            if (percent := 100 * progress["done"] / total) >= progress["next"]:
                self._report(desired, "downloading", variant=variant_id, percent=round(min(percent, 100.0), 1))
                progress["next"] = percent + REPORT_EVERY_PERCENT

        source.fetch(
            {f"{VARIANTS_DIR}/{variant_id}/{f.path}": Wanted(targets[f.path], f.sha256, f.size) for f in wanted},
            advance,
        )
        elapsed = time.perf_counter() - started
        log.info(
            "fetched %.1f MB of %s in %.2f s (%.0f MB/s)", missing / 1e6, variant_id, elapsed, missing / 1e6 / elapsed
        )
        return set(expected_members(manifest, [variant_id]))


class Source(Protocol):
    """Where a slot's files come from: the controller over HTTP, or chunks over MQTT."""

    def fetch(self, files: dict[str, Wanted], progress: Callable[[int], None] | None) -> None:
        """Bundle-relative paths into their target files, each checked against its sha256 where
        one is given (TransferError: the file is gone, the next attempt fetches it again)."""

    def on_disk(self, target: Path, size: int) -> int:
        """Bytes of `target` an interrupted fetch left that this one will keep."""

    def __enter__(self) -> "Source": ...

    def __exit__(self, *_: object) -> None: ...


class MqttSource:
    """Chunks over MQTT; one subscription to the bundle's chunk topic for all its files."""

    def __init__(self, fetcher: MqttFetcher, digest: str) -> None:
        self.fetcher, self.digest = fetcher, digest
        self._watching = fetcher.watching(digest)

    def fetch(self, files: dict[str, Wanted], progress: Callable[[int], None] | None) -> None:
        self.fetcher.fetch(self.digest, files, progress)

    def on_disk(self, target: Path, size: int) -> int:
        return bytes_on_disk(target, self.fetcher.chunk_size, size)

    def __enter__(self) -> "MqttSource":
        self._watching.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._watching.__exit__(None, None, None)


class HttpSource:
    """GET /v1/store/{digest}/{path} with a reader token; a partial file resumes with Range."""

    def __init__(self, controller_url: str, token: str | None, digest: str) -> None:
        import httpx  # here: an agent that never fetches over HTTP stays small

        self.http = httpx.Client(
            base_url=f"{controller_url.rstrip('/')}/v1/store/{digest}",
            headers={"Authorization": f"Bearer {token or ''}"},
            timeout=httpx.Timeout(10, read=60),
        )

    def fetch(self, files: dict[str, Wanted], progress: Callable[[int], None] | None) -> None:
        for path, (target, sha256, size) in files.items():
            self._fetch_one(path, target, MAX_UNLISTED_BYTES if size is None else size, progress)
            if sha256 is not None and sha256_file(target) != sha256:
                target.unlink()
                raise served_wrong(path)

    def on_disk(self, target: Path, size: int) -> int:
        return min(size, _size(target))  # resumed with a Range request

    def _fetch_one(self, path: str, target: Path, size: int, progress: Callable[[int], None] | None) -> None:
        """Download `path` into `target`, at most `size` bytes (more is refused: a wrong file)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        start = _size(target)
        headers = {"Range": f"bytes={start}-"} if start else {}
        with self.http.stream("GET", path, headers=headers) as response:
            if response.status_code == 416 and start:  # what is on disk is longer than the file
                target.unlink()
            elif response.status_code not in (200, 206):
                raise SyncError(f"download of {path} answered {response.status_code}")
            else:
                with target.open("ab" if response.status_code == 206 else "wb") as f:
                    written = f.tell()
                    for chunk in response.iter_bytes(DOWNLOAD_CHUNK_BYTES):
                        if (written := written + len(chunk)) > size:
                            f.close()
                            target.unlink()
                            raise served_wrong(path)
                        f.write(chunk)
                        if progress is not None:
                            progress(len(chunk))
                return
        self._fetch_one(path, target, size, progress)  # start over from byte 0

    def __enter__(self) -> "HttpSource":
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()


def _sync_to_disk(folder: Path, recursive: bool = True) -> None:
    """fsync every file under `folder` and every folder (their entries), `folder` last."""
    for path in [*(sorted(folder.rglob("*"), reverse=True) if recursive else []), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sweep(partial: Path, keep: set[Path]) -> None:
    """Remove what an earlier attempt left in `partial` that is not to be kept: files of a variant
    chosen before, a checkpoint cut short (the bitmaps of files kept stay)."""
    keep |= {bitmap_path(path) for path in keep}
    for path in sorted(partial.rglob("*"), reverse=True):  # a folder's contents before the folder
        if path.is_symlink() or path.is_file():
            if path not in keep:
                log.info("removing %s, left by an earlier attempt", path.relative_to(partial))
                path.unlink()
        elif not any(path.iterdir()):
            path.rmdir()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
