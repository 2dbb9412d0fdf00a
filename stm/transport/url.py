"""Transport URLs: ``udp://HOST:PORT``, ``tcp://...``; IPv6 literals in brackets."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from stm.errors import UsageError

# kafka:// holds several brokers: stm.transport.kafka.parse_kafka_url parses it
SCHEMES = ("udp", "tcp", "tls", "dtls", "kafka", "ws", "wss")


@dataclass(frozen=True, slots=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    path: str = ""
    query: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_url(url: str, *, default_port: int | None = None, schemes=SCHEMES) -> Endpoint:
    """Parse and check a transport URL; raises UsageError with a one-line reason."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"bad URL {url!r}: {exc}") from None
    if parts.scheme not in schemes:
        raise UsageError(
            f"bad URL {url!r}: scheme must be one of {', '.join(s + '://' for s in schemes)}"
        )
    if not parts.hostname:
        raise UsageError(f"bad URL {url!r}: no host")
    if port is None:
        if default_port is None:
            raise UsageError(f"bad URL {url!r}: no port")
        port = default_port
    query = tuple((k, v[-1]) for k, v in parse_qs(parts.query).items())
    return Endpoint(parts.scheme, parts.hostname, port, parts.path, query)


def resolve(
    host: str, port: int, kind: socket.SocketKind, passive: bool = False
) -> tuple[int, tuple]:
    """The first address of ``host`` for a socket of ``kind``; UsageError when it does not
    resolve (a one-line message, not a traceback)."""
    try:
        infos = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_PASSIVE if passive else 0)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve {host!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    return family, addr
