"""TLS and mutual TLS for format B over TCP, with real certificates made here.

The PKI (:func:`make_pki`, also used by test_dtls.py): a CA; a server certificate for
``collector.test`` and 127.0.0.1; clients ``amf-1`` and ``amf-2`` from that CA; ``rogue``
(also named amf-1) from another CA; ``expired`` from the right CA but out of date; and the
server key once more, encrypted with a password. Listeners are driven inline by the bounded
``Collector.pump`` of test_tcp_transport; senders run their own threads.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_tcp_transport import FAST, HOST, Collector, message, peer_closed, raw_client, wait_for

from stm.errors import UsageError
from stm.report.ownership import StreamOwners
from stm.tlv import STM_VENDOR, StmChunk, TlvFramer
from stm.transport.tcp import TcpSender
from stm.transport.tls import (
    TlsConfig,
    client_context,
    format_subject,
    hostname_matches,
    read_secret,
    server_context,
)

pytestmark = pytest.mark.timeout(60)

SERVER_NAME = "collector.test"
KEY_PASSWORD = "pa55-w0rd-not-for-logs"
AMF1 = "CN=amf-1,O=stm test,C=FR"
AMF2 = "CN=amf-2,O=stm test,C=FR"


# -- the PKI --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name

    def client(self, name: str | None, **kw) -> TlsConfig:
        """A sender's config: its certificate (none if name is None), trusting our CA."""
        if name is None:
            return TlsConfig(ca=self.path("ca.crt"), **kw)
        return TlsConfig(
            cert=self.path(f"{name}.crt"),
            key=self.path(f"{name}.key"),
            ca=self.path("ca.crt"),
            **kw,
        )

    def server(self, require_client_cert: bool = True) -> TlsConfig:
        return TlsConfig(
            cert=self.path("server.crt"),
            key=self.path("server.key"),
            ca=self.path("ca.crt"),
            require_client_cert=require_client_cert,
        )

    def key_texts(self) -> list[str]:
        """Lines of every private key file and the password: none may ever be printed."""
        out = [KEY_PASSWORD]
        for f in self.dir.glob("*.key"):
            out += [line for line in f.read_text().splitlines() if "-----" not in line]
        return out


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stm test"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_pki(d: Path) -> Pki:
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)

    def write(stem: str, key, cert, password: bytes | None = None) -> None:
        enc = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        fmt = serialization.PrivateFormat.PKCS8
        (d / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, enc))
        (d / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def ca(cn: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - day)
            .not_valid_after(now + 30 * day)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def leaf(cn: str, issuer, *, server: bool = False, expired: bool = False):
        issuer_key, issuer_cert = issuer
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(issuer_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - 10 * day)
            .not_valid_after(now - day if expired else now + 30 * day)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(SERVER_NAME),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        return key, builder.sign(issuer_key, hashes.SHA256())

    root, other = ca("stm test CA"), ca("other CA")
    write("ca", *root)
    write("other-ca", *other)
    server = leaf(SERVER_NAME, root, server=True)
    write("server", *server)
    write("server-locked", *server, password=KEY_PASSWORD.encode())
    write("amf-1", *leaf("amf-1", root))
    write("amf-2", *leaf("amf-2", root))
    write("rogue", *leaf("amf-1", other))
    write("expired", *leaf("amf-old", root, expired=True))
    return Pki(d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- helpers --------------------------------------------------------------------------------


class RawFrames:
    """Whole messages as bytes, as stm-recv's framer hands them to the decoder."""

    def __init__(self) -> None:
        self._framer = TlvFramer()

    @property
    def failed(self) -> bool:
        return self._framer.failed

    def receive_data(self, data: bytes) -> None:
        self._framer.receive_data(data)

    def next_message(self):
        return self._framer.next_frame()


class IdentityCollector(Collector):
    """Records (stream, seq, identity of the connection) and applies stream ownership."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("framer_factory", RawFrames)
        self.owners = StreamOwners()
        self.seen: list[tuple[int, int, str | None]] = []
        super().__init__(**kwargs)

    def _on_message(self, msg, peer) -> None:
        identity = self.listener.peer_identity(peer)
        if not self.owners.admit(msg, identity):
            return
        parsed = TlvFramer()
        parsed.receive_data(bytes(msg))
        m = parsed.next_message()
        stream = m.get(STM_VENDOR, StmChunk.STREAM_ID).as_u32()
        seq = m.get(STM_VENDOR, StmChunk.SEQUENCE).as_u32()
        self.messages.append((stream, seq))
        self.seen.append((stream, seq, identity))


def tls_collector(pki: Pki, require_client_cert: bool = True, **kw) -> IdentityCollector:
    return IdentityCollector(ssl_context=server_context(pki.server(require_client_cert)), **kw)


def sender(pki: Pki, port: int, name: str | None, hostname: str = SERVER_NAME) -> TcpSender:
    ctx = client_context(pki.client(name))
    return TcpSender(HOST, port, ssl_context=ctx, server_hostname=hostname, **FAST)


# -- contexts -------------------------------------------------------------------------------


def test_contexts(pki: Pki) -> None:
    srv = server_context(pki.server())
    assert srv.minimum_version == ssl.TLSVersion.TLSv1_2
    assert srv.verify_mode == ssl.CERT_REQUIRED
    assert server_context(pki.server(False)).verify_mode == ssl.CERT_OPTIONAL
    cli = client_context(pki.client("amf-1"))
    assert cli.minimum_version == ssl.TLSVersion.TLSv1_2
    assert cli.verify_mode == ssl.CERT_REQUIRED and cli.check_hostname
    with pytest.raises(UsageError, match="needs a certificate"):
        server_context(TlsConfig())
    with pytest.raises(UsageError, match="needs a CA bundle"):
        server_context(TlsConfig(cert=pki.path("server.crt"), require_client_cert=True))
    with pytest.raises(UsageError, match="no such file"):
        client_context(TlsConfig(cert=pki.path("nope.crt"), key=pki.path("amf-1.key")))
    with pytest.raises(UsageError, match="cannot load certificate and key"):
        client_context(TlsConfig(cert=pki.path("amf-1.crt"), key=pki.path("amf-2.key")))


def test_identity_strings(pki: Pki) -> None:
    cert = x509.load_pem_x509_certificate(pki.path("amf-1.crt").read_bytes())
    rdns = [[("countryName", "FR")], [("organizationName", "stm test")], [("commonName", "amf-1")]]
    assert format_subject(rdns) == cert.subject.rfc4514_string() == AMF1
    assert format_subject([[("CN", 'a,b+c"d\\e<f>;')], [("O", " x ")]]) == (
        'O=\\ x\\ ,CN=a\\,b\\+c\\"d\\\\e\\<f\\>\\;'
    )
    assert hostname_matches("collector.test", ["collector.test"], [])
    assert hostname_matches("Collector.Test.", ["collector.test"], [])
    assert hostname_matches("a.example.org", ["*.example.org"], [])
    assert not hostname_matches("a.b.example.org", ["*.example.org"], [])
    assert not hostname_matches("example.org", ["*.example.org"], [])
    assert not hostname_matches("x.com", ["*.com"], [])
    assert hostname_matches("127.0.0.1", ["127.0.0.1"], ["127.0.0.1"])
    assert not hostname_matches("127.0.0.2", [], ["127.0.0.1"])
    assert hostname_matches("[::1]", [], ["::1"])


# -- mutual TLS -----------------------------------------------------------------------------


def test_good_client_delivers_over_tls13_with_its_identity(pki: Pki) -> None:
    n = 3000
    with tls_collector(pki) as c, sender(pki, c.port, "amf-1") as s:
        s.send([message(i, stream=7) for i in range(n)])
        assert c.pump(lambda: len(c.messages) == n, timeout=10)
        assert s.url == f"tls://127.0.0.1:{c.port}"
        conn = next(iter(c.listener._conns.values()))
        assert conn.sock.version() == "TLSv1.3"
    assert c.seqs(7) == list(range(n))
    assert {identity for _, _, identity in c.seen} == {AMF1}
    assert c.listener.tls_failures == 0 and c.listener.rejected_connections == 0
    assert s.stats()["sent"] == n


def test_tls12_still_accepted(pki: Pki) -> None:
    ctx = client_context(pki.client("amf-1"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        tls_collector(pki) as c,
        TcpSender(HOST, c.port, ssl_context=ctx, server_hostname=SERVER_NAME, **FAST) as s,
    ):
        s.send([message(i) for i in range(10)])
        assert c.pump(lambda: len(c.messages) == 10)
        conn = next(iter(c.listener._conns.values()))
        assert conn.sock.version() == "TLSv1.2"
    assert {identity for _, _, identity in c.seen} == {AMF1}


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_tls11_client_is_refused(pki: Pki) -> None:
    ctx = client_context(pki.client("amf-1"))
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with tls_collector(pki) as c:
        s = TcpSender(HOST, c.port, ssl_context=ctx, server_hostname=SERVER_NAME, **FAST)
        try:
            assert c.pump(lambda: c.listener.tls_failures >= 1)
            assert wait_for(lambda: s.last_error is not None, timeout=3)
        finally:
            s.close(timeout=0)
    assert c.messages == []


@pytest.mark.parametrize(
    ("client", "why"),
    [
        (None, "certificate"),  # no client certificate at all
        ("rogue", "certificate verify failed"),  # signed by a CA the collector does not trust
        ("expired", "certificate verify failed"),
    ],
)
def test_bad_client_certificates_are_refused_and_counted(
    pki: Pki, client: str | None, why: str, caplog
) -> None:
    with caplog.at_level(logging.WARNING, logger="stm"), tls_collector(pki) as c:
        s = sender(pki, c.port, client)
        try:
            s.send([message(i) for i in range(5)])
            assert c.pump(lambda: c.listener.tls_failures >= 1)
            c.pump(timeout=0.2)
        finally:
            s.close(timeout=0)
        lst = c.listener
    assert c.messages == []
    assert lst.rejected_connections >= lst.tls_failures >= 1
    assert "TLS handshake failed" in c.closed[0][1] and why in c.closed[0][1].lower()
    assert "Traceback" not in caplog.text


def test_client_certificate_optional_when_not_required(pki: Pki) -> None:
    with tls_collector(pki, require_client_cert=False) as c, sender(pki, c.port, None) as s:
        s.send([message(i) for i in range(3)])
        assert c.pump(lambda: len(c.messages) == 3)
    assert {identity for _, _, identity in c.seen} == {None}


def test_plain_tcp_client_on_a_tls_port_is_refused(pki: Pki) -> None:
    with tls_collector(pki) as c, raw_client(c.port) as plain:
        plain.sendall(message(0))
        assert c.pump(lambda: c.listener.tls_failures == 1)
        assert peer_closed(plain)
    assert c.messages == [] and c.listener.rejected_connections == 1


def test_wrong_server_name_fails_on_the_client_with_a_clear_error(pki: Pki, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="stm"), tls_collector(pki) as c:
        s = sender(pki, c.port, "amf-1", hostname="wrong.test")
        try:
            s.send([message(0)])
            assert c.pump(lambda: s.last_error is not None, timeout=5)
            error = s.last_error  # now: once nobody serves the handshake, it times out
        finally:
            s.close(timeout=0)
    assert c.messages == []
    expected = (
        "certificate verify failed: Hostname mismatch, certificate is not valid for 'wrong.test'"
    )
    assert error is not None and error.startswith(expected)
    lines = [r.getMessage() for r in caplog.records if r.name == "stm"]
    assert any(
        line.startswith(f"cannot connect to tls://127.0.0.1:{c.port}: {expected}") for line in lines
    ), lines
    assert s.stats()["sent"] == 0


def test_stalled_handshake_times_out_and_frees_its_slot(pki: Pki) -> None:
    with tls_collector(pki, max_connections=1, handshake_timeout=0.3) as c:
        lst = c.listener
        with raw_client(c.port) as stalled:  # connects, never says hello
            assert c.pump(lambda: lst.active == 1)
            assert lst.expire() == 0  # not yet
            c.pump(timeout=0.4)
            with sender(pki, c.port, "amf-1") as s:  # accepting it sweeps the stalled one
                s.send([message(1)])
                assert c.pump(lambda: len(c.messages) == 1, timeout=5)
            assert peer_closed(stalled)
    assert lst.tls_failures == 1
    assert any(r and "timed out" in r for _, r in c.closed)


# -- who may send what ----------------------------------------------------------------------


def test_stream_id_hijack_over_mtls_is_refused(pki: Pki) -> None:
    with tls_collector(pki) as c, sender(pki, c.port, "amf-1") as first:
        first.send([message(i, stream=7) for i in range(10)])
        assert c.pump(lambda: len(c.messages) == 10)
        with sender(pki, c.port, "amf-2") as second:
            # amf-2 tries amf-1's stream, then uses one of its own
            second.send([message(100 + i, stream=7) for i in range(5)])
            second.send([message(i, stream=8) for i in range(5)])
            assert c.pump(lambda: len(c.messages) == 15)
        first.send([message(10, stream=7)])
        assert c.pump(lambda: len(c.messages) == 16)
    assert c.seqs(7) == list(range(11))
    assert c.seqs(8) == list(range(5))
    assert c.owners.rejected == 5
    assert c.owners.owner(7) == AMF1 and c.owners.owner(8) == AMF2
    assert c.owners.last_refused == (7, AMF2, AMF1)


def test_allowlist_on_a_tls_listener(pki: Pki) -> None:
    from stm.transport.allow import AddressFilter

    allow = AddressFilter(["127.0.0.2/32"])
    with tls_collector(pki, allow=allow) as c:
        with socket.create_connection((HOST, c.port), timeout=2) as refused:
            assert c.pump(lambda: c.listener.denied == 1)
            assert peer_closed(refused)
        with socket.create_connection((HOST, c.port), timeout=2, source_address=("127.0.0.2", 0)):
            assert c.pump(lambda: c.listener.active == 1)
    assert allow.denied == 1
    assert c.listener.connections == 1 and c.listener.tls_failures == 0


# -- secrets --------------------------------------------------------------------------------


def test_key_password_from_env_or_file_never_shown(pki: Pki, monkeypatch, tmp_path) -> None:
    locked = TlsConfig(
        cert=pki.path("server.crt"),
        key=pki.path("server-locked.key"),
        ca=pki.path("ca.crt"),
        password_env="STM_TEST_KEY_PASSWORD",
    )
    monkeypatch.setenv("STM_TEST_KEY_PASSWORD", KEY_PASSWORD)
    ctx = server_context(locked)
    assert KEY_PASSWORD not in repr(locked)
    pw = tmp_path / "pw"
    pw.write_text(KEY_PASSWORD + "\n")
    assert read_secret(file=pw) == KEY_PASSWORD.encode()
    server_context(TlsConfig(cert=locked.cert, key=locked.key, password_file=pw))
    monkeypatch.setenv("STM_TEST_KEY_PASSWORD", "wrong " + KEY_PASSWORD[::-1])
    with pytest.raises(UsageError) as err:
        server_context(locked)
    assert KEY_PASSWORD[::-1] not in str(err.value) and "server-locked.key" in str(err.value)
    monkeypatch.delenv("STM_TEST_KEY_PASSWORD")
    with pytest.raises(UsageError, match=r"STM_TEST_KEY_PASSWORD is not set"):
        server_context(locked)
    with pytest.raises(UsageError, match="not both"):
        read_secret(file=pw, env="X")
    # and the context from the password works end to end
    with IdentityCollector(ssl_context=ctx) as c, sender(pki, c.port, "amf-1") as s:
        s.send([message(0)])
        assert c.pump(lambda: len(c.messages) == 1)


def test_no_key_material_in_logs_or_output(pki: Pki, caplog, capsys, monkeypatch) -> None:
    monkeypatch.setenv("STM_TEST_KEY_PASSWORD", KEY_PASSWORD)
    locked = TlsConfig(
        cert=pki.path("server.crt"),
        key=pki.path("server-locked.key"),
        ca=pki.path("ca.crt"),
        require_client_cert=True,
        password_env="STM_TEST_KEY_PASSWORD",
    )
    with caplog.at_level(logging.DEBUG, logger="stm"):
        with IdentityCollector(ssl_context=server_context(locked)) as c:
            for name in ("amf-1", "rogue", None):
                s = sender(pki, c.port, name)
                s.send([message(0)])
                assert c.pump(lambda: c.listener.connections >= 1, timeout=5)
                c.pump(timeout=0.3)
                s.close(timeout=0.5)
        for bad in ("wrong", ""):
            monkeypatch.setenv("STM_TEST_KEY_PASSWORD", bad or " ")
            with pytest.raises(UsageError) as err:
                server_context(locked)
            logging.getLogger("stm").warning("%s", err.value)
    out = capsys.readouterr()
    text = caplog.text + out.out + out.err
    assert "handshake failed" in text  # something was logged
    for secret in pki.key_texts():
        assert secret not in text


def test_sender_thread_survives_a_tls_collector_restart(pki: Pki) -> None:
    first = tls_collector(pki)
    port = first.port
    s = sender(pki, port, "amf-1")
    try:
        s.send([message(i) for i in range(100)])
        assert first.pump(lambda: len(first.messages) == 100)
        first.close()
        s.send([message(i) for i in range(100, 200)])
        with tls_collector(pki, port=port) as second:
            assert second.pump(lambda: second.seqs()[-1:] == [199], timeout=10)
    finally:
        s.close(timeout=0)
        first.close()
    assert s.stats()["reconnects"] >= 1
    assert {identity for _, _, identity in second.seen} == {AMF1}


def test_threads_do_not_leak() -> None:
    """Every sender above was closed: no stm thread is left running."""
    assert wait_for(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("stm tcp sender")],
        timeout=5,
    )
