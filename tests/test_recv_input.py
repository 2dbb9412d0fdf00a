"""stm-recv --input: the original packets rebuilt offline from a capture of report traffic,
as stm-send --output writes it or tcpdump takes it on a collector (UDP and TCP, both
formats), with the same summary as a live run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from stm import pcapng
from stm.cli.recv import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in (".pcap", ".pcapng"))
PY = [sys.executable, "-m"]


def keys(paths) -> list:
    return [p.key()[1:] for f in paths for p in pcapng.read(f)]


@pytest.mark.parametrize(
    ("fmt", "to"),
    [
        ("gre", "udp://127.0.0.1:4754"),
        ("tlv", "udp://[::1]:9060"),
        ("tlv", "tcp://127.0.0.1:9060"),
        ("gre", "tcp://[::1]:4754"),
    ],
)
def test_output_then_input_gives_back_the_original_packets(tmp_path, fmt, to):
    wire = tmp_path / "wire.pcap"
    subprocess.run([*PY, "stm.cli.send", *map(str, SAMPLES), "--format", fmt, "--to", to,
                    "--producer", "amf-1", "-o", str(wire)], check=True, timeout=60)  # fmt: skip
    out = tmp_path / "rebuilt.pcapng"
    r = subprocess.run([*PY, "stm.cli.recv", "--input", str(wire), "-w", str(out), "--json"],
                       capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    summary = json.loads(r.stdout)
    assert summary["packets_written"] == len(keys(SAMPLES))
    assert summary["lost"] == summary["malformed"] == summary["input"]["ignored"] == 0
    assert keys([out]) == keys(SAMPLES)
    assert [s.split("/")[0] for s in summary["streams"]] == ["amf-1"]


def test_several_inputs_and_other_traffic(tmp_path):
    """Two report captures, one with other traffic (a SIP capture itself) in between."""
    a, b = tmp_path / "a.pcapng", tmp_path / "b.pcap"
    subprocess.run([*PY, "stm.cli.send", str(SAMPLES[0]), "--producer", "p1", "-o", str(a)],
                   check=True, timeout=60)  # fmt: skip
    subprocess.run([*PY, "stm.cli.send", str(SAMPLES[1]), "--producer", "p2", "--format", "tlv",
                    "-o", str(b)], check=True, timeout=60)  # fmt: skip
    out = tmp_path / "out.pcapng"
    r = subprocess.run(
        [*PY, "stm.cli.recv", "-r", str(a), "-r", str(SAMPLES[3]), "-r", str(b), "-w", str(out),
         "--json", "--split-by", "producer"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    summary = json.loads(r.stdout)
    assert summary["input"]["ignored"] == len(keys([SAMPLES[3]]))
    assert keys([tmp_path / "out-p1.pcapng"]) == keys([SAMPLES[0]])
    assert keys([tmp_path / "out-p2.pcapng"]) == keys([SAMPLES[1]])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-w", "x.pcapng"], "give --listen URL (live) or --input FILE"),
        (["--listen", "udp://127.0.0.1:0", "--input", "y.pcap", "-w", "x.pcapng"], "not both"),
        (["--input", "/nonexistent.pcap", "-w", "x.pcapng"], "cannot read /nonexistent.pcap"),
        (["--input", str(ROOT / "README.md"), "-w", "x.pcapng"], "is not a pcap or pcapng"),
        (["--listen", "sctp://127.0.0.1:0", "-w", "x.pcapng"], "scheme must be"),
    ],
)
def test_input_argument_errors(tmp_path, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.output, result.output
