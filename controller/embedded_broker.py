"""The broker of a fleet on one host: a Mosquitto the controller runs as a child process.

    data_dir/broker/mosquitto.conf   one listener on `embedded_broker_bind` (loopback by default),
                                     no anonymous clients, packets bounded, TCP_NODELAY
                    passwd           the controller's credentials (new on every start) and each
                                     enrolled device's (controller/enrolment.py), PBKDF2-SHA512
                    acl              mosquitto.acl beside this module: the one deploy/ ships, each
                                     device on its own topics, only the controller writing desired
                                     states, commands, acks and chunks; stricter than a static file
                                     can be on bundles: a device reads the chunks of, and asks for
                                     chunks of, only the bundle it is told to run
                    mosquitto.db     retained messages (desired states, presence) across restarts
    enrolment or desired states changed ─► passwd and acl written again ─► SIGHUP: Mosquitto
                         reads them again (within a millisecond here) and disconnects clients
                         they no longer allow
    the child exits ─► the supervisor thread starts it again (1 s, doubling up to 30 s), logged

Why Mosquitto and not amqtt, the embedded broker before: amqtt 0.12.1 sends a client that
connects the retained messages matching *every* client's subscriptions (broker.py, after the
CONNACK), deletes the session of a client id before the CONNECT naming it is authenticated
(so an unauthenticated client deafens any client whose id it knows), and runs inside the
controller's event loop, sharing one interpreter with the chunk sender and the recorder.
Mosquitto authenticates first, keeps retained messages to the subscriptions of the client that
made them, enforces the same ACL file a production Mosquitto uses, and is what the tests and
deploy/ already run. It is a system package (`apt-get install mosquitto`); where it is missing
the controller says so and how to go on, rather than run a broker anyone can command.
"""

import base64
import getpass
import hashlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path

import psutil

from slmops.errors import BrokerStartError
from slmops.messages import MAX_TELEMETRY_BYTES, chunk_topic, request_topic

log = logging.getLogger(__name__)

CONTROLLER_USER = "controller"
"""The controller's MQTT user name; no device may have it (the ACL gives it every topic)."""
START_TIMEOUT_S = 10
RESTART_MIN_S, RESTART_MAX_S = 1, 30
MAX_PACKET_BYTES = MAX_TELEMETRY_BYTES + (64 << 10)
"""The largest message the protocol has, a telemetry batch, and room for its MQTT framing."""
PBKDF2_ITERATIONS = 101
"""Mosquitto's own default: passwords here are 32 random bytes, so iterations add nothing."""


