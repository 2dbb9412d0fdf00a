"""stm-send's loop: capture events in, paced, through an encoder, reports out.

Kept out of the click command so that it can be driven and tested as a library. The clock
is passed in; the only waiting is in :meth:`Stop.wait`, in short slices, so a signal
handler that sets the flag is obeyed within ``Stop.SLICE`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from stm import pcapng
from stm.errors import MalformedPcapng


class Destination(Protocol):
    url: str

    def send(self, reports: list[bytes]) -> None: ...


class Stop:
    """A stop flag safe to set from a signal handler (a threading.Event is not: its lock
    may be held by the very code the handler interrupted)."""

    SLICE = 0.05

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds; True as soon as the flag is set."""
        end = time.monotonic() + timeout
        while not self._set:
            left = end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, self.SLICE))
        return self._set


class Pacer:
    """When each packet is due: at ``rate`` packets per second, or keeping the capture's
    own gaps divided by ``speed`` (``speed=1`` is real time). Neither: no pacing."""

    def __init__(
        self,
        *,
        rate: float | None = None,
        speed: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.speed = speed
        self.clock = clock
        self.active = rate is not None or speed is not None
        self._start: float | None = None
        self._count = 0
        self._anchor: tuple[float, int] | None = None  # (clock, capture time in ns)

    def due(self, packet: pcapng.Packet) -> float | None:
        """The clock time at which ``packet`` should go, or None for now."""
        if self.rate is not None:
            if self._start is None:
                self._start = self.clock()
            self._count += 1
            return self._start + (self._count - 1) / self.rate
        if self.speed is None or packet.ts is None:
            return None
        ns = packet.time_ns
        if self._anchor is None:
            self._anchor = (self.clock(), ns)
            return None
        return self._anchor[0] + (ns - self._anchor[1]) / 1e9 / self.speed

    def restart(self) -> None:
        """A new pass over the input (``--loop``): its first packet goes at once."""
        self._anchor = None


class SendPipeline:
    """Feeds capture events to an encoder and its reports to every destination.

    ``make_encoder(byte_order)`` is called once before any input and, when
    ``follow_byte_order`` is true, again in the byte order of the first section, so a
    format-A encoder can copy packet blocks as they are (``RawPackets`` events).
    """

    def __init__(
        self,
        make_encoder: Callable[[str | None], object],
        destinations: Sequence[Destination],
        *,
        pacer: Pacer | None = None,
        stop: Stop | None = None,
        follow_byte_order: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.make_encoder = make_encoder
        self.encoder = make_encoder(None)
        self.destinations = list(destinations)
        self.pacer = pacer or Pacer()
        self.stop = stop or Stop()
        self.clock = clock
        self._first_section = follow_byte_order

    def emit(self, reports: list[bytes]) -> None:
        if reports:
            for d in self.destinations:
                d.send(reports)

    def run(self, events: Iterable[pcapng.Event | None]) -> None:
        """Send every packet of ``events`` (None: the source is idle; lingering reports
        are sent when due). Returns at the end of input or once stopped."""
        clock, emit, stop, pacer = self.clock, self.emit, self.stop, self.pacer
        encoder = self.encoder
        interfaces: list[pcapng.Interface] = []
        for event in events:
            kind = type(event)
            if kind is pcapng.RawPackets:
                try:
                    emit(encoder.add_raw(event, interfaces, clock()))
                except MalformedPcapng as exc:
                    emit(getattr(exc, "datagrams", []))
                    raise
            elif kind is pcapng.Packet:
                now = clock()
                if pacer.active:
                    due = pacer.due(event)
                    if due is not None and due > now:
                        now = self._wait(due, now)
                        if stop.is_set():
                            return
                emit(encoder.add(event, now) or encoder.poll(now))
            elif event is None:
                emit(encoder.poll(clock()))
            elif kind is pcapng.Interface:
                interfaces.append(event)
            elif kind is pcapng.Section:
                interfaces = []
                if self._first_section:
                    self._first_section = False
                    if event.byte_order != encoder.bo:
                        encoder = self.encoder = self.make_encoder(event.byte_order)
            if stop.is_set():
                return

    def deadline(self) -> float | None:
        """When a lingering report is due (for a source that waits for input)."""
        return self.encoder.deadline()

    def _wait(self, target: float, now: float) -> float:
        """Wait until ``target``, sending a lingering report when its time comes."""
        encoder = self.encoder
        while now < target and not self.stop.is_set():
            deadline = encoder.deadline()
            if deadline is not None and deadline <= target:
                self.stop.wait(max(0.0, deadline - now))
                now = self.clock()
                self.emit(encoder.poll(now))
            else:
                self.stop.wait(target - now)
                now = self.clock()
        return now

    def finish(self) -> None:
        """Send what the encoder still holds."""
        self.emit(self.encoder.flush())
