"""Format B, generic TLV in the HEP3 profile: the sans-IO encoder and decoder.

One message per packet. HEP's generic chunks (addresses, ports, time, protocol type,
capture ID, payload) let any HEP receiver show the signalling; stm's chunks (vendor 0x5354:
frame header, link type, interface, exact timestamp, lengths, flags, comments, producer,
session, stream and sequence) let stm-recv rebuild the frame exactly. A packet too big for
one message travels as pieces of its pcapng EPB in FRAGMENT chunks, as in format A.

The decoder also takes foreign HEP3 (no stm chunks): it synthesizes a raw IPv4/IPv6 frame
from the generic chunks, so the output still opens in Wireshark and dissects as SIP.
"""

from __future__ import annotations

import hmac
import operator
import os
import struct

from stm import accel, frames
from stm.errors import MalformedPcapng, UsageError
from stm.pcapng import constants as c
from stm.pcapng import encode as enc
from stm.pcapng.block import packets_from_blocks
from stm.pcapng.options import EPB_KINDS, IDB_KINDS, decode_options, encode_options
from stm.pcapng.records import Interface, Packet, RawPackets
from stm.report.common import (
    IPV4_HEADER,
    MAX_UDP_PAYLOAD,
    UDP_HEADER,
    EncoderStats,
    Oversize,
    check_oversize,
    stm_option,
    stream_id_for,
    without_stm_options,
)
from stm.report.events import PacketBlocks, Packets
from stm.report.gre_pcapng import Decoder, Encoder
from stm.report.streams import StreamDecoder
from stm.tlv import PROTOCOL_ID, STM_VENDOR, HepChunk, StmChunk

MAX_MESSAGE = 0xFFFF
_CH = struct.Struct("!HHH")
_HEADER = struct.Struct("!4sH")
_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_TS = struct.Struct("!BQq")
_FRAG = struct.Struct("!III")
_AF = {4: 2, 6: 10}  # HEP's IP family chunk holds AF_INET / AF_INET6 (Linux numbers)
_BLOCK_HEAD = {bo: struct.Struct(bo + "II") for bo in "<>"}  # block type, length
_EPB_MODE = {None: 0, "<": 1, ">": 2}
_new = tuple.__new__
# stm.accel's hep_fast: a frame, or an EPB in that order


def _chunk(vendor: int, ctype: int, value: bytes | memoryview) -> bytes:
    return _CH.pack(vendor, ctype, 6 + len(value)) + bytes(value)


def _g(ctype: int, value: bytes | memoryview) -> bytes:
    return _chunk(0, ctype, value)


def _s(ctype: int, value: bytes | memoryview) -> bytes:
    return _chunk(STM_VENDOR, ctype, value)


def _key(vendor: int, ctype: int) -> int:
    return vendor << 16 | ctype


# Decoder keys: vendor << 16 | type.
K_FAMILY = _key(0, HepChunk.IP_FAMILY)
K_PROTO = _key(0, HepChunk.IP_PROTO)
K_SRC4, K_DST4 = _key(0, HepChunk.IPV4_SRC), _key(0, HepChunk.IPV4_DST)
K_SRC6, K_DST6 = _key(0, HepChunk.IPV6_SRC), _key(0, HepChunk.IPV6_DST)
K_SPORT, K_DPORT = _key(0, HepChunk.SRC_PORT), _key(0, HepChunk.DST_PORT)
K_SEC, K_USEC = _key(0, HepChunk.TIMESTAMP_SEC), _key(0, HepChunk.TIMESTAMP_USEC)
K_CAPTURE = _key(0, HepChunk.CAPTURE_ID)
K_AUTH = _key(0, HepChunk.AUTH_KEY)
K_PAYLOAD = _key(0, HepChunk.PAYLOAD)
K_COMPRESSED = _key(0, HepChunk.COMPRESSED_PAYLOAD)
S = {m.name: _key(STM_VENDOR, m) for m in StmChunk}
# The chunks of the interface and stream that start every message of ours, in this order.
STATIC_KEYS = frozenset(
    (K_CAPTURE, K_AUTH, S["PRODUCER"], S["SESSION"], S["STREAM_ID"], S["LINKTYPE"],
     S["INTERFACE"])
)  # fmt: skip


class _Layout:
    """The fixed-size chunks that follow the static ones in a message of an IP packet with a
    timestamp: packed (and checked) with one ``struct`` call instead of one per chunk."""

    def __init__(self, fields: list[tuple[int, int, str]]) -> None:
        fmt = "!"
        self.headers = []
        index, self.header_index = 0, []
        for vendor, ctype, f in fields:
            size = struct.calcsize("!" + f)
            fmt += "6s" + f
            self.headers.append(_CH.pack(vendor, ctype, 6 + size))
            self.header_index.append(index)
            index += 1 + len(struct.unpack("!" + f, bytes(size)))
        self.struct = struct.Struct(fmt)
        self.size = self.struct.size
        self.headers = tuple(self.headers)
        self.get_headers = operator.itemgetter(*self.header_index)


