"""pcapng options: decoded into typed values so that they survive a change of byte order.

An option value is an ``int`` (fixed-size integers, read in the section's byte order),
a ``str`` (UTF-8, undecodable bytes kept with ``surrogateescape`` so nothing is lost),
``bytes`` (addresses, hashes and every option stm does not know: copied verbatim),
or, for custom options, a ``(pen, bytes)`` pair. An option whose length does not fit its
type is kept as ``bytes`` rather than rejected, so odd files still round-trip.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from stm.errors import MalformedPcapng, UsageError
from stm.pcapng import constants as c

Option = tuple[int, "int | str | bytes | tuple[int, bytes]"]

# Kinds: 's' string, 'B' u8, 'I' u32, 'Q' u64, 'q' i64, 'i' i32, 'T' timestamp (two u32: high, low),
# 'P' two u32 (process id, thread id).
_COMMON = {c.OPT_COMMENT: "s"}
SHB_KINDS = {**_COMMON, c.SHB_HARDWARE: "s", c.SHB_OS: "s", c.SHB_USERAPPL: "s"}
IDB_KINDS = {
    **_COMMON,
    c.IF_NAME: "s",
    c.IF_DESCRIPTION: "s",
    c.IF_SPEED: "Q",
    c.IF_TSRESOL: "B",
    c.IF_TZONE: "i",
    c.IF_OS: "s",
    c.IF_FCSLEN: "B",
    c.IF_TSOFFSET: "q",
    c.IF_HARDWARE: "s",
    c.IF_TXSPEED: "Q",
    c.IF_RXSPEED: "Q",
    c.IF_IANA_TZNAME: "s",
}
EPB_KINDS = {
    **_COMMON,
    c.EPB_FLAGS: "I",
    c.EPB_DROPCOUNT: "Q",
    c.EPB_PACKETID: "Q",
    c.EPB_QUEUE: "I",
    c.EPB_PROCESSID_THREADID: "P",
}
PB_KINDS = {**_COMMON, c.EPB_FLAGS: "I"}
NRB_KINDS = {**_COMMON, c.NS_DNSNAME: "s"}
ISB_KINDS = {
    **_COMMON,
    c.ISB_STARTTIME: "T",
    c.ISB_ENDTIME: "T",
    c.ISB_IFRECV: "Q",
    c.ISB_IFDROP: "Q",
    c.ISB_FILTERACCEPT: "Q",
    c.ISB_OSDROP: "Q",
    c.ISB_USRDELIV: "Q",
}
GENERIC_KINDS = _COMMON

_SIZES = {"B": 1, "I": 4, "Q": 8, "q": 8, "i": 4, "T": 8, "P": 8}
_STRUCTS = {bo: {k: struct.Struct(bo + ("II" if k in "TP" else k)) for k in _SIZES} for bo in "<>"}
_HDR = {bo: struct.Struct(bo + "HH") for bo in "<>"}
_PEN = {bo: struct.Struct(bo + "I") for bo in "<>"}
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
_END = b"\0\0\0\0"


def decode_options(
    buf: memoryview, start: int, end: int, bo: str, kinds: dict[int, str], base: int
) -> tuple[Option, ...]:
    """Decode the options in ``buf[start:end]``; ``base`` is the stream offset of ``buf[0]``."""
    hdr = _HDR[bo]
    structs = _STRUCTS[bo]
    out: list[Option] = []
    off = start
    while off + 4 <= end:
        code, length = hdr.unpack_from(buf, off)
        if code == c.OPT_ENDOFOPT:
            return tuple(out)
        vstart = off + 4
        vend = vstart + length
        if vend > end:
            raise MalformedPcapng(
                f"option {code} of length {length} runs past the end of its block", base + off
            )
        raw = bytes(buf[vstart:vend])
        kind = kinds.get(code)
        value: int | str | bytes | tuple[int, bytes]
        if kind == "s":
            value = raw.decode("utf-8", "surrogateescape")
        elif kind is not None and _SIZES[kind] == length:
            if kind in "TP":
                hi, lo = structs[kind].unpack(raw)
                value = (hi << 32) | lo if kind == "T" else raw if bo == ">" else _swap_pair(raw)
            else:
                value = structs[kind].unpack(raw)[0]
        elif code in c.CUSTOM_OPTIONS and length >= 4:
            value = (_PEN[bo].unpack_from(raw)[0], raw[4:])
        else:
            value = raw
        out.append((code, value))
        off = vend + (-length & 3)
    if off != end:
        raise MalformedPcapng("option header runs past the end of its block", base + off)
    return tuple(out)


def _swap_pair(raw: bytes) -> bytes:
    """Process and thread id, stored big-endian so the value does not depend on the section."""
    a, b = struct.unpack("<II", raw)
    return struct.pack(">II", a, b)


def encode_options(options: Iterable[Option], bo: str, kinds: dict[int, str]) -> bytes:
    """Encode options (with the closing opt_endofopt), or ``b""`` when there are none."""
    hdr = _HDR[bo]
    structs = _STRUCTS[bo]
    parts: list[bytes] = []
    for code, value in options:
        if isinstance(value, str):
            raw = value.encode("utf-8", "surrogateescape")
        elif isinstance(value, int):
            kind = kinds.get(code)
            if kind is None or kind in "sP":
                raise UsageError(f"option {code} does not take an integer")
            try:
                raw = (
                    structs[kind].pack(value >> 32, value & 0xFFFFFFFF)
                    if kind == "T"
                    else structs[kind].pack(value)
                )
            except struct.error as exc:
                raise UsageError(f"option {code}: {value} does not fit: {exc}") from None
        elif isinstance(value, tuple):
            pen, data = value
            raw = _PEN[bo].pack(pen) + bytes(data)
        else:
            raw = bytes(value)
            if kinds.get(code) == "P" and bo == "<":
                raw = _swap_pair(raw) if len(raw) == 8 else raw
        if len(raw) > 0xFFFF:
            raise UsageError(f"option {code} is longer than 65535 bytes")
        parts += (hdr.pack(code, len(raw)), raw, _PAD[len(raw) & 3])
    if not parts:
        return b""
    parts.append(_END)
    return b"".join(parts)


def first(options: Iterable[Option], code: int, default=None):
    """The value of the first option ``code``, or ``default``."""
    for k, v in options:
        if k == code:
            return v
    return default
