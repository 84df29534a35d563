"""Helpers every test folder uses: a free loopback port, polling with a deadline, a synthetic
signed bundle, a Mosquitto of the test's own, and schemathesis against a live service.

Importable as `support` from any test (tests/conftest.py puts this folder on sys.path).
"""

import contextlib
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slmops.bundle import Bundle


SLMOPS = [sys.executable, "-P", "-m", "slmops"]
"""The CLI, as a test runs it in a process of its own."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 10, poll_s: float = 0.05) -> Any:
    """Poll `condition` until it is truthy and return that; past `timeout_s`, fail saying `what`."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(poll_s)
    return result


def synthetic_bundle(
    out: Path,
    key: Path,
    name: str = "tiny",
    version: str = "1.0.0",
    description: str = "",
    variants: tuple[str, ...] = ("cpu-int4", "cpu-fp32"),
) -> "Bundle":
    """A signed bundle of small random files with a real manifest and signature: for the tests of
    the bundle format, the registry, the store and the transfer, which need no model that loads
    (and so no torch to export one)."""
    import json
    import os
    from datetime import UTC, datetime

    from slmops.bundle import VARIANTS_DIR, Bundle
    from slmops.manifest import FileEntry, Manifest, Source, Variant, sha256_file
    from slmops.signing import load_private_key
    from slmops.targets import target

    entries = []
    for index, variant_id in enumerate(variants):
        folder = out / VARIANTS_DIR / variant_id
        folder.mkdir(parents=True)
        (folder / "genai_config.json").write_text(json.dumps({"model": {"context_length": 2048, "type": "llama"}}))
        (folder / "model.onnx").write_bytes(os.urandom(5_000))
        (folder / "model.onnx.data").write_bytes(os.urandom(300_000 + 1000 * index))  # two 256 KiB chunks
        (folder / "chat_template.jinja").write_text("{{ messages }}")
        files = [FileEntry(path=p.name, size=p.stat().st_size, sha256=sha256_file(p)) for p in sorted(folder.iterdir())]
        t = target(variant_id)
        entries.append(
            Variant(
                id=variant_id,
                execution_provider=t.execution_provider,
                device_class=t.device_class,
                precision=t.precision,
                files=files,
                min_memory_bytes=64 << 20,
                context_length=2048,
            )
        )
    manifest = Manifest(
        name=name,
        version=version,
        created=datetime.now(UTC).replace(microsecond=0),
        description=description,
        source=Source(model="synthetic", digest="0" * 64),
        recipe_digest="0" * 64,
        variants=entries,
    )
    manifest.write(out / "manifest.json")
    return Bundle.open(out).sign(load_private_key(key))


