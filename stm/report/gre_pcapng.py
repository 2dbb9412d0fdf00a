"""Format A, UDP-GRE-pcapng: the sans-IO encoder and decoder.

Encoder: packets in, datagram payloads (GRE header + one self-contained pcapng section) out.
Each payload holds an SHB naming the producer, the IDBs its packets use and as many whole
EPBs as fit the path MTU, so every datagram decodes alone, in any order. A packet too big
for one datagram is split into fragments carried in pcapng custom blocks, or truncated, or
dropped (``oversize``). The caller passes the time, so linger and timeouts need no clock.

Decoder: datagram payloads in, events out, in the style of h11: ``receive_datagram()`` then
``next_event()`` (see ``stm.report.events``).
"""

from __future__ import annotations

import os
import struct

from stm import __version__, gre
from stm.errors import MalformedPcapng, MalformedReport, UsageError
from stm.pcapng import constants as c
from stm.pcapng import encode as enc
from stm.pcapng.block import packet_from_block
from stm.pcapng.records import CustomBlock, Interface, Packet, RawPackets, Section
from stm.pcapng.section import SectionDecoder
from stm.pcapng.writer import HOST_ORDER
from stm.report.common import (
    IPV4_HEADER,
    MAX_UDP_PAYLOAD,
    STM_PEN,
    UDP_HEADER,
    EncoderStats,
    Oversize,
    check_oversize,
    stm_option,
    stm_options,
    stream_id_for,
    without_stm_options,
)
from stm.report.events import PacketBlocks, Packets
from stm.report.streams import StreamDecoder

FRAGMENT_KIND = 1  # kind of stm custom block: a piece of a packet block too big for a datagram
_FRAG = {bo: struct.Struct(bo + "IHHIII") for bo in "<>"}  # pen, kind, 0, id, offset, total
_FRAG_HEADER = 20
_GRE_KS = struct.Struct("!HHII")  # flags, protocol type, key, sequence
_CB_OVERHEAD = 12 + _FRAG_HEADER


