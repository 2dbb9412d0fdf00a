"""stm-send and stm-recv with format B (generic TLV, HEP3 profile) over real UDP and TCP
sockets on 127.0.0.1: exact round trips, concurrent TCP producers, auto-detection, a
collector that is down or fed garbage, the HEP auth key, and argument errors."""

from __future__ import annotations

import contextlib
import functools
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

from stm import pcapng
from stm.cli import recv as recv_cli
from stm.cli import send as send_cli
from stm.pcapng import Writer
from stm.pcapng import constants as c

ROOT = Path(__file__).parents[1]
SAMPLES = sorted((ROOT / "samples").glob("*.pcap*"))
SIP_UDP = ROOT / "samples" / "sip_udp_ipv4.pcap"  # 11 packets
SIP_TCP = ROOT / "samples" / "sip_tcp_ipv4.pcap"  # 17 packets
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TSHARK = shutil.which("tshark")
TSHARK_FIELDS = ("frame.time_epoch", "frame.len", "frame.cap_len", "frame.comment")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nobody listens on right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """stm-recv in a subprocess; stdout and stderr go to files so every wait is bounded."""

    def __init__(self, procs, out: Path, *args: str, listen=("udp://127.0.0.1:0",)) -> None:
        self.out = out
        self.stdout_path = out.with_suffix(".stdout")
        self.stderr_path = out.with_suffix(".stderr")
        listens = [x for url in listen for x in ("--listen", url)]
        with open(self.stdout_path, "wb") as so, open(self.stderr_path, "wb") as se:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stm.cli.recv", *listens, "-w", str(out), "--json", *args],
                stdout=so,
                stderr=se,
                cwd=ROOT,
                env=ENV,
            )
        procs.append(self.proc)
        deadline = time.monotonic() + 20
        while True:
            self.urls = re.findall(r"listening on ((?:udp|tcp)://\S+)", self.stderr)
            if len(self.urls) == len(listen):
                break
            assert self.proc.poll() is None, f"stm-recv exited early: {self.stderr}"
            assert time.monotonic() < deadline, f"stm-recv did not start: {self.stderr}"
            time.sleep(0.02)
        self.url = self.urls[0]
        self.port = int(self.url.rsplit(":", 1)[1])

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def finish(self, timeout: float = 30) -> dict:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"stm-recv did not finish in {timeout} s: {self.stderr}")
        assert self.proc.returncode == 0, self.stderr
        return json.loads(self.stdout)

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        return self.finish()


def send_args(url: str, files, *extra: str) -> list[str]:
    files = [str(f) for f in files]
    return [sys.executable, "-m", "stm.cli.send", *files, "--to", url, "--json", *extra]


