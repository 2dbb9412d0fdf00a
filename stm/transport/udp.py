"""UDP datagram sockets for reports: a connected sender and a draining receiver."""

from __future__ import annotations

import contextlib
import errno
import socket
import time

from stm.errors import UsageError
from stm.transport.allow import AddressFilter
from stm.transport.url import resolve

RECV_BUFFER = 64 << 20
SEND_BUFFER = 8 << 20
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


def _grow_buffer(sock: socket.socket, force: int, plain: int, size: int) -> int:
    """Raise a socket buffer as far as allowed: past rmem_max/wmem_max when privileged."""
    for opt in (force, plain):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
            break
        except OSError:
            continue
    return sock.getsockopt(socket.SOL_SOCKET, plain)


class UdpSender:
    """Sends datagrams to one destination, from a stable source port where it can."""

    def __init__(self, host: str, port: int, *, source_port: int | None = None) -> None:
        family, addr = resolve(host, port, socket.SOCK_DGRAM)
        self.family = family
        self.ip_header = 40 if family == socket.AF_INET6 else 20
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        _grow_buffer(self.sock, _SO_SNDBUFFORCE, socket.SO_SNDBUF, SEND_BUFFER)
        if source_port is not None:
            # If the port is taken an ephemeral one is fine: only entropy is lost.
            with contextlib.suppress(OSError):
                self.sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", source_port))
        self.sock.connect(addr)
        self.refused = 0
        self.url = f"udp://{f'[{host}]' if ':' in host else host}:{port}"

    def send(self, datagrams: list[bytes]) -> None:
        send = self.sock.send
        for dgram in datagrams:
            while True:
                try:
                    send(dgram)
                    break
                except ConnectionRefusedError:
                    self.refused += 1  # nobody listening (ICMP port unreachable): go on
                    break
                except OSError as exc:
                    if exc.errno not in (errno.ENOBUFS, errno.EAGAIN):
                        raise
                    time.sleep(0.0005)  # the local queue is full: wait for it to drain

    def close(self) -> None:
        self.sock.close()


class UdpReceiver:
    """A bound, non-blocking UDP socket with the largest receive buffer the OS allows.

    With ``allow`` (an :class:`~stm.transport.allow.AddressFilter`), datagrams from other
    addresses are dropped inside :meth:`drain`, never returned, and counted in ``denied``.
    """

    def __init__(self, host: str, port: int, *, allow: AddressFilter | None = None) -> None:
        family, addr = resolve(host, port, socket.SOCK_DGRAM, passive=True)
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.buffer = _grow_buffer(self.sock, _SO_RCVBUFFORCE, socket.SO_RCVBUF, RECV_BUFFER)
        try:
            self.sock.bind(addr)
        except OSError as exc:
            self.sock.close()
            raise UsageError(f"cannot listen on udp {host}:{port}: {exc.strerror}") from None
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()
        self.allow = allow
        self.denied = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self, limit: int = 512) -> list[tuple[bytes, tuple]]:
        """Up to ``limit`` datagrams that are waiting now (none blocks); with an allowlist,
        those from other addresses are read and dropped (they count against ``limit``)."""
        out = []
        recvfrom = self.sock.recvfrom
        allow = self.allow
        try:
            if allow is None:
                for _ in range(limit):
                    out.append(recvfrom(65536))
            else:
                allows = allow.allows
                for _ in range(limit):
                    got = recvfrom(65536)
                    if allows(got[1]):
                        out.append(got)
                    else:
                        self.denied += 1
        except (BlockingIOError, InterruptedError):
            pass
        except ConnectionRefusedError:
            pass
        return out

    def close(self) -> None:
        self.sock.close()
