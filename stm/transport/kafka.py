"""STM over a message bus: Apache Kafka through confluent-kafka (librdkafka).

- ``KafkaSender``: one STM report (the bytes a UDP datagram would carry, either format) per
  record; the key is the stream ID, so a stream stays in order within its partition; the
  headers carry the producer name and the format. Delivery reports are counted: librdkafka
  retries what the bus did not accept until the delivery timeout, then the report is
  counted as undelivered and said so.
- ``KafkaReceiver``: a consumer group member for stm-recv's selector loop. A thread polls
  the consumer and hands records over through a bounded queue and a socketpair that wakes
  the loop. Offsets are committed only for records whose packets the output has written
  and flushed (``after_flush``), and before a rebalance takes partitions away the output is
  flushed and their offsets committed, so neither a crash nor a rebalance loses a record.
- ``SessionServer`` and ``establish``/``terminate``: the consumer-driven streaming session
  of seed 001 over HTTP, with the bodies of ``stm.session``.

confluent-kafka is an optional dependency (``pip install 'stm[kafka]'``): it is imported
when a kafka:// URL is used, never before. See docs/streaming.md.
"""

from __future__ import annotations

import contextlib
import hmac
import http.server
import ipaddress
import json
import logging
import re
import secrets
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field

from stm import session as sess
from stm.errors import StmError, UsageError
from stm.logbudget import LogBudget

log = logging.getLogger("stm")
_librdkafka_log = logging.getLogger("stm.librdkafka")

DEFAULT_PORT = 9092
# With only message-bus destinations, reports are sized for an MTU of 65,535 bytes: up to
# 65,507 bytes, still a valid UDP payload (a record can be relayed to a UDP collector as it
# is), far under Kafka's 1 MiB default record limit, and up to 40 times fewer records than
# with a 1500-byte MTU, so per-record costs (produce, delivery report, fetch, decode,
# offset bookkeeping) are spread over more packets. --linger bounds the wait for a report.
REPORT_MTU = 65535
GROUP = "stm-recv"
ACKS = ("all", "1", "0")
COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")
HEADER_PRODUCER = "stm-producer"
HEADER_FORMAT = "stm-format"
_KEY = re.compile(r"[a-z0-9][a-z0-9._-]*")
# Properties stm sets itself from its URL and options: --kafka-option may not change them.
_OWN_SEND = {"bootstrap.servers", "on_delivery", "error_cb", "logger"}
_OWN_RECV = {
    "bootstrap.servers",
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "error_cb",
    "logger",
    "on_commit",
}


def _kafka():
    try:
        import confluent_kafka
    except ImportError:
        raise UsageError(
            "kafka:// needs confluent-kafka (pip install 'stm[kafka]' or confluent-kafka)"
        ) from None
    return confluent_kafka


def _reason(exc: BaseException) -> str:
    """One line out of a KafkaException (its KafkaError) or any exception."""
    arg = exc.args[0] if getattr(exc, "args", None) else exc
    text = arg.str() if hasattr(arg, "str") else str(arg)
    return text.splitlines()[0] if text else type(exc).__name__


# -- URLs and settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KafkaEndpoint:
    """``kafka://BROKER[,BROKER...]/TOPIC[?group=NAME&instance=ID]``."""

    brokers: tuple[str, ...]
    topic: str
    group: str | None = None
    instance: str | None = None
    scheme: str = "kafka"

    @property
    def bootstrap(self) -> str:
        return ",".join(self.brokers)

    def __str__(self) -> str:
        return f"kafka://{self.bootstrap}/{self.topic}"


def parse_kafka_url(url: str, *, consumer: bool = False) -> KafkaEndpoint:
    """Parse and check a kafka:// URL; UsageError with a one-line reason.

    Brokers are ``host[:port]`` (port 9092 by default) or ``[v6]:port``, separated by
    commas; the path is the topic. Query: ``group`` (the consumer group, default
    ``stm-recv``) and ``instance`` (static membership: a restarted stm-recv with the same
    instance takes its partitions back at once), for stm-recv only.
    """
    if not url.startswith("kafka://"):
        raise UsageError(f"bad URL {url!r}: not kafka://")
    rest, _, query = url[len("kafka://") :].partition("?")
    netloc, slash, topic = rest.partition("/")
    if not netloc:
        raise UsageError(f"bad URL {url!r}: no broker")
    if not slash or not topic:
        raise UsageError(f"bad URL {url!r}: no topic (kafka://BROKER[,BROKER...]/TOPIC)")
    brokers = []
    for b in netloc.split(","):
        if not b:
            raise UsageError(f"bad URL {url!r}: empty broker")
        if b.startswith("["):
            if "]:" not in b and b.endswith("]"):
                b = f"{b}:{DEFAULT_PORT}"
        elif ":" not in b:
            b = f"{b}:{DEFAULT_PORT}"
        try:
            brokers.append(sess.check_broker(b))
        except ValueError as exc:
            raise UsageError(f"bad URL {url!r}: {exc}") from None
    try:
        sess.check_topic(topic)
    except ValueError as exc:
        raise UsageError(f"bad URL {url!r}: {exc}") from None
    try:
        params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        params = {} if not query else {"": ""}
    allowed = ("group", "instance") if consumer else ()
    for k, v in params.items():
        if k not in allowed:
            what = "stm-recv takes group= and instance=" if consumer else "no query for stm-send"
            raise UsageError(f"bad URL {url!r}: unknown parameter {k!r} ({what})")
        if not v or len(v) > 249:
            raise UsageError(f"bad URL {url!r}: {k}= needs a value")
    group = params.get("group", GROUP) if consumer else None
    return KafkaEndpoint(tuple(brokers), topic, group, params.get("instance"))


