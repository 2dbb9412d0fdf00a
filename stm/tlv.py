"""STM report format B: the generic TLV message, in the HEP3/EEP wire layout.

3GPP TS 28.560 format B is a protocol ID, a total length and a non-empty list of
type-length-value chunks. Our profile is byte-for-byte HEP version 3 (sipcapture "HEP3", also
called EEP), so HOMER/heplify collectors, Kamailio/OpenSIPS ``sipcapture`` and the HEP
Wireshark plugin read the generic chunks we send. Layout (network byte order)::

    message: "HEP3" (4 bytes) | total length u16 (whole message, header included) | chunk...
    chunk:   vendor ID u16 | type ID u16 | length u16 (whole chunk, 6-byte header included)
             | value (length - 6 bytes)

This module is the sans-IO codec of that message/chunk layer only: bytes in, frozen objects
out, and back. No sockets, no clock, no packet parsing. Decoders are fed bytes from the
network: for any input they return or raise :class:`~stm.errors.MalformedReport`, nothing
else. Encoders raise :class:`~stm.errors.UsageError` for values that cannot be represented.

Sources for every number below (the HEP3 specification itself is only published as PDF,
sipcapture/HEP ``docs/HEP3_Network_Protocol_Specification_REV_*.pdf``; these public sources
agree with each other on every value we use):

* [OS] OpenSIPS ``modules/proto_hep/hep.h``: ``enum hep_generic_chunks`` 0x0001-0x0012,
  ``HEP_OPENSIPS_VENDOR_ID 0x0003``.
* [HS] sipcapture/heplify-server ``decoder/decoder.go`` and ``decoder/hep.go``: chunk
  constants 0x0001-0x0013 with their value sizes, both lengths include the 6-byte headers.
* [HC] sipcapture/hep-c ``core_hep.h`` and Kamailio ``src/modules/sipcapture/hep.h``: chunk
  value C types (capture agent ID u32, keep-alive timer u16, ...).
* [HJ] sipcapture/hep-js ``index.js``: encoder, chunk lengths include the header.
* [HW] sipcapture/hep-wireshark ``lua/hep.lua``: chunks 0x0001-0x0020 and the protocol type
  (0x000b) value table up to 0x64 LOG.
* [VM] voipmonitor/sniffer ``hep.h``: chunk types 0x0001-0x0027, protocol types up to 0x3c,
  and the vendor ID list 1-8.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from stm import accel
from stm.errors import MalformedReport, UsageError

__all__ = [
    "CHUNK_HEADER_LENGTH",
    "GENERIC_VALUE_TYPES",
    "HEADER_LENGTH",
    "HEP_PORT",
    "HEP_VENDOR",
    "IP_FAMILY_IPV4",
    "IP_FAMILY_IPV6",
    "MAX_MESSAGE_LENGTH",
    "MAX_VALUE_LENGTH",
    "MIN_MESSAGE_LENGTH",
    "PROTOCOL_ID",
    "STM_VALUE_TYPES",
    "STM_VENDOR",
    "Chunk",
    "HepChunk",
    "HepProto",
    "HepVendor",
    "Message",
    "StmChunk",
    "StmFragment",
    "StmTimestamp",
    "TlvFramer",
    "ValueType",
    "auth_key_matches",
    "chunk_bytes",
    "chunk_ipv4",
    "chunk_ipv6",
    "chunk_str",
    "chunk_u8",
    "chunk_u16",
    "chunk_u32",
    "decode_message",
    "encode_message",
    "frame_length",
    "hep_chunk",
    "stm_chunk",
    "typed_value",
]

Buffer = bytes | bytearray | memoryview

PROTOCOL_ID = b"HEP3"
"""The 4-byte protocol ID that opens every message (0x48455033) [OS][HS][HJ]."""
HEADER_LENGTH = 6
"""Protocol ID + total length."""
CHUNK_HEADER_LENGTH = 6
"""Vendor ID + type ID + chunk length."""
MAX_MESSAGE_LENGTH = 0xFFFF
"""The total length field is 16 bits and counts the whole message."""
MIN_MESSAGE_LENGTH = HEADER_LENGTH + CHUNK_HEADER_LENGTH
"""Header plus one empty chunk: the chunk list must not be empty."""
MAX_VALUE_LENGTH = MAX_MESSAGE_LENGTH - HEADER_LENGTH - CHUNK_HEADER_LENGTH
"""Largest value of a lone chunk; the chunk length field alone would allow 6 more bytes."""
HEP_PORT = 9060
"""De facto HEP collector port (UDP and TCP) [HC][HW]."""
HEP_VENDOR = 0x0000
"""Vendor ID of the generic chunks defined by the HEP3 specification itself."""
IP_FAMILY_IPV4 = 2
"""Value of the IP protocol family chunk (0x0001) for IPv4: AF_INET [HW]."""
IP_FAMILY_IPV6 = 10
"""Value of the IP protocol family chunk (0x0001) for IPv6: Linux AF_INET6 [HW]."""

STM_VENDOR = 0x5354
"""Vendor ID of our own chunks: ASCII "ST".

