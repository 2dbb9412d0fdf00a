"""Finding the transport payload inside a captured frame, and building a frame around one.

Format B reports carry a packet as HEP's generic chunks (addresses, ports, payload) plus
stm's own chunk holding the frame bytes before the payload, so the frame is rebuilt
exactly. ``split`` finds where the IP/UDP/TCP/SCTP headers end for the link types stm
knows; ``synthesize`` makes a raw IPv4/IPv6 frame from generic chunks of foreign HEP.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from stm.pcapng import constants as c

UDP, TCP, SCTP = 17, 6, 132
_ETH_VLAN = (0x8100, 0x88A8, 0x9100)
_IPV6_SKIP = (0, 43, 60)  # hop-by-hop, routing, destination options
_NULL_IPV6 = (10, 24, 28, 30)  # AF_INET6 on Linux, BSDs, macOS
_H = struct.Struct("!H")
_HH = struct.Struct("!HH")
_IPV4 = struct.Struct("!BxH2xHxB2x4s4s")  # version/IHL, length, fragment, protocol, addresses
_SIP_PORTS = frozenset((5060, 5061))
_SIP_STARTS = (
    b"SIP/2.0 ", b"INVITE ", b"ACK ", b"BYE ", b"CANCEL ", b"REGISTER ", b"OPTIONS ",
    b"PRACK ", b"SUBSCRIBE ", b"NOTIFY ", b"PUBLISH ", b"INFO ", b"REFER ", b"MESSAGE ",
    b"UPDATE ",
)  # fmt: skip


class Split(NamedTuple):
    """Where a frame's transport payload starts and what carried it."""

    family: int  # 4 or 6
    proto: int  # IANA protocol number
    src: bytes  # 4 or 16 bytes
    dst: bytes
    sport: int
    dport: int
    offset: int  # of the transport payload in the frame
    end: int  # where the IP packet ends: what follows (Ethernet padding, a trailer) is not payload
    transport: int = 0  # offset of the UDP/TCP/SCTP header


def _network_offset(linktype: int, data: bytes | memoryview) -> tuple[int, int] | None:
    """(IP version, offset of the IP header) for the link types stm knows, else None."""
    n = len(data)
    if linktype == c.LINKTYPE_ETHERNET:
        off = 12
        while off + 2 <= n:
            etype = _H.unpack_from(data, off)[0]
            if etype in _ETH_VLAN:
                off += 4
                continue
            if etype == 0x0800:
                return 4, off + 2
            if etype == 0x86DD:
                return 6, off + 2
            return None
        return None
    if linktype == c.LINKTYPE_LINUX_SLL and n >= 16:
        etype, off = _H.unpack_from(data, 14)[0], 16
    elif linktype == c.LINKTYPE_LINUX_SLL2 and n >= 20:
        etype, off = _H.unpack_from(data, 0)[0], 20
    elif linktype in (c.LINKTYPE_NULL, c.LINKTYPE_LOOP) and n >= 4:
        order = "little" if linktype == c.LINKTYPE_NULL and data[0] else "big"
        af = int.from_bytes(data[:4], order)
        return (4, 4) if af == 2 else (6, 4) if af in _NULL_IPV6 else None
    elif linktype in (c.LINKTYPE_RAW, 12, 14) and n >= 1:
        version = data[0] >> 4
        return (version, 0) if version in (4, 6) else None
    elif linktype == c.LINKTYPE_IPV4:
        return 4, 0
    elif linktype == c.LINKTYPE_IPV6:
        return 6, 0
    else:
        return None
    if etype == 0x0800:
        return 4, off
    if etype == 0x86DD:
        return 6, off
    return None


