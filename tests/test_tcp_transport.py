"""TcpSender and TcpListener through real TCP sockets on 127.0.0.1.

The listener is driven inline by :class:`Collector.pump`, a selector loop bounded in both
iterations and time; senders run their own threads. Every wait in here has a deadline.
"""

from __future__ import annotations

import logging
import selectors
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stm.errors import UsageError
from stm.tlv import (
    STM_VENDOR,
    StmChunk,
    TlvFramer,
    chunk_bytes,
    chunk_u32,
    encode_message,
)
from stm.transport.tcp import TcpListener, TcpSender

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
FAST = {"backoff_initial": 0.02, "backoff_max": 0.1, "connect_timeout": 1.0}


def message(seq: int, stream: int = 1, size: int = 40) -> bytes:
    return encode_message(
        [
            chunk_u32(STM_VENDOR, StmChunk.STREAM_ID, stream),
            chunk_u32(STM_VENDOR, StmChunk.SEQUENCE, seq),
            chunk_bytes(STM_VENDOR, StmChunk.FRAME, bytes([seq & 0xFF]) * size),
        ]
    )


def free_port() -> int:
    """A port nobody listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.01) + 1):
        if cond():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    return cond()


def raw_client(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=2.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def peer_closed(sock: socket.socket, timeout: float = 2.0) -> bool:
    """True once the listener has closed this client's connection (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class Collector:
    """A TcpListener with TlvFramer, served by an inline selector loop."""

    def __init__(self, port: int = 0, **kwargs) -> None:
        kwargs.setdefault("framer_factory", TlvFramer)
        self.messages: list[tuple[int, int]] = []  # (stream, seq) in arrival order
        self.closed: list[tuple[tuple, str | None]] = []
        self.sel = selectors.DefaultSelector()
        self.listener = TcpListener(
            HOST, port, on_message=self._on_message, on_close=self._on_close, **kwargs
        )
        self.listener.register(self.sel)
        self.port = self.listener.address[1]

    def _on_message(self, msg, peer) -> None:
        stream = msg.get(STM_VENDOR, StmChunk.STREAM_ID).as_u32()
        self.messages.append((stream, msg.get(STM_VENDOR, StmChunk.SEQUENCE).as_u32()))

    def _on_close(self, peer, reason) -> None:
        self.closed.append((peer, reason))

    def seqs(self, stream: int = 1) -> list[int]:
        return [q for s, q in self.messages if s == stream]

    def pump(self, until: Callable[[], bool] = lambda: False, timeout: float = 5.0) -> bool:
        """Serve events until ``until()`` holds or ``timeout`` passes; returns ``until()``."""
        deadline = time.monotonic() + timeout
        for _ in range(1_000_000):
            if until():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, mask in self.sel.select(min(remaining, 0.05)):
                key.data.handle(key, mask)
        return until()

    def close(self) -> None:
        self.listener.close()
        self.sel.close()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def collector():
    with Collector() as c:
        yield c


# -- delivery -------------------------------------------------------------------------------


def test_many_messages_delivered_in_order(collector: Collector) -> None:
    n = 20000
    msgs = [message(i) for i in range(n)]
    with TcpSender(HOST, collector.port, queue_limit=1000, policy="block") as sender:
        assert sender.ip_header == 20
        # a producer thread, as the queue holds only part of the messages and send blocks
        producer = threading.Thread(
            target=lambda: [sender.send(msgs[i : i + 500]) for i in range(0, n, 500)]
        )
        producer.start()
        assert collector.pump(lambda: len(collector.messages) == n, timeout=10)
        producer.join(5)
        sender.close(timeout=5)
        stats = sender.stats()
    assert collector.seqs() == list(range(n))
    total = sum(map(len, msgs))
    assert stats == {
        "sent": n,
        "bytes": total,
        "dropped": 0,
        "undelivered": 0,
        "reconnects": 0,
        "resent": 0,
        "connected": False,
        "queued": 0,
    }
    assert collector.listener.bytes == total
    assert collector.listener.connections == 1
    assert collector.listener.rejected_connections == 0


