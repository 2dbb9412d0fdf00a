"""stm-send for daily use: argument handling, sources (files, stdin, --follow), timing
(--rate, --realtime, --speed, --loop), several destinations, --output, progress and
summaries. Real stm-recv subprocesses on loopback sockets receive what it sends."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import Receiver

from stm import pcapng
from stm.cli.send import main
from stm.pcapng import constants as c

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in (".pcap", ".pcapng"))
SAMPLE = ROOT / "samples" / "sip_udp_ipv4.pcap"
SEND = [sys.executable, "-m", "stm.cli.send"]


def count(path) -> int:
    return sum(1 for _ in pcapng.read(path))


def keys(path) -> list:
    return [p.key() for p in pcapng.read(path)]


def spaced_capture(path: Path, n: int, gap: float) -> None:
    """``n`` small UDP packets ``gap`` seconds apart (raw IPv4)."""
    from stm import frames

    with open(path, "wb") as f:
        w = pcapng.Writer(f)
        w.add_interface(c.LINKTYPE_RAW, 65535, tsresol=9)
        for i in range(n):
            data = frames.synthesize(
                4, frames.UDP, bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]), 5060, 5060,
                b"OPTIONS sip:x SIP/2.0\r\nCSeq: %d OPTIONS\r\n\r\n" % i,
            )  # fmt: skip
            w.write_packet(0, 1_700_000_000 * 10**9 + int(i * gap * 1e9), data)
        w.flush()


# -- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give a capture FILE"),
        (["-f", "port 5060", str(SAMPLE), "--to", "udp://127.0.0.1:9"], "-f filters a live"),
        (["-", "--loop", "2", "--to", "udp://127.0.0.1:9"], "--loop needs files"),
        ([str(SAMPLE), "--rate", "10", "--realtime", "--to", "udp://127.0.0.1:9"], "choose one"),
        ([str(SAMPLE), "--speed", "2", "--realtime", "--to", "udp://127.0.0.1:9"], "choose one"),
        ([str(SAMPLE), str(SAMPLE), "--follow", "--to", "udp://127.0.0.1:9"], "exactly one"),
        ([str(SAMPLE)], "give a destination"),
        ([str(SAMPLE), "--to", "http://x:1"], "scheme must be"),
        ([str(SAMPLE), "--to", "udp://[::1"], "bad URL"),
        ([str(SAMPLE), "--to", "udp://127.0.0.1:9", "--cert", "c.pem"], "are for tls:// and"),
        ([str(SAMPLE), "-o", "/tmp/x.pcap", "--to", "dtls://127.0.0.1:9"], "udp:// or tcp://"),
        ([str(SAMPLE), "--to", "udp://no-such-host.invalid:1"], "cannot resolve"),
        (["/nonexistent.pcap", "--to", "udp://127.0.0.1:9"], "cannot read /nonexistent.pcap"),
        ([str(ROOT / "README.md"), "--to", "udp://127.0.0.1:9"], "is not a pcap or pcapng"),
        ([str(ROOT), "--to", "udp://127.0.0.1:9"], "is a directory"),
        ([str(SAMPLE), "-i", "lo", "--to", "udp://127.0.0.1:9"], "-i captures live"),
        (
            [str(SAMPLE), "-o", "/tmp/x.pcap", "--to", "udp://a:1", "--to", "udp://b:1"],
            "at most one --to",
        ),
        ([str(SAMPLE), "-o", "/nonexistent/dir/x.pcap"], "cannot write /nonexistent/dir/x.pcap"),
        ([str(SAMPLE), "--stream-id", "abc", "--to", "udp://127.0.0.1:9"], "must be an integer"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 3  # click's usage lines at most


def test_unknown_format_is_a_usage_error():
    result = CliRunner().invoke(main, [str(SAMPLE), "--format", "xml", "--to", "udp://x:1"])
    assert result.exit_code == 2 and "'xml' is not one of" in result.output


def test_help_reads_like_a_man_page():
    out = CliRunner().invoke(main, ["--help"]).output
    for text in ("Examples:", "--realtime", "--follow", "--output", "-i, --interface",
                 "Exit status", "tcpdump -U -w -"):  # fmt: skip
        assert text in out
    assert "stm-send, version" in CliRunner().invoke(main, ["--version"]).output


# -- sources ------------------------------------------------------------------------------


def test_several_files_in_order_and_a_copy_to_each_destination(tmp_path):
    total = sum(count(s) for s in SAMPLES)
    a = Receiver(tmp_path / "a.pcapng", "--count", str(total), "--duration", "30")
    b = Receiver(tmp_path / "b.pcapng", "--count", str(total), "--duration", "30")
    cmd = [*SEND, *map(str, SAMPLES), "--to", a.url, "--to", b.url, "--json"]
    summary = json.loads(subprocess.run(cmd, capture_output=True, check=True).stdout)
    assert summary["packets"] == total and set(summary["destinations"]) == {a.url, b.url}
    want = [k for s in SAMPLES for k in keys(s)]
    for r in (a, b):
        assert r.finish()["packets_written"] == total
        assert keys(r.out) == want


def test_stdin_pipe(tmp_path):
    n = count(SAMPLE)
    rx = Receiver(tmp_path / "out.pcapng", "--count", str(n), "--duration", "30")
    with open(SAMPLE, "rb") as f:
        subprocess.run([*SEND, "-", "--to", rx.url], stdin=f, check=True, timeout=30)
    assert rx.finish()["packets_written"] == n
    assert keys(rx.out) == keys(SAMPLE)


def test_idle_pipe_sends_what_it_has_and_stops_on_sigterm(tmp_path, procs):
    """A live pipe that goes quiet: the packets so far arrive (linger, not the next
    packet, decides), and SIGTERM ends stm-send cleanly although its input is idle."""
    data = SAMPLE.read_bytes()
    rx = Receiver(tmp_path / "out.pcapng", "--flush-interval", "0.05")
    proc = subprocess.Popen(
        [*SEND, "-", "--to", rx.url, "--stats"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    procs.append(proc)
    proc.stdin.write(data)
    proc.stdin.flush()  # and keep the pipe open: tcpdump -U is still running
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and rx.out.stat().st_size < len(data) // 2:
        time.sleep(0.05)
    time.sleep(0.3)
    assert count(rx.out) == count(SAMPLE)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert b"stm-send: %d packets" % count(SAMPLE) in proc.stderr.read()
    proc.stdin.close()
    assert rx.stop()["packets_written"] == count(SAMPLE)


def test_follow_a_growing_file(tmp_path, procs):
    src = list(pcapng.read_events(SAMPLE))
    grow = tmp_path / "growing.pcapng"
    grow.write_bytes(b"")  # not written yet: --follow waits for it
    rx = Receiver(tmp_path / "out.pcapng", "--flush-interval", "0.05")
    proc = subprocess.Popen([*SEND, "--follow", str(grow), "--to", rx.url, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    procs.append(proc)
    packets = [e for e in src if type(e) is pcapng.Packet]
    with open(grow, "ab") as f:
        w = pcapng.Writer(f)
        w.copy_interface(packets[0].interface)
        for i, pkt in enumerate(packets):
            w.write(pkt, 0)
            w.flush()
            if i in (0, len(packets) // 2):  # stm-send must pick up each later part
                time.sleep(0.4)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and count(rx.out) < len(packets):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert json.loads(out)["packets"] == len(packets)
    assert rx.stop()["packets_written"] == len(packets)
    assert [p.key()[1:] for p in pcapng.read(rx.out)] == [p.key()[1:] for p in packets]


# -- timing -------------------------------------------------------------------------------


def test_realtime_and_speed_keep_the_gaps(tmp_path):
    src = tmp_path / "spaced.pcapng"
    spaced_capture(src, 5, 0.2)  # 0.8 s from first to last
    for args, span in ((["--realtime"], 0.8), (["--speed", "4"], 0.2)):
        wire = tmp_path / "wire.pcapng"
        subprocess.run([*SEND, str(src), "-o", str(wire), *args], check=True, timeout=30)
        times = [p.time_ns for p in pcapng.read(wire)]
        assert len(times) == 5  # one report each: the gap is longer than the linger
        assert times[-1] - times[0] >= (span - 0.05) * 1e9
        assert times[-1] - times[0] < (span + 5) * 1e9
    # Timestamps inside the reports stay the capture's own.
    from stm.report import AutoDecoder, Packets
    from stm.wire import read_reports

    d = AutoDecoder()
    got = []
    for _, data, peer, t in read_reports(wire):
        d.receive_datagram(data, peer, t)
        got += [p.time_ns for ev in d.events() if type(ev) is Packets for p in ev.packets]
    assert got == [p.time_ns for p in pcapng.read(src)]


def test_rate_paces_packets(tmp_path):
    src = tmp_path / "spaced.pcapng"
    spaced_capture(src, 11, 0.0)
    started = time.monotonic()
    subprocess.run([*SEND, str(src), "-o", str(tmp_path / "w.pcap"), "--rate", "20"],
                   check=True, timeout=30)  # fmt: skip
    assert time.monotonic() - started >= 0.5  # 10 gaps of 50 ms


def test_loop_sends_the_files_n_times(tmp_path):
    n = count(SAMPLE)
    rx = Receiver(tmp_path / "out.pcapng", "--count", str(3 * n), "--duration", "30")
    subprocess.run([*SEND, str(SAMPLE), "--loop", "3", "--to", rx.url], check=True, timeout=30)
    result = rx.finish()
    assert result["packets_written"] == 3 * n and result["duplicates"] == 0
    assert keys(rx.out) == keys(SAMPLE) * 3


# -- output, progress, summaries -----------------------------------------------------------


@pytest.mark.parametrize("name", ["wire.pcap", "wire.pcapng"])
def test_output_is_a_clean_capture_of_report_traffic(tmp_path, name):
    wire = tmp_path / name
    result = subprocess.run(
        [*SEND, *map(str, SAMPLES), "-o", str(wire), "--to", "udp://127.0.0.1:4754", "--json"],
        capture_output=True, check=True, text=True,
    )  # fmt: skip
    reports = json.loads(result.stdout)["reports"]
    tshark = subprocess.run(
        ["tshark", "-r", str(wire), "-T", "fields", "-e", "udp.dstport", "-e", "gre.key",
         "-e", "gre.sequence_number", "-e", "_ws.expert"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = [line.split("\t") for line in tshark.stdout.splitlines()]
    assert len(rows) == reports
    assert {r[0] for r in rows} == {"4754"}
    assert [int(r[2]) for r in rows] == list(range(reports))
    assert not any(r[3] for r in rows)  # no checksum or other expert complaints


def test_output_over_tcp_is_one_clean_connection(tmp_path):
    wire = tmp_path / "wire.pcapng"
    subprocess.run(
        [*SEND, *map(str, SAMPLES), "--format", "tlv", "-o", str(wire),
         "--to", "tcp://[::1]:9060"],
        check=True, timeout=30,
    )  # fmt: skip
    tshark = subprocess.run(
        ["tshark", "-r", str(wire), "-q", "-z", "expert,warn"], capture_output=True, text=True
    )
    assert "Warnings" not in tshark.stdout and "Errors" not in tshark.stdout, tshark.stdout
    conv = subprocess.run(["tshark", "-r", str(wire), "-q", "-z", "conv,tcp"],
                          capture_output=True, text=True).stdout  # fmt: skip
    assert conv.count("[::1]:9060") == 1 or conv.count("::1:9060") == 1, conv


def test_stats_and_json_summaries(tmp_path):
    base = [*SEND, str(SAMPLE), "-o", str(tmp_path / "w.pcap")]
    quiet = subprocess.run(base, capture_output=True, text=True, check=True)
    assert quiet.stdout == quiet.stderr == ""  # Unix: silence unless asked
    stats = subprocess.run([*base, "--stats"], capture_output=True, text=True, check=True)
    assert stats.stderr.startswith(f"stm-send: {count(SAMPLE)} packets in ")
    js = subprocess.run([*base, "--json"], capture_output=True, text=True, check=True)
    assert json.loads(js.stdout)["packets"] == count(SAMPLE)


def test_progress_line_on_a_terminal_only(tmp_path):
    big = tmp_path / "big.pcapng"
    spaced_capture(big, 20000, 0.0)
    cmd = [*SEND, str(big), "-o", str(tmp_path / "w.pcap"), "--rate", "40000"]
    # On a pseudo-terminal: a progress line, redrawn in place.
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execv(sys.executable, cmd)
    out = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    assert b"\r[" in out and b"pkt/s" in out and b"%" in out
    # Piped: none.
    piped = subprocess.run(cmd, capture_output=True, check=True)
    assert piped.stderr == b""


def test_stream_id_is_carried(tmp_path):
    wire = tmp_path / "w.pcap"
    subprocess.run([*SEND, str(SAMPLE), "-o", str(wire), "--stream-id", "0x1234"], check=True)
    rows = subprocess.run(["tshark", "-r", str(wire), "-T", "fields", "-e", "gre.key"],
                          capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert rows and set(rows) == {"0x00001234"}
