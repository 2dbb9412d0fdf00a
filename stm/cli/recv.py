"""stm-recv: STM reports in; one merged pcapng out."""

from __future__ import annotations

import json
import selectors
import signal
import sys
import time

import click

from stm import __version__, gre
from stm.cli.common import (
    CONTEXT,
    RateLimitedLog,
    fail_cleanly,
    log,
    parse_int,
    setup_logging,
    verbosity_options,
)
from stm.errors import UsageError
from stm.report import Decoder, FragmentsExpired, Gap, Malformed, Packets, Restarted
from stm.sink import PcapngSink
from stm.summary import summarize
from stm.transport.udp import UdpReceiver
from stm.transport.url import parse_url

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
        self.malformed_log = RateLimitedLog()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        for r in self.receivers:
            sel.register(r.sock, selectors.EVENT_READ, r)
        started = time.monotonic()
        end = None if self.duration is None else started + self.duration
        last_expire = started
        while not self.stop:
            now = time.monotonic()
            timeout = 0.1 if end is None else max(0.0, min(0.1, end - now))
            for key, _ in sel.select(timeout):
                for data, addr in key.data.drain():
                    self.decoder.receive_datagram(data, addr, time.monotonic())
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

    def _events(self) -> None:
        sink = self.sink
        for ev in self.decoder.events():
            if type(ev) is Packets:
                sink.write(ev.stream, ev.packets)
            elif isinstance(ev, Gap):
                sink.loss(ev.stream, self.decoder.stats(ev.stream).lost)
                log.info(
                    "stream %s: %d report(s) missing before #%d", ev.stream, ev.missing, ev.sequence
                )
            elif isinstance(ev, Malformed):
                self.malformed_log.warning(f"malformed report from {ev.source}: {ev.reason}")
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
    help="Where to receive: udp://HOST:PORT (repeatable).",
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
    type=click.Choice(["gre"]),
    default="gre",
    show_default=True,
    help="Report format: gre = UDP-GRE-pcapng (format A).",
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
    endpoints = [parse_url(u, default_port=gre.GRE_UDP_PORT, schemes=("udp",)) for u in listens]
    ptype = parse_int(protocol_type, "--protocol-type")
    receivers = [UdpReceiver(e.host, e.port) for e in endpoints]
    if output == "-":
        out = sys.stdout.buffer
    else:
        try:
            out = open(output, "wb")  # noqa: SIM115 - closed in finally below
        except OSError as exc:
            raise UsageError(f"cannot write {output}: {exc.strerror}") from None
    decoder = Decoder(protocol_type=ptype, max_streams=max_streams)
    sink = PcapngSink(out, flush_interval=flush_interval)
    sink.flush()
    collector = Collector(receivers, decoder, sink, count=count, duration=duration)

    def stop(signum, frame):
        collector.stop = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for r in receivers:
        host, port = r.address[:2]
        log.warning("listening on udp://%s:%d", f"[{host}]" if ":" in host else host, port)
    try:
        collector.run()
    finally:
        sink.close()
        if out is not sys.stdout.buffer:
            out.close()
        for r in receivers:
            r.close()
    _summary(decoder, sink, output, as_json, quiet)


def _summary(decoder: Decoder, sink: PcapngSink, output: str, as_json: bool, quiet: bool) -> None:
    streams = {str(s): st.stats.as_dict() for s, st in decoder.streams.items()}
    totals = {
        "packets_written": sink.packets,
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
