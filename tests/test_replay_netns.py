"""`stm-send --output` writes report traffic that tcpreplay can put back on a real link.

Two network namespaces made by the test, joined by a veth pair: stm-recv listens in one,
tcpreplay sends the (tcprewrite'd) capture from the other, and the collector rebuilds the
original packets exactly. No traffic leaves the namespaces.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stm import pcapng

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in (".pcap", ".pcapng"))
PY = [sys.executable, "-m"]


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@pytest.fixture
def link():
    """(sender netns, receiver netns, receiver MAC) on 10.203.x.0/24, removed afterwards."""
    if not all(shutil.which(t) for t in ("ip", "tcpreplay", "tcprewrite")):
        pytest.skip("needs ip, tcpreplay and tcprewrite")
    tag = f"{os.getpid() % 100000}"
    a, b = f"stmtx{tag}", f"stmrx{tag}"
    try:
        _run("ip", "netns", "add", a)
    except (subprocess.CalledProcessError, PermissionError) as exc:
        pytest.skip(f"cannot create a network namespace here: {exc}")
    try:
        _run("ip", "netns", "add", b)
        _run("ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        _run("ip", "link", "set", f"va{tag}", "netns", a)
        _run("ip", "link", "set", f"vb{tag}", "netns", b)
        net = 1 + int(tag) % 250
        _run("ip", "-n", a, "addr", "add", f"10.203.{net}.1/24", "dev", f"va{tag}")
        _run("ip", "-n", b, "addr", "add", f"10.203.{net}.2/24", "dev", f"vb{tag}")
        for ns, dev in ((a, f"va{tag}"), (b, f"vb{tag}")):
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        show = subprocess.run(["ip", "-n", b, "-br", "link", "show", f"vb{tag}"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
        mac = re.search(r"([0-9a-f]{2}(?::[0-9a-f]{2}){5})", show).group(1)
        yield a, b, mac, f"10.203.{net}.2", f"va{tag}"
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize("fmt", ["gre", "tlv"])
def test_output_replayed_by_tcpreplay_is_rebuilt_exactly(tmp_path, link, fmt):
    a, b, mac, collector, dev = link
    total = sum(1 for s in SAMPLES for _ in pcapng.read(s))
    out = tmp_path / "rebuilt.pcapng"
    recv = subprocess.Popen(
        ["ip", "netns", "exec", b, *PY, "stm.cli.recv", "--listen", "udp://0.0.0.0:4754",
         "-w", str(out), "--count", str(total), "--duration", "30", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert "listening on" in recv.stderr.readline()
        wire, rewritten = tmp_path / "wire.pcap", tmp_path / "replay.pcap"
        subprocess.run(
            ["ip", "netns", "exec", a, *PY, "stm.cli.send", *map(str, SAMPLES), "--format", fmt,
             "--output", str(wire), "--to", f"udp://{collector}:4754"],
            check=True, timeout=30,
        )  # fmt: skip
        _run("tcprewrite", f"--enet-dmac={mac}", "-i", str(wire), "-o", str(rewritten))
        # A modest pace: a veth has no flow control, and this is about the bytes.
        _run("ip", "netns", "exec", a, "tcpreplay", "--pps", "2000", "-i", dev, str(rewritten))
        result, err = recv.communicate(timeout=40)
    finally:
        if recv.poll() is None:
            recv.kill()
    assert recv.returncode == 0, err
    assert json.loads(result)["packets_written"] == total
    want = [p.key()[1:] for s in SAMPLES for p in pcapng.read(s)]
    assert [p.key()[1:] for p in pcapng.read(out)] == want
