"""STM reports over WebSocket (RFC 6455), as 3GPP management data streaming carries them.

The producer (stm-send) is the WebSocket client, the consumer (stm-recv) the server; every
binary data frame carries exactly one report, the bytes a UDP datagram would carry, so the
decoders, loss accounting and output are those of UDP and TCP. How a connection is
established is :mod:`stm.streaming`'s business (TS 28.532's REST resources, or the seed's
streamInfoList Ping); this module does the I/O, with the `websockets` library's sans-IO
protocol (``ClientProtocol``, ``ServerProtocol``) for the handshake and the frames and h11
for the REST requests, so the consumer runs in stm-recv's selector loop like a TCP listener.

Delivery: a Ping after every batch, answered by the consumer only once the reports before
it went through the decoder, acknowledges them; the sender counts a report ``sent`` when
it is acknowledged, and after a lost connection writes the unacknowledged ones again on
the next (at least once: the decoder drops duplicates by sequence number). So a receiver
restart loses nothing the sender accepted; what is left at the end counts as undelivered.
websockets answers every Ping as it parses it; the consumer takes those automatic Pongs
out of what it writes and sends its own once the reports before the Ping are decoded.

* :class:`WsSender`: a background thread owns the connection, like
  :class:`~stm.transport.tcp.TcpSender` (bounded queue, block or drop-oldest, reconnect
  with backoff and jitter, the streams established again after every reconnect).
* :class:`WsReceiver`: a listening socket whose connections (TLS, HTTP, REST, WebSocket)
  are served from the caller's selector loop, in the shape of
  :class:`~stm.transport.tcp.TcpListener` (``register``, ``handle``, ``expire``); the
  reports of each read go to ``on_reports`` at once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import random
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from stm import accel
from stm.errors import ProtocolError, StmError, UsageError
from stm.logbudget import LogBudget
from stm.streaming import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED,
    MAX_BODY,
    MAX_MESSAGE,
    PROCEDURES,
    Registry,
    Response,
    Session,
    StreamInfo,
    connection_request,
    encode_ping,
    is_stream_ping,
    refusal,
)
from stm.transport.allow import AddressFilter
from stm.transport.listen import Accepting, listening_socket
from stm.transport.sendqueue import QueueingSender
from stm.transport.text import cause, peer_name
from stm.transport.url import Endpoint, resolve

try:  # optional: pip install 'stm[websocket]'
    import h11
    from websockets.client import ClientProtocol
    from websockets.datastructures import Headers
    from websockets.exceptions import InvalidState, InvalidStatus, PayloadTooBig
    from websockets.frames import Opcode
    from websockets.http11 import Request as WsRequest
    from websockets.protocol import State
    from websockets.server import ServerProtocol
    from websockets.uri import parse_uri
except ImportError:  # pragma: no cover - exercised only without the extra
    h11 = None  # type: ignore[assignment]

__all__ = ["Refused", "WsReceiver", "WsSender"]

log = logging.getLogger("stm")

BATCH_BYTES = 256 << 10
"""Reports framed and written at once (then a Ping asks for their acknowledgement)."""
WINDOW = 960
"""Reports written and not yet acknowledged, at most: inside the decoder's duplicate window
of 1,024, so what is written again after a reconnect is recognised as such."""
READ_SIZE = 256 << 10
MAX_OUT = 1 << 20
"""Bytes the receiver holds for a peer that does not read its Pongs and responses."""
_IO_SLICE = 0.2
PING_EVERY = 64
"""Reports written between two acknowledgement Pings, at most."""
PING_AFTER = 0.02
"""Seconds an idle sender waits before it asks for the acknowledgement of the last ones."""
_ACK = struct.Struct("!Q")
_PONG = b"\x8a"
"""First byte of a server's Pong frame (FIN, opcode 10; a server does not mask)."""
_EOF = b""
"""What websockets' ``data_to_send()`` gives for "half-close the TCP connection now"."""
_WS_LOG = logging.getLogger("stm.websockets")
_WS_LOG.setLevel(logging.WARNING)  # its per-connection INFO lines are ours to write


def _need_websockets() -> None:
    if h11 is None:
        raise UsageError("ws:// and wss:// need websockets and h11: pip install 'stm[websocket]'")


