"""A seeded schedule of loss, delay and duplication between an encoder and a decoder, and
the counters a correct decoder must report for it: shared by the format A and B tests."""

from __future__ import annotations

import random


def schedule(n: int, rng: random.Random):
    """Arrival order of report indexes; the first and last are never lost nor delayed."""
    dropped = set()
    slots = []
    for i in range(n):
        edge = i in (0, n - 1)
        if not edge and rng.random() < 0.08:
            dropped.add(i)
            continue
        delay = rng.randrange(1, 15) if not edge and rng.random() < 0.12 else 0
        slots.append((i + delay + 0.5, i))
        if not edge and rng.random() < 0.08:
            slots.append((i + rng.randrange(0, 30) + 0.75, i))  # a duplicate, later or not
    return [i for _, i in sorted(slots)], dropped


def expected_counters(order):
    top, seen = None, set()
    dup = reord = gaps = 0
    for i in order:
        if i in seen:
            dup += 1
            continue
        if top is not None and i < top:
            reord += 1
        elif top is not None and i > top + 1:
            gaps += i - top - 1
        seen.add(i)
        top = i if top is None else max(top, i)
    return dup, reord, gaps
