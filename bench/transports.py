"""Transports end to end: tcp://, ws:// and kafka:// side by side, in the same run.

The issues: #9 (WebSocket) "loopback ws:// end to end beside TCP in the same run
(packets/s); target within 2x of our TCP transport", and #10 (Kafka) "records per second
through the bus end to end beside our TCP transport, in the same run".

Every run is the loopback benchmark's (``bench.loopback.run_one``): the real ``stm-recv``
(``--count N --json``) starts first, then ``stm-send --json`` sends the benchmark capture
(``--packets`` of ``--size`` bytes, the pcapng benchmark's generated file) to it; end to
end = packets written / (the receiver's exit - the sender's start); loss = packets in the
capture - packets written; peak RSS = ``VmHWM`` of each process, sampled every 20 ms.
Cases, for format A (``--format gre``) and format B (``--format tlv``), interleaved,
``--repeat`` times, the best run of each kept:

* ``tcp://127.0.0.1:PORT``: the reference (stm-send's defaults: ``--queue-policy block``);
* ``ws://127.0.0.1:PORT/stm``: TS 28.532's procedure (POST, then the Upgrade), one report
  per binary frame, acknowledged by Ping/Pong (docs/streaming.md);
* ``kafka://BOOTSTRAP/TOPIC``: through a real single-node Apache Kafka broker
  (tests/kafka/start-broker.sh, started once for the whole benchmark and always stopped at
  the end; its rows are skipped, with the reason, when it cannot start). Each run gets a
  fresh topic (one partition, created before and deleted after the run, untimed) and
  consumer group; the sender starts once stm-recv has been assigned the partition. stm-send
  sizes reports for Kafka by itself (up to 65,507 bytes: records, not datagrams), so the
  records per second are given beside the packets.

Both tcp:// and ws:// use stm-send's default ``--mtu`` of 1500, as a user would.

Target rows: ``ws:// within 2x of tcp://`` per format (PASS when the best ws:// end to end
rate is at least half the best tcp:// one), and the ratio kafka:// / tcp:// per format (no
threshold in the issue).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import Row, log
from bench.loopback import (
    HOST,
    PRODUCER,
    ROOT,
    Run,
    RunError,
    _has,
    _positive,
    _py,
    run_one,
)
from bench.pcapng import dataset

NAME = "transports"
WS_FACTOR = 2.0  # #9: ws:// end to end within 2x of tcp://
WS_PATH = "/stm"
RECIPE = ROOT / "tests" / "kafka"
BROKER_START_TIMEOUT = 900.0  # the first start on a machine fetches the jars with Maven
BROKER_STOP_TIMEOUT = 90.0
ADMIN_TIMEOUT = 30.0
SCRATCH = "scratch-transports"
FORMATS = (("A", "gre"), ("B", "tlv"))
SCHEMES = ("tcp", "ws", "kafka")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark. Under ``all``, ``--packets``, ``--size`` and
    ``--timeout`` are those another benchmark defined first (``--packets`` then defaults to
    the pcapng benchmark's 1,000,000)."""
    if not _has(parser, "--packets"):
        parser.add_argument(
            "--packets", type=_positive, default=100_000, help="packets in the capture sent"
        )
    if not _has(parser, "--size"):
        parser.add_argument("--size", type=_positive, default=300, help="mean frame size")
    if not _has(parser, "--timeout"):
        parser.add_argument(
            "--timeout",
            type=float,
            default=None,
            metavar="SECONDS",
            help="longest any one sender or receiver may run (default: 120 s, or 1 s per "
            "2,000 packets if longer)",
        )
    parser.add_argument(
        "--kafka-backend",
        choices=("kafka", "mock", "auto", "off"),
        default="kafka",
        help="broker for the kafka:// rows: a real Apache Kafka (tests/kafka/start-broker.sh), "
        "librdkafka's mock cluster, either, or none (transports)",
    )


# -- the broker -------------------------------------------------------------------------------


@dataclass
class Broker:
    bootstrap: str
    backend: str  # kafka | mock, as start-broker.sh says


def _broker_env(workdir: Path, backend: str) -> dict[str, str]:
    # A pid file of our own: another broker of the tests may be running on the machine.
    return {
        **os.environ,
        "KAFKA_BACKEND": backend,
        "KAFKA_PID_FILE": str(workdir / "broker.pid"),
        "KAFKA_MOCK_PYTHON": sys.executable,
    }


