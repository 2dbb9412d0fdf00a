"""Decode one small, self-contained pcapng section held in memory: the payload of a report.

The datagrams of a stream repeat the same SHB and IDBs again and again, so that prefix is
parsed once and recognised by its bytes afterwards (a few recent prefixes are tried, and
at most ``cache_size`` are kept); the EPBs after it take a tight loop like the file
reader's. Anything else (a prefix not seen before, SPBs, custom blocks, odd blocks) goes
through the general ``Reader``, which also teaches the cache the new prefix.
"""

from __future__ import annotations

import struct

from stm import accel
from stm.errors import MalformedPcapng
from stm.pcapng import constants as c
from stm.pcapng.options import EPB_KINDS, decode_options
from stm.pcapng.reader import Reader, _with_options
from stm.pcapng.records import CustomBlock, Interface, Packet, Section

_S = {bo: (struct.Struct(bo + "IIIIIII"), struct.Struct(bo + "I"), struct.Struct(bo + "II"))
      for bo in "<>"}  # fmt: skip
_RECENT = 8

Decoded = tuple[Section, list[Interface], list[Packet], list[CustomBlock]]


class SectionDecoder:
    """Turns one buffer holding one pcapng section into its section, interfaces and blocks."""

    def __init__(self, *, cache_size: int = 1024, max_block_size: int = c.DEFAULT_MAX_BLOCK):
        self.cache_size = cache_size
        self.max_block_size = max_block_size
        self._prefixes: dict[bytes, tuple[Section, list[Interface]]] = {}
        self._recent: list[bytes] = []
        # The compiled twin of the recent list (stm.accel), kept equal to it by _remember.
        self.accel = None if accel.ext is None else accel.ext.Prefixes()

    def decode(self, data: bytes | memoryview, start: int = 0) -> Decoded:
        """Parse ``data[start:]``; MalformedPcapng for anything but one valid section."""
        if type(data) is not bytes:
            data = bytes(data)
        for prefix in self._recent:
            if data.startswith(prefix, start):
                break
        else:
            return self._slow(data, start)
        section, ifaces = self._prefixes[prefix]
        epb7, u32, _ = _S[section.byte_order]
        unpack7 = epb7.unpack_from
        unpack4 = u32.unpack_from
        mv = memoryview(data)
        n = len(data)
        nif = len(ifaces)
        off = start + len(prefix)
        packets = []
        EPB = c.EPB
        while off < n:
            if off + 28 > n:
                return self._slow(data, start)
            btype, blen, ifid, hi, lo, caplen, origlen = unpack7(data, off)
            end = off + blen
            dend = off + 28 + caplen
            if (
                btype != EPB
                or blen < 32
                or blen & 3
                or end > n
                or ifid >= nif
                or dend > end - 4
                or unpack4(data, end - 4)[0] != blen
            ):
                return self._slow(data, start)  # says exactly what is wrong, if anything
            pkt = Packet(ifaces[ifid], (hi << 32) | lo, mv[off + 28 : dend], origlen)
            opt = dend + (-caplen & 3)
            if opt < end - 4:
                _with_options(
                    pkt, decode_options(mv, opt, end - 4, section.byte_order, EPB_KINDS, -start)
                )
            packets.append(pkt)
            off = end
        return section, ifaces, packets, []

    def decode_run(
        self, data: bytes, start: int = 0
    ) -> tuple[Section, list[Interface], int, int] | None:
        """The bulk variant of ``decode`` for relays: when ``data[start:]`` is a known SHB+IDB
        prefix followed only by well-formed EPBs, return (section, interfaces, offset of the
        first EPB, number of EPBs), having checked every EPB but built no object per packet;
        else None (call ``decode``, which also says what is wrong, if anything)."""
        for prefix in self._recent:
            if data.startswith(prefix, start):
                break
        else:
            return None
        section, ifaces = self._prefixes[prefix]
        epb7, u32, _ = _S[section.byte_order]
        unpack7 = epb7.unpack_from
        unpack4 = u32.unpack_from
        n = len(data)
        nif = len(ifaces)
        first = off = start + len(prefix)
        count = 0
        EPB = c.EPB
        while off < n:
            if off + 28 > n:
                return None
            btype, blen, ifid, _, _, caplen, _ = unpack7(data, off)
            end = off + blen
            if btype != EPB or ifid >= nif or end > n or unpack4(data, end - 4)[0] != blen:
                return None
            plain = 32 + caplen + (-caplen & 3)  # the length of this EPB without options
            if blen != plain:  # options, or a length that does not add up: check it all
                if blen < plain or blen & 3:
                    return None
                try:
                    decode_options(memoryview(data), off + plain - 4, end - 4,
                                   section.byte_order, EPB_KINDS, -start)  # fmt: skip
                except MalformedPcapng:
                    return None
            off = end
            count += 1
        return section, ifaces, first, count

    def _slow(self, data: bytes, start: int) -> Decoded:
        """The general reader, which also remembers the SHB+IDB prefix for the next time."""
        reader = Reader(max_block_size=self.max_block_size)
        reader.feed(data[start:] if start else data)
        reader.close()
        section = None
        ifaces: list[Interface] = []
        packets: list[Packet] = []
        custom: list[CustomBlock] = []
        prefix_end = 0  # the SHB and the IDBs right after it
        prefix_ifaces = 0
        in_prefix = True
        for ev in reader:
            if isinstance(ev, Packet):
                packets.append(ev)
                in_prefix = False
            elif isinstance(ev, Interface):
                if ev.section != 0:
                    raise MalformedPcapng("payload holds more than one section", reader.offset)
                ifaces.append(ev)
                if in_prefix:
                    prefix_end = reader.offset
                    prefix_ifaces += 1
            elif isinstance(ev, Section):
                if section is not None:
                    raise MalformedPcapng("payload holds more than one section", reader.offset)
                section = ev
                prefix_end = reader.offset
            elif isinstance(ev, CustomBlock):
                custom.append(ev)
                in_prefix = False
            else:
                raise MalformedPcapng(
                    f"{type(ev).__name__} is not expected in a report", reader.offset
                )
        if section is None:
            raise MalformedPcapng("payload holds no section", 0)
        self._remember(bytes(data[start : start + prefix_end]), section, ifaces[:prefix_ifaces])
        return section, ifaces, packets, custom

    def _remember(self, prefix: bytes, section: Section, ifaces: list[Interface]) -> None:
        if prefix in self._recent:
            self._recent.remove(prefix)
        if prefix not in self._prefixes and len(self._prefixes) >= self.cache_size:
            self._prefixes.clear()
            self._recent.clear()
        self._prefixes[prefix] = (section, ifaces)
        self._recent.insert(0, prefix)
        del self._recent[_RECENT:]
        if self.accel is not None:
            meta = []
            for p in self._recent:
                sec, ifs = self._prefixes[p]
                meta.append(len(ifs) << 1 | (sec.byte_order == ">"))
            self.accel.set(self._recent, meta)

    def recent(self, index: int) -> tuple[Section, list[Interface]]:
        """The section and interfaces of the ``index``-th most recent prefix (what the
        accelerator's ``gre_run`` found)."""
        return self._prefixes[self._recent[index]]
