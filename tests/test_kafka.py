"""STM over Kafka (stm.transport.kafka) and the consumer-driven session (stm.session).

Against a real Apache Kafka broker (KRaft, one node on 127.0.0.1) started once for the
module by the project's recipe (tests/kafka/start-broker.sh, jars fetched by Maven into
~/.cache once). KAFKA_BACKEND=mock (or a failed real start) runs librdkafka's mock cluster
instead; the tests skip only when neither starts. stm-send and stm-recv run as
subprocesses, as in production; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from stm import frames, pcapng
from stm import session as sess
from stm.errors import UsageError
from stm.pcapng import constants as c
from stm.transport import kafka as kt

ck = pytest.importorskip("confluent_kafka", reason="confluent-kafka is not installed")

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in (".pcap", ".pcapng"))
SEND = [sys.executable, "-m", "stm.cli.send"]
RECV = [sys.executable, "-m", "stm.cli.recv"]
# Our own copy of the broker recipe (start/stop scripts, the pom that fetches the jars into
# ~/.cache/stm-kafka/jars once), taken from the shared one; STM_KAFKA_RECIPE points elsewhere.
RECIPE = Path(os.environ.get("STM_KAFKA_RECIPE", Path(__file__).parent / "kafka"))


# -- the broker ----------------------------------------------------------------------------------


class Broker:
    def __init__(self, bootstrap: str, backend: str, env: dict) -> None:
        self.bootstrap = bootstrap
        self.backend = backend
        self.env = env

    def stop(self) -> None:
        subprocess.run(
            ["bash", str(RECIPE / "stop-broker.sh")],
            env=self.env,
            capture_output=True,
            timeout=60,
        )


def start_broker(workdir: Path, backend: str) -> Broker | str:
    """A broker from the shared recipe, or why it did not start."""
    if not (RECIPE / "start-broker.sh").is_file():
        return f"no Kafka recipe at {RECIPE} (set STM_KAFKA_RECIPE)"
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "KAFKA_BACKEND": backend,
        "KAFKA_PID_FILE": str(workdir / "broker.pid"),
        "KAFKA_MOCK_PYTHON": sys.executable,
    }
    try:
        r = subprocess.run(
            ["bash", str(RECIPE / "start-broker.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,  # the first run on a machine downloads the jars
        )
    except subprocess.TimeoutExpired:
        return f"{backend}: start-broker.sh timed out"
    if r.returncode != 0 or not r.stdout.startswith("BOOTSTRAP="):
        return f"{backend}: " + " | ".join(r.stderr.strip().splitlines()[-6:])
    return Broker(r.stdout.strip().removeprefix("BOOTSTRAP="), backend, env)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    wanted = os.environ.get("KAFKA_BACKEND", "kafka")
    base = tmp_path_factory.mktemp("kafka")
    got = start_broker(base / "main", wanted)
    reasons = []
    if isinstance(got, str) and wanted == "kafka":
        reasons.append(got)
        got = start_broker(base / "mock", "mock")
        if not isinstance(got, str):
            warnings.warn(
                f"real Kafka did not start ({reasons[0]}); using librdkafka's mock cluster",
                stacklevel=1,
            )
    if isinstance(got, str):
        pytest.skip("no Kafka broker could start: " + "; ".join([*reasons, got]))
    try:
        yield got
    finally:
        got.stop()


# -- helpers ------------------------------------------------------------------------------------


class Proc:
    """A subprocess whose standard error is collected line by line as it comes."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def err(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in:\n{self.err}")

    def finish(self, timeout: float = 30.0, sig=None) -> tuple[int, str]:
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out = self.proc.stdout.read() if self.proc.wait(timeout) is not None else ""
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise
        self._reader.join(5)
        return self.proc.returncode, out

    def json(self, timeout: float = 30.0, sig=None) -> dict:
        code, out = self.finish(timeout, sig)
        assert code == 0, self.err
        return json.loads(out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


def stm_recv(url: str, out: Path, *extra: str) -> Proc:
    return Proc(
        [*RECV, "--listen", url, "-w", str(out), "--flush-interval", "0.3", "--json", *extra]
    )


def real_only(broker: Broker) -> None:
    """Consumer group semantics (joins, rebalances, static members) are the broker's: the
    mock cluster is librdkafka's test double, not Kafka."""
    if broker.backend != "kafka":
        pytest.skip("needs a real Kafka broker (group coordination); this run has the mock")


def topic_name(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:8]}"


