"""stm-send: capture files or a pipe in; STM reports out."""

from __future__ import annotations

import json
import socket
import sys
import time

import click

from stm import __version__, gre, pcapng, tlv
from stm.cli.common import (
    CONTEXT,
    fail_cleanly,
    parse_int,
    read_secret,
    setup_logging,
    verbosity_options,
)
from stm.errors import MalformedPcapng, UsageError
from stm.report import Encoder, TlvEncoder, stream_id_for
from stm.transport.tcp import TcpSender
from stm.transport.udp import UdpSender
from stm.transport.url import parse_url

EPILOG = """\b
Examples:
  stm-send trace.pcapng --to udp://collector:4754
  stm-send a.pcap b.pcapng --to udp://[2001:db8::1]:4754 --producer amf-1 --rate 10000
  stm-send trace.pcap --format tlv --to tcp://homer:9060
  tcpdump -U -w - port 5060 | stm-send - --to udp://127.0.0.1:4754
"""
DEFAULT_PORT = {"gre": gre.GRE_UDP_PORT, "tlv": tlv.HEP_PORT}
CAPTURE_MAGICS = (
    b"\x0a\x0d\x0d\x0a", b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1",
    b"\xa1\xb2\x3c\x4d", b"\x34\xcd\xb2\xa1", b"\xa1\xb2\xcd\x34",
)  # fmt: skip


def check_capture(path: str) -> None:
    """Fail early, with exit code 2, on a file that cannot be read or is not a capture."""
    if path == "-":
        return
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if magic not in CAPTURE_MAGICS:
        raise UsageError(f"{path} is not a pcap or pcapng file")


def open_senders(destinations, fmt, source_port, queue, queue_policy):
    senders = []
    for url in destinations:
        e = parse_url(url, default_port=DEFAULT_PORT[fmt])
        if e.scheme == "tcp" and fmt == "gre":
            raise UsageError(f"{url}: format A (gre) is GRE-in-UDP; use --format tlv over TCP")
        if e.scheme == "udp":
            senders.append(UdpSender(e.host, e.port, source_port=source_port))
        else:
            senders.append(TcpSender(e.host, e.port, queue_limit=queue, policy=queue_policy))
    return senders


