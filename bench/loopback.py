"""End to end over loopback: the real ``stm-send`` and ``stm-recv`` as subprocesses.

For each case a receiver (``stm-recv --listen udp|tcp://127.0.0.1:0 --count N --json``)
starts first; once it logs ``listening on ...`` the sender (``stm-send --json``) sends an
N-packet capture (the pcapng benchmark's generated input, ``--packets`` of ``--size``
bytes) to it. Measured per run:

* the sender's wall time (process start to exit, interpreter start-up included) and CPU;
* end to end: packets written by the receiver / (its exit - the sender's start). A
  receiver that never reaches ``--count`` (loss) is stopped once it has been idle for
  ``IDLE_SECONDS`` after the sender ended, and its last busy moment (from
  ``/proc/PID/schedstat``) ends the interval instead;
* loss: packets in the capture - packets written;
* the sender's and the receiver's peak RSS: ``VmHWM`` of ``/proc/PID/status``, sampled
  every 20 ms (not ``ru_maxrss``: a child's counts the parent's RSS at the fork), and
  ``VmRSS`` over the run (to tell a leak from a high start).

Cases: format A over UDP, format B over UDP, format B over TCP (stm-send's default
``--queue-policy``, which is now ``block`` too, and ``block``), each ``--repeat`` times,
interleaved; then the UDP cases again with ``--rate`` at ``--rate-fraction`` of the
unlimited rate;
then the memory case: a capture of about ``--memory-gb`` GB (``--memory-gb`` x 1,000,000
packets of ~1,000 bytes, generated once into bench/data/) sent by format A over UDP at full
speed, where both sides' peak RSS must stay under ``RSS_LIMIT_MB``.
References in the same run: ``tcpreplay --topspeed -i lo`` of the same capture rewritten
to a local UDP sink, and ``sngrep`` replaying a SIP capture as HEP3 into
``stm-recv --format tlv`` beside ``stm-send --format tlv`` of the same capture.

Every process has a bounded run time (``--timeout``) and the receiver is always stopped
(SIGTERM, then SIGKILL).

``python -m bench.loopback sink HOST PORT COUNT TIMEOUT`` is the UDP sink of the
tcpreplay reference (it counts datagrams and prints JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import stm.pcapng as sp
from bench.common import DATA_DIR, Row, log
from bench.pcapng import GEN_VERSION, LINKTYPE_ETHERNET, SNAPLEN, dataset, frame, timestamp

NAME = "loopback"
ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PRODUCER = "bench"

# Targets from the issues.
UDP_A_TARGET = 100_000  # format A over UDP, end to end, with zero loss
TCP_TARGET = 200_000  # format B over TCP, end to end, with zero loss
VS_SNGREP = 3.0  # stm-send's HEP rate / sngrep's, same SIP capture
RSS_LIMIT_MB = 100.0  # peak RSS of stm-send and of stm-recv, each, for the memory case
MEMORY_SIZE = 1000  # mean frame size of the memory case's capture
MEMORY_PACKETS_PER_GB = 1_000_000  # ~1,034 bytes per packet block: ~1.03 GB per unit

BLOCK_LABEL = "format B, TCP, --queue-policy block"
START_TIMEOUT = 15.0  # longest a receiver may take to say it is listening
IDLE_SECONDS = 1.0  # a receiver idle this long after its sender ended has all it will get
BUSY_NS = 2_000_000  # CPU per SAMPLE_SECONDS above which a receiver counts as busy
SAMPLE_SECONDS = 0.02
GRACE = 5.0  # SIGTERM to SIGKILL
TCPREPLAY_SRC = "198.51.100.1"  # source address given to the replayed packets: not local


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {value}")
    return value


def _has(parser: argparse.ArgumentParser, option: str) -> bool:
    return option in parser._option_string_actions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark. Under ``all``, ``--packets``, ``--size`` and
    ``--no-refs`` are those the pcapng benchmark defines (so ``--packets`` defaults to its
    1,000,000 there)."""
    if not _has(parser, "--packets"):
        parser.add_argument(
            "--packets", type=_positive, default=200_000, help="packets in the capture sent"
        )
    if not _has(parser, "--size"):
        parser.add_argument("--size", type=_positive, default=300, help="mean frame size")
    if not _has(parser, "--no-refs"):
        parser.add_argument("--no-refs", action="store_true", help="time only stm")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="longest any one sender or receiver may run (loopback; default: 120 s, or "
        "1 s per 2,000 packets if longer)",
    )
    parser.add_argument(
        "--rate-fraction",
        type=_fraction,
        default=0.7,
        metavar="F",
        help="the paced runs send at F times the best unlimited rate (loopback)",
    )
    parser.add_argument(
        "--memory-gb",
        type=float,
        default=1.0,
        metavar="GB",
        help="memory case: send a capture of about GB gigabytes (GB x 1,000,000 packets of "
        "~1,000 bytes, cached in bench/data) and check both sides' peak RSS < 100 MB; "
        "0: skip (loopback)",
    )
    parser.add_argument(
        "--sngrep-dialogs",
        type=int,
        default=1000,
        metavar="K",
        help="Call-IDs in the SIP capture replayed by sngrep; 0: the benchmark capture "
        "itself, one dialog per packet, with sngrep -R (loopback)",
    )