def _host_header(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _give(ws, data: bytes) -> None:
    """What a read brought to a websockets protocol: ``b""`` is the peer's end of stream."""
    if data:
        ws.receive_data(data)
    else:
        ws.receive_eof()


def _short(reason: str) -> str:
    """A Close reason that fits a control frame (125 bytes with the 2-byte code)."""
    return reason.encode()[:120].decode("utf-8", "ignore")


class Refused(StmError):
    """The consumer refused the streams: a 4xx to the POST or the Upgrade, or a Close (or
    silence) instead of the Pong to the streamInfoList. One line, for the user."""


# == the producer ==============================================================================


class _Link:
    """One established WebSocket connection of the sender: a blocking socket (with a short
    timeout) and its websockets protocol. Not thread-safe: the sender's thread owns it."""

    def __init__(self, sock: socket.socket, ws: ClientProtocol, connection: str | None) -> None:
        self.sock = sock
        self.ws = ws
        self.connection = connection
        self.written = 0  # reports written on this connection
        self.acked = 0  # ... of which the consumer acknowledged
        self.pinged = 0  # ... up to which a Ping asked for an acknowledgement
        self.ping_time = 0.0
        self.closed_by: str | None = None
        self._ext = accel.ext

    def events(self, timeout: float) -> str | None:
        """Read what the consumer sent (waiting up to ``timeout``), answer its Pings, note
        acknowledgements; why the connection is over, or None."""
        if self.closed_by is not None:
            return self.closed_by
        sock, ws = self.sock, self.ws
        try:
            sock.settimeout(timeout)
            data = sock.recv(READ_SIZE)
            if isinstance(sock, ssl.SSLSocket):
                while data and sock.pending():
                    data += sock.recv(sock.pending())
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except OSError as exc:
            self.closed_by = cause(exc)
            return self.closed_by
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(_IO_SLICE)
        _give(ws, data)
        for frame in ws.events_received():
            if frame.opcode is Opcode.PONG:
                if len(frame.data) == _ACK.size:
                    self.acked = max(self.acked, _ACK.unpack(frame.data)[0])
            elif frame.opcode is Opcode.CLOSE:  # websockets keeps it parsed as close_rcvd
                close = ws.close_rcvd
                self.closed_by = f"closed by the consumer: {close.code} {close.reason}".rstrip()
        out = b"".join(ws.data_to_send())  # Pongs to its Pings, the echo of its Close
        if out:
            with contextlib.suppress(OSError):
                sock.sendall(out)
        if self.closed_by is None and ws.parser_exc is not None:
            self.closed_by = (
                "connection closed by the consumer"
                if isinstance(ws.parser_exc, EOFError)
                else f"protocol error: {ws.parser_exc}"
            )
        return self.closed_by

    def frames(self, reports: list[bytes]) -> bytes:
        ws = self.ws
        if self._ext is not None and ws.state is State.OPEN:
            blob = self._ext.ws_client_frames(reports)  # what send_binary writes, compiled
            if blob is not None:
                return blob
        send = ws.send_binary
        for r in reports:
            send(r)
        return b"".join(ws.data_to_send())

    def ping(self) -> bytes:
        """An acknowledgement request: the consumer answers it once everything written
        before it went through its decoder."""
        self.ws.send_ping(_ACK.pack(self.written))
        return b"".join(self.ws.data_to_send())

    def terminate(self, code: int, reason: str, wait: float) -> None:
        """terminateStreamingConnection: our Close, then the consumer's echo (up to
        ``wait`` seconds), then the socket goes."""
        try:
            if self.closed_by is None:
                self.ws.send_close(code, reason)
                self.sock.sendall(b"".join(self.ws.data_to_send()))
                deadline = time.monotonic() + wait
                while self.closed_by is None and time.monotonic() < deadline:
                    self.events(min(_IO_SLICE, max(0.0, deadline - time.monotonic())))
        except (OSError, InvalidState):
            pass
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()


class WsSender(QueueingSender):
    """Sends reports to one consumer over WebSocket, from a thread that owns the connection.

    ``endpoint``: a ``ws://`` or ``wss://`` :class:`~stm.transport.url.Endpoint` (its path is
    where the consumer's resources are). ``streams``: what the connection carries
    (:meth:`StreamInfo.stm`), announced by ``procedure`` (``ts28532`` or ``seed``) on every
    connection. The queue and its ``policy`` behave as :class:`~stm.transport.tcp.TcpSender`'s.

    Counters (:meth:`stats`): ``sent`` reports acknowledged by the consumer, ``dropped``
    (drop-oldest), ``undelivered`` (queued or unacknowledged at close), ``resent`` (written
    again after a lost connection), ``reconnects``. After :meth:`close`, ``sent + dropped +
    undelivered`` is what was given to :meth:`send`.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        producer: str,
        streams: list[StreamInfo],
        procedure: str = "ts28532",
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        queue_limit: int = 10000,
        policy: str = "block",
        connect_timeout: float = 5.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
    ) -> None:
        _need_websockets()
        if procedure not in PROCEDURES:
            raise UsageError(f"procedure must be one of {', '.join(PROCEDURES)}")
        if policy not in ("block", "drop-oldest"):
            raise UsageError(f"policy must be block or drop-oldest, not {policy!r}")
        if queue_limit < 1 or connect_timeout <= 0 or not 0 < backoff_initial <= backoff_max:
            raise UsageError("need queue_limit >= 1, connect_timeout > 0, 0 < backoff <= max")
        if (endpoint.scheme == "wss") != (ssl_context is not None):
            raise UsageError("wss:// needs a TLS context, ws:// none")
        family, _ = resolve(endpoint.host, endpoint.port, socket.SOCK_STREAM)
        self.endpoint = endpoint
        self.url = str(endpoint)
        self.ip_header = 40 if family == socket.AF_INET6 else 20
        self.producer = producer
        self.streams = list(streams)
        self.procedure = procedure
        self.ping_payload = encode_ping(producer, streams) if procedure == "seed" else b""
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or endpoint.host
        self.queue_limit = queue_limit
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.base = endpoint.path.rstrip("/")
        self.sent = self.bytes = self.dropped = self.undelivered = 0
        self.resent = self.reconnects = 0
        self.connected = False
        self.connection: str | None = None
        """The consumer's connection ID (a URI) under TS 28.532; None otherwise."""
        self.last_error: str | None = None
        self._connects = 0
        self._lock = threading.Lock()
        self._nonempty = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)
        self._queue: deque[bytes] = deque()
        self._unacked: deque[bytes] = deque()
        self._closing = False
        self._finished = False
        self._finalized = False
        self._stop = threading.Event()
        self._first = threading.Event()
        self._first_refusal: str | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"stm ws sender {self.url}", daemon=True
        )
        self._thread.start()

    # -- caller side ----------------------------------------------------------------------

    def connect(self, timeout: float | None = None) -> None:
        """Wait for the first attempt: raise :class:`Refused` if the consumer refused the
        streams (a 4xx, a Close instead of the Pong); return once connected, or once the
        consumer proved unreachable (the thread goes on trying, as over TCP)."""
        self._first.wait(self.connect_timeout * 2 + 1 if timeout is None else timeout)
        if self._first_refusal is not None:
            self.close(0)
            raise Refused(f"{self.url}: the consumer refused the streams: {self._first_refusal}")

    def send(self, messages: list[bytes]) -> None:
        with self._lock:
            if self._closing:
                raise UsageError("send() after close()")
            self._enqueue(messages, 0.5)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued and have it acknowledged, for up to ``timeout`` seconds;
        then Close (1000) and stop the thread."""
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
            self._thread.join(self.connect_timeout + 2.0)
            if self._thread.is_alive():
                log.warning("websocket sender to %s did not stop in time", self.url)
        with self._lock:
            self._finalize()

    def stats(self) -> dict:
        with self._lock:
            return {
                "sent": self.sent,
                "bytes": self.bytes,
                "dropped": self.dropped,
                "undelivered": self.undelivered,
                "reconnects": self.reconnects,
                "resent": self.resent,
                "connected": self.connected,
                "queued": len(self._queue) + len(self._unacked),
                "procedure": self.procedure,
                "connection": self.connection,
            }

    # -- TS 28.532 operations on the open connection (caller's thread, own HTTP connection) -

    def add_streams(self, streams: list[StreamInfo]) -> list[dict]:
        """addStream: POST .../connections/{id}/streams; the streams the consumer took."""
        _, body = self._rest("POST", "/streams", [s.to_json() for s in streams], ok=(201, 202))
        taken = {x.get("streamId") for x in json.loads(body)}
        with self._lock:
            self.streams += [s for s in streams if s.stream_id in taken]
        return json.loads(body)

    def delete_streams(self, stream_ids: list[str]) -> None:
        """deleteStream: DELETE .../connections/{id}/streams?streamIds=..."""
        query = "&".join(f"streamIds={i}" for i in stream_ids)
        self._rest("DELETE", f"/streams?{query}", None, ok=(204,))
        with self._lock:
            self.streams = [s for s in self.streams if s.stream_id not in stream_ids]

    def connection_info(self) -> dict:
        """getConnectionInfo: GET .../connections/{id} (connectionInfo-Type)."""
        return json.loads(self._rest("GET", "", None, ok=(200,))[1])

    def stream_info(self, stream_ids: list[str]) -> list[dict]:
        """getStreamInfo: GET .../connections/{id}/streams?streamIds=..."""
        query = "&".join(f"streamIds={i}" for i in stream_ids)
        return json.loads(self._rest("GET", f"/streams?{query}", None, ok=(200, 202))[1])

    def _rest(self, method: str, suffix: str, obj, ok) -> tuple[int, bytes]:
        if self.procedure != "ts28532":
            raise UsageError("the seed procedure has no REST resources: use ts28532")
        with self._lock:
            connection = self.connection
        if connection is None:
            raise StmError(f"{self.url}: not connected")
        path = urlsplit(connection).path + suffix
        sock = self._open(time.monotonic() + self.connect_timeout)
        try:
            conn = h11.Connection(h11.CLIENT)
            body = None if obj is None else json.dumps(obj).encode()
            status, reason, _, data = self._http(sock, conn, method, path, body)
        finally:
            sock.close()
        if status not in ok:
            raise Refused(f"{self.url}: {method} {path}: {refusal(status, reason, data)}")
        return status, data

    # -- the thread -----------------------------------------------------------------------

    def _finalize(self) -> None:
        if self._finalized:
            return
        self._finalized = True
        self.undelivered += len(self._queue) + len(self._unacked)
        self._queue.clear()
        self._unacked.clear()
        self.connected = False
        self._room.notify_all()

    def _backoff(self, failures: int) -> float:
        delay = min(self.backoff_max, self.backoff_initial * 2 ** min(failures - 1, 30))
        return delay * random.uniform(0.5, 1.0)

    def _run(self) -> None:
        link: _Link | None = None
        failures = 0
        failing = False
        try:
            while not self._stop.is_set():
                with self._lock:
                    done = self._closing and not self._queue and not self._unacked
                if done:
                    break
                if link is None:
                    try:
                        link = self._establish()
                    except (OSError, Refused, ProtocolError) as exc:
                        failures += 1
                        why = str(exc) if isinstance(exc, StmError) else cause(exc)
                        self.last_error = why
                        if isinstance(exc, Refused) and not self._first.is_set():
                            self._first_refusal = why
                            self._first.set()
                            break
                        self._first.set()
                        if not failing:
                            log.warning(
                                "cannot connect to %s: %s; retrying with backoff up to %.1f s",
                                self.url,
                                why,
                                self.backoff_max,
                            )
                            failing = True
                        else:
                            log.debug("connect to %s: %s", self.url, why)
                        self._stop.wait(self._backoff(failures))
                        continue
                    with self._lock:
                        self.connected = True
                        self.connection = link.connection
                        self._connects += 1
                        self.reconnects = self._connects - 1
                    self._first.set()
                    level = logging.WARNING if failing or self._connects > 1 else logging.INFO
                    again = " again" if self._connects > 1 else ""
                    log.log(level, "connected to %s%s", self.url, again)
                    failing = False
                gone = self._pump(link)
                if gone is not None:
                    log.warning("lost connection to %s: %s; reconnecting", self.url, gone)
                    with contextlib.suppress(OSError):
                        link.sock.close()
                    link = None
                    with self._lock:
                        self.connected = False
                        # unacknowledged reports go first on the next connection
                        self.resent += len(self._unacked)
                        self._queue.extendleft(reversed(self._unacked))
                        self._unacked.clear()
                    if failures:
                        self._stop.wait(self._backoff(failures))
                    failures += 1
                else:
                    failures = 0
        except Exception:
            log.exception("websocket sender to %s stopped", self.url)
        finally:
            self._first.set()
            if link is not None:
                if self._stop.is_set():
                    link.terminate(CLOSE_GOING_AWAY, "stm-send stopping", 0.0)
                else:
                    link.terminate(CLOSE_NORMAL, "stm-send done", 1.0)
            with self._lock:
                self._finished = True
                self.connected = False
                self._room.notify_all()
                if self._stop.is_set() or self._closing or self._first_refusal:
                    self._finalize()

    def _pump(self, link: _Link) -> str | None:
        """One round: write a batch if the window allows, ask for an acknowledgement (a
        Ping) every PING_EVERY reports or once idle for PING_AFTER, then take in what the
        consumer sent. Why the connection is over, or None."""
        with self._lock:
            room = WINDOW - len(self._unacked)
            owed = link.written > link.pinged  # reports written that no Ping asked about
            if room > 0 and not self._queue and not self._closing:
                self._nonempty.wait(PING_AFTER if owed else (_IO_SLICE if self._unacked else 0.5))
            batch: list[bytes] = []
            size = 0
            queue = self._queue
            while queue and size < BATCH_BYTES and len(batch) < room:
                m = queue.popleft()
                batch.append(m)
                size += len(m)
            if batch:
                self._unacked.extend(batch)
                self._room.notify_all()
            idle = not queue
            half = len(self._unacked) >= WINDOW // 2
            closing = self._closing
        data = b""
        try:
            if batch:
                link.written += len(batch)
                data = link.frames(batch)
            now = time.monotonic()
            if link.written > link.pinged and (
                link.written - link.pinged >= PING_EVERY
                or half
                or (idle and (closing or now - link.ping_time >= PING_AFTER))
            ):
                data += link.ping()
                link.pinged, link.ping_time = link.written, now
        except InvalidState:  # the consumer's Close came in: nothing more may be sent
            return link.closed_by or "connection closing"
        if data:
            try:
                self._write(link.sock, data)
            except OSError as exc:
                return cause(exc)
            with self._lock:
                self.bytes += size
        wait = 0.0 if batch else (PING_AFTER if link.written > link.pinged else _IO_SLICE)
        gone = link.events(wait)
        self._acknowledge(link)
        return gone

    def _acknowledge(self, link: _Link) -> None:
        with self._lock:
            # the first reports unacknowledged are those written before link.acked
            n = link.acked - (link.written - len(self._unacked))
            for _ in range(max(0, n)):
                self._unacked.popleft()
                self.sent += 1
            if n > 0:
                self._room.notify_all()

    def _write(self, sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            if self._stop.is_set():
                raise OSError(errno.ECANCELED, "stopped")
            try:
                pos += sock.send(view[pos:])
            except TimeoutError:
                continue

    # -- establishing ---------------------------------------------------------------------

    def _open(self, deadline: float) -> socket.socket:
        host, port = self.endpoint.host, self.endpoint.port
        timeout = max(0.1, deadline - time.monotonic())
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.server_hostname)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
        except BaseException:
            sock.close()
            raise
        return sock

    def _recv(self, sock: socket.socket, deadline: float) -> bytes:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        return sock.recv(65536)

    def _http(self, sock, conn, method: str, target: str, body: bytes | None):
        """One request and its response on ``sock``: (status, reason, headers, body)."""
        deadline = time.monotonic() + self.connect_timeout
        headers = [("Host", _host_header(self.endpoint.host, self.endpoint.port))]
        if body is not None:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        headers.append(("Accept", "application/json"))
        out = conn.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        sock.sendall(out)
        response = None
        data = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if time.monotonic() >= deadline:
                    raise TimeoutError(errno.ETIMEDOUT, "timed out")
                conn.receive_data(self._recv(sock, deadline))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                data += event.data
                if len(data) > MAX_BODY:
                    raise ProtocolError(f"a response body over {MAX_BODY} bytes")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        if response is None:
            raise ProtocolError("the consumer closed the connection without a response")
        hdrs = {k.decode().lower(): v.decode("latin-1") for k, v in response.headers}
        return response.status_code, response.reason.decode("latin-1"), hdrs, bytes(data)

    def _establish(self) -> _Link:
        """A connection the streams are established on (either procedure)."""
        deadline = time.monotonic() + self.connect_timeout
        sock = self._open(deadline)
        try:
            connection = None
            target = self.base or "/"
            if self.procedure == "ts28532":
                conn = h11.Connection(h11.CLIENT)
                with self._lock:
                    streams = list(self.streams)
                body = json.dumps(connection_request(self.producer, streams)).encode()
                status, reason, headers, data = self._http(
                    sock, conn, "POST", f"{self.base}/connections", body
                )
                if status != 201 or not headers.get("location"):
                    why = refusal(status, reason, data)
                    if 400 <= status < 500 and status not in (408, 429):
                        raise Refused(f"POST {self.base}/connections: {why}")
                    raise ProtocolError(f"POST {self.base}/connections: {why}")
                connection = headers["location"]
                target = urlsplit(connection).path
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()  # the Upgrade goes on the same connection
                else:
                    sock.close()
                    sock = self._open(deadline)
            scheme = "wss" if self.ssl_context is not None else "ws"
            host = _host_header(self.endpoint.host, self.endpoint.port)
            ws = ClientProtocol(parse_uri(f"{scheme}://{host}{target}"), logger=_WS_LOG)
            ws.send_request(ws.connect())
            sock.sendall(b"".join(ws.data_to_send()))
            self._upgraded(sock, ws, target, deadline)
            link = _Link(sock, ws, connection)
            if self.procedure == "seed":
                self._ping_streams(link, deadline)
            sock.settimeout(_IO_SLICE)
            return link
        except BaseException:
            with contextlib.suppress(OSError):
                sock.close()
            raise

    def _upgraded(self, sock, ws: ClientProtocol, target: str, deadline: float) -> None:
        while True:
            data = self._recv(sock, deadline)
            _give(ws, data)
            if ws.events_received() and ws.state is State.OPEN:
                return
            if ws.handshake_exc is not None or not data:
                break
        exc = ws.handshake_exc
        if isinstance(exc, InvalidStatus):
            status, body = exc.response.status_code, bytes(exc.response.body or b"")
            why = f"Upgrade GET {target}: {refusal(status, '', body[:MAX_BODY])}"
        elif exc is not None:
            status, why = 0, f"Upgrade GET {target}: {exc}"
        else:
            raise ProtocolError("the consumer closed the connection during the Upgrade")
        # a 404 under TS 28.532: the connection resource went (expired); start again
        gone = self.procedure == "ts28532" and status in (404, 409)
        if 400 <= status < 500 and status not in (408, 429) and not gone:
            raise Refused(why)
        raise ProtocolError(why)

    def _ping_streams(self, link: _Link, deadline: float) -> None:
        """The seed's establishStreamingConnection: the streamInfoList in a Ping, and the
        Pong with the same data back."""
        sock, ws = link.sock, link.ws
        ws.send_ping(self.ping_payload)
        sock.sendall(b"".join(ws.data_to_send()))
        while True:
            if time.monotonic() >= deadline:
                raise Refused(
                    f"no Pong to the streamInfoList Ping within {self.connect_timeout:g} s"
                )
            try:
                data = self._recv(sock, deadline)
            except TimeoutError:
                continue
            _give(ws, data)
            for frame in ws.events_received():
                if frame.opcode is Opcode.PONG and frame.data == self.ping_payload:
                    return
                if frame.opcode is Opcode.CLOSE:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"".join(ws.data_to_send()))  # the echo
                    close = ws.close_rcvd
                    raise Refused(
                        f"Close {close.code} instead of a Pong to the streamInfoList"
                        + (f": {close.reason}" if close.reason else "")
                    )
            sock.sendall(b"".join(ws.data_to_send()))  # Pongs to its Pings
            if not data or ws.parser_exc is not None:
                raise ProtocolError("the consumer closed the connection before the Pong")


# == the consumer ==============================================================================


class _Closed:
    """What ``on_close`` gets: a producer's connection ended (after every report it sent
    went to ``on_reports``)."""

    __slots__ = ("code", "peer", "producer", "reason")

    def __init__(self, peer, producer, code, reason) -> None:
        self.peer = peer
        self.producer = producer
        self.code = code
        self.reason = reason


class _Peer:
    __slots__ = (
        "addr",
        "body",
        "closing",
        "ending",
        "events",
        "fast",
        "fd",
        "h11",
        "handshaking",
        "identity",
        "last",
        "message",
        "need",
        "origin",
        "out",
        "pending",
        "request",
        "requests",
        "session",
        "sock",
        "source",
        "started",
        "ws",
    )

    def __init__(self, sock, addr, tls: bool, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.source = addr
        self.handshaking = tls
        self.identity: str | None = None
        self.last = now
        self.started = now  # of the current phase: TLS and HTTP, a request, the seed's Ping
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=16 << 10)
        self.ws: ServerProtocol | None = None
        self.session: Session | None = None
        self.message = bytearray()
        self.out = bytearray()
        self.events = selectors.EVENT_READ
        self.closing = False  # close once ``out`` is written
        self.ending = False  # we sent a Close: nothing else goes out; wait for the echo
        self.fast = True  # report frames are cut out by stm.accel until an unusual frame
        self.pending = bytearray()  # ... and the start of a frame not complete yet
        self.need = 0  # ... whose whole length, if known
        self.requests = 0
        self.origin = ""
        self.request = None
        self.body = bytearray()


class WsReceiver(Accepting):
    """A WebSocket consumer of STM reports, served from the caller's selector loop.

    ``procedure``: ``ts28532`` (REST resources under ``path``), ``seed`` (an Upgrade on
    ``path`` then the streamInfoList Ping) or ``any``. ``ssl_context`` makes it wss://.
    Bounds: ``max_connections`` TCP connections (more are accepted and closed at once),
    reports of at most 65,535 bytes (a larger message is closed with 1009), 64 KiB REST
    bodies, ``handshake_timeout`` seconds for TLS, HTTP and the seed's Ping.

    Like :class:`~stm.transport.tcp.TcpListener`: :meth:`register` with the loop's
    selector, :meth:`handle` for every ready key whose ``data`` is this receiver, and
    :meth:`expire` every half second or so. The reports of one read go to
    ``on_reports(reports, source)`` at once; it returns False if it stopped taking them
    (stm-recv reached --count), so that no Ping after them is answered. ``owners`` (a
    :class:`~stm.report.ownership.StreamOwners`) admits reports of authenticated producers.
    ``on_close(marker)`` is called when a producer's connection ended, after every report
    it sent went to ``on_reports``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        path: str = "",
        procedure: str = "ts28532",
        ssl_context: ssl.SSLContext | None = None,
        allow: AddressFilter | None = None,
        max_connections: int = 1024,
        handshake_timeout: float = 10.0,
        owners=None,
        on_reports: Callable[[list[bytes], Any], bool | None] | None = None,
        on_close: Callable[[Any], None] | None = None,
    ) -> None:
        _need_websockets()
        if max_connections < 1 or handshake_timeout <= 0:
            raise UsageError("max_connections and handshake_timeout must be positive")
        self.sock = listening_socket(host, port)
        self.address = self.sock.getsockname()
        self.scheme = "wss" if ssl_context is not None else "ws"
        self.url = str(Endpoint(self.scheme, host, self.address[1], path))
        self.ssl_context = ssl_context
        self.allow = allow
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.owners = owners
        self.on_reports = on_reports
        self.on_close = on_close
        owner_of = owners.owner if owners is not None else None
        self.registry = Registry(
            path, procedure=procedure, max_connections=max_connections, owner_of=owner_of
        )
        self.connections = 0
        self.rejected_connections = 0
        self.tls_failures = 0
        self.denied = 0
        self.reports = 0
        self.bytes = 0
        self.oversize = 0
        self.closed = {"by_producer": 0, "by_us": 0, "dropped": 0}
        self.streams_refused = 0
        self.unannounced = 0
        self._peers: dict[int, _Peer] = {}
        self._log = LogBudget()
        self._selector: selectors.BaseSelector | None = None
        self._closed = False
        self._ext = accel.ext
        self._spare = self._open_spare()

    def _serve(self, key: selectors.SelectorKey, mask: int) -> None:
        peer = self._peers.get(key.fd)
        if peer is not None and peer.sock is key.fileobj:
            self._ready(peer, mask)

    def expire(self, now: float | None = None) -> None:
        """Time limits: a phase (TLS handshake, HTTP request, the seed's Ping) must end in
        time from its start, however active the peer; a closing or idle one, from its last
        byte. Expired TS 28.532 connection resources go too."""
        now = time.monotonic() if now is None else now
        self.registry.expire(now)
        limit = now - self.handshake_timeout
        for p in list(self._peers.values()):
            if p.started > limit and p.last > limit:
                continue
            if p.handshaking:
                self.tls_failures += 1
                self._reject(p, "TLS handshake failed: timed out")
            elif p.ws is None and p.requests and p.h11.their_state is h11.IDLE:
                if p.last <= limit:
                    self._drop(p, "idle")  # a kept-alive REST connection
            elif p.ws is None:
                self._reject(p, "no complete HTTP request in time")
            elif isinstance(p.session, Session) and not p.session.established:
                self._close_ws(p, CLOSE_POLICY, "no streamInfoList Ping in time")
            elif (p.closing or p.ending) and p.last <= limit:
                self._drop(p, "closing handshake timed out")

    def stats(self) -> dict:
        return {
            "url": self.url,
            "connections": self.connections,
            "active": len(self._peers),
            "rejected_connections": self.rejected_connections,
            "tls_failures": self.tls_failures,
            "denied": self.denied,
            "reports": self.reports,
            "bytes": self.bytes,
            "oversize": self.oversize,
            "unannounced": self.unannounced,
            "streams_refused": self.streams_refused,
            "rest_refused": self.registry.refused,
            "closed": dict(self.closed),
        }

    def close(self) -> None:
        """Close every connection (1001, going away) and the listening socket, waiting up
        to a second for the producers' echoes (so that no unread data turns our close into
        a reset that could overtake the Close). What is left unacknowledged is sent again
        by the producer to the next consumer."""
        if self._closed:
            return
        self._closed = True
        if self._selector is not None:
            for sock in [self.sock, *(p.sock for p in self._peers.values())]:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
        self.sock.close()
        self._close_spare()
        self._selector = selectors.DefaultSelector()  # our own, for the closing handshakes
        try:
            for p in list(self._peers.values()):
                p.events = 0
                if p.ws is not None and isinstance(p.session, Session):
                    self._close_ws(p, CLOSE_GOING_AWAY, "stm-recv stopping")
                elif p.ws is None:
                    self._drop(p, None)
                else:
                    self._want(p)
            deadline = time.monotonic() + 1.0
            while self._peers and time.monotonic() < deadline:
                for key, mask in self._selector.select(0.05):
                    peer = key.data
                    if self._peers.get(peer.fd) is peer:
                        self._ready(peer, mask)
            for p in list(self._peers.values()):
                self._drop(p, None)
        finally:
            self._selector.close()

    def __enter__(self) -> WsReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections ----------------------------------------------------------------------

    def _active(self) -> int:
        return len(self._peers)

    def _admit(self, sock, addr) -> None:
        with contextlib.suppress(OSError):  # Pongs and responses go out at once
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = _Peer(sock, addr, self.ssl_context is not None, time.monotonic())
        self._peers[peer.fd] = peer
        assert self._selector is not None  # handle() comes from the selector it registered with
        self._selector.register(sock, selectors.EVENT_READ, self)

    def _want(self, peer: _Peer) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.out else 0)
        if events != peer.events and self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                if peer.events == 0:
                    self._selector.register(peer.sock, events, peer if self._closed else self)
                else:
                    self._selector.modify(peer.sock, events, peer if self._closed else self)
            peer.events = events

    def _ready(self, peer: _Peer, mask: int) -> None:
        peer.last = time.monotonic()
        if peer.handshaking:
            self._handshake(peer)
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(peer)
            if peer.fd not in self._peers:
                return
        if mask & selectors.EVENT_READ:
            self._read(peer)

    def _handshake(self, peer: _Peer) -> None:
        if not self._tls_step(peer):
            return
        if peer.identity is not None:
            peer.source = (peer.identity, *peer.addr[1:2])
        self._want(peer)

    def _send(self, peer: _Peer, data: bytes) -> None:
        peer.out += data
        if len(peer.out) > MAX_OUT:
            self._drop(peer, "does not read what we send")
            return
        self._flush(peer)

    def _flush(self, peer: _Peer) -> None:
        try:
            while peer.out:
                n = peer.sock.send(peer.out)
                del peer.out[:n]
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass
        except OSError as exc:
            self._drop(peer, cause(exc))
            return
        if not peer.out and peer.closing:
            self._drop(peer, None)
            return
        self._want(peer)

    def _read(self, peer: _Peer) -> None:
        sock = peer.sock
        try:
            data = sock.recv(READ_SIZE)
            if isinstance(sock, ssl.SSLSocket):
                while data and sock.pending():
                    data += sock.recv(sock.pending())
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as exc:
            self._drop(peer, cause(exc))
            return
        if peer.closing and peer.ws is None:
            if not data:
                self._drop(peer, None)
            return  # a response is on its way and then we close: ignore the rest
        if peer.ws is None:
            self._http(peer, data)
        else:
            self._frames(peer, data)

    # -- HTTP -----------------------------------------------------------------------------

    def _respond(self, peer: _Peer, response: Response, close: bool = False) -> None:
        conn = peer.h11
        headers = [*response.headers, ("Content-Length", str(len(response.body)))]
        if close:
            headers.append(("Connection", "close"))
        try:
            phrase = HTTPStatus(response.status).phrase.encode()
            out = conn.send(
                h11.Response(status_code=response.status, headers=headers, reason=phrase)
            )
            if response.body:
                out += conn.send(h11.Data(data=response.body))
            out += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self._drop(peer, "HTTP state")
            return
        if close or conn.our_state is not h11.DONE:
            peer.closing = True
        self._send(peer, out)

    def _http(self, peer: _Peer, data: bytes) -> None:
        conn = peer.h11
        conn.receive_data(data)
        for _ in range(64):  # bounded: a few pipelined requests at most
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.rejected_connections += 1
                self._log.warning("bad HTTP request from %s: %s", peer_name(peer.addr), exc)
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    self._respond(peer, Response.error(400, "bad HTTP request"), close=True)
                else:
                    self._drop(peer, "bad HTTP request")
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.ConnectionClosed):
                self._drop(peer, None)
                return
            if isinstance(event, h11.Request):
                peer.request = event
                peer.body = bytearray()
            elif isinstance(event, h11.Data):
                peer.body += event.data
                if len(peer.body) > MAX_BODY:
                    self._respond(peer, Response.error(413, f"body over {MAX_BODY} bytes"), True)
                    return
            elif isinstance(event, h11.EndOfMessage):
                request, body = peer.request, bytes(peer.body)
                if request is None or self._upgrade_wanted(request):
                    continue  # h11 pauses next: the Upgrade is handled then
                peer.request = None
                peer.body = bytearray()
                self._rest(peer, request, body)
                if peer.fd not in self._peers or peer.closing:
                    return
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    peer.requests += 1
                    if peer.requests >= 100:
                        peer.closing = True
                        self._flush(peer)
                        return
                    conn.start_next_cycle()
                    peer.started = time.monotonic()
            elif event is h11.PAUSED:
                if peer.request is not None and self._upgrade_wanted(peer.request):
                    self._upgrade(peer, peer.request)
                else:
                    self._reject(peer, "HTTP connection paused")
                return
        self._reject(peer, "too many HTTP events at once")

    @staticmethod
    def _upgrade_wanted(request) -> bool:
        for name, value in request.headers:
            if name == b"upgrade" and value.lower() == b"websocket":
                return True
        return False

    def _origin(self, peer: _Peer, request) -> str:
        host = next((v.decode("latin-1") for k, v in request.headers if k == b"host"), "")
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host}" if host else ""

    def _rest(self, peer: _Peer, request, body: bytes) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
        response = self.registry.handle(
            request.method.decode("ascii", "replace"),
            request.target.decode("ascii", "replace"),
            headers,
            body,
            identity=peer.identity,
            origin=self._origin(peer, request),
            now=time.monotonic(),
        )
        if response.status >= 400:
            self._log.warning(
                "%s %s from %s: %d %s",
                request.method.decode("ascii", "replace"),
                request.target.decode("ascii", "replace")[:200],
                peer_name(peer.addr),
                response.status,
                response.body[:200].decode("utf-8", "replace"),
            )
        elif request.method == b"POST":
            log.info(
                "%s from %s: %d %s",
                request.target.decode("ascii", "replace")[:200],
                peer_name(peer.addr),
                response.status,
                dict(response.headers).get("Location", ""),
            )
        self._respond(peer, response)

    def _upgrade(self, peer: _Peer, request) -> None:
        target = request.target.decode("ascii", "replace")
        conn, status, reason = self.registry.upgrade_target(target, peer.identity)
        if status != 101:
            self.registry.refused += 1
            self._log.warning(
                "Upgrade GET %s from %s: %d %s", target[:200], peer_name(peer.addr), status, reason
            )
            self._respond(peer, Response.error(status, reason), close=True)
            return
        trailing, _ = peer.h11.trailing_data
        # h11 parsed the request: websockets checks it and answers, then a protocol that
        # starts OPEN (no extension negotiated) takes the frames
        handshake = ServerProtocol(logger=_WS_LOG)
        headers = Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers])
        response = handshake.accept(WsRequest(target, headers))
        if response.status_code != 101:
            why = str(handshake.handshake_exc or "not a WebSocket request")
            self._respond(peer, Response.error(400, why), close=True)
            return
        handshake.send_response(response)
        ws = ServerProtocol(state=State.OPEN, max_size=MAX_MESSAGE, logger=_WS_LOG)
        peer.ws = ws
        peer.origin = self._origin(peer, request)
        peer.session = Session(self.registry, conn, identity=peer.identity, origin=peer.origin)
        peer.started = time.monotonic()
        if conn is not None:
            log.info(
                "producer %s connected from %s: connection %s, streams %s",
                conn.producer,
                peer_name(peer.addr),
                conn.id,
                ", ".join(conn.streams),
            )
        self._send(peer, b"".join(handshake.data_to_send()))
        if trailing and peer.fd in self._peers:
            self._frames(peer, bytes(trailing))

    # -- WebSocket ------------------------------------------------------------------------

    def _frames(self, peer: _Peer, data: bytes) -> None:
        """Everything one read brought: its reports go to ``on_reports`` in one call, then
        the Pongs to the Pings among them (so that each acknowledges what came before it),
        then whatever ends the connection."""
        ws, session = peer.ws, peer.session
        assert ws is not None
        reports: list[bytes] = []
        pongs: list[bytes] = []
        close_with: tuple[int, str] | None = None  # our Close, once the rest is done
        if not isinstance(session, Session):
            self._feed(peer, data)
            ws.events_received()  # ended: we only wait for the Close echo or EOF
        elif peer.fast and data and self._ext is not None:
            close_with = self._cut(peer, session, data, reports, pongs)
        else:
            self._feed(peer, data)
            close_with = self._take(peer, session, ws.events_received(), reports, pongs)
        # websockets' own Pongs go: ours follow the decoding of what came before each Ping
        writes = [w for w in ws.data_to_send() if w[:1] != _PONG]
        if reports:
            self.reports += len(reports)
            self.bytes += sum(map(len, reports))
            if self.on_reports is not None and self.on_reports(reports, peer.source) is False:
                pongs = []  # the consumer stopped: what followed was not written
        ended = None
        if isinstance(session, Session):
            ended = self._ending(peer, ws, close_with)
        out = bytearray()
        if pongs and not peer.ending and ws.state is not State.CLOSED:
            for payload in pongs:
                ws.send_pong(payload)
            out += b"".join(ws.data_to_send())
        eof = _EOF in writes
        out += b"".join(writes)
        if close_with is not None and ws.state is State.OPEN:
            self.closed["by_us"] += 1
            ws.send_close(close_with[0], _short(close_with[1]))
            peer.ending = True
            out += b"".join(w for w in ws.data_to_send() if w[:1] != _PONG)
        if ended is not None:
            self._ended(peer, *ended)
        if eof:
            peer.closing = True  # websockets is done with it: close once written
        if out or peer.closing:
            self._send(peer, bytes(out))

    @staticmethod
    def _feed(peer: _Peer, data: bytes) -> None:
        ws = peer.ws
        peer.fast = False  # from now on websockets sees every byte
        if peer.pending:
            ws.receive_data(bytes(peer.pending))
            peer.pending = bytearray()
        _give(ws, data)

    def _cut(self, peer: _Peer, session: Session, data: bytes, reports: list, pongs: list):
        """:meth:`_take` with the accelerator: it cuts the report frames out of the stream;
        websockets gets each Ping or Pong frame whole, and everything from the first other
        frame on (a fragment, text, a Close, a bad header), so its parser only ever starts
        at a frame boundary."""
        ws = peer.ws
        if peer.pending:  # the start of a frame: wait until all of it is in
            peer.pending += data
            if len(peer.pending) < peer.need:
                return None
            buf = bytes(peer.pending)
            peer.pending = bytearray()
        else:
            buf = data
        cut = self._ext.ws_server_frames
        pos = 0
        while True:
            payloads, pos, size = cut(buf, pos, MAX_MESSAGE)
            if payloads:
                why = self._take_reports(peer, session, payloads, reports)
                if why is not None:
                    return self._refused(peer, buf, pos, why)
            if size == -2:
                self._feed(peer, buf[pos:])
                return self._take(peer, session, ws.events_received(), reports, pongs)
            if size == -1 or pos + size > len(buf):
                # at most a report frame (or a Ping) long; appended to, so that a frame
                # that comes a byte at a time is not copied over and over
                peer.pending = bytearray(buf[pos:])
                peer.need = max(size, 0)
                return None
            ws.receive_data(buf[pos : pos + size])
            pos += size
            why = self._take(peer, session, ws.events_received(), reports, pongs)
            if why is not None:
                return self._refused(peer, buf, pos, why)

    @staticmethod
    def _refused(peer: _Peer, buf: bytes, pos: int, why: tuple[int, str]) -> tuple[int, str]:
        """After a refusal in the middle of a read, websockets still sees the rest of it
        (a Close from the producer there is answered, as without the accelerator); its
        frames are not taken."""
        peer.fast = False
        if pos < len(buf):
            peer.ws.receive_data(buf[pos:])
        peer.ws.events_received()
        return why

    def _take_reports(self, peer: _Peer, session: Session, payloads: list, reports: list):
        """Reports of announced streams (and, over TLS, streams this producer owns) into
        ``reports``; the Close (code, reason) to send, or None."""
        owners = self.owners if peer.identity is not None else None
        i, end = 0, len(payloads)
        while i < end:
            n = session.report_run(payloads, i)  # the usual case, in one call
            if n:
                taken = payloads[i : i + n]
                i += n
            else:
                report = payloads[i]
                i += 1
                try:
                    ok = session.report(report)
                except ProtocolError as exc:
                    return CLOSE_POLICY, str(exc)
                if not ok:
                    self.unannounced += 1
                    self._log.warning(
                        "report from %s on a stream not announced: dropped", peer_name(peer.addr)
                    )
                    continue
                taken = (report,)
            if owners is None:
                reports += taken
                continue
            for report in taken:
                if owners.admit(report, peer.identity):
                    reports.append(report)
                else:
                    self.streams_refused += 1
                    sid, who, owner = owners.last_refused
                    self._log.warning(
                        "stream %d claimed by %s, owned by %s: refused", sid, who, owner
                    )
        return None

    def _take(self, peer: _Peer, session: Session, frames, reports: list, pongs: list):
        """Sort frames websockets parsed: reports into ``reports``, Ping payloads to
        answer into ``pongs``; the Close (code, reason) to send, or None."""
        for frame in frames:
            op = frame.opcode
            if op is Opcode.BINARY or op is Opcode.CONT:
                if not frame.fin:
                    peer.message += frame.data
                    continue
                if peer.message:
                    peer.message += frame.data
                    report = bytes(peer.message)
                    peer.message.clear()
                else:
                    report = frame.data if type(frame.data) is bytes else bytes(frame.data)
                why = self._take_reports(peer, session, [report], reports)
                if why is not None:
                    return why
            elif op is Opcode.TEXT:
                return CLOSE_UNSUPPORTED, "reports are binary frames"
            elif op is Opcode.PING:
                payload = bytes(frame.data)
                if is_stream_ping(payload):
                    action = session.ping(payload, time.monotonic())
                    if action[0] != "pong":
                        self._log.warning(
                            "streamInfoList from %s refused: %s", peer_name(peer.addr), action[2]
                        )
                        return action[1], action[2]
                    conn = session.connection
                    log.info(
                        "producer %s connected from %s (seed procedure): streams %s",
                        conn.producer if conn else None,
                        peer_name(peer.addr),
                        ", ".join(conn.streams) if conn else "",
                    )
                pongs.append(payload)
        return None

    def _ending(self, peer: _Peer, ws: ServerProtocol, close_with) -> tuple | None:
        """How this read ended the producer's connection, as (code, reason), or None."""
        if ws.close_rcvd is not None:
            self.closed["by_producer"] += 1
            code, reason = ws.close_rcvd.code, ws.close_rcvd.reason
            log.info(
                "producer %s closed its connection from %s: %s %s",
                peer.session.producer if isinstance(peer.session, Session) else None,
                peer_name(peer.addr),
                code,
                reason,
            )
            return code, reason
        exc = ws.parser_exc
        if isinstance(exc, PayloadTooBig):
            self.oversize += 1
            self.closed["by_us"] += 1
            self._log.warning(
                "closing connection from %s: a report is %d bytes at most",
                peer_name(peer.addr),
                MAX_MESSAGE,
            )
            return CLOSE_TOO_BIG, f"a report is {MAX_MESSAGE} bytes at most"
        if isinstance(exc, EOFError):
            self.closed["dropped"] += 1
            log.info("connection from %s ended: closed without a Close", peer_name(peer.addr))
            return None, "connection closed without a Close"
        if exc is not None:
            self.closed["by_us"] += 1
            self._log.warning("closing connection from %s: %s", peer_name(peer.addr), exc)
            return 1002, str(exc)
        return close_with

    def _close_ws(self, peer: _Peer, code: int, reason: str) -> None:
        """Our Close (the producer echoes it; websockets tells us when to close)."""
        ws = peer.ws
        if ws is not None and ws.state is State.OPEN:
            self.closed["by_us"] += 1
            ws.send_close(code, _short(reason))
            peer.ending = True
            self._ended(peer, code, reason)
            if peer.fd in self._peers:
                self._send(peer, b"".join(w for w in ws.data_to_send() if w[:1] != _PONG))
        else:
            self._ended(peer, code, reason)

    def _ended(self, peer: _Peer, code, reason) -> None:
        session = peer.session
        if not isinstance(session, Session):
            return
        producer = session.producer
        session.closed()
        peer.session = _Done  # type: ignore[assignment]
        if session.established and self.on_close is not None:
            self.on_close(_Closed(peer.source, producer, code, reason))

    def _reject(self, peer: _Peer, reason: str) -> None:
        self.rejected_connections += 1
        self._log.warning("closing connection from %s: %s", peer_name(peer.addr), reason)
        self._drop(peer, reason)

    def _drop(self, peer: _Peer, reason: str | None) -> None:
        if self._peers.get(peer.fd) is not peer:
            return
        del self._peers[peer.fd]
        if isinstance(peer.session, Session):
            self.closed["dropped"] += 1
            log.info("connection from %s ended: %s", peer_name(peer.addr), reason or "closed")
            self._ended(peer, None, reason)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(peer.sock)
        with contextlib.suppress(OSError):
            peer.sock.close()


