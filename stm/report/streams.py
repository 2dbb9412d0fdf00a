"""What every report decoder does per stream, whatever the format: sequence accounting
(gaps, duplicates, reordering, restarts), reassembly of fragmented packets, the event queue,
and the bounds that keep a flood of forged streams or fragments from growing memory."""

from __future__ import annotations

from collections import OrderedDict, deque

from stm import gre
from stm.errors import MalformedPcapng
from stm.pcapng import constants as c
from stm.pcapng.block import packet_from_block
from stm.pcapng.records import Interface, Packet
from stm.report.events import (
    Duplicate,
    Event,
    FragmentsExpired,
    Gap,
    Malformed,
    Reordered,
    Restarted,
    Stream,
    StreamStats,
)


class _StreamState:
    """Sequence state: the highest number seen and a bitmap of the ``window`` numbers below it
    (bit k set = ``top - k`` arrived), as IPsec's anti-replay window does."""

    __slots__ = ("mask", "session", "span", "stats", "top")

    def __init__(self, session: object) -> None:
        self.session = session
        self.top: int | None = None
        self.mask = 0
        self.span = 0  # numbers from the first one seen up to top, at most the window
        self.stats = StreamStats()


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


class StreamDecoder:
    """The per-stream half of a report decoder; formats subclass it. Limits are per decoder."""

    def __init__(
        self,
        *,
        max_streams: int = 1024,
        window: int = 1024,
        max_pending_packets: int = 256,
        max_pending_bytes: int = 64 << 20,
        fragment_timeout: float = 5.0,
        max_packet: int = c.DEFAULT_MAX_BLOCK,
    ) -> None:
        self.max_streams = max_streams
        self.window = window
        self._window_mask = (1 << window) - 1
        self.max_pending_packets = max_pending_packets
        self.max_pending_bytes = max_pending_bytes
        self.fragment_timeout = fragment_timeout
        self.max_packet = max_packet
        self.malformed = 0
        self.evicted_streams = 0
        self.streams: OrderedDict[Stream, _StreamState] = OrderedDict()
        self._mru: Stream | None = None  # the last key of ``streams``: _state puts it there
        self._stream_names: dict[tuple[str, int | None], Stream] = {}
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

    def _stream(self, producer: str, key: int | None) -> Stream:
        """The (cached) Stream object: building a frozen dataclass per datagram costs."""
        stream = self._stream_names.get((producer, key))
        if stream is None:
            if len(self._stream_names) > 4 * self.max_streams:
                self._stream_names.clear()
            stream = self._stream_names[(producer, key)] = Stream(producer, key or 0)
        return stream

    def _state(self, stream: Stream, session: object) -> _StreamState:
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
        self._mru = stream
        return state

    def _track(self, stream: Stream, state: _StreamState, seq: int) -> bool:
        """Sequence accounting; False when the report must be dropped as a duplicate."""
        top = state.top
        if top is not None and seq == (top + 1) & 0xFFFFFFFF:  # in order: the usual case
            state.top = seq
            state.mask = ((state.mask << 1) | 1) & self._window_mask
            if state.span < self.window:
                state.span += 1
            return True
        window = self.window
        stats = state.stats
        if top is not None:
            d = gre.seq_diff(seq, top)
            if d > 0:
                if d > 1:
                    stats.lost += d - 1
                    self._events.append(Gap(stream, d - 1, seq))
                state.top = seq
                state.mask = ((state.mask << d) | 1) & self._window_mask if d < window else 1
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

    def _reassemble(
        self,
        stream: Stream,
        state: _StreamState,
        pid: int,
        offset: int,
        total: int,
        piece: bytes,
        source: object,
        now: float,
    ) -> bytes | None:
        """Store one piece of a fragmented packet block; the whole block once complete."""
        if total > self.max_packet or offset >= total:
            self._malformed(f"bad fragment (offset {offset}, total {total})", source)
            return None
        piece = piece[: total - offset]  # drop padding past the end
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
        return bytes(entry.buf)

    def _packet_from_block(
        self, block: bytes, bo: str, iface: Interface, source: object
    ) -> Packet | None:
        """Read a reassembled packet block against the interface its pieces came with."""
        try:
            return packet_from_block(block, bo, [iface], self.max_packet + 64)
        except MalformedPcapng as exc:
            self._malformed(f"reassembled packet is malformed: {exc}", source)
            return None

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