def read_options(pairs=(), config_file: str | None = None) -> dict[str, str]:
    """librdkafka properties from a file (``key=value`` lines, ``#`` comments, as Java
    properties) and ``KEY=VALUE`` pairs (which win); for SASL, SSL and the rest."""
    options: dict[str, str] = {}
    lines: list[tuple[str, str]] = []
    if config_file is not None:
        try:
            with open(config_file, encoding="utf-8") as f:
                lines += [(line, f"{config_file}:{n}") for n, line in enumerate(f, 1)]
        except OSError as exc:
            raise UsageError(f"--kafka-config: cannot read {config_file}: {exc.strerror}") from None
    lines += [(p, "--kafka-option") for p in pairs]
    for line, where in lines:
        text = line.strip()
        if where != "--kafka-option" and (not text or text.startswith(("#", "!"))):
            continue
        key, sep, value = text.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not _KEY.fullmatch(key):
            raise UsageError(f"{where}: want KEY=VALUE (a librdkafka property), not {text!r}")
        options[key] = value
    return options


@dataclass
class KafkaSettings:
    """What stm-send's and stm-recv's --kafka-* options say, for every producer/consumer."""

    acks: str = "all"
    compression: str = "lz4"
    linger: float = 0.005
    batch_size: int = 1_000_000
    timeout: float = 60.0
    queue_limit: int = 10000
    policy: str = "block"
    drain_timeout: float = 10.0
    options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.acks not in ACKS:
            raise UsageError(f"--kafka-acks must be one of {', '.join(ACKS)}")
        if self.compression not in COMPRESSIONS:
            raise UsageError(f"--kafka-compression must be one of {', '.join(COMPRESSIONS)}")
        if self.timeout <= 0 or self.linger < 0 or self.batch_size < 1:
            raise UsageError(
                "need --kafka-timeout > 0, --kafka-linger >= 0, --kafka-batch-size > 0"
            )

    @classmethod
    def from_cli(cls, options: dict, **more) -> KafkaSettings:
        """From the ``kafka_*`` parameters of stm-send or stm-recv (and ``more``)."""
        extra = read_options(options.get("kafka_options", ()), options.get("kafka_config"))
        known = {
            name: options[f"kafka_{name}"]
            for name in ("acks", "compression", "linger", "batch_size", "timeout")
            if options.get(f"kafka_{name}") is not None
        }
        return cls(**known, **more, options=extra)

    def _extra(self, own: set[str]) -> dict[str, str]:
        for key in self.options:
            if key in own:
                raise UsageError(
                    f"--kafka-option {key}: set by stm itself (from the URL or its own options)"
                )
        return dict(self.options)

    def producer_config(self, endpoint: KafkaEndpoint) -> dict:
        idempotent = self.acks == "all"  # librdkafka's idempotence needs acks=all
        config = {
            "bootstrap.servers": endpoint.bootstrap,
            "client.id": "stm-send",
            "acks": self.acks,
            "enable.idempotence": idempotent,
            "compression.type": self.compression,
            "linger.ms": self.linger * 1000,
            "batch.size": self.batch_size,
            "message.timeout.ms": max(1, int(self.timeout * 1000)),
            "queue.buffering.max.messages": self.queue_limit,
            "queue.buffering.max.kbytes": min(1 << 20, max(1024, self.queue_limit * 64)),
            # as the Java client: a key goes to the same partition whoever produces it
            "partitioner": "murmur2_random",
        }
        config.update(self._extra(_OWN_SEND))
        return config

    def consumer_config(self, endpoint: KafkaEndpoint) -> dict:
        config = {
            "bootstrap.servers": endpoint.bootstrap,
            "client.id": "stm-recv",
            "group.id": endpoint.group or GROUP,
            "enable.auto.commit": False,  # committed after the output is flushed
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",  # a new group reads what the topic holds
        }
        if endpoint.instance:
            config["group.instance.id"] = endpoint.instance
        config.update(self._extra(_OWN_RECV))
        return config


def _quiet_library(config: dict) -> dict:
    """librdkafka's own log lines go to a logger shown only with -vv; stm says what matters
    in its own words (error_cb, delivery reports)."""
    _librdkafka_log.setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL)
    return {**config, "logger": _librdkafka_log}


