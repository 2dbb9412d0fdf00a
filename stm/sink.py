"""Writes decoded report streams into one merged pcapng file.

Every (producer, stream, source interface) gets an IDB of its own, named
``producer/stream/interface``, keeping the source link type, snaplen, timestamp resolution
and offset, so timestamps are copied as raw ticks and stay exact. Loss found from sequence
gaps is written as an ISB per interface of the stream, so Wireshark shows it.

With a ``size_limit`` the sink counts the bytes of the file it writes and, before a write
that would take the file past the limit, asks ``next_file`` for a new file object and starts
over there: a new section header, and the IDBs its packets need declared again as they
come. Every file is a whole pcapng on its own. ``stm.output`` names and opens those files.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import BinaryIO

from stm.errors import UsageError
from stm.pcapng import constants as c
from stm.pcapng import encode as enc
from stm.pcapng.records import Interface, Packet
from stm.pcapng.writer import HOST_ORDER, Writer
from stm.report import STM_PEN, PacketBlocks, Stream, stm_options, without_stm_options

# A packet from a Simple Packet Block has no capture time: it is written with its time of
# arrival, marked by this stm custom option so its comments stay exactly the source's.
ARRIVAL_TIME = (c.OPT_CUSTOM_STR, (STM_PEN, b"timestamp=arrival"))
SHB_OPTIONS = ((c.SHB_USERAPPL, "stm-recv"),)
_EPB_HEAD = {bo: struct.Struct(bo + "II") for bo in "<>"}  # block type, length


class PcapngSink:
    """A merged pcapng output; ``flush_interval`` bounds how long packets stay buffered.

    ``size_limit`` (bytes, with ``next_file``, a callable returning the next file object)
    starts a new file before any write that would make the current one larger than the
    limit, unless the file holds nothing but its section header yet: a file is larger than
    the limit only when one write alone (one report's packet blocks, or one packet on the
    per-packet path, with the interface blocks it needs) is. ``size`` is the current
    file's length in bytes, kept only with a limit.
    """

    def __init__(
        self,
        file: BinaryIO,
        *,
        byte_order: str | None = None,
        flush_interval: float = 1.0,
        max_interfaces: int = 65536,
        size_limit: int | None = None,
        next_file: Callable[[], BinaryIO] | None = None,
    ) -> None:
        if size_limit is not None and (next_file is None or size_limit < 1):
            raise UsageError("a size limit needs a positive size and a next_file callable")
        self.byte_order = byte_order or HOST_ORDER
        self.flush_interval = flush_interval
        self.max_interfaces = max_interfaces
        self.size_limit = size_limit
        self.next_file = next_file
        self.packets = 0
        self.rejected = 0
        self.files = 1
        self._lost: dict[Stream, int] = {}
        self._shb_size = len(enc.shb(self.byte_order, SHB_OPTIONS))
        self._last_flush = time.monotonic()
        self._start(file)

    def _start(self, file: BinaryIO) -> None:
        """Begin a file: a section header; interfaces are declared again as packets need them."""
        self.writer = Writer(file, byte_order=self.byte_order, options=SHB_OPTIONS)
        self.size = self._shb_size
        self._by_object: dict[tuple[int, int], tuple[Interface, Stream, int]] = {}
        self._by_content: dict[tuple, int] = {}
        self._keys: list[tuple] = []  # the content key of each interface ID
        self._stream_ifaces: dict[Stream, list[int]] = {}

    def _rotate(self) -> None:
        self.writer.flush()
        self._start(self.next_file())
        self.files += 1

    # -- interfaces ---------------------------------------------------------------------------

    def _describe(self, stream: Stream, iface: Interface) -> tuple[tuple, Interface]:
        """The content key of a decoded interface and the IDB it gets in the output."""
        source = stm_options(iface.options).get("if", str(iface.id))
        options = without_stm_options(iface.options)
        key = (stream, source, iface.linktype, iface.snaplen, options)
        name = f"{stream.producer}/{stream.key}/{iface.name or 'if' + source}"
        named = ((c.IF_NAME, name), *(o for o in options if o[0] != c.IF_NAME))
        return key, Interface(iface.linktype, iface.snaplen, named)

    def _ifid(self, stream: Stream, iface: Interface) -> int | None:
        # Identical IDBs of two producers decode to one cached object: key on both.
        entry = self._by_object.get((id(iface), id(stream)))
        if entry is not None and entry[0] is iface and entry[1] is stream:
            return entry[2]
        key, template = self._describe(stream, iface)
        ifid = self._by_content.get(key)
        if ifid is None:
            ifid = self._declare(stream, key, template)
            if ifid is None:
                return None
        if len(self._by_object) > 4096:
            self._by_object.clear()
        self._by_object[(id(iface), id(stream))] = (iface, stream, ifid)
        return ifid

    def _declare(self, stream: Stream, key: tuple, template: Interface) -> int | None:
        if len(self._by_content) >= self.max_interfaces:
            return None
        try:
            ifid = self.writer.copy_interface(template)
        except UsageError:
            return None  # e.g. an if_tsresol no file can hold: its packets are rejected
        if self.size_limit is not None:
            self.size += self._idb_size(template)
        self._by_content[key] = ifid
        self._keys.append(key)
        self._stream_ifaces.setdefault(stream, []).append(ifid)
        return ifid

    def _idb_size(self, iface: Interface) -> int:
        return len(enc.idb(self.byte_order, iface.linktype, iface.snaplen, iface.options))

    def _idb_need(self, stream: Stream, ifaces) -> int:
        """Bytes of the IDBs a write on these interfaces would add to the current file."""
        need = 0
        for iface in ifaces:
            entry = self._by_object.get((id(iface), id(stream)))
            if entry is not None and entry[0] is iface and entry[1] is stream:
                continue
            key, template = self._describe(stream, iface)
            if key not in self._by_content and len(self._by_content) < self.max_interfaces:
                need += self._idb_size(template)
        return need

    def _make_room(self, need: int) -> None:
        """Start the next file if ``need`` more bytes would take this one past the limit."""
        if self.size + need > self.size_limit and self.size > self._shb_size:
            self._rotate()

    # -- packets ------------------------------------------------------------------------------

    def write(self, stream: Stream, packets: list[Packet], now: float | None = None) -> None:
        """Append packets of one stream (from a ``Packets`` event)."""
        if self.size_limit is not None:
            self._write_limited(stream, packets, now)
        else:
            self._write(packets, stream, now)

    def _write_limited(self, stream: Stream, packets: list[Packet], now: float | None) -> None:
        """``write`` one packet at a time, so a new file may start between two packets."""
        bo = self.byte_order
        for pkt in packets:
            n = len(pkt.data)
            epb = 32 + n + (-n & 3)
            if pkt.ts is None:
                epb += len(enc.packet_options(bo, None, (), (ARRIVAL_TIME,)))
            elif pkt.flags is not None or pkt.comments or pkt.options:
                epb += len(enc.packet_options(bo, pkt.flags, pkt.comments, pkt.options))
            self._make_room(epb + self._idb_need(stream, (pkt.interface,)))
            before = self.packets
            self._write((pkt,), stream, now)  # adds the size of any IDB it declares
            if self.packets != before:
                self.size += epb

    def _write(self, packets, stream: Stream, now: float | None) -> None:
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
        stream = event.stream
        if self.size_limit is not None:
            blocks = len(event.data) - event.start
            self._make_room(blocks + self._idb_need(stream, event.interfaces))
        ids = [self._ifid(stream, iface) for iface in event.interfaces]
        written = self.writer.copy_epbs(event.data, event.start, ids)
        self.packets += written
        self.rejected += event.count - written
        if self.size_limit is not None:
            if written != event.count:
                blocks -= _left_out(self.byte_order, event.data, event.start, ids)
            self.size += blocks

    def loss(self, stream: Stream, lost: int, now: float | None = None) -> None:
        """Record that ``lost`` datagrams of ``stream`` are missing so far (net of late
        arrivals), as an ISB on each of its interfaces in the current file."""
        if self._lost.get(stream) == lost:
            return
        self._lost[stream] = lost
        ifids = self._stream_ifaces.get(stream)
        if not ifids:
            return
        options = [
            (c.ISB_IFDROP, max(lost, 0)),
            (
                c.OPT_COMMENT,
                f"stm: {lost} report datagram(s) of stream {stream} lost so far "
                "(sequence gaps; each carried one or more packets)",
            ),
        ]
        if self.size_limit is not None:
            isb = len(enc.isb(self.byte_order, 0, 0, options))
            if self.size + isb * len(ifids) > self.size_limit and self.size > self._shb_size:
                # The next file gets the stream's interfaces again, then the statistics.
                carried = [(self._keys[i], self.writer.interfaces[i]) for i in ifids]
                self._rotate()
                for key, iface in carried:
                    self._declare(
                        stream, key, Interface(iface.linktype, iface.snaplen, iface.options)
                    )
                ifids = self._stream_ifaces.get(stream, [])
            self.size += isb * len(ifids)
        wall = time.time() if now is None else now
        for ifid in ifids:
            self.writer.write_statistics(ifid, _ticks(self.writer.interfaces[ifid], wall), options)

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


def _left_out(bo: str, data: bytes, start: int, ids: list[int | None]) -> int:
    """Bytes of the EPBs in ``data[start:]`` whose interface has no ID here (not copied)."""
    head = _EPB_HEAD[bo].unpack_from
    ifid_at = struct.Struct(bo + "I").unpack_from
    off, n, skipped = start, len(data), 0
    while off < n:
        blen = head(data, off)[1]
        if ids[ifid_at(data, off + 8)[0]] is None:
            skipped += blen
        off += blen
    return skipped
