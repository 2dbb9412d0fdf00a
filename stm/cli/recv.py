"""stm-recv: STM reports in; one merged pcapng out."""

from __future__ import annotations

import json
import selectors
import signal
import sys
import time

import click

from stm import __version__, gre, tlv
from stm.cli.common import (
    CONTEXT,
    fail_cleanly,
    log,
    parse_int,
    read_secret,
    setup_logging,
    verbosity_options,
)
from stm.errors import UsageError
from stm.logbudget import LogBudget
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
from stm.sink import PcapngSink
from stm.summary import summarize
from stm.transport.tcp import TcpListener
from stm.transport.udp import UdpReceiver
from stm.transport.url import parse_url

DEFAULT_PORT = {"gre": gre.GRE_UDP_PORT, "tlv": tlv.HEP_PORT, "auto": gre.GRE_UDP_PORT}


class RawFrames:
    """A TCP framer for format B that hands over raw messages for the report decoder."""

    def __init__(self) -> None:
        self._framer = tlv.TlvFramer()

    @property
    def failed(self) -> bool:
        return self._framer.failed

    def receive_data(self, data: bytes) -> None:
        self._framer.receive_data(data)

    def next_message(self) -> bytes | None:
        return self._framer.next_frame()


EPILOG = """\b
Examples:
  stm-recv --listen udp://0.0.0.0:4754 -w collected.pcapng
  stm-recv --listen udp://[::]:4754 -w out.pcapng --duration 60 --json
  stm-recv --listen udp://127.0.0.1:4754 -w - | wireshark -k -i -
"""


class Collector:
    """The receive loop: sockets in, decoder, sink out; stops on a signal or a limit."""

    def __init__(self, receivers, decoder: Decoder, sink: PcapngSink, *, count, duration):
        self.receivers = receivers
        self.decoder = decoder
        self.sink = sink
        self.count = count
        self.duration = duration
        self.stop = False
        self.malformed_log = LogBudget(burst=1, window=1.0)  # one line a second at most

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        for r in self.receivers:
            if isinstance(r, TcpListener):
                r.register(sel)
            else:
                sel.register(r.sock, selectors.EVENT_READ, r)
        started = time.monotonic()
        end = None if self.duration is None else started + self.duration
        last_expire = started
        on_datagram = getattr(self.decoder, "receive_datagram", None) or (
            self.decoder.receive_message
        )
        while not self.stop:
            now = time.monotonic()
            timeout = 0.1 if end is None else max(0.0, min(0.1, end - now))
            for key, mask in sel.select(timeout):
                source = key.data
                if isinstance(source, TcpListener):
                    source.handle(key, mask)
                    continue
                for data, addr in source.drain():
                    on_datagram(data, addr, time.monotonic())
                    self._events()
                    if self.count is not None and self.sink.packets >= self.count:
                        self.stop = True
                        break
            now = time.monotonic()
            if now - last_expire >= 0.5:
                self.decoder.expire(now)
                self._events()
                last_expire = now
            self.sink.maybe_flush(now)
            if end is not None and now >= end:
                break
        sel.close()

    def on_message(self, message: bytes, peer) -> None:
        """A whole format-B message from a TCP connection."""
        self.decoder.receive_message(message, peer, time.monotonic())
        self._events()
        if self.count is not None and self.sink.packets >= self.count:
            self.stop = True

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
            elif isinstance(ev, Restarted):
                log.info("stream %s: producer restarted", ev.stream)
            elif isinstance(ev, FragmentsExpired):
                log.info("stream %s: %d fragmented packet(s) incomplete", ev.stream, ev.packets)


