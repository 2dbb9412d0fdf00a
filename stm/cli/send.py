"""stm-send: capture files, a pipe, a growing file or a live interface in; STM reports out."""

from __future__ import annotations

import json
import signal
import socket
import sys
import time

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
from stm.cli.progress import Progress
from stm.errors import UsageError
from stm.pipeline import Pacer, SendPipeline, Stop
from stm.report import Encoder, TlvEncoder, stream_id_for
from stm.source import CaptureInput
from stm.transport.framing import Framed
from stm.transport.kafka import (
    REPORT_MTU,
    KafkaSender,
    KafkaSettings,
    SessionServer,
    parse_kafka_url,
    record_headers,
)
from stm.transport.tcp import TcpSender
from stm.transport.tls import TlsConfig, client_context
from stm.transport.udp import UdpSender
from stm.transport.url import parse_url
from stm.transport.websocket import sender_factory as ws_sender_factory
from stm.wire import WireWriter

EPILOG = """\b
Examples:
  send a capture once, as fast as possible (format A, GRE-in-UDP):
    stm-send trace.pcapng --to udp://collector:4754
  replay in real time, three times, with a summary at the end:
    stm-send trace.pcap --realtime --loop 3 --to udp://127.0.0.1:4754 --stats
  format B (HEP3 profile) over TCP to a HEP collector, and a copy over UDP:
    stm-send trace.pcap --format tlv --to tcp://homer:9060 --to udp://[2001:db8::1]:9060
  live: from a pipe, from a file still being written, or from an interface:
    tcpdump -U -w - port 5060 | stm-send - --to udp://127.0.0.1:4754
    stm-send --follow /var/spool/amf.pcapng --producer amf-1 --to udp://127.0.0.1:4754
    stm-send -i eth0 -f 'port 5060 or sctp' --to udp://127.0.0.1:4754
  write the reports to a capture instead of sending them (Wireshark, tcpreplay):
    stm-send trace.pcap --output wire.pcap

\b
Exit status: 0 when done (or stopped by SIGINT/SIGTERM), 1 on an error while running,
2 on bad arguments.
"""
DEFAULT_PORT = {"gre": gre.GRE_UDP_PORT, "tlv": tlv.HEP_PORT}


def default_port(scheme: str, fmt: str) -> int:
    """4754 for format A (4755 over DTLS, as RFC 8086 says), 9060 for format B."""
    if scheme in ("ws", "wss"):
        return {"ws": 8080, "wss": 8443}[scheme]  # stm.streaming.DEFAULT_PORTS
    return gre.GRE_DTLS_PORT if scheme == "dtls" and fmt == "gre" else DEFAULT_PORT[fmt]


def open_destinations(
    urls, fmt, source_port, queue, queue_policy, output, mtu, tls, kafka=None, ws=None
):
    """Sockets for each --to; with --output, the one capture file that stands for them."""
    endpoints = [
        parse_kafka_url(u)  # several brokers: not a host:port
        if u.startswith("kafka:")
        else parse_url(u, default_port=default_port(u.split(":", 1)[0], fmt))
        for u in urls
    ]
    secure = [e for e in endpoints if e.scheme in ("tls", "dtls", "wss")]
    if tls is not None and not secure:
        raise UsageError("--cert, --key, --ca and --server-name are for tls:// and dtls://")
    if output is not None:
        if len(endpoints) > 1:
            raise UsageError("--output writes one report stream: give at most one --to")
        e = endpoints[0] if endpoints else parse_url(f"udp://127.0.0.1:{DEFAULT_PORT[fmt]}")
        if e.scheme not in ("udp", "tcp"):
            raise UsageError(f"--output writes udp:// or tcp:// traffic, not {e.scheme}://")
        w = WireWriter(output, scheme=e.scheme, host=e.host, port=e.port,
                       source_port=source_port, mtu=mtu)  # fmt: skip
        return [Framed(w) if fmt == "gre" and e.scheme == "tcp" else w]
    if not endpoints:
        raise UsageError("give a destination with --to URL (or --output FILE)")
    config = tls or TlsConfig()
    senders = []
    try:
        for e in endpoints:
            if e.scheme == "udp":
                senders.append(UdpSender(e.host, e.port, source_port=source_port))
            elif e.scheme == "dtls":
                from stm.transport import dtls

                d = dtls.DtlsSender(
                    e.host,
                    e.port,
                    context=dtls.client_context(config),
                    server_hostname=config.server_hostname,
                    source_port=source_port,
                    mtu=mtu,
                    queue_limit=queue,
                )
                senders.append(d)
                d.connect()  # a refused certificate fails now, in one line
            elif e.scheme in ("tcp", "tls"):
                context = client_context(config) if e.scheme == "tls" else None
                t = TcpSender(e.host, e.port, queue_limit=queue, policy=queue_policy,
                              ssl_context=context,
                              server_hostname=config.server_hostname or e.host)  # fmt: skip
                senders.append(Framed(t) if fmt == "gre" else t)
            elif e.scheme == "kafka":
                senders.append(kafka(e))  # a KafkaSender with the --kafka-* settings
            elif e.scheme in ("ws", "wss"):
                context = client_context(config) if e.scheme == "wss" else None
                senders.append(ws(e, context, config.server_hostname))  # a WsSender
                senders[-1].connect()  # a consumer refusing the stream fails now, in one line
            else:
                raise UsageError(f"{e}: stm-send cannot send to {e.scheme}:// yet")
    except BaseException:
        _close(senders, 0)
        raise
    return senders


