"""DTLS (pyOpenSSL) for format A and format B over UDP, on 127.0.0.1 with real certificates.

Most tests drive senders and the receiver from one thread (:meth:`Loop.pump`, bounded in
iterations and time), which keeps them deterministic; the blocking ``connect`` is tested
with the receiver served from a thread. The PKI comes from test_tls.make_pki.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("cryptography")
pytest.importorskip("OpenSSL")

from OpenSSL import SSL
from test_tls import AMF1, AMF2, SERVER_NAME, Pki, make_pki

from stm import pcapng
from stm.errors import UsageError
from stm.report import Decoder, Encoder, Packets, TlvDecoder, TlvEncoder
from stm.report.ownership import StreamOwners
from stm.transport import dtls
from stm.transport.allow import AddressFilter
from stm.transport.dtls import DtlsReceiver, DtlsSender, split_records
from stm.transport.tls import HandshakeFailed, TlsConfig

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
SAMPLES = sorted((Path(__file__).resolve().parents[1] / "samples").glob("*.pcap*"))
FAST = {"retry_initial": 0.05, "retry_max": 0.2, "handshake_timeout": 3.0}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Loop:
    """A DtlsReceiver and the senders aimed at it, all served from the test's thread."""

    def __init__(self, pki: Pki, *, port: int = 0, **kwargs) -> None:
        self.pki = pki
        ctx = dtls.server_context(pki.server(kwargs.pop("require_client_cert", True)))
        self.rx = DtlsReceiver(HOST, port, context=ctx, **kwargs)
        self.port = self.rx.address[1]
        self.got: list[tuple[bytes, tuple, str | None]] = []
        self.senders: list[DtlsSender] = []

    def sender(self, name: str | None, hostname: str = SERVER_NAME, **kw) -> DtlsSender:
        for k, v in FAST.items():
            kw.setdefault(k, v)
        ctx = dtls.client_context(self.pki.client(name))
        tx = DtlsSender(HOST, self.port, context=ctx, server_hostname=hostname, **kw)
        self.senders.append(tx)
        return tx

    def pump(self, until: Callable[[], bool] = lambda: False, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            if until():
                return True
            if time.monotonic() >= deadline:
                break
            for tx in self.senders:
                tx.poll()
            for report, addr in self.rx.drain():
                self.got.append((report, addr, self.rx.identity(addr)))
            time.sleep(0.001)
        return until()

    def deliver(self, tx: DtlsSender, reports: list[bytes], batch: int = 200) -> None:
        """Send in batches, each received before the next goes: no socket buffer overflows,
        so any loss would be the transport's."""
        for i in range(0, len(reports), batch):
            want = len(self.got) + len(reports[i : i + batch])
            tx.send(reports[i : i + batch])
            assert self.pump(lambda w=want: len(self.got) >= w), (i, tx.stats(), self.rx.stats())

    def close(self) -> None:
        for tx in self.senders:
            tx.close(timeout=0)
        self.rx.close()

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def client_hello() -> bytes:
    """A genuine first ClientHello (no cookie), from a pyOpenSSL client on memory BIOs."""
    conn = SSL.Connection(dtls.client_context(TlsConfig()), None)
    conn.set_connect_state()
    conn.set_ciphertext_mtu(1400)  # memory BIOs have no MTU to query
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gre", "tlv"])
def test_samples_round_trip_with_zero_loss(pki: Pki, fmt: str) -> None:
    assert SAMPLES
    with Loop(pki) as loop:
        tx = loop.sender("amf-1")
        total_packets = 0
        sent: list[bytes] = []
        for path in SAMPLES:
            if fmt == "gre":
                enc = Encoder("amf-1", mtu=tx.report_mtu, linger=0.0)
            else:
                enc = TlvEncoder("amf-1", mtu=tx.report_mtu)
            reports: list[bytes] = []
            for pkt in pcapng.read(path):
                reports += enc.add(pkt, 0.0)
                total_packets += 1
            reports += enc.flush()
            assert all(len(r) <= tx.datagram_limit - dtls.RECORD_OVERHEAD for r in reports)
            loop.deliver(tx, reports, batch=50)
            sent += reports
        tx.close()
        assert tx.stats()["sent"] == len(sent) and tx.stats()["undelivered"] == 0
    assert [r for r, _, _ in loop.got] == sent  # every report, once, in order, intact
    assert {who for _, _, who in loop.got} == {AMF1}
    decoder = Decoder() if fmt == "gre" else TlvDecoder()
    for report, addr, _ in loop.got:
        (decoder.receive_datagram if fmt == "gre" else decoder.receive_message)(report, addr, 0)
    packets = sum(len(e.packets) for e in decoder.events() if isinstance(e, Packets))
    assert packets == total_packets
    assert loop.rx.handshakes == 1 and loop.rx.handshake_failures == 0


def test_many_reports_zero_loss_and_the_record_limits(pki: Pki) -> None:
    n = 6000
    reports = [i.to_bytes(4, "big") + bytes(i % 1300) for i in range(n)]
    with Loop(pki) as loop:
        tx = loop.sender("amf-1")
        loop.deliver(tx, reports)
        # one report per record: the largest record fits, one byte more is refused
        big = b"\x5a" * dtls.MAX_RECORD
        loop.deliver(tx, [big])
        with pytest.raises(UsageError, match="does not fit a DTLS record"):
            tx.send([big + b"!"])
        stats = tx.stats()
    assert [r for r, _, _ in loop.got] == [*reports, big]
    assert stats["sent"] == n + 1 and stats["dropped"] == 0 and stats["handshakes"] == 1
    assert loop.rx.records == n + 1 and loop.rx.stray == 0
    assert tx.report_mtu == 1500 - dtls.RECORD_OVERHEAD


def test_connect_and_flush_with_a_threaded_receiver(pki: Pki) -> None:
    ctx = dtls.server_context(pki.server())
    rx = DtlsReceiver(HOST, 0, context=ctx)
    got: list = []
    stop = threading.Event()

    def serve() -> None:
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            got.extend(rx.drain())
            time.sleep(0.002)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client = dtls.client_context(pki.client("amf-1"))
        with DtlsSender(HOST, rx.address[1], context=client, server_hostname=SERVER_NAME) as tx:
            tx.connect(timeout=5)
            assert tx.connected and tx.server_identity == "CN=collector.test,O=stm test,C=FR"
            tx.send([b"report %d" % i for i in range(100)])
            assert tx.flush(timeout=5)
            for _ in range(500):
                if len(got) == 100:
                    break
                time.sleep(0.01)
        wrong = DtlsSender(HOST, rx.address[1], context=client, server_hostname="wrong.test")
        with pytest.raises(HandshakeFailed) as err:
            wrong.connect(timeout=5)
        wrong.close()
    finally:
        stop.set()
        thread.join(10)
        rx.close()
    assert [r for r, _ in got] == [b"report %d" % i for i in range(100)]
    assert "hostname mismatch, certificate is not valid for 'wrong.test'" in str(err.value)


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "server_says", "client_says"),
    [
        (None, "peer did not return a certificate", "alert handshake failure"),
        ("rogue", "unable to get local issuer certificate", "alert unknown ca"),
        ("expired", "certificate has expired", "alert certificate expired"),
    ],
)
def test_bad_client_certificates_are_refused_and_counted(
    pki: Pki, client, server_says: str, client_says: str, caplog
) -> None:
    with caplog.at_level(logging.WARNING, logger="stm"), Loop(pki) as loop:
        tx = loop.sender(client)
        tx.send([b"must not arrive"])
        assert loop.pump(lambda: tx.handshake_failures >= 1 and loop.rx.handshake_failures >= 1)
    assert loop.got == [] and loop.rx.records == 0 and loop.rx.sessions == 0
    assert client_says in (tx.last_error or "")
    assert f"failed: {server_says}" in caplog.text
    assert "Traceback" not in caplog.text


