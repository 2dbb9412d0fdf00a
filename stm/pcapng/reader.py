"""A sans-IO reader for pcapng and classic pcap: feed bytes, take events.

``Reader.feed(data)`` accepts bytes in any chunking (a file, a pipe, a socket); iterating
the reader (or calling ``next_event()``) yields one record per block: ``Section``,
``Interface``, ``Packet``, ``NameResolution``, ``InterfaceStatistics``,
``DecryptionSecrets``, ``CustomBlock`` or ``UnknownBlock``. With ``raw_packets=True``
runs of packet blocks come out whole as ``RawPackets``, so a relay pays for no object per
packet. Anything malformed raises ``MalformedPcapng`` with the byte offset, and the
reader stays failed: there is no resynchronising inside a corrupt capture.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from stm.errors import MalformedPcapng
from stm.pcapng import constants as c
from stm.pcapng.options import (
    EPB_KINDS,
    GENERIC_KINDS,
    IDB_KINDS,
    ISB_KINDS,
    NRB_KINDS,
    PB_KINDS,
    SHB_KINDS,
    decode_options,
)
from stm.pcapng.records import (
    CustomBlock,
    DecryptionSecrets,
    Interface,
    InterfaceStatistics,
    NameResolution,
    Packet,
    RawPackets,
    Section,
    UnknownBlock,
)

Event = (
    Section
    | Interface
    | Packet
    | NameResolution
    | InterfaceStatistics
    | DecryptionSecrets
    | CustomBlock
    | UnknownBlock
    | RawPackets
)

_S = {
    bo: {
        "I": struct.Struct(bo + "I"),
        "II": struct.Struct(bo + "II"),
        "epb": struct.Struct(bo + "IIIII"),
        "epb7": struct.Struct(bo + "IIIIIII"),
        "pb": struct.Struct(bo + "HHIIII"),
        "idb": struct.Struct(bo + "HHI"),
        "shb": struct.Struct(bo + "HHq"),
        "isb": struct.Struct(bo + "III"),
        "HH": struct.Struct(bo + "HH"),
        "pcaphdr": struct.Struct(bo + "IHHiIII"),
        "pcaprec": struct.Struct(bo + "IIII"),
        "kuz": struct.Struct(bo + "IHBB"),
    }
    for bo in "<>"
}
_LE_U32 = struct.Struct("<I")
_PACKET_BLOCKS = (c.EPB, c.SPB, c.PB)
# Kuznetsov's pkt_type to epb_flags direction and reception type bits.
_KUZ_FLAGS = {0: 0x05, 1: 0x0D, 2: 0x09, 3: 0x11, 4: 0x02}


class Reader:
    """Incremental pcapng/pcap parser. ``max_block_size`` bounds every block and record."""

    def __init__(self, *, max_block_size: int = c.DEFAULT_MAX_BLOCK, raw_packets: bool = False):
        self.max_block_size = max_block_size
        self.raw_packets = raw_packets
        self.section: Section | None = None
        self.interfaces: list[Interface] = []
        self._buf: bytes = b""
        self._off = 0
        self._base = 0  # stream offset of self._buf[0]
        self._eof = False
        self._error: MalformedPcapng | None = None
        self._format: str | None = None
        self._sections = 0
        self._gen: Iterator[Event] | None = None
        self._pcap: tuple | None = None  # (byte order, units, record size, interface)

    @property
    def offset(self) -> int:
        """Stream offset of the next unparsed byte."""
        return self._base + self._off

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes. Memoryviews in earlier packets stay valid (buffers are never resized)."""
        if self._eof:
            raise ValueError("feed() after close()")
        if not data:
            return
        if self._off >= len(self._buf):
            self._base += len(self._buf)
            self._buf = data if isinstance(data, bytes) else bytes(data)
        else:
            self._base += self._off
            self._buf = self._buf[self._off :] + bytes(data)
        self._off = 0
        self._gen = None

    def close(self) -> None:
        """Mark the end of input: a partial block left over is then an error."""
        self._eof = True
        self._gen = None

    def next_event(self) -> Event | None:
        """The next event, or ``None`` when more data is needed (or the input has ended)."""
        if self._error is not None:
            raise self._error
        if self._gen is None:
            self._gen = self._parse()
        try:
            return next(self._gen)
        except StopIteration:
            self._gen = None
            if self._eof and self._off < len(self._buf):
                self._fail(
                    f"truncated: {len(self._buf) - self._off} bytes left at the end of input",
                    self.offset,
                )
            return None
        except MalformedPcapng as exc:
            self._error = exc
            self._gen = None
            raise

    def __iter__(self) -> Iterator[Event]:
        """Every event parseable from the bytes fed so far (one generator, for speed)."""
        if self._error is not None:
            raise self._error
        gen, self._gen = self._gen or self._parse(), None
        try:
            yield from gen
        except MalformedPcapng as exc:
            self._error = exc
            raise
        if self._eof and self._off < len(self._buf):
            self._fail(
                f"truncated: {len(self._buf) - self._off} bytes left at the end of input",
                self.offset,
            )

    def _fail(self, message: str, offset: int):
        self._error = MalformedPcapng(message, offset)
        raise self._error

    # -- parsing ---------------------------------------------------------------------------

    def _parse(self) -> Iterator[Event]:
        if self._format is None:
            if len(self._buf) - self._off < 4:
                return
            magic = _LE_U32.unpack_from(self._buf, self._off)[0]
            if magic == c.SHB:
                self._format = "pcapng"
            elif magic in (c.PCAP_MAGIC_US, c.PCAP_MAGIC_NS, c.PCAP_MAGIC_KUZNETSOV) or (
                _swap32(magic) in (c.PCAP_MAGIC_US, c.PCAP_MAGIC_NS, c.PCAP_MAGIC_KUZNETSOV)
            ):
                self._format = "pcap"
            elif c.PCAP_MAGIC_NAVTEL in (magic, _swap32(magic)):
                self._fail("unsupported capture format: Navtel modified pcap", self.offset)
            else:
                self._fail(f"not a pcapng or pcap file (magic 0x{magic:08x})", self.offset)
        if self._format == "pcap":
            yield from self._parse_pcap()
        else:
            yield from self._parse_pcapng()

    def _parse_pcapng(self) -> Iterator[Event]:
        buf = self._buf
        mv = memoryview(buf)
        n = len(buf)
        off = self._off
        base = self._base
        limit = self.max_block_size
        section = self.section
        bo = section.byte_order if section else "<"
        s = _S[bo]
        hdr, u32, epb = s["II"], s["I"], s["epb"]
        epb7 = s["epb7"]
        ifaces = self.interfaces
        nif = len(ifaces)
        raw = self.raw_packets
        make = Packet
        EPB = c.EPB
        while off + 12 <= n:
            # The hot loop: a run of EPBs, each read with one unpack of its fixed fields.
            # Anything unusual breaks out to the general path below, which says what is wrong.
            unpack7 = epb7.unpack_from
            unpack4 = u32.unpack_from
            while not raw and off + 28 <= n:
                btype, blen, ifid, hi, lo, caplen, origlen = unpack7(buf, off)
                end = off + blen
                dend = off + 28 + caplen
                if (
                    btype != EPB
                    or blen < 32
                    or blen > limit
                    or blen & 3
                    or end > n
                    or ifid >= nif
                    or dend > end - 4
                    or unpack4(buf, end - 4)[0] != blen
                ):
                    break
                pkt = make(ifaces[ifid], (hi << 32) | lo, mv[off + 28 : dend], origlen)
                opt = dend + (-caplen & 3)
                if opt < end - 4:
                    _with_options(pkt, decode_options(mv, opt, end - 4, bo, EPB_KINDS, base))
                off = end
                self._off = off
                yield pkt
            if off + 12 > n:
                break
            btype = _LE_U32.unpack_from(buf, off)[0]
            if btype == c.SHB:
                magic = _LE_U32.unpack_from(buf, off + 8)[0]
                if magic == c.BYTE_ORDER_MAGIC:
                    bo = "<"
                elif magic == _swap32(c.BYTE_ORDER_MAGIC):
                    bo = ">"
                else:
                    self._fail(f"unknown byte-order magic 0x{magic:08x}", base + off)
                s = _S[bo]
                hdr, u32, epb, epb7 = s["II"], s["I"], s["epb"], s["epb7"]
            btype, blen = hdr.unpack_from(buf, off)
            if blen & 3:
                self._fail(f"block length {blen} is not a multiple of 4", base + off)
            if blen < 12:
                self._fail(f"block length {blen} is below the minimum of 12", base + off)
            if blen > limit:
                self._fail(f"block length {blen} is over the limit of {limit}", base + off)
            end = off + blen
            if end > n:
                break
            if u32.unpack_from(buf, end - 4)[0] != blen:
                self._fail(
                    f"trailing block length {u32.unpack_from(buf, end - 4)[0]} differs from "
                    f"the leading one {blen}",
                    base + off,
                )
            if btype == c.EPB and not raw:
                if blen < 32:
                    self._fail(f"enhanced packet block of {blen} bytes is too short", base + off)
                ifid, hi, lo, caplen, origlen = epb.unpack_from(buf, off + 8)
                dend = off + 28 + caplen
                if dend > end - 4:
                    self._fail(f"captured length {caplen} runs past the block", base + off)
                if ifid >= len(ifaces):
                    self._fail(f"packet names interface {ifid}, which does not exist", base + off)
                opt = dend + (-caplen & 3)
                if opt >= end - 4:
                    pkt = Packet(ifaces[ifid], (hi << 32) | lo, mv[off + 28 : dend], origlen)
                else:
                    pkt = _with_options(
                        Packet(ifaces[ifid], (hi << 32) | lo, mv[off + 28 : dend], origlen),
                        decode_options(mv, opt, end - 4, bo, EPB_KINDS, base),
                    )
                off = end
                self._off = off
                yield pkt
                continue
            if raw and btype in _PACKET_BLOCKS:
                start, count = off, 0
                self._check_packet_block(buf, off, btype, blen, bo)
                count += 1
                off += blen
                # Take the following packet blocks whole; an EPB is checked inline, as the
                # per-packet path would, anything else by _check_packet_block.
                unpack7 = epb7.unpack_from
                unpack4 = u32.unpack_from
                while off + 28 <= n:
                    btype, blen, ifid, _, _, caplen, _ = unpack7(buf, off)
                    end = off + blen
                    if (
                        blen < 12
                        or blen > limit
                        or blen & 3
                        or end > n
                        or unpack4(buf, end - 4)[0] != blen
                    ):
                        break
                    if btype == EPB:
                        if blen < 32 or ifid >= nif or off + 28 + caplen > end - 4:
                            break
                    elif btype in _PACKET_BLOCKS:
                        self._check_packet_block(buf, off, btype, blen, bo)
                    else:
                        break
                    count += 1
                    off = end
                self._off = off
                yield RawPackets(section, mv[start:off], count)  # type: ignore[arg-type]
                continue
            event = self._block(btype, mv, off, end, bo)
            off = end
            self._off = off
            if isinstance(event, Section):
                section = event
                ifaces = self.interfaces
            nif = len(ifaces)
            yield event

    def _check_packet_block(self, buf: bytes, off: int, btype: int, blen: int, bo: str) -> None:
        """Validate a packet block taken whole in bulk mode, as the per-packet path would."""
        s = _S[bo]
        if btype == c.EPB:
            if blen < 32:
                self._fail(f"enhanced packet block of {blen} bytes is too short", self._base + off)
            ifid = s["I"].unpack_from(buf, off + 8)[0]
            caplen = s["I"].unpack_from(buf, off + 20)[0]
            if off + 28 + caplen > off + blen - 4:
                self._fail(f"captured length {caplen} runs past the block", self._base + off)
        elif btype == c.PB:
            if blen < 32:
                self._fail(f"packet block of {blen} bytes is too short", self._base + off)
            ifid = s["HH"].unpack_from(buf, off + 8)[0]
        else:
            if blen < 16:
                self._fail(f"simple packet block of {blen} bytes is too short", self._base + off)
            ifid = 0
            if self.interfaces:
                origlen = s["I"].unpack_from(buf, off + 8)[0]
                snaplen = self.interfaces[0].snaplen
                if (min(origlen, snaplen) if snaplen else origlen) > blen - 16:
                    self._fail("simple packet block is too short for its packet", self._base + off)
        if ifid >= len(self.interfaces):
            self._fail(f"packet names interface {ifid}, which does not exist", self._base + off)

    def _block(self, btype: int, mv: memoryview, off: int, end: int, bo: str) -> Event:
        """Every block other than the EPB fast path."""
        s = _S[bo]
        base = self._base
        body = off + 8
        blen = end - off
        tail = end - 4

        def need(minimum: int, name: str) -> None:
            if blen < minimum:
                self._fail(f"{name} of {blen} bytes is too short", base + off)

        def iface(ifid: int) -> Interface:
            if ifid >= len(self.interfaces):
                self._fail(f"block names interface {ifid}, which does not exist", base + off)
            return self.interfaces[ifid]

        if btype == c.SHB:
            need(28, "section header block")
            major, minor, length = s["shb"].unpack_from(mv, body + 4)
            if major != 1:
                self._fail(f"unsupported pcapng major version {major}", base + off)
            opts = decode_options(mv, body + 16, tail, bo, SHB_KINDS, base)
            section = Section(bo, major, minor, length, opts, "pcapng", self._sections)
            self._sections += 1
            self.section = section
            self.interfaces = []
            return section
        if btype == c.IDB:
            need(20, "interface description block")
            linktype, _, snaplen = s["idb"].unpack_from(mv, body)
            opts = decode_options(mv, body + 8, tail, bo, IDB_KINDS, base)
            interface = Interface(linktype, snaplen, opts, len(self.interfaces), self._sections - 1)
            self.interfaces.append(interface)
            return interface
        if btype == c.EPB:  # only in bulk mode's per-block fallback (never reached otherwise)
            raise AssertionError("EPB handled by the fast path")
        if btype == c.SPB:
            need(16, "simple packet block")
            origlen = s["I"].unpack_from(mv, body)[0]
            interface = iface(0)
            # An SPB has no captured length: it is min(origlen, snaplen), and must fit.
            caplen = min(origlen, interface.snaplen) if interface.snaplen else origlen
            if caplen > tail - body - 4:
                self._fail(f"simple packet block is too short for {caplen} bytes", base + off)
            return Packet(interface, None, mv[body + 4 : body + 4 + caplen], origlen, block=c.SPB)
        if btype == c.PB:
            need(32, "packet block")
            ifid, drops, hi, lo, caplen, origlen = s["pb"].unpack_from(mv, body)
            dend = body + 20 + caplen
            if dend > tail:
                self._fail(f"captured length {caplen} runs past the block", base + off)
            opts = decode_options(mv, dend + (-caplen & 3), tail, bo, PB_KINDS, base)
            if drops != 0xFFFF:
                opts += ((c.EPB_DROPCOUNT, drops),)
            pkt = Packet(iface(ifid), (hi << 32) | lo, mv[body + 20 : dend], origlen, block=c.PB)
            return _with_options(pkt, opts)
        if btype == c.NRB:
            records = []
            pos = body
            while True:
                if pos + 4 > tail:
                    self._fail("name resolution records run past the block", base + pos)
                rtype, rlen = s["HH"].unpack_from(mv, pos)
                pos += 4
                if rtype == c.NRB_RECORD_END:
                    break
                if pos + rlen > tail:
                    self._fail("name resolution record runs past the block", base + pos)
                records.append((rtype, bytes(mv[pos : pos + rlen])))
                pos += rlen + (-rlen & 3)
            opts = decode_options(mv, pos, tail, bo, NRB_KINDS, base)
            return NameResolution(tuple(records), opts)
        if btype == c.ISB:
            need(24, "interface statistics block")
            ifid, hi, lo = s["isb"].unpack_from(mv, body)
            opts = decode_options(mv, body + 12, tail, bo, ISB_KINDS, base)
            return InterfaceStatistics(iface(ifid), (hi << 32) | lo, opts)
        if btype == c.DSB:
            need(20, "decryption secrets block")
            stype, slen = s["II"].unpack_from(mv, body)
            if body + 8 + slen > tail:
                self._fail("decryption secrets run past the block", base + off)
            data = bytes(mv[body + 8 : body + 8 + slen])
            opts = decode_options(mv, body + 8 + slen + (-slen & 3), tail, bo, GENERIC_KINDS, base)
            return DecryptionSecrets(stype, data, opts)
        if btype in (c.CB_COPY, c.CB_NOCOPY):
            need(16, "custom block")
            pen = s["I"].unpack_from(mv, body)[0]
            return CustomBlock(btype, pen, bytes(mv[body + 4 : tail]))
        return UnknownBlock(btype, bytes(mv[body:tail]), bo)

    def _parse_pcap(self) -> Iterator[Event]:
        buf = self._buf
        n = len(buf)
        off = self._off
        if self._pcap is None:
            if n - off < 24:
                return
            magic = _LE_U32.unpack_from(buf, off)[0]
            bo = "<" if magic in (c.PCAP_MAGIC_US, c.PCAP_MAGIC_NS, c.PCAP_MAGIC_KUZNETSOV) else ">"
            magic = _S[bo]["I"].unpack_from(buf, off)[0]
            _, major, minor, _zone, _sigfigs, snaplen, network = _S[bo]["pcaphdr"].unpack_from(
                buf, off
            )
            nano = magic == c.PCAP_MAGIC_NS
            options: list = [(c.IF_TSRESOL, 9)] if nano else []
            if network & 0x04000000:
                options.append((c.IF_FCSLEN, ((network >> 28) & 0xF) * 16))
            interface = Interface(network & 0xFFFF, snaplen, tuple(options), 0, 0)
            record = 24 if magic == c.PCAP_MAGIC_KUZNETSOV else 16
            self._pcap = (bo, interface.units, record, interface)
            self.section = Section(bo, major, minor, -1, (), "pcap", 0)
            self._sections = 1
            self.interfaces = [interface]
            off += 24
            self._off = off
            yield self.section
            yield interface
        bo, units, record, interface = self._pcap
        rec = _S[bo]["pcaprec"]
        kuz = _S[bo]["kuz"]
        limit = self.max_block_size
        mv = memoryview(buf)
        while off + record <= n:
            sec, frac, incl, orig = rec.unpack_from(buf, off)
            if incl > limit:
                self._fail(f"record length {incl} is over the limit of {limit}", self._base + off)
            end = off + record + incl
            if end > n:
                break
            pkt = Packet(interface, sec * units + frac, mv[off + record : end], orig)
            if record == 24:
                pkt.flags = _KUZ_FLAGS.get(kuz.unpack_from(buf, off + 16)[2])
            off = end
            self._off = off
            yield pkt


def _with_options(pkt: Packet, options: tuple) -> Packet:
    """Move flags and comments out of the option list into their own fields."""
    rest = []
    comments = []
    for code, value in options:
        if code == c.EPB_FLAGS and isinstance(value, int) and pkt.flags is None:
            pkt.flags = value
        elif code == c.OPT_COMMENT:
            comments.append(value)
        else:
            rest.append((code, value))
    pkt.comments = tuple(comments)
    pkt.options = tuple(rest)
    return pkt


def _swap32(x: int) -> int:
    return int.from_bytes(x.to_bytes(4, "little"), "big")