class _DoneSession:
    """What a peer's session becomes once its connection ended: it takes nothing more."""

    established = True
    producer = None

    @staticmethod
    def report(data: bytes) -> bool:
        return False

    @staticmethod
    def ping(payload: bytes, now: float) -> tuple:
        return ("pong", payload)


_Done = _DoneSession()


def sender_factory(
    *, producer: str, stream: int, fmt: str, procedure: str, queue_limit: int, policy: str
) -> Callable[[Endpoint, ssl.SSLContext | None, str | None], WsSender]:
    """What stm-send's ``open_destinations`` calls for each ``ws://``/``wss://`` URL: a
    :class:`WsSender` announcing the one stream of this producer and format."""

    def make(endpoint: Endpoint, context: ssl.SSLContext | None, server_name: str | None):
        return WsSender(
            endpoint,
            producer=producer,
            streams=[StreamInfo.stm(stream, fmt)],
            procedure=procedure,
            ssl_context=context,
            server_hostname=server_name,
            queue_limit=queue_limit,
            policy=policy,
        )

    return make


def flush_on_close(collector) -> Callable[[Any], None]:
    """stm-recv's ``on_close``: when a producer's connection ends, its reports are all
    decoded (see :meth:`WsReceiver.drain`); write them out now."""

    def on_close(marker: _Closed) -> None:
        sink = getattr(collector, "sink", None)
        if sink is not None:
            sink.flush()

    return on_close