# -- sender ---------------------------------------------------------------------------------------


class KafkaSender:
    """Publishes reports to one topic; a destination like ``UdpSender`` and ``TcpSender``.

    Counters (``stats``): ``sent`` is what the bus acknowledged (with ``acks=all``: written
    to every in-sync replica); ``dropped`` what a full queue refused under the drop policy;
    ``undelivered`` what the bus did not accept within the delivery timeout (librdkafka
    retries until then), or what was still queued at close. After ``close``,
    ``sent + dropped + undelivered`` equals the reports given to ``send``.
    """

    message_bus = True
    ip_header = 20  # reports stay valid UDP payloads (see REPORT_MTU)

    def __init__(
        self,
        endpoint: KafkaEndpoint,
        settings: KafkaSettings,
        *,
        key: bytes,
        headers: list[tuple[str, bytes]],
        check: bool = True,
        strict: bool = False,
    ) -> None:
        ck = _kafka()
        self._ck = ck
        self.endpoint = endpoint
        self.url = str(endpoint)
        self.topic = endpoint.topic
        self.key = key
        self.headers = headers
        self.policy = settings.policy
        self.given = 0
        self.sent = 0
        self.bytes = 0
        self.dropped = 0
        self.undelivered = 0
        self.reconnects = 0
        self.errors: Counter[str] = Counter()
        self.last_error: str | None = None
        self._budget = LogBudget(burst=3, window=10.0)
        self._lock = threading.Lock()
        self._closing = False
        self._closed = False
        self.quiet = not check  # a session's check says it all in its refusal
        config = _quiet_library(settings.producer_config(endpoint))
        config["error_cb"] = self._on_error
        try:
            self.producer = ck.Producer(config)
        except (ck.KafkaException, ValueError, TypeError) as exc:
            raise UsageError(f"{self.url}: {_reason(exc)}") from None
        if check:  # a clear word at the start if no broker answers (then carry on)
            self.check(min(5.0, settings.timeout), strict=strict)

    def check(self, timeout: float, *, strict: bool = False) -> bool:
        """Ask the brokers for the topic's metadata: True if one answers in ``timeout``.
        Otherwise a warning (reports wait in the queue), or StmError when ``strict``."""
        try:
            self.producer.list_topics(self.topic, timeout=timeout)
            self.quiet = False
            return True
        except self._ck.KafkaException as exc:
            reason = _reason(exc)
        message = f"{self.url}: no broker answers ({reason})"
        if strict:
            raise StmError(message)
        log.warning("%s; reports wait up to the delivery timeout for one", message)
        return False

    def _on_error(self, err) -> None:
        code = err.code()
        if code == self._ck.KafkaError._ALL_BROKERS_DOWN:
            self.reconnects += 1
        self.last_error = err.str()
        if err.fatal():
            log.error("%s: %s", self.url, err.str())
        elif not self.quiet:
            self._budget.warning("%s: %s", self.url, err.str())

    def _delivered(self, err, msg) -> None:
        if err is None:
            self.sent += 1
            self.bytes += len(msg)
        else:
            self.undelivered += 1
            self.errors[err.name()] += 1
            self.last_error = err.str()
            self._budget.warning("%s: a report was not delivered: %s", self.url, err.str())

    def send(self, reports: list[bytes]) -> None:
        producer = self.producer
        produce = producer.produce
        topic, key, headers, done = self.topic, self.key, self.headers, self._delivered
        block = self.policy == "block"
        with self._lock:
            if self._closing:
                self.given += len(reports)
                self.undelivered += len(reports)
                return
            for i, report in enumerate(reports):
                while True:
                    try:
                        produce(topic, report, key, headers=headers, on_delivery=done)
                        self.given += 1
                        break
                    except BufferError:  # the queue is full (--queue)
                        if not block:
                            self.given += 1
                            self.dropped += 1
                            break
                        if self._closing:
                            left = len(reports) - i
                            self.given += left
                            self.undelivered += left
                            return
                        producer.poll(0.05)  # room comes as records are acked or expire
                    except self._ck.KafkaException as exc:
                        self.given += 1
                        self.undelivered += 1
                        self.last_error = _reason(exc)
                        self._budget.warning("%s: %s", self.url, self.last_error)
                        break
            producer.poll(0)

    def close(self, timeout: float = 10.0) -> None:
        """Wait up to ``timeout`` seconds for what is queued; count the rest undelivered."""
        self._closing = True
        with self._lock:
            if self._closed:
                return
            self._closed = True
            producer = self.producer
            left = producer.flush(max(0.0, timeout))
            if left:
                producer.purge(in_queue=True, in_flight=True, blocking=False)
                left = producer.flush(1.0)  # the purged records' delivery reports
                self.undelivered += left  # not even reported: count them all the same
        if self.undelivered or self.dropped:
            log.warning(
                "%s: %d report(s) not delivered, %d dropped from a full queue%s",
                self.url,
                self.undelivered,
                self.dropped,
                f" (last error: {self.last_error})" if self.last_error else "",
            )

    def stats(self) -> dict:
        queued = 0
        if not self._closed:
            with contextlib.suppress(RuntimeError):
                queued = len(self.producer)
        return {
            "sent": self.sent,
            "bytes": self.bytes,
            "dropped": self.dropped,
            "undelivered": self.undelivered,
            "reconnects": self.reconnects,
            "queued": queued,
            "errors": dict(self.errors),
        }


