"""The README's main job: read every bundled sample and print a summary of each."""

from __future__ import annotations

import sys
from pathlib import Path

from stm.summary import summarize

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or sorted(
        p for p in SAMPLES.iterdir() if p.suffix in (".pcap", ".pcapng")
    )
    for path in paths:
        print("\n".join(summarize(path).lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