def split(linktype: int, data: bytes | memoryview) -> Split | None:
    """Locate the UDP/TCP/SCTP payload of an unfragmented IP packet, or None."""
    where = _network_offset(linktype, data)
    if where is None:
        return None
    version, off = where
    n = len(data)
    if version == 4:
        if off + 20 > n:
            return None
        vhl, length, frag, proto, src, dst = _IPV4.unpack_from(data, off)
        ihl = (vhl & 0x0F) * 4
        if vhl >> 4 != 4 or ihl < 20 or frag & 0x3FFF:  # MF or a fragment offset: a fragment
            return None
        ip_end = off + length if length else n  # 0: a GSO/BIG TCP packet over 64 KB
        off += ihl
    else:
        if off + 40 > n or data[off] >> 4 != 6:
            return None
        proto = data[off + 6]
        length = _H.unpack_from(data, off + 4)[0]
        ip_end = off + 40 + length if length else n  # 0: a jumbogram
        src, dst = bytes(data[off + 8 : off + 24]), bytes(data[off + 24 : off + 40])
        off += 40
        while proto in _IPV6_SKIP or proto == 44:
            if off + 8 > n:
                return None
            if proto == 44:  # fragment header: only an unfragmented "atomic" one will do
                if _H.unpack_from(data, off + 2)[0] & 0xFFF9:
                    return None
                proto, off = data[off], off + 8
            else:
                proto, off = data[off], off + (data[off + 1] + 1) * 8
    if proto == UDP:
        hlen = 8
    elif proto == TCP:
        if off + 13 > n:
            return None
        hlen = (data[off + 12] >> 4) * 4
        if hlen < 20:
            return None
    elif proto == SCTP:
        hlen = 12
    else:
        return None
    if off + hlen > n:
        return None
    sport, dport = _HH.unpack_from(data, off)
    start = off + hlen
    end = min(ip_end, n) if ip_end >= start else n  # lengths that make no sense: keep it all
    return Split(version, proto, src, dst, sport, dport, start, end, off)


def hep_protocol_type(s: Split, payload: bytes | memoryview) -> int:
    """HEP's protocol type: 1 for SIP, 0x38 for Diameter, else 0 (generic)."""
    if (
        s.sport in _SIP_PORTS
        or s.dport in _SIP_PORTS
        or bytes(payload[:10]).startswith(_SIP_STARTS)
    ):
        return 1
    if 3868 in (s.sport, s.dport):
        return 0x38
    return 0


def _checksum(data: bytes) -> int:
    if len(data) & 1:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def synthesize(
    family: int,
    proto: int,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    payload: bytes,
    seq: int = 0,
    *,
    ack: int = 0,
    flags: int = 0x18,
) -> bytes:
    """A raw IP frame (LINKTYPE_RAW) carrying ``payload`` over UDP or TCP, for foreign HEP.

    Checksums are computed so Wireshark dissects it without complaint. HEP carries no TCP
    state, so a TCP segment gets sequence number ``seq`` (the caller keeps one running per
    flow, or Wireshark takes every segment after the first for a retransmission), and by
    default ack 0 and PSH+ACK (``ack`` and ``flags`` make any other segment). Other
    protocols get no transport header. Payloads too large for one IP packet get IP total
    length 0, as Linux BIG TCP does.
    """
    if proto == UDP:
        length = 8 + len(payload)
        transport = struct.pack("!HHHH", sport, dport, length & 0xFFFF, 0)
    elif proto == TCP:
        transport = struct.pack(
            "!HHIIBBHHH",
            sport,
            dport,
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            5 << 4,
            flags,
            65535,
            0,
            0,
        )
    else:
        transport = b""
    segment = transport + payload
    if family == 6:
        pseudo = src + dst + struct.pack("!IxxxB", len(segment), proto)
    else:
        pseudo = src + dst + struct.pack("!xBH", proto, len(segment) & 0xFFFF)
    if proto in (UDP, TCP):
        csum = _checksum(pseudo + segment) or (0xFFFF if proto == UDP else 0)
        at = 6 if proto == UDP else 16
        segment = segment[:at] + struct.pack("!H", csum) + segment[at + 2 :]
    if family == 6:
        return struct.pack("!IHBB", 6 << 28, len(segment) & 0xFFFF, proto, 64) + src + dst + segment
    total = 20 + len(segment)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total if total <= 0xFFFF else 0, 0, 0x4000,
                         64, proto, 0, src, dst)  # fmt: skip
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + segment
