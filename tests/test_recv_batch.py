"""stm-recv takes every format-B message of a TCP read in one decoder call; --count still
stops at exactly N packets, and the output is the same as message by message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_secure_cli import Recv, keys

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in (".pcap", ".pcapng"))


@pytest.mark.parametrize("accel", ["", "1"])
def test_count_stops_at_exactly_n_packets_over_tcp(tmp_path, procs, accel, monkeypatch):
    monkeypatch.setenv("STM_NO_ACCEL", accel)
    total = len(keys(SAMPLES))
    n = total - 7
    rx = Recv(procs, tmp_path / "out.pcapng", "tcp://127.0.0.1:0", "--count", str(n))
    send = [sys.executable, "-m", "stm.cli.send", *map(str, SAMPLES), "--format", "tlv"]
    subprocess.run([*send, "--to", rx.url, "--drain-timeout", "3"], capture_output=True, timeout=60)
    out, _ = rx.proc.communicate(timeout=30)
    assert rx.proc.returncode == 0
    assert json.loads(out)["packets_written"] == n
    assert keys([rx.out]) == keys(SAMPLES)[:n]
