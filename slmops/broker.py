"""The paho client both daemons use to reach the broker, made the same way for each.

    mqtt://[user:password@]host[:1883]   plain TCP
    mqtts://[user:password@]host[:8883]  TLS, the server checked against `ca_file` (or the system's CAs)
    mqtt://node-a:1883,mqtt://node-b:1883  the nodes of a broker cluster: the client connects to the
                                          first and, each time the connection fails or is lost, tries
                                          the next one

Sockets get TCP_NODELAY: a chunk request or a one-chunk file is a small write, and without it
Nagle's algorithm meeting delayed ACKs held each such round trip for 40 to 90 ms.
"""

import logging
import random
import secrets
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

import paho.mqtt.client as mqtt
from paho.mqtt.client import _ConnectionState
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import AfterValidator

log = logging.getLogger(__name__)

RECONNECT_MIN_S, RECONNECT_MAX_S = 1.0, 30.0
REFUSED_FOR_GOOD = frozenset(
    {
        "Bad user name or password",
        "Not authorized",
        "Banned",
        "Bad authentication method",
        "Client identifier not valid",
    }
)
"""CONNACK answers that no retry can change (Home Assistant's rule: do not hammer a broker with
credentials it refused); a daemon stops its link on one and says why."""


def backoff_s(failures: int, rng: random.Random | None = None) -> float:
    """The wait after `failures` failed attempts in a row: drawn from [c/2, c], c = min(1 s · 2^failures,
    30 s), so that clients that lost their broker together do not come back in lock step."""
    ceiling = min(RECONNECT_MIN_S * 2.0**failures, RECONNECT_MAX_S)
    return (rng or random).uniform(ceiling / 2, ceiling)


def refused_for_good(reason: object) -> bool:
    """Whether a CONNACK's reason code (paho's ReasonCode, MQTT 3.1.1 codes mapped onto 5's) is one
    that retrying cannot fix."""
    return bool(getattr(reason, "is_failure", False)) and str(reason) in REFUSED_FOR_GOOD


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker URL {url!r}: expected mqtt://host:port or mqtts://host:port")
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, parts.port or (8883 if tls else 1883), tls, parts.username, parts.password)

    def __str__(self) -> str:
        """host:port: what logs and /health show (never the credentials)."""
        return f"{self.host}:{self.port}"


def broker_urls(urls: str) -> list[str]:
    """The URLs of a comma-separated broker list (one URL is a list of one)."""
    return [url.strip() for url in urls.split(",") if url.strip()]


def parse_brokers(urls: str) -> tuple[BrokerAddress, ...]:
    """The brokers of `urls` (mqtt://a:1883,mqtt://b:1883), in the order a client tries them."""
    addresses = tuple(BrokerAddress.parse(url) for url in broker_urls(urls))
    if not addresses:
        raise ValueError(f"broker URL {urls!r}: expected mqtt://host:port or mqtts://host:port")
    if len({address.tls for address in addresses}) > 1:
        raise ValueError(f"broker URLs {with_credentials(urls, None)!r}: all mqtt:// or all mqtts://, not both")
    return addresses


def fresh_client_id(client: mqtt.Client, prefix: str) -> str:
    """Give `client` a new id, `prefix-<random>`, for its next connection. Every connection is a clean
    session under an id nobody can guess (no client can take another's session over), and a new one each
    time: RabbitMQ names a subscriber's queue after its client id and keeps it on the node it was made on,
    so a client that moves to another node after its node died is refused under its old id."""
    client_id = f"{prefix}-{secrets.token_hex(4)}"
    client._client_id = client_id.encode()  # paho (pinned) has no setter; its connect() sends this
    return client_id


def _brokers_checked(urls: str) -> str:
    parse_brokers(urls)
    return urls


BrokerUrls = Annotated[str, AfterValidator(_brokers_checked)]
"""A setting naming one broker or the comma-separated nodes of a cluster, checked when loaded."""


def with_credentials(urls: str, credentials: str | None) -> str:
    """`urls` with the credentials of each URL replaced by `credentials` ("name:password"), or removed (None)."""

    def one(url: str) -> str:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{credentials}@{host}" if credentials else host))

    return ",".join(one(url) for url in broker_urls(urls))


