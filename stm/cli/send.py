"""stm-send: capture files or a pipe in; STM reports out."""

from __future__ import annotations

import json
import socket
import sys
import time

import click

from stm import __version__, gre, pcapng
from stm.cli.common import CONTEXT, fail_cleanly, parse_int, setup_logging, verbosity_options
from stm.errors import UsageError
from stm.report import Encoder
from stm.transport.udp import UdpSender
from stm.transport.url import parse_url

EPILOG = """\b
Examples:
  stm-send trace.pcapng --to udp://collector:4754
  stm-send a.pcap b.pcapng --to udp://[2001:db8::1]:4754 --producer amf-1 --rate 10000
  tcpdump -U -w - port 5060 | stm-send - --to udp://127.0.0.1:4754
"""


def check_capture(path: str) -> None:
    """Fail early, with exit code 2, on a file that cannot be read or is not a capture."""
    if path == "-":
        return
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    known = (b"\x0a\x0d\x0d\x0a", b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1")
    known += (b"\xa1\xb2\x3c\x4d", b"\x34\xcd\xb2\xa1", b"\xa1\xb2\xcd\x34")
    if magic not in known:
        raise UsageError(f"{path} is not a pcap or pcapng file")


@click.command(context_settings=CONTEXT, epilog=EPILOG)
@click.argument("files", nargs=-1, required=True, metavar="FILE... (- for stdin)")
@click.option(
    "--to",
    "destinations",
    multiple=True,
    required=True,
    metavar="URL",
    help="Where to send: udp://HOST:PORT (repeat to send a copy to each).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["gre"]),
    default="gre",
    show_default=True,
    help="Report format: gre = UDP-GRE-pcapng (format A).",
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
    help="Stream ID (GRE key); default: CRC-32 of the producer name.",
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
    help="Path MTU: reports are sized so that IP never fragments.",
)
@click.option(
    "--linger",
    type=click.FloatRange(min=0),
    default=0.005,
    show_default=True,
    metavar="SECONDS",
    help="Longest a partial report waits for more packets.",
)
@click.option(
    "--oversize",
    type=click.Choice(["fragment", "truncate", "drop"]),
    default="fragment",
    show_default=True,
    help="What to do with a packet too big for one report.",
)
@click.option(
    "--checksum/--no-checksum", default=False, show_default=True, help="Set the GRE checksum."
)
@click.option(
    "--protocol-type", default="0x88B5", show_default=True, help="GRE protocol type of the reports."
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
    endpoints = [
        parse_url(d, default_port=gre.GRE_UDP_PORT, schemes=("udp",)) for d in destinations
    ]
    for path in files:
        check_capture(path)
    key = None if stream_id is None else parse_int(stream_id, "--stream-id")
    ptype = parse_int(protocol_type, "--protocol-type")
    if not 0 <= ptype <= 0xFFFF:
        raise UsageError("--protocol-type must fit 16 bits")
    probe = Encoder(producer, key)  # resolves the default stream ID
    senders = [
        UdpSender(e.host, e.port, source_port=gre.entropy_source_port(probe.stream_id))
        for e in endpoints
    ]
    encoder = Encoder(
        producer,
        probe.stream_id,
        mtu=mtu,
        ip_header=max(s.ip_header for s in senders),
        linger=linger,
        oversize=oversize,
        checksum=checksum,
        protocol_type=ptype,
    )

    def emit(datagrams: list[bytes]) -> None:
        for s in senders:
            s.send(datagrams)

    started = time.monotonic()
    count = 0
    monotonic = time.monotonic
    try:
        for path in files:
            source = sys.stdin.buffer if path == "-" else path
            for packet in pcapng.read(source):
                now = monotonic()
                if rate is not None:
                    now = _pace(started + count / rate, now, encoder, emit)
                out = encoder.add(packet, now)
                emit(out or encoder.poll(now))
                count += 1
    finally:
        emit(encoder.flush())
    elapsed = time.monotonic() - started
    _summary(encoder, senders, endpoints, elapsed, as_json, quiet)


def _pace(target: float, now: float, encoder: Encoder, emit) -> float:
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


def _summary(encoder, senders, endpoints, elapsed, as_json, quiet) -> None:
    stats = encoder.stats.as_dict()
    stats.update(
        seconds=round(elapsed, 6),
        packets_per_second=round(stats["packets"] / elapsed) if elapsed else None,
        producer=encoder.producer,
        stream_id=encoder.stream_id,
        destinations=[str(e) for e in endpoints],
        refused=sum(s.refused for s in senders),
    )
    if as_json:
        click.echo(json.dumps(stats))
    elif not quiet:
        click.echo(
            f"stm-send: {stats['packets']} packets in {stats['datagrams']} reports "
            f"({stats['bytes']} bytes) to {', '.join(stats['destinations'])} in "
            f"{elapsed:.3f} s; oversize: {stats['fragmented']} fragmented, "
            f"{stats['truncated']} truncated, {stats['dropped']} dropped",
            err=True,
        )


if __name__ == "__main__":
    main()
