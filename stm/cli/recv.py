"""stm-recv: STM reports in; one merged pcapng out."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import sys
import time
from collections import Counter

import click

from stm import __version__, gre, tlv
from stm.cli.common import (
    CONTEXT,
    fail_cleanly,
    kafka_client_options,
    log,
    parse_int,
    read_secret,
    setup_logging,
    tls_options,
    verbosity_options,
)
from stm.errors import UsageError
from stm.logbudget import LogBudget
from stm.output import SPLIT_BY, PcapngOutput
from stm.pcapng.writer import HOST_ORDER
from stm.report import (
    AutoDecoder,
    Decoder,
    FragmentsExpired,
    Gap,
    Malformed,
    PacketBlocks,
    Packets,
    Restarted,
    TlvDecoder,
)
from stm.report.ownership import StreamOwners
from stm.source import check_capture
from stm.summary import summarize
from stm.transport import kafka as kafka_transport
from stm.transport.allow import AddressFilter
from stm.transport.framing import AutoFramer
from stm.transport.tcp import TcpListener
from stm.transport.tls import TlsConfig, server_context
from stm.transport.udp import UdpReceiver
from stm.transport.url import parse_url
from stm.wire import WireStats, read_reports

DEFAULT_PORT = {"gre": gre.GRE_UDP_PORT, "tlv": tlv.HEP_PORT, "auto": gre.GRE_UDP_PORT}


def default_port(scheme: str, fmt: str) -> int:
    """4754 for format A (4755 over DTLS, as RFC 8086 says), 9060 for format B."""
    if scheme in ("ws", "wss"):
        return {"ws": 8080, "wss": 8443}[scheme]  # stm.streaming.DEFAULT_PORTS
    return gre.GRE_DTLS_PORT if scheme == "dtls" and fmt != "tlv" else DEFAULT_PORT[fmt]


EPILOG = """\b
Examples:
  collect format A and B, over UDP and TCP, into one file:
    stm-recv --listen udp://0.0.0.0:4754 --listen tcp://0.0.0.0:9060 -w collected.pcapng
  for a minute, with a JSON summary:
    stm-recv --listen udp://[::]:4754 -w out.pcapng --duration 60 --json
  watch live in Wireshark:
    stm-recv --listen udp://127.0.0.1:4754 -w - | wireshark -k -i -
  a ring of ten 100 MB files; hourly files, one per producer:
    stm-recv --listen udp://0.0.0.0:4754 -w ring.pcapng -C 100 -W 10
    stm-recv --listen udp://0.0.0.0:4754 -w 'cap-%Y%m%d-%H%M.pcapng' -G 3600 --split-by producer
  mutual TLS and DTLS, from known networks only:
    stm-recv --listen tls://0.0.0.0:9060 --listen dtls://0.0.0.0:4755 --cert c.pem --key c.key
             --ca producers-ca.pem --require-client-cert --allow 10.1.0.0/16 -w out.pcapng
  rebuild from a tcpdump taken on a collector host:
    stm-recv --input collector.pcap -w rebuilt.pcapng

\b
Exit status: 0 when done (or stopped by SIGINT/SIGTERM), 1 on an error while running
(a write failure), 2 on bad arguments.
"""
MAX_SOURCES = 256  # sources whose malformed reports are counted one by one
SIZE_UNITS = {"": 1_000_000, "k": 1024, "m": 1 << 20, "g": 1 << 30}


def parse_size(value: str) -> int:
    """tcpdump's -C: millions of bytes, or KiB, MiB, GiB with a k, m or g suffix."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([kKmMgG]?)", value.strip())
    if not match:
        raise UsageError(f"-C takes millions of bytes (or a k, m, g suffix), not {value!r}")
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])
    if size < 1:
        raise UsageError(f"-C {value} is less than one byte")
    return size