class Encoder:
    """Packets in, format-A datagram payloads (what goes after the UDP header) out."""

    def __init__(
        self,
        producer: str,
        stream_id: int | None = None,
        *,
        mtu: int = 1500,
        ip_header: int = IPV4_HEADER,
        linger: float = 0.005,
        oversize: Oversize = "fragment",
        checksum: bool = False,
        protocol_type: int = gre.STM_PROTOCOL_TYPE,
        byte_order: str | None = None,
        session: int | None = None,
        sequence: int = 0,
    ) -> None:
        check_oversize(oversize)
        self.producer = producer
        self.stream_id = stream_id_for(producer, stream_id)
        self.session = int.from_bytes(os.urandom(8), "big") if session is None else session
        self.oversize = oversize
        self.linger = linger
        self.checksum = checksum
        self.protocol_type = protocol_type
        self.bo = byte_order or HOST_ORDER
        self.sequence = sequence & 0xFFFFFFFF
        self.stats = EncoderStats()
        self._gre_len = 16 if checksum else 12
        self.budget = min(mtu - ip_header - UDP_HEADER, MAX_UDP_PAYLOAD) - self._gre_len
        self._shb = enc.shb(
            self.bo,
            [
                (c.SHB_USERAPPL, f"stm {__version__}"),
                stm_option("producer", producer),
                stm_option("session", f"{self.session:016x}"),
            ],
        )
        if self.budget < len(self._shb) + 64 + _CB_OVERHEAD + 64:
            raise UsageError(f"MTU {mtu} leaves no room for a report")
        self._known: dict[int, tuple[Interface, int, bytes]] = {}
        self._last_entry: tuple = (None, 0, b"")  # the interface of the last packet
        self._epb_head = struct.Struct(self.bo + "IIIIIII").pack
        self._epb_tail = tuple(struct.Struct(self.bo + "x" * p + "I").pack for p in (0, 3, 2, 1))
        self._by_content: dict[Interface, int] = {}
        self._reset_batch()
        self._next_packet_id = 0

    # -- batching ---------------------------------------------------------------------------

    def _reset_batch(self) -> None:
        self._parts: list[bytes] = [self._shb]  # the GRE header goes first, at flush
        self._local: dict[int, int] = {}
        self._blocks = bytearray()  # the packet blocks of the batch, framed in place
        self._size = len(self._shb)
        self._first: float | None = None

    def _interface(self, iface: Interface) -> tuple[Interface, int, bytes]:
        entry = self._known.get(id(iface))
        if entry is not None and entry[0] is iface:
            return entry
        index = self._by_content.setdefault(iface, len(self._by_content))
        options = (*without_stm_options(iface.options), stm_option("if", str(index)))
        entry = (iface, index, enc.idb(self.bo, iface.linktype, iface.snaplen, options))
        if len(self._known) > 4096:
            self._known.clear()
        self._known[id(iface)] = entry
        return entry

    def add(self, packet: Packet, now: float) -> list[bytes]:
        """Take one packet; return the datagrams that became ready (often none)."""
        iface = packet.interface
        entry = self._last_entry
        if entry[0] is not iface:
            entry = self._known.get(id(iface))
            if entry is None or entry[0] is not iface:
                entry = self._interface(iface)
            self._last_entry = entry
        index, idb = entry[1], entry[2]
        self.stats.packets += 1
        data = packet.data
        bo = self.bo
        ts = packet.ts
        if packet.flags is None and not packet.comments and not packet.options:
            opts = b""
        else:
            opts = enc.packet_options(bo, packet.flags, packet.comments, packet.options)
        n = len(data)
        spb = ts is None
        blen = (16 + n + (-n & 3)) if spb else (32 + n + (-n & 3) + len(opts))
        local = self._local.get(index)
        need = blen if local is not None else blen + len(idb)
        out: list[bytes] = []
        if self._size + need > self.budget or (spb and local != 0 and self._local):
            if self._blocks:
                out.append(self._flush_batch())
            need = blen + len(idb)
            local = None
            if self._size + need > self.budget:
                return out + self._oversize(packet, idb, opts)
        if local is None:
            local = len(self._local)
            self._local[index] = local
            self._parts.append(idb)
        blocks = self._blocks
        if spb:
            blocks += enc.spb(bo, data, packet.origlen)
        elif opts:
            blocks += enc.epb(bo, local, ts, data, packet.origlen, opts)
        else:
            blocks += self._epb_head(
                c.EPB, blen, local, ts >> 32, ts & 0xFFFFFFFF, n, packet.origlen
            )
            blocks += data
            blocks += self._epb_tail[n & 3](blen)
        self._size += need
        if self._first is None:
            self._first = now
        return out

    # -- bulk input: runs of packet blocks, no Packet per packet -----------------------------

    def add_raw(
        self,
        run: RawPackets,
        interfaces: list[Interface],
        now: float,
    ) -> list[bytes]:
        """Take a run of packet blocks (``Reader(raw_packets=True)``); return ready datagrams.

        ``interfaces`` is the interface list of the run's section as read so far (the
        reader's, indexed by interface ID). An EPB in the encoder's byte order is copied
        whole, options and all, with only its interface ID rewritten to the datagram's;
        anything else (SPB, obsolete PB, a block too big for one datagram, a run in the
        other byte order) becomes a ``Packet`` for ``add``, so every policy is the same.

        The datagrams and statistics are those of ``add(p, now) or poll(now)`` for each
        packet ``p`` of the run in turn, as a per-packet sender loop makes them: with the
        same ``now`` for all, that is plain ``add`` unless a batch is due (``linger`` 0, or
        a batch of an earlier call). An EPB whose options are malformed raises
        ``MalformedPcapng``, as the reader's per-packet mode would; the datagrams that the
        blocks before it made ready are then on the exception, as ``datagrams``.
        """
        data = run.data
        bo = run.section.byte_order
        n = len(data)
        off = 0
        out: list[bytes] = []
        linger = self.linger
        zero = now >= now + linger  # every packet is due at once, as poll sees it
        blen_at = self._RAW_LEN[bo]
        try:
            # While a batch is due, each packet is followed by a poll (if it sent nothing).
            while off < n and (zero or (self._first is not None and now >= self._first + linger)):
                end = off + blen_at(data, off)[1]
                k = len(out)
                self._add_blocks(data, off, end, bo, interfaces, now, out)
                if len(out) == k:
                    out += self.poll(now)
                off = end
            if off < n:  # no batch can become due in the rest of the run
                self._add_blocks(data, off, n, bo, interfaces, now, out)
        except MalformedPcapng as exc:
            exc.datagrams = out  # type: ignore[attr-defined]
            raise
        return out

    # Block fields add_raw reads: type, length, interface ID, captured length (of an EPB).
    _RAW_HEAD = {bo: struct.Struct(bo + "III8xI").unpack_from for bo in "<>"}
    _RAW_LEN = {bo: struct.Struct(bo + "II").unpack_from for bo in "<>"}
    _RAW_OPT = {bo: struct.Struct(bo + "HH").unpack_from for bo in "<>"}
    _RAW_IFID = {bo: struct.Struct(bo + "I").pack_into for bo in "<>"}

    def _add_blocks(
        self,
        data: memoryview,
        off: int,
        stop: int,
        bo: str,
        interfaces: list[Interface],
        now: float,
        out: list[bytes],
    ) -> None:
        """The packet blocks in ``data[off:stop]``, in byte order ``bo``, into the batch.

        The rules of ``add`` (budget, IDBs, interface mapping), without polling. Blocks
        that already carry their datagram-local interface ID are copied in stretches.
        """
        head = self._RAW_HEAD[bo]
        short = self._RAW_LEN[bo]
        same = bo == self.bo
        options_ok = self._raw_options_ok
        set_ifid = self._RAW_IFID[self.bo]
        EPB = c.EPB
        budget = self.budget
        blocks = self._blocks
        size = self._size
        local_of = self._local
        packets = 0
        cur_ifid = -1  # the interface ID of the last block copied, while the batch is the same
        cur_local = 0
        patch = False  # cur_ifid differs from its local ID: each block is patched
        pending = off  # data[pending:off] is taken into the batch but not yet copied
        try:
            while off < stop:
                if stop - off >= 24:
                    btype, blen, ifid, caplen = head(data, off)
                else:  # a short SPB at the end of the run
                    btype, blen = short(data, off)
                    ifid = caplen = -2
                end = off + blen
                if (
                    ifid == cur_ifid
                    and btype == EPB
                    and size + blen <= budget
                    and (
                        blen - caplen < 36  # no options
                        or options_ok(data, off + 28 + caplen + (-caplen & 3), end - 4)
                    )
                ):
                    # The hot path: the same interface as the last block, and room.
                    size += blen
                    packets += 1
                    if patch:
                        blocks += data[off:end]
                        set_ifid(blocks, len(blocks) - blen + 8, cur_local)
                        pending = end
                    off = end
                    continue
                if pending < off:
                    blocks += data[pending:off]
                pending = end
                fallback = (
                    btype != EPB
                    or not same
                    or (
                        blen - caplen >= 36
                        and not options_ok(data, off + 28 + caplen + (-caplen & 3), end - 4)
                    )
                )
                if not fallback:
                    # An EPB to copy: map its interface as add() does.
                    iface = interfaces[ifid]
                    entry = self._last_entry
                    if entry[0] is not iface:
                        entry = self._known.get(id(iface))
                        if entry is None or entry[0] is not iface:
                            entry = self._interface(iface)
                        self._last_entry = entry
                    index, idb = entry[1], entry[2]
                    local = local_of.get(index)
                    need = blen if local is not None else blen + len(idb)
                    if size + need > budget:
                        if blocks:
                            out.append(self._flush_batch())
                            blocks, size, local_of = self._blocks, self._size, self._local
                        need = blen + len(idb)
                        local = None
                        fallback = size + need > budget  # too big for any datagram
                if fallback:  # not a block to copy whole: add() and its policies decide
                    self._size = size
                    self.stats.packets += packets
                    packets = 0
                    out += self.add(self._raw_packet(data, off, bo, interfaces), now)
                    blocks, size, local_of = self._blocks, self._size, self._local
                    cur_ifid = -1
                    off = end
                    continue
                if local is None:
                    local = len(local_of)
                    local_of[index] = local
                    self._parts.append(idb)
                if self._first is None:
                    self._first = now
                size += need
                packets += 1
                cur_ifid, cur_local, patch = ifid, local, ifid != local
                if patch:
                    blocks += data[off:end]
                    set_ifid(blocks, len(blocks) - blen + 8, local)
                else:
                    pending = off  # copied later, with the blocks that follow it
                off = end
            if pending < off:
                blocks += data[pending:off]
        finally:
            self._size = size
            self.stats.packets += packets

    def _raw_options_ok(self, data: memoryview, pos: int, tail: int) -> bool:
        """Whether an option list is framed as ``decode_options`` wants it (values aside)."""
        head = self._RAW_OPT[self.bo]
        while pos + 4 <= tail:
            code, length = head(data, pos)
            if code == c.OPT_ENDOFOPT:
                return True
            vend = pos + 4 + length
            if vend > tail:
                return False
            pos = vend + (-length & 3)
        return pos == tail

    @staticmethod
    def _raw_packet(data: memoryview, off: int, bo: str, interfaces: list[Interface]) -> Packet:
        """The packet block at ``off`` as the reader's per-packet mode gives it."""
        blen = struct.unpack_from(bo + "I", data, off + 4)[0]
        try:
            return packet_from_block(data[off : off + blen], bo, interfaces)
        except MalformedPcapng as exc:  # its offset would be in the run, not in the input
            raise MalformedPcapng(f"{exc.reason} (packet block {off} bytes into a run)") from None

    def _oversize(self, packet: Packet, idb: bytes, opts: bytes) -> list[bytes]:
        bo = self.bo
        if self.oversize == "drop":
            self.stats.dropped += 1
            return []
        if self.oversize == "truncate" and packet.ts is not None:
            room = self.budget - len(self._shb) - len(idb) - 32
            if len(opts) > room // 2:
                opts = b""  # comments too long to keep: the packet bytes matter more
            room = (room - len(opts)) & ~3
            self.stats.truncated += 1
            block = enc.epb(bo, 0, packet.ts, packet.data[:room], packet.origlen, opts)
            return [self._datagram([self._shb, idb, block])]
        # Fragment (SPBs are always fragmented: an SPB cannot say it was truncated).
        self.stats.fragmented += 1
        if packet.ts is None:
            block = enc.spb(bo, packet.data, packet.origlen)
        else:
            block = enc.epb(bo, 0, packet.ts, packet.data, packet.origlen, opts)
        piece = (self.budget - len(self._shb) - len(idb) - _CB_OVERHEAD) & ~3
        pid = self._next_packet_id
        self._next_packet_id = (pid + 1) & 0xFFFFFFFF
        total = len(block)
        view = memoryview(block)
        frag = _FRAG[bo]
        out = []
        for offset in range(0, total, piece):
            chunk = view[offset : offset + piece]
            body = frag.pack(STM_PEN, FRAGMENT_KIND, 0, pid, offset, total) + bytes(chunk)
            body += enc.PAD[len(body) & 3]
            out.append(self._datagram([self._shb, idb, enc.block(bo, c.CB_NOCOPY, body)]))
        return out

    def _datagram(self, parts: list[bytes]) -> bytes:
        seq = self.sequence
        self.sequence = (seq + 1) & 0xFFFFFFFF
        if self.checksum:
            payload = b"".join(parts)
            header = gre.pack_header(self.protocol_type, self.stream_id, seq, True, payload)
            dgram = header + payload
        else:
            parts[0:0] = (gre.pack_header(self.protocol_type, self.stream_id, seq),)
            dgram = b"".join(parts)
        self.stats.datagrams += 1
        self.stats.bytes += len(dgram)
        return dgram

    def _flush_batch(self) -> bytes:
        self._parts.append(self._blocks)
        dgram = self._datagram(self._parts)
        self._reset_batch()
        return dgram

    def poll(self, now: float) -> list[bytes]:
        """The pending batch, if it has lingered long enough (``now >= deadline()``)."""
        if self._first is not None and now >= self._first + self.linger:
            return [self._flush_batch()]
        return []

    def deadline(self) -> float | None:
        """When ``poll`` will next have something to flush."""
        return None if self._first is None else self._first + self.linger

    def flush(self) -> list[bytes]:
        """Everything pending, now (end of input)."""
        return [self._flush_batch()] if self._blocks else []


