"""Build jobs: recipes (build/pipeline.py) the controller runs for operators, one at a time per replica.

    POST /v1/builds (a tar: the recipe at its root and the files it names) ─► Builds.submit: unpacked
        safely, the recipe checked whole (every bad field named) before it is queued; a bundle stage is
        signed with the controller's build_signing_key (a key in the upload is never used)
    the `slmops-builds` thread (BuildRunner): claims a queued job (a conditional UPDATE: one replica wins),
        runs `slmops build run` in a process of its own (its output: the job's log), its stages there or on
        a Ray cluster (build_executor, build/executors.py), follows its stages
        from the pipeline's record, kills it on cancel; on success pushes the bundle it made into the
        registry (verified and signed, as any push) and records which
    a controller restarted: the jobs it was running are queued again and resume from the stages their
        work folder already holds (the pipeline's cache)

Everything of a job lives in data_dir/builds/<id>/: input/ (the upload), work/ (the stages), log.txt.
"""

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from slmops.bundle import Bundle, extract_safely, write_archive
from slmops.errors import ConfigError, NotFound, Rejected, SlmopsError, UnsafeArchive
from slmops.supervision import Supervised

from . import audit
from .audit import Actor
from .db import BuildJobRow
from .protocol import BuildLog
from .registry import Registry

log = logging.getLogger(__name__)

RECIPE = "recipe.yaml"
KEYED = "recipe.controller.yaml"
"""The recipe as the runner runs it: the bundle stage signed with the controller's build_signing_key."""
MAX_UPLOAD_BYTES = 2 * 2**30
POLL_S = 1.0
FINISHED = ("succeeded", "failed", "cancelled")
BUILDER = Actor(name="builder", role="admin")