def _start_broker(workdir: Path, backend: str) -> Broker | str:
    """A broker from tests/kafka/start-broker.sh, or why it did not start. Whatever
    happens, ``_stop_broker(workdir)`` stops what it started (the PID is in the pid file
    from the moment the broker exists)."""
    script = RECIPE / "start-broker.sh"
    if not script.is_file():
        return f"no broker recipe at {script}"
    if shutil.which("bash") is None:
        return "bash not found"
    log(f"starting a Kafka broker ({backend}) with {script.relative_to(ROOT)}...")
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            ["bash", str(script)],
            env=_broker_env(workdir, backend),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BROKER_START_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return f"start-broker.sh did not finish within {BROKER_START_TIMEOUT:g} s"
    if r.returncode != 0 or not r.stdout.startswith("BOOTSTRAP="):
        tail = " | ".join(r.stderr.strip().splitlines()[-4:])
        return f"start-broker.sh failed (exit {r.returncode}): {tail[-400:]}"
    bootstrap = r.stdout.strip().splitlines()[0].removeprefix("BOOTSTRAP=")
    got = backend
    for line in r.stderr.splitlines():
        if "ready: backend=" in line:
            got = line.split("ready: backend=", 1)[1].split()[0]
    log(f"  broker ({got}) at {bootstrap}, up in {time.monotonic() - t0:.0f} s")
    return Broker(bootstrap, got)


def _stop_broker(workdir: Path) -> None:
    """tests/kafka/stop-broker.sh on our pid file (it kills only the PID recorded there,
    and only if it is still that broker); then our scratch directory goes."""
    if (workdir / "broker.pid").exists():
        try:
            r = subprocess.run(
                ["bash", str(RECIPE / "stop-broker.sh")],
                env={**_broker_env(workdir, "kafka"), "KAFKA_STOP_TIMEOUT": "30"},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=BROKER_STOP_TIMEOUT,
            )
            log(f"  {r.stderr.strip() or 'broker stopped'}")
        except subprocess.TimeoutExpired:
            log(f"  stop-broker.sh did not finish within {BROKER_STOP_TIMEOUT:g} s")
    shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit while the benchmark runs, so that the ``finally`` blocks
    stop the children and the broker as Ctrl-C does."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _create_topic(bootstrap: str, topic: str) -> None:
    """One partition, one replica, before the run (not timed)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
    for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        f.result(ADMIN_TIMEOUT)


def _delete_topic(bootstrap: str, topic: str) -> None:
    """After the run, so that the broker's disk does not fill up (best effort)."""
    with contextlib.suppress(Exception):
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
        for f in admin.delete_topics([topic]).values():
            f.result(ADMIN_TIMEOUT)


# -- cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    key: str  # the table section: A-tcp, B-ws, ...
    form: str  # A | B
    fmt: str  # gre | tlv
    scheme: str  # tcp | ws | kafka
    runs: list[Run] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"format {self.form}, {self.scheme}://"

    def best(self) -> Run | None:
        ok = [r for r in self.runs if r.e2e_pps > 0]
        return max(ok, key=lambda r: r.e2e_pps) if ok else None

    def run(self, capture: Path, sent: int, timeout: float, broker: Broker | None) -> None:
        recv_args = ["--format", self.fmt]
        listen = ready = None
        topic = ""
        to: Callable[[int], str]
        if self.scheme == "tcp":
            to = lambda port: f"tcp://{HOST}:{port}"  # noqa: E731
        elif self.scheme == "ws":
            listen = f"ws://{HOST}:0{WS_PATH}"
            to = lambda port: f"ws://{HOST}:{port}{WS_PATH}"  # noqa: E731
        else:
            assert broker is not None
            topic = f"stm-bench-{self.key}-{os.getpid()}-{len(self.runs) + len(self.errors)}"
            listen = f"kafka://{broker.bootstrap}/{topic}?group=g-{topic}"
            ready = r"assigned \S+/\d+"  # -v: the partition is ours before the sender starts
            recv_args.append("-v")
            to = lambda port: f"kafka://{broker.bootstrap}/{topic}"  # noqa: E731

        def sender(port: int) -> list[str]:
            args = [str(capture), "--to", to(port), "--format", self.fmt]
            return _py("stm.cli.send", *args, "--producer", PRODUCER, "--json")

        try:
            if topic:
                assert broker is not None
                _create_topic(broker.bootstrap, topic)
            r = run_one(
                self.label,
                recv_args,
                self.scheme,
                "stm-send",
                sender,
                sent,
                timeout,
                listen=listen,
                ready=ready,
                scratch_name=SCRATCH,
            )
            self.runs.append(r)
        except RunError as e:  # measured until it failed: kept, but never the best
            self.errors.append(str(e)[:300])
            log(f"  {self.label} failed: {self.errors[-1]}")
        except Exception as e:  # the receiver did not start, the topic was not made...
            self.errors.append(f"{type(e).__name__}: {str(e)[:300]}")
            log(f"  {self.label} failed: {self.errors[-1]}")
        finally:
            if topic:
                assert broker is not None
                _delete_topic(broker.bootstrap, topic)