def create_topic(broker: Broker, topic: str, partitions: int) -> None:
    """A topic with ``partitions`` partitions (the mock makes 4 on first use by itself)."""
    if broker.backend != "kafka":
        assert partitions == 4
        ck.Producer({"bootstrap.servers": broker.bootstrap}).list_topics(topic, timeout=10)
        return
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    futures = admin.create_topics([NewTopic(topic, partitions, 1)], operation_timeout=20)
    futures[topic].result(timeout=30)


def records(broker: Broker, topic: str, expect: int, timeout: float = 20.0) -> list:
    """Every record of ``topic`` (until ``expect`` of them came), read without a group."""
    consumer = ck.Consumer(
        {"bootstrap.servers": broker.bootstrap, "group.id": "unused", "enable.auto.commit": False}
    )
    try:
        md = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign(
            [ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in sorted(md.partitions)]
        )
        got = []
        end = time.monotonic() + timeout
        while len(got) < expect and time.monotonic() < end:
            got += [m for m in consumer.consume(500, 0.2) if m.error() is None]
        return got
    finally:
        consumer.close()


def end_offsets(broker: Broker, topic: str) -> dict[int, int]:
    consumer = ck.Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "unused"})
    try:
        md = consumer.list_topics(topic, timeout=10).topics[topic]
        return {
            p: consumer.get_watermark_offsets(ck.TopicPartition(topic, p), timeout=10)[1]
            for p in md.partitions
        }
    finally:
        consumer.close()


def wait_committed(broker: Broker, group: str, topic: str, timeout: float = 30.0) -> dict:
    """Wait until ``group`` has committed the end of every partition of ``topic``."""
    consumer = ck.Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        end = time.monotonic() + timeout
        while True:
            ends = end_offsets(broker, topic)
            tps = [ck.TopicPartition(topic, p) for p in ends]
            done = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)}
            if all(ends[p] == 0 or done.get(p) == ends[p] for p in ends):
                return ends
            if time.monotonic() > end:
                raise AssertionError(f"group {group}: committed {done}, end offsets {ends}")
            time.sleep(0.2)
    finally:
        consumer.close()


def wait_commit(broker: Broker, group: str, topic: str, above: int, timeout=30.0) -> int:
    """Wait until ``group`` has committed more than ``above`` records of ``topic``."""
    consumer = ck.Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            md = consumer.list_topics(topic, timeout=10).topics[topic]
            tps = [ck.TopicPartition(topic, p) for p in md.partitions]
            done = sum(max(0, tp.offset) for tp in consumer.committed(tps, timeout=10))
            if done > above:
                return done
            time.sleep(0.05)
        raise AssertionError(f"group {group} committed no more than {above} records")
    finally:
        consumer.close()


def capture(path: Path, n: int, tag: str) -> Path:
    """``n`` distinct small UDP packets (raw IPv4) 1 ms apart."""
    with open(path, "wb") as f:
        w = pcapng.Writer(f)
        w.add_interface(c.LINKTYPE_RAW, 65535, tsresol=9)
        for i in range(n):
            payload = f"OPTIONS sip:{tag} SIP/2.0\r\nCSeq: {i} OPTIONS\r\n\r\n".encode()
            data = frames.synthesize(
                4, frames.UDP, bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]), 5060, 5060, payload
            )
            w.write_packet(0, 1_700_000_000 * 10**9 + i * 1_000_000, data)
        w.flush()
    return path


