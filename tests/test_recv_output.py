"""stm-recv's output end to end, through real UDP sockets on 127.0.0.1: rotation by size
and time (-C, -G, -W), --split-by, standard output read live by tshark, kill -9 after a
flush, SIGINT/SIGTERM, a full disk and unwritable paths, --stats and --stats-interval.
Every file is read back by our reader and by independent ones (python-pcapng, capinfos,
tshark)."""

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
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import oracle_counts

from stm import pcapng
from stm.cli import recv as recv_cli
from stm.output import safe_token
from stm.report import Encoder

ROOT = Path(__file__).parents[1]
SAMPLES = sorted((ROOT / "samples").glob("*.pcap*"))
SIP_UDP = ROOT / "samples" / "sip_udp_ipv4.pcap"  # 11 packets
SIP_TCP = ROOT / "samples" / "sip_tcp_ipv4.pcap"  # 17 packets
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TSHARK = shutil.which("tshark")
CAPINFOS = shutil.which("capinfos")


class Receiver:
    """stm-recv in a subprocess; stdout and stderr go to files so every wait is bounded."""

    def __init__(self, procs, tmp: Path, *args: str, stdout=None) -> None:
        self.stdout_path = tmp / "recv.stdout"
        self.stderr_path = tmp / "recv.stderr"
        with open(self.stdout_path, "wb") as so, open(self.stderr_path, "wb") as se:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stm.cli.recv", "--listen", "udp://127.0.0.1:0", *args],
                stdout=stdout if stdout is not None else so,
                stderr=se,
                cwd=ROOT,
                env=ENV,
            )
        procs.append(self.proc)
        self.url = wait_for(lambda: _url(self.stderr), f"stm-recv did not start: {self.stderr}")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def finish(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def signal(self, signum=signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        return self.finish()


def _url(stderr: str) -> str | None:
    match = re.search(r"listening on (udp://\S+)", stderr)
    return match.group(1) if match else None


def wait_for(check, message: str, timeout: float = 20, step: float = 0.02):
    """Poll ``check`` until it returns something true, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, message
        time.sleep(step)


def send(url: str, *files, producer: str | None = None, extra=()) -> dict:
    args = [sys.executable, "-m", "stm.cli.send", *map(str, files), "--to", url, "--json"]
    if producer is not None:
        args += ["--producer", producer]
    result = subprocess.run(
        [*args, *extra], capture_output=True, text=True, timeout=60, check=True, cwd=ROOT, env=ENV
    )
    return json.loads(result.stdout)


def send_reports(url: str, path: Path, producer: str, stream_id: int) -> int:
    """Send a capture as format-A reports of one stream from this process (stm-send picks
    stream IDs itself); returns the bytes sent."""
    enc = Encoder(producer, stream_id)
    dgrams = []
    for p in pcapng.read(path):
        dgrams += enc.add(p, 0.0)
    dgrams += enc.flush()
    host, port = url.removeprefix("udp://").rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for d in dgrams:
            s.sendto(d, (host, int(port)))
    return sum(map(len, dgrams))


def keys(path) -> list:
    """Every packet of a capture as (bytes, original length, exact time)."""
    return [(bytes(p.data), p.origlen, p.time) for p in pcapng.read(path)]


def count(path) -> int | None:
    """Packets in a file being written, or None while it is not readable yet."""
    try:
        return sum(1 for _ in pcapng.read(path))
    except Exception:
        return None


def tshark_count(path) -> int:
    r = subprocess.run(
        [TSHARK, "-r", str(path), "-T", "fields", "-e", "frame.number"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return len(r.stdout.split())


def check_files(paths, want) -> None:
    """Each file valid on its own for every reader; all packets there exactly once."""
    got = [keys(p) for p in paths]
    assert oracle_counts(paths) == [len(k) for k in got]
    assert sorted(k for ks in got for k in ks) == sorted(want)


def all_keys(*files) -> list:
    return [k for f in files for k in keys(f)]


def test_size_rotation_names_files_like_tcpdump(tmp_path, procs):
    files = SAMPLES[1:]  # reports of at most 1,500 bytes
    total = sum(len(keys(f)) for f in files)
    out = tmp_path / "out" / "out.pcapng"
    rx = Receiver(procs, tmp_path, "-w", str(out), "-C", "0.003", "--json")
    send(rx.url, *files)
    wait_for(lambda: _written(tmp_path) >= total, "not all packets arrived", timeout=20)
    assert rx.signal() == 0, rx.stderr
    summary = json.loads(rx.stdout)
    names = sorted(os.listdir(tmp_path / "out"), key=lambda n: int(n[10:] or 0))
    assert names[:3] == ["out.pcapng", "out.pcapng1", "out.pcapng2"]
    assert [int(n[10:] or 0) for n in names] == list(range(len(names)))
    paths = [tmp_path / "out" / n for n in names]
    assert summary["files"] == [str(p) for p in paths]
    assert summary["packets_written"] == total and summary["bytes"] > 0
    assert all(p.stat().st_size <= 3000 for p in paths)
    check_files(paths, all_keys(*files))


def _written(tmp_path: Path) -> int:
    return sum(count(p) or 0 for p in (tmp_path / "out").iterdir())


@pytest.fixture(autouse=True)
def _out_dir(tmp_path):
    (tmp_path / "out").mkdir()


def test_ring_buffer_of_three_files(tmp_path, procs):
    rx = Receiver(
        procs,
        tmp_path,
        "-w",
        str(tmp_path / "out" / "ring"),
        "-C",
        "0.002",
        "-W",
        "3",
        "--stats-interval",
        "0.1",
        "--json",
    )
    files = SAMPLES[1:]
    send(rx.url, *files)
    total = sum(len(keys(f)) for f in files)
    wait_for(lambda: _rx_stats(rx) >= total, "not all packets written")
    assert rx.signal(signal.SIGINT) == 0, rx.stderr
    summary = json.loads(rx.stdout)
    assert summary["packets_written"] == total
    assert sorted(os.listdir(tmp_path / "out")) == ["ring0", "ring1", "ring2"]
    paths = [tmp_path / "out" / n for n in ("ring0", "ring1", "ring2")]
    counts = oracle_counts(paths)
    assert 0 < sum(counts) < total  # the oldest files were overwritten
    got = [k for p in paths for k in keys(p)]
    want = all_keys(*files)
    assert all(k in want for k in got) and len(set(got)) == len(got)


def _rx_stats(rx: Receiver) -> int:
    """Packets written so far, from the --stats-interval lines (a ring buffer overwrites
    its files, so they cannot tell)."""
    found = re.findall(r"(\d+) packets written", rx.stderr)
    return int(found[-1]) if found else 0


def test_time_rotation_with_strftime_names(tmp_path, procs):
    pattern = str(tmp_path / "out" / "cap-%H%M%S.pcapng")
    rx = Receiver(procs, tmp_path, "-w", pattern, "-G", "1", "--json")
    send(rx.url, SIP_UDP, producer="first")
    wait_for(lambda: len(os.listdir(tmp_path / "out")) >= 2, "no rotation after 1 s", timeout=10)
    send(rx.url, SIP_TCP, producer="second")
    wait_for(
        lambda: sum(count(p) or 0 for p in (tmp_path / "out").iterdir()) >= 28,
        "packets missing",
        timeout=10,
    )
    assert rx.signal() == 0, rx.stderr
    paths = sorted((tmp_path / "out").iterdir())
    assert len(paths) >= 2
    assert all(re.fullmatch(r"cap-\d{6}\.pcapng", p.name) for p in paths)
    check_files(paths, all_keys(SIP_UDP, SIP_TCP))


def test_time_rotation_with_a_file_count_stops_by_itself(tmp_path, procs):
    rx = Receiver(procs, tmp_path, "-w", str(tmp_path / "out" / "t.pcapng"), "-G", "0.3", "-W", "2")
    assert rx.finish(timeout=20) == 0, rx.stderr
    assert "maximum file count reached: 2" in rx.stderr
    assert os.listdir(tmp_path / "out") == ["t.pcapng"]  # no strftime: overwritten, as tcpdump
    assert oracle_counts([tmp_path / "out" / "t.pcapng"]) == [0]


def test_split_by_producer_with_rotation(tmp_path, procs):
    nasty = "../evil/amf 2"
    rx = Receiver(
        procs,
        tmp_path,
        "-w",
        str(tmp_path / "out" / "split.pcapng"),
        "--split-by",
        "producer",
        "-C",
        "0.003",
        "--json",
    )
    send(rx.url, SIP_UDP, producer="amf-1")
    send(rx.url, SIP_TCP, producer=nasty)
    wait_for(lambda: _written(tmp_path) >= 28, "packets missing")
    assert rx.signal() == 0, rx.stderr
    names = sorted(os.listdir(tmp_path / "out"))
    token = safe_token(nasty)
    assert "split-amf-1.pcapng" in names and f"split-{token}.pcapng" in names
    assert not (tmp_path / "evil").exists()
    a = [tmp_path / "out" / n for n in names if n.startswith("split-amf-1.pcapng")]
    b = [tmp_path / "out" / n for n in names if n.startswith(f"split-{token}.pcapng")]
    assert len(a) + len(b) == len(names) and len(b) > 1  # b rotated
    check_files(a, keys(SIP_UDP))
    check_files(b, keys(SIP_TCP))


def test_split_by_stream(tmp_path, procs):
    rx = Receiver(procs, tmp_path, "-w", str(tmp_path / "out" / "s.pcapng"), "--split-by", "stream")
    send_reports(rx.url, SIP_UDP, "p", 7)
    send_reports(rx.url, SIP_TCP, "p", 8)
    wait_for(lambda: _written(tmp_path) >= 28, "packets missing")
    assert rx.signal() == 0, rx.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["s-p-7.pcapng", "s-p-8.pcapng"]
    check_files([tmp_path / "out" / "s-p-7.pcapng"], keys(SIP_UDP))
    check_files([tmp_path / "out" / "s-p-8.pcapng"], keys(SIP_TCP))


@pytest.mark.skipif(not TSHARK, reason="tshark not installed")
def test_standard_output_is_read_live_by_tshark(tmp_path, procs):
    lines = tmp_path / "tshark.out"
    with open(lines, "wb") as sink:
        tshark = subprocess.Popen(
            [TSHARK, "-l", "-r", "-", "-T", "fields", "-e", "frame.len"],
            stdin=subprocess.PIPE,
            stdout=sink,
            stderr=subprocess.DEVNULL,
        )
    procs.append(tshark)
    rx = Receiver(procs, tmp_path, "-w", "-", "--flush-interval", "0.1", stdout=tshark.stdin)
    tshark.stdin.close()  # stm-recv holds the only write end now
    send(rx.url, SIP_UDP)
    want = [str(len(k[0])) for k in keys(SIP_UDP)]
    wait_for(
        lambda: lines.read_text().split() == want, "tshark did not see the packets", timeout=20
    )
    assert rx.proc.poll() is None  # read while stm-recv is still running
    assert rx.signal() == 0, rx.stderr
    assert tshark.wait(20) == 0


def test_kill_9_after_a_flush_leaves_a_valid_file(tmp_path, procs):
    out = tmp_path / "out" / "k.pcapng"
    rx = Receiver(procs, tmp_path, "-w", str(out), "--flush-interval", "0.1")
    send(rx.url, SIP_UDP, SIP_TCP)
    wait_for(lambda: count(out) == 28, "the packets were not flushed")
    rx.proc.kill()
    assert rx.finish() == -signal.SIGKILL
    check_files([out], all_keys(SIP_UDP, SIP_TCP))
    if TSHARK:
        assert tshark_count(out) == 28


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_close_cleanly_with_exit_0(tmp_path, procs, signum):
    rx = Receiver(
        procs,
        tmp_path,
        "-w",
        str(tmp_path / "out" / "sig.pcapng"),
        "-C",
        "0.004",
        "--flush-interval",
        "60",  # the last file is not flushed before the signal: closing must do it
        "--stats-interval",
        "0.1",
        "--json",
    )
    send(rx.url, SIP_UDP, SIP_TCP)
    wait_for(lambda: _rx_stats(rx) >= 28, "packets missing")
    assert rx.signal(signum) == 0, rx.stderr
    summary = json.loads(rx.stdout)
    assert summary["packets_written"] == 28
    check_files(sorted((tmp_path / "out").iterdir()), all_keys(SIP_UDP, SIP_TCP))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_full_disk_is_one_line_and_exit_1(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "stm.cli.recv", "--listen", "udp://127.0.0.1:0", "-w", "/dev/full"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=ENV,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == "stm-recv: cannot write /dev/full: No space left on device"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-w", "/nonexistent/dir/x.pcapng"], "cannot write /nonexistent/dir/x.pcapng"),
        (["-w", "{file}/x.pcapng"], "Not a directory"),
        (["-w", "{dir}"], "Is a directory"),
        (["-w", "/nonexistent/x", "--split-by", "producer"], "no such directory"),
        (["-w", "-", "-C", "1"], "need a file name"),
        (["-w", "-", "-G", "1"], "need a file name"),
        (["-w", "-", "--split-by", "stream"], "need a file name"),
        (["-w", "x", "-W", "3"], "-W needs -C or -G"),
        (["-w", "x", "-C", "lots"], "-C takes millions of bytes"),
        (["-w", "x", "-C", "0"], "less than one byte"),
        (["-w", "x", "-G", "0"], "-G"),
        (["-w", "x", "--split-by", "nf"], "--split-by"),
    ],
)
def test_output_argument_errors_exit_2(tmp_path, args, message):
    (tmp_path / "file").write_text("")
    args = [a.format(file=tmp_path / "file", dir=tmp_path) for a in args]
    result = CliRunner().invoke(recv_cli.main, ["--listen", "udp://127.0.0.1:0", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    if result.output.startswith("stm-recv:"):  # ours; click's own checks show the usage
        assert len(result.output.strip().splitlines()) == 1


def test_stats_at_the_end_and_periodically(tmp_path, procs):
    rx = Receiver(
        procs,
        tmp_path,
        "-w",
        str(tmp_path / "out" / "st.pcapng"),
        "--stats-interval",
        "0.2",
    )
    sent = send_reports(rx.url, SIP_UDP, "amf-1", 5)
    wait_for(lambda: re.search(r"\b11 packets written", rx.stderr), "no periodic stats line")
    junk = subprocess.run(  # one malformed report, counted per source
        [
            sys.executable,
            "-c",
            "import socket,sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
            ".sendto(b'junk', ('127.0.0.1', int(sys.argv[1])))",
            rx.url.rsplit(":", 1)[1],
        ],
        timeout=30,
    )
    assert junk.returncode == 0
    wait_for(lambda: "malformed from 127.0.0.1: 1" in rx.stderr, "malformed not counted")
    assert rx.signal() == 0, rx.stderr
    err = rx.stderr
    periodic = re.findall(r"stm-recv: stats after [\d.]+ s: (\d+) packets written", err)
    assert len(periodic) >= 3 and periodic[-1] == "11"
    line = re.search(
        r"stream amf-1/5: packets 11, bytes (\d+), reports (\d+), lost 0, duplicated 0, "
        r"reordered 0",
        err,
    )
    assert line, err
    assert int(line.group(1)) == sent  # every byte sent came in
    assert "malformed 1" in err
    assert "stm-recv: 11 packets from" in err  # the summary follows


def test_stats_flag_prints_the_table_once_at_the_end(tmp_path, procs):
    rx = Receiver(procs, tmp_path, "-w", str(tmp_path / "out" / "st.pcapng"), "--stats", "--json")
    send(rx.url, SIP_TCP, producer="smf")
    wait_for(lambda: _written(tmp_path) >= 17, "packets missing")
    assert rx.signal() == 0, rx.stderr
    err = rx.stderr
    assert err.count("stm-recv: stats after") == 1
    assert re.search(r"  stream smf/\d+: packets 17, bytes \d+, reports \d+, lost 0", err)
    summary = json.loads(rx.stdout)
    assert summary["packets_written"] == 17
    for key in ("output", "rejected_connections", "auth_rejected", "malformed", "rejected"):
        assert key in summary
    (stream,) = summary["streams"].values()
    assert stream["bytes"] == summary["bytes"] > 0