# -- rows -------------------------------------------------------------------------------------


def _dest(run: Run) -> dict:
    """stm-send's summary of its one destination."""
    dests = list(run.sender.get("destinations", {}).values())
    return dests[0] if dests else {}


def _rates(case: Case) -> str:
    return ", ".join(f"{r.e2e_pps:,.0f}" for r in case.runs) or "none"


def _not_run(case: Case, why: str) -> list[Row]:
    return [Row(NAME, case.key, "end to end", float("nan"), "pkt/s", status="n/a", note=why)]


def _case_rows(case: Case, tcp: Run | None, backend: str = "") -> list[Row]:
    """Sender rate, end to end rate (and records/s for kafka), loss, both peak RSS."""
    best = case.best()
    if best is None:
        return _not_run(case, "no run completed: " + ("; ".join(case.errors) or "not run"))
    n = best.sent
    d = _dest(best)
    own = best.sender.get("packets_per_second")
    note = f"stm-send --to {case.scheme}://"
    if own:
        note += f"; own timer {own:,} pkt/s"
    reports = best.sender.get("reports")
    if reports:
        note += f"; {reports:,} reports ({n / reports:.1f} packets each)"
    if d:
        note += f"; sent {d.get('sent', 0):,}, dropped {d.get('dropped', 0):,}, "
        note += f"undelivered {d.get('undelivered', 0):,}"
        if case.scheme == "ws" and d.get("undelivered"):
            note += " (stm-recv stops at --count before its last Pong)"
    send = Row(NAME, case.key, "sender", best.send_pps, "pkt/s", n, best.send_wall, best.send_cpu)
    send.note = note
    how = "receiver stopped when idle (loss)" if best.stopped else "receiver exited at --count"
    e2e = Row(NAME, case.key, "end to end", best.e2e_pps, "pkt/s", best.written, best.e2e)
    e2e.cpu_seconds = best.recv_cpu
    e2e.note = f"{how}; receiver CPU as cpu s; best of {len(case.runs)}: {_rates(case)}"
    if best.ceiling:
        e2e.note += f"; CPU-bound ceiling {best.ceiling:,.0f} pkt/s"
    if case.errors:
        e2e.note += f"; {len(case.errors)} run(s) failed: {case.errors[0]}"
    if tcp is not None and tcp.e2e_pps and case.scheme != "tcp":
        e2e.vs["tcp"] = best.e2e_pps / tcp.e2e_pps
        if best.ceiling and tcp.ceiling:
            e2e.vs_cpu["tcp"] = best.ceiling / tcp.ceiling
    rows = [send, e2e]
    if case.scheme == "kafka":
        records = int(best.receiver.get("datagrams", 0))
        rate = records / best.e2e if best.e2e == best.e2e and best.e2e > 0 else float("nan")
        rec = Row(NAME, case.key, "records end to end", rate, "rec/s", records, best.e2e)
        rec.note = (
            f"records (one report each) consumed / end to end time; "
            f"{best.written / max(1, records):.1f} packets per record; broker: {backend}"
        )
        rows.append(rec)
    lost = best.receiver.get("lost")
    note = f"{100 * best.loss / n:.2f} % of {n:,}; loss per run: "
    note += ", ".join(f"{r.loss:,}" for r in case.runs)
    if lost:
        note += f"; receiver saw {lost:,} reports missing"
    loss = Row(NAME, case.key, "loss (sent - written)", best.loss, "pkt", note=note)
    loss.status = "" if best.loss == 0 else "LOSS"
    send_rss = Row(NAME, case.key, "sender peak RSS", best.send_rss_mb or float("nan"), "MB")
    send_rss.note = "VmHWM of stm-send"
    recv_rss = Row(NAME, case.key, "receiver peak RSS", best.recv_rss_mb or float("nan"), "MB")
    recv_rss.note = "VmHWM of stm-recv"
    return [*rows, loss, send_rss, recv_rss]


