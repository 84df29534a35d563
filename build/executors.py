"""Where a recipe's stages run: in this process (`local`), or on a Ray cluster (`ray`).

    pipeline.run ─► executor.run(stage, make, out)
      local   make(out) here
      ray     the training stages (finetune, distill) ─► Ray Train's TorchTrainer: `train_workers`
              processes, one CPU (or one GPU, where the cluster has enough) each, a torch.distributed
              group (gloo on CPUs) that transformers' Trainer trains over (DDP: each process takes its
              share of the batches, rank 0 writes)
              every other stage ─► one Ray task that takes a whole node's CPUs (its torch threads)
      a stage's exception comes back as itself (a GateFailed stays a GateFailed)

The stages read and write WORK by path: on a cluster of several machines WORK must be a folder every node
sees at the same path (NFS or the like), and slmops[build] installed on every node. A head on this
machine's loopback (a test's, a laptop's) is joined as one: Ray would otherwise advertise the routable
address and wait for a node there (`LOOPBACK_ONLY`).
"""

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from slmops.errors import BuildError

ExecutorName = Literal["local", "ray"]
TRAINING_STAGES = ("finetune", "distill")
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Ray's switch for a one-machine cluster: its node address is 127.0.0.1 and it listens there only
(checked with Ray 2.60: `--node-ip-address 127.0.0.1` alone is replaced by the routable address)."""


class Executor(Protocol):
    name: str

    def processes(self, stage: str) -> int:
        """How many processes train `stage` (1 for a stage that does not train). It goes into the
        stage's key: a batch size is per process, so another count is another training."""
        ...

    def run(self, stage: str, make: Callable[[Path], None], out: Path) -> None:
        """Make `stage`'s output in `out`."""
        ...


class LocalExecutor:
    name = "local"

    def processes(self, stage: str) -> int:
        return 1

    def run(self, stage: str, make: Callable[[Path], None], out: Path) -> None:
        make(out)


class RayExecutor:
    name = "ray"

    def __init__(self, address: str, train_workers: int = 2) -> None:
        if train_workers < 1:
            raise BuildError("--train-workers must be 1 or more")
        host = address.removeprefix("ray://").rsplit(":", 1)[0]
        if host in ("127.0.0.1", "localhost"):
            os.environ.update(LOOPBACK_ONLY)  # read when ray is imported
        try:
            import ray
        except ImportError:
            raise BuildError("the ray executor needs Ray: pip install 'slmops[build,ray]'") from None
        try:
            ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise BuildError(f"no Ray cluster at {address}: {e}") from None
        self.train_workers = train_workers
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        self.node_cpus = max(int(resources.get("CPU", 1)) for resources in nodes)
        self.use_gpu = sum(int(resources.get("GPU", 0)) for resources in nodes) >= train_workers

    def processes(self, stage: str) -> int:
        return self.train_workers if stage in TRAINING_STAGES else 1

    def run(self, stage: str, make: Callable[[Path], None], out: Path) -> None:
        if stage in TRAINING_STAGES:
            self._train(stage, make, out)
        else:
            self._task(make, out)

    def _task(self, make: Callable[[Path], None], out: Path) -> None:
        import ray

        remote = ray.remote(num_cpus=self.node_cpus, max_retries=0)(_call)
        try:
            ray.get(remote.remote(make, out))
        except ray.exceptions.RayTaskError as e:
            raise _cause(e) from None

    def _train(self, stage: str, make: Callable[[Path], None], out: Path) -> None:
        import ray.train
        from ray.train.torch import TorchTrainer

        scaling = ray.train.ScalingConfig(num_workers=self.train_workers, use_gpu=self.use_gpu)
        storage = out.parent / ".ray-train"
        run = ray.train.RunConfig(storage_path=str(storage), name=out.name)
        try:
            TorchTrainer(lambda: make(out), scaling_config=scaling, run_config=run).fit()
        except ray.train.TrainingFailedError as e:
            raise _cause(e) from None
        finally:
            import shutil

            shutil.rmtree(storage, ignore_errors=True)


def _call(make: Callable[[Path], None], out: Path) -> None:
    make(out)


WRAPPED = ("cause", "worker_failures", "controller_failure")


def _cause(error: BaseException) -> BaseException:
    """The exception a stage raised on the cluster, out of Ray's wrappers."""
    seen: Any = error
    for _ in range(8):  # RayTaskError.cause, WorkerGroupError.worker_failures {rank: ...}, ControllerError
        inner = next((getattr(seen, a) for a in WRAPPED if getattr(seen, a, None) is not None), None)
        if isinstance(inner, dict):
            inner = next(iter(inner.values()), None)
        if inner is None or inner is seen:
            break
        seen = inner
    if seen is error:
        return BuildError(f"the stage failed on the Ray cluster: {error}")
    return seen


def executor(name: ExecutorName, ray_address: str | None, train_workers: int) -> Executor:
    if name == "local":
        return LocalExecutor()
    if not ray_address:
        raise BuildError("the ray executor needs the cluster's address (--ray-address HOST:PORT)")
    return RayExecutor(ray_address, train_workers)