class Decoder(StreamDecoder):
    """Format-A datagram payloads in; events out. Limits are those of ``StreamDecoder``."""

    def __init__(
        self,
        *,
        protocol_type: int | None = gre.STM_PROTOCOL_TYPE,
        verify_checksum: bool = True,
        raw_byte_order: str | None = None,
        **limits,
    ) -> None:
        super().__init__(**limits)
        self.protocol_type = protocol_type
        self.verify_checksum = verify_checksum
        # A relay writing pcapng in this byte order takes reports in it as PacketBlocks.
        self.raw_byte_order = raw_byte_order
        self._sections = SectionDecoder()
        self._section_info: dict[int, tuple[Section, str, str | None]] = {}
        # The last report's section, key, stream, state, and the eviction count then: a
        # stream evicted since (and so its state) is never taken from here.
        self._last: tuple = (None, None, None, None, -1)
        # The compiled relay path (stm.accel): a datagram of the usual shape (GRE key and
        # sequence, a known prefix, EPBs without options) checked in one call.
        prefixes = self._sections.accel
        self._gre_run = None if prefixes is None or raw_byte_order is None else prefixes.gre_run

    def receive_datagram(self, data: bytes, source: object = None, now: float = 0.0) -> None:
        """Decode one datagram payload (GRE header onwards)."""
        run = None
        gre_run = self._gre_run
        if gre_run is not None:
            ptype = self.protocol_type
            hit = gre_run(data, -1 if ptype is None else ptype)
            if hit is not None:
                index, key, seq, first, count = hit
                section, ifaces = self._sections.recent(index)
                if section.byte_order == self.raw_byte_order:
                    run = hit  # what the Python path below finds for it, found in one call
        if run is None:
            if data.startswith(b"\x30\x00") and len(data) >= 12:  # K and S, as stm sends
                _, ptype, key, seq = _GRE_KS.unpack_from(data)
                start = 12
            else:
                try:
                    ptype, key, seq, _, payload = gre.parse(data, self.verify_checksum)
                except MalformedReport as exc:
                    self._malformed(str(exc), source)
                    return
                start = len(data) - len(payload)
            if self.protocol_type is not None and ptype != self.protocol_type:
                self._malformed(f"GRE protocol type 0x{ptype:04x}", source)
                return
            if self.raw_byte_order is not None:
                run = self._sections.decode_run(data, start)
                if run is not None and run[0].byte_order != self.raw_byte_order:
                    run = None
            if run is not None:
                section, ifaces, first, count = run
            else:
                try:
                    section, ifaces, packets, custom = self._sections.decode(data, start)
                except MalformedPcapng as exc:
                    self._malformed(f"bad pcapng payload: {exc}", source)
                    return
        last = self._last
        if last[0] is section and last[1] == key and last[4] == self.evicted_streams:
            stream, state = last[2], last[3]  # the same stream as the last report: no lookups
        else:
            info = self._section_info.get(id(section))
            if info is None or info[0] is not section:
                opts = stm_options(section.options)
                info = (section, opts.get("producer", ""), opts.get("session"))
                if len(self._section_info) > 4096:
                    self._section_info.clear()
                self._section_info[id(section)] = info
            stream = self._stream(info[1], key)
            state = self._state(stream, info[2])
            self._last = (section, key, stream, state, self.evicted_streams)
        if seq is not None:
            top = state.top
            if top is not None and seq == (top + 1) & 0xFFFFFFFF and state.span >= self.window:
                # In order, in a full window: _track's first case, without the call.
                state.top = seq
                state.mask = ((state.mask << 1) | 1) & self._window_mask
            elif not self._track(stream, state, seq):
                return
        stats = state.stats
        stats.datagrams += 1
        stats.bytes += len(data)
        if run is not None:
            if count:
                stats.packets += count
                self._events.append(PacketBlocks(stream, ifaces, data, first, count, seq))
            return
        for block in custom:
            pkt = self._fragment(stream, state, block, section, ifaces, source, now)
            if pkt is not None:
                packets.append(pkt)
        if packets:
            stats.packets += len(packets)
            self._events.append(Packets(stream, packets, seq))

    def receive_datagrams(self, datagrams, source: object = None, now: float = 0.0) -> None:
        """Decode a batch of datagram payloads from one source: the same events as
        ``receive_datagram`` for each in turn (the accelerator checks each in one call)."""
        receive = self.receive_datagram
        for data in datagrams:
            receive(data, source, now)

    def _fragment(
        self,
        stream,
        state,
        block: CustomBlock,
        section: Section,
        ifaces: list[Interface],
        source: object,
        now: float,
    ) -> Packet | None:
        if block.pen != STM_PEN or len(block.data) < _FRAG_HEADER - 4:
            return None  # someone else's custom block: not ours to interpret
        bo = section.byte_order
        kind, _, pid, offset, total = struct.unpack_from(bo + "HHIII", block.data)
        if kind != FRAGMENT_KIND:
            return None
        if not ifaces:
            self._malformed("fragment without an interface", source)
            return None
        whole = self._reassemble(stream, state, pid, offset, total, block.data[16:], source, now)
        return None if whole is None else self._packet_from_block(whole, bo, ifaces[0], source)
