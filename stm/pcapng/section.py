"""Decode one small, self-contained pcapng section held in memory: the payload of a report.

A report datagram repeats the same SHB and IDBs again and again, so those are parsed once and
cached by their raw bytes and position (bounded); packets take the file reader's fast path.
Blocks other than SHB, IDB, EPB, SPB and custom blocks send the whole buffer through the
general ``Reader``, so nothing is lost, only slower.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from stm.errors import MalformedPcapng
from stm.pcapng import constants as c
from stm.pcapng.options import EPB_KINDS, decode_options
from stm.pcapng.reader import Reader, _with_options
from stm.pcapng.records import CustomBlock, Interface, Packet, Section

_LE = struct.Struct("<I")
_S = {
    bo: (struct.Struct(bo + "II"), struct.Struct(bo + "I"), struct.Struct(bo + "IIIII"))
    for bo in "<>"
}


class _Cache(OrderedDict):
    """A small LRU keyed by raw block bytes, so a flood of distinct blocks cannot grow memory."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key, value) -> None:
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)


class SectionDecoder:
    """Turns one buffer holding one pcapng section into its section, interfaces and blocks."""

    def __init__(self, *, cache_size: int = 1024, max_block_size: int = c.DEFAULT_MAX_BLOCK):
        self._shb = _Cache(cache_size)
        self._idb = _Cache(cache_size)
        self.max_block_size = max_block_size

    def decode(
        self, data: bytes | memoryview
    ) -> tuple[Section, list[Interface], list[Packet], list[CustomBlock]]:
        """Parse ``data``; raises MalformedPcapng for anything that is not one valid section."""
        mv = data if isinstance(data, memoryview) else memoryview(data)
        n = len(mv)
        if n < 28 or _LE.unpack_from(mv, 0)[0] != c.SHB:
            raise MalformedPcapng("payload does not start with a section header block", 0)
        magic = _LE.unpack_from(mv, 8)[0]
        bo = "<" if magic == c.BYTE_ORDER_MAGIC else ">"
        hdr, u32, epb = _S[bo]
        blen = hdr.unpack_from(mv, 0)[1]
        if blen > n:
            raise MalformedPcapng(f"section header of {blen} bytes runs past the payload", 0)
        raw_shb = bytes(mv[:blen])
        section = self._shb.get(raw_shb)
        ifaces: list[Interface] = []
        packets: list[Packet] = []
        custom: list[CustomBlock] = []
        if section is None:
            return self._slow(mv)
        off = blen
        while off < n:
            if off + 12 > n:
                raise MalformedPcapng("truncated block", off)
            btype, blen = hdr.unpack_from(mv, off)
            end = off + blen
            if blen & 3 or blen < 12 or end > n or u32.unpack_from(mv, end - 4)[0] != blen:
                raise MalformedPcapng(f"bad block length {blen}", off)
            if btype == c.EPB:
                if blen < 32:
                    raise MalformedPcapng("enhanced packet block too short", off)
                ifid, hi, lo, caplen, origlen = epb.unpack_from(mv, off + 8)
                dend = off + 28 + caplen
                if dend > end - 4:
                    raise MalformedPcapng(f"captured length {caplen} runs past the block", off)
                if ifid >= len(ifaces):
                    raise MalformedPcapng(f"packet names interface {ifid}, which is absent", off)
                pkt = Packet(ifaces[ifid], (hi << 32) | lo, mv[off + 28 : dend], origlen)
                opt = dend + (-caplen & 3)
                if opt < end - 4:
                    _with_options(pkt, decode_options(mv, opt, end - 4, bo, EPB_KINDS, 0))
                packets.append(pkt)
            elif btype == c.IDB:
                interface = self._idb.get((len(ifaces), bytes(mv[off:end])))
                if interface is None:
                    return self._slow(mv)
                ifaces.append(interface)
            else:
                return self._slow(mv)
            off = end
        return section, ifaces, packets, custom

    def _slow(self, mv: memoryview):
        """The general reader, which also fills the caches for the next datagram."""
        reader = Reader(max_block_size=self.max_block_size)
        reader.feed(bytes(mv))
        reader.close()
        section = None
        ifaces: list[Interface] = []
        packets: list[Packet] = []
        custom: list[CustomBlock] = []
        data = reader._buf
        for ev in reader:
            if isinstance(ev, Packet):
                packets.append(ev)
            elif isinstance(ev, Interface):
                if ev.section != 0:
                    raise MalformedPcapng("payload holds more than one section", reader.offset)
                ifaces.append(ev)
            elif isinstance(ev, Section):
                if section is not None:
                    raise MalformedPcapng("payload holds more than one section", reader.offset)
                section = ev
            elif isinstance(ev, CustomBlock):
                custom.append(ev)
            else:
                raise MalformedPcapng(
                    f"{type(ev).__name__} is not expected in a report", reader.offset
                )
        if section is None:
            raise MalformedPcapng("payload holds no section", 0)
        self._fill_caches(data, section, ifaces)
        return section, ifaces, packets, custom

    def _fill_caches(self, data: bytes, section: Section, ifaces: list[Interface]) -> None:
        hdr = _S[section.byte_order][0]
        blen = hdr.unpack_from(data, 0)[1]
        self._shb.put(data[:blen], section)
        off, i = blen, 0
        while off < len(data) and i < len(ifaces):
            btype, blen = hdr.unpack_from(data, off)
            if btype == c.IDB:
                self._idb.put((i, data[off : off + blen]), ifaces[i])
                i += 1
            off += blen