def test_wrong_server_name_fails_on_the_client(pki: Pki) -> None:
    with Loop(pki) as loop:
        tx = loop.sender("amf-1", hostname="wrong.test")
        tx.send([b"x"])
        assert loop.pump(lambda: tx.handshake_failures >= 1)
        assert loop.got == []
    assert tx.last_error == "hostname mismatch, certificate is not valid for 'wrong.test'"


def test_untrusted_server_is_refused_by_the_client(pki: Pki) -> None:
    with Loop(pki) as loop:
        cfg = TlsConfig(
            cert=pki.path("amf-1.crt"), key=pki.path("amf-1.key"), ca=pki.path("other-ca.crt")
        )
        tx = DtlsSender(HOST, loop.port, context=dtls.client_context(cfg), **FAST)
        loop.senders.append(tx)
        tx.send([b"x"])
        assert loop.pump(lambda: tx.handshake_failures >= 1)
    assert loop.got == []
    assert tx.last_error in (
        "unable to get local issuer certificate",
        "self-signed certificate in certificate chain",
    )


def test_clear_reports_and_garbage_on_the_dtls_port_are_dropped(pki: Pki) -> None:
    enc = Encoder("amf-1", 7, linger=0.0)
    pkt = next(iter(pcapng.read(SAMPLES[0])))
    clear = enc.add(pkt, 0.0) + enc.flush()
    with Loop(pki) as loop, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
        plain.settimeout(0.3)
        for d in [*clear, b"", b"\x17\xfe\xfd", b"\x16" * 40]:
            plain.sendto(d, (HOST, loop.port))
        assert loop.pump(lambda: loop.rx.datagrams == len(clear) + 3)
        with pytest.raises(TimeoutError):
            plain.recv(100)  # nothing sent back to a stranger
    assert loop.got == [] and loop.rx.sessions == 0 and loop.rx.stray == len(clear) + 3


