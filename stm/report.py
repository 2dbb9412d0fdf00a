"""STM reports of format A (UDP-GRE-pcapng): the sans-IO encoder and decoder.

Encoder: packets in, datagram payloads (GRE header + one self-contained pcapng section) out.
Each payload holds an SHB naming the producer, the IDBs its packets use and as many whole
EPBs as fit the path MTU, so every datagram decodes alone, in any order. A packet too big
for one datagram is split into fragments carried in pcapng custom blocks, or truncated, or
dropped (``oversize``). The caller passes the time, so linger and timeouts need no clock.

Decoder: datagram payloads in, events out (``Packets``, ``Gap``, ``Duplicate``,
``Reordered``, ``Restarted``, ``FragmentsExpired``, ``Malformed``), in the style of h11:
``receive_datagram()`` then ``next_event()``. Streams and pending fragments are bounded so
a flood of forged keys cannot grow memory.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Literal

from stm import __version__, gre
from stm.errors import MalformedPcapng, MalformedReport, UsageError
from stm.pcapng import constants as c
from stm.pcapng import encode as enc
from stm.pcapng.reader import Reader
from stm.pcapng.records import CustomBlock, Interface, Packet, Section
from stm.pcapng.section import SectionDecoder
from stm.pcapng.writer import HOST_ORDER

# IANA Private Enterprise Number under which stm's custom options and blocks are written.
# 32473 is the number RFC 5612 sets aside for examples and documentation: stm uses it until
# it has a number of its own, and both ends let it be configured.
STM_PEN = 32473
FRAGMENT_KIND = 1  # kind of stm custom block: a piece of a packet block too big for a datagram
IPV4_HEADER = 20
IPV6_HEADER = 40
UDP_HEADER = 8
MAX_UDP_PAYLOAD = 65507

Oversize = Literal["fragment", "truncate", "drop"]
_FRAG = {bo: struct.Struct(bo + "IHHIII") for bo in "<>"}  # pen, kind, 0, id, offset, total
_FRAG_HEADER = 20
_CB_OVERHEAD = 12 + _FRAG_HEADER


def stream_id_for(producer: str) -> int:
    """The default stream ID (GRE key) of a producer: a CRC-32 of its name."""
    return zlib.crc32(producer.encode("utf-8"))


def _stm_option(key: str, value: str) -> tuple[int, tuple[int, bytes]]:
    return (c.OPT_CUSTOM_STR, (STM_PEN, f"{key}={value}".encode()))


def stm_options(options) -> dict[str, str]:
    """stm's own ``key=value`` custom string options of a block."""
    out = {}
    for code, value in options:
        if code == c.OPT_CUSTOM_STR and isinstance(value, tuple) and value[0] == STM_PEN:
            key, _, val = value[1].decode("utf-8", "replace").partition("=")
            out[key] = val
    return out


def without_stm_options(options) -> tuple:
    """The options of a block less stm's own, for writing the rebuilt capture."""
    return tuple(
        o
        for o in options
        if not (o[0] in c.CUSTOM_OPTIONS and isinstance(o[1], tuple) and o[1][0] == STM_PEN)
    )