class LinkClient(mqtt.Client):
    """paho's client for `addresses` (one broker, or the nodes of a cluster), with the one reconnect
    policy of both daemons:

    - each retry goes to the next address of the list (a cluster node that died is left for the next);

    - backoff with jitter: after the n-th failed attempt in a row, a wait drawn from
      [c/2, c] with c = min(1 s · 2^n, 30 s), so a fleet that lost its broker does not come
      back in lock step;
    - refused credentials (a CONNACK no retry can change) and a broker certificate the CA
      does not vouch for stop the link for good: logged once with `fix`, shown in `refused`.

    The backoff replaces paho's `_reconnect_wait` (paho-mqtt is pinned in constraints.txt).
    """

    def __init__(
        self,
        addresses: Sequence[BrokerAddress],
        client_id_prefix: str,
        protocol: Literal["3.1.1", "5"],
        fix: str,
        ca_file: str | None = None,
    ) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)
        self.client_id_prefix = client_id_prefix
        self.client_id = fresh_client_id(self, client_id_prefix)
        """The id of the current (or next) connection: client_id_prefix-<random>, new for each one."""
        self.addresses, self.fix = tuple(addresses), fix
        self._at = 0
        self.refused = ""
        """Why the broker refused the last attempt (credentials, certificate); empty once one is accepted."""
        self._failures = 0
        if self.address.username:
            self.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            self.tls_set(ca_certs=ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.on_socket_open = _no_delay
        # The net under our callbacks, which catch what they expect: an exception that still escapes
        # one is logged by paho (with its traceback) instead of ending its network thread.
        self.suppress_exceptions = True
        self.enable_logger(logging.getLogger("slmops.mqtt"))

    @property
    def address(self) -> BrokerAddress:
        """The broker this client is connected to, or tries next."""
        return self.addresses[self._at]

    def connect_first(self, keepalive: int) -> None:
        """Connect to the first address, in the background of paho's loop (started by the caller)."""
        self._at = 0
        self.connect_async(self.address.host, self.address.port, keepalive=keepalive)

    def accepted(self, reason: object) -> bool:
        """From on_connect: whether the broker took the connection. A refusal retrying cannot change
        stops the link; any other is tried again after the backoff."""
        if not getattr(reason, "is_failure", False):
            self.refused, self._failures = "", 0
            return True
        self.refused = str(reason)
        if refused_for_good(reason):
            log.error("the broker %s refused the connection: %s; the link stops: %s", self.address, reason, self.fix)
            self.disconnect()
        else:
            log.error("the broker %s refused the connection: %s; trying again", self.address, reason)
        return False

    def reconnect(self) -> mqtt.MQTTErrorCode:
        self.client_id = fresh_client_id(self, self.client_id_prefix)
        try:
            return super().reconnect()
        except ssl.SSLCertVerificationError as e:
            self.refused = f"the broker's TLS certificate is not trusted: {e.verify_message}"
            log.error("%s (%s); the link stops: %s", self.refused, self.address, self.fix)
            self.disconnect()  # paho's loop ends instead of trying again
            raise

    def backoff_s(self) -> float:
        """The wait before the next attempt, counting this failure."""
        self._failures += 1
        return backoff_s(self._failures - 1)

    def _reconnect_wait(self) -> None:
        deadline = time.monotonic() + self.backoff_s()
        stopping = (_ConnectionState.MQTT_CS_DISCONNECTING, _ConnectionState.MQTT_CS_DISCONNECTED)
        while self._state not in stopping and not self._thread_terminate and time.monotonic() < deadline:
            time.sleep(min(deadline - time.monotonic(), 0.2))
        if len(self.addresses) > 1:
            self._at = (self._at + 1) % len(self.addresses)
            address = self.address
            self._host, self._port = address.host, address.port  # paho's reconnect() reads these
            if address.username:
                self.username_pw_set(address.username, address.password)
            log.info("trying the broker %s next", address)


def _no_delay(_client: mqtt.Client, _userdata: object, sock: object) -> None:
    if isinstance(sock, socket.socket):  # ssl.SSLSocket is one too
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
