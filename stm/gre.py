"""GRE header codec (RFC 2784 + RFC 2890) for STM reports carried as GRE-in-UDP (RFC 8086).

Sans-IO: bytes in, frozen dataclasses out, and back; no sockets, no clock. The encoder is on
the sender's hot path, so it only packs precompiled ``struct.Struct`` objects and leaves range
checks to ``struct`` itself (a bad field becomes :class:`~stm.errors.UsageError`). The decoder
is fed bytes from the network: for any input it returns or raises
:class:`~stm.errors.MalformedReport`, nothing else.

Header layout (RFC 2890 section 2; bit 0 is the most significant bit)::

    |C| |K|S| Reserved0       | Ver |         Protocol Type         |
    |      Checksum (if C)          |       Reserved1 (if C)        |
    |                         Key (if K)                            |
    |                 Sequence Number (if S)                        |
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stm.errors import MalformedReport, UsageError

__all__ = [
    "GRE_DTLS_PORT",
    "GRE_UDP_PORT",
    "SOURCE_PORT_RANGE",
    "STM_PROTOCOL_TYPE",
    "GreHeader",
    "decode",
    "encode",
    "encode_header",
    "entropy_source_port",
    "header_length",
    "internet_checksum",
    "seq_add",
    "seq_diff",
]

GRE_UDP_PORT = 4754
"""UDP destination port for GRE-in-UDP (RFC 8086 section 3.2.1)."""
GRE_DTLS_PORT = 4755
"""UDP destination port for GRE-in-UDP over DTLS (RFC 8086 section 7)."""
STM_PROTOCOL_TYPE = 0x88B5
"""IEEE 802 local experimental EtherType: our default GRE protocol type for STM reports."""
SOURCE_PORT_RANGE = (49152, 65535)
"""Ephemeral range the RFC 8086 entropy source port should be drawn from (inclusive)."""

Buffer = bytes | bytearray | memoryview

# Flag bits of the first 16-bit word.
_C = 0x8000  # bit 0: checksum present (RFC 2784)
_R = 0x4000  # bit 1: routing present (RFC 1701 only; not supported)
_K = 0x2000  # bit 2: key present (RFC 2890)
_S = 0x1000  # bit 3: sequence number present (RFC 2890)
# RFC 2784 section 2.3: a receiver MUST discard a packet where any of bits 1-5 are non-zero
# (unless it implements RFC 1701, which we do not). RFC 2890 gives bits 2 and 3 a meaning, and
# bit 1 (R) gets its own error message, so this mask is what remains: bits 4 (RFC 1701 strict
# source route) and 5 (top bit of RFC 1701 Recur). Bits 6-12 MUST be ignored on receipt.
_DISCARD_BITS = 0x0C00
_VERSION = 0x0007  # bits 13-15; RFC 2784 section 2.3.1: MUST be zero

_U16_MOD = 0xFFFF  # 2**16 == 1 (mod 0xFFFF): a number mod 0xFFFF is its 16-bit word sum mod 0xFFFF

# One precompiled Struct per header shape, so that encode/decode only pick one and pack it.
_HH = struct.Struct("!HH")  # flags, protocol type
_HHI = struct.Struct("!HHI")  # + key or sequence
_HHII = struct.Struct("!HHII")  # + key, sequence
_HHHH = struct.Struct("!HHHH")  # flags, protocol type, checksum, reserved1
_HHHHI = struct.Struct("!HHHHI")  # + key or sequence
_HHHHII = struct.Struct("!HHHHII")  # + key, sequence

_pack_hh = _HH.pack
_pack_hhi = _HHI.pack
_pack_hhii = _HHII.pack
_pack_hhhh = _HHHH.pack
_pack_hhhhi = _HHHHI.pack
_pack_hhhhii = _HHHHII.pack
_unpack_hh = _HH.unpack_from
_unpack_hhi = _HHI.unpack_from
_unpack_hhii = _HHII.unpack_from
_unpack_hhhhi = _HHHHI.unpack_from
_unpack_hhhhii = _HHHHII.unpack_from

# Header length indexed by ``flags >> 12`` (C, R, K, S bits); R is rejected before lookup.
_HEADER_LEN = tuple(4 + 4 * ((i >> 3) & 1) + 4 * ((i >> 1) & 1) + 4 * (i & 1) for i in range(16))


@dataclass(frozen=True, slots=True)
class GreHeader:
    """One GRE header. Version is always 0; ``None`` means the optional field is absent.

    ``checksum`` says whether the C bit (checksum + reserved1 words) is present: the value
    itself is computed on encode and verified on decode, so it is not kept here.
    """

    protocol_type: int
    key: int | None = None
    sequence: int | None = None
    checksum: bool = False


def header_length(header: GreHeader) -> int:
    """Bytes the encoded header takes: 4, plus 4 for each of checksum, key, sequence."""
    return (
        4
        + (4 if header.checksum else 0)
        + (4 if header.key is not None else 0)
        + (4 if header.sequence is not None else 0)
    )


def _sum_mod(data: Buffer) -> int:
    """One's complement sum of ``data`` as 16-bit big-endian words, reduced mod 0xFFFF.

    ``int.from_bytes`` and one modulo by a single-digit divisor run in C in linear time, which
    beats any per-word Python loop. An odd trailing byte is padded with zero (RFC 1071).
    """
    r = int.from_bytes(data, "big") % _U16_MOD
    if (data.nbytes if isinstance(data, memoryview) else len(data)) & 1:
        r = (r << 8) % _U16_MOD
    return r


def internet_checksum(data: Buffer) -> int:
    """RFC 1071 Internet checksum of ``data`` (big-endian 16-bit words, odd length padded).

    Feeding it a packet that already contains its correct checksum gives 0.
    """
    n = int.from_bytes(data, "big")
    if not n:
        # One's complement sum of nothing but zero words is +0, whose complement is 0xFFFF.
        return 0xFFFF
    r = n % _U16_MOD
    if (data.nbytes if isinstance(data, memoryview) else len(data)) & 1:
        r = (r << 8) % _U16_MOD
    # A non-zero end-around-carry sum is never 0: a multiple of 0xFFFF folds to 0xFFFF.
    return _U16_MOD - r if r else 0


def encode_header(header: GreHeader, payload_for_checksum: Buffer | None = None) -> bytes:
    """Encode only the GRE header, so callers can ``sendmsg([hdr, payload])`` without a copy.

    When ``header.checksum`` is set the checksum covers header and payload, so the payload must
    be passed as ``payload_for_checksum`` (``b""`` for an empty one). Out-of-range or non-int
    fields raise :class:`UsageError`.
    """
    return pack_header(
        header.protocol_type, header.key, header.sequence, header.checksum, payload_for_checksum
    )


def pack_header(
    protocol_type: int,
    key: int | None,
    sequence: int | None,
    checksum: bool = False,
    payload_for_checksum: Buffer | None = None,
) -> bytes:
    """``encode_header`` without building a ``GreHeader``: for the per-datagram hot path."""
    try:
        if not checksum:
            if key is None:
                if sequence is None:
                    return _pack_hh(0, protocol_type)
                return _pack_hhi(_S, protocol_type, sequence)
            if sequence is None:
                return _pack_hhi(_K, protocol_type, key)
            return _pack_hhii(_K | _S, protocol_type, key, sequence)
        if payload_for_checksum is None:
            raise UsageError("GRE checksum requested but no payload given to compute it over")
        # The header is word aligned (4 to 16 bytes), so its words just add to the payload sum;
        # a 32-bit field adds as its two 16-bit halves, and 2**16 == 1 (mod 0xFFFF).
        flags = _C
        total = protocol_type + _sum_mod(payload_for_checksum)
        if key is not None:
            flags |= _K
            total += key
        if sequence is not None:
            flags |= _S
            total += sequence
        total = (total + flags) % _U16_MOD
        # The C bit makes the sum non-zero, so a multiple of 0xFFFF folds to 0xFFFF (checksum 0).
        csum = _U16_MOD - total if total else 0
        if key is None:
            if sequence is None:
                return _pack_hhhh(flags, protocol_type, csum, 0)
            return _pack_hhhhi(flags, protocol_type, csum, 0, sequence)
        if sequence is None:
            return _pack_hhhhi(flags, protocol_type, csum, 0, key)
        return _pack_hhhhii(flags, protocol_type, csum, 0, key, sequence)
    except (struct.error, TypeError) as exc:
        raise UsageError(
            f"cannot encode GRE header (protocol type {protocol_type!r}, key {key!r}, "
            f"sequence {sequence!r}): {exc}"
        ) from exc


def encode(header: GreHeader, payload: Buffer) -> bytes:
    """Encode a full GRE packet: header then payload (one copy of the payload)."""
    return encode_header(header, payload if header.checksum else None) + payload


def decode(data: Buffer, verify_checksum: bool = True) -> tuple[GreHeader, memoryview]:
    """Parse a GRE packet; return its header and the payload as a zero-copy memoryview.

    Raises :class:`MalformedReport` for truncated input, a non-zero version, the RFC 1701
    routing bit, reserved bits 4-5 (RFC 2784 section 2.3 says discard), or a bad checksum when
    present and ``verify_checksum``. Reserved bits 6-12 and Reserved1 are ignored, as RFC 2784
    requires. The protocol type is not checked: that is the caller's business.
    """
    protocol_type, key, sequence, checksum, payload = parse(data, verify_checksum)
    return GreHeader(protocol_type, key, sequence, checksum), payload


def parse(
    data: Buffer, verify_checksum: bool = True
) -> tuple[int, int | None, int | None, bool, memoryview]:
    """``decode`` as a plain tuple (protocol type, key, sequence, checksum, payload), for the
    per-datagram hot path where building a frozen dataclass would cost more than the parse."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    size = len(view)
    if size < 4:
        raise MalformedReport(f"truncated GRE header: {size} bytes, need at least 4")
    flags, protocol_type = _unpack_hh(view)
    if flags & _VERSION:
        raise MalformedReport(f"unsupported GRE version {flags & _VERSION}, only 0 is defined")
    if flags & _R:
        raise MalformedReport("GRE routing present bit (R, RFC 1701) set: not supported")
    if flags & _DISCARD_BITS:
        raise MalformedReport(
            f"GRE reserved0 bits 4-5 set (flags 0x{flags:04x}): RFC 2784 says discard"
        )
    hlen = _HEADER_LEN[flags >> 12]
    if size < hlen:
        raise MalformedReport(f"truncated GRE header: {size} bytes, flags say {hlen}")
    has_key = flags & _K
    has_seq = flags & _S
    key = sequence = None
    if flags & _C:
        if verify_checksum and _sum_mod(view):
            raise MalformedReport(_checksum_error(view))
        if has_key:
            if has_seq:
                _, _, _, _, key, sequence = _unpack_hhhhii(view)
            else:
                _, _, _, _, key = _unpack_hhhhi(view)
        elif has_seq:
            _, _, _, _, sequence = _unpack_hhhhi(view)
        return protocol_type, key, sequence, True, view[hlen:]
    if has_key:
        if has_seq:
            _, _, key, sequence = _unpack_hhii(view)
        else:
            _, _, key = _unpack_hhi(view)
    elif has_seq:
        _, _, sequence = _unpack_hhi(view)
    return protocol_type, key, sequence, False, view[hlen:]