def send(url: str, *files, extra=(), fmt: str = "tlv") -> tuple[dict, str]:
    """Run stm-send to the end; its JSON summary and its stderr."""
    result = subprocess.run(
        send_args(url, files, "--format", fmt, *extra),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def count(path) -> int:
    return sum(1 for _ in pcapng.read(path))


def by_producer(path) -> dict[str, list]:
    """The packets of an stm-recv output, grouped by producer (``producer/stream/if``)."""
    out: dict[str, list] = {}
    for p in pcapng.read(path):
        out.setdefault(p.interface.name.split("/")[0], []).append(p)
    return out


def same(a, b) -> bool:
    return [(p.key(), p.options) for p in a] == [(p.key(), p.options) for p in b]


# -- a generated multi-linktype file --------------------------------------------------------

SIP = (
    b"OPTIONS sip:tracker.example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5060\r\n"
    b"Call-ID: gen-%d@example.com\r\nCSeq: %d OPTIONS\r\nContent-Length: 0\r\n\r\n"
)


def _frames(i: int) -> dict[int, bytes]:
    """One frame per link type for packet ``i``: IP/UDP or IP/TCP SIP, or junk."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import CookedLinux, Ether

    sip = SIP % (i, i)
    ip4 = IP(src="192.0.2.10", dst="198.51.100.20", id=i)
    ip6 = IPv6(src="2001:db8::10", dst="2001:db8::20")
    eth = Ether(src="00:00:5e:00:53:0a", dst="00:00:5e:00:53:14")
    l4 = UDP(sport=5060, dport=5060) if i % 2 else TCP(sport=49152, dport=5060, flags="PA", seq=i)
    return {
        c.LINKTYPE_ETHERNET: bytes(eth / ip4 / l4 / sip),
        c.LINKTYPE_RAW: bytes((ip6 if i % 3 else ip4) / l4 / sip),
        c.LINKTYPE_LINUX_SLL: bytes(CookedLinux(pkttype=i % 5, proto=0x86DD) / ip6 / l4 / sip),
        c.LINKTYPE_IPV6: bytes(ip6 / l4 / sip),
    }


def multi_linktype_file(path: Path, bo: str) -> None:
    """Interfaces of link types 1, 101, 113, 229 at ns, us, base-2 and ms resolution with
    time offsets; packets with comments, flags, options, cut frames and junk frames."""
    with open(path, "wb") as f:
        w = Writer(f, byte_order=bo, options=[(c.OPT_COMMENT, f"generated {bo}")])
        ifaces = [
            (c.LINKTYPE_ETHERNET, w.add_interface(1, 65535, name="eth0", tsresol=9)),
            (c.LINKTYPE_RAW, w.add_interface(101, 0, name="raw", tsresol=6, tsoffset=1000)),
            (
                c.LINKTYPE_LINUX_SLL,
                w.add_interface(
                    113, 262144, name="any", tsresol=0x80 | 20, tsoffset=-3600,
                    options=[(c.IF_DESCRIPTION, "cooked"), (c.OPT_COMMENT, "idb comment")],
                ),
            ),
            (c.LINKTYPE_IPV6, w.add_interface(229, 1500, tsresol=3)),
        ]  # fmt: skip
        units = {0: 10**9, 1: 10**6, 2: 1 << 20, 3: 1000}
        for i in range(160):
            ifid = i % 4
            linktype = ifaces[ifid][0]
            data = _frames(i)[linktype]
            origlen = len(data)
            if i % 7 == 3:  # cut at the snap length: origlen says how long it was
                data = data[: 40 + i % 30]
            elif i % 11 == 5:  # not IP at all
                data = bytes((i * k) & 0xFF for k in range(1, 30 + i))
                origlen = len(data)
            ts = 1_767_225_600 * units[ifid] + i * 12_345 * units[ifid] // 1_000_000 + i
            comments = [f"packet {i}", "ünïcødé ✓"][: i % 3]
            options = [(c.EPB_DROPCOUNT, i), (c.EPB_QUEUE, 2)] if i % 5 == 0 else []
            flags = (1 + i % 2) | (i % 4) << 5 if i % 3 else None
            w.write_packet(
                ifid, ts, data, origlen=origlen, flags=flags, comments=comments, options=options
            )
        w.flush()


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("gen")
    files = []
    for name, bo in (("gen_le.pcapng", "<"), ("gen_be.pcapng", ">")):
        multi_linktype_file(base / name, bo)
        files.append(base / name)
    return files


@functools.cache
def tshark_rows(path: str, *, by_interface: bool = False) -> list[tuple[str, ...]]:
    """The TSHARK_FIELDS of every frame (and its interface name, if asked)."""
    fields = (*TSHARK_FIELDS, "frame.interface_name") if by_interface else TSHARK_FIELDS
    args = [TSHARK, "-r", path, "-T", "fields", *(x for f in fields for x in ("-e", f))]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [tuple(line.split("\t")) for line in result.stdout.splitlines()]


# -- 1. exact round trips --------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_every_sample_and_a_generated_file_round_trip_exactly(
    tmp_path, procs, generated, transport
):
    files = [*SAMPLES, *generated]
    total = sum(count(f) for f in files)
    rx = Receiver(
        procs,
        tmp_path / "out.pcapng",
        "--format", "tlv", "--count", str(total), "--duration", "50",
        listen=(f"{transport}://127.0.0.1:0",),
    )  # fmt: skip
    assert rx.url.startswith(f"{transport}://127.0.0.1:")
    for i, f in enumerate(files):
        summary, _ = send(rx.url, f, extra=("--producer", f"p{i}", "--rate", "20000"))
        assert summary["packets"] == count(f)
        assert summary["dropped"] == summary["truncated"] == 0  # the jumbo one is fragmented
        if transport == "tcp":
            (dest,) = summary["destinations"].values()
            assert dest["sent"] == summary["reports"] and dest["undelivered"] == 0
    stats = rx.finish()
    assert stats["packets_written"] == total
    assert stats["lost"] == stats["malformed"] == stats["duplicates"] == stats["rejected"] == 0
    got = by_producer(rx.out)
    assert set(got) == {f"p{i}" for i in range(len(files))}
    for i, f in enumerate(files):
        assert same(got[f"p{i}"], list(pcapng.read(f))), f.name
    if TSHARK:
        rows = tshark_rows(str(rx.out), by_interface=True)
        for i, f in enumerate(files):
            mine = [r[:-1] for r in rows if r[-1].split("/")[0] == f"p{i}"]
            assert mine == tshark_rows(str(f)), f.name


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_80k_frame_is_fragmented_and_rebuilt(tmp_path, procs, corpus_dir, transport):
    big = corpus_dir / "real" / "bigtcp_80k.pcap"
    want = list(pcapng.read(big))
    assert max(p.caplen for p in want) > 65535  # more than one TCP message can hold
    rx = Receiver(
        procs,
        tmp_path / "out.pcapng",
        "--format", "tlv", "--count", str(len(want)), "--duration", "50",
        listen=(f"{transport}://127.0.0.1:0",),
    )  # fmt: skip
    summary, _ = send(rx.url, big, extra=("--rate", "5000"))
    assert summary["fragmented"] >= 1
    assert summary["reports"] > summary["packets"]
    stats = rx.finish()
    assert stats["packets_written"] == len(want)
    assert stats["fragments_expired"] == stats["malformed"] == 0
    assert same(list(pcapng.read(rx.out)), want)
    if TSHARK:
        assert tshark_rows(str(rx.out)) == tshark_rows(str(big))


# -- 2. concurrent TCP producers ------------------------------------------------------------


def test_three_tcp_senders_at_once_into_one_receiver(tmp_path, procs):
    repeat = 150
    per_sender = repeat * count(SIP_TCP)
    rx = Receiver(
        procs,
        tmp_path / "out.pcapng",
        "--format", "tlv", "--count", str(3 * per_sender), "--duration", "50",
        listen=("tcp://127.0.0.1:0",),
    )  # fmt: skip
    senders = []
    for name in ("amf-1", "smf-2", "upf-3"):
        args = send_args(rx.url, [SIP_TCP] * repeat, "--format", "tlv", "--producer", name)
        p = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV
        )
        procs.append(p)
        senders.append((name, p))
    for name, p in senders:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        summary = json.loads(out)
        assert summary["packets"] == per_sender, name
        (dest,) = summary["destinations"].values()
        assert dest["sent"] == per_sender and dest["undelivered"] == dest["dropped"] == 0
    stats = rx.finish()
    assert stats["packets_written"] == 3 * per_sender
    assert stats["lost"] == stats["duplicates"] == stats["malformed"] == 0
    streams = stats["streams"]
    assert len(streams) == 3
    assert {s.split("/")[0] for s in streams} == {"amf-1", "smf-2", "upf-3"}
    assert all(s["packets"] == per_sender for s in streams.values())
    want = list(pcapng.read(SIP_TCP)) * repeat
    got = by_producer(rx.out)
    assert set(got) == {"amf-1", "smf-2", "upf-3"}
    for name, packets in got.items():
        assert same(packets, want), name


# -- 3. auto-detection on UDP ----------------------------------------------------------------


def test_auto_format_takes_gre_and_tlv_senders_on_one_port(tmp_path, procs):
    files = {"gre": SIP_UDP, "tlv": ROOT / "samples" / "sip_tcp_ipv6.pcapng"}
    total = sum(count(f) for f in files.values())
    rx = Receiver(
        procs, tmp_path / "out.pcapng", "--format", "auto", "--count", str(total),
        "--duration", "50",
    )  # fmt: skip
    for fmt, f in files.items():
        summary, _ = send(rx.url, f, fmt=fmt, extra=("--producer", f"via-{fmt}"))
        assert summary["packets"] == count(f)
    stats = rx.finish()
    assert stats["packets_written"] == total
    got = by_producer(rx.out)
    for fmt, f in files.items():
        assert same(got[f"via-{fmt}"], list(pcapng.read(f))), fmt


def test_auto_format_mixed_senders_at_once(tmp_path, procs):
    files = {"gre": SIP_UDP, "tlv": ROOT / "samples" / "sip_tcp_ipv6.pcapng"}
    repeat = 20
    total = repeat * sum(count(f) for f in files.values())
    rx = Receiver(
        procs, tmp_path / "out.pcapng", "--format", "auto", "--count", str(total),
        "--duration", "50",
    )  # fmt: skip
    both = [
        subprocess.Popen(
            send_args(rx.url, [f] * repeat, "--format", fmt, "--producer", f"mix-{fmt}",
                      "--rate", "5000"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=ENV,
        )
        for fmt, f in files.items()
    ]  # fmt: skip
    procs.extend(both)
    for p in both:
        assert p.wait(60) == 0
    stats = rx.finish()
    assert stats["packets_written"] == total and stats["malformed"] == 0
    got = by_producer(rx.out)
    for fmt, f in files.items():
        assert same(got[f"mix-{fmt}"], list(pcapng.read(f)) * repeat), fmt


# -- 4. a TCP collector that is down, or fed garbage -----------------------------------------


def test_sender_waits_for_a_collector_that_starts_late(tmp_path, procs):
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    files = [SIP_UDP, SIP_TCP]
    n = sum(count(f) for f in files)
    sender = subprocess.Popen(
        send_args(url, files, "--format", "tlv", "--drain-timeout", "20"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV,
    )  # fmt: skip
    procs.append(sender)
    time.sleep(1.0)
    assert sender.poll() is None  # still waiting for the collector
    rx = Receiver(
        procs, tmp_path / "out.pcapng", "--format", "tlv", "--count", str(n),
        "--duration", "40", listen=(url,),
    )  # fmt: skip
    out, err = sender.communicate(timeout=40)
    assert sender.returncode == 0, err
    assert "cannot connect" in err
    summary = json.loads(out)
    dest = summary["destinations"][url]
    assert dest["sent"] == n and dest["undelivered"] == dest["dropped"] == 0
    assert rx.finish()["packets_written"] == n
    assert same(list(pcapng.read(rx.out)), [p for f in files for p in pcapng.read(f)])


def _wait_closed(sock: socket.socket, timeout: float = 10) -> None:
    """Until the peer closes (or resets) the connection."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(4096):
                return
        except ConnectionResetError:
            return
    pytest.fail("stm-recv kept a garbage connection open")


def test_garbage_connection_is_rejected_and_real_capture_still_written(tmp_path, procs):
    n = count(SIP_TCP)
    rx = Receiver(
        procs, tmp_path / "out.pcapng", "--format", "tlv", "--count", str(n),
        "--duration", "40", listen=("tcp://127.0.0.1:0",),
    )  # fmt: skip
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3, b"HEP3\x00\x03garbage"):
        with socket.create_connection(("127.0.0.1", rx.port), timeout=10) as s:
            s.sendall(junk)
            _wait_closed(s)
    summary, _ = send(rx.url, SIP_TCP)
    assert summary["destinations"][rx.url]["sent"] == n
    stats = rx.finish()
    assert stats["packets_written"] == n
    assert stats["rejected_connections"] == 2
    assert same(list(pcapng.read(rx.out)), list(pcapng.read(SIP_TCP)))