def _ip_layout(src: int, dst: int, addr: str) -> _Layout:
    return _Layout(
        [
            (STM_VENDOR, StmChunk.SEQUENCE, "I"),
            (STM_VENDOR, StmChunk.ORIGINAL_LENGTH, "I"),
            (STM_VENDOR, StmChunk.TIMESTAMP, "BQq"),
            (0, HepChunk.TIMESTAMP_SEC, "I"),
            (0, HepChunk.TIMESTAMP_USEC, "I"),
            (0, HepChunk.IP_FAMILY, "B"),
            (0, HepChunk.IP_PROTO, "B"),
            (0, src, addr),
            (0, dst, addr),
            (0, HepChunk.SRC_PORT, "H"),
            (0, HepChunk.DST_PORT, "H"),
            (0, HepChunk.PROTO_TYPE, "B"),
        ]
    )


LAYOUTS = {
    4: _ip_layout(HepChunk.IPV4_SRC, HepChunk.IPV4_DST, "4s"),
    6: _ip_layout(HepChunk.IPV6_SRC, HepChunk.IPV6_DST, "16s"),
}
_FRAME_HEADER = _key(STM_VENDOR, StmChunk.FRAME_HEADER)


class TlvEncoder:
    """Packets in, format-B messages out (one per packet; pieces for oversize packets).

    ``transport`` sets the size budget: ``udp`` keeps each message within the path MTU,
    ``tcp`` only within the 65,535 bytes the length field can say.
    """

    def __init__(
        self,
        producer: str,
        stream_id: int | None = None,
        *,
        mtu: int = 1500,
        ip_header: int = IPV4_HEADER,
        transport: str = "udp",
        oversize: Oversize = "fragment",
        session: bytes | None = None,
        sequence: int = 0,
        auth_key: bytes | None = None,
    ) -> None:
        check_oversize(oversize)
        self.producer = producer
        self.stream_id = stream_id_for(producer, stream_id)
        self.session = os.urandom(8) if session is None else session
        self.oversize = oversize
        self.sequence = sequence & 0xFFFFFFFF
        self.stats = EncoderStats()
        limit = MAX_MESSAGE if transport == "tcp" else mtu - ip_header - UDP_HEADER
        self.budget = min(limit, MAX_MESSAGE, MAX_UDP_PAYLOAD)
        self._stream = b"".join(
            (
                _g(HepChunk.CAPTURE_ID, _U32.pack(self.stream_id)),
                _g(HepChunk.AUTH_KEY, auth_key) if auth_key else b"",
                _s(StmChunk.PRODUCER, producer.encode("utf-8")),
                _s(StmChunk.SESSION, self.session),
                _s(StmChunk.STREAM_ID, _U32.pack(self.stream_id)),
            )
        )
        if self.budget < 6 + len(self._stream) + 256:
            raise UsageError(f"MTU {mtu} leaves no room for a report")
        self._known: dict[int, tuple[Interface, bytes, object]] = {}
        self._last_entry: tuple = (None, b"", None)  # the interface of the last packet
        self._by_content: dict[Interface, int] = {}
        self._next_packet_id = 0
        self._ext = accel.ext

    def _interface(self, iface: Interface) -> bytes:
        """The chunks that depend on the interface only, encoded once per interface."""
        return self._entry(iface)[1]

    def _entry(self, iface: Interface) -> tuple[Interface, bytes, object]:
        """(interface, its static chunks, its ``stm.accel`` description or None)."""
        entry = self._known.get(id(iface))
        if entry is not None and entry[0] is iface:
            return entry
        index = self._by_content.setdefault(iface, len(self._by_content))
        options = (*without_stm_options(iface.options), stm_option("if", str(index)))
        value = _U32.pack(iface.snaplen) + encode_options(options, ">", IDB_KINDS)
        static = (
            self._stream
            + _s(StmChunk.LINKTYPE, _U16.pack(iface.linktype))
            + _s(StmChunk.INTERFACE, value)
        )
        fast = None
        if (
            self._ext is not None
            and 0 <= iface.tsresol <= 0xFF
            and 0 < iface.units < 1 << 64
            and -(1 << 63) <= iface.tsoffset < 1 << 63
            and 0 <= iface.linktype <= 0xFFFFFFFF
        ):  # timestamps the compiled encoder computes exactly as _encode does
            fast = self._ext.HepInterface(
                static, iface.linktype, iface.tsresol, iface.tsoffset, iface.units
            )
        if len(self._known) > 4096:
            self._known.clear()
        entry = self._known[id(iface)] = (iface, static, fast)
        return entry

    def _seq(self) -> bytes:
        """The SEQUENCE chunk of the next message; ``_count`` moves the number on."""
        return _s(StmChunk.SEQUENCE, _U32.pack(self.sequence))

    def add(self, packet: Packet, now: float = 0.0) -> list[bytes]:
        """Take one packet; return its message(s)."""
        self.stats.packets += 1
        ext = self._ext
        if (
            ext is not None
            and packet.flags is None
            and not packet.comments
            and not packet.options
            and packet.ts is not None
        ):
            # The common case in one compiled call: an IP packet that fits one message.
            iface = packet.interface
            entry = self._last_entry
            if entry[0] is not iface:
                entry = self._last_entry = self._entry(iface)
            if entry[2] is not None:
                message = ext.hep_encode_packet(
                    entry[2], self.sequence, packet.ts, packet.origlen, packet.data, self.budget
                )
                if message is not None:
                    return [self._count(message)]
        static = self._interface(packet.interface)
        message = self._message(packet, static, packet.data, packet.comments, packet.options)
        if message is not None and len(message) <= self.budget:
            return [self._count(message)]
        if self.oversize == "drop":
            self.stats.dropped += 1
            return []
        if self.oversize == "truncate" and packet.ts is not None:
            # Measure the message with the headers alone (no payload, no trailer): what is
            # left of the budget is how much payload can stay.
            data = packet.data
            split = frames.split(packet.interface.linktype, data)
            head = split.offset if split is not None else 0
            for comments, options in ((packet.comments, packet.options), ((), ())):
                bare = self._message(packet, static, data[:head], comments, options)
                if bare is None or len(bare) > self.budget:
                    continue
                message = self._message(
                    packet, static, data[: head + self.budget - len(bare)], comments, options
                )
                if message is not None and len(message) <= self.budget:
                    self.stats.truncated += 1
                    return [self._count(message)]
        return self._fragments(packet, static)

    def add_raw(
        self, run: RawPackets, interfaces: list[Interface], now: float = 0.0
    ) -> list[bytes]:
        """Take a run of packet blocks (``Reader(raw_packets=True)``); return its messages.

        ``interfaces`` is the interface list of the run's section as read so far (indexed by
        interface ID). The messages and statistics are those of ``add`` for each packet of
        the run in turn: with the accelerator, EPBs without options become messages in one
        compiled call per stretch; every other block (SPB, obsolete PB, EPB with options, a
        packet too big for one message, a frame that is not IP) is read as a ``Packet`` for
        ``add``. A malformed block raises ``MalformedPcapng``, as the reader's per-packet mode
        would; the messages made before it are then on the exception, as ``datagrams``.
        """
        data = run.data
        bo = run.section.byte_order
        n = len(data)
        off = 0
        out: list[bytes] = []
        ext = self._ext
        stats = self.stats
        head = _BLOCK_HEAD[bo].unpack_from
        try:
            if ext is None:  # in pure Python: the packets as the reader gives them, then add
                for packet in packets_from_blocks(data, bo, interfaces):
                    out += self.add(packet, now)
                return out
            while off < n:  # each turn takes a compiled stretch, then one block (>= 12 bytes)
                # Only interfaces add has met already: it numbers them as it meets them.
                fast = [self._met(i) for i in interfaces]
                messages, off, size = ext.hep_encode_run(
                    fast, data, off, bo == ">", self.sequence, self.budget
                )
                if messages:
                    k = len(messages)
                    stats.packets += k
                    stats.datagrams += k
                    stats.bytes += size
                    self.sequence = (self.sequence + k) & 0xFFFFFFFF
                    out += messages
                if off >= n:
                    break
                if n - off < 12 or head(data, off)[1] < 12:
                    raise MalformedPcapng("truncated packet block in a run")
                blen = head(data, off)[1]
                out += self.add(Encoder._raw_packet(data, off, bo, interfaces), now)
                off += blen
        except MalformedPcapng as exc:
            exc.datagrams = out  # type: ignore[attr-defined]
            raise
        return out

    def _met(self, iface: Interface) -> object:
        """The ``stm.accel`` description of an interface already met, else None."""
        entry = self._known.get(id(iface))
        return entry[2] if entry is not None and entry[0] is iface else None

    def _count(self, message: bytes) -> bytes:
        self.sequence = (self.sequence + 1) & 0xFFFFFFFF
        self.stats.datagrams += 1
        self.stats.bytes += len(message)
        return message

    def _message(self, packet: Packet, static: bytes, data, comments, options) -> bytes | None:
        """The message of one packet, or None when it cannot be one message at all."""
        try:
            return self._encode(packet, static, data, comments, options)
        except struct.error:
            return None  # a chunk over 65,535 bytes: the oversize policy decides

    def _encode(self, packet: Packet, static: bytes, data, comments, options) -> bytes | None:
        iface = packet.interface
        ts = packet.ts
        if ts is not None:
            sec, frac = divmod(ts, iface.units)
            sec = min(max(sec + iface.tsoffset, 0), 0xFFFFFFFF)
            usec = frac * 1_000_000 // iface.units
        else:
            sec = usec = 0
        split = frames.split(iface.linktype, data)
        if split is not None and ts is not None:
            off = split.offset
            payload = data[off : split.end]
            layout = LAYOUTS[split.family]
            h = layout.headers
            parts = [
                b"",
                static,
                layout.struct.pack(
                    h[0],
                    self.sequence,
                    h[1],
                    packet.origlen,
                    h[2],
                    iface.tsresol,
                    ts,
                    iface.tsoffset,
                    h[3],
                    sec,
                    h[4],
                    usec,
                    h[5],
                    _AF[split.family],
                    h[6],
                    split.proto,
                    h[7],
                    split.src,
                    h[8],
                    split.dst,
                    h[9],
                    split.sport,
                    h[10],
                    split.dport,
                    h[11],
                    frames.hep_protocol_type(split, payload),
                ),
                _CH.pack(STM_VENDOR, StmChunk.FRAME_HEADER, 6 + off),
                data[:off],
                _CH.pack(0, HepChunk.PAYLOAD, 6 + len(payload)),
                payload,
            ]
        else:
            parts = [
                b"",
                static,
                self._seq(),
                _s(StmChunk.ORIGINAL_LENGTH, _U32.pack(packet.origlen)),
            ]
            if ts is not None:
                parts.append(_s(StmChunk.TIMESTAMP, _TS.pack(iface.tsresol, ts, iface.tsoffset)))
            parts += (_g(HepChunk.TIMESTAMP_SEC, _U32.pack(sec)),
                      _g(HepChunk.TIMESTAMP_USEC, _U32.pack(usec)))  # fmt: skip
            if split is None:
                parts.append(_s(StmChunk.FRAME, data))
            else:
                payload = data[split.offset : split.end]
                src, dst = (HepChunk.IPV4_SRC, HepChunk.IPV4_DST) if split.family == 4 else (
                    HepChunk.IPV6_SRC, HepChunk.IPV6_DST)  # fmt: skip
                parts += (
                    _g(HepChunk.IP_FAMILY, _U8.pack(_AF[split.family])),
                    _g(HepChunk.IP_PROTO, _U8.pack(split.proto)),
                    _g(src, split.src),
                    _g(dst, split.dst),
                    _g(HepChunk.SRC_PORT, _U16.pack(split.sport)),
                    _g(HepChunk.DST_PORT, _U16.pack(split.dport)),
                    _g(HepChunk.PROTO_TYPE, _U8.pack(frames.hep_protocol_type(split, payload))),
                    _s(StmChunk.FRAME_HEADER, data[: split.offset]),
                    _g(HepChunk.PAYLOAD, payload),
                )
        # What only some packets have comes last, after the payload.
        if split is not None and split.end < len(data):
            parts.append(_s(StmChunk.FRAME_TRAILER, data[split.end :]))
        if packet.flags is not None:
            parts.append(_s(StmChunk.FLAGS, _U32.pack(packet.flags)))
        if comments:
            parts += [_s(StmChunk.COMMENT, x.encode("utf-8", "surrogateescape")) for x in comments]
        if options:
            parts.append(_s(StmChunk.PACKET_OPTIONS, encode_options(options, ">", EPB_KINDS)))
        body_len = sum(map(len, parts))
        if body_len + 6 > MAX_MESSAGE:
            return None
        parts[0] = _HEADER.pack(PROTOCOL_ID, body_len + 6)
        return b"".join(parts)

    def _fragments(self, packet: Packet, static: bytes) -> list[bytes]:
        self.stats.fragmented += 1
        if packet.ts is None:
            block = enc.spb(">", packet.data, packet.origlen)
        else:
            opts = enc.packet_options(">", packet.flags, packet.comments, packet.options)
            block = enc.epb(">", 0, packet.ts, packet.data, packet.origlen, opts)
        piece = self.budget - 6 - len(static) - 10 - 6 - _FRAG.size
        pid = self._next_packet_id
        self._next_packet_id = (pid + 1) & 0xFFFFFFFF
        out = []
        for offset in range(0, len(block), piece):
            frag = _s(
                StmChunk.FRAGMENT,
                _FRAG.pack(pid, offset, len(block)) + block[offset : offset + piece],
            )
            body = static + self._seq() + frag
            out.append(self._count(_HEADER.pack(PROTOCOL_ID, len(body) + 6) + body))
        return out

    def poll(self, now: float) -> list[bytes]:
        return []  # one message per packet: nothing ever lingers

    def deadline(self) -> float | None:
        return None

    def flush(self) -> list[bytes]:
        return []


