"""A one-line progress display for stm-send on a terminal: packets, rate, percent of bytes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """Redraws one line on ``stream`` at most every ``interval`` seconds; :meth:`close`
    clears it, so the final summary (or the shell prompt) starts on a clean line."""

    def __init__(
        self,
        packets: Callable[[], int],
        done: Callable[[], int],
        total: int | None,
        *,
        stream: TextIO = sys.stderr,
        interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.packets = packets
        self.done = done
        self.total = total
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self._last = self.started
        self._width = 0

    def update(self) -> None:
        now = self.clock()
        if now - self._last < self.interval:
            return
        self._last = now
        self._draw(self.line(now))

    def line(self, now: float) -> str:
        n = self.packets()
        elapsed = now - self.started
        rate = n / elapsed if elapsed > 0 else 0.0
        text = f"{n:,} packets  {rate:,.0f} pkt/s"
        if self.total:
            done = self.done()
            pct = min(100.0, 100.0 * done / self.total)
            filled = int(pct / 5)
            text = f"[{'#' * filled}{'.' * (20 - filled)}] {pct:5.1f}%  {text}"
        return text

    def _draw(self, text: str) -> None:
        pad = max(0, self._width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._width = len(text)

    def close(self) -> None:
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
