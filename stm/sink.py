"""Writes decoded report streams into one merged pcapng file.

Every (producer, stream, source interface) gets an IDB of its own, named
``producer/stream/interface``, keeping the source link type, snaplen, timestamp resolution
and offset, so timestamps are copied as raw ticks and stay exact. Loss found from sequence
gaps is written as an ISB per interface of the stream, so Wireshark shows it.
"""

from __future__ import annotations

import time
from typing import BinaryIO

from stm.errors import UsageError
from stm.pcapng import constants as c
from stm.pcapng.records import Interface, Packet
from stm.pcapng.writer import Writer
from stm.report import STM_PEN, PacketBlocks, Stream, stm_options, without_stm_options

# A packet from a Simple Packet Block has no capture time: it is written with its time of
# arrival, marked by this stm custom option so its comments stay exactly the source's.
ARRIVAL_TIME = (c.OPT_CUSTOM_STR, (STM_PEN, b"timestamp=arrival"))


class PcapngSink:
    """A merged pcapng output; ``flush_interval`` bounds how long packets stay buffered."""

    def __init__(
        self,
        file: BinaryIO,
        *,
        byte_order: str | None = None,
        flush_interval: float = 1.0,
        max_interfaces: int = 65536,
    ) -> None:
        self.writer = Writer(file, byte_order=byte_order, options=[(c.SHB_USERAPPL, "stm-recv")])
        self.flush_interval = flush_interval
        self.max_interfaces = max_interfaces
        self.packets = 0
        self.rejected = 0
        self._by_object: dict[tuple[int, int], tuple[Interface, Stream, int]] = {}
        self._by_content: dict[tuple, int] = {}
        self._stream_ifaces: dict[Stream, list[int]] = {}
        self._lost: dict[Stream, int] = {}
        self._last_flush = time.monotonic()

    def _ifid(self, stream: Stream, iface: Interface) -> int | None:
        # Identical IDBs of two producers decode to one cached object: key on both.
        entry = self._by_object.get((id(iface), id(stream)))
        if entry is not None and entry[0] is iface and entry[1] is stream:
            return entry[2]
        source = stm_options(iface.options).get("if", str(iface.id))
        options = without_stm_options(iface.options)
        key = (stream, source, iface.linktype, iface.snaplen, options)
        ifid = self._by_content.get(key)
        if ifid is None:
            if len(self._by_content) >= self.max_interfaces:
                return None
            name = f"{stream.producer}/{stream.key}/{iface.name or 'if' + source}"
            try:
                ifid = self.writer.copy_interface(
                    Interface(iface.linktype, iface.snaplen, options), name=name
                )
            except UsageError:
                return None  # e.g. an if_tsresol no file can hold: its packets are rejected
            self._by_content[key] = ifid
            self._stream_ifaces.setdefault(stream, []).append(ifid)
        if len(self._by_object) > 4096:
            self._by_object.clear()
        self._by_object[(id(iface), id(stream))] = (iface, stream, ifid)
        return ifid

    def write(self, stream: Stream, packets: list[Packet], now: float | None = None) -> None:
        """Append packets of one stream (from a ``Packets`` event)."""
        w = self.writer
        write_packet = w.write_packet
        last_iface = last_ifid = None  # the packets of one report mostly share an interface
        written = 0
        for pkt in packets:
            iface = pkt.interface
            if iface is not last_iface:
                last_iface, last_ifid = iface, self._ifid(stream, iface)
            ifid = last_ifid
            if ifid is None:
                self.rejected += 1
                continue
            ts = pkt.ts
            if ts is None:
                write_packet(
                    ifid,
                    _ticks(w.interfaces[ifid], time.time() if now is None else now),
                    pkt.data,
                    origlen=pkt.origlen,
                    options=(ARRIVAL_TIME,),
                )
            elif pkt.flags is None and not pkt.comments and not pkt.options:
                write_packet(ifid, ts, pkt.data, origlen=pkt.origlen)
            else:
                write_packet(
                    ifid,
                    ts,
                    pkt.data,
                    origlen=pkt.origlen,
                    flags=pkt.flags,
                    comments=pkt.comments,
                    options=pkt.options,
                )
            written += 1
        self.packets += written

    def write_blocks(self, event: PacketBlocks) -> None:
        """Append the EPBs of a ``PacketBlocks`` event whole, with interfaces renumbered."""
        ids = [self._ifid(event.stream, iface) for iface in event.interfaces]
        written = self.writer.copy_epbs(event.data, event.start, ids)
        self.packets += written
        self.rejected += event.count - written

    def loss(self, stream: Stream, lost: int, now: float | None = None) -> None:
        """Record that ``lost`` datagrams of ``stream`` are missing so far (net of late
        arrivals), as an ISB on each of its interfaces."""
        if self._lost.get(stream) == lost:
            return
        self._lost[stream] = lost
        wall = time.time() if now is None else now
        for ifid in self._stream_ifaces.get(stream, ()):
            self.writer.write_statistics(
                ifid,
                _ticks(self.writer.interfaces[ifid], wall),
                [
                    (c.ISB_IFDROP, max(lost, 0)),
                    (
                        c.OPT_COMMENT,
                        f"stm: {lost} report datagram(s) of stream {stream} lost so far "
                        "(sequence gaps; each carried one or more packets)",
                    ),
                ],
            )

    def maybe_flush(self, monotonic_now: float) -> None:
        if monotonic_now - self._last_flush >= self.flush_interval:
            self.flush()
            self._last_flush = monotonic_now

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.flush()


def _ticks(iface: Interface, wall: float) -> int:
    """Wall-clock seconds in an interface's ticks, clamped to what a block can hold."""
    ticks = int((wall - iface.tsoffset) * iface.units)
    return min(max(ticks, 0), (1 << 64) - 1)