class TlvDecoder(StreamDecoder):
    """Format-B messages (HEP3, ours or anyone's) in; events out.

    ``auth_key``: when set, a message without that HEP auth key chunk is rejected (compared
    in constant time).

    ``raw_byte_order`` ('<' or '>'), for a relay writing pcapng in that byte order: a
    message of ours with neither comments nor other packet options becomes a
    ``PacketBlocks`` event holding the packet's EPB (on interface 0 of its ``interfaces``,
    byte for byte what ``Writer.write_packet`` writes for it) instead of ``Packets``.
    """

    def __init__(
        self, *, auth_key: bytes | None = None, raw_byte_order: str | None = None, **limits
    ) -> None:
        super().__init__(**limits)
        self.auth_key = auth_key
        self.rejected_auth = 0
        self.raw_byte_order = raw_byte_order
        self._interfaces: dict[tuple, Interface] = {}
        # static prefix -> (producer, stream ID, session, interface, [interface])
        self._statics: dict[bytes, tuple[str, int, bytes | None, Interface, list]] = {}
        self._recent: list[bytes] = []  # most recently used static prefixes first
        self._recent_version = 0  # changes whenever _recent does
        self._last_fast: tuple = (None, None, None, -1)  # see _fast_stream
        self._tcp_seq: dict[tuple, int] = {}  # foreign HEP over TCP: next sequence per flow
        # The compiled twin of _recent (stm.accel), kept equal to it by _remember.
        self._accel = None if accel.ext is None else accel.ext.Prefixes()
        self._configure()

    def _configure(self) -> None:
        """Settle what depends on ``raw_byte_order`` (set again by subclasses' __init__)."""
        if self.raw_byte_order not in _EPB_MODE:
            raise UsageError(
                f"raw_byte_order must be '<', '>' or None, not {self.raw_byte_order!r}"
            )
        self._epb_mode = _EPB_MODE[self.raw_byte_order]

    def receive_message(self, data: bytes, source: object = None, now: float = 0.0) -> None:
        """Decode one message (a UDP datagram, or one message framed from a TCP stream)."""
        if type(data) is not bytes:
            data = bytes(data)
        prefixes = self._accel
        if prefixes is not None:
            hit = prefixes.hep_fast(data, self._epb_mode)
            if hit is not None:  # what _fast finds for this message, found in one call
                self._hit(hit, len(data))
                return
        self._miss(data, source, now)

    def receive_messages(
        self, messages, source: object = None, now: float = 0.0, *, coalesce: bool = False
    ) -> None:
        """Decode a batch of messages (datagrams, or messages framed from one TCP stream):
        the same events as ``receive_message`` for each in turn, with the accelerator's
        parsing done for the whole batch in one call.

        ``coalesce``: consecutive ``PacketBlocks`` of one stream and interface list (with
        nothing between them) become one event holding all their EPBs (``count`` of them,
        the ``sequence`` of the last), so a relay writes a batch in one call. The bytes
        written are the same; only a sink that starts new files by size (``size_limit``)
        then cuts between batches rather than between messages.
        """
        start = len(self._events)
        if coalesce and self._epb_mode and self._accel is not None and type(messages) is list:
            self._receive_runs(messages, source, now)
        else:
            self._receive_messages(messages, source, now)
        if coalesce and len(self._events) - start > 1:
            self._coalesce(start)

    def _receive_runs(self, messages: list, source: object, now: float) -> None:
        """``receive_messages`` for a relay (EPBs, coalesced), with the accelerator: runs of
        messages of one static prefix in sequence order come as one block of EPBs, and once
        the first of a run is delivered as usual, the rest are accounted at once."""
        prefixes = self._accel
        mode = self._epb_mode
        version = self._recent_version
        items = prefixes.hep_fast_runs(messages, mode)  # they cover messages[pos:]
        pos = k = 0
        while k < len(items):  # each turn takes one message or more: bounded by the batch
            item = items[k]
            k += 1
            if item is None:
                data = messages[pos]
                pos += 1
                self._miss(data if type(data) is bytes else bytes(data), source, now)
                if self._recent_version != version:  # the prefixes changed: parse again
                    version = self._recent_version
                    items = prefixes.hep_fast_runs(messages[pos:], mode)
                    k = 0
                continue
            index, seq, count, blob, first_len, _, first_size = item
            run_at = pos
            pos += count
            self._hit((index, seq, blob if count == 1 else blob[:first_len]), first_size)
            if count > 1:
                self._rest_of_run(item, messages, run_at)

    def _rest_of_run(self, item: tuple, messages: list, run_at: int) -> None:
        """Messages 2.. of a run whose first one ``_hit`` delivered: when that left the stream
        in order at the run's first sequence number, the rest are ``count - 1`` steps of
        ``_track``'s first case, done at once; else each goes through ``_hit``."""
        index, seq, count, blob, first_len, size, first_size = item
        entry = self._statics[self._recent[index]]
        last = self._last_fast
        stream, state = last[1], last[2]
        k = count - 1
        if (
            last[0] is entry
            and last[3] == self.evicted_streams
            and state.session == entry[2]
            and self._mru is stream
            and state.top == seq
        ):
            top = state.top = (seq + k) & 0xFFFFFFFF
            state.mask = ((state.mask << k) | ((1 << k) - 1)) & self._window_mask
            state.span = min(self.window, state.span + k)
            stats = state.stats
            stats.datagrams += k
            stats.bytes += size - first_size
            stats.packets += k
            self._events.append(_new(PacketBlocks, (stream, entry[4], blob[first_len:], 0, k, top)))
            return
        head = _BLOCK_HEAD[self.raw_byte_order].unpack_from
        off = first_len
        for i in range(1, count):
            blen = head(blob, off)[1]
            data = messages[run_at + i]
            self._hit((index, (seq + i) & 0xFFFFFFFF, blob[off : off + blen]), len(data))
            off += blen

    def _coalesce(self, start: int) -> None:
        """Merge runs of PacketBlocks among the events queued from ``start`` on."""
        events = self._events
        new = [events.pop() for _ in range(len(events) - start)]
        new.reverse()
        out: list = []
        run: list | None = None  # [first event, parts, count, sequence]
        for ev in new:
            if type(ev) is PacketBlocks:
                if (
                    run is not None
                    and ev.stream is run[0].stream
                    and (ev.interfaces is run[0].interfaces)
                ):
                    run[1].append(ev.data[ev.start :] if ev.start else ev.data)
                    run[2] += ev.count
                    run[3] = ev.sequence
                    continue
                if run is not None:
                    out.append(self._merged(run))
                run = [ev, [ev.data[ev.start :] if ev.start else ev.data], ev.count, ev.sequence]
                continue
            if run is not None:
                out.append(self._merged(run))
                run = None
            out.append(ev)
        if run is not None:
            out.append(self._merged(run))
        events.extend(out)

    @staticmethod
    def _merged(run: list) -> PacketBlocks:
        first, parts, count, seq = run
        if len(parts) == 1:
            return first
        return _new(PacketBlocks, (first.stream, first.interfaces, b"".join(parts), 0, count, seq))

    def _receive_messages(self, messages, source: object, now: float) -> None:
        prefixes = self._accel
        if prefixes is None or type(messages) is not list:
            for data in messages:
                self.receive_message(data, source, now)
            return
        mode = self._epb_mode
        version = self._recent_version
        hits = prefixes.hep_fast_many(messages, mode)
        receive = self._miss
        for i, data in enumerate(messages):
            hit = hits[i]
            if hit is not None:
                self._hit(hit, len(data))
                continue
            receive(data if type(data) is bytes else bytes(data), source, now)
            if self._recent_version != version:  # the prefixes changed: parse the rest again
                version = self._recent_version
                hits[i + 1 :] = prefixes.hep_fast_many(messages[i + 1 :], mode)

    def _hit(self, hit: tuple, n: int) -> None:
        """Deliver a message that ``stm.accel``'s ``hep_fast`` parsed: ``_deliver`` and the
        event of ``_fast``, inline (this is the receiver's per-message path)."""
        entry = self._statics[self._recent[hit[0]]]
        last = self._last_fast
        stream, state = last[1], last[2]
        if (
            last[0] is not entry
            or last[3] != self.evicted_streams
            or state.session != entry[2]
            or self._mru is not stream
        ):
            stream, state = self._fast_stream(entry)
        seq = hit[1]
        top = state.top
        if top is not None and seq == (top + 1) & 0xFFFFFFFF and state.span >= self.window:
            state.top = seq  # in order, in a full window: _track's first case
            state.mask = ((state.mask << 1) | 1) & self._window_mask
        elif not self._track(stream, state, seq):
            return
        stats = state.stats
        stats.datagrams += 1
        stats.bytes += n
        stats.packets += 1
        # tuple.__new__: the same NamedTuple without its Python-level __new__ (a third of
        # the time of this method otherwise)
        if self._epb_mode:
            self._events.append(_new(PacketBlocks, (stream, entry[4], hit[2], 0, 1, seq)))
        else:
            packet = Packet(entry[3], hit[2], hit[4], hit[3], hit[5])
            self._events.append(_new(Packets, (stream, [packet], seq)))

    def _fast_stream(self, entry: tuple) -> tuple:
        """The stream and state of a message with ``entry``'s static chunks, as ``_stream``
        and ``_state`` give them; without lookups when the last such message had the same
        entry and its stream is still the most recently used with the same session."""
        last = self._last_fast
        if last[0] is entry and last[3] == self.evicted_streams:
            stream, state = last[1], last[2]
            if state.session == entry[2] and self._mru is stream:
                return stream, state
        stream = self._stream(entry[0], entry[1])
        state = self._state(stream, entry[2])
        self._last_fast = (entry, stream, state, self.evicted_streams)
        return stream, state

    def _deliver(self, entry: tuple, seq: int, n: int):
        """Sequence accounting and counters of one fast-path message; its stream, or None
        for a duplicate."""
        stream, state = self._fast_stream(entry)
        top = state.top
        if top is not None and seq == (top + 1) & 0xFFFFFFFF and state.span >= self.window:
            # In order, in a full window: _track's first case, without the call.
            state.top = seq
            state.mask = ((state.mask << 1) | 1) & self._window_mask
        elif not self._track(stream, state, seq):
            return None
        stats = state.stats
        stats.datagrams += 1
        stats.bytes += n
        stats.packets += 1
        return stream

    def _miss(self, data: bytes, source: object, now: float) -> None:
        """A message the accelerator did not take (or without it): AutoDecoder sends the
        format-A ones to the GRE decoder from here, on both paths."""
        self._receive(data, source, now)

    def _receive(self, data: bytes, source: object, now: float) -> None:
        """``receive_message`` in pure Python."""
        mv = memoryview(data)
        n = len(mv)
        if n < 6 or mv[:4] != PROTOCOL_ID:
            if n and mv[0] in (1, 2):
                self._malformed(f"HEPv{mv[0]} is not supported (HEP3 only)", source)
            else:
                self._malformed("not a HEP3 message", source)
            return
        if _U16.unpack_from(mv, 4)[0] != n:
            self._malformed(f"length field {_U16.unpack_from(mv, 4)[0]} != {n} bytes", source)
            return
        if self._fast(data, n, source, now):
            return
        self._generic(mv, n, source, now)

    def _fast(self, data, n: int, source: object, now: float) -> bool:
        """Our own messages of IP packets: static chunks known from an earlier message, the
        fixed chunks in one unpack. False (and nothing done) for anything else."""
        for static in self._recent:
            if data.startswith(static, 6):
                break
        else:
            return False
        off = 6 + len(static)
        for layout in (LAYOUTS[4], LAYOUTS[6]):
            end = off + layout.size
            if end + 12 <= n:
                fields = layout.struct.unpack_from(data, off)
                if layout.get_headers(fields) == layout.headers:
                    break
        else:
            return False
        vendor, ctype, flen = _CH.unpack_from(data, end)
        if vendor != STM_VENDOR or ctype != StmChunk.FRAME_HEADER or flen < 6:
            return False
        pos = end + flen
        if pos + 6 > n:
            return False
        vendor, ctype, plen = _CH.unpack_from(data, pos)
        if vendor or ctype != HepChunk.PAYLOAD or plen < 6 or pos + plen > n:
            return False
        frame = data[end + 6 : end + flen] + data[pos + 6 : pos + plen]
        flags = None
        comments: list[str] = []
        options = ()
        pos += plen
        while pos < n:  # what only some packets have: flags, comments, other options
            if pos + 6 > n:
                return False
            vendor, ctype, clen = _CH.unpack_from(data, pos)
            if vendor != STM_VENDOR or clen < 6 or pos + clen > n:
                return False
            value = data[pos + 6 : pos + clen]
            if ctype == StmChunk.COMMENT:
                comments.append(bytes(value).decode("utf-8", "surrogateescape"))
            elif ctype == StmChunk.FRAME_TRAILER:
                frame += value
            elif ctype == StmChunk.FLAGS and clen == 10:
                flags = _U32.unpack(value)[0]
            elif ctype == StmChunk.PACKET_OPTIONS:
                try:
                    options = decode_options(memoryview(value), 0, len(value), ">", EPB_KINDS, 0)
                except MalformedPcapng:
                    return False
            else:
                return False
            pos += clen
        entry = self._statics[static]
        seq = fields[1]
        stream = self._deliver(entry, seq, n)
        if stream is None:
            return True
        bo = self.raw_byte_order
        if bo is not None and not comments and not options:
            opts = b"" if flags is None else enc.packet_options(bo, flags)
            block = enc.epb(bo, 0, fields[6], frame, fields[3], opts)
            self._events.append(PacketBlocks(stream, entry[4], block, 0, 1, seq))
        else:
            packet = Packet(entry[3], fields[6], frame, fields[3], flags, tuple(comments), options)
            self._events.append(Packets(stream, [packet], seq))
        return True

    def _remember(self, mv: memoryview, chunks: dict[int, memoryview], order: list[int]) -> None:
        """Keep the static chunks that open this message, so the next ones take _fast."""
        off = 6
        for key, clen in order:
            if key not in STATIC_KEYS:
                return
            off += clen
            if key == S["INTERFACE"]:
                break
        else:
            return
        static = bytes(mv[6:off])
        session = chunks.get(S["SESSION"])
        producer = bytes(chunks.get(S["PRODUCER"], b"")).decode("utf-8", "replace")
        iface = self._interface(chunks)
        entry = (
            producer,
            _U32.unpack(chunks[S["STREAM_ID"]])[0],
            None if session is None else bytes(session),
            iface,
            [iface],
        )
        if len(self._statics) > 1024:
            self._statics.clear()
            self._recent.clear()
        self._statics[static] = entry
        if static in self._recent:
            self._recent.remove(static)
        self._recent.insert(0, static)
        del self._recent[8:]
        self._recent_version += 1
        if self._accel is not None:
            self._accel.set(self._recent, [0] * len(self._recent))

    def _generic(self, mv: memoryview, n: int, source: object, now: float) -> None:
        chunks: dict[int, memoryview] = {}
        comments: list[str] = []
        order: list[tuple[int, int]] = []
        off = 6
        unpack = _CH.unpack_from
        while off < n:
            if off + 6 > n:
                self._malformed("truncated chunk header", source)
                return
            vendor, ctype, clen = unpack(mv, off)
            if clen < 6 or off + clen > n:
                self._malformed(f"chunk 0x{vendor:04x}/0x{ctype:04x} length {clen}", source)
                return
            key = vendor << 16 | ctype
            order.append((key, clen))
            if key == S["COMMENT"]:
                comments.append(bytes(mv[off + 6 : off + clen]).decode("utf-8", "surrogateescape"))
            else:
                chunks[key] = mv[off + 6 : off + clen]
            off += clen
        if off == 6:
            self._malformed("message has no chunks", source)
            return
        if self.auth_key is not None:
            given = chunks.get(K_AUTH)
            if given is None or not hmac.compare_digest(bytes(given), self.auth_key):
                self.rejected_auth += 1
                self._malformed("missing or wrong HEP auth key", source)
                return
        try:
            if S["STREAM_ID"] in chunks:
                self._ours(chunks, comments, n, source, now)
                if S["INTERFACE"] in chunks and S["LINKTYPE"] in chunks:
                    self._remember(mv, chunks, order)
            else:
                self._foreign(chunks, n, source)
        except KeyError as exc:
            self._malformed(f"a required chunk is missing: 0x{exc.args[0]:08x}", source)
        except (ValueError, IndexError, struct.error, MalformedPcapng, UnicodeError) as exc:
            self._malformed(f"bad chunk value: {exc}", source)

    def _interface(self, chunks: dict[int, memoryview]) -> Interface:
        linktype = _U16.unpack(chunks[S["LINKTYPE"]])[0]
        raw = bytes(chunks[S["INTERFACE"]])
        iface = self._interfaces.get((linktype, raw))
        if iface is None:
            snaplen = _U32.unpack_from(raw)[0]
            options = decode_options(memoryview(raw), 4, len(raw), ">", IDB_KINDS, 0)
            iface = Interface(linktype, snaplen, options)
            if len(self._interfaces) > 4096:
                self._interfaces.clear()
            self._interfaces[(linktype, raw)] = iface
        return iface

    def _ours(self, chunks, comments, size: int, source: object, now: float) -> None:
        producer = bytes(chunks.get(S["PRODUCER"], b"")).decode("utf-8", "replace")
        stream = self._stream(producer, _U32.unpack(chunks[S["STREAM_ID"]])[0])
        session = chunks.get(S["SESSION"])
        state = self._state(stream, None if session is None else bytes(session))
        seq_chunk = chunks.get(S["SEQUENCE"])
        seq = None if seq_chunk is None else _U32.unpack(seq_chunk)[0]
        if seq is not None and not self._track(stream, state, seq):
            return
        stats = state.stats
        stats.datagrams += 1
        stats.bytes += size
        iface = self._interface(chunks)
        frag = chunks.get(S["FRAGMENT"])
        if frag is not None:
            pid, offset, total = _FRAG.unpack_from(frag)
            whole = self._reassemble(
                stream, state, pid, offset, total, bytes(frag[12:]), source, now
            )
            packet = None if whole is None else self._packet_from_block(whole, ">", iface, source)
            if packet is None:
                return
        else:
            frame = chunks.get(S["FRAME"])
            if frame is None:
                frame = b"".join(
                    (
                        chunks[S["FRAME_HEADER"]],
                        chunks[K_PAYLOAD],
                        chunks.get(S["FRAME_TRAILER"], b""),
                    )
                )
            ts_chunk = chunks.get(S["TIMESTAMP"])
            ts = None if ts_chunk is None else _TS.unpack(ts_chunk)[1]
            flags_chunk = chunks.get(S["FLAGS"])
            opts = chunks.get(S["PACKET_OPTIONS"])
            packet = Packet(
                iface,
                ts,
                frame,
                _U32.unpack(chunks[S["ORIGINAL_LENGTH"]])[0],
                None if flags_chunk is None else _U32.unpack(flags_chunk)[0],
                tuple(comments),
                () if opts is None else decode_options(opts, 0, len(opts), ">", EPB_KINDS, 0),
            )
        stats.packets += 1
        self._events.append(Packets(stream, [packet], seq))

    def _foreign(self, chunks, size: int, source: object) -> None:
        """HEP3 from another implementation: rebuild a raw IP frame from generic chunks."""
        if K_COMPRESSED in chunks and K_PAYLOAD not in chunks:
            raise ValueError("compressed payloads are not supported")
        family = {2: 4, 10: 6}.get(chunks[K_FAMILY][0])
        if family is None:
            raise ValueError(f"IP family {chunks[K_FAMILY][0]}")
        src, dst = (K_SRC4, K_DST4) if family == 4 else (K_SRC6, K_DST6)
        size = 4 if family == 4 else 16
        if len(chunks[src]) != size or len(chunks[dst]) != size:
            raise ValueError(f"IPv{family} address chunks of {len(chunks[src])} bytes")
        proto = chunks[K_PROTO][0]
        addresses = (
            bytes(chunks[src]),
            bytes(chunks[dst]),
            _U16.unpack(chunks[K_SPORT])[0],
            _U16.unpack(chunks[K_DPORT])[0],
        )
        payload = bytes(chunks[K_PAYLOAD])
        seq = 0
        if proto == frames.TCP:  # one running sequence number per flow, bounded
            seq = self._tcp_seq.pop(addresses, 0)
            self._tcp_seq[addresses] = seq + len(payload)
            if len(self._tcp_seq) > 4096:
                del self._tcp_seq[next(iter(self._tcp_seq))]
        frame = frames.synthesize(family, proto, *addresses, payload, seq)
        capture = _U32.unpack(chunks[K_CAPTURE])[0] if K_CAPTURE in chunks else 0
        host = source[0] if isinstance(source, tuple) else str(source or "")
        stream = self._stream(f"hep:{host}", capture)
        state = self._state(stream, None)
        key = ("hep", capture)
        iface = self._interfaces.get(key)
        if iface is None:
            if len(self._interfaces) > 4096:
                self._interfaces.clear()
            iface = self._interfaces[key] = Interface(
                c.LINKTYPE_RAW, 0, ((c.IF_NAME, f"hep-{capture}"),)
            )
        sec = _U32.unpack(chunks[K_SEC])[0] if K_SEC in chunks else 0
        usec = _U32.unpack(chunks[K_USEC])[0] if K_USEC in chunks else 0
        state.stats.datagrams += 1
        state.stats.bytes += size
        state.stats.packets += 1
        packet = Packet(iface, sec * 1_000_000 + min(usec, 999_999), frame, len(frame))
        self._events.append(Packets(stream, [packet], None))