def test_cookie_exchange_keeps_no_state_for_unproven_peers(pki: Pki) -> None:
    hello = client_hello()
    with Loop(pki) as loop, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as spoof:
        spoof.settimeout(2)
        for _ in range(20):
            spoof.sendto(hello, (HOST, loop.port))
        assert loop.pump(lambda: loop.rx.cookies == 20)
        replies = [spoof.recv(65536) for _ in range(20)]
    assert loop.rx.sessions == 0 and loop.rx.handshakes == 0
    assert all(len(r) < len(hello) for r in replies)  # HelloVerifyRequest: no amplification
    assert all(r[0] == 22 and r[13] == 3 for r in replies)  # handshake, hello_verify_request


def test_stalled_handshakes_expire_and_sessions_are_bounded(pki: Pki) -> None:
    with Loop(pki, max_sessions=1, handshake_timeout=1.0) as loop:
        # a peer that proves its address (cookie) and then goes silent mid-handshake
        conn = SSL.Connection(dtls.client_context(TlsConfig(ca=pki.path("ca.crt"))), None)
        conn.set_connect_state()
        conn.set_ciphertext_mtu(1400)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            for _ in range(2):
                with pytest.raises(SSL.WantReadError):
                    conn.do_handshake()
                s.sendto(conn.bio_read(65536), (HOST, loop.port))
                loop.pump(lambda: False, timeout=0.05)
                conn.bio_write(s.recv(65536))
            assert loop.rx.sessions == 1
            # no room for another producer while it holds the only slot...
            tx = loop.sender("amf-1", handshake_timeout=0.5)
            tx.send([b"later"])
            assert loop.pump(lambda: loop.rx.refused_sessions >= 1)
            # ...until its handshake times out; then the producer gets in
            assert loop.pump(lambda: loop.got != [], timeout=10)
    assert loop.rx.handshake_failures >= 1 and loop.got[0][0] == b"later"


# -- who may send what ----------------------------------------------------------------------


def test_allowlist_drops_datagrams_from_127_0_0_2(pki: Pki) -> None:
    allow = AddressFilter(["127.0.0.1/32"])
    hello = client_hello()
    with Loop(pki, allow=allow) as loop:
        try:
            stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            stranger.bind(("127.0.0.2", 0))
        except OSError:
            pytest.skip("no 127.0.0.2 here")
        with stranger:
            stranger.settimeout(0.3)
            for _ in range(5):
                stranger.sendto(hello, (HOST, loop.port))
            assert loop.pump(lambda: loop.rx.denied == 5)
            with pytest.raises(TimeoutError):
                stranger.recv(100)  # not even a cookie
        tx = loop.sender("amf-1")
        loop.deliver(tx, [b"from 127.0.0.1"])
    assert loop.rx.cookies == 1 and allow.denied == 5
    assert [(r, a[0]) for r, a, _ in loop.got] == [(b"from 127.0.0.1", "127.0.0.1")]


