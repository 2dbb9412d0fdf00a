"""TLS for STM over TCP: contexts for senders and receivers, secrets, peer identities.

3GPP TS 33.501 asks for TLS on TCP with mutual authentication. This module builds the
:class:`ssl.SSLContext` objects that :class:`~stm.transport.tcp.TcpSender` and
:class:`~stm.transport.tcp.TcpListener` take, from file paths only (TLS 1.2 at least, 1.3
when both ends have it), and turns a peer certificate's subject into the one-line identity
that a collector records as the producer (``CN=amf-1,O=Operator,C=FR``).

Secrets: a private key is read by OpenSSL straight from its file; a key's passphrase comes
from a file or an environment variable (:func:`read_secret`) and is handed to OpenSSL, never
kept in an attribute, a message or an exception. Error messages name files, not contents.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stm.errors import ProtocolError, UsageError

__all__ = [
    "HandshakeFailed",
    "TlsConfig",
    "client_context",
    "format_subject",
    "hostname_matches",
    "peer_identity",
    "read_secret",
    "server_context",
]

PathLike = str | os.PathLike


class HandshakeFailed(ProtocolError):
    """A TLS or DTLS handshake that did not complete: the peer's certificate was refused,
    the peer refused ours, or it did not answer in time. The message is one line."""


@dataclass(frozen=True)
class TlsConfig:
    """What the planned ``--cert``, ``--key``, ``--ca``, ``--require-client-cert`` and
    ``--server-name`` options carry, for both TLS and DTLS.

    ``password_file`` / ``password_env`` name where an encrypted key's passphrase is (a
    file, or an environment variable); the passphrase itself is never stored here.
    """

    cert: PathLike | None = None
    key: PathLike | None = None
    ca: PathLike | None = None
    require_client_cert: bool = False
    server_hostname: str | None = None
    password_file: PathLike | None = None
    password_env: str | None = None

    def password(self) -> bytes | None:
        """The key's passphrase, read now from its file or variable (None if neither)."""
        if self.password_file is None and self.password_env is None:
            return None
        return read_secret(file=self.password_file, env=self.password_env, what="key password")

    def __repr__(self) -> str:  # paths only: never anything read from them
        return (
            f"TlsConfig(cert={self.cert!r}, key={self.key!r}, ca={self.ca!r}, "
            f"require_client_cert={self.require_client_cert}, "
            f"server_hostname={self.server_hostname!r})"
        )


def read_secret(
    *, file: PathLike | None = None, env: str | None = None, what: str = "secret"
) -> bytes:
    """A secret from a file (trailing newline dropped) or an environment variable.

    Exactly one source; a missing or empty secret is a :class:`UsageError` that names the
    source, never the value.
    """
    if (file is None) == (env is None):
        raise UsageError(f"{what}: give a file or an environment variable, not both or neither")
    if file is not None:
        try:
            with open(file, "rb") as f:
                value = f.read(1 << 20).rstrip(b"\r\n")
        except OSError as exc:
            raise UsageError(f"{what}: cannot read {os.fspath(file)}: {exc.strerror}") from None
        source = os.fspath(file)
    else:
        raw = os.environ.get(env or "")
        if raw is None:
            raise UsageError(f"{what}: environment variable {env} is not set")
        value = os.fsencode(raw)
        source = f"${env}"
    if not value:
        raise UsageError(f"{what}: {source} is empty")
    return value


def _readable(path: PathLike, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} {os.fspath(path)}: no such file")
    return os.fspath(path)


