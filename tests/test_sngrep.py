"""Interoperability with sngrep, a third-party HEP3 (EEP) implementation, both ways:
sngrep sends HEP to stm-recv, and stm-send sends format B to sngrep's HEP listener."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from stm import pcapng
from stm.pcapng import constants as c

pytestmark = pytest.mark.skipif(
    shutil.which("sngrep") is None,
    reason="sngrep (built with EEP/HEP support) is not installed",
)

ROOT = Path(__file__).parents[1]
SAMPLES = ROOT / "samples"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TSHARK = shutil.which("tshark")
SIP_FIELDS = ("sip.Method", "sip.Status-Code", "sip.Call-ID")

UDP4 = "sip_udp_ipv4.pcap"
TCP4 = "sip_tcp_ipv4.pcap"
UDP6 = "sip_udp_ipv6.pcapng"
TCP6 = "sip_tcp_ipv6.pcapng"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sngrep(*args: str) -> list[str]:
    # -F: no user config file, so a local ~/.sngreprc cannot change the behaviour
    return ["sngrep", "-F", "-N", "-q", *args]


def sip_messages(path) -> Counter:
    """(family, proto, src, dst, sport, dport, SIP payload, time in us) of every packet of a
    capture that carries a transport payload, as scapy dissects the frames."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    out = Counter()
    for p in pcapng.read(path):
        data = bytes(p.data)
        if p.linktype == c.LINKTYPE_ETHERNET:
            pkt = Ether(data)
        elif p.linktype == c.LINKTYPE_RAW:
            pkt = IP(data) if data[0] >> 4 == 4 else IPv6(data)
        else:
            raise AssertionError(f"unexpected link type {p.linktype}")
        ip = pkt[IP] if IP in pkt else pkt[IPv6]
        l4 = pkt[UDP] if UDP in pkt else pkt[TCP]
        payload = bytes(l4.payload)
        if not payload:
            continue
        usec = p.time_ns // 1000
        out[(ip.version, type(l4).__name__, ip.src, ip.dst, l4.sport, l4.dport, payload, usec)] += 1
    return out


def tshark_sip(path, *opts: str) -> Counter:
    """Multiset of (method, status code, Call-ID) of the frames tshark dissects as SIP."""
    args = ["tshark", "-r", str(path), *opts, "-Y", "sip", "-T", "fields"]
    args += [x for f in SIP_FIELDS for x in ("-e", f)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return Counter(result.stdout.splitlines())


def start_recv(procs, out: Path) -> tuple[subprocess.Popen, int, Path]:
    """stm-recv --format tlv on an ephemeral UDP port; (process, port, stderr file)."""
    err = out.with_suffix(".stderr")
    with open(out.with_suffix(".stdout"), "wb") as so, open(err, "wb") as se:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stm.cli.recv", "--format", "tlv", "--listen",
             "udp://127.0.0.1:0", "-w", str(out), "--json", "--duration", "30",
             "--flush-interval", "0"],
            stdout=so, stderr=se, cwd=ROOT, env=ENV,
        )  # fmt: skip
    procs.append(proc)
    deadline = time.monotonic() + 20
    while not (m := re.search(r"listening on udp://127\.0\.0\.1:(\d+)", err.read_text())):
        assert proc.poll() is None, err.read_text()
        assert time.monotonic() < deadline, "stm-recv did not start"
        time.sleep(0.02)
    return proc, int(m.group(1)), err


def stop(proc: subprocess.Popen, timeout: float = 20) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"process did not stop on SIGTERM within {timeout} s")


# -- sngrep -> stm-recv ----------------------------------------------------------------------


