"""Child process for the memory benchmark: one streaming read, then its peak RSS as JSON.

``python -m bench._rss MODE PATH`` with MODE ``baseline`` (imports only), ``packets``
(``stm.pcapng.read``, touching every packet's data) or ``bulk`` (``raw_packets=True``).
It runs alone in its process so that the high-water mark is the read's and nothing else's.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _vmhwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def main(argv: list[str]) -> int:
    mode, path = argv
    import stm.pcapng as sp

    packets = 0
    nbytes = 0
    t0 = time.perf_counter()
    if mode == "packets":
        for p in sp.read(path):
            nbytes += len(p.data)
            packets += 1
    elif mode == "bulk":
        for ev in sp.read_events(path, raw_packets=True):
            if type(ev) is sp.RawPackets:
                packets += ev.count
                nbytes += len(ev.data)
    elif mode != "baseline":
        raise SystemExit(f"unknown mode {mode!r}")
    seconds = time.perf_counter() - t0
    out = {
        "mode": mode,
        "packets": packets,
        "bytes": nbytes,
        "seconds": seconds,
        "vmhwm_kib": _vmhwm_kib(),
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