# -- receiver -------------------------------------------------------------------------------------


class _Revoke:
    """A rebalance takes ``partitions`` away: flush the output, then they are committed."""

    __slots__ = ("done", "partitions")

    def __init__(self, partitions: set[tuple[str, int]]) -> None:
        self.partitions = partitions
        self.done = threading.Event()


class KafkaReceiver:
    """One consumer group member, served from stm-recv's selector loop.

    ``sock`` becomes readable when records wait; ``drain()`` yields ``(report, source)``
    with ``source`` ``("kafka:TOPIC/PARTITION", offset)``. Every record yielded has been
    handed to the decoder when the next is asked for; ``after_flush()`` (the output is
    flushed) makes those offsets committable, and the consumer thread commits them. Before
    a rebalance takes partitions away, the thread queues a ``_Revoke`` behind the records
    already handed over and waits: the loop reaches it after those records, calls
    ``flush`` (the output's flush, which calls every receiver's ``after_flush``), and the
    thread commits before the partitions go. ``max_queued`` bounds the records waiting.
    """

    message_bus = True

    def __init__(
        self,
        endpoint: KafkaEndpoint,
        settings: KafkaSettings,
        *,
        flush=None,
        max_queued: int = 20000,
        batch: int = 500,
        revoke_timeout: float = 30.0,
    ) -> None:
        ck = _kafka()
        self._ck = ck
        self.endpoint = endpoint
        self.url = f"{endpoint}?group={endpoint.group}"
        self.flush = flush
        self.max_queued = max_queued
        self.batch = batch
        self.revoke_timeout = revoke_timeout
        self.records = 0
        self.bytes = 0
        self.commits = 0
        self.commit_failures = 0
        self.rebalances = 0
        self.errors = 0
        self.assigned: set[tuple[str, int]] = set()
        self._budget = LogBudget(burst=3, window=10.0)
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._queue: deque = deque()
        self._queued = 0  # records (not markers) in the queue
        self._handed: dict[tuple[str, int], int] = {}  # next offset; the loop's thread only
        self._flushed: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}
        self._ever_committed: dict[tuple[str, int], int] = {}  # for stats: kept past revokes
        self._retry_at = 0.0
        self._stop = threading.Event()
        self._in_thread = threading.local()
        self._failure: str | None = None
        self._closed = False
        self._waiting_topic = False
        config = _quiet_library(settings.consumer_config(endpoint))
        config["error_cb"] = self._on_error
        try:
            self.consumer = ck.Consumer(config)
        except (ck.KafkaException, ValueError, TypeError) as exc:
            raise UsageError(f"{self.url}: {_reason(exc)}") from None
        self.sock, self._waker = socket.socketpair()
        self.sock.setblocking(False)
        self._waker.setblocking(False)
        try:
            self.consumer.subscribe(
                [endpoint.topic], on_assign=self._on_assign, on_revoke=self._on_revoke
            )
        except (ck.KafkaException, ValueError) as exc:
            self._close_sockets()
            raise UsageError(f"{self.url}: {_reason(exc)}") from None
        self._thread = threading.Thread(target=self._run, name=f"stm {self.url}", daemon=True)
        self._thread.start()

    # -- the loop's side ------------------------------------------------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self, limit: int = 1024):
        """Up to ``limit`` records waiting now, as ``(report, source)``."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self.sock.recv(4096):
                pass
        if self._failure is not None:
            raise StmError(f"{self.url}: {self._failure}")
        return self._records(limit)

    def _records(self, limit: int):
        with self._lock:
            n = min(limit, len(self._queue))
            items = [self._queue.popleft() for _ in range(n)]
        i = 0
        handed = self._handed
        try:
            while i < len(items):
                item = items[i]
                i += 1
                if type(item) is _Revoke:
                    self._revoked(item)
                    continue
                tp = (item.topic(), item.partition())
                offset = item.offset()
                handed[tp] = offset + 1
                value = item.value() or b""
                self.records += 1
                self.bytes += len(value)
                yield value, (f"kafka:{tp[0]}/{tp[1]}", offset)
        finally:
            rest = items[i:]
            taken = sum(1 for x in items[:i] if type(x) is not _Revoke)
            with self._lock:
                self._queue.extendleft(reversed(rest))
                self._queued -= taken
                self._room.notify_all()
                more = bool(self._queue)
            if more:
                self._wake()

    def _revoked(self, marker: _Revoke) -> None:
        """Every record before the marker is in the output: flush it, then let go."""
        if self.flush is not None:
            self.flush()
        else:
            self.after_flush()
        for tp in marker.partitions:
            self._handed.pop(tp, None)
        marker.done.set()

    def after_flush(self) -> None:
        """The output is flushed: what was handed to the decoder may be committed."""
        if self._handed:
            with self._lock:
                self._flushed.update(self._handed)

    def close(self) -> None:
        """Stop the thread, commit what was flushed, leave the group."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with self._lock:
            self._room.notify_all()
        self._thread.join(10.0)
        if self._thread.is_alive():
            log.warning("%s: consumer thread did not stop in time", self.url)
        else:
            self._commit(sync_all=True)
            try:
                self.consumer.close()  # leaves the group: a rebalance, committed above
            except (self._ck.KafkaException, RuntimeError) as exc:
                log.warning("%s: %s", self.url, _reason(exc))
        self._close_sockets()

    def stats(self) -> dict:
        with self._lock:
            committed = {f"{t}/{p}": o for (t, p), o in sorted(self._ever_committed.items())}
        return {
            "records": self.records,
            "bytes": self.bytes,
            "commits": self.commits,
            "commit_failures": self.commit_failures,
            "rebalances": self.rebalances,
            "errors": self.errors,
            "committed": committed,
        }

    # -- the consumer thread ----------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._waker.send(b"\0")

    def _close_sockets(self) -> None:
        for s in (self.sock, self._waker):
            with contextlib.suppress(OSError):
                s.close()

    def _run(self) -> None:
        self._in_thread.yes = True
        consumer = self.consumer
        try:
            while not self._stop.is_set():
                self._commit()
                with self._lock:
                    while self._queued >= self.max_queued and not self._stop.is_set():
                        self._room.wait(0.1)
                if self._stop.is_set():
                    break
                got = consumer.consume(self.batch, 0.1)
                if not got:
                    continue
                records = []
                for m in got:
                    err = m.error()
                    if err is None:
                        records.append(m)
                    else:
                        self._on_error(err)
                if records:
                    with self._lock:
                        self._queue.extend(records)
                        self._queued += len(records)
                    self._wake()
        except Exception as exc:  # a bug or a fatal client error: stop stm-recv, say why
            self._failure = f"consumer stopped: {_reason(exc)}"
            log.debug("%s", self._failure, exc_info=True)
            self._wake()

    def _on_error(self, err) -> None:
        self.errors += 1
        if err.code() in (
            self._ck.KafkaError.UNKNOWN_TOPIC_OR_PART,
            self._ck.KafkaError._UNKNOWN_TOPIC,
        ):
            if not self._waiting_topic:
                self._waiting_topic = True
                log.info("%s: no topic %s yet; waiting for it", self.url, self.endpoint.topic)
            return
        if err.fatal():
            self._failure = f"consumer failed: {err.str()}"
            self._wake()
        self._budget.warning("%s: %s", self.url, err.str())

    def _commit(self, *, sync_all: bool = False, only: set | None = None) -> None:
        """Commit the offsets of flushed records not committed yet (synchronously)."""
        now = time.monotonic()
        if not sync_all and only is None and now < self._retry_at:
            return
        with self._lock:
            todo = {
                tp: off
                for tp, off in self._flushed.items()
                if self._committed.get(tp) != off and (only is None or tp in only)
            }
        if not todo:
            return
        tps = [self._ck.TopicPartition(t, p, off) for (t, p), off in todo.items()]
        try:
            result = self.consumer.commit(offsets=tps, asynchronous=False)
            failed = [tp for tp in result or () if tp.error is not None]
            if failed:
                raise self._ck.KafkaException(failed[0].error)
        except (self._ck.KafkaException, RuntimeError) as exc:
            self.commit_failures += 1
            self._retry_at = now + 1.0
            self._budget.warning("%s: commit failed (will retry): %s", self.url, _reason(exc))
            return
        with self._lock:
            self._committed.update(todo)
            self._ever_committed.update(todo)
        self.commits += 1

    def _on_assign(self, consumer, partitions) -> None:
        got = {(p.topic, p.partition) for p in partitions}
        self.assigned |= got
        log.info("%s: assigned %s", self.url, _names(got))

    def _on_revoke(self, consumer, partitions) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        self.rebalances += 1
        if getattr(self._in_thread, "yes", False) and not self._stop.is_set():
            marker = _Revoke(gone)
            with self._lock:
                self._queue.append(marker)
            self._wake()
            deadline = time.monotonic() + self.revoke_timeout
            while not marker.done.wait(0.05):
                if self._stop.is_set():
                    break
                if time.monotonic() > deadline:
                    log.warning(
                        "%s: the output was not flushed within %.0f s of a rebalance; the "
                        "next owner of %s may write some records again",
                        self.url,
                        self.revoke_timeout,
                        _names(gone),
                    )
                    break
        self._commit(only=gone)
        with self._lock:
            for tp in gone:
                self._flushed.pop(tp, None)
                self._committed.pop(tp, None)
            if any(
                type(x) is not _Revoke and (x.topic(), x.partition()) in gone for x in self._queue
            ):
                # left behind after a timeout: their next owner reads them again
                kept = [
                    x
                    for x in self._queue
                    if type(x) is _Revoke or (x.topic(), x.partition()) not in gone
                ]
                self._queued -= len(self._queue) - len(kept)
                self._queue = deque(kept)
        self.assigned -= gone
        log.info("%s: revoked %s", self.url, _names(gone))


