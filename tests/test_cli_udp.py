"""stm-send and stm-recv end to end through real UDP sockets on 127.0.0.1."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pcapng as oracle  # python-pcapng, an independent reader
import pytest
from click.testing import CliRunner
from helpers import Receiver, send

from stm import pcapng
from stm.cli import recv as recv_cli
from stm.cli import send as send_cli
from stm.pcapng import Writer

SAMPLES = sorted((Path(__file__).parents[1] / "samples").glob("*.pcap*"))
SIP_UDP = Path(__file__).parents[1] / "samples" / "sip_udp_ipv4.pcap"  # 11 packets


def oracle_packets(path: Path):
    """(bytes, caplen, origlen, timestamp in ns, comments) as python-pcapng reads them."""
    out = []
    with open(path, "rb") as f:
        scanner = oracle.FileScanner(f)
        for block in scanner:
            if isinstance(block, oracle.blocks.EnhancedPacket):
                res = block.interface.timestamp_resolution
                units = round(1 / res) if res else 10**6
                comments = tuple(block.options.get_all("opt_comment"))
                out.append(
                    (
                        bytes(block.packet_data),
                        block.captured_len,
                        block.packet_len,
                        block.timestamp_high << 32 | block.timestamp_low,
                        units,
                        comments,
                    )
                )
    return out


def ours(path):
    return [(bytes(p.data), p.caplen, p.origlen, p.time_ns, p.comments) for p in pcapng.read(path)]


def as_ns(rows):
    return [(d, c, o, ts * 10**9 // units, cm) for d, c, o, ts, units, cm in rows]


def test_samples_round_trip_through_loopback(tmp_path):
    total = sum(1 for s in SAMPLES for _ in pcapng.read(s))
    rx = Receiver(tmp_path / "out.pcapng", "--count", str(total), "--duration", "60")
    for sample in SAMPLES:
        summary = send(rx.url, sample, extra=("--producer", sample.stem))
        assert summary["packets"] == sum(1 for _ in pcapng.read(sample))
    stats = rx.finish()
    assert stats["packets_written"] == total and stats["lost"] == 0 and stats["malformed"] == 0
    got = as_ns(oracle_packets(rx.out))
    want = [row for s in SAMPLES for row in ours(s)]
    assert sorted(got) == sorted(want)
    names = {i.name for i in pcapng.read_events(rx.out) if isinstance(i, pcapng.Interface)}
    assert {n.split("/")[0] for n in names} == {s.stem for s in SAMPLES}


def multi_interface_file(path: Path, bo: str) -> None:
    with open(path, "wb") as f:
        w = Writer(f, byte_order=bo, options=[(1, "generated")])
        w.add_interface(113, 262144, name="any", tsresol=6)
        w.add_interface(1, 65535, name="eth0", tsresol=9)
        w.add_interface(101, 0, name="raw", tsresol=0x80 | 20, tsoffset=1000)
        w.add_interface(229, 1500, name="v6", tsresol=3)
        for i in range(200):
            ifid = (i * 7) % 4
            data = bytes((i + k) & 0xFF for k in range(40 + i * 13 % 1400))
            w.write_packet(
                ifid,
                1_700_000_000 * (10**9 if ifid == 1 else 10**6 if ifid == 0 else 1000) + i
                if ifid != 2
                else (1_700_000_000 << 20) + i,
                data,
                origlen=len(data) + (i % 3) * 10,
                flags=(i % 4) or None,
                comments=[f"packet {i}"] * (i % 3),
            )
        w.write_packet(1, 2**64 - 1, b"\xff" * 60)  # microsecond stamp near 1.8e13 s in ns
        w.flush()


@pytest.mark.parametrize("bo", ["<", ">"])
def test_generated_multi_linktype_file_is_rebuilt_exactly(tmp_path, bo):
    src = tmp_path / "in.pcapng"
    multi_interface_file(src, bo)
    rx = Receiver(tmp_path / "out.pcapng", "--count", "201", "--duration", "60")
    send(rx.url, src, extra=("--mtu", "9000"))
    assert rx.finish()["packets_written"] == 201
    a = [(p.key(), p.options) for p in pcapng.read(src)]
    b = [(p.key(), p.options) for p in pcapng.read(rx.out)]
    assert a == b
    if shutil.which("tshark"):
        fields = [
            "-T",
            "fields",
            "-e",
            "frame.time_epoch",
            "-e",
            "frame.len",
            "-e",
            "frame.cap_len",
            "-e",
            "frame.comment",
        ]
        want = subprocess.run(["tshark", "-r", src, *fields], capture_output=True, text=True)
        got = subprocess.run(["tshark", "-r", rx.out, *fields], capture_output=True, text=True)
        assert got.returncode == 0 and got.stdout == want.stdout


def test_jumbo_frames_come_back_byte_for_byte(tmp_path, corpus_dir):
    files = [corpus_dir / "real" / n for n in ("bigtcp_80k.pcap", "sip_jumbo_rawip4.pcap")]
    files.append(corpus_dir / "real" / "5gc_roaming_lbo.pcapng")
    total = sum(1 for f in files for _ in pcapng.read(f))
    rx = Receiver(tmp_path / "out.pcapng", "--count", str(total), "--duration", "60")
    for f in files:
        summary = send(rx.url, f, extra=("--producer", f.stem, "--rate", "20000"))
    assert summary["fragmented"] > 0
    assert rx.finish()["packets_written"] == total
    want = sorted(p.key() for f in files for p in pcapng.read(f))
    got = sorted(p.key() for p in pcapng.read(rx.out))
    assert got == want


def test_garbage_is_counted_and_does_not_stop_the_receiver(tmp_path):
    rx = Receiver(tmp_path / "out.pcapng", "--count", "11", "--duration", "60")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for junk in (
        b"",
        b"\x00",
        b"garbage" * 10,
        b"\x30\x00\x88\xb5" + b"\x00" * 30,
        b"\x01\x00\x88\xb5hello",
    ):
        s.sendto(junk, ("127.0.0.1", rx.port))
    time.sleep(0.2)
    send(rx.url, SIP_UDP)
    stats = rx.finish()
    assert stats["packets_written"] == 11
    assert stats["malformed"] >= 4
    assert len(list(pcapng.read(rx.out))) == 11


def test_sigterm_flushes_and_exits_zero(tmp_path):
    rx = Receiver(tmp_path / "out.pcapng")
    send(rx.url, *SAMPLES)
    time.sleep(0.5)
    stats = rx.stop()
    assert stats["packets_written"] == sum(1 for s in SAMPLES for _ in pcapng.read(s))
    assert len(list(pcapng.read(rx.out))) == stats["packets_written"]


def test_duration_stops_an_idle_receiver(tmp_path):
    rx = Receiver(tmp_path / "out.pcapng", "--duration", "0.3")
    assert rx.finish()["packets_written"] == 0
    events = list(pcapng.read_events(rx.out))
    assert len(events) == 1  # just the section header: a valid, empty pcapng


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope.pcap", "--to", "udp://127.0.0.1:1"], "cannot read nope.pcap"),
        (["README.md", "--to", "udp://127.0.0.1:1"], "not a pcap or pcapng file"),
        ([str(SAMPLES[0]), "--to", "ftp://x:1"], "scheme must be one of udp://"),
        ([str(SAMPLES[0]), "--to", "udp://:1"], "no host"),
        ([str(SAMPLES[0]), "--to", "udp://127.0.0.1:99999"], "bad URL"),
        ([str(SAMPLES[0]), "--to", "udp://127.0.0.1:1", "--stream-id", "x"], "--stream-id"),
        ([str(SAMPLES[0]), "--to", "udp://no-such-host.invalid:1"], "cannot resolve"),
        ([str(SAMPLES[0]), "--to", "udp://127.0.0.1:1", "--mtu", "100"], "--mtu"),
        ([str(SAMPLES[0])], "--to"),
    ],
)
def test_send_argument_errors_are_one_line_with_exit_2(args, message, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    result = CliRunner().invoke(send_cli.main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "udp://127.0.0.1:0", "-w", "/nonexistent/dir/x.pcapng"], "cannot write"),
        (["--listen", "tcp:/x", "-w", "x"], "bad URL"),
        (["-w", "x"], "--listen"),
        (["--listen", "udp://127.0.0.1:0", "-w", "x", "--count", "0"], "--count"),
    ],
)
def test_recv_argument_errors_are_one_line_with_exit_2(args, message):
    result = CliRunner().invoke(recv_cli.main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_version():
    for cmd in (send_cli.main, recv_cli.main):
        result = CliRunner().invoke(cmd, ["--version"])
        assert result.exit_code == 0 and "0.1.0" in result.output


def test_send_reads_stdin(tmp_path):
    rx = Receiver(tmp_path / "out.pcapng", "--count", "11", "--duration", "30")
    data = SIP_UDP.read_bytes()
    subprocess.run(
        [sys.executable, "-m", "stm.cli.send", "-", "--to", rx.url, "-q"],
        input=data,
        check=True,
        timeout=30,
    )
    assert rx.finish()["packets_written"] == len(list(pcapng.read(io.BytesIO(data))))
