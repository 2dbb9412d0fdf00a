"""Shared pieces of the benchmarks: result rows, timing, machine facts, table output."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass
class Row:
    """One measured line of a benchmark.

    ``section`` groups rows in the table ("read", "write", "memory", "target"...);
    ``value`` is in ``unit`` (packets/s from wall time, MB, x); ``seconds`` is wall time
    and ``cpu_seconds`` CPU time; ``vs`` maps a reference name to the ratio ours /
    reference (wall) and ``vs_cpu`` the same from CPU time; ``status`` is "PASS" or
    "MISS" for a target row.
    """

    bench: str
    section: str
    name: str
    value: float
    unit: str
    packets: int | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None
    mbytes_s: float | None = None
    vs: dict[str, float] = field(default_factory=dict)
    vs_cpu: dict[str, float] = field(default_factory=dict)
    status: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def log(message: str) -> None:
    """Progress to stderr, so stdout keeps only the table (or the JSON)."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class Timing:
    """Best wall time (``perf_counter``) and best CPU time (user + system) over the runs."""

    wall: float
    cpu: float
    result: Any = None


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def best_of(repeat: int, fn: Callable[[], object], *, children: bool = False) -> Timing:
    """Run ``fn`` ``repeat`` times and keep the best wall and CPU times and the last result.

    CPU time is this process's (``process_time``), or its waited-for children's when
    ``children`` is set. It is reported next to wall time because CPU time is far less
    disturbed by other work on a shared machine.
    """
    clock = _children_cpu if children else time.process_time
    best = Timing(float("inf"), float("inf"))
    for _ in range(max(1, repeat)):
        c0 = clock()
        t0 = time.perf_counter()
        best.result = fn()
        best.wall = min(best.wall, time.perf_counter() - t0)
        best.cpu = min(best.cpu, clock() - c0)
    return best


def run_timed(cmd: Sequence[str], repeat: int) -> Timing:
    """Best times of a subprocess (startup included), which must exit 0."""

    def once() -> None:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    return best_of(repeat, once, children=True)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return ""
    if value != value:  # NaN: not measured
        return "-"
    if unit == "x":
        return f"{value:.2f}"
    if unit == "MB":
        return f"{value:.1f}"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def table(rows: Sequence[Row]) -> str:
    """A plain text table, one block per (benchmark, section)."""
    refs: list[str] = []
    for r in rows:
        for k in r.vs:
            if k not in refs:
                refs.append(k)
    head = ["section", "name", "value", "unit", "packets", "wall s", "cpu s", "MB/s"]
    head += [f"vs {k}" for k in refs] + ["status", "note"]
    lines = []
    for r in rows:
        lines.append(
            [
                f"{r.bench}.{r.section}",
                r.name,
                _fmt(r.value, r.unit),
                r.unit,
                f"{r.packets:,}" if r.packets is not None else "",
                f"{r.seconds:.3f}" if r.seconds is not None else "",
                f"{r.cpu_seconds:.3f}" if r.cpu_seconds is not None else "",
                f"{r.mbytes_s:.0f}" if r.mbytes_s is not None else "",
                *(f"{r.vs[k]:.2f}x" if k in r.vs else "" for k in refs),
                r.status,
                r.note,
            ]
        )
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    numeric = {2, 4, 5, 6, 7, *range(8, 8 + len(refs))}

    def fmt_line(cells: Sequence[str]) -> str:
        out = [
            c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    out = [fmt_line(head), sep]
    prev = None
    for r, cells in zip(rows, lines, strict=True):
        key = (r.bench, r.section)
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(fmt_line(cells))
    return "\n".join(out)
