"""The accepting half of a non-blocking TCP listener, served from the caller's loop: what
:class:`~stm.transport.tcp.TcpListener` and :class:`~stm.transport.websocket.WsReceiver`
share (the address filter, the connection limit, TLS wrapping, and a spare descriptor so
that running out of descriptors does not leave the loop spinning on a readable socket)."""

from __future__ import annotations

import errno
import os
import selectors
import socket
import ssl

from stm.errors import UsageError
from stm.transport.text import cause, peer_name
from stm.transport.tls import peer_identity
from stm.transport.url import resolve

ACCEPT_BATCH = 64
"""Connections taken per readiness event of the listening socket, at most."""
_OUT_OF_FDS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def listening_socket(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A bound, listening, non-blocking TCP socket; UsageError in one line if it cannot be."""
    family, addr = resolve(host, port, socket.SOCK_STREAM, passive=True)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name != "nt":  # restart at once despite TIME_WAIT; on Windows it means steal
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on tcp {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


class Accepting:
    """Mixed into a listener that owns ``sock`` (from :func:`listening_socket`), ``allow``
    (an AddressFilter or None), ``max_connections``, ``ssl_context``, ``_log`` (a
    LogBudget), ``_selector`` (None until :meth:`register`), ``_closed``, ``_spare`` (from
    :meth:`_open_spare`) and the counters ``connections``, ``denied``,
    ``rejected_connections`` and ``tls_failures``, and that defines ``_serve(key, mask)``
    (a connection is ready), ``_reject(conn, why)``, ``_active()`` (connections open now),
    ``_make_room()`` (close stale ones, if it has any) and ``_admit(sock, peer)`` (serve a
    new connection: non-blocking, TLS-wrapped if ``ssl_context``, its handshake not done
    yet; registered with ``_selector``)."""

    sock: socket.socket

    def fileno(self) -> int:
        return self.sock.fileno()

    def register(self, selector: selectors.BaseSelector) -> None:
        """Watch the listening socket (and, later, each connection) with ``selector``;
        then call ``handle`` for every ready key whose ``data`` is this listener."""
        if self._selector is not None:
            raise UsageError(f"{type(self).__name__}.register() called twice")
        self._selector = selector
        selector.register(self.sock, selectors.EVENT_READ, self)

    def handle(self, key: selectors.SelectorKey, mask: int) -> None:
        """Serve one readiness event of a socket this listener registered."""
        if self._closed:
            return
        if key.fileobj is self.sock:
            self._accept()
        else:
            self._serve(key, mask)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    self._shed(exc)
                    return
                continue  # ECONNABORTED and the like: that peer is gone already
            if self.allow is not None and not self.allow.allows(peer):
                self.denied += 1
                self._log.warning(
                    "refusing connection from %s: address not allowed", peer_name(peer)
                )
                sock.close()
                continue
            self.connections += 1
            if self._active() >= self.max_connections:
                self._make_room()
            if self._active() >= self.max_connections:
                self.rejected_connections += 1
                self._log.warning(
                    "refusing connection from %s: %d connections open (max_connections)",
                    peer_name(peer),
                    self._active(),
                )
                sock.close()
                continue
            try:
                sock.setblocking(False)
                if self.ssl_context is not None:
                    sock = self.ssl_context.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
            except (OSError, ValueError) as exc:
                sock.close()
                self.rejected_connections += 1
                self._log.warning("closing connection from %s: %s", peer_name(peer), exc)
                continue
            self._admit(sock, peer)

    def _watch(self, conn, events: int) -> None:
        """Have the selector report ``events`` for a connection (one with ``sock`` and
        ``events``)."""
        if conn.events != events and self._selector is not None:
            conn.events = events
            self._selector.modify(conn.sock, events, self)

    def _tls_step(self, conn) -> bool:
        """One step of a connection's TLS handshake (``conn`` has ``sock``, ``events``,
        ``handshaking`` and ``identity``): True once it is done and ``identity`` is the
        client certificate's subject (or None); a failure is counted in ``tls_failures``
        and the connection goes through the listener's ``_reject(conn, why)``."""
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, selectors.EVENT_READ)
            return False
        except ssl.SSLWantWriteError:
            self._watch(conn, selectors.EVENT_WRITE)
            return False
        except OSError as exc:
            self.tls_failures += 1
            self._reject(conn, f"TLS handshake failed: {cause(exc)}")
            return False
        conn.handshaking = False
        conn.identity = peer_identity(conn.sock)
        return True

    @staticmethod
    def _open_spare() -> int | None:
        try:
            return os.open(os.devnull, os.O_RDONLY)
        except OSError:
            return None

    def _shed(self, exc: OSError) -> None:
        """Out of descriptors: refuse one waiting connection using the spare descriptor."""
        self._log.warning("cannot accept connections: %s", cause(exc))
        if self._spare is None:
            return
        os.close(self._spare)
        self._spare = None
        try:
            sock, _ = self.sock.accept()
        except OSError:
            pass
        else:
            sock.close()
            self.connections += 1
            self.rejected_connections += 1
        self._spare = self._open_spare()

    def _close_spare(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    def _make_room(self) -> None:
        """Close stale connections to make room for a new one (none by default)."""