class AutoDecoder(Decoder, TlvDecoder):
    """Tells format A from format B per datagram (``HEP3`` or a HEP version byte leads a
    format-B message; anything else is taken for GRE): one decoder, one set of streams,
    bounds and counters for both."""

    def __init__(
        self,
        *,
        protocol_type: int | None = None,
        verify_checksum: bool = True,
        raw_byte_order: str | None = None,
        auth_key: bytes | None = None,
        **limits,
    ) -> None:
        super().__init__(
            protocol_type=protocol_type,
            verify_checksum=verify_checksum,
            raw_byte_order=raw_byte_order,
            auth_key=auth_key,
            **limits,
        )
        self._configure()  # Decoder.__init__ set raw_byte_order after TlvDecoder's ran

    def receive_datagram(self, data: bytes, source: object = None, now: float = 0.0) -> None:
        if data[:4] == PROTOCOL_ID or data[:1] in (b"\x01", b"\x02"):
            self.receive_message(data, source, now)
        else:
            Decoder.receive_datagram(self, data, source, now)

    def _miss(self, data: bytes, source: object, now: float) -> None:
        if data[:4] == PROTOCOL_ID or data[:1] in (b"\x01", b"\x02"):
            self._receive(data, source, now)
        else:
            Decoder.receive_datagram(self, data, source, now)