def test_several_senders_at_once(collector: Collector) -> None:
    n, streams = 3000, (1, 2, 3, 4)
    senders = [TcpSender(HOST, collector.port) for _ in streams]
    try:
        threads = [
            threading.Thread(target=s.send, args=([message(i, stream) for i in range(n)],))
            for s, stream in zip(senders, streams, strict=True)
        ]
        for t in threads:
            t.start()
        assert collector.pump(lambda: len(collector.messages) == n * len(streams), timeout=10)
        for t in threads:
            t.join(5)
    finally:
        for s in senders:
            s.close(timeout=2)
    for stream in streams:
        assert collector.seqs(stream) == list(range(n))
    assert collector.listener.connections == len(streams)
    assert sum(s.stats()["sent"] for s in senders) == n * len(streams)


def test_messages_split_at_every_byte_boundary(collector: Collector) -> None:
    msgs = [message(i, size=i * 7) for i in range(3)]
    stream = b"".join(msgs)
    ends = [sum(map(len, msgs[: k + 1])) for k in range(len(msgs))]
    lst = collector.listener
    # one byte at a time: message k appears exactly when its last byte arrives
    with raw_client(collector.port) as sock:
        for pos in range(len(stream)):
            sock.sendall(stream[pos : pos + 1])
            assert collector.pump(lambda p=pos: lst.bytes == p + 1, timeout=2)
            assert len(collector.messages) == sum(end <= pos + 1 for end in ends)
    assert collector.pump(lambda: not lst.active, timeout=2)
    assert collector.seqs() == [0, 1, 2]
    # two writes, split at every position
    for cut in range(1, len(stream)):
        collector.messages.clear()
        with raw_client(collector.port) as sock:
            sock.sendall(stream[:cut])
            assert collector.pump(lambda c=cut: lst.bytes % len(stream) == c, timeout=2)
            sock.sendall(stream[cut:])
            assert collector.pump(lambda: len(collector.messages) == 3, timeout=2)
        assert collector.seqs() == [0, 1, 2]
    # coalesced: many messages in one write
    collector.messages.clear()
    with raw_client(collector.port) as sock:
        sock.sendall(b"".join(message(i) for i in range(1000)))
        assert collector.pump(lambda: len(collector.messages) == 1000, timeout=5)
    assert collector.seqs() == list(range(1000))
    assert collector.pump(lambda: not lst.active, timeout=2)
    assert lst.rejected_connections == 0 and lst.truncated_streams == 0


# -- bad peers ------------------------------------------------------------------------------


def test_garbage_closes_that_connection_only(collector: Collector, caplog) -> None:
    lst = collector.listener
    with raw_client(collector.port) as good, raw_client(collector.port) as bad:
        bad_port = bad.getsockname()[1]
        good.sendall(message(0))
        assert collector.pump(lambda: len(collector.messages) == 1)
        with caplog.at_level(logging.WARNING, logger="stm"):
            bad.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert collector.pump(lambda: lst.rejected_connections == 1)
        assert peer_closed(bad)
        good.sendall(message(1) + message(2))
        assert collector.pump(lambda: len(collector.messages) == 3)
        assert lst.active == 1
    assert collector.seqs() == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert lines[0].startswith("closing connection from 127.0.0.1:")
    assert "protocol ID" in lines[0]
    assert lines[0].startswith(f"closing connection from 127.0.0.1:{bad_port}: ")
    assert collector.closed[0][1] is not None and "protocol ID" in collector.closed[0][1]


@pytest.mark.parametrize("length", range(6))
def test_length_field_below_header_is_rejected(collector: Collector, length: int) -> None:
    with raw_client(collector.port) as sock:
        sock.sendall(message(0) + struct.pack("!4sH", b"HEP3", length) + message(1))
        assert collector.pump(lambda: collector.listener.rejected_connections == 1)
        assert peer_closed(sock)
    assert collector.seqs() == [0]  # what came before the bad header was delivered