class Builds:
    def __init__(
        self,
        engine: Engine,
        folder: Path,
        registry: Registry,
        signing_key: Path | None,
        replica: str,
        run_options: list[str] | None = None,
    ) -> None:
        """`run_options`: more for `slmops build run` (where the stages run: ControllerConfig.build_run_options)."""
        self.engine, self.folder, self.registry = engine, folder, registry
        self.signing_key, self.replica = signing_key, replica
        self.run_options = run_options or []

    # --- the API's side ---------------------------------------------------------------------------

    def submit(self, upload: IO[bytes], who: Actor) -> BuildJobRow:
        """Unpack and check the recipe, then queue it; a recipe that cannot run is refused before any work."""
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.folder, prefix="upload-"))
        try:
            try:
                extract_safely(upload, staging / "input", MAX_UPLOAD_BYTES)
            except (UnsafeArchive, tarfile.TarError) as e:
                raise Rejected(f"the upload is not a safe tar of the recipe and its files: {e}") from None
            recipe = staging / "input" / RECIPE
            if not recipe.is_file():
                raise Rejected(f"the upload has no {RECIPE} at its root")
            self._check(recipe)
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                job = BuildJobRow(recipe=RECIPE, created_by=who.name)
                session.add(job)
                session.flush()
                audit.record(session, who, "build.submit", f"build/{job.id}", {})
                staging.rename(self._dir(job.id))
            return job
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _check(self, recipe: Path) -> None:
        """Refuse a recipe that cannot run here; write the one the runner runs (KEYED) beside it."""
        import yaml

        try:
            from slmops.build import pipeline
        except ImportError as e:  # a controller installed without the model pipeline
            raise Rejected(f"this controller cannot run builds ({e}): install slmops[build] beside it") from None
        try:
            raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise Rejected(f"{RECIPE} is not YAML: {e}") from None
        if isinstance(raw, dict) and isinstance(raw.get("bundle"), dict):
            if self.signing_key is None:
                raise Rejected(
                    "the recipe makes a bundle, and this controller has no build_signing_key to sign it with"
                )
            raw["bundle"]["key"] = str(self.signing_key)  # never a key from the upload
        keyed = recipe.with_name(KEYED)
        keyed.write_text(yaml.safe_dump(raw))
        try:
            pipeline.load(keyed)
        except ConfigError as e:
            raise Rejected(str(e).replace(str(recipe.parent) + "/", "")) from None

    def jobs(self, limit: int, offset: int = 0) -> tuple[list[BuildJobRow], int]:
        """One page of the build jobs, newest first, and how many there are."""
        with Session(self.engine) as session:
            total = session.scalar(select(func.count()).select_from(BuildJobRow)) or 0
            page = select(BuildJobRow).order_by(BuildJobRow.id.desc()).limit(limit).offset(offset)
            return list(session.scalars(page)), total

    def job(self, job_id: int) -> BuildJobRow:
        with Session(self.engine) as session:
            job = session.get(BuildJobRow, job_id)
            if job is None:
                raise NotFound(f"no build job {job_id}")
            return job

    def log(self, job_id: int, offset: int, limit: int = 1 << 20) -> BuildLog:
        """The job's log from byte `offset` (at most `limit` bytes), the offset after it, whether it is over."""
        finished = self.job(job_id).status in FINISHED
        path = self._dir(job_id) / "log.txt"
        data = b""
        if path.is_file():
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read(limit)
        return BuildLog(text=data.decode("utf-8", errors="replace"), offset=offset + len(data), finished=finished)

    def tail(self, job_id: int, limit: int) -> BuildLog:
        """The last `limit` bytes of the job's log (what a page shows of it)."""
        path = self._dir(job_id) / "log.txt"
        return self.log(job_id, max(0, path.stat().st_size - limit) if path.is_file() else 0, limit)

    def cancel(self, job_id: int, who: Actor) -> BuildJobRow:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            job = session.get(BuildJobRow, job_id, with_for_update=True)
            if job is None:
                raise NotFound(f"no build job {job_id}")
            if job.status in FINISHED:
                return job
            if job.status == "queued":
                job.status, job.finished_at, job.detail = "cancelled", datetime.now(UTC), f"cancelled by {who.name}"
            else:
                job.cancel_requested = True  # the runner kills its process
            audit.record(session, who, "build.cancel", f"build/{job_id}", {})
            return job

    def work(self, job_id: int) -> Path:
        return self._dir(job_id) / "work"

    def _dir(self, job_id: int) -> Path:
        return self.folder / str(job_id)

    # --- the runner's side ------------------------------------------------------------------------

    def recover(self) -> None:
        """At start: the jobs this replica was running when it stopped are queued again (their stages done
        so far are kept in their work folders), after their processes are gone."""
        with Session(self.engine) as session, session.begin():
            for job in session.scalars(
                select(BuildJobRow).where(BuildJobRow.status == "running", BuildJobRow.runner == self.replica)
            ):
                if job.pid:
                    _kill(job.pid)
                job.status, job.pid, job.runner = "queued", None, None
                job.detail = "queued again: the controller restarted during the build"

    def claim(self) -> int | None:
        """The oldest queued job, now this replica's to run; None when none is queued."""
        with Session(self.engine) as session:
            ids = session.scalars(
                select(BuildJobRow.id).where(BuildJobRow.status == "queued").order_by(BuildJobRow.id).limit(5)
            ).all()
            for job_id in ids:
                taken = session.execute(
                    update(BuildJobRow)
                    .where(BuildJobRow.id == job_id, BuildJobRow.status == "queued")
                    .values(status="running", runner=self.replica, started_at=datetime.now(UTC))
                )
                session.commit()
                if taken.rowcount == 1:  # type: ignore[attr-defined]
                    return job_id
        return None

    def run(self, job_id: int, stopping: threading.Event) -> None:
        """Run a claimed job to its end (or until this replica stops: then it stays running, for recover)."""
        folder = self._dir(job_id)
        recipe = folder / "input" / KEYED
        command = [sys.executable, "-P", "-m", "slmops", "build", "run", str(recipe), "--work", str(self.work(job_id)),
                   *self.run_options]  # fmt: skip
        with (folder / "log.txt").open("ab") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        self._set(job_id, pid=process.pid)
        cancelled = False
        while process.poll() is None:
            if stopping.wait(POLL_S):
                _kill(process.pid)
                process.wait()
                return
            job = self._follow(job_id)
            if job.cancel_requested and not cancelled:
                cancelled = True
                _kill(process.pid)
        self._follow(job_id)
        if cancelled:
            self._finish(job_id, "cancelled", "cancelled while running")
        elif process.returncode != 0:
            self._finish(job_id, "failed", _last_error(folder / "log.txt") or f"exit code {process.returncode}")
        else:
            self._register(job_id)

    def _follow(self, job_id: int) -> BuildJobRow:
        record = self.work(job_id) / "pipeline.json"
        stages = json.loads(record.read_text()).get("stages", {}) if record.is_file() else {}
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            job = session.get(BuildJobRow, job_id)
            assert job is not None
            if stages != job.stages:
                job.stages, job.stage = stages, next(reversed(stages), "")
            return job

    def _register(self, job_id: int) -> None:
        record = json.loads((self.work(job_id) / "pipeline.json").read_text())
        made = record["stages"].get("bundle")
        if made is None:
            self._finish(job_id, "succeeded", f"no bundle stage; the stages are in {self.work(job_id)}")
            return
        try:
            bundle = Bundle.open(Path(made["folder"]))
            with tempfile.TemporaryDirectory(dir=self.folder) as scratch:
                archive = write_archive(bundle, Path(scratch) / "bundle.tar")
                with archive.open("rb") as f:
                    row, _created = self.registry.push(f, BUILDER)
        except SlmopsError as e:
            self._finish(job_id, "failed", f"the bundle it made was not registered: {e}")
            return
        self._finish(job_id, "succeeded", f"registered {row.name} {row.version}", row.name, row.version)

    def _finish(
        self, job_id: int, status: str, detail: str, bundle_name: str | None = None, bundle_version: str | None = None
    ) -> None:
        with Session(self.engine) as session, session.begin():
            job = session.get(BuildJobRow, job_id)
            assert job is not None
            job.status, job.detail, job.pid, job.finished_at = status, detail[-4000:], None, datetime.now(UTC)
            job.bundle_name, job.bundle_version = bundle_name, bundle_version
            audit.record(session, BUILDER, f"build.{status}", f"build/{job_id}", {"detail": detail[-500:]})
        log.info("build %s %s: %s", job_id, status, detail)

    def _set(self, job_id: int, **values: object) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(update(BuildJobRow).where(BuildJobRow.id == job_id).values(**values))


class BuildRunner:
    """The `slmops-builds` thread: one job at a time, the oldest queued first."""

    def __init__(self, builds: Builds) -> None:
        self.builds = builds
        self._stop = threading.Event()
        self.thread = Supervised("slmops-builds", self._loop)

    def start(self) -> None:
        self.builds.recover()
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            job_id = self.builds.claim()
            if job_id is None:
                self._stop.wait(POLL_S)
                continue
            try:
                self.builds.run(job_id, self._stop)
            except Exception as e:  # a job the runner could not follow fails; the runner goes on
                log.exception("build %s could not be run", job_id)
                self.builds._finish(job_id, "failed", f"the controller could not run it: {e}")


def _kill(pid: int) -> None:
    """SIGKILL the process group a build runs in (the pipeline and what it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # gone already
        os.killpg(pid, signal.SIGKILL)


def _last_error(path: Path) -> str:
    """The last `error:` line of a build's log (what `slmops build run` says when it fails)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    errors = [line for line in lines if "error:" in line]
    return (errors[-1] if errors else "\n".join(lines[-5:])).strip()