@click.command(context_settings=CONTEXT, epilog=EPILOG)
@click.argument("files", nargs=-1, metavar="[FILE]... (- for stdin)")
@click.option(
    "-i",
    "--interface",
    metavar="IFACE",
    help="Capture live on IFACE instead of reading files (root or CAP_NET_RAW).",
)
@click.option(
    "-f", "--filter", "bpf_filter", metavar="EXPR", help="BPF filter for -i, as in tcpdump."
)
@click.option(
    "-s",
    "--snaplen",
    type=click.IntRange(64, 262144),
    default=262144,
    show_default=True,
    help="Bytes kept of each packet captured with -i.",
)
@click.option(
    "--promisc", is_flag=True, help="Put the -i interface in promiscuous mode while capturing."
)
@click.option("--follow", is_flag=True, help="Keep reading FILE as it grows, like tail -f.")
@click.option(
    "--to",
    "destinations",
    multiple=True,
    metavar="URL",
    help="Where to: udp://, tcp://, tls:// or dtls://HOST:PORT (and the other transports "
    "below); repeat to send a copy to each.",
)
@tls_options(receiver=False)
@click.option(
    "-o",
    "--output",
    metavar="FILE",
    help="Write the reports as a capture of UDP/TCP packets (.pcap or .pcapng) instead of "
    "sending them; --to then only names the addresses in it.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["gre", "tlv"]),
    default="gre",
    show_default=True,
    help="gre = UDP-GRE-pcapng (format A); tlv = generic TLV, HEP3 profile (format B).",
)
@click.option(
    "--producer",
    default=socket.gethostname,
    show_default="host name",
    help="Producer (NF) name carried in every report.",
)
@click.option(
    "--stream-id",
    default=None,
    metavar="N",
    help="Stream ID (GRE key / HEP capture ID); default: CRC-32 of the producer.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    metavar="PPS",
    help="Packets per second (default: as fast as possible).",
)
@click.option("--realtime", is_flag=True, help="Keep the capture's gaps between packets.")
@click.option(
    "--speed",
    type=click.FloatRange(min=0, min_open=True),
    metavar="X",
    help="Keep the capture's gaps divided by X (2 = twice as fast).",
)
@click.option(
    "--loop",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    metavar="N",
    help="Send the files N times (0: until stopped).",
)
@click.option(
    "--mtu",
    type=click.IntRange(576, 65535),
    default=1500,
    show_default=True,
    help="Path MTU: UDP reports are sized so that IP never fragments.",
)
@click.option(
    "--linger",
    type=click.FloatRange(min=0),
    default=0.005,
    show_default=True,
    metavar="SECONDS",
    help="Longest a partial gre report waits for more packets.",
)
@click.option(
    "--oversize",
    type=click.Choice(["fragment", "truncate", "drop"]),
    default="fragment",
    show_default=True,
    help="What to do with a packet too big for one report.",
)
@click.option(
    "--checksum/--no-checksum", default=False, show_default=True, help="Set the GRE checksum (gre)."
)
@click.option(
    "--protocol-type",
    default="0x88B5",
    show_default=True,
    help="GRE protocol type of the reports (gre).",
)
@click.option(
    "--auth-key-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="HEP auth key to send, read from FILE (tlv).",
)
@click.option(
    "--queue",
    type=click.IntRange(min=1),
    default=10000,
    show_default=True,
    metavar="N",
    help="Messages held per TCP destination while it is away.",
)
@click.option(
    "--queue-policy",
    type=click.Choice(["block", "drop-oldest"]),
    default="block",
    show_default=True,
    help="When the TCP queue is full: wait for the collector (nothing lost), or drop the "
    "oldest report and count it (a live source that must never stall).",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait at the end for TCP queues to empty.",
)
@click.option(
    "--ws-procedure",
    type=click.Choice(["ts28532", "seed"]),
    default="ts28532",
    show_default=True,
    help="How ws:// and wss:// establish the stream: TS 28.532's POST /connections then the "
    "Upgrade, or the seed's Upgrade then a Ping with the streamInfoList (docs/streaming.md).",
)
@click.option(
    "--accept-sessions",
    metavar="ADDR",
    help="Serve the streaming session procedure over HTTP on HOST:PORT: a consumer (stm-recv "
    "--establish) has the stream published to its Kafka brokers; input is read once the first "
    "session is established (docs/streaming.md).",
)
@click.option(
    "--session-token-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Require this bearer token (read from FILE) in session requests.",
)
@click.option(
    "--kafka-acks",
    type=click.Choice(["all", "1", "0"]),
    default="all",
    show_default=True,
    help="Acknowledgements kafka:// waits for (all: every in-sync replica, idempotent).",
)
@click.option(
    "--kafka-compression",
    type=click.Choice(["none", "gzip", "snappy", "lz4", "zstd"]),
    default="lz4",
    show_default=True,
    help="Compression of kafka:// record batches.",
)
@click.option(
    "--kafka-linger",
    type=click.FloatRange(min=0),
    default=0.005,
    show_default=True,
    metavar="SECONDS",
    help="Longest a kafka:// record waits to fill a batch.",
)
@click.option(
    "--kafka-batch-size",
    type=click.IntRange(min=1),
    default=1_000_000,
    show_default=True,
    metavar="BYTES",
    help="Largest kafka:// record batch.",
)
@click.option(
    "--kafka-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="How long the bus may take to accept a report (retried until then); then the report "
    "is counted undelivered.",
)
@kafka_client_options
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress line (default: when stderr is a terminal and input is files).",
)
@click.option("--stats", is_flag=True, help="Print a summary at the end.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@verbosity_options
@click.version_option(__version__, "-V", "--version", prog_name="stm-send")
@fail_cleanly("stm-send")
def main(
    files,
    interface,
    bpf_filter,
    snaplen,
    promisc,
    follow,
    destinations,
    cert,
    key,
    ca,
    key_password_file,
    key_password_env,
    server_name,
    output,
    fmt,
    producer,
    stream_id,
    rate,
    realtime,
    speed,
    loop,
    mtu,
    linger,
    oversize,
    checksum,
    protocol_type,
    auth_key_file,
    queue,
    queue_policy,
    drain_timeout,
    ws_procedure,
    progress,
    stats,
    as_json,
    verbose,
    quiet,
    **kafka,  # --accept-sessions, --session-token-file and the --kafka-* options
):
    """Send captured packets as 3GPP STM reports (TS 28.560).

    Reads pcap and pcapng files in order (- for standard input), a file that is still
    being written (--follow) or a live interface (-i), and sends every packet, byte for
    byte with its timestamp, lengths, flags and comments, to each destination: as fast as
    possible, at --rate, or at the capture's own pace (--realtime, --speed). Timestamps
    in the reports are always the capture's own. SIGINT or SIGTERM sends what is pending
    and stops cleanly.
    """
    setup_logging("stm-send", verbose, quiet)
    if interface is not None and (files or follow or loop != 1):
        raise UsageError("-i captures live: give no FILE, --follow or --loop with it")
    if interface is None and not files:
        raise UsageError("give a capture FILE (- for standard input) or -i IFACE")
    if bpf_filter is not None and interface is None:
        raise UsageError("-f filters a live capture: use it with -i")
    if loop != 1 and ("-" in files or follow):
        raise UsageError("--loop needs files it can read again (not -, not --follow)")
    if sum(x is not None and x is not False for x in (rate, speed, realtime or None)) > 1:
        raise UsageError("choose one of --rate, --realtime and --speed")
    wanted_id = None if stream_id is None else parse_int(stream_id, "--stream-id")
    ptype = parse_int(protocol_type, "--protocol-type")
    if not 0 <= ptype <= 0xFFFF:
        raise UsageError("--protocol-type must fit 16 bits")
    auth_key = read_secret(auth_key_file, "--auth-key-file") if auth_key_file else None
    stream = stream_id_for(producer, wanted_id)
    stop = Stop()
    pacer = Pacer(rate=rate, speed=1.0 if realtime else speed)
    source = live = None
    if interface is not None:
        from stm.capture import LiveCapture  # Linux only; checks the interface and filter

        live = LiveCapture(interface, bpf_filter, snaplen=snaplen, stop=stop, promisc=promisc,
                           idle=True)  # fmt: skip
    else:
        # Unpaced, the encoders take runs of packet blocks whole (RawPackets).
        bulk = not pacer.active
        source = CaptureInput(files, follow=follow, stop=stop, raw_packets=bulk)
    tls = None
    if any(x is not None for x in (cert, key, ca, server_name, key_password_file,
                                   key_password_env)):  # fmt: skip
        tls = TlsConfig(cert=cert, key=key, ca=ca, server_hostname=server_name,
                        password_file=key_password_file, password_env=key_password_env)  # fmt: skip
    accept, token_file = kafka.pop("accept_sessions"), kafka.pop("session_token_file")
    bus = KafkaSettings.from_cli(
        kafka, queue_limit=queue, policy=queue_policy, drain_timeout=drain_timeout
    )
    if accept is not None and output is not None:
        raise UsageError("--accept-sessions publishes to brokers: not with --output")
    if token_file is not None and accept is None:
        raise UsageError("--session-token-file is for --accept-sessions")
    targets = []
    if destinations or accept is None:
        targets = open_destinations(
            destinations, fmt, gre.entropy_source_port(stream), queue, queue_policy, output, mtu,
            tls, kafka=lambda e: KafkaSender(e, bus, key=str(stream).encode(),
                                             headers=record_headers(producer, fmt)),
            ws=ws_sender_factory(producer=producer, stream=stream, fmt=fmt,
                                 procedure=ws_procedure, queue_limit=queue, policy=queue_policy),
        )  # fmt: skip
    hub = None
    if accept is not None:
        try:
            token = read_secret(token_file, "--session-token-file") if token_file else None
            hub = SessionServer(accept, bus, fmt=fmt, producer=producer, stream=stream, token=token)
        except BaseException:
            _close(targets, 0)
            raise
        targets.append(hub)
        log.warning("accepting streaming sessions on %s", hub.url)
    if all(getattr(t, "message_bus", False) for t in targets) and (
        click.get_current_context().get_parameter_source("mtu")
        is click.core.ParameterSource.DEFAULT
    ):
        mtu = REPORT_MTU  # records, not datagrams: the largest a UDP datagram could carry
    ip_header = max(t.ip_header for t in targets)
    # A DTLS record's header and tag come out of the report's room.
    mtu = min([mtu, *(t.report_mtu for t in targets if hasattr(t, "report_mtu"))])
    only_tcp = all(t.url.startswith(("tcp:", "tls:")) for t in targets)

    def make_encoder(byte_order: str | None):
        if fmt == "gre":
            return Encoder(
                producer,
                stream,
                mtu=mtu,
                ip_header=ip_header,
                linger=linger,
                oversize=oversize,
                checksum=checksum,
                protocol_type=ptype,
                byte_order=byte_order,
            )
        return TlvEncoder(
            producer,
            stream,
            mtu=mtu,
            ip_header=ip_header,
            transport="tcp" if only_tcp else "udp",
            oversize=oversize,
            auth_key=auth_key,
        )

    try:
        # Bad settings fail here, before any input is read; a gre encoder is made again in
        # the byte order of the first section, so its packet blocks can be copied as they are.
        pipeline = SendPipeline(
            make_encoder, targets, pacer=pacer, stop=stop, follow_byte_order=fmt == "gre"
        )
    except BaseException:
        _close(targets, 0)
        if live is not None:
            live.close()
        raise
    bar = None
    if live is not None:
        live.wake = pipeline.deadline
        what = f" ({bpf_filter})" if bpf_filter else ""
        log.warning("capturing on %s%s, snaplen %d", interface, what, snaplen)
    if source is not None:
        source.wake = pipeline.deadline
        show = sys.stderr.isatty() and "-" not in files and not follow and not quiet
        if progress if progress is not None else show:
            bar = Progress(
                lambda: pipeline.encoder.stats.packets,
                lambda: source.bytes_read,
                source.total_bytes,
            )
            source.on_chunk = bar.update

    def on_signal(signum, frame):
        if stop.is_set():  # a second signal: stop now, whatever is pending
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if hub is not None:
        hub.wait(stop)  # the input is read once a consumer has asked for the stream
    started = time.monotonic()
    try:
        if live is not None:
            pipeline.run(live.events())
        else:
            passes = 0
            while not stop.is_set() and (loop == 0 or passes < loop):
                if passes:
                    pacer.restart()
                pipeline.run(source.events())
                passes += 1
    finally:
        try:
            pipeline.finish()  # also after a bad block: what came before it goes out
        finally:
            if bar is not None:
                bar.close()
            if live is not None:
                live.close()
            _close(targets, drain_timeout)
    capture = live.stats() if live is not None else None
    human = stats and not quiet
    _summary(pipeline.encoder, targets, time.monotonic() - started, capture, as_json, human)


def _close(targets, drain_timeout: float) -> None:
    for t in targets:
        if isinstance(t, UdpSender):
            t.close()
        else:  # TCP, TLS, DTLS: send what is queued for up to the drain timeout
            t.close(drain_timeout)


def _summary(encoder, targets, elapsed, capture, as_json, human) -> None:
    stats = encoder.stats.as_dict()
    stats["reports"] = stats.pop("datagrams")
    stats.update(
        seconds=round(elapsed, 6),
        packets_per_second=round(stats["packets"] / elapsed) if elapsed else None,
        producer=encoder.producer,
        stream_id=encoder.stream_id,
        destinations={
            t.url: t.stats() if hasattr(t, "stats") else {"refused": t.refused} for t in targets
        },
    )
    if capture is not None:
        stats["capture"] = capture
    if as_json:
        click.echo(json.dumps(stats))
    if human:
        click.echo(
            f"stm-send: {stats['packets']} packets in {stats['reports']} reports "
            f"({stats['bytes']} bytes) in {elapsed:.3f} s; oversize: {stats['fragmented']} "
            f"fragmented, {stats['truncated']} truncated, {stats['dropped']} dropped",
            err=True,
        )
        if capture is not None:
            click.echo(
                f"  capture: {capture['received']} received, {capture['dropped']} dropped "
                "by the kernel",
                err=True,
            )
        for url, s in stats["destinations"].items():
            if "dropped" in s:
                click.echo(
                    f"  {url}: {s['sent']} sent, {s['dropped']} dropped, "
                    f"{s['undelivered']} undelivered, {s['reconnects']} reconnects",
                    err=True,
                )
            elif "frames" in s:
                click.echo(f"  {url}: {s['sent']} reports in {s['frames']} frames", err=True)
            else:
                click.echo(f"  {url}: {s['refused']} refused (nobody listening)", err=True)


if __name__ == "__main__":
    main()