@click.command(context_settings=CONTEXT, epilog=EPILOG)
@click.option(
    "--listen",
    "listens",
    multiple=True,
    required=True,
    metavar="URL",
    help="udp://HOST:PORT, or tcp://HOST:PORT for format B (repeatable, any mix).",
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
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@verbosity_options
@click.version_option(__version__, "-V", "--version", prog_name="stm-recv")
@fail_cleanly("stm-recv")
def main(
    listens,
    output,
    fmt,
    count,
    duration,
    flush_interval,
    protocol_type,
    max_streams,
    auth_key_file,
    max_connections,
    as_json,
    verbose,
    quiet,
):
    """Receive 3GPP STM reports (TS 28.560) and rebuild the packets into one pcapng.

    Every producer, stream and source interface gets an interface of its own in the
    output; packets keep their timestamps, lengths, flags and comments exactly. Stops on
    SIGINT or SIGTERM (or --count/--duration), flushes the file and prints what it
    received, lost, duplicated and rejected.
    """
    setup_logging("stm-recv", verbose, quiet)
    endpoints = [parse_url(u, default_port=DEFAULT_PORT[fmt]) for u in listens]
    for e in endpoints:
        if e.scheme == "tcp" and fmt == "gre":
            raise UsageError(f"{e}: format A (gre) is GRE-in-UDP; TCP carries format B (tlv)")
    ptype = parse_int(protocol_type, "--protocol-type")
    auth_key = read_secret(auth_key_file, "--auth-key-file") if auth_key_file else None
    limits = {"max_streams": max_streams}
    # Reports already in the output's byte order are copied block by block (PacketBlocks).
    if fmt == "gre":
        decoder = Decoder(protocol_type=ptype, raw_byte_order=HOST_ORDER, **limits)
    elif fmt == "tlv":
        decoder = TlvDecoder(auth_key=auth_key, **limits)
    else:
        decoder = AutoDecoder(
            protocol_type=ptype, raw_byte_order=HOST_ORDER, auth_key=auth_key, **limits
        )
    collector = Collector([], decoder, None, count=count, duration=duration)
    receivers = []
    try:
        for e in endpoints:
            if e.scheme == "udp":
                receivers.append(UdpReceiver(e.host, e.port))
            else:
                receivers.append(
                    TcpListener(
                        e.host,
                        e.port,
                        framer_factory=RawFrames,
                        on_message=collector.on_message,
                        max_connections=max_connections,
                    )
                )
    except BaseException:
        for r in receivers:
            r.close()
        raise
    collector.receivers = receivers
    if output == "-":
        out = sys.stdout.buffer
    else:
        try:
            out = open(output, "wb")  # noqa: SIM115 - closed in finally below
        except OSError as exc:
            raise UsageError(f"cannot write {output}: {exc.strerror}") from None
    sink = PcapngSink(out, flush_interval=flush_interval)
    sink.flush()
    collector.sink = sink

    def stop(signum, frame):
        collector.stop = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for r in receivers:
        host, port = r.address[:2]
        scheme = "tcp" if isinstance(r, TcpListener) else "udp"
        log.warning("listening on %s://%s:%d", scheme, f"[{host}]" if ":" in host else host, port)
    try:
        collector.run()
    finally:
        sink.close()
        if out is not sys.stdout.buffer:
            out.close()
        for r in receivers:
            r.close()
    _summary(decoder, sink, receivers, output, as_json, quiet)


def _summary(decoder, sink: PcapngSink, receivers, output: str, as_json: bool, quiet: bool):
    streams = {str(s): st.stats.as_dict() for s, st in decoder.streams.items()}
    listeners = [r for r in receivers if isinstance(r, TcpListener)]
    totals = {
        "packets_written": sink.packets,
        "rejected_connections": sum(r.rejected_connections for r in listeners),
        "auth_rejected": getattr(decoder, "rejected_auth", 0),
        "malformed": decoder.malformed,
        "rejected": sink.rejected,
        **{
            k: sum(s[k] for s in streams.values())
            for k in ("datagrams", "lost", "duplicates", "reordered", "fragments_expired")
        },
    }
    if as_json:
        click.echo(json.dumps({"output": output, **totals, "streams": streams}), err=output == "-")
        return
    if quiet:
        return
    echo = lambda s: click.echo(s, err=True)  # noqa: E731
    echo(
        f"stm-recv: {totals['packets_written']} packets from {totals['datagrams']} reports "
        f"written to {output}; lost {totals['lost']}, duplicated {totals['duplicates']}, "
        f"reordered {totals['reordered']}, malformed {totals['malformed']}, "
        f"incomplete fragments {totals['fragments_expired']}"
    )
    for name, s in streams.items():
        echo(
            f"  stream {name}: {s['packets']} packets, {s['datagrams']} reports, "
            f"lost {s['lost']}, duplicated {s['duplicates']}, reordered {s['reordered']}"
        )
    if output != "-":
        for line in summarize(output).lines():
            echo(line)


if __name__ == "__main__":
    main()
