"""Datagrams over a byte stream, framed as RFC 4571 does for RTP: a 16-bit length, then
the datagram. Format A reports (GRE-in-UDP payloads, which do not say where they end) use
it over ``tcp://`` and ``tls://``; format B messages carry their own length and need none.
"""

from __future__ import annotations

import struct

from stm.errors import MalformedReport, UsageError
from stm.tlv import PROTOCOL_ID, TlvFramer

_LEN = struct.Struct("!H")
MAX_DATAGRAM = 0xFFFF
MIN_GRE = 4  # a GRE header without options


def frame(datagrams: list[bytes]) -> list[bytes]:
    """Each datagram with its length in front."""
    out = []
    for d in datagrams:
        if len(d) > MAX_DATAGRAM:
            raise UsageError(f"a {len(d)}-byte report does not fit RFC 4571 framing")
        out.append(_LEN.pack(len(d)) + d)
    return out


class Framed:
    """A stream destination that takes datagrams: frames them and hands them on."""

    def __init__(self, sender) -> None:
        self.sender = sender
        self.url = sender.url
        self.ip_header = sender.ip_header

    def send(self, datagrams: list[bytes]) -> None:
        self.sender.send(frame(datagrams))

    def stats(self) -> dict:
        return self.sender.stats()

    def close(self, timeout: float = 5.0) -> None:
        self.sender.close(timeout)


class DatagramFramer:
    """The receiving side, h11 style: ``receive_data`` then ``next_message`` until None.

    A frame that cannot be a GRE header (too short; routing, reserved or version bits set)
    is a framing error: the stream cannot be trusted after it and must be closed, as with
    HEP's framer. So a stray client (an HTTP request, say) is refused at once rather than
    waited for.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.failed = False

    def receive_data(self, data: bytes) -> None:
        if self.failed:
            raise MalformedReport("stream already failed; close the connection")
        if self._pos > 65536:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_message(self) -> bytes | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return None
        n = _LEN.unpack_from(buf, pos)[0]
        if n < MIN_GRE or buf[pos + 2] & 0x4F or buf[pos + 3] & 0x07:
            self.failed = True
            raise MalformedReport("not a GRE report in RFC 4571 framing")
        if len(buf) - pos - 2 < n:
            return None
        self._pos = pos + 2 + n
        return bytes(buf[pos + 2 : self._pos])


class AutoFramer:
    """Tells, from a connection's first bytes, format B (``HEP3``, framed by its own length)
    from RFC 4571-framed format A, and frames the rest of the stream accordingly."""

    def __init__(self) -> None:
        self._head = b""
        self._framer: DatagramFramer | TlvFramer | None = None

    @property
    def failed(self) -> bool:
        return self._framer is not None and self._framer.failed

    def receive_data(self, data: bytes) -> None:
        if self._framer is None:
            self._head += data
            if len(self._head) < 4:
                return
            hep = self._head.startswith(PROTOCOL_ID)
            self._framer = TlvFramer() if hep else DatagramFramer()
            data, self._head = self._head, b""
        self._framer.receive_data(data)

    def next_messages(self) -> list[bytes]:
        """Every complete format-B message buffered now, in one call (format A: none; its
        datagrams come one by one from ``next_message``)."""
        if isinstance(self._framer, TlvFramer):
            return self._framer.next_frames()
        return []

    def next_message(self) -> bytes | None:
        if self._framer is None:
            return None
        if isinstance(self._framer, TlvFramer):
            return self._framer.next_frame()
        return self._framer.next_message()