def _checksum_error(view: memoryview) -> str:
    """Message for a bad checksum, with the value that would have been right (error path only)."""
    received = _unpack_hh(view, 4)[0]
    without = (_sum_mod(view) - received) % _U16_MOD
    expected = _U16_MOD - without if without else 0
    return f"GRE checksum mismatch: packet has 0x{received:04x}, computed 0x{expected:04x}"


_MASK64 = (1 << 64) - 1


def entropy_source_port(stream_key: int) -> int:
    """UDP source port for a stream: stable per stream, spread over the ephemeral range.

    RFC 8086 section 3.2.1 uses the source port as a per-flow entropy value for ECMP and asks
    for it to stay in 49152-65535. A splitmix64 finaliser mixes the key so that neighbouring
    stream keys land on unrelated ports; no ``hash()``, so it is the same in every process.
    """
    if not isinstance(stream_key, int) or stream_key < 0:
        raise UsageError(f"stream key must be a non-negative int, got {stream_key!r}")
    z = stream_key
    while z >> 64:  # fold wide keys down to 64 bits
        z = (z & _MASK64) ^ (z >> 64)
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    low, high = SOURCE_PORT_RANGE
    return low + z % (high - low + 1)


_SEQ_MASK = 0xFFFFFFFF
_SEQ_HALF = 0x80000000


def seq_add(a: int, n: int) -> int:
    """``a + n`` in the 32-bit GRE sequence space (wraps past 2**32 - 1 to 0)."""
    return (a + n) & _SEQ_MASK


def seq_diff(a: int, b: int) -> int:
    """Signed distance ``a - b`` across wrap-around (RFC 1982 serial arithmetic).

    Result is in -2**31..2**31-1 and ``seq_add(b, seq_diff(a, b)) == a``; positive means ``a``
    is after ``b``. A gap of exactly 2**31 is ambiguous in RFC 1982 and comes back as -2**31.
    """
    return ((a - b + _SEQ_HALF) & _SEQ_MASK) - _SEQ_HALF