def lora_adapter(model: Path, out: Path, seed: int, rank: int, targets: "str | list[str]") -> Path:
    """A peft LoRA adapter of `model` with random A and B (peft's init_lora_weights=False), as
    `slmops build finetune` writes one without --merge (the files peft saves; no finetune.json)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    network = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    get_peft_model(network, config).save_pretrained(out)
    return out


def conformance_run(openapi_url: str, token: str, out: Path, seconds: int = 30) -> tuple[int, str]:
    """Schemathesis against a live service's OpenAPI document for `seconds`, as the token's holder:
    every check but positive_data_acceptance (a schema cannot say "devices or group, not both",
    so it generates bodies the service rightly refuses). Returns the exit code and the report."""
    import subprocess

    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        openapi_url,
        "--header",
        f"Authorization: Bearer {token}",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        "25",
        "--max-time",
        str(seconds),
        "--request-timeout",
        "30",
        "--seed",
        "12",
        "--no-shrink",
    ]
    done = subprocess.run(command, cwd=out, capture_output=True, text=True, timeout=seconds + 120)
    return done.returncode, done.stdout[-12000:] + done.stderr[-4000:]


class RayHead:
    """A Ray head of our own on loopback (`ray start --head --block` in its own process group, which
    `with` kills on the way out); its session files in a short /tmp folder (Ray's unix sockets must fit
    in 107 characters)."""

    def __init__(self, folder: Path, cpus: int = 2) -> None:
        import tempfile

        self.port, self.cpus = free_port(), cpus
        self.temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.log = folder / "ray-head.log"
        self.address = f"127.0.0.1:{self.port}"
        self.process: Any = None

    def __enter__(self) -> "RayHead":
        import subprocess
        import sys

        from slmops.build.executors import LOOPBACK_ONLY

        ray = Path(sys.executable).with_name("ray")
        command = [str(ray), "start", "--head", "--block", "--port", str(self.port), "--num-cpus", str(self.cpus),
                   "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(self.temp)]  # fmt: skip
        env = dict(os.environ, **LOOPBACK_ONLY, PATH=f"{ray.parent}:{os.environ['PATH']}")
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # fmt: skip
        wait_for(lambda: (self.temp / "ray_current_cluster").is_file() or self.process.poll() is not None,
                 "the Ray head to start", timeout_s=60)  # fmt: skip
        if self.process.poll() is not None:
            raise AssertionError(f"ray start failed: {self.log.read_text()[-2000:]}")
        return self

    def __exit__(self, *_: object) -> None:
        """SIGKILL to the whole group: `ray start --block` took over 20 s to end on SIGTERM, and the
        cluster holds nothing to keep."""
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        shutil.rmtree(self.temp, ignore_errors=True)


class Mosquitto:
    """A Mosquitto broker of our own on a free loopback port; it can be stopped and started again."""

    def __init__(self, folder: Path, settings: str = "") -> None:
        """`settings`: more lines for the listener (certfile, keyfile, ...)."""
        import getpass

        self.port = free_port()
        self.conf, self.log = folder / "mosquitto.conf", folder / "mosquitto.log"
        self.conf.write_text(
            # as root, mosquitto would switch to its own user, which cannot read pytest's 0700 folders
            f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"set_tcp_nodelay true\n{settings}"
        )
        self.process = None
        self.start()

    def start(self) -> None:
        import socket
        import subprocess
        import time

        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        # Its log to a file: a pipe nobody reads fills after a few hundred connections, and Mosquitto
        # then blocks on its next log line, serving nobody.
        with self.log.open("a") as log:
            self.process = subprocess.Popen([binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"mosquitto did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def postgres_bin() -> Path:
    import glob

    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[::-1]), None)
    if found is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are missing: `make test` installs postgresql")
    return Path(found).parent


@contextmanager
def postgres_server() -> "Iterator[str]":
    """This machine's PostgreSQL binaries on a free port with a data folder of our own (initdb), never the
    system's instance; yields its base URL (no database name)."""
    import os
    import subprocess
    import tempfile

    # Not under pytest's tmp folder: as root, the server runs as `postgres` (initdb refuses
    # root), which cannot enter root's 0700 pytest folders.
    bin_dir, root = postgres_bin(), Path(tempfile.mkdtemp(prefix="slmops-postgres-"))
    data, port = root / "data", free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(root, "postgres")
    subprocess.run(
        [*as_postgres, bin_dir / "initdb", "-D", data, "-U", "slmops", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run(
        [*as_postgres, bin_dir / "pg_ctl", "-D", data, "-o", options, "-l", root / "log", "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://slmops@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_postgres, bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str) -> str:
    """A fresh, empty database on a PostgreSQL server of `postgres_server`; its SQLAlchemy URL."""
    import uuid

    import psycopg

    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return f"{server_url}/{name}"


class RabbitMqCluster:
    """`nodes` RabbitMQ nodes of our own (Debian's rabbitmq-server, the MQTT plugin on, each on free
    loopback ports, named slmops<random>n<i>@localhost so they never meet the system's node), joined into
    one cluster; `kill(i)` kills a node's VM as a crash would. `mqtt_urls[i]` is node i's MQTT listener."""

    SBIN = Path("/usr/lib/rabbitmq/bin")

    def __init__(self, folder: Path, nodes: int = 2) -> None:
        import secrets
        import subprocess

        if not (self.SBIN / "rabbitmq-server").exists():
            raise RuntimeError("rabbitmq-server is missing: `make test` installs it")
        run = secrets.token_hex(3)
        self.nodes = [_RabbitNode(folder / f"rabbit{i}", f"slmops{run}n{i}") for i in range(nodes)]
        self.processes: list[subprocess.Popen | None] = []
        try:
            for node in self.nodes:
                self.processes.append(node.start())
            for node in self.nodes:
                node.ctl("wait", str(node.pid_file), "--timeout", "90")
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", self.nodes[0].node)
                node.ctl("start_app")
        except BaseException:
            self.stop()
            raise
        self.mqtt_urls = [f"mqtt://127.0.0.1:{node.mqtt_port}" for node in self.nodes]

    def kill(self, index: int) -> None:
        """SIGKILL the node's Erlang VM: its clients' sockets close without a DISCONNECT."""
        import os
        import signal

        node = self.nodes[index]
        os.kill(int(node.pid_file.read_text()), signal.SIGKILL)
        process = self.processes[index]
        if process is not None:
            process.wait(timeout=30)  # the start script, whose VM it was
            self.processes[index] = None

    def stop(self) -> None:
        for index, process in enumerate(self.processes):
            if process is not None and self.nodes[index].pid_file.exists():
                self.kill(index)
            elif process is not None:
                process.kill()
                process.wait(timeout=30)
        self.processes = []


class _RabbitNode:
    def __init__(self, folder: Path, name: str) -> None:
        import os

        self.folder, self.node = folder, f"{name}@localhost"
        self.amqp_port, self.mqtt_port, self.dist_port = free_port(), free_port(), free_port()
        folder.mkdir(parents=True)
        cookie = folder / ".erlang.cookie"  # its own: the CLI finds it in HOME, as the node does
        cookie.write_text("SLMOPSTESTCLUSTER")
        os.chmod(cookie, 0o400)
        (folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}\n"
            "loopback_users = none\n"
        )
        (folder / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        self.pid_file = folder / "pid"
        self.env = dict(
            os.environ,
            HOME=str(folder),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(folder / "mnesia"),
            RABBITMQ_LOG_BASE=str(folder / "log"),
            RABBITMQ_CONFIG_FILE=str(folder / "rabbitmq"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(folder / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.pid_file),
            RABBITMQ_CONF_ENV_FILE="/dev/null",  # not the system node's rabbitmq-env.conf
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_CRASH_DUMP=str(folder / "erl_crash.dump"),  # not into the working directory
        )

    def start(self) -> "Any":
        import subprocess

        with (self.folder / "console.log").open("w") as log:
            return subprocess.Popen(
                [RabbitMqCluster.SBIN / "rabbitmq-server"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def ctl(self, *args: str) -> None:
        import subprocess

        done = subprocess.run(
            [RabbitMqCluster.SBIN / "rabbitmqctl", "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} on {self.node}: {done.stdout}{done.stderr}")
