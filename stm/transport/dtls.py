"""DTLS 1.2 for STM over UDP: one report per DTLS record, mutual authentication.

3GPP TS 33.501 asks for DTLS when STM runs over UDP; RFC 8086 gives GRE-in-UDP with DTLS
its own port, 4755 (:data:`DTLS_PORT`). Python's standard library has no DTLS, so this
module drives OpenSSL's DTLS through pyOpenSSL (the optional ``dtls`` extra), on memory
BIOs: the sockets stay ours, non-blocking, in the caller's selector loop, the same shape as
:class:`~stm.transport.udp.UdpSender` / :class:`~stm.transport.udp.UdpReceiver`.
docs/security.md says why pyOpenSSL and what the limits are.

* DTLS 1.2 only, ECDHE with AES-GCM or ChaCha20-Poly1305: a record costs at most
  :data:`RECORD_OVERHEAD` bytes more than the report it carries, and a report may be at
  most :data:`MAX_RECORD` bytes (an encoder should be given :attr:`DtlsSender.report_mtu`).
* The receiver answers a ClientHello with a stateless cookie (HelloVerifyRequest) and keeps
  no state for a peer until it has shown that it receives at its address; sessions are per
  peer address, bounded in number, dropped when their handshake stalls or they fall idle.
* A sender whose collector lost its session (a restart) learns it from an unauthenticated
  hint the collector sends to unknown peers, from ICMP port unreachable, or from the
  collector's close_notify, and makes a new handshake; reports queue meanwhile (bounded).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import ipaddress
import logging
import os
import selectors
import socket
import struct
import time
from collections import deque
from typing import Any

from stm.errors import UsageError
from stm.logbudget import LogBudget
from stm.transport.allow import AddressFilter
from stm.transport.tls import HandshakeFailed, TlsConfig, format_subject, hostname_matches
from stm.transport.udp import (
    _SO_RCVBUFFORCE,
    _SO_SNDBUFFORCE,
    RECV_BUFFER,
    SEND_BUFFER,
    _grow_buffer,
)
from stm.transport.url import Endpoint, resolve

try:  # optional: pip install 'stm[dtls]'
    from OpenSSL import SSL
except ImportError:  # pragma: no cover - exercised only without the extra
    SSL = None  # type: ignore[assignment]

__all__ = [
    "DTLS_PORT",
    "MAX_RECORD",
    "RECORD_OVERHEAD",
    "DtlsReceiver",
    "DtlsSender",
    "available",
    "client_context",
    "server_context",
    "split_records",
]

log = logging.getLogger("stm")

DTLS_PORT = 4755
"""RFC 8086: GRE-in-UDP with DTLS."""
DTLS1_2_VERSION = 0xFEFD
MAX_RECORD = 1 << 14
"""Largest plaintext of one DTLS record: the largest report a DtlsSender takes."""
RECORD_OVERHEAD = 13 + 8 + 16
"""Record header, explicit nonce and tag of AES-GCM (ChaCha20-Poly1305 needs 8 fewer)."""
CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"
UDP_HEADER = 8
_HEADER = struct.Struct("!BHH6sH")  # content type, version, epoch, sequence, length
_HANDSHAKE, _ALERT, _APPLICATION_DATA = 22, 21, 23
_CLIENT_HELLO = 1
# What a collector sends a peer whose session it does not know: a plaintext fatal alert
# (unexpected_message) in epoch 0. Unauthenticated, so only ever a hint to start afresh.
_UNKNOWN_SESSION = _HEADER.pack(_ALERT, DTLS1_2_VERSION, 0, bytes(6), 2) + b"\x02\x0a"
_DTLS12 = b"\xfe\xfd"
_COOKIE_PERIOD = 30.0
_READ_BATCH = 64
_SEND_RETRIES = 200  # ENOBUFS: 0.5 ms apart, 0.1 s at most per record
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}


def available() -> bool:
    """True if pyOpenSSL (the ``dtls`` extra) is installed."""
    return SSL is not None


def _require() -> None:
    if SSL is None:
        raise UsageError("DTLS needs pyOpenSSL: pip install 'stm[dtls]'")


# -- contexts ---------------------------------------------------------------------------------


class _Peer:
    """What an OpenSSL connection's callbacks need to know: set as its app data."""

    __slots__ = ("addr", "error", "hostname", "secret")

    def __init__(self, addr: Any, secret: bytes = b"", hostname: str | None = None) -> None:
        self.addr = addr
        self.secret = secret
        self.hostname = hostname
        self.error: str | None = None  # why the peer's certificate was refused


