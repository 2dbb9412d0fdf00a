"""stm-send -i: live capture on the loopback interface of real SIP calls from SIPp, sent
as reports to a real stm-recv, which rebuilds the captured frames."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import Receiver
from test_capture import _can_capture, _free_udp_ports

from stm import frames, pcapng

CALLS = 3
EXPECTED = ["INVITE", "180", "200", "ACK", "BYE", "200"]

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp is not installed"),
    pytest.mark.skipif(
        not sys.platform.startswith("linux") or not _can_capture(),
        reason="live capture needs Linux and root or CAP_NET_RAW (run the tests as root)",
    ),
]


def _sip_calls(tmp_path, uas_port: int, uac_port: int) -> None:
    sipp = shutil.which("sipp")
    uas_xml = subprocess.run([sipp, "-sd", "uas"], capture_output=True, text=True, timeout=10)
    (tmp_path / "uas.xml").write_text(re.sub(r"<timewait[^>]*/>", "", uas_xml.stdout))
    common = ["-i", "127.0.0.1", "-m", str(CALLS), "-timeout", "15s", "-nostdin"]
    uas = subprocess.Popen(
        [sipp, "-sf", str(tmp_path / "uas.xml"), "-p", str(uas_port), *common],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.2)
        subprocess.run(
            [sipp, "-sn", "uac", f"127.0.0.1:{uas_port}", "-p", str(uac_port), "-r", "50",
             "-d", "20", *common],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
            check=True,
        )  # fmt: skip
        assert uas.wait(15) == 0
    finally:
        if uas.poll() is None:
            uas.kill()
            uas.wait(10)


@pytest.mark.parametrize("fmt", ["gre", "tlv"])
def test_live_capture_of_sipp_calls_reaches_the_collector(tmp_path, procs, fmt):
    uas_port, uac_port = _free_udp_ports(2)
    rx = Receiver(tmp_path / "out.pcapng", "--flush-interval", "0.05")
    flt = f"udp and (port {uas_port} or port {uac_port})"
    send = subprocess.Popen(
        [sys.executable, "-m", "stm.cli.send", "-i", "lo", "-f", flt, "--format", fmt,
         "--producer", "sbc-1", "--to", rx.url, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs.append(send)
    assert "capturing on lo" in send.stderr.readline()
    _sip_calls(tmp_path, uas_port, uac_port)
    want = CALLS * len(EXPECTED)
    deadline = time.monotonic() + 10  # the linger sends the last report while lo is idle
    while time.monotonic() < deadline and sum(1 for _ in pcapng.read(rx.out)) < want:
        time.sleep(0.05)
    send.send_signal(signal.SIGTERM)
    out, err = send.communicate(timeout=15)
    assert send.returncode == 0, err
    summary = json.loads(out)
    assert summary["packets"] == want and summary["capture"]["dropped"] == 0
    assert rx.stop()["packets_written"] == want
    got = []
    for p in pcapng.read(rx.out):
        s = frames.split(p.interface.linktype, p.data)
        assert s is not None and {s.sport, s.dport} == {uas_port, uac_port}
        got.append(bytes(p.data[s.offset : s.end]).split(b" ", 2))
    kinds = [w[1].decode() if w[0] == b"SIP/2.0" else w[0].decode() for w in got]
    # Each call's messages in order (calls may interleave): count them per kind.
    assert sorted(kinds) == sorted(EXPECTED * CALLS)
    assert kinds[0] == "INVITE"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-i", "nosuch0"], "no such interface"),
        (["-i", "lo", "-f", "port ((("], "bad capture filter"),
    ],
)
def test_live_capture_errors_are_one_line_usage_errors(args, message):
    from click.testing import CliRunner

    from stm.cli.send import main

    result = CliRunner().invoke(main, [*args, "--to", "udp://127.0.0.1:9"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output