# -- processes ------------------------------------------------------------------------------


class Child:
    """A subprocess reaped by a thread of its own: exact exit time and its own rusage.

    The thread waits with ``WNOWAIT`` and then reaps under a lock, and ``signal`` only
    sends while the child is unreaped, so a signal can never reach a recycled PID.
    """

    def __init__(self, name: str, cmd: Sequence[str], scratch: Path) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.out_path = scratch.with_name(f"{scratch.name}.{name}.out")
        self.err_path = scratch.with_name(f"{scratch.name}.{name}.err")
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in close()
        self._err = open(self.err_path, "wb")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self.exited = threading.Event()
        self.ended: float | None = None
        self.returncode: int | None = None
        self.rusage: Any = None
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err
        )
        self.pid = self.proc.pid
        self._thread = threading.Thread(target=self._reap, name=f"reap {name}", daemon=True)
        self._thread.start()

    def _reap(self) -> None:
        try:
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
            ended = time.monotonic()
            with self._lock:
                _, status, ru = os.wait4(self.pid, 0)
                self.rusage = ru
                self.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped elsewhere: no rusage
            ended = time.monotonic()
            with self._lock:
                self.returncode = -1
        self.ended = ended
        self.proc.returncode = self.returncode
        self.exited.set()

    def signal(self, sig: int) -> None:
        with self._lock:
            if self.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)

    def read_proc(self, name: str) -> str | None:
        """``/proc/PID/<name>`` while the child is not reaped (else None)."""
        with self._lock:
            if self.returncode is not None:
                return None
            try:
                with open(f"/proc/{self.pid}/{name}") as f:
                    return f.read()
            except OSError:
                return None

    def wait(self, timeout: float | None) -> bool:
        return self.exited.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after GRACE seconds; returns once the child is reaped."""
        if self.exited.is_set():
            return
        self.signal(signal.SIGTERM)
        if not self.wait(GRACE):
            log(f"  {self.name} ignored SIGTERM for {GRACE:g} s: SIGKILL")
            self.signal(signal.SIGKILL)
            self.wait(GRACE)

    def close(self) -> None:
        self.stop()
        self._out.close()
        self._err.close()
        self.out_path.unlink(missing_ok=True)
        self.err_path.unlink(missing_ok=True)

    @property
    def cpu(self) -> float | None:
        ru = self.rusage
        return None if ru is None else ru.ru_utime + ru.ru_stime

    @property
    def wall(self) -> float | None:
        return None if self.ended is None else self.ended - self.started

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def json(self) -> dict[str, Any]:
        """The last line of stdout that parses as a JSON object ({} if none)."""
        for line in reversed(self.stdout().splitlines()):
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    return doc
        return {}

    def wait_for(self, pattern: str, timeout: float, *, stream: str = "err") -> re.Match:
        """Poll stdout or stderr for ``pattern``; RuntimeError if the child exits first."""
        end = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.stderr() if stream == "err" else self.stdout())
            if m:
                return m
            if self.exited.is_set() or time.monotonic() > end:
                raise RuntimeError(
                    f"{self.name} did not print {pattern!r} "
                    f"(exit {self.returncode}): {self.stderr().strip()[-500:]}"
                )
            time.sleep(0.01)


class Sampler:
    """Samples a running child: peak VmHWM, VmRSS over time (``trace``: seconds since the
    child started, KiB) and the last moment it was busy on a CPU."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.vmhwm_kib = 0
        self.trace: list[tuple[float, int]] = []
        self.last_busy = child.started
        self._cpu_ns: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and not self.child.exited.is_set():
            now = time.monotonic()
            sched = self.child.read_proc("schedstat")
            if sched:
                cpu_ns = int(sched.split()[0])
                if self._cpu_ns is not None and cpu_ns - self._cpu_ns > BUSY_NS:
                    self.last_busy = now
                self._cpu_ns = cpu_ns
            status = self.child.read_proc("status")
            if status:
                m = re.search(r"^VmHWM:\s+(\d+)", status, re.M)
                if m:
                    self.vmhwm_kib = max(self.vmhwm_kib, int(m.group(1)))
                m = re.search(r"^VmRSS:\s+(\d+)", status, re.M)
                if m:
                    self.trace.append((now - self.child.started, int(m.group(1))))
            self._stop.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)

    @property
    def rss_mb(self) -> float | None:
        return self.vmhwm_kib * 1024 / 1e6 if self.vmhwm_kib else None

    def profile(self, points: int = 5) -> list[tuple[float, float]]:
        """(seconds, VmRSS MB) at ``points`` evenly spaced samples, first and last included."""
        t = self.trace
        if not t:
            return []
        idx = sorted({round(k * (len(t) - 1) / max(1, points - 1)) for k in range(points)})
        return [(t[i][0], t[i][1] * 1024 / 1e6) for i in idx]