def _names(tps) -> str:
    return ", ".join(f"{t}/{p}" for t, p in sorted(tps)) or "nothing"


# -- the session procedure: producer side ---------------------------------------------------------


def parse_listen_address(addr: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``http://HOST:PORT`` for --accept-sessions."""
    text = addr[len("http://") :] if addr.startswith("http://") else addr
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--accept-sessions {addr!r}: want HOST:PORT (port 0: any free port)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


class SessionServer:
    """stm-send's side of the session procedure, and the pipeline's destination for every
    session: an HTTP server in a thread; an established session gets a ``KafkaSender``
    publishing to the consumer's brokers until the session is terminated.

    ``GET {API_ROOT}/streams`` lists what this producer offers (its streamInfoList);
    ``POST {API_ROOT}/sessions`` establishes (201 with ``Location``, or a refusal);
    ``GET {API_ROOT}/sessions[/ID]`` tells; ``DELETE {API_ROOT}/sessions/ID`` terminates.
    """

    message_bus = True
    ip_header = 20

    def __init__(
        self,
        addr: str,
        settings: KafkaSettings,
        *,
        fmt: str,
        producer: str,
        stream: int,
        token: bytes | None = None,
        max_sessions: int = 16,
        check_timeout: float | None = None,
    ) -> None:
        host, port = parse_listen_address(addr)
        self.settings = settings
        self.fmt = fmt
        self.producer = producer
        self.stream = stream
        self.token = token
        self.max_sessions = max_sessions
        # how long the consumer's brokers have to answer before a session is refused
        self.check_timeout = min(5.0, settings.timeout) if check_timeout is None else check_timeout
        self.offered = [sess.stream_info(stream, fmt, producer)]
        self.no_session = 0
        self.refused = 0
        self.established = threading.Event()
        self._lock = threading.Lock()
        self._active: dict[str, tuple[sess.Session, KafkaSender]] = {}
        self._ended: deque[sess.Session] = deque(maxlen=256)
        self._senders_ended: list[KafkaSender] = []
        handler = type("Handler", (_SessionHandler,), {"server_side": self})
        try:
            self.httpd = http.server.ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise UsageError(f"cannot accept sessions on {host}:{port}: {exc.strerror}") from None
        self.httpd.daemon_threads = True
        bound = self.httpd.server_address
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}{sess.API_ROOT}"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.2,), name="stm sessions", daemon=True
        )
        self._thread.start()
        if token is None and not _loopback(bound[0]):
            log.warning(
                "anyone who reaches %s can have this capture published to brokers of its "
                "choice: give --session-token-file",
                self.url,
            )

    # -- destination ------------------------------------------------------------------------

    def send(self, reports: list[bytes]) -> None:
        with self._lock:
            senders = [s for _, s in self._active.values()]
        if not senders:
            self.no_session += len(reports)
        for s in senders:
            s.send(reports)

    def wait(self, stop) -> bool:
        """Wait for the first session (or ``stop``); True once one is established."""
        while not self.established.is_set():
            if stop.wait(0.1):
                return False
        return True

    def stats(self) -> dict:
        with self._lock:
            active = list(self._active.values())
            ended = list(self._ended)
        sessions = {}
        total = Counter()
        for s, sender in active:
            st = sender.stats()
            sessions[s.session_id] = {"state": s.state, "url": sender.url, **st}
        for s in ended:
            sessions[s.session_id] = {"state": s.state, **s.statistics}
        for st in sessions.values():
            for k in ("sent", "bytes", "dropped", "undelivered", "reconnects"):
                total[k] += st.get(k, 0)
        return {
            **{k: total[k] for k in ("sent", "bytes", "dropped", "undelivered", "reconnects")},
            "no_session": self.no_session,
            "refused": self.refused,
            "sessions": sessions,
        }

    def close(self, timeout: float = 10.0) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5.0)
        with self._lock:
            active = list(self._active)
        for sid in active:
            self.terminate(sid, timeout, why="stm-send is stopping")

    # -- the procedure ------------------------------------------------------------------------

    def establish(self, body: bytes, peer: str) -> tuple[int, dict, dict]:
        """(status, headers, body) for an establish request."""
        try:
            request = sess.parse_request(body, self.offered)
            with self._lock:
                self._check_room(request)
            ep = KafkaEndpoint(request.brokers, request.topic)
            sender = KafkaSender(
                ep,
                self.settings,
                key=str(self.stream).encode(),
                headers=record_headers(self.producer, self.fmt),
                check=False,
            )
            try:
                sender.check(self.check_timeout, strict=True)
            except StmError as exc:
                sender.close(0)
                raise sess.SessionRefused(
                    503, sess.error_body(f"the message bus does not answer: {exc}")
                ) from None
            session = sess.Session("stm-" + secrets.token_hex(8), request, self.producer)
            with self._lock:
                try:
                    self._check_room(request)
                except sess.SessionRefused:
                    sender.close(0)
                    raise
                self._active[session.session_id] = (session, sender)
        except sess.SessionRefused as exc:
            self.refused += 1
            log.warning("session request from %s refused (%d): %s", peer, exc.status, exc)
            return exc.status, {}, exc.body
        except UsageError as exc:  # a bad --kafka-option shows here first
            self.refused += 1
            return 500, {}, sess.error_body(str(exc))
        log.warning(
            "session %s established by %s: publishing stream %s to %s",
            session.session_id,
            request.consumer or peer,
            self.stream,
            sender.url,
        )
        self.established.set()
        headers = {"Location": sess.session_path(session.session_id)}
        return 201, headers, sess.session_info(session)

    def _check_room(self, request: sess.SessionRequest) -> None:
        for s, _ in self._active.values():
            r = s.request
            if set(r.brokers) & set(request.brokers) and r.topic == request.topic:
                raise sess.SessionRefused(
                    409,
                    sess.error_body(
                        f"session {s.session_id} already publishes to {r.topic} on those brokers"
                    ),
                )
        if len(self._active) >= self.max_sessions:
            raise sess.SessionRefused(
                503, sess.error_body(f"no more sessions: at most {self.max_sessions} at once")
            )

    def terminate(self, session_id: str, timeout: float | None = None, why: str = "") -> bool:
        with self._lock:
            got = self._active.pop(session_id, None)
        if got is None:
            return False
        session, sender = got
        sender.close(self.settings.drain_timeout if timeout is None else timeout)
        session.state = "TERMINATED"
        session.statistics = sender.stats()
        with self._lock:
            self._ended.append(session)
        st = session.statistics
        log.warning(
            "session %s terminated%s: %d report(s) delivered, %d undelivered, %d dropped",
            session_id,
            f" ({why})" if why else "",
            st["sent"],
            st["undelivered"],
            st["dropped"],
        )
        return True

    def info(self, session_id: str | None) -> tuple[int, object]:
        with self._lock:
            active = dict(self._active)
            ended = {s.session_id: s for s in self._ended}
        if session_id is None:
            out = []
            for s, sender in active.values():
                s.statistics = sender.stats()
                out.append(sess.session_info(s))
            return 200, out + [sess.session_info(s) for s in ended.values()]
        if session_id in active:
            s, sender = active[session_id]
            s.statistics = sender.stats()
            return 200, sess.session_info(s)
        if session_id in ended:
            return 200, sess.session_info(ended[session_id])
        return 404, sess.error_body(f"no session {session_id}")