class Collector:
    """The receive loop: sockets in, decoder, sink out; stops on a signal or a limit."""

    def __init__(
        self,
        receivers,
        decoder: Decoder,
        sink: PcapngOutput,
        *,
        count,
        duration,
        stats_interval=None,
        on_stats=None,
    ):
        self.receivers = receivers
        self.decoder = decoder
        self.sink = sink
        self.count = count
        self.duration = duration
        self.stats_interval = stats_interval
        self.on_stats = on_stats
        self.stop = False
        self.started = time.monotonic()
        self.malformed_log = LogBudget(burst=1, window=1.0)  # one line a second at most
        self.malformed_sources: Counter[str] = Counter()
        self.owners = StreamOwners()
        self.refused_log = LogBudget(burst=1, window=1.0)
        self._on_datagram = getattr(decoder, "receive_datagram", None) or decoder.receive_message

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        for r in self.receivers:
            if hasattr(r, "handle"):  # serves its connections from this loop (TCP, WebSocket)
                r.register(sel)
            else:
                sel.register(r.sock, selectors.EVENT_READ, r)
        started = self.started = time.monotonic()
        end = None if self.duration is None else started + self.duration
        last_expire = started
        next_stats = None if self.stats_interval is None else started + self.stats_interval
        rotating = getattr(self.sink, "rotate_seconds", None) is not None
        on_datagram = self._on_datagram
        secure = [r for r in self.receivers if hasattr(r, "identity")]  # DTLS
        while not self.stop:
            now = time.monotonic()
            timeout = 0.1 if end is None else max(0.0, min(0.1, end - now))
            for key, mask in sel.select(timeout):
                source = key.data
                if hasattr(source, "handle"):
                    source.handle(key, mask)
                    continue
                identity = getattr(source, "identity", None)
                for data, addr in source.drain():
                    if identity is not None:
                        who = identity(addr)
                        if not self._admit(data, who):
                            continue
                        if who is not None:
                            addr = (who, *addr[1:2])
                    on_datagram(data, addr, time.monotonic())
                    self._events()
                    if self.count is not None and self.sink.packets >= self.count:
                        self.stop = True
                        break
            now = time.monotonic()
            for r in secure:
                r.expire(now)  # DTLS handshake retransmissions are due every 0.1 s or so
            if now - last_expire >= 0.5:
                self.decoder.expire(now)
                self._events()
                for r in self.receivers:
                    if hasattr(r, "handle"):  # handshake and idle time limits
                        r.expire(now)
                last_expire = now
            if self.sink.maybe_flush(now):
                self.after_flush()
            if rotating:
                self.sink.maybe_rotate(time.time())
                if self.sink.finished:
                    log.warning("maximum file count reached: %d", self.sink.max_files)
                    break
            if next_stats is not None and now >= next_stats:
                self.on_stats(now - started)
                next_stats += self.stats_interval
                if next_stats <= now:  # fell behind: no burst of lines to catch up
                    next_stats = now + self.stats_interval
            if end is not None and now >= end:
                break
        sel.close()

    def after_flush(self) -> None:
        """The output is flushed: receivers that acknowledge upstream (Kafka commits the
        offsets of what it handed over) may do so now."""
        for r in self.receivers:
            hook = getattr(r, "after_flush", None)
            if hook is not None:
                hook()

    def flush_output(self) -> None:
        """Flush now (a Kafka rebalance is about to take partitions away), then acknowledge."""
        self.sink.flush()
        self.after_flush()

    def _admit(self, report: bytes, identity: str | None) -> bool:
        """A stream ID belongs to the first authenticated peer that used it."""
        if self.owners.admit(report, identity):
            return True
        stream, who, owner = self.owners.last_refused
        self.refused_log.warning(
            "stream %d claimed by %s, owned by %s: refused", stream, who, owner
        )
        return False

    def on_message_from(self, listener: TcpListener):
        """The callback for one listener's connections: a whole report (format B, or format
        A framed by RFC 4571) with, over TLS, the peer's verified identity."""
        secure = listener.ssl_context is not None

        def on_message(message: bytes, peer) -> None:
            if secure:
                who = listener.peer_identity(peer)
                if not self._admit(message, who):
                    return
                if who is not None:
                    peer = (who, *peer[1:2])
            self.receive(message, peer, time.monotonic())

        return on_message

    def receive_batch(self, reports: list, source) -> bool:
        """Every complete message of one TCP read (plain tcp://: over TLS each message has
        its ownership checked), or the reports of one WebSocket read: one decoder call for
        all of them (format B). False if --count stopped it before the last one."""
        now = time.monotonic()
        many = getattr(self.decoder, "receive_messages", None)
        rest: list = []
        if self.count is not None:
            # A format-B message gives at most one packet, so this many cannot pass --count;
            # the rest go one by one until it is reached.
            room = max(0, self.count - self.sink.packets)
            reports, rest = reports[:room], reports[room:]
        if many is None:
            rest = reports + rest
        elif reports:
            # Consecutive reports of a stream become one block write, unless files rotate
            # by size, which must be able to cut between any two reports.
            many(reports, source, now, coalesce=getattr(self.sink, "size_limit", None) is None)
            self._events()
        if self.count is not None and self.sink.packets >= self.count:
            self.stop = True
        for r in rest:
            if self.stop:
                return False
            self.receive(r, source, now)
        return True

    def receive(self, report: bytes, source, now: float) -> None:
        """One report, whatever carried it (none once stopped: --count is exact)."""
        if self.stop:
            return
        self._on_datagram(report, source, now)
        self._events()
        if self.count is not None and self.sink.packets >= self.count:
            self.stop = True

    def replay(self, sources, stats: WireStats, protocol_type: int) -> None:
        """--input: the reports of captures of report traffic, at capture time."""
        last = 0.0
        for path in sources:
            for _, report, peer, t in read_reports(path, protocol_type=protocol_type, stats=stats):
                self.receive(report, peer, t)
                if t - last >= 0.5:
                    self.decoder.expire(t)
                    self._events()
                    last = t
                if self.stop:
                    return

    def _events(self) -> None:
        sink = self.sink
        for ev in self.decoder.events():
            if type(ev) is PacketBlocks:
                sink.write_blocks(ev)
            elif type(ev) is Packets:
                sink.write(ev.stream, ev.packets)
            elif isinstance(ev, Gap):
                sink.loss(ev.stream, self.decoder.stats(ev.stream).lost)
                log.info(
                    "stream %s: %d report(s) missing before #%d", ev.stream, ev.missing, ev.sequence
                )
            elif isinstance(ev, Malformed):
                self.malformed_log.warning("malformed report from %s: %s", ev.source, ev.reason)
                source = _host(ev.source)
                sources = self.malformed_sources
                if source in sources or len(sources) < MAX_SOURCES:
                    sources[source] += 1
                else:
                    sources["other"] += 1
            elif isinstance(ev, Restarted):
                log.info("stream %s: producer restarted", ev.stream)
            elif isinstance(ev, FragmentsExpired):
                log.info("stream %s: %d fragmented packet(s) incomplete", ev.stream, ev.packets)