def password_hash(password: str) -> str:
    """A password file entry's hash, as `mosquitto_passwd` writes it ($7$: PBKDF2-SHA512)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text() -> str:
    return resources.files("slmops.controller").joinpath("mosquitto.acl").read_text()


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise BrokerStartError(
            "the embedded broker needs Mosquitto, which is not installed (apt-get install mosquitto, "
            "brew install mosquitto); or set broker_url to a broker of your own, or embedded_broker = false "
            "to run the registry and REST API without a fleet link"
        )
    return found


class EmbeddedBroker:
    """A Mosquitto child process: `start`, `reload` (new credentials), `stop`; restarted when it dies."""

    def __init__(
        self,
        folder: Path,
        bind: str,
        device_passwords: Callable[[], Iterable[tuple[str, str]]],
        device_bundles: Callable[[], Iterable[tuple[str, str]]] = list,
    ) -> None:
        """`device_passwords`: (device id, password hash) of every enrolled device;
        `device_bundles`: (device id, digest) of every desired state."""
        self.folder, self.device_passwords, self.device_bundles = folder, device_passwords, device_bundles
        host, _, port = bind.rpartition(":")
        self.host, self.port = host, int(port)
        self.controller_password = secrets.token_urlsafe(32)
        self.restarts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # the process, against the supervisor restarting it meanwhile
        self._stopping = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="slmops-broker", daemon=True)

    @property
    def url(self) -> str:
        """What the controller connects with."""
        return f"mqtt://{CONTROLLER_USER}:{self.controller_password}@{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        process = self._process
        return process is not None and process.poll() is None

    def start(self) -> None:
        binary = find_mosquitto()
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._write_config()
        self._write_passwords()
        self._write_acl()
        self._stop_orphan()
        with self._lock:
            self._process = self._launch(binary)
        self._supervisor.start()
        log.info("embedded MQTT broker (Mosquitto, pid %d) listening on %s:%d", self.pid, self.host, self.port)

    def reload(self) -> None:
        """Enrolments or desired states changed: write the password file and the ACL again and
        have Mosquitto read them (before a desired state is published, so its chunks may flow)."""
        self._write_passwords()
        self._write_acl()
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                self._process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            process.terminate()  # Mosquitto saves its retained messages as it exits
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._supervisor.is_alive():
            self._supervisor.join(timeout=5)

    def _launch(self, binary: str) -> "subprocess.Popen[bytes]":
        log_file = (self.folder / "mosquitto.log").open("ab")
        try:
            process = subprocess.Popen(
                [binary, "-c", str(self.folder / "mosquitto.conf")],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the controller's terminal is the controller's to handle
            )
        finally:
            log_file.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._listening(process.pid):  # that process itself: another may hold the port
                (self.folder / "mosquitto.pid").write_text(str(process.pid))
                return process
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait(timeout=10)
                tail = (self.folder / "mosquitto.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise BrokerStartError(
                    f"the embedded MQTT broker did not start on {self.host}:{self.port} ({' / '.join(tail)}); "
                    "set embedded_broker_bind to a free address, or broker_url to an existing broker"
                )
            time.sleep(0.05)

    def _stop_orphan(self) -> None:
        """A controller killed with SIGKILL leaves its Mosquitto running (its own session, holding the
        port): the one our pid file names, with our configuration, is stopped before a new one starts."""
        try:
            process = psutil.Process(int((self.folder / "mosquitto.pid").read_text()))
            orphan = str(self.folder / "mosquitto.conf") in process.cmdline()
        except (OSError, ValueError, psutil.Error):
            return
        if orphan:
            log.warning("stopping the embedded broker a controller that died left running (pid %d)", process.pid)
            process.terminate()
            try:
                process.wait(timeout=10)
            except psutil.TimeoutExpired:
                process.kill()

    def _listening(self, pid: int) -> bool:
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in connections)

    def _supervise(self) -> None:
        delay = RESTART_MIN_S
        while not self._stopping.wait(1):
            with self._lock:
                process = self._process
            if process is None or process.poll() is None:
                delay = RESTART_MIN_S
                continue
            log.error("the embedded MQTT broker exited (code %s); starting it again", process.returncode)
            if self._stopping.wait(delay):
                return
            try:
                started = self._launch(find_mosquitto())
            except BrokerStartError as e:
                log.error("%s; trying again in %d s", e, delay)
                delay = min(RESTART_MAX_S, delay * 2)
                continue
            with self._lock:
                if self._stopping.is_set():
                    started.terminate()
                    return
                self._process = started
            self.restarts += 1

    def _write_config(self) -> None:
        folder = self.folder
        (folder / "mosquitto.conf").write_text(
            "# Written by the slmops controller at every start; edits are lost.\n"
            "per_listener_settings false\n"
            "allow_anonymous false\n"
            f"password_file {folder / 'passwd'}\n"
            f"acl_file {folder / 'acl'}\n"
            f"listener {self.port} {self.host}\n"
            # Run as the controller's own user: as root Mosquitto would switch to `mosquitto`, which
            # cannot read the controller's data folder.
            f"user {getpass.getuser()}\n"
            "persistence true\n"
            f"persistence_location {folder}/\n"
            "autosave_interval 30\n"
            f"max_packet_size {MAX_PACKET_BYTES}\n"
            "set_tcp_nodelay true\n"
            "max_inflight_messages 100\n"
            "max_queued_messages 10000\n"
            "log_type error\nlog_type warning\nlog_type notice\nconnection_messages true\nlog_timestamp true\n"
        )

    def _write_passwords(self) -> None:
        entries = [(CONTROLLER_USER, password_hash(self.controller_password)), *self.device_passwords()]
        self._replace("passwd", "".join(f"{user}:{hashed}\n" for user, hashed in entries))

    def _write_acl(self) -> None:
        self._replace("acl", device_bundle_acl(self.device_bundles()))

    def _replace(self, name: str, text: str) -> None:
        """Write a file Mosquitto reads whole or not at all (a reload never sees half of it)."""
        tmp = self.folder / f".{name}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, self.folder / name)


def device_bundle_acl(device_bundles: Iterable[tuple[str, str]]) -> str:
    """The shipped ACL with its bundle patterns (any device, any bundle) narrowed to one section
    per device: the chunks of the bundle it is told to run, and requests for them."""
    lines = [line for line in acl_text().splitlines() if not (line.startswith("pattern") and "/bundles/" in line)]
    lines.append("\n# Bundle transfer, per device: only the bundle it is told to run.")
    for device_id, digest in sorted(device_bundles):
        lines += [
            f"user {device_id}",
            f"topic read {chunk_topic(digest)}",
            f"topic write {request_topic(digest, device_id)}",
        ]
    return "\n".join(lines) + "\n"