def record_headers(producer: str, fmt: str) -> list[tuple[str, bytes]]:
    return [(HEADER_PRODUCER, producer.encode("utf-8")), (HEADER_FORMAT, fmt.encode())]


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _SessionHandler(http.server.BaseHTTPRequestHandler):
    server_side: SessionServer
    protocol_version = "HTTP/1.1"
    server_version = "stm-send"
    timeout = 30

    def log_message(self, format, *args) -> None:
        log.debug("sessions: %s %s", self.address_string(), format % args)

    def _answer(self, status: int, body=None, headers=None) -> None:
        data = b"" if body is None else sess.encode(body)
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _authorized(self) -> bool:
        token = self.server_side.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token):
            return True
        self._answer(401, sess.error_body("a valid bearer token is required"))
        return False

    def _route(self) -> tuple[str, str | None] | None:
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        if path == sess.STREAMS_PATH:
            return "streams", None
        if path == sess.SESSIONS_PATH:
            return "sessions", None
        prefix = sess.SESSIONS_PATH + "/"
        if path.startswith(prefix) and "/" not in path[len(prefix) :]:
            return "session", urllib.parse.unquote(path[len(prefix) :])
        self._answer(404, sess.error_body(f"no resource {path or '/'}"))
        return None

    def do_GET(self) -> None:
        route = self._route()
        if route is None or not self._authorized():
            return
        what, sid = route
        if what == "streams":
            self._answer(200, self.server_side.offered)
        else:
            self._answer(*self.server_side.info(sid))

    def do_POST(self) -> None:
        route = self._route()
        if route is None or not self._authorized():
            return
        if route[0] != "sessions":
            self._answer(405, sess.error_body("POST goes to " + sess.SESSIONS_PATH))
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._answer(411, sess.error_body("Content-Length is required"))
            return
        if int(length) > sess.MAX_BODY:
            self.close_connection = True
            self._answer(413, sess.error_body(f"request body over {sess.MAX_BODY} bytes"))
            return
        body = self.rfile.read(int(length))
        status, headers, answer = self.server_side.establish(body, self.address_string())
        self._answer(status, answer, headers)

    def do_DELETE(self) -> None:
        route = self._route()
        if route is None or not self._authorized():
            return
        what, sid = route
        if what != "session":
            self._answer(405, sess.error_body("DELETE goes to a session: .../sessions/ID"))
            return
        if self.server_side.terminate(sid, why="terminated by the consumer"):
            self._answer(204)
        else:
            self._answer(404, sess.error_body(f"no session {sid}"))