def test_stream_id_hijack_over_dtls_is_refused(pki: Pki) -> None:
    owners = StreamOwners()
    pkts = list(pcapng.read(SAMPLES[0]))[:20]

    def reports(producer: str) -> list[bytes]:
        enc = Encoder(producer, 7, linger=0.0)  # both claim GRE key 7
        return [d for p in pkts for d in enc.add(p, 0.0)] + enc.flush()

    with Loop(pki) as loop:
        first, second = loop.sender("amf-1"), loop.sender("amf-2")
        loop.deliver(first, reports("amf-1"))
        loop.deliver(second, reports("amf-2"))
    admitted = [(r, who) for r, _, who in loop.got if owners.admit(r, who)]
    assert {who for _, who in admitted} == {AMF1}
    assert owners.rejected == len(reports("amf-2")) and owners.owner(7) == AMF1
    assert {who for _, _, who in loop.got} == {AMF1, AMF2}


# -- collectors that go away ----------------------------------------------------------------


def test_collector_restart_with_close_notify_loses_nothing(pki: Pki) -> None:
    with Loop(pki) as first:
        port = first.port
        tx = first.sender("amf-1")
        first.deliver(tx, [b"a%d" % i for i in range(50)])
        first.senders.remove(tx)  # the sender outlives this collector
    # closed with close_notify: the sender queues until a collector is back
    tx.send([b"b%d" % i for i in range(50)])
    with Loop(pki, port=port) as second:
        second.senders.append(tx)
        assert second.pump(lambda: len(second.got) == 50, timeout=10)
    assert [r for r, _, _ in second.got] == [b"b%d" % i for i in range(50)]
    assert tx.handshakes == 2 and tx.stats()["dropped"] == 0


def test_collector_crash_is_noticed_from_its_hint(pki: Pki, caplog) -> None:
    with Loop(pki) as first:
        port = first.port
        tx = first.sender("amf-1")
        first.deliver(tx, [b"a%d" % i for i in range(20)])
        first.senders.remove(tx)
        first.rx.sock.close()  # a crash: no close_notify
        first.rx._closed = True
    with caplog.at_level(logging.WARNING, logger="stm"), Loop(pki, port=port) as second:
        second.senders.append(tx)
        time.sleep(0.06)  # the session is older than retry_initial: hints are believed
        tx.send([b"lost?"])  # the new collector cannot read this; it says so
        assert second.pump(lambda: tx.handshakes == 2, timeout=10)
        second.deliver(tx, [b"b%d" % i for i in range(20)])
    assert second.rx.stray >= 1
    assert [r for r, _, _ in second.got][-20:] == [b"b%d" % i for i in range(20)]
    assert "the collector does not know the session" in caplog.text


def test_split_records() -> None:
    a = bytes([23, 0xFE, 0xFD, 0, 1]) + bytes(6) + (3).to_bytes(2, "big") + b"abc"
    b = bytes([21, 0xFE, 0xFD, 0, 0]) + bytes(6) + (2).to_bytes(2, "big") + b"\x02\x0a"
    assert split_records(a + b) == [a, b]
    assert dtls._datagrams(a + b + a, len(a) + len(b)) == [a + b, a]


def test_no_key_material_in_logs(pki: Pki, caplog, capsys) -> None:
    with caplog.at_level(logging.DEBUG, logger="stm"), Loop(pki) as loop:
        for name in ("amf-1", "rogue", None):
            tx = loop.sender(name)
            tx.send([b"x"])
            loop.pump(lambda t=tx: t.handshakes or t.handshake_failures, timeout=3)
        loop.pump(timeout=0.1)
    out = capsys.readouterr()
    text = caplog.text + out.out + out.err
    assert "DTLS handshake" in text
    for secret in pki.key_texts():
        assert secret not in text