The HEP vendor registry is a short run of small numbers (0 generic, 1 FreeSWITCH ... 8
Genesys [VM]); 0x5354 is far from it and unassigned. Receivers that honour the vendor ID skip
chunks of vendors they do not know.
"""


class HepVendor(enum.IntEnum):
    """Vendor IDs registered in the HEP3 specification (first chunk field) [VM][OS]."""

    GENERIC = 0x0000
    FREESWITCH = 0x0001
    KAMAILIO = 0x0002
    OPENSIPS = 0x0003
    ASTERISK = 0x0004
    HOMER = 0x0005
    SIPXECS = 0x0006
    YETI = 0x0007
    GENESYS = 0x0008


class ValueType(enum.Enum):
    """How a chunk value is laid out; every integer is big-endian."""

    U8 = "u8"
    U16 = "u16"
    U32 = "u32"
    IPV4 = "ipv4"  # 4 bytes
    IPV6 = "ipv6"  # 16 bytes
    BYTES = "bytes"
    UTF8 = "utf-8"
    STM_TIMESTAMP = "stm-timestamp"  # u8 tsresol, u64 ticks, i64 tsoffset
    STM_FRAGMENT = "stm-fragment"  # u32 packet ID, u32 offset, u32 total length, bytes


class HepChunk(enum.IntEnum):
    """Generic chunk type IDs (vendor 0) of the HEP3 specification.

    0x0001-0x0012 agree in [OS], [HS], [VM], [HW]; 0x0013 is "group ID" in [VM][HW] and
    "NodeName" in [HS]; 0x0014-0x0027 are from [VM] (0x0014-0x0018 and 0x0020 also [HW]).
    """

    IP_FAMILY = 0x0001  # u8: 2 IPv4, 10 IPv6
    IP_PROTO = 0x0002  # u8: IANA protocol number (6 TCP, 17 UDP, 132 SCTP)
    IPV4_SRC = 0x0003
    IPV4_DST = 0x0004
    IPV6_SRC = 0x0005
    IPV6_DST = 0x0006
    SRC_PORT = 0x0007  # u16
    DST_PORT = 0x0008  # u16
    TIMESTAMP_SEC = 0x0009  # u32 Unix seconds
    TIMESTAMP_USEC = 0x000A  # u32 microseconds offset
    PROTO_TYPE = 0x000B  # u8, see HepProto
    CAPTURE_ID = 0x000C  # u32 capture agent ID
    KEEPALIVE_TIMER = 0x000D  # u16 seconds
    AUTH_KEY = 0x000E  # octets (plain text password)
    PAYLOAD = 0x000F  # octets: the captured packet payload
    COMPRESSED_PAYLOAD = 0x0010  # octets: compressed payload
    CORRELATION_ID = 0x0011  # string
    VLAN_ID = 0x0012  # u16
    GROUP_ID = 0x0013  # string ("NodeName" in heplify-server)
    SRC_MAC = 0x0014  # octets
    DST_MAC = 0x0015  # octets
    ETHERNET_TYPE = 0x0016  # u16
    TCP_FLAGS = 0x0017  # u8
    IP_TOS = 0x0018  # u8
    MOS = 0x0020  # u16
    R_FACTOR = 0x0021  # u16
    GEO_LOCATION = 0x0022  # string
    JITTER = 0x0023  # u32
    TRANSACTION_TYPE = 0x0024  # string
    PAYLOAD_JSON_KEYS = 0x0025  # string
    TAGS_VALUES = 0x0026  # string
    TAG_TYPE = 0x0027  # u16


GENERIC_VALUE_TYPES: dict[int, ValueType] = {
    HepChunk.IP_FAMILY: ValueType.U8,
    HepChunk.IP_PROTO: ValueType.U8,
    HepChunk.IPV4_SRC: ValueType.IPV4,
    HepChunk.IPV4_DST: ValueType.IPV4,
    HepChunk.IPV6_SRC: ValueType.IPV6,
    HepChunk.IPV6_DST: ValueType.IPV6,
    HepChunk.SRC_PORT: ValueType.U16,
    HepChunk.DST_PORT: ValueType.U16,
    HepChunk.TIMESTAMP_SEC: ValueType.U32,
    HepChunk.TIMESTAMP_USEC: ValueType.U32,
    HepChunk.PROTO_TYPE: ValueType.U8,
    HepChunk.CAPTURE_ID: ValueType.U32,
    HepChunk.KEEPALIVE_TIMER: ValueType.U16,
    HepChunk.AUTH_KEY: ValueType.BYTES,
    HepChunk.PAYLOAD: ValueType.BYTES,
    HepChunk.COMPRESSED_PAYLOAD: ValueType.BYTES,
    HepChunk.CORRELATION_ID: ValueType.UTF8,
    HepChunk.VLAN_ID: ValueType.U16,
    HepChunk.GROUP_ID: ValueType.UTF8,
    HepChunk.SRC_MAC: ValueType.BYTES,
    HepChunk.DST_MAC: ValueType.BYTES,
    HepChunk.ETHERNET_TYPE: ValueType.U16,
    HepChunk.TCP_FLAGS: ValueType.U8,
    HepChunk.IP_TOS: ValueType.U8,
    HepChunk.MOS: ValueType.U16,
    HepChunk.R_FACTOR: ValueType.U16,
    HepChunk.GEO_LOCATION: ValueType.UTF8,
    HepChunk.JITTER: ValueType.U32,
    HepChunk.TRANSACTION_TYPE: ValueType.UTF8,
    HepChunk.PAYLOAD_JSON_KEYS: ValueType.UTF8,
    HepChunk.TAGS_VALUES: ValueType.UTF8,
    HepChunk.TAG_TYPE: ValueType.U16,
}
"""Value layout of each generic chunk type."""


class HepProto(enum.IntEnum):
    """Values of the protocol type chunk (0x000b): what the payload chunk carries.

    0x01-0x0d and 0x22-0x39 agree in [VM] and [HW]; 0x3a and 0x3c are from [VM]; 0x64 from
    [HW] and [HS]. 0x0b is spelled "H3222" in both (some other code says "H322").
    """

    SIP = 0x01
    XMPP = 0x02
    SDP = 0x03
    RTP = 0x04
    RTCP_JSON = 0x05
    MGCP = 0x06
    MEGACO = 0x07  # H.248
    M2UA = 0x08
    M3UA = 0x09
    IAX = 0x0A
    H3222 = 0x0B
    H321 = 0x0C
    M2PA = 0x0D
    MOS_FULL_REPORT_JSON = 0x22
    MOS_SHORT_REPORT = 0x23
    SIP_JSON = 0x32
    DNS_JSON = 0x35
    M3UA_ISUP_JSON = 0x36
    RTSP = 0x37
    DIAMETER = 0x38
    GSM_MAP = 0x39
    RTCP_PION = 0x3A
    CDR = 0x3C
    LOG = 0x64


class StmChunk(enum.IntEnum):
    """Chunk type IDs of our own chunks (vendor :data:`STM_VENDOR`).

    They carry what pcapng needs and HEP has no chunk for, so a receiver can rebuild the
    captured frame exactly. The numbers live in 0x5301-0x530F, away from the generic range
    (0x0001-0x0027 so far), because some collectors switch on the type ID alone and ignore
    the vendor ID (heplify-server's ``parseHEP`` does [HS]): a generic-looking type number
    would be misread there and could make it drop the whole message.

    ======  ==================  ==========================================================
    type    name                value
    ======  ==================  ==========================================================
    0x5301  FRAME_HEADER        bytes: the frame before the transport payload (link, IP,
                                transport headers), so frame = FRAME_HEADER + PAYLOAD
    0x5302  FRAME               bytes: the whole frame, when it is not IP (no PAYLOAD)
    0x5303  LINKTYPE            u16: pcap/pcapng LINKTYPE_* of the frame
    0x5304  TIMESTAMP           17 bytes: u8 if_tsresol byte as in pcapng, u64 timestamp
                                in those units (the EPB high:low pair), i64 if_tsoffset
                                seconds; holds any pcapng value exactly
    0x5305  ORIGINAL_LENGTH     u32: frame length on the wire (EPB original length)
    0x5306  INTERFACE           u32 snaplen, then the pcapng IDB option list (if_name,
                                if_tsresol, ..., stm's ``if=N``), all big-endian
    0x5307  PRODUCER            utf-8: the producer (NF) name
    0x5308  SESSION             8 bytes: random per sender start, to tell restarts from loss
    0x5309  STREAM_ID           u32: sender's stream ID (as the GRE key of format A)
    0x530A  SEQUENCE            u32: per-stream sequence number of the message
    0x530B  COMMENT             utf-8: opt_comment; repeatable
    0x530C  FLAGS               u32: pcapng epb_flags
    0x530D  FRAGMENT            u32 packet ID, u32 offset, u32 total length, then bytes
    0x530E  FRAME_TRAILER       bytes: what follows the IP packet in the frame (Ethernet
                                padding, a trailer), so frame = HEADER + PAYLOAD + TRAILER
    0x530F  PACKET_OPTIONS      bytes: the other EPB options, as a big-endian option list
    ======  ==================  ==========================================================
    """

    FRAME_HEADER = 0x5301
    FRAME = 0x5302
    LINKTYPE = 0x5303
    TIMESTAMP = 0x5304
    ORIGINAL_LENGTH = 0x5305
    INTERFACE = 0x5306
    PRODUCER = 0x5307
    SESSION = 0x5308
    STREAM_ID = 0x5309
    SEQUENCE = 0x530A
    COMMENT = 0x530B
    FLAGS = 0x530C
    FRAGMENT = 0x530D
    FRAME_TRAILER = 0x530E
    PACKET_OPTIONS = 0x530F


STM_VALUE_TYPES: dict[int, ValueType] = {
    StmChunk.FRAME_HEADER: ValueType.BYTES,
    StmChunk.FRAME: ValueType.BYTES,
    StmChunk.LINKTYPE: ValueType.U16,
    StmChunk.TIMESTAMP: ValueType.STM_TIMESTAMP,
    StmChunk.ORIGINAL_LENGTH: ValueType.U32,
    StmChunk.INTERFACE: ValueType.BYTES,
    StmChunk.PRODUCER: ValueType.UTF8,
    StmChunk.SESSION: ValueType.BYTES,
    StmChunk.STREAM_ID: ValueType.U32,
    StmChunk.SEQUENCE: ValueType.U32,
    StmChunk.COMMENT: ValueType.UTF8,
    StmChunk.FLAGS: ValueType.U32,
    StmChunk.FRAGMENT: ValueType.STM_FRAGMENT,
    StmChunk.FRAME_TRAILER: ValueType.BYTES,
    StmChunk.PACKET_OPTIONS: ValueType.BYTES,
}
"""Value layout of each STM chunk type."""


# Precompiled structs: encode/decode only pick one and pack or unpack it.
_HEADER = struct.Struct("!4sH")
_CHUNK_HEADER = struct.Struct("!HHH")
_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_TIMESTAMP = struct.Struct("!BQq")
_FRAGMENT = struct.Struct("!III")

_pack_header = _HEADER.pack
_pack_chunk_header = _CHUNK_HEADER.pack
_unpack_header = _HEADER.unpack_from
_unpack_chunk_header = _CHUNK_HEADER.unpack_from


@dataclass(frozen=True, slots=True)
class Chunk:
    """One TLV chunk. ``value`` excludes the 6-byte chunk header.

    Construction checks ranges (UsageError), so every Chunk can be encoded; the ``as_*``
    readers check the value layout (MalformedReport), because values come from the network.
    """

    vendor: int
    type: int
    value: bytes

    def __post_init__(self) -> None:
        vendor, ctype, value = self.vendor, self.type, self.value
        if type(vendor) is not int or type(ctype) is not int:
            if not isinstance(vendor, int) or not isinstance(ctype, int):
                raise UsageError(f"chunk vendor and type must be int, not {vendor!r}, {ctype!r}")
            object.__setattr__(self, "vendor", int(vendor))  # IntEnum -> plain int
            object.__setattr__(self, "type", int(ctype))
        if not (0 <= vendor <= 0xFFFF and 0 <= ctype <= 0xFFFF):
            raise UsageError(f"chunk vendor {vendor} / type {ctype} out of range 0-65535")
        if type(value) is not bytes:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise UsageError(f"chunk value must be bytes, not {type(value).__name__}")
            value = bytes(value)
            object.__setattr__(self, "value", value)
        if len(value) > MAX_VALUE_LENGTH:
            raise UsageError(f"chunk value of {len(value)} bytes exceeds {MAX_VALUE_LENGTH}")

    def _fixed(self, size: int, what: str) -> bytes:
        value = self.value
        if len(value) != size:
            raise MalformedReport(
                f"chunk {self.vendor:#06x}/{self.type:#06x}: {what} value must be "
                f"{size} bytes, got {len(value)}"
            )
        return value

    def as_u8(self) -> int:
        """The value as an unsigned 8-bit integer."""
        return self._fixed(1, "u8")[0]

    def as_u16(self) -> int:
        """The value as a big-endian unsigned 16-bit integer."""
        return _U16.unpack(self._fixed(2, "u16"))[0]

    def as_u32(self) -> int:
        """The value as a big-endian unsigned 32-bit integer."""
        return _U32.unpack(self._fixed(4, "u32"))[0]

    def as_ipv4(self) -> ipaddress.IPv4Address:
        """The value as a 4-byte IPv4 address."""
        return ipaddress.IPv4Address(self._fixed(4, "IPv4"))

    def as_ipv6(self) -> ipaddress.IPv6Address:
        """The value as a 16-byte IPv6 address."""
        return ipaddress.IPv6Address(self._fixed(16, "IPv6"))

    def as_str(self) -> str:
        """The value as strict UTF-8 text."""
        try:
            return self.value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedReport(
                f"chunk {self.vendor:#06x}/{self.type:#06x}: value is not UTF-8: {exc.reason}"
            ) from None


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded or to-be-encoded TLV message: chunks in wire order."""

    chunks: tuple[Chunk, ...]

    def __post_init__(self) -> None:
        if type(self.chunks) is not tuple:
            object.__setattr__(self, "chunks", tuple(self.chunks))

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def get(self, vendor: int, type: int) -> Chunk | None:
        """The first chunk of that vendor and type, or None."""
        for chunk in self.chunks:
            if chunk.type == type and chunk.vendor == vendor:
                return chunk
        return None

    def get_all(self, vendor: int, type: int) -> tuple[Chunk, ...]:
        """Every chunk of that vendor and type, in wire order (COMMENT is repeatable)."""
        return tuple(c for c in self.chunks if c.type == type and c.vendor == vendor)

    def encode(self) -> bytes:
        """Same as ``encode_message(self.chunks)``."""
        return encode_message(self.chunks)


def encode_message(chunks: Iterable[Chunk]) -> bytes:
    """Serialise chunks into one message with a single ``b"".join``.

    Raises UsageError for an empty chunk list or a message over 65535 bytes.
    """
    parts: list[bytes] = [b""]
    append = parts.append
    pack = _pack_chunk_header
    total = HEADER_LENGTH
    try:
        for chunk in chunks:
            value = chunk.value
            size = CHUNK_HEADER_LENGTH + len(value)
            append(pack(chunk.vendor, chunk.type, size))
            append(value)
            total += size
    except (AttributeError, struct.error) as exc:
        raise UsageError(f"not a valid Chunk: {exc}") from None
    if total == HEADER_LENGTH:
        raise UsageError("a message needs at least one chunk")
    if total > MAX_MESSAGE_LENGTH:
        raise UsageError(f"message of {total} bytes exceeds {MAX_MESSAGE_LENGTH}")
    parts[0] = _pack_header(PROTOCOL_ID, total)
    return b"".join(parts)


def _bad_protocol_id(head: bytes) -> MalformedReport:
    if head and head[0] in (1, 2):
        # HEPv1/v2 start with a version byte (1 or 2) then a header length byte [HC].
        return MalformedReport(
            f"protocol ID {head!r} is not {PROTOCOL_ID!r}: first byte {head[0]:#04x} looks "
            "like HEPv1/HEPv2, which is not supported"
        )
    return MalformedReport(f"protocol ID {head!r} is not {PROTOCOL_ID!r}")


def _header_length(data: Buffer, pos: int, avail: int) -> int | None:
    """Total length announced by the header at ``data[pos:]``; None if it is incomplete."""
    if avail < HEADER_LENGTH:
        head = bytes(data[pos : pos + min(avail, 4)])
        if not PROTOCOL_ID.startswith(head):
            raise _bad_protocol_id(head)
        return None
    magic, total = _unpack_header(data, pos)
    if magic != PROTOCOL_ID:
        raise _bad_protocol_id(magic)
    if total < HEADER_LENGTH:
        raise MalformedReport(f"length field {total} is below the {HEADER_LENGTH}-byte header")
    return total


def _view(data: Buffer) -> memoryview:
    try:
        view = memoryview(data)
    except TypeError:
        raise UsageError(f"expected bytes, not {type(data).__name__}") from None
    if view.ndim != 1 or view.itemsize != 1:
        try:
            view = view.cast("B")
        except TypeError as exc:
            raise UsageError(f"expected a contiguous byte buffer: {exc}") from None
    return view


def frame_length(buf: Buffer) -> int | None:
    """Total length of the message that starts at ``buf[0]``, or None before 6 bytes arrive.

    Raises MalformedReport as soon as the bytes seen cannot start a HEP3 message (a wrong
    protocol ID prefix, or a length field below 6), so a stream reader fails fast on garbage.
    """
    with _view(buf) as view:
        return _header_length(view, 0, len(view))


def decode_message(data: Buffer) -> Message:
    """Parse exactly one message; ``data`` must hold it whole and nothing more.

    Raises MalformedReport for a wrong protocol ID (naming HEPv1/v2 when it looks like one),
    a length field below 6 or different from ``len(data)``, a chunk length below 6, a chunk
    running past the end, or an empty chunk list. Values are copied out as bytes.
    """
    with _view(data) as view:
        size = len(view)
        total = _header_length(view, 0, size)
        if total is None:
            raise MalformedReport(f"truncated: {size} bytes, a HEP3 header needs {HEADER_LENGTH}")
        if total != size:
            raise MalformedReport(f"length field says {total} bytes but {size} were given")
        chunks: list[Chunk] = []
        append = chunks.append
        unpack = _unpack_chunk_header
        pos = HEADER_LENGTH
        while pos < size:
            if size - pos < CHUNK_HEADER_LENGTH:
                raise MalformedReport(
                    f"truncated chunk header at byte {pos}: {size - pos} bytes left"
                )
            vendor, ctype, length = unpack(view, pos)
            if length < CHUNK_HEADER_LENGTH:
                raise MalformedReport(
                    f"chunk at byte {pos} has length {length}, below its "
                    f"{CHUNK_HEADER_LENGTH}-byte header"
                )
            end = pos + length
            if end > size:
                raise MalformedReport(
                    f"chunk at byte {pos} of length {length} runs past the end ({size})"
                )
            append(Chunk(vendor, ctype, view[pos + CHUNK_HEADER_LENGTH : end].tobytes()))
            pos = end
    if not chunks:
        raise MalformedReport("empty chunk list")
    return Message(tuple(chunks))


class TlvFramer:
    """Splits a TCP byte stream into messages, h11/wsproto style.

    Feed bytes with :meth:`receive_data` (``b""`` means end of stream), then call
    :meth:`next_message` until it returns None. HEP over TCP has no resynchronisation point,
    so a framing error (bad protocol ID, bad or over-limit length, stream ending inside a
    message) is final: that call and every later one raise MalformedReport and the
    connection must be closed. A message whose header is sound but whose chunks are not
    raises MalformedReport once and is skipped; framing goes on after it.

    ``max_buffer`` is the largest message accepted, so it also bounds the bytes held for an
    incomplete message; a header announcing more fails at once.

    With the accelerator (``stm.accel``), ``receive_data`` cuts every complete message with
    a sound header out of the buffer in one compiled call, and ``next_frame`` hands them out
    before doing anything else; what is left (an incomplete message, a bad header) takes
    the Python path, so messages, errors and their order are the same either way.
    """

    __slots__ = ("_buf", "_cut", "_eof", "_error", "_frames", "_max", "_pos")

    def __init__(self, max_buffer: int = MAX_MESSAGE_LENGTH) -> None:
        if not isinstance(max_buffer, int) or max_buffer < MIN_MESSAGE_LENGTH:
            raise UsageError(f"max_buffer must be an int >= {MIN_MESSAGE_LENGTH}")
        self._max = max_buffer
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._error: str | None = None
        self._frames: deque[bytes] = deque()  # complete messages cut out by the accelerator
        self._cut = None if accel.ext is None else accel.ext.hep_frames

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as messages."""
        held = len(self._buf) - self._pos
        return held + sum(map(len, self._frames)) if self._frames else held

    @property
    def failed(self) -> bool:
        """True after a framing error: the connection must be closed."""
        return self._error is not None

    def _raise_failed(self) -> None:
        raise MalformedReport(f"TLV stream already failed ({self._error}); close the connection")

    def _fail(self, reason: str) -> MalformedReport:
        self._error = reason
        self._buf = bytearray()
        self._pos = 0
        self._frames.clear()
        return MalformedReport(reason)

    def receive_data(self, data: Buffer) -> None:
        """Append bytes from the stream; ``b""`` marks its end."""
        if self._error is not None:
            self._raise_failed()
        if not data:
            self._eof = True
            return
        if self._eof:
            raise UsageError("receive_data() after the end of stream was signalled")
        try:
            self._buf += data
        except TypeError:
            raise UsageError(f"expected bytes, not {type(data).__name__}") from None
        cut = self._cut
        if cut is not None:
            frames, pos = cut(self._buf, self._pos, self._max, len(self._buf))
            if frames:
                self._frames += frames
                buf = self._buf
                if pos == len(buf):
                    buf.clear()
                    pos = 0
                elif pos > MAX_MESSAGE_LENGTH:
                    del buf[:pos]
                    pos = 0
                self._pos = pos

    def next_frames(self) -> list[bytes]:
        """Every complete message with a sound header buffered now, as raw bytes, for a
        caller that decodes in batches (``TlvDecoder.receive_messages``). It stops before
        anything else (an incomplete message, a framing error), which ``next_frame`` then
        handles (and raises) as always; so it never raises by itself after a failure-free
        stream, and mixing the two calls gives the messages in order."""
        if self._error is not None:
            self._raise_failed()
        frames = list(self._frames)
        self._frames.clear()
        buf = self._buf
        for _ in range(len(buf)):  # each turn takes a message of at least 6 bytes
            pos = self._pos
            if len(buf) - pos < HEADER_LENGTH or buf[pos : pos + 4] != PROTOCOL_ID:
                break
            total = _unpack_header(buf, pos)[1]
            if total < HEADER_LENGTH or total > self._max or len(buf) - pos < total:
                break
            frames.append(self.next_frame())  # checked above: it cannot fail
        return frames

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes arrive."""
        frame = self.next_frame()
        return None if frame is None else decode_message(frame)

    def next_frame(self) -> bytes | None:
        """The next complete message as raw bytes (framing checked, chunks not parsed), for
        callers with a faster decoder of their own."""
        if self._frames:
            return self._frames.popleft()
        if self._error is not None:
            self._raise_failed()
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail == 0:
            return None
        try:
            total = _header_length(buf, pos, avail)
        except MalformedReport as exc:
            raise self._fail(str(exc)) from None
        if total is not None and total > self._max:
            raise self._fail(f"message length {total} exceeds max_buffer {self._max}")
        if total is None or avail < total:
            if self._eof:
                raise self._fail(f"stream ended inside a message ({avail} bytes buffered)")
            return None
        end = pos + total
        frame = buf[pos:end]
        if end == len(buf):
            buf.clear()
            self._pos = 0
        elif end > MAX_MESSAGE_LENGTH:
            del buf[:end]
            self._pos = 0
        else:
            self._pos = end
        return bytes(frame)


# -- typed chunk builders and readers -------------------------------------------------------


def chunk_bytes(vendor: int, type: int, value: Buffer) -> Chunk:
    """A chunk with an opaque octet value."""
    return Chunk(vendor, type, value)


def chunk_u8(vendor: int, type: int, value: int) -> Chunk:
    """A chunk with an unsigned 8-bit value."""
    try:
        return Chunk(vendor, type, _U8.pack(value))
    except struct.error as exc:
        raise UsageError(f"u8 chunk value {value!r}: {exc}") from None


def chunk_u16(vendor: int, type: int, value: int) -> Chunk:
    """A chunk with a big-endian unsigned 16-bit value."""
    try:
        return Chunk(vendor, type, _U16.pack(value))
    except struct.error as exc:
        raise UsageError(f"u16 chunk value {value!r}: {exc}") from None


def chunk_u32(vendor: int, type: int, value: int) -> Chunk:
    """A chunk with a big-endian unsigned 32-bit value."""
    try:
        return Chunk(vendor, type, _U32.pack(value))
    except struct.error as exc:
        raise UsageError(f"u32 chunk value {value!r}: {exc}") from None


def chunk_str(vendor: int, type: int, value: str) -> Chunk:
    """A chunk with a UTF-8 text value (no terminating NUL)."""
    if not isinstance(value, str):
        raise UsageError(f"text chunk value must be str, not {value.__class__.__name__}")
    try:
        return Chunk(vendor, type, value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise UsageError(f"text chunk value cannot be UTF-8 encoded: {exc.reason}") from None


def chunk_ipv4(vendor: int, type: int, value: ipaddress.IPv4Address | str | bytes) -> Chunk:
    """A chunk with a 4-byte IPv4 address (from an address object, text or packed bytes)."""
    if isinstance(value, ipaddress.IPv4Address):
        return Chunk(vendor, type, value.packed)
    try:
        return Chunk(vendor, type, ipaddress.IPv4Address(value).packed)
    except ValueError as exc:
        raise UsageError(f"not an IPv4 address: {exc}") from None


def chunk_ipv6(vendor: int, type: int, value: ipaddress.IPv6Address | str | bytes) -> Chunk:
    """A chunk with a 16-byte IPv6 address (from an address object, text or packed bytes)."""
    if isinstance(value, ipaddress.IPv6Address):
        return Chunk(vendor, type, value.packed)
    try:
        return Chunk(vendor, type, ipaddress.IPv6Address(value).packed)
    except ValueError as exc:
        raise UsageError(f"not an IPv6 address: {exc}") from None


class StmTimestamp(NamedTuple):
    """Value of the STM TIMESTAMP chunk: a pcapng timestamp kept exact.

    ``tsresol`` is the raw if_tsresol byte (MSB clear: 10**-n s units, set: 2**-n), ``ticks``
    the 64-bit EPB timestamp in those units, ``tsoffset`` the if_tsoffset in seconds.
    """

    tsresol: int
    ticks: int
    tsoffset: int = 0

    def to_chunk(self) -> Chunk:
        """Encode as a (STM_VENDOR, TIMESTAMP) chunk."""
        try:
            value = _TIMESTAMP.pack(self.tsresol, self.ticks, self.tsoffset)
        except struct.error as exc:
            raise UsageError(f"STM timestamp {tuple(self)}: {exc}") from None
        return Chunk(STM_VENDOR, StmChunk.TIMESTAMP, value)

    @classmethod
    def from_chunk(cls, chunk: Chunk) -> StmTimestamp:
        """Decode the value of a TIMESTAMP chunk (17 bytes)."""
        return cls._make(_TIMESTAMP.unpack(chunk._fixed(_TIMESTAMP.size, "STM timestamp")))


class StmFragment(NamedTuple):
    """Value of the STM FRAGMENT chunk: ``data`` is bytes [offset, offset+len) of a packet."""

    packet_id: int
    offset: int
    total_length: int
    data: bytes

    def to_chunk(self) -> Chunk:
        """Encode as a (STM_VENDOR, FRAGMENT) chunk."""
        try:
            head = _FRAGMENT.pack(self.packet_id, self.offset, self.total_length)
            if not isinstance(self.data, (bytes, bytearray, memoryview)):
                raise TypeError(f"data must be bytes, not {type(self.data).__name__}")
            data = bytes(self.data)
        except (struct.error, TypeError) as exc:
            raise UsageError(f"STM fragment {self[:3]}: {exc}") from None
        if self.offset + len(data) > self.total_length:
            raise UsageError("fragment runs past the packet's total length")
        return Chunk(STM_VENDOR, StmChunk.FRAGMENT, head + data)

    @classmethod
    def from_chunk(cls, chunk: Chunk) -> StmFragment:
        """Decode the value of a FRAGMENT chunk; checks offset + size <= total length."""
        value = chunk.value
        if len(value) < _FRAGMENT.size:
            raise MalformedReport(f"STM fragment value of {len(value)} bytes is below 12")
        packet_id, offset, total = _FRAGMENT.unpack_from(value)
        data = value[_FRAGMENT.size :]
        if offset + len(data) > total:
            raise MalformedReport(
                f"STM fragment at offset {offset} of {len(data)} bytes runs past total {total}"
            )
        return cls(packet_id, offset, total, data)


_BUILDERS = {
    ValueType.U8: chunk_u8,
    ValueType.U16: chunk_u16,
    ValueType.U32: chunk_u32,
    ValueType.IPV4: chunk_ipv4,
    ValueType.IPV6: chunk_ipv6,
    ValueType.BYTES: chunk_bytes,
    ValueType.UTF8: chunk_str,
}


def _typed_chunk(vendor: int, ctype: int, value: object, table: dict[int, ValueType]) -> Chunk:
    kind = table.get(ctype)
    if kind is ValueType.STM_TIMESTAMP:
        if not isinstance(value, StmTimestamp):
            raise UsageError("TIMESTAMP chunk value must be an StmTimestamp")
        return value.to_chunk()
    if kind is ValueType.STM_FRAGMENT:
        if not isinstance(value, StmFragment):
            raise UsageError("FRAGMENT chunk value must be an StmFragment")
        return value.to_chunk()
    if kind is None:
        raise UsageError(f"unknown chunk type {ctype:#06x} for vendor {vendor:#06x}")
    return _BUILDERS[kind](vendor, ctype, value)  # type: ignore[operator]


def hep_chunk(type: int, value: object) -> Chunk:
    """A generic (vendor 0) chunk, encoded per :data:`GENERIC_VALUE_TYPES`."""
    return _typed_chunk(HEP_VENDOR, type, value, GENERIC_VALUE_TYPES)


def stm_chunk(type: int, value: object) -> Chunk:
    """An STM chunk, encoded per :data:`STM_VALUE_TYPES`."""
    return _typed_chunk(STM_VENDOR, type, value, STM_VALUE_TYPES)


_READERS = {
    ValueType.U8: Chunk.as_u8,
    ValueType.U16: Chunk.as_u16,
    ValueType.U32: Chunk.as_u32,
    ValueType.IPV4: Chunk.as_ipv4,
    ValueType.IPV6: Chunk.as_ipv6,
    ValueType.UTF8: Chunk.as_str,
    ValueType.STM_TIMESTAMP: StmTimestamp.from_chunk,
    ValueType.STM_FRAGMENT: StmFragment.from_chunk,
}


def typed_value(chunk: Chunk) -> object:
    """The chunk's value decoded per the generic or STM table; raw bytes if unknown."""
    if chunk.vendor == HEP_VENDOR:
        kind = GENERIC_VALUE_TYPES.get(chunk.type)
    elif chunk.vendor == STM_VENDOR:
        kind = STM_VALUE_TYPES.get(chunk.type)
    else:
        kind = None
    reader = _READERS.get(kind)  # type: ignore[arg-type]
    return chunk.value if reader is None else reader(chunk)


def auth_key_matches(message: Message, key: bytes) -> bool:
    """True if the message carries exactly one auth key chunk (0x000e) equal to ``key``.

    Compared with :func:`hmac.compare_digest`, so the time taken does not reveal how many
    leading bytes matched. A missing or repeated auth key chunk never matches.
    """
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise UsageError("the expected auth key must be non-empty bytes")
    found = message.get_all(HEP_VENDOR, HepChunk.AUTH_KEY)
    if len(found) != 1:
        return False
    return hmac.compare_digest(found[0].value, bytes(key))