# -- the session procedure: consumer side ---------------------------------------------------------


@dataclass
class EstablishedSession:
    producer_url: str
    location: str
    session_id: str
    info: dict


def _api_base(producer_url: str) -> str:
    if not producer_url.startswith(("http://", "https://")):
        raise UsageError(f"--establish {producer_url!r}: want http://HOST:PORT")
    base = producer_url.rstrip("/")
    return base if base.endswith(sess.API_ROOT) else base + sess.API_ROOT


def _call(method: str, url: str, body=None, token=None, timeout=30.0) -> tuple[int, bytes, dict]:
    data = None if body is None else sess.encode(body)
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", "Bearer " + token.decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read(sess.MAX_BODY + 1), dict(r.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(sess.MAX_BODY + 1), dict(exc.headers or {})
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StmError(f"cannot reach the producer at {url}: {reason}") from None


def establish(
    producer_url: str,
    endpoint: KafkaEndpoint,
    *,
    consumer: str = "",
    token: bytes | None = None,
    timeout: float = 30.0,
) -> EstablishedSession:
    """Ask the producer for its streams, then for a session publishing them all to
    ``endpoint``'s brokers and topic. StmError (one line) if it refuses."""
    base = _api_base(producer_url)
    status, body, _ = _call("GET", base + "/streams", token=token, timeout=timeout)
    try:
        streams = json.loads(body) if status == 200 else None
    except ValueError:
        streams = None
    if not isinstance(streams, list) or not all(isinstance(s, dict) for s in streams):
        why = sess.describe_refusal(_json(body)) or f"HTTP {status}"
        raise StmError(f"{producer_url}: cannot list its streams: {why}")
    request = sess.build_request(endpoint.brokers, endpoint.topic, streams, consumer)
    status, body, headers = _call("POST", base + "/sessions", request, token, timeout)
    try:
        info = sess.parse_answer(status, body)
    except sess.SessionRefused as exc:
        raise StmError(f"{producer_url} refused the session (HTTP {status}): {exc}") from None
    location = headers.get("Location") or sess.session_path(info["sessionId"])
    location = urllib.parse.urljoin(base + "/", location)
    return EstablishedSession(producer_url, location, info["sessionId"], info)