def _profile_text(profile: list[tuple[float, float]]) -> str:
    return ", ".join(f"{mb:.0f} MB at {s:.1f} s" for s, mb in profile) or "no samples"


# -- one run --------------------------------------------------------------------------------


@dataclass
class Run:
    """One sender -> receiver run."""

    sent: int  # packets in the capture
    send_wall: float = float("nan")
    send_cpu: float | None = None
    written: int = 0
    e2e: float = float("nan")  # seconds, sender start -> receiver done
    recv_cpu: float | None = None
    send_rss_mb: float | None = None  # peak VmHWM of the sender
    recv_rss_mb: float | None = None  # peak VmHWM of the receiver
    send_rss: list[tuple[float, float]] = field(default_factory=list)  # VmRSS over the run
    recv_rss: list[tuple[float, float]] = field(default_factory=list)
    stopped: bool = False  # the receiver never reached --count
    sender: dict[str, Any] = field(default_factory=dict)
    receiver: dict[str, Any] = field(default_factory=dict)

    @property
    def loss(self) -> int:
        return self.sent - self.written

    @property
    def e2e_pps(self) -> float:
        return self.written / self.e2e if self.e2e == self.e2e and self.e2e > 0 else 0.0

    @property
    def ceiling(self) -> float | None:
        """Packets / the larger of sender and receiver CPU time: the rate on two idle cores."""
        cpus = [c for c in (self.send_cpu, self.recv_cpu) if c]
        return self.sent / max(cpus) if cpus else None

    @property
    def send_pps(self) -> float:
        return self.sent / self.send_wall if self.send_wall == self.send_wall else 0.0


class RunError(RuntimeError):
    """A run that failed; ``run`` holds what was measured until then (peak RSS included)."""

    def __init__(self, message: str, run: Run) -> None:
        super().__init__(message)
        self.run = run


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def run_one(
    label: str,
    recv_args: Sequence[str],
    scheme: str,
    sender_name: str,
    sender_cmd: Callable[[int], list[str]],
    sent: int,
    timeout: float,
    *,
    listen: str | None = None,
    ready: str | None = None,
    scratch_name: str = "scratch-loopback",
) -> Run:
    """Start ``stm-recv``, then the sender against its port; always stop both.

    ``listen`` is stm-recv's ``--listen`` URL (default ``scheme://HOST:0``); the port given
    to ``sender_cmd`` is the one of its ``listening on scheme://HOST:PORT`` line (for
    ``kafka://``, the broker's). ``ready``, if given, is a pattern that stm-recv must also
    print on stderr before the sender starts (a consumer group's assignment, say).
    ``scratch_name`` names the scratch files in bench/data/ (per benchmark, so that two
    benchmarks running at once do not share them).
    """
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    scratch = DATA_DIR / scratch_name
    out = scratch.with_suffix(".pcapng")
    url = listen if listen is not None else f"{scheme}://{HOST}:0"
    cmd = _py("stm.cli.recv", "--listen", url, "-w", str(out), "--json")
    recv = Child("stm-recv", [*cmd, "--count", str(sent), *recv_args], scratch)
    send: Child | None = None
    sampler: Sampler | None = None
    send_sampler: Sampler | None = None
    run = Run(sent)
    try:
        m = recv.wait_for(rf"listening on {scheme}://[^:]+:(\d+)", START_TIMEOUT)
        port = int(m.group(1))
        if ready is not None:
            recv.wait_for(ready, START_TIMEOUT)
        sampler = Sampler(recv)
        send = Child(sender_name, sender_cmd(port), scratch)
        send_sampler = Sampler(send)
        if not send.wait(timeout):
            send.stop()
            raise RunError(f"{label}: {sender_name} did not end within {timeout:g} s", run)
        deadline = send.started + timeout
        while not recv.wait(SAMPLE_SECONDS):
            now = time.monotonic()
            if now - max(sampler.last_busy, send.ended or now) >= IDLE_SECONDS or now > deadline:
                run.stopped = True
                break
        busy = sampler.last_busy
        recv.stop()
        sampler.stop()
        send_sampler.stop()
        assert recv.ended is not None
        done = busy if run.stopped else recv.ended
        run.e2e = done - send.started if done > send.started else float("nan")
        run.send_wall = send.wall or float("nan")
        run.send_cpu = send.cpu
        run.recv_cpu = recv.cpu
        run.receiver = recv.json()
        run.sender = send.json() if sender_name == "stm-send" else {"stdout": send.stdout()}
        run.written = int(run.receiver.get("packets_written", 0))
        if send.returncode != 0:
            raise RunError(f"{label}: {sender_name} exit {send.returncode}: {send.stderr()}", run)
        if not run.receiver:
            raise RunError(f"{label}: stm-recv printed no summary: {recv.stderr()[-500:]}", run)
    finally:
        for smp in (sampler, send_sampler):
            if smp is not None:
                smp.stop()
        if send_sampler is not None:  # on every path, so that a failed run keeps them
            run.send_rss_mb = send_sampler.rss_mb
            run.send_rss = send_sampler.profile()
        if sampler is not None:
            run.recv_rss_mb = sampler.rss_mb
            run.recv_rss = sampler.profile()
        recv.close()  # stops it if it still runs
        if send is not None:
            send.close()
        out.unlink(missing_ok=True)
    log(
        f"  {label:24} send {run.send_pps:>9,.0f} pkt/s  e2e {run.e2e_pps:>9,.0f} pkt/s  "
        f"loss {run.loss:>7,}  {_rss_text(run)}"
        + ("  (receiver stopped idle)" if run.stopped else "")
    )
    return run