class EncoderStats:
    """What an encoder has done; plain counters, read at the end or periodically."""

    __slots__ = ("bytes", "datagrams", "dropped", "fragmented", "packets", "truncated")

    def __init__(self) -> None:
        self.packets = self.datagrams = self.bytes = 0
        self.fragmented = self.truncated = self.dropped = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


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
        if oversize not in ("fragment", "truncate", "drop"):
            raise UsageError(f"oversize must be fragment, truncate or drop, not {oversize!r}")
        self.producer = producer
        self.stream_id = stream_id_for(producer) if stream_id is None else stream_id
        if not 0 <= self.stream_id <= 0xFFFFFFFF:
            raise UsageError(f"stream ID {stream_id} does not fit 32 bits")
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
                _stm_option("producer", producer),
                _stm_option("session", f"{self.session:016x}"),
            ],
        )
        if self.budget < len(self._shb) + 64 + _CB_OVERHEAD + 64:
            raise UsageError(f"MTU {mtu} leaves no room for a report")
        self._known: dict[int, tuple[Interface, int, bytes]] = {}
        self._by_content: dict[Interface, int] = {}
        self._reset_batch()
        self._next_packet_id = 0

    # -- batching ---------------------------------------------------------------------------

    def _reset_batch(self) -> None:
        self._parts: list[bytes] = [self._shb]  # the GRE header goes first, at flush
        self._local: dict[int, int] = {}
        self._blocks: list[bytes] = []
        self._size = len(self._shb)
        self._first: float | None = None

    def _interface(self, iface: Interface) -> tuple[Interface, int, bytes]:
        entry = self._known.get(id(iface))
        if entry is not None and entry[0] is iface:
            return entry
        index = self._by_content.setdefault(iface, len(self._by_content))
        options = (*without_stm_options(iface.options), _stm_option("if", str(index)))
        entry = (iface, index, enc.idb(self.bo, iface.linktype, iface.snaplen, options))
        if len(self._known) > 4096:
            self._known.clear()
        self._known[id(iface)] = entry
        return entry

    def add(self, packet: Packet, now: float) -> list[bytes]:
        """Take one packet; return the datagrams that became ready (often none)."""
        _, index, idb = self._interface(packet.interface)
        self.stats.packets += 1
        data = packet.data
        bo = self.bo
        opts = (
            enc.packet_options(bo, packet.flags, packet.comments, packet.options)
            if packet.flags is not None or packet.comments or packet.options
            else b""
        )
        n = len(data)
        spb = packet.ts is None
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
        if spb:
            self._blocks.append(enc.spb(bo, data, packet.origlen))
        else:
            self._blocks.append(enc.epb(bo, local, packet.ts, data, packet.origlen, opts))
        self._size += need
        if self._first is None:
            self._first = now
        return out

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
        self._parts += self._blocks
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


# -- decoder --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stream:
    """One producer's stream: its name and the GRE key (stream ID) it sends with."""

    producer: str
    key: int

    def __str__(self) -> str:
        return f"{self.producer}/{self.key}"


@dataclass(frozen=True, slots=True)
class Packets:
    """Packets of one datagram. Each packet's interface is the datagram's IDB, whose stm
    ``if=N`` option names the source interface (see ``stm_options``)."""

    stream: Stream
    packets: list[Packet]
    sequence: int | None


@dataclass(frozen=True, slots=True)
class Gap:
    """``missing`` datagrams of ``stream`` did not arrive before ``sequence`` (maybe later)."""

    stream: Stream
    missing: int
    sequence: int


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A datagram already seen: its packets are not delivered again."""

    stream: Stream
    sequence: int


@dataclass(frozen=True, slots=True)
class Reordered:
    """A datagram that arrived after later ones; it fills an earlier gap."""

    stream: Stream
    sequence: int


@dataclass(frozen=True, slots=True)
class Restarted:
    """The producer started a new session (restart): sequence tracking starts again."""

    stream: Stream


@dataclass(frozen=True, slots=True)
class FragmentsExpired:
    """A fragmented packet that never completed (lost pieces, timeout or memory bound)."""

    stream: Stream
    packets: int


@dataclass(frozen=True, slots=True)
class Malformed:
    """Input that is not a valid report; it was skipped."""

    reason: str
    source: object = None


Event = Packets | Gap | Duplicate | Reordered | Restarted | FragmentsExpired | Malformed


class StreamStats:
    """Per-stream counters kept by the decoder."""

    __slots__ = (
        "bytes",
        "datagrams",
        "duplicates",
        "fragments_expired",
        "lost",
        "packets",
        "reordered",
        "restarts",
    )

    def __init__(self) -> None:
        for k in self.__slots__:
            setattr(self, k, 0)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class _StreamState:
    """Sequence state: the highest number seen and a bitmap of the ``window`` numbers below it
    (bit k set = ``top - k`` arrived), as IPsec's anti-replay window does."""

    __slots__ = ("mask", "session", "span", "stats", "top")

    def __init__(self, session: str | None) -> None:
        self.session = session
        self.top: int | None = None
        self.mask = 0
        self.span = 0  # numbers from the first one seen up to top, at most the window
        self.stats = StreamStats()