def _load_chain(ctx: ssl.SSLContext, cert: PathLike, key: PathLike | None, password) -> None:
    cert_path = _readable(cert, "certificate")
    key_path = _readable(key, "key") if key is not None else None
    try:
        ctx.load_cert_chain(cert_path, key_path, password=password)
    except ssl.SSLError as exc:
        # exc.reason is OpenSSL's short code (e.g. KEY_VALUES_MISMATCH): never key bytes
        where = cert_path if key_path is None else f"{cert_path} and {key_path}"
        raise UsageError(
            f"cannot load certificate and key from {where}: {exc.reason or 'bad file'}"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot load certificate {cert_path}: {exc.strerror}") from None


def _load_ca(ctx: ssl.SSLContext, ca: PathLike) -> None:
    path = Path(ca)
    try:
        if path.is_dir():
            ctx.load_verify_locations(capath=os.fspath(path))
        else:
            ctx.load_verify_locations(cafile=_readable(path, "CA bundle"))
    except ssl.SSLError as exc:
        raise UsageError(f"cannot load CA bundle {os.fspath(ca)}: {exc.reason}") from None


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # 1.3 is negotiated whenever both have it
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)


def server_context(config: TlsConfig) -> ssl.SSLContext:
    """The receiver's context: its certificate and key; with ``ca``, client certificates
    are verified against it (required if ``require_client_cert``, else checked when sent).
    """
    if config.cert is None:
        raise UsageError("a TLS receiver needs a certificate (--cert) and its key (--key)")
    if config.require_client_cert and config.ca is None:
        raise UsageError("requiring client certificates needs a CA bundle to check them (--ca)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(ctx, config.cert, config.key, config.password())
    if config.ca is not None:
        _load_ca(ctx, config.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if config.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(config: TlsConfig) -> ssl.SSLContext:
    """The sender's context: the server is verified against ``ca`` (else the system's CAs)
    and its name checked; with ``cert``, the sender presents its own certificate (mTLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    _harden(ctx)
    if config.ca is not None:
        _load_ca(ctx, config.ca)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if config.cert is not None:
        _load_chain(ctx, config.cert, config.key, config.password())
    elif config.key is not None:
        raise UsageError("a key (--key) without its certificate (--cert)")
    return ctx


# -- identities ------------------------------------------------------------------------------

_SHORT = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "STREET",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "domainComponent": "DC",
    "userId": "UID",
}


def _escape(value: str) -> str:
    """RFC 4514 section 2.4 escaping of an attribute value."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        elif ch == "\0":
            out.append("\\00")
        else:
            out.append(ch)
    return "".join(out)


def format_subject(rdns: Iterable[Sequence[tuple[str, str]]]) -> str:
    """A distinguished name as an RFC 4514 string, most specific first (``CN=a,O=b``).

    ``rdns`` is in certificate order (country first), each RDN a sequence of (attribute,
    value), as :meth:`ssl.SSLSocket.getpeercert` gives it; short or long attribute names.
    """
    parts = []
    for rdn in reversed(list(rdns)):
        parts.append("+".join(f"{_SHORT.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(parts)


def peer_identity(sock: ssl.SSLSocket) -> str | None:
    """The verified peer certificate's subject, or None (no certificate, or not verified)."""
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):
        return None
    if not cert:  # {} when the certificate was not verified (CERT_NONE)
        return None
    subject = cert.get("subject")
    return format_subject(subject) if subject else None


def hostname_matches(name: str, dns_names: Iterable[str], ip_addresses: Iterable[str]) -> bool:
    """RFC 6125 name check against a certificate's subjectAltName entries: an IP literal
    matches an IP entry; a DNS name matches case-insensitively, ``*`` only as the whole
    leftmost label. The subject's CN is not consulted (as in browsers and Python's ssl)."""
    try:
        ip = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        ip = None
    if ip is not None:
        for entry in ip_addresses:
            try:
                if ipaddress.ip_address(entry) == ip:
                    return True
            except ValueError:
                continue
        return False
    host = name.rstrip(".").lower()
    for pattern in dns_names:
        pattern = pattern.rstrip(".").lower()
        if pattern == host:
            return True
        if pattern.startswith("*.") and "." in host:
            first, rest = host.split(".", 1)
            if first and rest == pattern[2:] and "*" not in rest and rest.count(".") >= 1:
                return True
    return False