def keys(path) -> list:
    """The packets of a capture; a file cut short by kill -9 gives what it holds whole."""
    out: list = []
    with contextlib.suppress(Exception):  # MalformedPcapng at a cut
        out.extend(p.key() for p in pcapng.read(path))
    return out


def count(path) -> int:
    return sum(1 for _ in pcapng.read(path))


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's partitioner; librdkafka's murmur2_random)."""
    m, h = 0x5BD1E995, (0x9747B28C ^ len(data)) & 0xFFFFFFFF
    n4 = len(data) // 4
    for i in range(n4):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = data[4 * n4 :]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


def partition_of(stream_id: int, partitions: int) -> int:
    return (murmur2(str(stream_id).encode()) & 0x7FFFFFFF) % partitions


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http(method: str, url: str, body=None, token: str | None = None):
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None, dict(r.headers)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None, dict(exc.headers)


# -- without a broker: URLs, options, session bodies -----------------------------------------------


def test_kafka_urls():
    e = kt.parse_kafka_url("kafka://a:1,[::1]:2,b/stm.reports", consumer=True)
    assert e.brokers == ("a:1", "[::1]:2", f"b:{kt.DEFAULT_PORT}")
    assert (e.topic, e.group, e.instance) == ("stm.reports", "stm-recv", None)
    assert str(e) == "kafka://a:1,[::1]:2,b:9092/stm.reports"
    e = kt.parse_kafka_url("kafka://h:9/t?group=g&instance=i1", consumer=True)
    assert (e.group, e.instance) == ("g", "i1")
    for url, message in [
        ("kafka://h:9", "no topic"),
        ("kafka:///t", "no broker"),
        ("kafka://h:9/a/b", "bad topic"),
        ("kafka://h:99999/t", "bad broker"),
        ("kafka://h:9,,g:1/t", "empty broker"),
        ("kafka://h:9/t?group=g", "unknown parameter"),  # stm-send takes no query
    ]:
        with pytest.raises(UsageError, match=message):
            kt.parse_kafka_url(url)
    with pytest.raises(UsageError, match="unknown parameter 'x'"):
        kt.parse_kafka_url("kafka://h:9/t?x=1", consumer=True)


def test_kafka_options_and_settings(tmp_path):
    conf = tmp_path / "client.properties"
    conf.write_text("# SASL\nsecurity.protocol=SASL_SSL\nsasl.password = s3cret\n\n")
    opts = kt.read_options(["sasl.mechanism=PLAIN", "security.protocol=SASL_PLAINTEXT"], str(conf))
    assert opts == {
        "security.protocol": "SASL_PLAINTEXT",  # the command line wins over the file
        "sasl.password": "s3cret",
        "sasl.mechanism": "PLAIN",
    }
    with pytest.raises(UsageError, match="KEY=VALUE"):
        kt.read_options(["nonsense"])
    ep = kt.parse_kafka_url("kafka://h:1/t?group=g", consumer=True)
    s = kt.KafkaSettings(options=opts)
    p = s.producer_config(ep)
    assert p["acks"] == "all" and p["enable.idempotence"] is True
    assert p["partitioner"] == "murmur2_random" and p["sasl.password"] == "s3cret"
    assert kt.KafkaSettings(acks="1").producer_config(ep)["enable.idempotence"] is False
    cc = s.consumer_config(ep)
    assert cc["enable.auto.commit"] is False and cc["group.id"] == "g"
    with pytest.raises(UsageError, match="set by stm itself"):
        kt.KafkaSettings(options={"enable.auto.commit": "true"}).consumer_config(ep)
    with pytest.raises(UsageError, match="--kafka-acks"):
        kt.KafkaSettings(acks="2")


OFFERED = [sess.stream_info(42, "gre", "amf-1")]


def request(**over) -> bytes:
    body = sess.build_request(["127.0.0.1:9092"], "stm", [{"streamId": "42"}], "c1")
    body.update(over)
    return json.dumps(body).encode()


def test_session_request_accepted():
    r = sess.parse_request(request(), OFFERED)
    assert r.brokers == ("127.0.0.1:9092",) and r.topic == "stm" and r.consumer == "c1"
    assert r.streams == tuple(OFFERED)
    info = sess.session_info(sess.Session("s-1", r, "amf-1"))
    assert info["sessionId"] == "s-1" and info["state"] == "ACTIVE"
    assert info["streams"][0]["serializationFormat"] == "STM_FORMAT_A"
    answer = sess.parse_answer(201, sess.encode(info))
    assert answer["messageBus"]["topic"] == "stm"


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"{", 400, "not JSON"),
        (b"[]", 400, "JSON object"),
        (request(messageBus=None), 400, "messageBus"),
        (
            request(messageBus={"protocol": "MQTT", "brokerEndpoints": ["h:1"], "topic": "t"}),
            400,
            "not supported",
        ),
        (request(messageBus={"brokerEndpoints": [], "topic": "t"}), 400, "non-empty"),
        (request(messageBus={"brokerEndpoints": ["h"], "topic": "t"}), 400, "host:port"),
        (request(messageBus={"brokerEndpoints": ["h:1"], "topic": "a b"}), 400, "bad topic"),
        (request(streams=[]), 400, "streamInfoList"),
        (request(streams=[{"streamId": 42}]), 400, "string streamId"),
        (request(streams=[{"streamId": "7"}]), 422, "stream 7: unknown stream"),
        (
            request(streams=[{"streamId": "42", "serializationFormat": "GPB"}]),
            422,
            "serializationFormat 'GPB' is not offered",
        ),
        (b" " * (sess.MAX_BODY + 1), 413, "over"),
    ],
)
def test_session_request_refused(body, status, reason):
    with pytest.raises(sess.SessionRefused) as info:
        sess.parse_request(body, OFFERED)
    assert info.value.status == status
    assert reason in str(info.value)
    assert reason in sess.describe_refusal(info.value.body)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x.pcap", "--to", "kafka://h:1"], "no topic"),
        (["x.pcap", "--to", "kafka://h:1/t?group=g"], "unknown parameter"),
        (["x.pcap", "--session-token-file", "t", "--to", "udp://127.0.0.1:9"], "is for --accept"),
        (["x.pcap", "--accept-sessions", "nowhere"], "want HOST:PORT"),
        (["x.pcap", "--accept-sessions", "127.0.0.1:0", "-o", "w.pcap"], "not with --output"),
        (["x.pcap", "--kafka-option", "oops", "--to", "kafka://h:1/t"], "KEY=VALUE"),
    ],
)
def test_send_arguments(tmp_path, monkeypatch, args, message):
    from stm.cli.send import main

    monkeypatch.chdir(tmp_path)
    capture(tmp_path / "x.pcap", 1, "x")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "kafka://h:1/t", "--establish", "ftp://p"], "want http://HOST:PORT"),
        (["--listen", "udp://127.0.0.1:0", "--establish", "http://p:1"], "exactly one --listen"),
        (["--listen", "kafka://h:1/t", "--session-token-file", "x"], "is for --establish"),
        (["--listen", "kafka://h:1/t?group="], "needs a value"),
        (["--listen", "kafka://h:1/t", "--kafka-option", "group.id=x"], "set by stm itself"),
    ],
)
def test_recv_arguments(tmp_path, monkeypatch, args, message):
    from stm.cli.recv import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [*args, "-w", "out.pcapng"])
    assert result.exit_code == 2 and message in result.output, result.output


# -- through a broker ------------------------------------------------------------------------------


def test_round_trip_of_the_samples_in_both_formats(broker, tmp_path, procs):
    """Every sample through the bus, exactly, in order; key and headers on every record.
    Format A in 64 KiB reports (the default with only kafka:// destinations); format B at
    --mtu 1500, which fragments the jumbo packet over several records."""
    total = sum(count(s) for s in SAMPLES)
    want = [p.key() for s in SAMPLES for p in pcapng.read(s)]
    runs = {}
    for fmt, extra in (("gre", []), ("tlv", ["--mtu", "1500"])):
        topic = topic_name(f"rt-{fmt}")
        cmd = [*SEND, *map(str, SAMPLES), "--format", fmt, "--producer", f"p-{fmt}", *extra]
        summary = json.loads(
            subprocess.run(
                [*cmd, "--to", f"kafka://{broker.bootstrap}/{topic}", "--json"],
                capture_output=True,
                check=True,
                timeout=60,
            ).stdout
        )
        dest = summary["destinations"][f"kafka://{broker.bootstrap}/{topic}"]
        assert dest["sent"] == summary["reports"] and dest["undelivered"] == 0
        out = tmp_path / f"{fmt}.pcapng"
        rx = Proc(
            [
                *RECV,
                "--listen",
                f"kafka://{broker.bootstrap}/{topic}?group=g",
                "-w",
                str(out),
                "--count",
                str(total),
                "--duration",
                "60",
                "--json",
            ]
        )
        procs.append(rx)
        runs[fmt] = (topic, summary, out, rx)
    for fmt, (topic, summary, out, rx) in runs.items():
        result = rx.json(timeout=60)
        assert result["packets_written"] == total
        assert result["lost"] == result["duplicates"] == result["malformed"] == 0
        assert [p.key() for p in pcapng.read(out)] == want
        if fmt == "gre":
            assert summary["reports"] < 5  # 64 KiB reports
        else:
            assert summary["fragmented"] == 1
        got = records(broker, topic, summary["reports"])
        assert len(got) == summary["reports"]
        assert {m.key() for m in got} == {str(summary["stream_id"]).encode()}
        assert len({m.partition() for m in got}) == 1  # one stream, one partition
        for m in got:
            assert dict(m.headers()) == {
                "stm-producer": f"p-{fmt}".encode(),
                "stm-format": fmt.encode(),
            }


def test_repeated_records_are_counted_as_duplicates_not_written(broker, tmp_path):
    """The bus may deliver a record twice (a producer retry without idempotence, a
    rebalance after a failed commit): the stream's sequence numbers catch it."""
    real_only(broker)
    topic = topic_name("dup")
    src = capture(tmp_path / "src.pcapng", 40, "dup")
    summary = json.loads(
        subprocess.run(
            [
                *SEND,
                str(src),
                "--mtu",
                "600",
                "--json",
                "--to",
                f"kafka://{broker.bootstrap}/{topic}",
            ],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    )
    n = summary["reports"]
    assert n >= 10
    original = records(broker, topic, n)
    again = original[2:8]
    p = ck.Producer({"bootstrap.servers": broker.bootstrap})
    for m in again:
        p.produce(topic, m.value(), m.key(), partition=m.partition(), headers=m.headers())
    assert p.flush(30) == 0
    out = tmp_path / "out.pcapng"
    rx = Proc(
        [
            *RECV,
            "--listen",
            f"kafka://{broker.bootstrap}/{topic}?group=g",
            "-w",
            str(out),
            "--flush-interval",
            "0.2",
            "--json",
        ]
    )
    try:
        wait_committed(broker, "g", topic)
    finally:
        result = rx.json(sig=signal.SIGTERM)
    assert result["packets_written"] == 40
    assert result["duplicates"] == len(again) and result["datagrams"] == n
    assert keys(out) == keys(src)


def test_two_consumers_in_a_group_split_the_partitions_and_a_rebalance_loses_nothing(
    broker, tmp_path, procs
):
    """Four streams over four partitions; a second stm-recv joins the group mid-stream.
    Together the two files hold every packet exactly once."""
    real_only(broker)
    topic, group = topic_name("split"), "split"
    create_topic(broker, topic, 4)
    ids, candidate = {}, 1000
    while len(ids) < 4:  # a stream ID for each partition (the Java client's murmur2)
        ids.setdefault(partition_of(candidate, 4), candidate)
        candidate += 1
    a = Proc(
        [
            *RECV,
            "--listen",
            f"kafka://{broker.bootstrap}/{topic}?group={group}",
            "-w",
            str(tmp_path / "a.pcapng"),
            "--flush-interval",
            "0.3",
            "--json",
            "-v",
        ]
    )
    procs.append(a)
    a.wait_for("assigned")
    sources, senders = {}, []
    for part, sid in sorted(ids.items()):
        sources[part] = src = capture(tmp_path / f"s{part}.pcapng", 100, f"s{part}")
        cmd = [*SEND, str(src), "--producer", f"p{part}", "--stream-id", str(sid), "--loop", "0"]
        cmd += ["--mtu", "1000", "--rate", "100", "--json"]
        senders.append(Proc([*cmd, "--to", f"kafka://{broker.bootstrap}/{topic}"]))
    procs.extend(senders)
    time.sleep(0.8)  # a has records before b comes
    b = stm_recv(f"kafka://{broker.bootstrap}/{topic}?group={group}", tmp_path / "b.pcapng", "-v")
    procs.append(b)
    b.wait_for("assigned")
    time.sleep(1.5)  # and both have some after the rebalance
    want: list = []
    for part, s in zip(sorted(ids), senders, strict=True):
        summary = s.json(timeout=30, sig=signal.SIGTERM)
        assert summary["destinations"][f"kafka://{broker.bootstrap}/{topic}"]["undelivered"] == 0
        loop = keys(sources[part])
        n = summary["packets"]
        want += loop * (n // len(loop)) + loop[: n % len(loop)]
    ends = wait_committed(broker, group, topic)
    ra, rb = a.json(sig=signal.SIGTERM), b.json(sig=signal.SIGTERM)
    got_a, got_b = keys(tmp_path / "a.pcapng"), keys(tmp_path / "b.pcapng")
    assert got_a and got_b, a.err + "-----\n" + b.err
    assert Counter(got_a + got_b) == Counter(want)  # all, each once
    assert ra["packets_written"] + rb["packets_written"] == len(want) > 400
    assert ra["kafka"][0]["rebalances"] >= 1  # it gave partitions to b
    assert ra["duplicates"] == rb["duplicates"] == 0
    assert sum(ends.values()) == ra["datagrams"] + rb["datagrams"]
    placed = {m.partition(): int(m.key()) for m in records(broker, topic, sum(ends.values()))}
    assert placed == ids  # the key picks the partition as the Java client would


def test_kill_9_and_restart_loses_nothing(broker, tmp_path, procs):
    """stm-recv killed with SIGKILL mid-stream and started again (same static member):
    the records after its last commit come again, so nothing is lost; the new process
    writes each packet once."""
    real_only(broker)
    topic, group = topic_name("kill"), "kill"
    create_topic(broker, topic, 4)
    src = capture(tmp_path / "src.pcapng", 500, "kill")
    want = keys(src)
    url = f"kafka://{broker.bootstrap}/{topic}?group={group}&instance=collector-1"
    first = stm_recv(url, tmp_path / "1.pcapng", "-v")
    procs.append(first)
    first.wait_for("assigned")
    to = f"kafka://{broker.bootstrap}/{topic}"
    sender = Proc([*SEND, str(src), "--mtu", "1000", "--rate", "125", "--json", "--to", to])
    procs.append(sender)
    committed = wait_commit(broker, group, topic, above=100)  # mid-stream, after a commit
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    second = stm_recv(url, tmp_path / "2.pcapng")
    procs.append(second)
    assert sender.json(timeout=60)["packets"] == 500
    ends = wait_committed(broker, group, topic)
    result = second.json(sig=signal.SIGTERM)
    got1, got2 = keys(tmp_path / "1.pcapng"), keys(tmp_path / "2.pcapng")
    assert 0 < len(got1) < 500, "the kill did not land mid-stream"
    assert set(got1) | set(got2) == set(want)  # nothing lost
    assert len(set(got2)) == len(got2) == result["packets_written"]  # none written twice
    assert result["lost"] == 0 and result["duplicates"] == 0
    # the new process starts where the killed one last committed: it reads again what
    # came after that (some of which the killed one had written), and no more
    assert result["datagrams"] == sum(ends.values()) - committed


def test_sender_with_no_broker_counts_every_report_undelivered(tmp_path):
    src = capture(tmp_path / "src.pcapng", 30, "down")
    url = f"kafka://127.0.0.1:{free_port()}/t"
    started = time.monotonic()
    r = subprocess.run(
        [*SEND, str(src), "--mtu", "600", "--kafka-timeout", "1.5", "--json", "--to", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 15
    summary = json.loads(r.stdout)
    dest = summary["destinations"][url]
    assert dest["sent"] == 0 and dest["undelivered"] == summary["reports"] > 1
    assert "no broker answers" in r.stderr
    assert f"{summary['reports']} report(s) not delivered" in r.stderr


def test_sender_when_the_broker_goes_away_mid_stream(broker, tmp_path, procs):
    """A second broker (librdkafka's mock: the client sees the same), stopped while
    stm-send publishes: a bounded queue, loss counted and said."""
    other = start_broker(tmp_path / "other", "mock")  # a second JVM would cost 10 s more
    if isinstance(other, str):
        other = start_broker(tmp_path / "other-kafka", "kafka")
    if isinstance(other, str):
        pytest.skip(f"a second broker did not start: {other}")
    try:
        src = capture(tmp_path / "src.pcapng", 100, "away")
        url = f"kafka://{other.bootstrap}/away"
        sender = Proc(
            [
                *SEND,
                str(src),
                "--loop",
                "0",
                "--rate",
                "400",
                "--mtu",
                "600",
                "--queue",
                "50",
                "--queue-policy",
                "drop-oldest",
                "--kafka-timeout",
                "1.5",
                "--drain-timeout",
                "1",
                "--json",
                "--to",
                url,
            ]
        )
        procs.append(sender)
        time.sleep(2.0)
    finally:
        other.stop()
    time.sleep(3.0)
    started = time.monotonic()
    summary = sender.json(timeout=30, sig=signal.SIGTERM)
    assert time.monotonic() - started < 15
    dest = summary["destinations"][url]
    assert dest["sent"] > 0  # before the broker went
    assert dest["dropped"] > 0 and dest["undelivered"] > 0  # after: a full queue, expired
    assert dest["sent"] + dest["dropped"] + dest["undelivered"] == summary["reports"]
    assert "report(s) not delivered" in sender.err
    assert "Traceback" not in sender.err


def test_session_round_trip_refusals_and_termination(broker, tmp_path, procs):
    real_only(broker)
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    # 1. a producer that waits for a session, then sends the samples once: exact round trip
    total = sum(count(s) for s in SAMPLES)
    producer = Proc(
        [
            *SEND,
            *map(str, SAMPLES),
            "--producer",
            "amf-1",
            "--accept-sessions",
            "127.0.0.1:0",
            "--session-token-file",
            str(token),
            "--kafka-timeout",
            "2",  # how long a consumer's brokers have to answer
            "--json",
        ]
    )
    procs.append(producer)
    base = producer.wait_for(r"accepting streaming sessions on (http://\S+)").group(1)
    root = base.removesuffix(sess.API_ROOT)
    status, streams, _ = http("GET", base + "/streams", token="t0ken")
    assert status == 200 and streams[0]["additionalInfo"]["vsData"] == "amf-1"
    sid = streams[0]["streamId"]
    topic = topic_name("session")
    bus = {"protocol": "KAFKA", "brokerEndpoints": [broker.bootstrap], "topic": topic}

    # refusals, each with its reason
    assert http("GET", base + "/streams")[0] == 401
    status, body, _ = http(
        "POST",
        base + "/sessions",
        {"messageBus": bus, "streams": [{"streamId": "1"}]},
        token="t0ken",
    )
    assert status == 422 and body["error"][0]["streamId"] == "1"
    status, body, _ = http("POST", base + "/sessions", b"{oops", token="t0ken")
    assert status == 400 and "not JSON" in body["error"]["errorInfo"]
    dead = {**bus, "brokerEndpoints": [f"127.0.0.1:{free_port()}"]}
    status, body, _ = http(
        "POST",
        base + "/sessions",
        {"messageBus": dead, "streams": [{"streamId": sid}]},
        token="t0ken",
    )
    assert status == 503 and "does not answer" in body["error"]["errorInfo"]
    bad = Proc(
        [
            *RECV,
            "--listen",
            f"kafka://{broker.bootstrap}/{topic}",
            "--establish",
            root,
            "-w",
            str(tmp_path / "bad.pcapng"),
        ]
    )
    procs.append(bad)
    code, _ = bad.finish()
    assert code == 1 and "a valid bearer token is required" in bad.err, bad.err

    # accepted: stm-recv establishes, receives everything, terminates on exit
    out = tmp_path / "session.pcapng"
    rx = Proc(
        [
            *RECV,
            "--listen",
            f"kafka://{broker.bootstrap}/{topic}?group=g",
            "--establish",
            root,
            "--session-token-file",
            str(token),
            "-w",
            str(out),
            "--count",
            str(total),
            "--duration",
            "60",
            "--json",
        ]
    )
    procs.append(rx)
    result = rx.json(timeout=60)
    assert result["packets_written"] == total
    assert keys(out) == [p.key() for s in SAMPLES for p in pcapng.read(s)]
    (session_id,) = result["sessions"]
    sent = producer.json(timeout=30)
    dest = sent["destinations"][base]
    assert dest["sessions"][session_id]["state"] == "TERMINATED"
    assert dest["sent"] == sent["reports"] and dest["refused"] == 3 and dest["no_session"] == 0
    assert f"session {session_id} established" in producer.err

    # 2. a live producer; the consumer leaves: the session ends and nothing more is published
    src = capture(tmp_path / "live.pcapng", 50, "live")
    live = Proc(
        [
            *SEND,
            str(src),
            "--loop",
            "0",
            "--rate",
            "100",
            "--mtu",
            "600",
            "--accept-sessions",
            "127.0.0.1:0",
            "--json",
        ]
    )
    procs.append(live)
    base = live.wait_for(r"accepting streaming sessions on (http://\S+)").group(1)
    topic = topic_name("live")
    rx = Proc(
        [
            *RECV,
            "--listen",
            f"kafka://{broker.bootstrap}/{topic}?group=g",
            "--establish",
            base,
            "-w",
            str(tmp_path / "live-out.pcapng"),
            "--duration",
            "3",
            "--json",
        ]
    )
    procs.append(rx)
    result = rx.json(timeout=30)
    (session_id,) = result["sessions"]
    assert result["packets_written"] > 0
    assert f"session {session_id} terminated (terminated by the consumer)" in live.wait_for(
        f"session {session_id} terminated.*"
    ).group(0)
    status, info, _ = http("GET", f"{base}/sessions/{session_id}")
    assert status == 200 and info["state"] == "TERMINATED"
    assert info["messageBus"]["topic"] == topic and info["statistics"]["undelivered"] == 0
    before = end_offsets(broker, topic)
    time.sleep(1.0)
    assert end_offsets(broker, topic) == before  # stopped publishing
    assert http("DELETE", f"{base}/sessions/{session_id}")[0] == 404
    summary = live.json(timeout=30, sig=signal.SIGTERM)
    assert summary["destinations"][base]["no_session"] > 0  # reports with nobody to take them
