"""One-line texts for log lines and errors: a peer's address, a socket error's cause."""

from __future__ import annotations

import ssl
from typing import Any


def peer_name(addr: Any) -> str:
    """``host:port``, with IPv6 hosts in brackets, for log lines."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


def cause(exc: BaseException) -> str:
    """One-line cause of a socket error: "Connection refused", not a repr or traceback."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        # e.g. "certificate verify failed: Hostname mismatch, certificate is not valid for 'x'."
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