def _verify(conn: Any, cert: Any, errnum: int, depth: int, ok: int) -> bool:
    """OpenSSL's chain check stands; we add the server name check and keep the reason."""
    peer = conn.get_app_data()
    if not ok:
        if isinstance(peer, _Peer) and peer.error is None:
            peer.error = _VERIFY_ERRORS.get(errnum, f"X509 verification error {errnum}")
        return False
    hostname = peer.hostname if isinstance(peer, _Peer) else None
    if depth == 0 and hostname is not None and not _names_match(cert, hostname):
        peer.error = f"hostname mismatch, certificate is not valid for {peer.hostname!r}"
        return False
    return True


def _names_match(cert: Any, hostname: str) -> bool:
    from cryptography import x509  # a dependency of pyOpenSSL

    try:
        san = cert.to_cryptography().extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    dns = san.value.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)]
    return hostname_matches(hostname, dns, ips)


def _base_context(config: TlsConfig, method: int) -> Any:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    ctx.set_max_proto_version(DTLS1_2_VERSION)  # the record splitter knows 1.2 headers
    ctx.set_cipher_list(CIPHERS)
    ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    if config.cert is not None:
        password = config.password()
        if password is not None:
            ctx.set_passwd_cb(lambda *_: password)
        cert, key = os.fspath(config.cert), os.fspath(config.key or config.cert)
        for path, what in ((cert, "certificate"), (key, "key")):
            if not os.path.isfile(path):
                raise UsageError(f"{what} {path}: no such file")
        try:
            ctx.use_certificate_chain_file(cert)
            ctx.use_privatekey_file(key)
            ctx.check_privatekey()
        except SSL.Error:
            # OpenSSL's error list may quote file names but never key bytes; stay terse
            raise UsageError(f"cannot load certificate and key from {cert} and {key}") from None
    elif config.key is not None:
        raise UsageError("a key (--key) without its certificate (--cert)")
    if config.ca is not None:
        ca = os.fspath(config.ca)
        try:
            if os.path.isdir(ca):
                ctx.load_verify_locations(None, ca)
            elif os.path.isfile(ca):
                ctx.load_verify_locations(ca)
            else:
                raise UsageError(f"CA bundle {ca}: no such file")
        except SSL.Error:
            raise UsageError(f"cannot load CA bundle {ca}") from None
    return ctx


def client_context(config: TlsConfig) -> Any:
    """The sender's ``OpenSSL.SSL.Context``: the collector's certificate is verified against
    ``config.ca`` (else the system's CAs) and its name checked by the sender; with
    ``config.cert`` the sender authenticates itself too."""
    _require()
    ctx = _base_context(config, SSL.DTLS_CLIENT_METHOD)
    if config.ca is None:
        ctx.set_default_verify_paths()
    ctx.set_verify(SSL.VERIFY_PEER, _verify)
    return ctx


def server_context(config: TlsConfig) -> Any:
    """The receiver's ``OpenSSL.SSL.Context``; client certificates are checked against
    ``config.ca`` (required with ``require_client_cert``). The receiver adds its cookies."""
    _require()
    if config.cert is None:
        raise UsageError("a DTLS receiver needs a certificate (--cert) and its key (--key)")
    if config.require_client_cert and config.ca is None:
        raise UsageError("requiring client certificates needs a CA bundle to check them (--ca)")
    ctx = _base_context(config, SSL.DTLS_SERVER_METHOD)
    if config.ca is None:
        ctx.set_verify(SSL.VERIFY_NONE, _verify)
    elif config.require_client_cert:
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verify)
    else:
        ctx.set_verify(SSL.VERIFY_PEER, _verify)
    return ctx