def test_length_over_the_framer_limit_is_rejected() -> None:
    with Collector(framer_factory=lambda: TlvFramer(max_buffer=100)) as c:
        with raw_client(c.port) as sock:
            sock.sendall(message(0, size=10) + struct.pack("!4sH", b"HEP3", 200))
            assert c.pump(lambda: c.listener.rejected_connections == 1)
            assert peer_closed(sock)
        assert c.seqs() == [0]
        assert "exceeds max_buffer 100" in c.closed[0][1]


def test_listener_max_buffer_closes_a_connection_that_hoards() -> None:
    with Collector(max_buffer=100) as c:
        big = message(7, size=1000)
        with raw_client(c.port) as sock:
            sock.sendall(message(0) + big[:500])
            assert c.pump(lambda: c.listener.rejected_connections == 1)
            assert peer_closed(sock)
        assert c.seqs() == [0]
        assert "without a complete message" in c.closed[0][1]


def test_stalled_peer_costs_nothing_until_close(collector: Collector) -> None:
    lst = collector.listener
    half = message(9)[:20]
    with raw_client(collector.port) as stalled, raw_client(collector.port) as good:
        stalled.sendall(half)
        good.sendall(message(0))
        assert collector.pump(lambda: len(collector.messages) == 1)
        collector.pump(timeout=0.3)  # stalled peer: silent, still open
        assert lst.active == 2
        assert collector.seqs() == [0]
        good.sendall(message(1))
        assert collector.pump(lambda: len(collector.messages) == 2)
        lst.close()
        assert peer_closed(stalled)
        assert lst.active == 0
    assert lst.rejected_connections == 0 and lst.truncated_streams == 0
    assert sorted(r for _, r in collector.closed) == ["listener closed", "listener closed"]


def test_peer_closing_mid_message_is_a_truncated_stream(collector: Collector) -> None:
    lst = collector.listener
    with raw_client(collector.port) as sock:
        sock.sendall(message(0) + message(1)[:15])
    assert collector.pump(lambda: lst.truncated_streams == 1)
    assert collector.seqs() == [0]
    assert lst.rejected_connections == 0 and lst.active == 0
    assert "stream ended inside a message" in collector.closed[0][1]


def test_max_connections() -> None:
    with Collector(max_connections=2) as c:
        lst = c.listener
        clients = [raw_client(c.port) for _ in range(4)]
        try:
            assert c.pump(lambda: lst.connections == 4)
            assert lst.active == 2 and lst.rejected_connections == 2
            assert peer_closed(clients[2]) and peer_closed(clients[3])
            clients[0].sendall(message(0))
            clients[1].sendall(message(1))
            assert c.pump(lambda: len(c.messages) == 2)
            clients[0].close()
            assert c.pump(lambda: lst.active == 1)
            clients[2] = raw_client(c.port)  # room again
            clients[2].sendall(message(2))
            assert c.pump(lambda: len(c.messages) == 3)
            assert lst.active == 2 and lst.rejected_connections == 2
        finally:
            for s in clients:
                s.close()
    assert sorted(c.seqs()) == [0, 1, 2]


# -- sender: collector down, restarts, full queue -------------------------------------------


def test_collector_down_at_start(caplog) -> None:
    port = free_port()
    with caplog.at_level(logging.INFO, logger="stm"):
        sender = TcpSender(HOST, port, **FAST)
        try:
            sender.send([message(i) for i in range(100)])
            time.sleep(0.4)  # several attempts, all refused
            assert sender.stats()["connected"] is False
            assert sender.stats()["queued"] == 100
            with Collector(port) as c:
                assert c.pump(lambda: len(c.messages) == 100, timeout=5)
                sender.close(timeout=2)
        finally:
            sender.close(timeout=0)
    assert c.seqs() == list(range(100))
    stats = sender.stats()
    assert (stats["sent"], stats["dropped"], stats["undelivered"]) == (100, 0, 0)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    # one line per state change, however many attempts failed
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"cannot connect to tcp://127.0.0.1:{port}: ")
    assert "Traceback" not in caplog.text
    assert lines[1] == f"connected to tcp://127.0.0.1:{port}"