def _paired(case: Case, tcp: Case) -> str:
    """Run-by-run ratios (each run beside the tcp:// run of the same round)."""
    pairs = zip(case.runs, tcp.runs, strict=False)
    return ", ".join(f"{a.e2e_pps / b.e2e_pps:.2f}" for a, b in pairs if b.e2e_pps) or "none"


def _ws_target(form: str, ws: Case, tcp: Case) -> Row:
    name = f"ws:// within {WS_FACTOR:g}x of tcp://, format {form}"
    w, t = ws.best(), tcp.best()
    if w is None or t is None:
        why = "; ".join(ws.errors + tcp.errors) or "not run"
        return Row(NAME, "target", name, float("nan"), "x", status="n/a", note=why)
    ratio = w.e2e_pps / t.e2e_pps
    status = "PASS" if w.e2e_pps >= t.e2e_pps / WS_FACTOR else "MISS"
    note = (
        f"need ws:// >= tcp:// / {WS_FACTOR:g} (ratio >= {1 / WS_FACTOR:.2f}); best end to end "
        f"ws:// {w.e2e_pps:,.0f}, tcp:// {t.e2e_pps:,.0f} pkt/s; per round {_paired(ws, tcp)}"
    )
    if w.ceiling and t.ceiling:
        note += f"; by CPU-bound ceiling {w.ceiling / t.ceiling:.2f}"
    note += f"; loss ws:// {w.loss:,}, tcp:// {t.loss:,}"
    return Row(NAME, "target", name, ratio, "x", w.sent, status=status, note=note)


def _kafka_ratio(form: str, kafka: Case, tcp: Case, skipped: str) -> Row:
    name = f"kafka:// / tcp://, format {form}"
    k, t = kafka.best(), tcp.best()
    if skipped or k is None or t is None:
        why = skipped or "; ".join(kafka.errors + tcp.errors) or "not run"
        return Row(NAME, "target", name, float("nan"), "x", status="n/a", note=why)
    ratio = k.e2e_pps / t.e2e_pps
    records = int(k.receiver.get("datagrams", 0))
    note = (
        f"best end to end kafka:// {k.e2e_pps:,.0f} pkt/s ({records / k.e2e:,.0f} records/s), "
        f"tcp:// {t.e2e_pps:,.0f} pkt/s; per round {_paired(kafka, tcp)}"
    )
    if k.ceiling and t.ceiling:
        note += f"; by CPU-bound ceiling {k.ceiling / t.ceiling:.2f}"
    note += f"; loss kafka:// {k.loss:,}; no threshold in the issue"
    return Row(NAME, "target", name, ratio, "x", k.sent, status="", note=note)


# -- the benchmark ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[Row]:
    """Run the transports benchmark and return its rows."""
    capture = dataset(args.packets, args.size)
    n = args.packets
    timeout = args.timeout if args.timeout is not None else max(120.0, n / 2000)
    repeat = max(1, args.repeat)
    log(f"capture: {capture} ({n:,} packets of ~{args.size} bytes)")
    cases = {
        (form, scheme): Case(f"{form}-{scheme}", form, fmt, scheme)
        for form, fmt in FORMATS
        for scheme in SCHEMES
    }
    backend = getattr(args, "kafka_backend", "kafka")
    skipped = "--kafka-backend off" if backend == "off" else ""
    broker: Broker | None = None
    workdir = Path(tempfile.mkdtemp(prefix="stm-bench-kafka-"))
    with _sigterm_unwinds():
        try:
            if not skipped:
                got = _start_broker(workdir, backend)
                if isinstance(got, str):
                    skipped = f"no Kafka broker: {got}"
                    log(f"  kafka:// rows skipped: {skipped}")
                else:
                    broker = got
            for i in range(repeat):
                log(f"round {i + 1} of {repeat}")
                for form, _ in FORMATS:
                    for scheme in SCHEMES:
                        if scheme == "kafka" and broker is None:
                            continue
                        cases[form, scheme].run(capture, n, timeout, broker)
        finally:
            _stop_broker(workdir)

    rows: list[Row] = []
    targets: list[Row] = []
    for form, _ in FORMATS:
        tcp = cases[form, "tcp"]
        for scheme in SCHEMES:
            case = cases[form, scheme]
            if scheme == "kafka" and skipped:
                rows += _not_run(case, skipped)
            else:
                rows += _case_rows(case, tcp.best(), broker.backend if broker else "")
        targets.append(_ws_target(form, cases[form, "ws"], tcp))
        targets.append(_kafka_ratio(form, cases[form, "kafka"], tcp, skipped))
    return rows + targets