@click.command(context_settings=CONTEXT, epilog=EPILOG)
@click.argument("files", nargs=-1, required=True, metavar="FILE... (- for stdin)")
@click.option(
    "--to",
    "destinations",
    multiple=True,
    required=True,
    metavar="URL",
    help="udp://HOST:PORT or tcp://HOST:PORT (tlv only); repeat to send a copy to each.",
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
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@verbosity_options
@click.version_option(__version__, "-V", "--version", prog_name="stm-send")
@fail_cleanly("stm-send")
def main(
    files,
    destinations,
    fmt,
    producer,
    stream_id,
    rate,
    mtu,
    linger,
    oversize,
    checksum,
    protocol_type,
    auth_key_file,
    queue,
    queue_policy,
    drain_timeout,
    as_json,
    verbose,
    quiet,
):
    """Send the packets of capture files as 3GPP STM reports (TS 28.560).

    Reads pcap and pcapng files (or - for standard input) in order and sends every
    packet, byte for byte with its timestamp, lengths, flags and comments, to each
    destination. Prints a summary at the end.
    """
    setup_logging("stm-send", verbose, quiet)
    for path in files:
        check_capture(path)
    key = None if stream_id is None else parse_int(stream_id, "--stream-id")
    ptype = parse_int(protocol_type, "--protocol-type")
    if not 0 <= ptype <= 0xFFFF:
        raise UsageError("--protocol-type must fit 16 bits")
    auth_key = read_secret(auth_key_file, "--auth-key-file") if auth_key_file else None
    stream = stream_id_for(producer, key)
    senders = open_senders(destinations, fmt, gre.entropy_source_port(stream), queue, queue_policy)
    ip_header = max(s.ip_header for s in senders)
    if fmt == "gre":

        def gre_encoder(byte_order: str | None = None) -> Encoder:
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

        # Made now so that bad settings fail before any input is read; made again in the
        # byte order of the first section, so its packet blocks can be copied as they are.
        encoder = gre_encoder()
    else:
        only_tcp = all(isinstance(s, TcpSender) for s in senders)
        encoder = TlvEncoder(
            producer,
            stream,
            mtu=mtu,
            ip_header=ip_header,
            transport="tcp" if only_tcp else "udp",
            oversize=oversize,
            auth_key=auth_key,
        )

    def emit(reports: list[bytes]) -> None:
        if reports:
            for s in senders:
                s.send(reports)

    started = time.monotonic()
    count = 0
    monotonic = time.monotonic
    first_section = fmt == "gre"  # the encoder still has to take the input's byte order
    try:
        for path in files:
            source = sys.stdin.buffer if path == "-" else path
            if fmt == "gre" and rate is None:
                # The fast path: runs of packet blocks copied whole (a pcap record, which
                # has no block to copy, still comes as a Packet).
                interfaces: list[pcapng.Interface] = []
                for event in pcapng.read_events(source, raw_packets=True):
                    kind = type(event)
                    if kind is pcapng.RawPackets:
                        try:
                            emit(encoder.add_raw(event, interfaces, monotonic()))
                        except MalformedPcapng as exc:
                            emit(getattr(exc, "datagrams", []))
                            raise
                    elif kind is pcapng.Packet:
                        now = monotonic()
                        emit(encoder.add(event, now) or encoder.poll(now))
                    elif kind is pcapng.Interface:
                        interfaces.append(event)
                    elif kind is pcapng.Section:
                        interfaces = []
                        if first_section:
                            first_section = False
                            if event.byte_order != encoder.bo:
                                encoder = gre_encoder(event.byte_order)
                continue
            for event in pcapng.read_events(source):
                if type(event) is not pcapng.Packet:
                    if first_section and type(event) is pcapng.Section:
                        first_section = False
                        if event.byte_order != encoder.bo:
                            encoder = gre_encoder(event.byte_order)
                    continue
                now = monotonic()
                if rate is not None:
                    now = _pace(started + count / rate, now, encoder, emit)
                emit(encoder.add(event, now) or encoder.poll(now))
                count += 1
    finally:
        emit(encoder.flush())
        for s in senders:
            if isinstance(s, TcpSender):
                s.close(drain_timeout)
    _summary(encoder, senders, time.monotonic() - started, as_json, quiet)


def _pace(target: float, now: float, encoder, emit) -> float:
    """Sleep until ``target``, flushing a lingering report on the way."""
    while now < target:
        deadline = encoder.deadline()
        if deadline is not None and deadline <= target:
            time.sleep(max(0.0, deadline - now))
            now = time.monotonic()
            emit(encoder.poll(now))
        else:
            time.sleep(target - now)
            now = time.monotonic()
    return now


def _summary(encoder, senders, elapsed, as_json, quiet) -> None:
    stats = encoder.stats.as_dict()
    stats["reports"] = stats.pop("datagrams")
    stats.update(
        seconds=round(elapsed, 6),
        packets_per_second=round(stats["packets"] / elapsed) if elapsed else None,
        producer=encoder.producer,
        stream_id=encoder.stream_id,
        destinations={
            s.url: (s.stats() if isinstance(s, TcpSender) else {"refused": s.refused})
            for s in senders
        },
    )
    if as_json:
        click.echo(json.dumps(stats))
    elif not quiet:
        click.echo(
            f"stm-send: {stats['packets']} packets in {stats['reports']} reports "
            f"({stats['bytes']} bytes) in {elapsed:.3f} s; oversize: {stats['fragmented']} "
            f"fragmented, {stats['truncated']} truncated, {stats['dropped']} dropped",
            err=True,
        )
        for url, s in stats["destinations"].items():
            if "sent" in s:
                click.echo(
                    f"  {url}: {s['sent']} sent, {s['dropped']} dropped, "
                    f"{s['undelivered']} undelivered, {s['reconnects']} reconnects",
                    err=True,
                )


if __name__ == "__main__":
    main()