class Decoder:
    """Format-A datagram payloads in; events out. All limits are per decoder."""

    def __init__(
        self,
        *,
        protocol_type: int | None = gre.STM_PROTOCOL_TYPE,
        verify_checksum: bool = True,
        max_streams: int = 1024,
        window: int = 1024,
        max_pending_packets: int = 256,
        max_pending_bytes: int = 64 << 20,
        fragment_timeout: float = 5.0,
        max_packet: int = c.DEFAULT_MAX_BLOCK,
    ) -> None:
        self.protocol_type = protocol_type
        self.verify_checksum = verify_checksum
        self.max_streams = max_streams
        self.window = window
        self.max_pending_packets = max_pending_packets
        self.max_pending_bytes = max_pending_bytes
        self.fragment_timeout = fragment_timeout
        self.max_packet = max_packet
        self.malformed = 0
        self.evicted_streams = 0
        self.streams: OrderedDict[Stream, _StreamState] = OrderedDict()
        self._stream_names: dict[tuple[str, int | None], Stream] = {}
        self._sections = SectionDecoder()
        self._section_info: dict[int, tuple[Section, str, str | None]] = {}
        self._pending: OrderedDict[tuple, _Reassembly] = OrderedDict()
        self._pending_bytes = 0
        self._events: deque[Event] = deque()

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def events(self) -> list[Event]:
        """Every event queued so far (and clear the queue)."""
        out = list(self._events)
        self._events.clear()
        return out

    def stats(self, stream: Stream) -> StreamStats:
        return self.streams[stream].stats

    def _malformed(self, reason: str, source: object) -> None:
        self.malformed += 1
        self._events.append(Malformed(reason, source))

    def receive_datagram(self, data: bytes, source: object = None, now: float = 0.0) -> None:
        """Decode one datagram payload (GRE header onwards)."""
        try:
            ptype, key, seq, _, payload = gre.parse(data, self.verify_checksum)
        except MalformedReport as exc:
            self._malformed(str(exc), source)
            return
        if self.protocol_type is not None and ptype != self.protocol_type:
            self._malformed(f"GRE protocol type 0x{ptype:04x}", source)
            return
        try:
            section, ifaces, packets, custom = self._sections.decode(payload)
        except MalformedPcapng as exc:
            self._malformed(f"bad pcapng payload: {exc}", source)
            return
        info = self._section_info.get(id(section))
        if info is None or info[0] is not section:
            opts = stm_options(section.options)
            info = (section, opts.get("producer", ""), opts.get("session"))
            if len(self._section_info) > 4096:
                self._section_info.clear()
            self._section_info[id(section)] = info
        stream = self._stream_names.get((info[1], key))
        if stream is None:
            if len(self._stream_names) > 4 * self.max_streams:
                self._stream_names.clear()
            stream = self._stream_names[(info[1], key)] = Stream(info[1], key or 0)
        state = self._state(stream, info[2])
        if seq is not None and not self._track(stream, state, seq):
            return
        stats = state.stats
        stats.datagrams += 1
        stats.bytes += len(data)
        for block in custom:
            pkt = self._fragment(stream, state, block, section, ifaces, source, now)
            if pkt is not None:
                packets.append(pkt)
        if packets:
            stats.packets += len(packets)
            self._events.append(Packets(stream, packets, seq))

    def _state(self, stream: Stream, session: str | None) -> _StreamState:
        state = self.streams.get(stream)
        if state is None:
            state = _StreamState(session)
            self.streams[stream] = state
            if len(self.streams) > self.max_streams:
                self.streams.popitem(last=False)
                self.evicted_streams += 1
        else:
            self.streams.move_to_end(stream)
            if session != state.session:
                stats = state.stats
                state.__init__(session)  # type: ignore[misc]
                state.stats = stats
                stats.restarts += 1
                self._events.append(Restarted(stream))
        return state

    def _track(self, stream: Stream, state: _StreamState, seq: int) -> bool:
        """Sequence accounting; False when the datagram must be dropped as a duplicate."""
        window = self.window
        stats = state.stats
        top = state.top
        if top is not None:
            d = gre.seq_diff(seq, top)
            if d > 0:
                if d > 1:
                    stats.lost += d - 1
                    self._events.append(Gap(stream, d - 1, seq))
                state.top = seq
                state.mask = ((state.mask << d) | 1) & ((1 << window) - 1) if d < window else 1
                state.span = min(window, state.span + d)
                return True
            k = -d
            if k < window:
                bit = 1 << k
                if state.mask & bit:
                    stats.duplicates += 1
                    self._events.append(Duplicate(stream, seq))
                    return False
                state.mask |= bit
                stats.reordered += 1
                if k < state.span:
                    stats.lost -= 1  # it was counted in a gap; older than the first one was not
                self._events.append(Reordered(stream, seq))
                return True
            # Far behind with the same session: the producer lost its counter; start over.
            stats.restarts += 1
            self._events.append(Restarted(stream))
        state.top = seq
        state.mask = 1
        state.span = 1
        return True

    # -- fragments ------------------------------------------------------------------------

    def _fragment(
        self,
        stream: Stream,
        state: _StreamState,
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
        piece = block.data[16:]
        if total > self.max_packet or offset >= total or not ifaces:
            self._malformed(f"bad fragment (offset {offset}, total {total})", source)
            return None
        piece = piece[: total - offset]  # drop the block padding past the end
        key = (stream, state.session, pid)
        entry = self._pending.get(key)
        if entry is None and total > self.max_pending_bytes:
            self._malformed(f"fragmented packet of {total} bytes is over the pending limit", source)
            return None
        if entry is None:
            self._expire_for(total)
            entry = _Reassembly(total, now)
            self._pending[key] = entry
            self._pending_bytes += total
        elif entry.total != total:
            self._malformed("fragments of one packet disagree on its length", source)
            return None
        if not entry.add(offset, piece):
            return None
        del self._pending[key]
        self._pending_bytes -= total
        return self._packet_from_block(bytes(entry.buf), bo, ifaces[0], source)

    def _packet_from_block(
        self, block: bytes, bo: str, iface: Interface, source: object
    ) -> Packet | None:
        reader = Reader(max_block_size=self.max_packet + 64)
        reader.feed(enc.shb(bo) + enc.idb(bo, iface.linktype, iface.snaplen, iface.options))
        reader.feed(block)
        reader.close()
        try:
            packets = [e for e in reader if isinstance(e, Packet)]
        except MalformedPcapng as exc:
            self._malformed(f"reassembled packet is malformed: {exc}", source)
            return None
        if len(packets) != 1:
            self._malformed("reassembled fragments are not one packet", source)
            return None
        packet = packets[0]
        packet.interface = iface
        return packet

    def _expire_for(self, incoming: int) -> None:
        while self._pending and (
            len(self._pending) >= self.max_pending_packets
            or self._pending_bytes + incoming > self.max_pending_bytes
        ):
            self._drop_pending(next(iter(self._pending)))

    def _drop_pending(self, key: tuple) -> None:
        entry = self._pending.pop(key)
        self._pending_bytes -= entry.total
        stream = key[0]
        state = self.streams.get(stream)
        if state is not None:
            state.stats.fragments_expired += 1
        self._events.append(FragmentsExpired(stream, 1))

    def expire(self, now: float) -> None:
        """Give up on fragmented packets older than ``fragment_timeout``."""
        for key, entry in list(self._pending.items()):
            if now - entry.started >= self.fragment_timeout:
                self._drop_pending(key)

    def pending_fragments(self) -> int:
        return len(self._pending)


class _Reassembly:
    __slots__ = ("buf", "got", "offsets", "started", "total")

    def __init__(self, total: int, now: float) -> None:
        self.total = total
        self.buf = bytearray(total)
        self.got = 0
        self.offsets: set[int] = set()
        self.started = now

    def add(self, offset: int, piece: bytes) -> bool:
        """Store a piece; True once every byte has arrived."""
        if offset not in self.offsets:
            self.offsets.add(offset)
            self.buf[offset : offset + len(piece)] = piece
            self.got += len(piece)
        return self.got >= self.total
