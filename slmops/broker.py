"""The paho client both daemons use to reach the broker, made the same way for each.

    mqtt://[user:password@]host[:1883]   plain TCP
    mqtts://[user:password@]host[:8883]  TLS, the server checked against `ca_file` (or the system's CAs)

Sockets get TCP_NODELAY: a chunk request or a one-chunk file is a small write, and without it
Nagle's algorithm meeting delayed ACKs held each such round trip for 40 to 90 ms.
"""

import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger(__name__)

RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 30
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


def refused_for_good(reason: object) -> bool:
    """Whether a CONNACK's reason code (paho's ReasonCode, MQTT 3.1.1 codes mapped onto 5's) is one
    that retrying cannot fix."""
    return bool(getattr(reason, "is_failure", False)) and str(reason) in REFUSED_FOR_GOOD


def refused(client: mqtt.Client, address: "BrokerAddress", reason: object, fix: str) -> str:
    """A CONNACK that refused the connection (from on_connect): the link stops for good, logged with
    `fix`, when retrying cannot help; otherwise paho tries again. Returns the reason, for /health."""
    if refused_for_good(reason):
        log.error("the broker %s refused the connection: %s; the link stops: %s", address, reason, fix)
        client.disconnect()
    else:
        log.error("the broker %s refused the connection: %s; trying again", address, reason)
    return str(reason)


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


def new_client(
    address: BrokerAddress, client_id: str, protocol: Literal["3.1.1", "5"], ca_file: str | None = None
) -> mqtt.Client:
    """A paho client for `address`, not yet connected, reconnecting with backoff once it is."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
    )
    if address.username:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set(ca_certs=ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)
    client.on_socket_open = _no_delay
    # The net under our callbacks, which catch what they expect: an exception that still escapes
    # one is logged by paho (with its traceback) instead of ending its network thread.
    client.suppress_exceptions = True
    client.enable_logger(logging.getLogger("slmops.mqtt"))
    return client


def _no_delay(_client: mqtt.Client, _userdata: object, sock: object) -> None:
    if isinstance(sock, socket.socket):  # ssl.SSLSocket is one too
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
