"""TCP stream sockets for format-B reports: a reconnecting sender and a selector-driven listener.

Format-B messages go back to back on one stream, each framed by its own length field, so
TCP needs no extra framing. What it does need is care at the edges:

* The sender must outlive its collector. A background thread owns the connection, writes
  coalesced batches and, when the collector goes away, reconnects with exponential backoff
  and jitter while :meth:`TcpSender.send` keeps queueing (bounded). HEP has no
  acknowledgements, so delivery is at-least-once for a batch whose write *failed* (it is
  re-sent on the next connection; the receiver's per-stream sequence numbers flag any
  duplicates) and best-effort for bytes the kernel had already accepted when the peer died
  (they vanish without notice and show up as a sequence gap at the receiver).
* The listener faces the network: a peer that sends garbage, stalls, floods or opens
  thousands of connections must cost one connection, never the collector. It is
  non-blocking and driven by the caller's :mod:`selectors` loop, like ``UdpReceiver``.

Both take an optional :class:`ssl.SSLContext` (built by :mod:`stm.transport.tls`) for TLS
and mutual TLS; the listener also takes an allowlist (:mod:`stm.transport.allow`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, Protocol

from stm.errors import ProtocolError, UsageError
from stm.logbudget import LogBudget
from stm.transport.allow import AddressFilter
from stm.transport.listen import Accepting, listening_socket
from stm.transport.sendqueue import QueueingSender
from stm.transport.text import cause, peer_name
from stm.transport.url import Endpoint, resolve

__all__ = ["BATCH_BYTES", "READ_SIZE", "Framer", "TcpListener", "TcpSender"]

log = logging.getLogger("stm")

BATCH_BYTES = 256 << 10
"""Messages joined into one write: few syscalls for many small messages."""
READ_SIZE = 256 << 10
"""Bytes read from one connection per readiness, so one busy peer cannot starve the rest."""
_IO_SLICE = 0.2
"""Longest a sender-thread socket call blocks before it looks at the stop flag again."""
_IDLE_CHECK = 0.5
"""How often an idle sender checks that its collector is still there."""
_CONNECT_PENDING = {errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, errno.EALREADY}

Policy = Literal["drop-oldest", "block"]
POLICIES: tuple[str, ...] = ("drop-oldest", "block")


class Framer(Protocol):
    """What the listener needs from a stream framer (``stm.tlv.TlvFramer`` is one).

    ``next_message`` raises :class:`~stm.errors.ProtocolError` on bad input. If the framer
    has a ``failed`` attribute and it is False afterwards, only that message was bad and the
    stream goes on; otherwise the connection is closed. An optional ``buffered`` attribute
    (bytes held for an incomplete message) lets the listener enforce ``max_buffer``.
    """

    def receive_data(self, data: bytes) -> None: ...

    def next_message(self) -> Any: ...


class TcpSender(QueueingSender):
    """Streams messages to one collector from a background thread that owns the connection.

    :meth:`send` only queues, so a slow or absent collector never stalls the capture path
    (unless ``policy="block"`` asks for exactly that). Counters, see :meth:`stats`: a message
    is ``sent`` once the kernel accepted its bytes; ``dropped`` when drop-oldest discarded it
    from a full queue; ``undelivered`` when it was still queued (or being retried) at close.
    After :meth:`close`, ``sent + dropped + undelivered`` equals the messages given to send.

    A batch whose write fails is re-sent whole on the next connection (at-least-once): part
    of it may have reached the collector, which then sees duplicates and detects them by
    sequence number. Nothing more can be done without acknowledgements, which HEP lacks.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        queue_limit: int = 10000,
        policy: Policy = "drop-oldest",
        connect_timeout: float = 5.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise UsageError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        if not isinstance(queue_limit, int) or queue_limit < 1:
            raise UsageError(f"queue_limit must be a positive int, not {queue_limit!r}")
        if connect_timeout <= 0 or backoff_initial <= 0 or backoff_max < backoff_initial:
            raise UsageError("need connect_timeout > 0 and 0 < backoff_initial <= backoff_max")
        family, _ = resolve(host, port, socket.SOCK_STREAM)
        self.host = host
        self.port = port
        self.url = str(Endpoint("tls" if ssl_context is not None else "tcp", host, port))
        self.ip_header = 40 if family == socket.AF_INET6 else 20
        self.queue_limit = queue_limit
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.sent = 0
        self.bytes = 0
        self.dropped = 0
        self.undelivered = 0
        self.reconnects = 0
        self.resent = 0
        self.connected = False
        self.last_error: str | None = None
        """Why the last connection attempt failed (one line), None once connected."""
        self._connects = 0
        self._lock = threading.Lock()
        self._nonempty = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)
        self._queue: deque[bytes] = deque()
        self._inflight: list[bytes] = []  # taken from the queue, not yet written whole
        self._closing = False
        self._finished = False  # the thread has left its loop
        self._finalized = False  # close() has done the books; the thread must not count
        self._stop = threading.Event()  # hard stop: give up on what is left
        self._thread = threading.Thread(
            target=self._run, name=f"stm tcp sender {self.url}", daemon=True
        )
        self._thread.start()

    # -- caller side ----------------------------------------------------------------------

    def send(self, messages: list[bytes]) -> None:
        """Queue messages for the thread; with a full queue drop the oldest, or wait for room."""
        with self._lock:
            if self._closing:
                raise UsageError("send() after close()")
            if not self._enqueue(messages, _IDLE_CHECK):
                return
            queue = self._queue
            if self._finished and not self._finalized:
                # the thread died (a bug, logged): keep the books straight, do not pile up
                self.undelivered += len(queue)
                queue.clear()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued for up to ``timeout`` seconds, then stop the thread."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._nonempty.notify_all()
            self._room.notify_all()
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            self._stop.set()
            with self._lock:
                self._nonempty.notify_all()
            # every blocking call in the thread is bounded by connect_timeout or _IO_SLICE
            self._thread.join(self.connect_timeout + 2 * _IO_SLICE)
            if self._thread.is_alive():
                log.warning("tcp sender to %s did not stop in time", self.url)
        with self._lock:
            self._finalize()

    def stats(self) -> dict[str, int | bool]:
        """Counters, safe to read at any time.

        ``reconnects`` counts connections after the first; ``resent`` the messages written
        again after a failed write (the receiver may see up to that many duplicates);
        ``queued`` what waits now, including a batch being retried.
        """
        with self._lock:
            return {
                "sent": self.sent,
                "bytes": self.bytes,
                "dropped": self.dropped,
                "undelivered": self.undelivered,
                "reconnects": self.reconnects,
                "resent": self.resent,
                "connected": self.connected,
                "queued": len(self._queue) + len(self._inflight),
            }

    def __enter__(self) -> TcpSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _finalize(self) -> None:
        """Count whatever was not written as undelivered, once (lock held)."""
        if self._finalized:
            return
        self._finalized = True
        self.undelivered += len(self._queue) + len(self._inflight)
        self._queue.clear()
        self._inflight = []
        self.connected = False
        self._room.notify_all()

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        sock: socket.socket | None = None
        probe: selectors.BaseSelector | None = None
        failures = 0  # connect attempts or connections in a row that made no progress
        failing = False  # logged "cannot connect" already: stay quiet until it works
        write_failed = False  # part of the in-flight batch may have reached the old peer
        try:
            while not self._stop.is_set():
                with self._lock:
                    if self._closing and not self._queue and not self._inflight:
                        break
                if sock is None:
                    try:
                        sock = self._connect()
                    except OSError as exc:
                        failures += 1
                        delay = self._backoff(failures)
                        self.last_error = cause(exc)
                        if not failing:
                            log.warning(
                                "cannot connect to %s: %s; retrying with backoff up to %.1f s",
                                self.url,
                                cause(exc),
                                self.backoff_max,
                            )
                            failing = True
                        else:
                            log.debug("connect to %s: %s", self.url, cause(exc))
                        self._stop.wait(delay)
                        continue
                    probe = selectors.DefaultSelector()
                    probe.register(sock, selectors.EVENT_READ)
                    with self._lock:
                        self.connected = True
                        self.last_error = None
                        self._connects += 1
                        self.reconnects = self._connects - 1
                        retry = len(self._inflight) if write_failed else 0
                        self.resent += retry
                    if retry:
                        log.debug("re-sending %d message(s) whose write failed", retry)
                    write_failed = False
                    # a recovery is logged at the level of the failure it ends
                    level = logging.WARNING if failing or self._connects > 1 else logging.INFO
                    again = " again" if self._connects > 1 else ""
                    log.log(level, "connected to %s%s", self.url, again)
                    failing = False
                assert probe is not None
                data = self._next_batch()
                gone = self._peer_gone(sock, probe)
                if gone is None and data:
                    try:
                        written = self._write(sock, data)
                    except OSError as exc:
                        gone = cause(exc)
                        write_failed = True
                    else:
                        if not written:
                            break  # hard stop mid-write
                        failures = 0
                        with self._lock:
                            if not self._finalized:
                                self.sent += len(self._inflight)
                                self.bytes += len(data)
                            self._inflight = []
                if gone is not None:
                    log.warning("lost connection to %s: %s; reconnecting", self.url, gone)
                    probe.close()
                    probe = None
                    sock.close()
                    sock = None
                    with self._lock:
                        self.connected = False
                    if failures:  # the last connection achieved nothing: do not spin
                        self._stop.wait(self._backoff(failures))
                    failures += 1
        except Exception:
            log.exception("tcp sender to %s stopped", self.url)
        finally:
            if probe is not None:
                probe.close()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
            with self._lock:
                self._finished = True
                self.connected = False
                self._room.notify_all()
                if self._stop.is_set() or self._closing:
                    self._finalize()

    def _backoff(self, failures: int) -> float:
        """Exponential delay with jitter, so a fleet of senders does not reconnect in step."""
        delay = min(self.backoff_max, self.backoff_initial * 2 ** min(failures - 1, 30))
        return delay * random.uniform(0.5, 1.0)

    def _connect(self) -> socket.socket:
        """A connected socket to the first address that answers; OSError if none does."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise OSError(exc.errno, f"cannot resolve {self.host!r}: {exc.strerror}") from None
        last: OSError = OSError(errno.EHOSTUNREACH, "no address")
        for family, stype, proto, _, addr in infos:
            sock = socket.socket(family, stype, proto)
            try:
                self._connect_one(sock, addr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # we batch already
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                if self.ssl_context is not None:
                    sock.settimeout(self.connect_timeout)
                    hostname = self.server_hostname or self.host
                    sock = self.ssl_context.wrap_socket(sock, server_hostname=hostname)
                sock.settimeout(_IO_SLICE)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
        raise last

    def _connect_one(self, sock: socket.socket, addr: tuple) -> None:
        """Non-blocking connect, waited for in slices so close() is never held up long."""
        sock.setblocking(False)
        err = sock.connect_ex(addr)
        if err in _CONNECT_PENDING:
            deadline = time.monotonic() + self.connect_timeout
            with selectors.DefaultSelector() as sel:
                sel.register(sock, selectors.EVENT_WRITE)
                while not sel.select(min(_IO_SLICE, max(0.0, deadline - time.monotonic()))):
                    if self._stop.is_set() or time.monotonic() >= deadline:
                        raise TimeoutError(errno.ETIMEDOUT, "timed out")
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))

    def _next_batch(self) -> bytes:
        """The batch to write: the one that failed last time, else up to BATCH_BYTES queued."""
        with self._lock:
            if not self._inflight:
                if not self._queue and not self._closing:
                    self._nonempty.wait(_IDLE_CHECK)
                queue = self._queue
                batch: list[bytes] = []
                size = 0
                while queue and size < BATCH_BYTES:
                    message = queue.popleft()
                    batch.append(message)
                    size += len(message)
                self._inflight = batch
                if batch:
                    self._room.notify_all()
            return b"".join(self._inflight)

    def _peer_gone(self, sock: socket.socket, probe: selectors.BaseSelector) -> str | None:
        """Why the collector is gone, or None. Collectors never write, so readable means EOF.

        Checked before each write: after the peer closed, the first write would still be
        accepted by the kernel and silently lost; this catches a clean close in time.
        """
        if not probe.select(0):
            return None
        sock.setblocking(False)
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None  # e.g. a TLS session ticket, no application data
        except OSError as exc:
            return cause(exc)
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(_IO_SLICE)
        return None if data else "closed by peer"

    def _write(self, sock: socket.socket, data: bytes) -> bool:
        """Write all of ``data``; False if stopped first. ``send`` in timed slices rather
        than ``sendall``, because a timed-out sendall loses track of how much it wrote."""
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._stop.is_set():
                return False
            try:
                pos += sock.send(view[pos:])
            except TimeoutError:
                continue  # collector is slow (zero window): keep waiting, unless stopped
        return True


class _Connection:
    __slots__ = (
        "closed",
        "events",
        "fd",
        "framer",
        "handshaking",
        "identity",
        "opened",
        "peer",
        "sock",
    )

    def __init__(self, sock: socket.socket, peer: Any, framer: Framer, tls: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.framer = framer
        self.handshaking = tls
        self.identity: str | None = None  # the verified client certificate's subject
        self.opened = time.monotonic()
        self.events = selectors.EVENT_READ
        self.closed = False


class TcpListener(Accepting):
    """A non-blocking listening socket whose connections are served from the caller's loop.

    Call :meth:`register` with the loop's selector, then :meth:`handle` for every ready key
    whose ``data`` is this listener. Each connection gets its own framer; every complete
    message goes to ``on_message(message, peer_address)``; ``on_close(peer_address,
    reason)`` (reason None for a clean end) follows the end of each connection.

    Counters: ``connections`` accepted (including those refused for max_connections),
    ``active``, ``rejected_connections`` (bad framing, buffer limit, TLS failure, over
    max_connections), ``truncated_streams`` (peer closed inside a message), ``malformed``
    (bad messages skipped on a stream that went on), ``messages``, ``bytes`` received.

    TLS (``ssl_context``, see :mod:`stm.transport.tls`): the handshake runs non-blocking in
    the same loop; a failed one (no, untrusted or expired client certificate, a plain-TCP
    client) counts in ``tls_failures`` as well as ``rejected_connections``, and so does one
    not finished within ``handshake_timeout`` seconds (checked whenever a connection is
    accepted, and by :meth:`expire`). :meth:`peer_identity` gives the verified client
    certificate's subject of a connection, e.g. from ``on_message``.

    ``allow`` (an :class:`~stm.transport.allow.AddressFilter`): connections from other
    addresses are closed on accept, before any byte is read, and counted in ``denied``
    (and in the filter's own counter); the default allows every address.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        framer_factory: Callable[[], Framer],
        on_message: Callable[[Any, Any], None],
        on_close: Callable[[Any, str | None], None] | None = None,
        max_connections: int = 1024,
        max_buffer: int = 1 << 20,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 128,
        allow: AddressFilter | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        if max_connections < 1 or max_buffer < 1:
            raise UsageError("max_connections and max_buffer must be positive")
        if handshake_timeout <= 0:
            raise UsageError("handshake_timeout must be positive")
        sock = listening_socket(host, port, backlog)
        self.sock = sock
        self.address = sock.getsockname()
        self.framer_factory = framer_factory
        self.on_message = on_message
        self.on_close = on_close
        self.on_messages: Callable[[list, Any], None] | None = None
        """Optional: takes every complete message of one read at once (a batch decoder);
        set after construction. Messages it takes do not go to ``on_message``."""
        self.max_connections = max_connections
        self.max_buffer = max_buffer
        self.ssl_context = ssl_context
        self.allow = allow
        self.handshake_timeout = handshake_timeout
        self.connections = 0
        self.denied = 0
        self.tls_failures = 0
        self.rejected_connections = 0
        self.truncated_streams = 0
        self.malformed = 0
        self.messages = 0
        self.bytes = 0
        self._conns: dict[int, _Connection] = {}
        self._by_peer: dict[Any, _Connection] = {}
        self._selector: selectors.BaseSelector | None = None
        self._closed = False
        self._log = LogBudget()
        # A spare descriptor, given up to accept-and-close a connection when we run out:
        # otherwise the listening socket stays readable and the caller's loop spins.
        self._spare: int | None = self._open_spare()

    @property
    def active(self) -> int:
        """Connections open now."""
        return len(self._conns)

    def peer_identity(self, peer: Any) -> str | None:
        """The verified client certificate subject (RFC 4514, ``CN=...``) of the open
        connection from ``peer``; None without TLS, without a client certificate, or once
        that connection is closed."""
        conn = self._by_peer.get(peer)
        return None if conn is None else conn.identity

    def expire(self, now: float | None = None) -> int:
        """Close TLS connections whose handshake is older than ``handshake_timeout``
        (counted as TLS failures); returns how many. Cheap: call it from a periodic tick."""
        if self.ssl_context is None or self._closed:
            return 0
        limit = (time.monotonic() if now is None else now) - self.handshake_timeout
        stale = [c for c in self._conns.values() if c.handshaking and c.opened <= limit]
        for conn in stale:
            self.tls_failures += 1
            self._reject(conn, "TLS handshake failed: timed out")
        return len(stale)

    def _serve(self, key: selectors.SelectorKey, mask: int) -> None:
        conn = self._conns.get(key.fd)
        if conn is None or conn.sock is not key.fileobj:
            return  # closed earlier in the same select() round
        if conn.handshaking:
            self._handshake(conn)
        if not conn.handshaking and not conn.closed:
            self._read(conn)

    def close(self) -> None:
        """Close every connection (stalled ones included) and the listening socket."""
        if self._closed:
            return
        self._closed = True
        # the listening socket first: a sender reconnecting at once must be refused, not
        # accepted into a backlog that is about to be reset
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self.sock)
        self.sock.close()
        for conn in list(self._conns.values()):
            if getattr(conn.framer, "buffered", 0):
                log.debug("closing connection from %s mid-message", peer_name(conn.peer))
            self._close_conn(conn, "listener closed")
        self._close_spare()

    def __enter__(self) -> TcpListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- accepting ------------------------------------------------------------------------

    def _active(self) -> int:
        return len(self._conns)

    def _make_room(self) -> None:
        self.expire()  # stalled TLS handshakes must not keep producers out

    def _admit(self, sock: socket.socket, peer: Any) -> None:
        conn = _Connection(sock, peer, self.framer_factory(), self.ssl_context is not None)
        self._conns[conn.fd] = conn
        self._by_peer[peer] = conn
        assert self._selector is not None  # handle() comes from the selector it registered with
        self._selector.register(sock, conn.events, self)
        log.debug("connection from %s", peer_name(peer))

    # -- serving --------------------------------------------------------------------------

    def _handshake(self, conn: _Connection) -> None:
        if not self._tls_step(conn):
            return
        log.debug(
            "TLS connection from %s: %s, client %s",
            peer_name(conn.peer),
            conn.sock.version(),
            conn.identity or "without a certificate",
        )
        self._watch(conn, selectors.EVENT_READ)

    def _recv(self, conn: _Connection) -> tuple[bytes, bool] | None:
        """(data, end of stream) read now, or None if nothing was there after all."""
        sock = conn.sock
        chunks: list[bytes] = []
        try:
            chunk = sock.recv(READ_SIZE)
            chunks.append(chunk)
            # TLS may hold decrypted bytes the selector cannot see: take them now (one
            # record at most, so this stays bounded).
            while chunk and isinstance(sock, ssl.SSLSocket) and sock.pending():
                chunk = sock.recv(sock.pending())
                chunks.append(chunk)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            if not chunks:
                return None
        return b"".join(chunks), not chunks[-1]

    def _read(self, conn: _Connection) -> None:
        try:
            got = self._recv(conn)
        except OSError as exc:  # reset by peer and the like
            if getattr(conn.framer, "buffered", 0):
                self._truncated(conn, cause(exc))
            else:
                log.debug("connection from %s ended: %s", peer_name(conn.peer), cause(exc))
                self._close_conn(conn, cause(exc))
            return
        if got is None:
            return
        data, eof = got
        if data:
            self.bytes += len(data)
            try:
                conn.framer.receive_data(data)
            except ProtocolError as exc:
                self._reject(conn, str(exc))
                return
            if not self._drain(conn, len(data) + 1, eof=False):
                return
            buffered = getattr(conn.framer, "buffered", 0)
            if buffered > self.max_buffer:
                self._reject(
                    conn,
                    f"{buffered} bytes buffered without a complete message "
                    f"(max_buffer {self.max_buffer})",
                )
                return
        if eof:
            self._end(conn)

    def _drain(self, conn: _Connection, budget: int, *, eof: bool) -> bool:
        """Deliver every complete message; False if the connection was closed meanwhile.

        ``budget`` bounds the loop: a framer that keeps its contract returns fewer
        messages than it was given bytes, so a runaway framer cannot hang the caller's loop.
        """
        framer = conn.framer
        take_all = getattr(framer, "next_messages", None)
        if take_all is not None and self.on_messages is not None:
            try:
                messages = take_all()
            except ProtocolError:
                messages = []  # the loop below meets the error again and deals with it
            if messages:
                self.messages += len(messages)
                self.on_messages(messages, conn.peer)
                if conn.closed:
                    return False
        for _ in range(budget):
            try:
                message = framer.next_message()
            except ProtocolError as exc:
                if not getattr(framer, "failed", True):
                    self.malformed += 1
                    self._log.warning("malformed message from %s: %s", peer_name(conn.peer), exc)
                    continue
                if eof:
                    self._truncated(conn, str(exc))
                else:
                    self._reject(conn, str(exc))
                return False
            if message is None:
                return True
            self.messages += 1
            self.on_message(message, conn.peer)
            if conn.closed:  # on_message closed the listener
                return False
        self._reject(conn, "framer returned more messages than bytes received")
        return False

    def _end(self, conn: _Connection) -> None:
        """The peer closed its side: fine between messages, truncation inside one."""
        try:
            conn.framer.receive_data(b"")
        except ProtocolError as exc:
            self._truncated(conn, str(exc))
            return
        if not self._drain(conn, 2, eof=True):
            return
        left = getattr(conn.framer, "buffered", 0)
        if left:
            self._truncated(conn, f"stream ended inside a message ({left} bytes buffered)")
            return
        log.debug("connection from %s closed by peer", peer_name(conn.peer))
        self._close_conn(conn, None)

    def _reject(self, conn: _Connection, reason: str) -> None:
        self.rejected_connections += 1
        self._log.warning("closing connection from %s: %s", peer_name(conn.peer), reason)
        self._close_conn(conn, reason)

    def _truncated(self, conn: _Connection, reason: str) -> None:
        self.truncated_streams += 1
        self._log.warning("closing connection from %s: %s", peer_name(conn.peer), reason)
        self._close_conn(conn, reason)

    def _close_conn(self, conn: _Connection, reason: str | None) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.fd, None)
        if self._by_peer.get(conn.peer) is conn:
            del self._by_peer[conn.peer]
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()
        if self.on_close is not None:
            self.on_close(conn.peer, reason)