def _rss_text(run: Run) -> str:
    """Both peaks, for the log line."""
    return f"rss send {run.send_rss_mb or 0:5.1f} MB, recv {run.recv_rss_mb or 0:5.1f} MB"


# -- cases ----------------------------------------------------------------------------------


@dataclass
class Case:
    key: str  # the table section
    label: str
    fmt: str  # gre | tlv
    scheme: str  # udp | tcp
    rate: float | None = None
    capture: Path | None = None  # default: the benchmark capture
    extra: tuple[str, ...] = ()  # more stm-send options
    runs: list[Run] = field(default_factory=list)

    def sender(self, capture: Path) -> Callable[[int], list[str]]:
        def cmd(port: int) -> list[str]:
            args = [str(self.capture or capture), "--to", f"{self.scheme}://{HOST}:{port}"]
            args += ["--format", self.fmt, "--producer", PRODUCER, "--json"]
            if self.rate is not None:
                args += ["--rate", f"{self.rate:.0f}"]
            return _py("stm.cli.send", *args, *self.extra)

        return cmd

    def run(self, capture: Path, sent: int, timeout: float) -> Run:
        r = run_one(
            self.label,
            ["--format", self.fmt],
            self.scheme,
            "stm-send",
            self.sender(capture),
            sent,
            timeout,
        )
        self.runs.append(r)
        return r

    def best(self) -> Run:
        return max(self.runs, key=lambda r: r.e2e_pps)


def _sip_capture(packets: int, size: int, dialogs: int) -> Path:
    """The benchmark's frames with Call-IDs (and everything else) cycling over ``dialogs``
    values: packet i is frame(i % dialogs) at timestamp(i). Cached in bench/data/."""
    path = DATA_DIR / f"sip-dialogs{dialogs}-{packets}x{size}.pcapng"
    if path.exists():
        return path
    log(f"generating {path.name} (SIP capture for sngrep)...")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        w = sp.Writer(f, options=[(4, "stm bench")])
        w.add_interface(LINKTYPE_ETHERNET, SNAPLEN, name="bench0", tsresol=9)
        frames = [frame(i, size) for i in range(min(dialogs, packets))]
        for i in range(packets):
            w.write_packet(0, timestamp(i), frames[i % dialogs])
        w.flush()
    os.replace(tmp, path)
    return path


def _local_ipv4() -> str | None:
    """A local, non-loopback IPv4 address (tcpreplay's packets are sent to it)."""
    try:
        out = subprocess.run(
            ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for m in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+)/\d+ .*scope global", out):
        if m.group(1) != TCPREPLAY_SRC:
            return m.group(1)
    return None