@click.command(context_settings=CONTEXT, epilog=EPILOG)
@click.option(
    "--listen",
    "listens",
    multiple=True,
    metavar="URL",
    help="udp://, tcp://, tls:// or dtls://HOST:PORT (repeatable, any mix).",
)
@click.option(
    "-r",
    "--input",
    "inputs",
    multiple=True,
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Rebuild from a capture of report traffic (a tcpdump on a collector, stm-send "
    "--output) instead of listening; repeatable.",
)
@tls_options(receiver=True)
@click.option(
    "--allow",
    "allows",
    multiple=True,
    metavar="CIDR",
    help="Accept reports and connections only from these networks (repeatable); others "
    "are dropped and counted before any parsing.",
)
@click.option(
    "-w",
    "--write",
    "output",
    required=True,
    metavar="FILE",
    help="Output pcapng file (- for standard output).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "gre", "tlv"]),
    default="auto",
    show_default=True,
    help="gre = format A, tlv = format B (HEP3), auto = tell them apart per report.",
)
@click.option(
    "--count", type=click.IntRange(min=1), metavar="N", help="Stop after writing N packets."
)
@click.option(
    "--duration", type=click.FloatRange(min=0), metavar="SECONDS", help="Stop after this long."
)
@click.option(
    "--flush-interval",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Longest that written packets stay buffered.",
)
@click.option(
    "--protocol-type", default="0x88B5", show_default=True, help="GRE protocol type to accept."
)
@click.option(
    "--max-streams",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Streams tracked at once (the least recently seen is forgotten).",
)
@click.option(
    "--auth-key-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Require this HEP auth key (read from FILE) in format-B reports.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="TCP connections served at once per listener.",
)
@click.option(
    "--ws-procedure",
    type=click.Choice(["ts28532", "seed", "any"]),
    default="ts28532",
    show_default=True,
    help="How producers establish streams on ws:// and wss://: TS 28.532's REST resources, "
    "the seed's streamInfoList Ping, or either (docs/streaming.md).",
)
@click.option(
    "-C",
    "--file-size",
    metavar="SIZE",
    help="Start a new file before one would grow past SIZE millions of bytes (or KiB, MiB, "
    "GiB with a k, m, g suffix), as tcpdump -C: FILE, FILE1, FILE2...",
)
@click.option(
    "-G",
    "--rotate-seconds",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Start a new file every SECONDS, as tcpdump -G; the -w name goes through strftime "
    "(cap-%Y%m%d-%H%M%S.pcapng).",
)
@click.option(
    "-W",
    "--file-count",
    type=click.IntRange(min=1),
    metavar="N",
    help="With -C: a ring of N files, FILE0 to FILE<N-1>, the oldest overwritten; with -G "
    "alone: stop (exit 0) after N files. As tcpdump -W.",
)
@click.option(
    "--split-by",
    type=click.Choice(SPLIT_BY),
    help="One output per producer (out.pcapng -> out-PRODUCER.pcapng) or per stream "
    "(out-PRODUCER-STREAMID.pcapng); combines with -C/-G/-W.",
)
@click.option(
    "--stats",
    "show_stats",
    is_flag=True,
    help="Print counters per stream at the end (standard error).",
)
@click.option(
    "--stats-interval",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Print them every SECONDS too (implies --stats).",
)
@click.option(
    "--establish",
    "establish_urls",
    multiple=True,
    metavar="PRODUCER_URL",
    help="Ask the producer (stm-send --accept-sessions, http://HOST:PORT) for a streaming "
    "session publishing its streams to the brokers and topic of --listen kafka://; "
    "terminated on exit; repeatable (docs/streaming.md).",
)
@click.option(
    "--session-token-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Bearer token (read from FILE) for --establish.",
)
@kafka_client_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@verbosity_options
@click.version_option(__version__, "-V", "--version", prog_name="stm-recv")
@fail_cleanly("stm-recv")
def main(
    listens,
    inputs,
    cert,
    key,
    ca,
    key_password_file,
    key_password_env,
    require_client_cert,
    allows,
    output,
    fmt,
    count,
    duration,
    flush_interval,
    protocol_type,
    max_streams,
    auth_key_file,
    max_connections,
    ws_procedure,
    file_size,
    rotate_seconds,
    file_count,
    split_by,
    show_stats,
    stats_interval,
    as_json,
    verbose,
    quiet,
    **kafka,  # --establish, --session-token-file, --kafka-option, --kafka-config
):
    """Receive 3GPP STM reports (TS 28.560) and rebuild the packets into pcapng.

    Every producer, stream and source interface gets an interface of its own in the
    output; packets keep their timestamps, lengths, flags and comments exactly. The output
    can rotate like tcpdump's (-C, -G, -W) and be split per producer or stream; every file
    is a whole pcapng. Stops on SIGINT or SIGTERM (or --count/--duration), flushes the
    files and prints what it received, lost, duplicated and rejected.
    """
    setup_logging("stm-recv", verbose, quiet)
    if bool(listens) == bool(inputs):
        raise UsageError("give --listen URL (live) or --input FILE (offline), not both")
    for path in inputs:
        check_capture(path)
    endpoints = [
        kafka_transport.parse_kafka_url(u, consumer=True)  # several brokers: not a host:port
        if u.startswith("kafka:")
        else parse_url(u, default_port=default_port(u.split(":", 1)[0], fmt))
        for u in listens
    ]
    establish_urls, token_file = kafka.pop("establish_urls"), kafka.pop("session_token_file")
    bus = kafka_transport.KafkaSettings.from_cli(kafka)
    bus_endpoint = kafka_transport.session_endpoint(endpoints, establish_urls, token_file)
    secure = [e for e in endpoints if e.scheme in ("tls", "dtls", "wss")]
    tls_options = (cert, key, ca, key_password_file, key_password_env)
    if not secure and (any(x is not None for x in tls_options) or require_client_cert):
        raise UsageError("--cert, --key, --ca and --require-client-cert are for tls:// and dtls://")
    tls = TlsConfig(
        cert=cert,
        key=key,
        ca=ca,
        require_client_cert=require_client_cert,
        password_file=key_password_file,
        password_env=key_password_env,
    )
    allow = AddressFilter.from_options(allows)
    ptype = parse_int(protocol_type, "--protocol-type")
    auth_key = read_secret(auth_key_file, "--auth-key-file") if auth_key_file else None
    size_limit = parse_size(file_size) if file_size is not None else None
    if output == "-" and (size_limit or rotate_seconds or split_by):
        raise UsageError("-C, -G and --split-by need a file name, not -w -")
    if file_count is not None and size_limit is None and rotate_seconds is None:
        raise UsageError("-W needs -C or -G")
    limits = {"max_streams": max_streams}
    # Reports already in the output's byte order are copied block by block (PacketBlocks).
    if fmt == "gre":
        decoder = Decoder(protocol_type=ptype, raw_byte_order=HOST_ORDER, **limits)
    elif fmt == "tlv":
        decoder = TlvDecoder(auth_key=auth_key, raw_byte_order=HOST_ORDER, **limits)
    else:
        decoder = AutoDecoder(
            protocol_type=ptype, raw_byte_order=HOST_ORDER, auth_key=auth_key, **limits
        )
    collector = Collector([], decoder, None, count=count, duration=duration)
    receivers = []
    try:
        receivers += open_receivers(
            endpoints, tls, allow, collector, max_connections, bus, ws_procedure=ws_procedure
        )
        out = PcapngOutput(
            output,
            now=time.time(),
            size_limit=size_limit,
            rotate_seconds=rotate_seconds,
            max_files=file_count,
            split_by=split_by,
            flush_interval=flush_interval,
            byte_order=HOST_ORDER,
        )
    except BaseException:
        for r in receivers:
            r.close()
        raise
    collector.receivers = receivers
    collector.sink = out
    wire_stats = WireStats()
    if show_stats or stats_interval is not None:
        collector.stats_interval = stats_interval
        collector.on_stats = lambda elapsed: _echo_lines(
            _stats_lines(decoder, out, collector, elapsed)
        )

    def stop(signum, frame):
        collector.stop = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    sessions = []  # --establish
    try:
        try:
            out.flush()  # the section header: a valid, empty pcapng from the start
            for r, e in zip(receivers, endpoints, strict=True):
                if e.scheme == "kafka":
                    log.warning("listening on %s", r.url)  # joining the group takes a moment
                    continue
                host, port = r.address[:2]
                host = f"[{host}]" if ":" in host else host
                log.warning("listening on %s://%s:%d", e.scheme, host, port)
            if inputs:
                collector.replay(inputs, wire_stats, ptype)
            else:
                sessions += kafka_transport.establish_all(establish_urls, bus_endpoint, token_file)
                collector.run()
                collector.flush_output()  # Kafka commits what the output holds
        finally:
            kafka_transport.terminate_all(sessions, token_file)
            out.close()  # after a failed write, closes what it can without a second error
            for r in receivers:
                r.close()
    except BrokenPipeError:
        _quiet_stdout()  # the reader of -w - went away: nothing more to say there
        raise
    elapsed = time.monotonic() - collector.started
    if show_stats or stats_interval is not None:
        _echo_lines(_stats_lines(decoder, out, collector, elapsed))
    extra = {"input": wire_stats.as_dict()} if inputs else {}
    if allow is not None:
        extra["denied"] = allow.denied
    if ws := [r.stats() for r in receivers if getattr(r, "scheme", "") in ("ws", "wss")]:
        extra["websocket"] = ws
    if secure:
        extra["tls_failures"] = sum(getattr(r, "tls_failures", 0) for r in receivers)
        extra["dtls"] = [r.stats() for r in receivers if hasattr(r, "identity")]
        extra["streams_refused"] = collector.owners.rejected
    if bus_endpoint is not None:
        extra["kafka"] = [r.stats() for r in receivers if hasattr(r, "after_flush")]
        extra["sessions"] = [s.session_id for s in sessions]
    _summary(
        decoder,
        out,
        receivers,
        output,
        as_json,
        quiet,
        brief=show_stats or stats_interval,
        extra=extra,
    )


def open_receivers(
    endpoints,
    tls: TlsConfig,
    allow,
    collector: Collector,
    max_connections,
    kafka=None,
    ws_procedure="ts28532",
):
    """A socket for each --listen URL."""
    receivers = []
    try:
        for e in endpoints:
            if e.scheme == "udp":
                receivers.append(UdpReceiver(e.host, e.port, allow=allow))
            elif e.scheme == "dtls":
                from stm.transport import dtls

                receivers.append(
                    dtls.DtlsReceiver(e.host, e.port, context=dtls.server_context(tls), allow=allow)
                )
            elif e.scheme in ("tcp", "tls"):
                listener = TcpListener(
                    e.host,
                    e.port,
                    framer_factory=AutoFramer,
                    on_message=lambda m, p: None,
                    max_connections=max_connections,
                    ssl_context=server_context(tls) if e.scheme == "tls" else None,
                    allow=allow,
                )
                listener.on_message = collector.on_message_from(listener)
                if e.scheme == "tcp":
                    listener.on_messages = collector.receive_batch
                receivers.append(listener)
            elif e.scheme == "kafka":
                settings = kafka or kafka_transport.KafkaSettings()
                receivers.append(
                    kafka_transport.KafkaReceiver(e, settings, flush=collector.flush_output)
                )
            elif e.scheme in ("ws", "wss"):
                from stm.transport.websocket import WsReceiver, flush_on_close

                receivers.append(
                    WsReceiver(e.host, e.port, path=e.path, procedure=ws_procedure,
                               ssl_context=server_context(tls) if e.scheme == "wss" else None,
                               allow=allow, max_connections=max_connections,
                               owners=collector.owners, on_reports=collector.receive_batch,
                               on_close=flush_on_close(collector))
                )  # fmt: skip
            else:
                raise UsageError(f"{e}: stm-recv cannot listen on {e.scheme}:// yet")
    except BaseException:
        for r in receivers:
            r.close()
        raise
    return receivers


def _host(source) -> str:
    """Where a report came from, without the port (a sender's port changes per socket)."""
    if isinstance(source, tuple) and source:
        return str(source[0])
    return "-" if source is None else str(source)


def _quiet_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _echo_lines(lines: list[str]) -> None:
    for line in lines:
        click.echo(line, err=True)


def _stats_lines(decoder, out: PcapngOutput, collector: Collector, elapsed: float) -> list[str]:
    """Counters so far: a line of totals, one per stream, one per source of malformed input."""
    streams = [(str(s), st.stats) for s, st in decoder.streams.items()]
    total = {
        k: sum(getattr(st, k) for _, st in streams)
        for k in ("packets", "bytes", "datagrams", "lost", "duplicates", "reordered")
    }
    lines = [
        f"stm-recv: stats after {elapsed:.1f} s: {out.packets} packets written, "
        f"{total['packets']} packets and {total['bytes']} bytes in {total['datagrams']} "
        f"reports from {len(streams)} stream(s); lost {total['lost']}, "
        f"duplicated {total['duplicates']}, reordered {total['reordered']}, "
        f"malformed {decoder.malformed}, rejected {out.rejected}"
    ]
    for name, st in streams:
        lines.append(
            f"  stream {name}: packets {st.packets}, bytes {st.bytes}, reports {st.datagrams}, "
            f"lost {st.lost}, duplicated {st.duplicates}, reordered {st.reordered}, "
            f"restarts {st.restarts}, incomplete fragments {st.fragments_expired}"
        )
    for source, n in collector.malformed_sources.most_common():
        lines.append(f"  malformed from {source}: {n}")
    return lines


def _summary(
    decoder,
    out: PcapngOutput,
    receivers,
    output: str,
    as_json: bool,
    quiet: bool,
    brief=False,
    extra=None,
):
    streams = {str(s): st.stats.as_dict() for s, st in decoder.streams.items()}
    listeners = [r for r in receivers if isinstance(r, TcpListener)]
    files = out.files
    totals = {
        "packets_written": out.packets,
        "rejected_connections": sum(r.rejected_connections for r in listeners),
        "auth_rejected": getattr(decoder, "rejected_auth", 0),
        "malformed": decoder.malformed,
        "rejected": out.rejected,
        **{
            k: sum(s[k] for s in streams.values())
            for k in ("datagrams", "bytes", "lost", "duplicates", "reordered", "fragments_expired")
        },
        **(extra or {}),
    }
    if as_json:
        click.echo(
            json.dumps({"output": output, **totals, "files": files, "streams": streams}),
            err=output == "-",
        )
        return
    if quiet:
        return
    echo = lambda s: click.echo(s, err=True)  # noqa: E731
    where = output if len(files) <= 1 else f"{len(files)} files ({files[0]} ... {files[-1]})"
    echo(
        f"stm-recv: {totals['packets_written']} packets from {totals['datagrams']} reports "
        f"written to {where}; lost {totals['lost']}, duplicated {totals['duplicates']}, "
        f"reordered {totals['reordered']}, malformed {totals['malformed']}, "
        f"incomplete fragments {totals['fragments_expired']}"
    )
    if not brief:  # --stats printed these already
        for name, s in streams.items():
            echo(
                f"  stream {name}: {s['packets']} packets, {s['datagrams']} reports, "
                f"lost {s['lost']}, duplicated {s['duplicates']}, reordered {s['reordered']}"
            )
    if len(files) == 1 and files[0] != "-" and os.path.exists(files[0]):
        for line in summarize(files[0]).lines():
            echo(line)


if __name__ == "__main__":
    main()
