"""A bound on log lines: a flood of bad input from the network must not become a flood of
log output."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("stm")


class LogBudget:
    """At most ``burst`` warnings per ``window`` seconds; says how many it held back."""

    def __init__(self, burst: int = 10, window: float = 10.0) -> None:
        self.burst = burst
        self.window = window
        self._start = -1e9
        self._count = 0
        self._held = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._start >= self.window:
            if self._held:
                log.warning("%d more warning(s) like these not shown", self._held)
            self._start, self._count, self._held = now, 0, 0
        if self._count < self.burst:
            self._count += 1
            log.warning(message, *args)
        else:
            self._held += 1