def test_collector_restarts_between_batches(caplog) -> None:
    """The sender notices the close before writing, so nothing is lost or duplicated."""
    n1, n2 = 500, 500
    with Collector() as first:
        port = first.port
        sender = TcpSender(HOST, port, **FAST)
        sender.send([message(i) for i in range(n1)])
        assert first.pump(lambda: len(first.messages) == n1)
    try:
        with caplog.at_level(logging.WARNING, logger="stm"):
            sender.send([message(i) for i in range(n1, n1 + n2)])
            time.sleep(0.3)  # collector down: refused, backing off
            assert sender.stats()["connected"] is False
            with Collector(port) as second:
                assert second.pump(lambda: len(second.messages) >= n2, timeout=5)
                sender.close(timeout=2)
                second.pump(timeout=0.1)
    finally:
        sender.close(timeout=0)
    received = first.seqs() + second.seqs()
    assert received == list(range(n1 + n2))
    stats = sender.stats()
    assert stats["sent"] + stats["dropped"] + stats["undelivered"] == n1 + n2
    assert (stats["sent"], stats["reconnects"]) == (n1 + n2, 1)
    text = caplog.text
    assert "lost connection to" in text and "Traceback" not in text


def test_collector_crashes_mid_stream(caplog) -> None:
    """The collector dies while the sender writes flat out, then comes back.

    The sender's books stay exact (sent + dropped + undelivered == attempted) and the
    batch whose write failed is re-sent. What HEP over TCP cannot save are bytes the
    kernel had accepted (or the dead collector had read) before it died: the sequence
    numbers show them as one gap between the two connections, never anywhere else.
    """
    # 20 MB: more than loopback socket buffers hold (a few MB), so the sender is still
    # writing when the collector dies, and data is left to deliver to its successor
    total, crash_at = 20000, 2000
    first = Collector()
    port = first.port

    def crash(msg, peer) -> None:
        Collector._on_message(first, msg, peer)
        if len(first.messages) == crash_at:
            first.listener.close()  # mid-read: unread bytes make the kernel send a reset

    first.listener.on_message = crash
    sender = TcpSender(HOST, port, queue_limit=total, **FAST)
    msgs = [message(i, size=1000) for i in range(total)]
    producer = threading.Thread(
        target=lambda: [sender.send(msgs[i : i + 100]) for i in range(0, total, 100)]
    )
    try:
        with caplog.at_level(logging.DEBUG, logger="stm"):
            producer.start()
            assert first.pump(lambda: len(first.messages) >= crash_at, timeout=10)
            first.close()
            with Collector(port) as second:
                assert second.pump(lambda: second.seqs()[-1:] == [total - 1], timeout=10)
                producer.join(5)
                sender.close(timeout=5)
    finally:
        producer.join(5)
        sender.close(timeout=0)
        first.close()
    stats = sender.stats()
    assert stats["sent"] + stats["dropped"] + stats["undelivered"] == total
    assert (stats["sent"], stats["dropped"], stats["undelivered"]) == (total, 0, 0)
    assert stats["reconnects"] >= 1
    head, tail = first.seqs(), second.seqs()
    assert head == list(range(crash_at))
    assert tail == list(range(tail[0], total))  # in order from where it resumed to the end
    lost = set(range(total)) - set(head) - set(tail)
    assert lost == set(range(crash_at, tail[0]))  # one gap, at the crash
    duplicates = len(head) + len(tail) - len(set(head) | set(tail))
    assert duplicates <= stats["resent"]
    assert "Traceback" not in caplog.text


def test_drop_oldest_with_nobody_listening() -> None:
    sender = TcpSender(HOST, free_port(), queue_limit=10, **FAST)
    sender.send([message(i) for i in range(100)])
    assert sender.stats()["dropped"] == 90
    sender.close(timeout=0.2)
    stats = sender.stats()
    assert (stats["sent"], stats["dropped"], stats["undelivered"]) == (0, 90, 10)
    assert stats["connected"] is False