def sngrep_to_stm(procs, tmp_path: Path, sample: str) -> tuple[Path, dict]:
    """Replay ``sample`` with sngrep -I ... -H into stm-recv; the output file and summary."""
    want = sum(sip_messages(SAMPLES / sample).values())
    out = tmp_path / "out.pcapng"
    rx, port, err = start_recv(procs, out)
    result = subprocess.run(
        sngrep("-I", str(SAMPLES / sample), "-H", f"udp:127.0.0.1:{port}"),
        capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # stm-recv writes as the messages arrive: wait for all of them, bounded
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if sum(1 for _ in pcapng.read(out)) >= want:
                break
        except pcapng.MalformedPcapng:
            pass  # a block half written
        time.sleep(0.1)
    assert stop(rx) == 0, err.read_text()
    summary = json.loads(out.with_suffix(".stdout").read_text())
    return out, summary


@pytest.mark.parametrize("sample", [UDP4, TCP4, UDP6, TCP6])
def test_sngrep_sends_hep_that_stm_recv_rebuilds(tmp_path, procs, sample):
    out, summary = sngrep_to_stm(procs, tmp_path, sample)
    want = sip_messages(SAMPLES / sample)
    assert summary["malformed"] == 0 and summary["auth_rejected"] == 0
    assert summary["packets_written"] == sum(want.values())
    (stream,) = summary["streams"]
    assert stream.startswith("hep:127.0.0.1/")  # foreign HEP, keyed by sender and capture ID
    packets = list(pcapng.read(out))
    assert {p.linktype for p in packets} == {c.LINKTYPE_RAW}
    # same SIP payload bytes, addresses, ports, transport and time (HEP has microseconds)
    assert sip_messages(out) == want
    if TSHARK:
        assert tshark_sip(out) == tshark_sip(SAMPLES / sample)
        errors = "_ws.malformed || _ws.expert.severity >= error"
        bad = subprocess.run(
            ["tshark", "-r", str(out), "-Y", errors],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert bad.returncode == 0 and bad.stdout == "", bad.stdout


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
@pytest.mark.parametrize("sample", [TCP4, TCP6])
def test_sngrep_tcp_messages_dissect_as_sip_with_default_wireshark_settings(
    tmp_path, procs, sample
):
    out, _ = sngrep_to_stm(procs, tmp_path, sample)
    assert tshark_sip(out) == tshark_sip(SAMPLES / sample)


# -- stm-send -> sngrep ----------------------------------------------------------------------


def udp_port_bound(port: int) -> bool:
    """Whether some socket has UDP ``port`` bound on 127.0.0.1 (from /proc/net/udp)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as f:
        return any(line.split()[1] == want for line in f.readlines()[1:])


@pytest.mark.skipif(TSHARK is None, reason="tshark is needed to read sngrep's SIP back")
@pytest.mark.skipif(not os.path.exists("/proc/net/udp"), reason="needs Linux /proc/net/udp")
@pytest.mark.parametrize("sample", [UDP4, UDP6, TCP4, TCP6])
def test_stm_send_reaches_sngrep(tmp_path, procs, sample):
    port = free_port()
    out = tmp_path / "sngrep.pcap"
    log = tmp_path / "sngrep.log"
    with open(log, "wb") as f:
        listener = subprocess.Popen(
            sngrep("-L", f"udp:127.0.0.1:{port}", "-O", str(out)),
            stdout=f, stderr=f, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    procs.append(listener)
    deadline = time.monotonic() + 10
    while not udp_port_bound(port):
        assert listener.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "sngrep did not bind its HEP port"
        time.sleep(0.02)
    result = subprocess.run(
        [sys.executable, "-m", "stm.cli.send", str(SAMPLES / sample), "--format", "tlv",
         "--to", f"udp://127.0.0.1:{port}", "--json"],
        capture_output=True, text=True, timeout=30, cwd=ROOT, env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sent = json.loads(result.stdout)["packets"]
    # sngrep writes its file as packets come in: wait until it holds all of them, bounded
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if sum(1 for _ in pcapng.read(out)) >= sent:
                break
        except (OSError, pcapng.MalformedPcapng):
            pass
        time.sleep(0.1)
    assert stop(listener) in (0, -signal.SIGTERM), log.read_text()
    # the file is complete: every record whole, and as many as were sent
    assert sum(1 for _ in pcapng.read(out)) == sent
    check = subprocess.run(["tshark", "-r", str(out)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "cut short" not in check.stderr, check.stderr
    want = tshark_sip(SAMPLES / sample)
    assert sum(want.values()) == 11
    assert tshark_sip(out) == want