# -- 5. the HEP auth key ---------------------------------------------------------------------

KEY = "Kx9-stm-auth-secret-7f1c9e2a"


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_auth_key_admits_only_the_right_key_and_is_never_shown(tmp_path, procs, transport):
    right, wrong = tmp_path / "right.key", tmp_path / "wrong.key"
    right.write_text(KEY + "\n")
    wrong.write_text("Kx9-some-other-secret-00000000\n")
    n = count(SIP_UDP)
    rx = Receiver(
        procs,
        tmp_path / "out.pcapng",
        "--format", "tlv", "--auth-key-file", str(right), "--flush-interval", "0", "-vv",
        listen=(f"{transport}://127.0.0.1:0",),
    )  # fmt: skip
    outputs = []
    for producer, key in (("wrong", wrong), ("nokey", None), ("right", right)):
        extra = ["--producer", producer, "-vv"]
        if key is not None:
            extra += ["--auth-key-file", str(key)]
        summary, err = send(rx.url, SIP_UDP, extra=extra)
        assert summary["packets"] == n
        outputs += [json.dumps(summary), err]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(pcapng.MalformedPcapng):
            if count(rx.out) >= n:
                break
        time.sleep(0.05)
    time.sleep(0.5)  # let anything still in flight reach the decoder
    stats = rx.stop()
    assert stats["packets_written"] == n
    assert stats["auth_rejected"] == 2 * n
    assert {s.split("/")[0] for s in stats["streams"]} == {"right"}
    assert set(by_producer(rx.out)) == {"right"}
    assert same(list(pcapng.read(rx.out)), list(pcapng.read(SIP_UDP)))
    outputs += [rx.stdout, rx.stderr]
    for text in outputs:
        assert KEY not in text
    assert KEY.encode() not in rx.out.read_bytes()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_wrong_or_missing_key_writes_nothing(tmp_path, procs, transport):
    right, wrong = tmp_path / "right.key", tmp_path / "wrong.key"
    right.write_text(KEY)
    wrong.write_text(KEY[:-1] + "X")  # one character off
    n = count(SIP_UDP)
    rx = Receiver(
        procs, tmp_path / "out.pcapng", "--format", "tlv", "--auth-key-file", str(right),
        listen=(f"{transport}://127.0.0.1:0",),
    )  # fmt: skip
    send(rx.url, SIP_UDP, extra=("--auth-key-file", str(wrong)))
    send(rx.url, SIP_UDP)
    deadline = time.monotonic() + 5
    while "wrong HEP auth key" not in rx.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    stats = rx.stop()
    assert stats["packets_written"] == 0 and stats["streams"] == {}
    assert stats["auth_rejected"] == 2 * n
    assert count(rx.out) == 0
    assert KEY not in rx.stderr + rx.stdout
    assert KEY.encode() not in rx.out.read_bytes()