def test_drop_oldest_keeps_the_newest() -> None:
    port = free_port()
    sender = TcpSender(HOST, port, queue_limit=10, **FAST)
    try:
        sender.send([message(i) for i in range(100)])
        with Collector(port) as c:
            assert c.pump(lambda: len(c.messages) == 10)
            sender.close(timeout=2)
    finally:
        sender.close(timeout=0)
    assert c.seqs() == list(range(90, 100))


def test_block_policy_waits_for_room() -> None:
    port = free_port()
    sender = TcpSender(HOST, port, queue_limit=5, policy="block", **FAST)
    producer = threading.Thread(target=sender.send, args=([message(i) for i in range(50)],))
    try:
        producer.start()
        time.sleep(0.3)
        assert producer.is_alive()  # blocked: nobody to send to
        assert sender.stats()["queued"] == 5
        with Collector(port) as c:
            assert c.pump(lambda: len(c.messages) == 50)
            producer.join(5)
            assert not producer.is_alive()
            sender.close(timeout=2)
    finally:
        sender.close(timeout=0)
        producer.join(5)
    assert c.seqs() == list(range(50))
    assert sender.stats()["dropped"] == 0


def test_close_releases_a_blocked_send() -> None:
    sender = TcpSender(HOST, free_port(), queue_limit=5, policy="block", **FAST)
    producer = threading.Thread(target=sender.send, args=([message(i) for i in range(50)],))
    producer.start()
    time.sleep(0.2)
    started = time.monotonic()
    sender.close(timeout=0.2)
    producer.join(5)
    assert not producer.is_alive()
    assert time.monotonic() - started < 3
    stats = sender.stats()
    assert (stats["sent"], stats["dropped"], stats["undelivered"]) == (0, 0, 50)


def test_sender_rejects_misuse() -> None:
    with pytest.raises(UsageError):
        TcpSender(HOST, 1, policy="drop-newest")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        TcpSender(HOST, 1, queue_limit=0)
    sender = TcpSender(HOST, free_port(), **FAST)
    sender.close(timeout=0)
    with pytest.raises(UsageError):
        sender.send([message(0)])


def test_sender_gives_up_on_a_collector_that_stops_reading() -> None:
    """A collector that accepts but never reads: close() still returns in time."""
    with socket.socket() as server:
        server.bind((HOST, 0))
        server.listen(1)
        sender = TcpSender(HOST, server.getsockname()[1], **FAST)
        conn = None
        try:
            payload = [message(i, size=60000) for i in range(200)]  # ~12 MB, beyond buffers
            sender.send(payload)
            server.settimeout(2)
            conn, _ = server.accept()
            assert wait_for(lambda: sender.stats()["sent"] > 0, timeout=3)
            started = time.monotonic()
            sender.close(timeout=0.3)
            assert time.monotonic() - started < 2
        finally:
            sender.close(timeout=0)
            if conn is not None:
                conn.close()
    stats = sender.stats()
    assert stats["sent"] + stats["undelivered"] == 200
    assert stats["undelivered"] > 0


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found")
    d: Path = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    done = subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        capture_output=True,
        timeout=30,
    )
    if done.returncode != 0:
        pytest.skip(f"openssl req failed: {done.stderr.decode(errors='replace')[:200]}")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert)
    return server, client


def test_tls_round_trip(tls_contexts) -> None:
    server_ctx, client_ctx = tls_contexts
    n = 5000
    with Collector(ssl_context=server_ctx) as c:
        with TcpSender(HOST, c.port, ssl_context=client_ctx, **FAST) as sender:
            sender.send([message(i) for i in range(n)])
            assert c.pump(lambda: len(c.messages) == n, timeout=10)
        # a plain-TCP client on the TLS port costs its own connection only
        with raw_client(c.port) as plain:
            plain.sendall(message(0))
            assert c.pump(lambda: c.listener.rejected_connections == 1)
    assert c.seqs() == list(range(n))
    assert sender.stats()["sent"] == n
    assert "TLS handshake failed" in c.closed[-1][1]