def _cookie(conn: Any) -> bytes:
    peer = conn.get_app_data()
    return _cookie_for(peer, int(time.monotonic() // _COOKIE_PERIOD))


def _cookie_for(peer: Any, period: int) -> bytes:
    data = f"{peer.addr!r}/{period}".encode()
    return hmac.new(peer.secret, data, hashlib.sha256).digest()


def _cookie_ok(conn: Any, cookie: bytes) -> bool:
    peer = conn.get_app_data()
    now = int(time.monotonic() // _COOKIE_PERIOD)
    return any(hmac.compare_digest(cookie, _cookie_for(peer, p)) for p in (now, now - 1))


# -- records ----------------------------------------------------------------------------------


def split_records(data: bytes) -> list[bytes]:
    """DTLS 1.2 records, as OpenSSL wrote them back to back into its memory BIO."""
    out = []
    pos, end = 0, len(data)
    while pos + 13 <= end:
        length = _HEADER.unpack_from(data, pos)[4]
        out.append(data[pos : pos + 13 + length])
        pos += 13 + length
    if pos < end:  # cannot happen with OpenSSL's output; keep the bytes rather than lose them
        out.append(data[pos:])
    return out


def _datagrams(data: bytes, limit: int) -> list[bytes]:
    """Records packed into datagrams of at most ``limit`` bytes (RFC 6347 4.1 allows
    several records per datagram); a record larger than ``limit`` goes alone."""
    out: list[bytes] = []
    current = b""
    for record in split_records(data):
        if current and len(current) + len(record) > limit:
            out.append(current)
            current = b""
        current += record
    if current:
        out.append(current)
    return out


def _count_records(data: bytes) -> int:
    n, pos, end = 0, 0, len(data)
    while pos + 13 <= end:
        pos += 13 + _HEADER.unpack_from(data, pos)[4]
        n += 1
    return n


def _is_client_hello(data: bytes) -> bool:
    return len(data) > 25 and data[0] == _HANDSHAKE and data[3:5] == b"\0\0" and data[13] == 1


def _errors(exc: Exception) -> str:
    """One line from an OpenSSL error (its reason strings), never a traceback or a repr."""
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], list):
        reasons = [str(e[2]) for e in args[0] if isinstance(e, tuple) and len(e) == 3 and e[2]]
        if reasons:
            return "; ".join(dict.fromkeys(reasons))
    return str(exc) or type(exc).__name__


def _subject(conn: Any) -> str | None:
    cert = conn.get_peer_certificate()
    if cert is None:
        return None
    rdns = cert.to_cryptography().subject.rdns
    return format_subject([[(a.rfc4514_attribute_name, str(a.value)) for a in r] for r in rdns])


def _bio_out(conn: Any) -> bytes:
    chunks = []
    for _ in range(1024):  # bounded: a flight is a few kB
        try:
            chunks.append(conn.bio_read(65536))
        except SSL.WantReadError:
            break
    return b"".join(chunks)


def _name(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


# -- sender ---------------------------------------------------------------------------------


class DtlsSender:
    """Sends reports to one collector over DTLS, one report per record and datagram.

    Like :class:`~stm.transport.udp.UdpSender`, nothing here blocks for long: :meth:`send`
    queues (bounded, dropping the oldest) and drives the session (handshake, its
    retransmissions, re-handshakes) from the caller's thread; reports are encrypted and sent
    once the session is up. :meth:`connect` waits for the first handshake and raises
    :class:`~stm.transport.tls.HandshakeFailed` with a one-line reason (certificate refused,
    server name mismatch, no answer); :meth:`flush` waits until the queue is sent; call
    :meth:`poll` now and then when idle so that retransmissions happen.

    Counters (:meth:`stats`): ``sent`` records handed to the kernel, ``bytes`` their size,
    ``dropped`` from a full queue, ``undelivered`` still queued at close, ``refused``
    (ICMP port unreachable: the record is lost), ``handshakes`` and ``handshake_failures``.
    """

    def __init__(
        self,
        host: str,
        port: int = DTLS_PORT,
        *,
        context: Any,
        server_hostname: str | None = None,
        source_port: int | None = None,
        mtu: int = 1500,
        queue_limit: int = 10000,
        handshake_timeout: float = 10.0,
        retry_initial: float = 0.5,
        retry_max: float = 10.0,
    ) -> None:
        _require()
        if queue_limit < 1 or handshake_timeout <= 0 or not 0 < retry_initial <= retry_max:
            raise UsageError("need queue_limit >= 1, handshake_timeout > 0, 0 < retry <= max")
        family, addr = resolve(host, port, socket.SOCK_DGRAM)
        self.ip_header = 40 if family == socket.AF_INET6 else 20
        if mtu - self.ip_header - UDP_HEADER < 256:
            raise UsageError(f"MTU {mtu} is too small for DTLS")
        self.host, self.port = host, port
        self.url = str(Endpoint("dtls", host, port))
        self.context = context
        self.server_hostname = server_hostname or host
        self.datagram_limit = min(mtu - self.ip_header - UDP_HEADER, 65507)
        self.report_mtu = mtu - RECORD_OVERHEAD
        """The MTU to give an encoder so that each report fits one record and datagram."""
        self.queue_limit = queue_limit
        self.handshake_timeout = handshake_timeout
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        _grow_buffer(self.sock, _SO_SNDBUFFORCE, socket.SO_SNDBUF, SEND_BUFFER)
        try:
            if source_port is not None:
                with contextlib.suppress(OSError):  # taken: an ephemeral port will do
                    self.sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", source_port))
            self.sock.connect(addr)
        except OSError as exc:
            self.sock.close()
            raise UsageError(f"cannot reach {self.url}: {exc.strerror}") from None
        self.sock.setblocking(False)
        self.sent = self.bytes = self.dropped = self.undelivered = self.refused = 0
        self.handshakes = self.handshake_failures = 0
        self.server_identity: str | None = None
        self.last_error: str | None = None
        self._queue: deque[bytes] = deque()
        self._conn: Any = None
        self._peer: _Peer | None = None
        self._state = "idle"  # idle -> handshake -> up; or wait (backing off) after a failure
        self._started = 0.0
        self._up_since = 0.0
        self._retry_at = 0.0
        self._failures = 0
        self._closed = False
        self._log = LogBudget(burst=3, window=10.0)

    # -- caller side ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._state == "up"

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, datagrams: list[bytes]) -> None:
        """Queue reports (each at most MAX_RECORD bytes) and send what the session allows."""
        if self._closed:
            raise UsageError("send() after close()")
        queue = self._queue
        for report in datagrams:
            if len(report) > MAX_RECORD:
                raise UsageError(
                    f"a report of {len(report)} bytes does not fit a DTLS record "
                    f"({MAX_RECORD} at most): lower the MTU"
                )
            if len(queue) >= self.queue_limit:
                queue.popleft()
                self.dropped += 1
            queue.append(bytes(report))
        self.poll()

    def poll(self, now: float | None = None) -> None:
        """Read what the collector sent, run handshake timers, send what is queued."""
        if self._closed:
            return
        now = time.monotonic() if now is None else now
        self._read(now)
        if self._state == "wait" and now >= self._retry_at:
            self._state = "idle"
        if self._state == "idle":
            self._start(now)
        elif self._state == "handshake":
            if now - self._started > self.handshake_timeout:
                self._fail("no answer to the DTLS handshake (timed out)", now)
            else:
                timeout = self._conn.DTLSv1_get_timeout()
                if timeout is not None and timeout <= 0:
                    self._conn.DTLSv1_handle_timeout()
                    self._flush_bio()
        if self._state == "up":
            self._send_queue(now)

    def connect(self, timeout: float | None = None) -> None:
        """Wait for a session; HandshakeFailed (one-line reason) if the handshake fails or
        ``timeout`` (default ``handshake_timeout``) passes."""
        deadline = time.monotonic() + (self.handshake_timeout if timeout is None else timeout)
        failures = self.handshake_failures
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            for _ in range(100_000):
                self.poll()
                if self._state == "up":
                    return
                if self.handshake_failures > failures:
                    raise HandshakeFailed(f"DTLS handshake with {self.url}: {self.last_error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sel.select(min(left, 0.05))
        raise HandshakeFailed(f"DTLS handshake with {self.url}: timed out")

    def flush(self, timeout: float = 5.0) -> bool:
        """Send what is queued, waiting up to ``timeout`` s for a session; True if all sent."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            for _ in range(100_000):
                self.poll()
                if not self._queue:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sel.select(min(left, 0.05))
        return not self._queue

    def close(self, timeout: float = 1.0) -> None:
        """Flush for up to ``timeout`` seconds, end the session (close_notify), close."""
        if self._closed:
            return
        if self._queue and timeout > 0:
            self.flush(timeout)
        if self._state == "up":
            with contextlib.suppress(SSL.Error):
                self._conn.shutdown()
            self._flush_bio()
        self._closed = True
        self.undelivered += len(self._queue)
        self._queue.clear()
        self._state = "idle"
        self.sock.close()

    def stats(self) -> dict[str, int | bool]:
        return {
            "sent": self.sent,
            "bytes": self.bytes,
            "dropped": self.dropped,
            "undelivered": self.undelivered,
            "refused": self.refused,
            "handshakes": self.handshakes,
            "handshake_failures": self.handshake_failures,
            "connected": self.connected,
            "queued": len(self._queue),
        }

    def __enter__(self) -> DtlsSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the session ------------------------------------------------------------------------

    def _start(self, now: float) -> None:
        host = self.server_hostname
        self._peer = _Peer(None, hostname=host)
        conn = SSL.Connection(self.context, None)
        conn.set_app_data(self._peer)
        conn.set_connect_state()
        conn.set_ciphertext_mtu(self.datagram_limit)
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            conn.set_tlsext_host_name(host.encode("idna"))  # SNI for names only
        self._conn = conn
        self._state = "handshake"
        self._started = now
        self._handshake(now)

    def _handshake(self, now: float) -> None:
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            self._flush_bio()
            return
        except SSL.Error as exc:
            self._flush_bio()  # our alert, so the collector knows too
            self._fail(self._peer.error if self._peer and self._peer.error else _errors(exc), now)
            return
        self._flush_bio()
        self._state = "up"
        self._up_since = now
        self._failures = 0
        self.handshakes += 1
        self.last_error = None
        self.server_identity = _subject(self._conn)
        level = logging.WARNING if self.handshake_failures or self.handshakes > 1 else logging.INFO
        log.log(level, "DTLS session with %s up (%s)", self.url, self._conn.get_cipher_name())

    def _fail(self, reason: str, now: float) -> None:
        self.handshake_failures += 1
        self._failures += 1
        if reason != self.last_error:
            log.warning("DTLS handshake with %s failed: %s; retrying", self.url, reason)
        self.last_error = reason
        delay = min(self.retry_max, self.retry_initial * 2 ** min(self._failures - 1, 20))
        self._retry_at = now + delay
        self._state = "wait"
        self._conn = None

    def _restart(self, reason: str, now: float) -> None:
        """The collector lost the session: a new handshake now; queued reports wait."""
        self._log.warning("DTLS session with %s: %s; new handshake", self.url, reason)
        self._conn = None
        self._state = "idle"
        self._start(now)

    def _read(self, now: float) -> None:
        for _ in range(_READ_BATCH):
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                self._refused(now)
                return
            except OSError as exc:
                log.debug("DTLS receive from %s: %s", self.url, exc.strerror)
                return
            if self._state == "handshake":
                if data == _UNKNOWN_SESSION:
                    continue  # a late hint about the session we are replacing
                self._conn.bio_write(data)
                self._handshake(now)
            elif self._state == "up":
                self._received(data, now)

    def _received(self, data: bytes, now: float) -> None:
        """A datagram from the collector during a session: a close_notify, a hint that it
        does not know our session (plaintext alert, epoch 0), or nothing of interest."""
        if data[:1] == bytes([_ALERT]) and data[3:5] == b"\0\0":
            if now - self._up_since >= self.retry_initial:  # not for a stale one
                self._restart("the collector does not know the session", now)
            return
        self._conn.bio_write(data)
        for _ in range(_READ_BATCH):
            try:
                self._conn.recv(65536)  # collectors send no data; just let OpenSSL see it
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self._restart("closed by the collector", now)
                return
            except SSL.Error as exc:
                self._restart(_errors(exc), now)
                return

    def _refused(self, now: float) -> None:
        """ICMP port unreachable: nobody listens there now. Retry soon, with a new session."""
        self.refused += 1
        if self._state not in ("up", "handshake"):
            return
        if self._state == "handshake":
            self.handshake_failures += 1
        reason = "collector unreachable (ICMP port unreachable)"
        if reason != self.last_error:
            self._log.warning("DTLS session with %s: %s; retrying", self.url, reason)
        self.last_error = reason
        self._conn = None
        self._state = "wait"
        self._retry_at = now + self.retry_initial

    def _send_queue(self, now: float) -> None:
        conn, queue = self._conn, self._queue
        while queue and self._state == "up":
            report = queue.popleft()
            try:
                conn.send(report)
                record = conn.bio_read(65536)  # one SSL_write of <= MAX_RECORD: one record
            except SSL.Error as exc:
                queue.appendleft(report)
                self._restart(_errors(exc), now)
                return
            if not self._transmit(record, now):
                return

    def _transmit(self, datagram: bytes, now: float) -> bool:
        for _ in range(_SEND_RETRIES):
            try:
                self.sock.send(datagram)
            except ConnectionRefusedError:
                self._refused(now)
                return False
            except OSError as exc:
                if exc.errno not in (errno.ENOBUFS, errno.EAGAIN):
                    raise
                time.sleep(0.0005)  # the local queue is full: let it drain
                continue
            self.sent += 1
            self.bytes += len(datagram)
            return True
        self.dropped += 1
        return True

    def _flush_bio(self) -> None:
        if self._conn is None:
            return
        for datagram in _datagrams(_bio_out(self._conn), self.datagram_limit):
            with contextlib.suppress(OSError):  # flights are retransmitted on timeout
                self.sock.send(datagram)


# -- receiver -------------------------------------------------------------------------------


class _Session:
    __slots__ = ("addr", "conn", "handshaking", "hello", "identity", "last", "peer", "started")

    def __init__(self, conn: Any, peer: _Peer, now: float, hello: bytes) -> None:
        self.conn = conn
        self.hello = hello[13:]  # the ClientHello (with cookie) that opened it, sans header
        self.peer = peer
        self.addr = peer.addr
        self.handshaking = True
        self.identity: str | None = None
        self.started = self.last = now


class DtlsReceiver:
    """A bound, non-blocking UDP socket that terminates DTLS sessions from many senders.

    :meth:`drain` reads what is waiting, answers handshakes, and returns the decrypted
    reports as ``(report, peer_address)``, one per record, like ``UdpReceiver.drain``;
    :meth:`identity` gives the verified client certificate subject of a peer (the producer
    identity). Call :meth:`expire` about every 0.5 s (``drain`` calls it too) so that
    handshake flights are retransmitted and stalled or idle sessions dropped.

    ``allow``: datagrams from other addresses are dropped before anything is parsed and
    counted in ``denied``. Counters in :meth:`stats`.
    """

    def __init__(
        self,
        host: str,
        port: int = DTLS_PORT,
        *,
        context: Any,
        allow: AddressFilter | None = None,
        max_sessions: int = 1024,
        handshake_timeout: float = 10.0,
        idle_timeout: float = 900.0,
        mtu: int = 1500,
    ) -> None:
        _require()
        if max_sessions < 1 or handshake_timeout <= 0 or idle_timeout <= 0:
            raise UsageError("need max_sessions >= 1 and positive timeouts")
        family, addr = resolve(host, port, socket.SOCK_DGRAM, passive=True)
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.buffer = _grow_buffer(self.sock, _SO_RCVBUFFORCE, socket.SO_RCVBUF, RECV_BUFFER)
        try:
            self.sock.bind(addr)
        except OSError as exc:
            self.sock.close()
            raise UsageError(f"cannot listen on dtls {host}:{port}: {exc.strerror}") from None
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()
        ip_header = 40 if family == socket.AF_INET6 else 20
        self.datagram_limit = min(mtu - ip_header - UDP_HEADER, 65507)
        self.context = context
        context.set_options(SSL.OP_COOKIE_EXCHANGE)
        context.set_cookie_generate_callback(_cookie)
        context.set_cookie_verify_callback(_cookie_ok)
        self.allow = allow
        self.max_sessions = max_sessions
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.datagrams = self.records = self.denied = self.cookies = 0
        self.handshakes = self.handshake_failures = self.refused_sessions = 0
        self.replaced = self.idle_closed = self.closed_by_peer = self.stray = self.errors = 0
        self._secret = os.urandom(32)
        self._sessions: dict[Any, _Session] = {}
        self._hinted: dict[Any, float] = {}
        self._next_expire = 0.0
        self._closed = False
        self._log = LogBudget()

    @property
    def sessions(self) -> int:
        """Sessions open now, handshaking ones included."""
        return len(self._sessions)

    def fileno(self) -> int:
        return self.sock.fileno()

    def identity(self, addr: Any) -> str | None:
        """The verified certificate subject of the peer at ``addr`` (None without one)."""
        sess = self._sessions.get(addr)
        return None if sess is None or sess.handshaking else sess.identity

    def drain(self, limit: int = 512) -> list[tuple[bytes, Any]]:
        """Decrypted reports waiting now, from up to ``limit`` datagrams (none blocks)."""
        out: list[tuple[bytes, Any]] = []
        if self._closed:
            return out
        now = time.monotonic()
        recvfrom = self.sock.recvfrom
        allow = self.allow
        for _ in range(limit):
            try:
                data, addr = recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # an ICMP error for an earlier send: nothing to read here
            if allow is not None and not allow.allows(addr):
                self.denied += 1
                continue
            self.datagrams += 1
            self._datagram(data, addr, now, out)
        if now >= self._next_expire:
            self.expire(now)
        return out

    def expire(self, now: float | None = None) -> None:
        """Retransmit handshake flights that are due; drop stalled and idle sessions."""
        now = time.monotonic() if now is None else now
        self._next_expire = now + 0.1
        for sess in list(self._sessions.values()):
            if sess.handshaking:
                if now - sess.started > self.handshake_timeout:
                    self._failed(sess, "timed out")
                    continue
                timeout = sess.conn.DTLSv1_get_timeout()
                if timeout is not None and timeout <= 0:
                    with contextlib.suppress(SSL.Error):
                        sess.conn.DTLSv1_handle_timeout()
                    self._send(sess.conn, sess.addr)
            elif now - sess.last > self.idle_timeout:
                self.idle_closed += 1
                self._drop(sess)
        if len(self._hinted) > 1024:
            self._hinted = {a: t for a, t in self._hinted.items() if now - t < 1.0}

    def stats(self) -> dict[str, int]:
        return {
            "datagrams": self.datagrams,
            "records": self.records,
            "denied": self.denied,
            "cookies": self.cookies,
            "handshakes": self.handshakes,
            "handshake_failures": self.handshake_failures,
            "refused_sessions": self.refused_sessions,
            "replaced": self.replaced,
            "idle_closed": self.idle_closed,
            "closed_by_peer": self.closed_by_peer,
            "stray": self.stray,
            "errors": self.errors,
            "sessions": len(self._sessions),
        }

    def close(self) -> None:
        """Say close_notify to every peer (so it re-handshakes at once) and close."""
        if self._closed:
            return
        self._closed = True
        for sess in list(self._sessions.values()):
            if not sess.handshaking:
                with contextlib.suppress(SSL.Error):
                    sess.conn.shutdown()
                self._send(sess.conn, sess.addr)
        self._sessions.clear()
        self.sock.close()

    def __enter__(self) -> DtlsReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- datagrams --------------------------------------------------------------------------

    def _datagram(self, data: bytes, addr: Any, now: float, out: list) -> None:
        if len(data) < 13:  # not even one record header
            self.stray += 1
            return
        sess = self._sessions.get(addr)
        hello = _is_client_hello(data)
        if hello and sess is not None and sess.handshaking and data[13:] == sess.hello:
            hello = False  # the same ClientHello again: our flight was lost, OpenSSL resends
        if sess is not None and not hello:
            sess.last = now
            self._feed(sess, data, out)
        elif hello:
            self._hello(data, addr, now)
        else:
            self.stray += 1
            if data[0] == _APPLICATION_DATA and data[1:3] == _DTLS12 and data[3:5] != b"\0\0":
                self._hint(addr, now)  # a DTLS 1.2 record of a session we do not know

    def _hint(self, addr: Any, now: float) -> None:
        """Encrypted records from a peer we have no session with (we restarted, or it was
        dropped): tell it, at most once a second. 15 bytes, never more than was received."""
        if now - self._hinted.get(addr, -1e9) < 1.0 or len(self._hinted) >= 4096:
            return  # once a second per peer; and a flood of forged addresses gets nothing
        self._hinted[addr] = now
        with contextlib.suppress(OSError):
            self.sock.sendto(_UNKNOWN_SESSION, addr)

    def _hello(self, data: bytes, addr: Any, now: float) -> None:
        """A ClientHello from a new peer (or a restarted one): stateless cookie first."""
        peer = _Peer(addr, self._secret)
        conn = SSL.Connection(self.context, None)
        conn.set_app_data(peer)
        conn.set_accept_state()
        conn.set_ciphertext_mtu(self.datagram_limit)
        conn.bio_write(data)
        try:
            conn.DTLSv1_listen()
        except SSL.WantReadError:
            self.cookies += 1
            self._send(conn, addr)  # a HelloVerifyRequest, smaller than the ClientHello
            return
        except SSL.Error as exc:
            self.errors += 1
            self._log.warning("bad ClientHello from %s: %s", _name(addr), _errors(exc))
            return
        # the peer receives at its address: now it may cost us state
        old = self._sessions.pop(addr, None)
        if old is not None:
            self.replaced += 1
            log.info("DTLS peer %s starts a new session", _name(addr))
        if len(self._sessions) >= self.max_sessions:
            self.expire(now)
        if len(self._sessions) >= self.max_sessions:
            self.refused_sessions += 1
            self._log.warning(
                "refusing DTLS session from %s: %d sessions open (max_sessions)",
                _name(addr),
                len(self._sessions),
            )
            return
        sess = _Session(conn, peer, now, data)
        self._sessions[addr] = sess
        self._handshake(sess)

    def _handshake(self, sess: _Session) -> None:
        try:
            sess.conn.do_handshake()
        except SSL.WantReadError:
            self._send(sess.conn, sess.addr)
            return
        except SSL.Error as exc:
            self._send(sess.conn, sess.addr)  # the alert: tell the peer why
            self._failed(sess, sess.peer.error or _errors(exc))
            return
        self._send(sess.conn, sess.addr)
        sess.handshaking = False
        sess.identity = _subject(sess.conn)
        self.handshakes += 1
        log.info(
            "DTLS session from %s: %s",
            _name(sess.addr),
            sess.identity or "no client certificate",
        )

    def _failed(self, sess: _Session, reason: str) -> None:
        self.handshake_failures += 1
        self._log.warning("DTLS handshake from %s failed: %s", _name(sess.addr), reason)
        self._drop(sess)

    def _drop(self, sess: _Session) -> None:
        if self._sessions.get(sess.addr) is sess:
            del self._sessions[sess.addr]

    def _feed(self, sess: _Session, data: bytes, out: list) -> None:
        conn = sess.conn
        conn.bio_write(data)
        if sess.handshaking:
            self._handshake(sess)
            if sess.handshaking or self._sessions.get(sess.addr) is not sess:
                return
        addr = sess.addr
        for _ in range(_count_records(data)):  # no more reads than records: no WantRead
            try:
                report = conn.recv(65536)
            except SSL.WantReadError:
                break  # a record OpenSSL dropped (replayed, or not authentic)
            except SSL.ZeroReturnError:  # close_notify
                self.closed_by_peer += 1
                log.debug("DTLS session from %s closed by peer", _name(addr))
                self._drop(sess)
                return
            except SSL.Error as exc:
                self.errors += 1
                self._send(conn, addr)
                self._log.warning("DTLS session from %s ended: %s", _name(addr), _errors(exc))
                self._drop(sess)
                return
            self.records += 1
            out.append((report, addr))
        if data[0] != _APPLICATION_DATA:  # e.g. the peer resent its last flight: answer it
            self._send(conn, addr)

    def _send(self, conn: Any, addr: Any) -> None:
        for datagram in _datagrams(_bio_out(conn), self.datagram_limit):
            try:
                self.sock.sendto(datagram, addr)
            except OSError as exc:
                log.debug("DTLS send to %s: %s", _name(addr), exc.strerror)
