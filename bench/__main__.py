"""``python -m bench NAME [options]``: run one benchmark, or ``all`` of them.

To add a benchmark, write ``bench/<name>.py`` with ``run(args) -> list[Row]`` (and,
if it has options of its own, ``add_arguments(parser)``), then list it in
``BENCHMARKS``. ``all`` runs every registered benchmark in order, with the union of
their options (a name two modules share must mean the same thing in both).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from bench.common import Row, log, machine, table

# name -> (module, one-line description); each module is imported to build the parser.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "pcapng": ("bench.pcapng", "pcapng read/write vs editcap and python-pcapng, read memory"),
    "report": ("bench.report", "format A/B encode and decode in memory, packets/s vs editcap"),
    "loopback": ("bench.loopback", "stm-send -> stm-recv over loopback UDP/TCP, loss, memory"),
    "transports": ("bench.transports", "tcp:// vs ws:// vs kafka:// end to end, packets/s, RSS"),
}


def _module(name: str) -> ModuleType:
    return importlib.import_module(BENCHMARKS[name][0])


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--repeat", type=int, default=3, metavar="N", help="runs per measurement, best kept"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Run stm benchmarks: one by name, or all of them."
    )
    sub = parser.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name, (_, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text)
        _common(p)
        adder = getattr(_module(name), "add_arguments", None)
        if adder is not None:
            adder(p)
    p = sub.add_parser(
        "all", help="every benchmark: " + ", ".join(BENCHMARKS), conflict_handler="resolve"
    )
    _common(p)
    for name in BENCHMARKS:
        adder = getattr(_module(name), "add_arguments", None)
        if adder is not None:
            adder(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    names = list(BENCHMARKS) if args.bench == "all" else [args.bench]
    results: dict[str, list[Row]] = {}
    for name in names:
        log(f"== {name}")
        results[name] = _module(name).run(args)
    m = machine()
    m["loadavg_1min_at_start"] = load
    if args.json:
        doc = {
            "machine": m,
            "benchmarks": {k: [r.to_dict() for r in v] for k, v in results.items()},
        }
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(
            f"machine: {m['nproc']} cpu ({m['cpu']}), {m['memory_gib']} GiB, "
            f"{m['implementation']} {m['python']}, {m['platform']}"
        )
        if load is not None and load > 0.5:
            print(
                f"note: load average was {load:.2f} at start: other work was running, so wall "
                "times are noisy; CPU times (cpu s) are steadier"
            )
        print(table([r for rows in results.values() for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