def _tcpreplay(capture: Path, sent: int, timeout: float, repeat: int) -> list[Run] | str:
    """``tcpreplay --topspeed -i lo`` of the capture, rewritten so that the kernel delivers it
    to a UDP sink: a non-local source, a local non-loopback destination (packets from 127/8
    that arrive without a route are martians), zero MACs, the sink's port, fixed checksums.
    Returns the runs, or why it was skipped."""
    for tool in ("tcpreplay", "tcprewrite"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install tcpreplay)"
    if os.geteuid() != 0:
        return "tcpreplay needs root (or CAP_NET_RAW) to send on lo"
    local = _local_ipv4()
    if local is None:
        return "no local non-loopback IPv4 address to deliver replayed packets to"
    runs = []
    scratch = DATA_DIR / "scratch-tcpreplay"
    pcap = scratch.with_suffix(".pcap")
    for _ in range(repeat):
        sink_cmd = _py("bench.loopback", "sink", local, "0", str(sent), str(timeout))
        sink = Child("sink", sink_cmd, scratch)
        sampler = Sampler(sink)
        rep: Child | None = None
        rep_sampler: Sampler | None = None
        try:
            port = int(sink.wait_for(r"port (\d+)", START_TIMEOUT, stream="out").group(1))
            rewrite = subprocess.run(
                [
                    "tcprewrite", f"--infile={capture}", f"--outfile={pcap}",
                    f"--srcipmap=0.0.0.0/0:{TCPREPLAY_SRC}", f"--dstipmap=0.0.0.0/0:{local}",
                    "--enet-smac=00:00:00:00:00:00", "--enet-dmac=00:00:00:00:00:00",
                    f"--portmap=5060:{port}", "--fixcsum",
                ],
                capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip
            if rewrite.returncode != 0:
                return f"tcprewrite failed: {rewrite.stderr.strip()[-300:]}"
            replay = ["tcpreplay", "-q", "-i", "lo", "--topspeed", str(pcap)]
            rep = Child("tcpreplay", replay, scratch)
            rep_sampler = Sampler(rep)
            if not rep.wait(timeout):
                rep.stop()
            if not sink.wait(timeout + IDLE_SECONDS * 3):
                sink.stop()
            if rep.returncode != 0:
                return f"tcpreplay failed (exit {rep.returncode}): {rep.stderr().strip()[-300:]}"
            res = sink.json()
            m = re.search(r"Actual: (\d+) packets", rep.stdout() + rep.stderr())
            pushed = int(m.group(1)) if m else 0
            if pushed != sent:
                return f"tcpreplay sent {pushed} of {sent} packets: {rep.stdout()[-300:]}"
            run = Run(sent, rep.wall or float("nan"), rep.cpu)
            run.written = int(res.get("received", 0))
            last = res.get("last")
            run.e2e = last - rep.started if last else float("nan")
            run.recv_cpu = sink.cpu
            rep_sampler.stop()
            sampler.stop()
            run.send_rss_mb = rep_sampler.rss_mb
            run.recv_rss_mb = sampler.rss_mb
            run.receiver = res
            run.sender = {"stdout": rep.stdout()}
            runs.append(run)
            log(
                f"  {'tcpreplay -> UDP sink':24} send {run.send_pps:>9,.0f} pkt/s  "
                f"e2e {run.e2e_pps:>9,.0f} pkt/s  loss {run.loss:>7,}  "
                f"{_rss_text(run)}  (sink socket drops {res.get('drops')})"
            )
        finally:
            sampler.stop()
            if rep_sampler is not None:
                rep_sampler.stop()
            sink.close()
            if rep is not None:
                rep.close()
            pcap.unlink(missing_ok=True)
    return runs


def _sngrep(capture: Path, dialogs: int, sent: int, timeout: float) -> Run | str:
    """sngrep reading the SIP capture and sending every message as HEP3 to stm-recv."""
    if shutil.which("sngrep") is None:
        return "sngrep not found (apt-get install sngrep)"
    mode = ["-R"] if dialogs <= 0 else ["-l", str(max(dialogs, 20000))]

    def cmd(port: int) -> list[str]:
        return ["sngrep", "-F", "-N", "-q", *mode, "-I", str(capture), "-H", f"udp:{HOST}:{port}"]

    label = "sngrep HEP -> stm-recv"
    return run_one(label, ["--format", "tlv"], "udp", "sngrep", cmd, sent, timeout)


# -- rows -----------------------------------------------------------------------------------


def _losses(runs: list[Run]) -> str:
    return ", ".join(f"{r.loss:,}" for r in runs)


def _case_rows(
    section: str,
    sender: str,
    runs: list[Run],
    refs: dict[str, Run | None],
    *,
    trace: bool = False,
) -> list[Row]:
    """Sender rate, end to end rate, loss, and sender and receiver peak RSS of the best run
    (``trace``: the RSS notes also give VmRSS over the run)."""
    best = max(runs, key=lambda r: r.e2e_pps)
    n = best.sent
    own = best.sender.get("packets_per_second")
    tcp = [d for d in best.sender.get("destinations", {}).values() if "sent" in d]
    note = f"{sender}; own timer {own:,} pkt/s" if own else sender
    if best.sender.get("reports"):
        note += f"; {best.sender['reports']:,} reports"
    if tcp:
        note += f"; TCP queue dropped {tcp[0]['dropped']:,}, undelivered {tcp[0]['undelivered']:,}"
    send = Row(NAME, section, "sender", best.send_pps, "pkt/s", n, best.send_wall, best.send_cpu)
    send.note = note
    how = "receiver stopped when idle (loss)" if best.stopped else "receiver exited at --count"
    e2e = Row(NAME, section, "end to end", best.e2e_pps, "pkt/s", best.written, best.e2e)
    e2e.cpu_seconds = best.recv_cpu
    e2e.note = f"{how}; receiver CPU as cpu s; best of {len(runs)}"
    if best.ceiling:
        e2e.note += f"; CPU-bound ceiling {best.ceiling:,.0f} pkt/s"
    lost_reports = best.receiver.get("lost")
    note = f"{100 * best.loss / n:.2f} % of {n:,}; loss per run: {_losses(runs)}"
    if lost_reports:
        note += f"; receiver saw {lost_reports:,} reports missing"
    loss = Row(NAME, section, "loss (sent - written)", best.loss, "pkt", note=note)
    loss.status = "" if best.loss == 0 else "LOSS"
    send_rss = Row(NAME, section, "sender peak RSS", best.send_rss_mb or float("nan"), "MB")
    send_rss.note = "VmHWM of the sending process"
    rss = Row(NAME, section, "receiver peak RSS", best.recv_rss_mb or float("nan"), "MB")
    rss.note = "VmHWM of the receiving process"
    if trace:
        send_rss.note += f"; VmRSS {_profile_text(best.send_rss)}"
        rss.note += f"; VmRSS {_profile_text(best.recv_rss)}"
    for key, ref in refs.items():
        if ref is None:
            continue
        send.vs[key] = send.value / ref.send_pps
        if send.cpu_seconds and ref.send_cpu:
            send.vs_cpu[key] = ref.send_cpu / send.cpu_seconds
        if ref.e2e_pps:
            e2e.vs[key] = e2e.value / ref.e2e_pps
    return [send, e2e, loss, send_rss, rss]


def _named(rows: list[Row], section: str, name: str) -> Row:
    return next(r for r in rows if r.section == section and r.name == name)


def _skipped(name: str, why: str) -> Row:
    return Row(NAME, "ref", name, float("nan"), "pkt/s", status="n/a", note=why)


def _target(name: str, run: Run | None, goal: float, *, lossless: bool = True) -> Row:
    if run is None:
        return Row(NAME, "target", name, float("nan"), "pkt/s", status="n/a", note="not run")
    ok = run.e2e_pps >= goal and (run.loss == 0 or not lossless)
    note = f"need >= {goal:,.0f} pkt/s" + (" and zero loss" if lossless else "")
    note += f"; loss {run.loss:,}"
    if run.ceiling:
        note += f"; CPU-bound ceiling {run.ceiling:,.0f} pkt/s"
    status = "PASS" if ok else "MISS"
    return Row(NAME, "target", name, run.e2e_pps, "pkt/s", status=status, note=note)


def _vs_tcpreplay(run: Run, ref: Run | None, why: str) -> Row:
    """The issue's comparison: wall time and loss of stm-send -> stm-recv beside tcpreplay's,
    same capture, same run. No threshold: a LOSS status only flags loss."""
    name = "stm-send -> stm-recv wall / tcpreplay's"
    ours = (
        f"stm-send -> stm-recv (format A, UDP) {run.e2e:.2f} s end to end "
        f"(stm-send {run.send_wall:.2f} s), loss {run.loss:,}"
    )
    if ref is None:
        return Row(NAME, "target", name, float("nan"), "x", status="n/a", note=f"{ours}; {why}")
    ratio = run.e2e / ref.e2e if ref.e2e == ref.e2e and ref.e2e > 0 else float("nan")
    note = (
        f"{ours}; tcpreplay --topspeed -> UDP sink {ref.e2e:.2f} s end to end "
        f"(tcpreplay {ref.send_wall:.2f} s), loss {ref.loss:,}; no threshold in the issue"
    )
    row = Row(NAME, "target", name, ratio, "x", run.sent, run.e2e, note=note)
    row.status = "LOSS" if run.loss else ""
    return row


def _memory_capture(gb: float) -> tuple[Path, int]:
    """The memory case's capture: ``gb`` x 1,000,000 packets of ~MEMORY_SIZE bytes, made
    by ``dataset`` (so cached in bench/data/ like the others); its creation is logged."""
    packets = max(1, round(gb * MEMORY_PACKETS_PER_GB))
    cached = (DATA_DIR / f"pcapng-v{GEN_VERSION}-{packets}x{MEMORY_SIZE}.pcapng").exists()
    t0 = time.monotonic()
    path = dataset(packets, MEMORY_SIZE)
    how = "cached" if cached else f"generated in {time.monotonic() - t0:.0f} s"
    size = path.stat().st_size
    log(
        f"memory capture: {path} ({size / 1e9:.2f} GB, {packets:,} packets of "
        f"~{MEMORY_SIZE} bytes; {how})"
    )
    return path, packets


def _memory_rows(case: Case, gb: float, capture: Path, error: str) -> list[Row]:
    """Target rows: the peak RSS of each side < RSS_LIMIT_MB (loss beside, not part of it)."""
    rows = []
    run = case.runs[-1] if case.runs else None
    size = capture.stat().st_size / 1e9
    for side, label in (("send", "stm-send"), ("recv", "stm-recv")):
        name = f"{label} peak RSS, {gb:g} GB input"
        if run is None:
            rows.append(Row(NAME, "target", name, float("nan"), "MB", status="n/a", note=error))
            continue
        peak = run.send_rss_mb if side == "send" else run.recv_rss_mb
        trace = run.send_rss if side == "send" else run.recv_rss
        value = peak if peak is not None else float("nan")
        # NaN: MISS; a run cut short shows a peak so far: it can fail the target, not pass it
        status = "MISS" if not value < RSS_LIMIT_MB else "n/a" if error else "PASS"
        note = (
            f"need < {RSS_LIMIT_MB:g} MB; {size:.2f} GB, {run.sent:,} packets, format A over "
            f"UDP at full speed; loss {run.loss:,} ({100 * run.loss / run.sent:.2f} %, not "
            f"part of this target); VmRSS {_profile_text(trace)}"
        )
        if error:
            note += f"; run failed: {error}"
        rows.append(Row(NAME, "target", name, value, "MB", run.sent, status=status, note=note))
    return rows


def run(args: argparse.Namespace) -> list[Row]:
    """Run the loopback benchmark and return its rows."""
    capture = dataset(args.packets, args.size)
    n = args.packets
    timeout = args.timeout if args.timeout is not None else max(120.0, n / 2000)
    log(f"capture: {capture} ({n:,} packets of ~{args.size} bytes)")
    gb = args.memory_gb
    memory: Case | None = None
    if gb > 0:  # made first: its creation is not timed against anything
        big, big_n = _memory_capture(gb)
        key = f"A-udp-{gb:g}GB"
        memory = Case(key, f"format A, UDP, {gb:g} GB capture", "gre", "udp", capture=big)
    cases = [
        Case("A-udp", "format A, UDP", "gre", "udp"),
        Case("B-udp", "format B, UDP", "tlv", "udp"),
        Case("A-udp-9000", "format A, UDP, --mtu 9000", "gre", "udp", extra=("--mtu", "9000")),
        Case(
            "B-tcp",
            "format B, TCP, --queue-policy drop-oldest",
            "tlv",
            "tcp",
            extra=("--queue-policy", "drop-oldest"),
        ),
        Case("B-tcp-block", BLOCK_LABEL, "tlv", "tcp", extra=("--queue-policy", "block")),
    ]
    for _ in range(max(1, args.repeat)):
        for case in cases:
            case.run(capture, n, timeout)
    paced = []
    by = {case.key: case for case in cases}
    for case in (by["A-udp"], by["B-udp"]):
        own = [r.sender.get("packets_per_second") or r.send_pps for r in case.runs]
        rate = args.rate_fraction * max(own)
        label = f"{case.label}, --rate {rate:,.0f}"
        paced.append(Case(f"{case.key}-paced", label, case.fmt, case.scheme, rate))
    for _ in range(max(1, args.repeat)):
        for case in paced:
            case.run(capture, n, timeout)
    memory_error = ""
    if memory is not None:  # once: a peak, not a rate
        big_timeout = args.timeout if args.timeout is not None else max(120.0, big_n / 2000)
        log(f"memory case: {big_n:,} packets, timeout {big_timeout:g} s")
        try:
            memory.run(big, big_n, big_timeout)
        except RunError as e:
            memory_error = str(e)[:300]
            memory.runs.append(e.run)
            log(f"  memory case failed: {memory_error}")

    tcpreplay: Run | None = None
    tcpreplay_why = "--no-refs"
    sngrep_rows: list[Row] = []
    notes: list[Row] = []
    vs_sngrep: Row | None = None
    if not args.no_refs:
        got = _tcpreplay(capture, n, timeout, max(1, args.repeat))
        if isinstance(got, str):
            log(f"  tcpreplay skipped: {got}")
            notes.append(_skipped("tcpreplay", got))
            tcpreplay_why = f"tcpreplay skipped: {got}"
        else:
            tcpreplay = max(got, key=lambda r: r.e2e_pps)
            rows = _case_rows("ref-tcpreplay", "tcpreplay --topspeed -i lo", got, {})
            section = "ref-tcpreplay"
            _named(
                rows, section, "end to end"
            ).note = "UDP sink (python, recv loop): last datagram - tcpreplay start"
            _named(rows, section, "sender peak RSS").note = "VmHWM of tcpreplay"
            _named(rows, section, "receiver peak RSS").note = "VmHWM of the UDP sink"
            notes += rows
        k = args.sngrep_dialogs
        sip = capture if k <= 0 else _sip_capture(n, args.size, k)
        ours = Case("sip-B-udp", "format B, UDP, sngrep's capture", "tlv", "udp", capture=sip)
        sng_runs: list[Run] = []
        skipped = ""
        for _ in range(max(1, args.repeat)):
            got1 = _sngrep(sip, args.sngrep_dialogs, n, timeout)
            if isinstance(got1, str):
                skipped = got1
                break
            sng_runs.append(got1)
            ours.run(capture, n, timeout)
        if skipped:
            log(f"  sngrep skipped: {skipped}")
            notes.append(_skipped("sngrep", skipped))
        else:
            dialogs = "one dialog per packet, -R" if k <= 0 else f"{k:,} dialogs"
            sng = max(sng_runs, key=lambda r: r.e2e_pps)  # the run _case_rows shows
            sngrep_rows = _case_rows("ref-sngrep", f"sngrep -I -H udp: ({dialogs})", sng_runs, {})
            label = f"stm-send --format tlv ({dialogs})"
            sngrep_rows += _case_rows(ours.key, label, ours.runs, {"sngrep": sng})
            ours_send = _named(sngrep_rows, ours.key, "sender")
            ratio = ours_send.value / _named(sngrep_rows, "ref-sngrep", "sender").value
            vs_sngrep = Row(
                NAME, "target", "stm-send HEP rate vs sngrep", ratio, "x",
                status="PASS" if ratio >= VS_SNGREP else "MISS",
                note=f"need >= {VS_SNGREP:g}x (sender wall time, same SIP capture); "
                f"by CPU time {ours_send.vs_cpu.get('sngrep', float('nan')):.2f}x",
            )  # fmt: skip

    refs = {"tcpreplay": tcpreplay}
    rows: list[Row] = []
    for case in cases + paced:
        rows += _case_rows(case.key, case.label, case.runs, refs)
    if memory is not None and memory.runs:
        rows += _case_rows(memory.key, memory.label, memory.runs, {}, trace=True)
    rows += notes + sngrep_rows
    rows += [
        _vs_tcpreplay(by["A-udp"].best(), tcpreplay, tcpreplay_why),
        _target("format A UDP end to end", by["A-udp"].best(), UDP_A_TARGET),
        _target("format B TCP end to end", by["B-tcp"].best(), TCP_TARGET),
        _target("format B TCP end to end, block", by["B-tcp-block"].best(), TCP_TARGET),
        _target("format A UDP end to end, mtu 9000", by["A-udp-9000"].best(), UDP_A_TARGET),
    ]
    for case in paced:  # every run must be lossless, not just the best one
        worst = max(r.loss for r in case.runs)
        note = f"{args.rate_fraction:.0%} of the unlimited rate; worst run; loss per run: "
        status = "PASS" if worst == 0 else "MISS"
        name = f"{case.label}: zero loss"
        rows.append(
            Row(NAME, "target", name, worst, "pkt", status=status, note=note + _losses(case.runs))
        )
    if vs_sngrep is not None:
        rows.append(vs_sngrep)
    if memory is not None:
        rows += _memory_rows(memory, gb, big, memory_error)
    return rows


# -- the tcpreplay sink ---------------------------------------------------------------------


def _socket_drops(sock: socket.socket) -> int | None:
    """The kernel's drop count for this socket (``/proc/net/udp``, last column)."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    try:
        with open("/proc/net/udp") as f:
            for line in f:
                cols = line.split()
                if len(cols) > 12 and cols[9] == inode:
                    return int(cols[-1])
    except OSError:
        pass
    return None


def sink(host: str, port: int, count: int, timeout: float) -> int:
    """Count datagrams until ``count``, or ``IDLE_SECONDS`` of silence, or ``timeout``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 64 << 20)
            break
        except OSError:
            continue
    sock.bind((host, port))
    print(f"port {sock.getsockname()[1]}", flush=True)
    buf = bytearray(65536)
    recv = sock.recv_into
    clock = time.monotonic
    n = 0
    first = last = None
    end = clock() + timeout
    sock.setblocking(False)
    while n < count:
        try:
            recv(buf)
        except BlockingIOError:
            if not select.select([sock], [], [], IDLE_SECONDS)[0] and (n or clock() > end):
                break
            continue
        last = clock()
        if first is None:
            first = last
        n += 1
    out = {"received": n, "first": first, "last": last, "drops": _socket_drops(sock)}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "sink":
        sys.exit(sink(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
    sys.exit("usage: python -m bench.loopback sink HOST PORT COUNT TIMEOUT")