# -- 6. argument errors ----------------------------------------------------------------------


def _one_line_exit_2(result, prog: str, message: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"{prog}: error: ") and message in lines[0], lines[0]


def test_unreadable_auth_key_file_is_a_usage_error(tmp_path):
    missing = tmp_path / "no-such.key"
    result = CliRunner().invoke(
        send_cli.main,
        [str(SIP_UDP), "--format", "tlv", "--to", "udp://127.0.0.1:9",
         "--auth-key-file", str(missing)],
    )  # fmt: skip
    _one_line_exit_2(result, "stm-send", "--auth-key-file: cannot read")
    result = CliRunner().invoke(
        recv_cli.main,
        ["--format", "tlv", "--listen", "udp://127.0.0.1:0", "-w", str(tmp_path / "x.pcapng"),
         "--auth-key-file", str(missing)],
    )  # fmt: skip
    _one_line_exit_2(result, "stm-recv", "--auth-key-file: cannot read")


def test_argument_errors_from_the_real_commands(tmp_path):
    """The same errors from the installed entry points' modules, as a user sees them."""
    cases = [
        (["stm.cli.send", str(SIP_UDP), "--format", "gre", "--to", "sctp://127.0.0.1:9"],
         "stm-send: error:"),
        (["stm.cli.recv", "--format", "gre", "--listen", "tls://127.0.0.1:0", "-w",
          str(tmp_path / "x.pcapng")], "needs a certificate"),
        (["stm.cli.recv", "--format", "tlv", "--listen", "tcp://127.0.0.1:0", "-w",
          str(tmp_path / "x.pcapng"), "--auth-key-file", str(tmp_path)], "auth-key-file"),
    ]  # fmt: skip
    for args, message in cases:
        r = subprocess.run(
            [sys.executable, "-m", *args], capture_output=True, text=True, timeout=30,
            cwd=ROOT, env=ENV,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr
        assert r.stdout == ""