def terminate(session: EstablishedSession, *, token=None, timeout: float = 30.0) -> bool:
    """DELETE the session; False (and a warning) if the producer is gone or forgot it."""
    try:
        status, body, _ = _call("DELETE", session.location, token=token, timeout=timeout)
    except StmError as exc:
        log.warning("session %s not terminated: %s", session.session_id, exc)
        return False
    if status != 204:
        why = sess.describe_refusal(_json(body)) or f"HTTP {status}"
        log.warning("session %s not terminated: %s", session.session_id, why)
        return False
    return True


def _json(body: bytes):
    try:
        return json.loads(body)
    except ValueError:
        return None


# -- stm-recv's use of the above ------------------------------------------------------------------


def session_endpoint(endpoints, establish_urls, token_file) -> KafkaEndpoint | None:
    """stm-recv's kafka:// endpoint (the one --establish names to producers), checked."""
    bus = [e for e in endpoints if e.scheme == "kafka"]
    if establish_urls and len(bus) != 1:
        raise UsageError("--establish needs exactly one --listen kafka://BROKERS/TOPIC")
    if token_file is not None and not establish_urls:
        raise UsageError("--session-token-file is for --establish")
    for url in establish_urls:
        _api_base(url)
    return bus[0] if bus else None


def _read_token(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read().strip()
    except OSError as exc:
        raise UsageError(f"--session-token-file: cannot read {path}: {exc.strerror}") from None


def establish_all(urls, endpoint: KafkaEndpoint | None, token_file=None) -> list:
    """A session with each producer, all publishing to ``endpoint``; all or none."""
    if not urls or endpoint is None:
        return []
    token = _read_token(token_file)
    consumer = f"{socket.gethostname()} ({endpoint.group or GROUP})"
    done: list[EstablishedSession] = []
    try:
        for url in urls:
            s = establish(url, endpoint, consumer=consumer, token=token)
            streams = ", ".join(x.get("streamId", "?") for x in s.info.get("streams", []))
            log.warning(
                "session %s established with %s: stream(s) %s to %s",
                s.session_id,
                url,
                streams,
                endpoint,
            )
            done.append(s)
    except BaseException:
        terminate_all(done, token_file)
        raise
    return done


def terminate_all(sessions, token_file=None) -> None:
    if not sessions:
        return
    token = _read_token(token_file)
    for s in sessions:
        if terminate(s, token=token):
            log.warning("session %s terminated", s.session_id)
