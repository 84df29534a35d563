"""The one reconnect policy of both daemons (slmops/broker.py: LinkClient): backoff with jitter,
a link that stops for good, saying why, on a broker certificate its CA does not vouch for, and
the nodes of a broker cluster tried in turn."""

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support import Mosquitto, wait_for

from slmops.broker import (
    RECONNECT_MAX_S,
    RECONNECT_MIN_S,
    BrokerAddress,
    LinkClient,
    parse_brokers,
    with_credentials,
)


def test_backoff_doubles_to_its_ceiling_with_jitter_and_starts_over_once_accepted():
    clients = [LinkClient([BrokerAddress("127.0.0.1", 1883, False)], f"c{i}", "5", "fix it") for i in range(20)]
    waits = [[client.backoff_s() for _ in range(8)] for client in clients]
    for series in waits:
        for attempt, wait in enumerate(series):
            ceiling = min(RECONNECT_MIN_S * 2**attempt, RECONNECT_MAX_S)
            assert ceiling / 2 <= wait <= ceiling
    assert len({round(series[4], 3) for series in waits}) > 10  # not in lock step
    accepted = type("Reason", (), {"is_failure": False})()
    assert clients[0].accepted(accepted) and clients[0].refused == ""
    assert clients[0].backoff_s() <= RECONNECT_MIN_S


def _certificate(subject: str, key, issuer_key, issuer: x509.Name | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:  # a CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(path: Path, certificate: x509.Certificate) -> str:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return str(path)


# paho leaves the SSL socket of a failed handshake to the garbage collector (client.py: _ssl_wrap_socket)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_certificate_the_ca_does_not_vouch_for_stops_the_link(tmp_path: Path):
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("slmops test CA", ca_key, ca_key)
    server = _certificate("127.0.0.1", server_key, ca_key, ca.subject)
    (tmp_path / "server.key").write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    certfile = _pem(tmp_path / "server.pem", server)
    broker = Mosquitto(tmp_path, f"certfile {certfile}\nkeyfile {tmp_path / 'server.key'}\n")
    try:
        address = BrokerAddress("127.0.0.1", broker.port, tls=True)
        trusting = LinkClient([address], "trusting", "5", "fix it", _pem(tmp_path / "ca.pem", ca))
        trusting.connect_first(60)
        trusting.loop_start()
        wait_for(trusting.is_connected, "a client trusting the broker's CA did not connect")
        trusting.disconnect()
        trusting.loop_stop()

        other_ca = _certificate("someone else's CA", other_key, other_key)
        wary = LinkClient([address], "wary", "5", "fix it", _pem(tmp_path / "other.pem", other_ca))
        wary.connect_first(60)
        wary.loop_start()
        wait_for(lambda: wary._thread is None, "the link went on trying a certificate it cannot trust")
        assert "TLS certificate is not trusted" in wary.refused and not wary.is_connected()
    finally:
        broker.stop()


def test_a_client_of_a_cluster_moves_to_the_next_node_when_its_node_dies(tmp_path: Path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    node_a, node_b = Mosquitto(tmp_path / "a"), Mosquitto(tmp_path / "b")
    client = LinkClient(
        parse_brokers(f"mqtt://127.0.0.1:{node_a.port},mqtt://127.0.0.1:{node_b.port}"), "c", "5", "fix"
    )
    try:
        client.connect_first(60)
        client.loop_start()
        wait_for(client.is_connected, "the client did not reach the first node")
        assert client.address.port == node_a.port
        node_a.stop()
        wait_for(lambda: client.is_connected() and client.address.port == node_b.port, "it did not move to node b")
        node_b.stop()
        node_a.start()
        wait_for(lambda: client.is_connected() and client.address.port == node_a.port, "it did not come back to a")
    finally:
        client.disconnect()
        client.loop_stop()
        node_a.stop()
        node_b.stop()


@pytest.mark.parametrize(
    "urls, why",
    [
        ("http://a:1883", "expected mqtt://host:port"),
        ("mqtt://a:1883,mqtts://b:8883", "all mqtt:// or all mqtts://"),
        (" , ", "expected mqtt://host:port"),
    ],
)
def test_a_broker_list_that_cannot_work_is_refused_saying_why(urls: str, why: str):
    with pytest.raises(ValueError, match=why):
        parse_brokers(urls)


def test_credentials_are_set_or_removed_on_every_node_of_a_list():
    urls = "mqtt://old:pw@a:1883, mqtt://b"
    assert with_credentials(urls, None) == "mqtt://a:1883,mqtt://b"
    assert with_credentials(urls, "dev-1:s3cret") == "mqtt://dev-1:s3cret@a:1883,mqtt://dev-1:s3cret@b"
    assert [str(a) for a in parse_brokers(urls)] == ["a:1883", "b:1883"]
