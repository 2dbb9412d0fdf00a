"""Report codecs in memory: format A and B encode and decode, packets per second.

One process, one thread, no sockets: the packets of the pcapng benchmark's input (the same
generated file, ``--packets`` of ``--size`` bytes) are read into a list first, so reading
is not timed. Then, each best of ``--repeat``:

* format A encode: ``gre_pcapng.Encoder.add`` over every packet, then ``flush``;
* format A encode raw: the file read again in the reader's bulk mode
  (``Reader(raw_packets=True)``) and every run of packet blocks through
  ``Encoder.add_raw``, no ``Packet`` per packet: reading *is* timed in this row (it is what
  stm-send does), and its datagrams must be byte-identical to those of ``add``;
* format A decode: ``Decoder.receive_datagram`` over those datagrams, draining ``events()``
  after each one, as ``stm-recv`` does;
* format A decode + sink: the same, with every ``Packets`` event written by ``PcapngSink``
  to a ``BytesIO``;
* format A encode and decode again with ``mtu=9000``, to show the per-datagram share;
* format B (``hep.TlvEncoder``, ``TlvDecoder.receive_message``): the same three.

``editcap -F pcapng`` of the same file (read + write, a subprocess, best of at least 5) is
timed in the same run as a yardstick. Decoded packets are checked against the input once,
outside the timings.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
from collections.abc import Callable
from pathlib import Path

import stm.pcapng as sp
from bench.common import DATA_DIR, Row, Timing, best_of, log, run_timed
from bench.pcapng import SUBPROCESS_REPEAT, dataset
from stm.pcapng.records import Packet
from stm.pcapng.writer import HOST_ORDER
from stm.report import Decoder, Encoder, PacketBlocks, Packets, TlvDecoder, TlvEncoder
from stm.sink import PcapngSink

NAME = "report"
PRODUCER = "bench"
SOURCE = ("127.0.0.1", 40000)  # what stm-recv passes as a datagram's source
NOW = 0.0  # the encoders and decoders take the time as an argument: a constant costs nothing

# Targets from the issues, for ~300-byte packets on one core.
ENCODE_A_TARGET = 300_000
DECODE_A_TARGET = 500_000
JUMBO = 9000
PROFILE_PACKETS = 200_000  # cProfile is slow: profile this many packets at most


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _has(parser: argparse.ArgumentParser, option: str) -> bool:
    return option in parser._option_string_actions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark. Under ``all`` the options the pcapng benchmark already
    defines (``--packets``, ``--size``, ``--profile``, ``--no-refs``) are shared with it."""
    if not _has(parser, "--packets"):
        parser.add_argument(
            "--packets", type=_positive, default=1_000_000, help="packets in the input file"
        )
    if not _has(parser, "--size"):
        parser.add_argument("--size", type=_positive, default=300, help="mean frame size")
    if not _has(parser, "--profile"):
        parser.add_argument(
            "--profile",
            action="store_true",
            help="cProfile the encode and decode paths; top functions go to stderr",
        )
    if not _has(parser, "--no-refs"):
        parser.add_argument("--no-refs", action="store_true", help="time only stm")


# -- input ----------------------------------------------------------------------------------


def load(path: Path) -> list[Packet]:
    """The file's packets, each holding its own ``bytes`` (not a view into a read buffer)."""
    out = []
    for p in sp.read(path):
        p.data = bytes(p.data)
        out.append(p)
    return out


# -- the measured functions -----------------------------------------------------------------


def encode_a(packets: list[Packet], mtu: int = 1500) -> list[bytes]:
    """Format A: every packet through ``Encoder.add``, then ``flush``."""
    enc = Encoder(PRODUCER, session=0, mtu=mtu)
    out: list[bytes] = []
    extend = out.extend
    add = enc.add
    for p in packets:
        ready = add(p, NOW)
        if ready:
            extend(ready)
    out += enc.flush()
    return out


def encode_a_raw(path: Path, mtu: int = 1500) -> list[bytes]:
    """Format A from the file: the reader's bulk mode, each run through ``Encoder.add_raw``
    (reading included); a classic pcap record, the one ``Packet`` bulk mode yields, to ``add``.
    """
    enc = Encoder(PRODUCER, session=0, mtu=mtu)
    out: list[bytes] = []
    interfaces: list[sp.Interface] = []
    add_raw = enc.add_raw
    for ev in sp.read_events(path, raw_packets=True):
        kind = type(ev)
        if kind is sp.RawPackets:
            out += add_raw(ev, interfaces, NOW)
        elif kind is sp.Interface:
            interfaces.append(ev)
        elif kind is sp.Section:
            interfaces = []
        elif kind is Packet:
            out += enc.add(ev, NOW)
    out += enc.flush()
    return out


def encode_b(packets: list[Packet]) -> list[bytes]:
    """Format B (UDP budget): every packet through ``TlvEncoder.add``."""
    enc = TlvEncoder(PRODUCER, session=bytes(8))
    out: list[bytes] = []
    extend = out.extend
    add = enc.add
    for p in packets:
        extend(add(p, NOW))
    out += enc.flush()
    return out


def _decoder(fmt: str) -> tuple[Decoder | TlvDecoder, Callable]:
    if fmt in ("A", "A-raw"):
        # A-raw: what stm-recv does, reports in the output's byte order as PacketBlocks.
        d = Decoder(raw_byte_order=HOST_ORDER if fmt == "A-raw" else None)
        return d, d.receive_datagram
    t = TlvDecoder()
    return t, t.receive_message


def decode(fmt: str, reports: list[bytes]) -> int:
    """Every report into the decoder, its events drained after each one; packets out."""
    dec, receive = _decoder(fmt)
    events = dec.events
    n = 0
    for r in reports:
        receive(r, SOURCE, NOW)
        for ev in events():
            if type(ev) is PacketBlocks:
                n += ev.count
            elif type(ev) is Packets:
                n += len(ev.packets)
    if dec.malformed:
        raise RuntimeError(f"format {fmt}: {dec.malformed} malformed reports")
    return n


def decode_sink(fmt: str, reports: list[bytes], out: io.BytesIO | None = None) -> int:
    """``decode`` with the packets written by ``PcapngSink`` (what stm-recv does)."""
    dec, receive = _decoder(fmt)
    events = dec.events
    sink = PcapngSink(out if out is not None else io.BytesIO())
    write = sink.write
    for r in reports:
        receive(r, SOURCE, NOW)
        for ev in events():
            if type(ev) is PacketBlocks:
                sink.write_blocks(ev)
            elif type(ev) is Packets:
                write(ev.stream, ev.packets)
    sink.close()
    return sink.packets


def check(fmt: str, packets: list[Packet], reports: list[bytes]) -> None:
    """Untimed: the sink's output must hold the input packets, in order, exactly."""
    buf = io.BytesIO()
    decode_sink(fmt, reports, buf)
    buf.seek(0)
    n = 0
    for got, want in zip(sp.read(buf), packets, strict=True):
        if (got.ts, bytes(got.data), got.origlen) != (want.ts, want.data, want.origlen):
            raise RuntimeError(f"format {fmt}: packet {n} differs after the round trip")
        n += 1
    log(f"  check  format {fmt}: {n:,} packets rebuilt exactly")


# -- driver ---------------------------------------------------------------------------------


class _Ctx:
    def __init__(self, args: argparse.Namespace, path: Path, n: int) -> None:
        self.args = args
        self.path = path
        self.n = n
        self.mbytes = path.stat().st_size / 1e6
        self.rows: list[Row] = []

    def add(self, section: str, name: str, t: Timing, *, note: str = "") -> Row:
        pps = self.n / t.wall
        row = Row(NAME, section, name, pps, "pkt/s", self.n, t.wall, t.cpu, note=note)
        row.mbytes_s = self.mbytes / t.wall
        self.rows.append(row)
        log(f"  {section:8} {name:34} {pps:>12,.0f} pkt/s  {t.wall:7.3f} s  cpu {t.cpu:7.3f} s")
        return row

    def time(self, fn: Callable[[], object], count: Callable[[object], int]) -> Timing:
        t = best_of(self.args.repeat, fn)
        got = count(t.result)
        if got != self.n:
            raise RuntimeError(f"{fn} handled {got} packets, expected {self.n}")
        return t


def _editcap(ctx: _Ctx) -> Row | None:
    if shutil.which("editcap") is None:
        log("  editcap not found: skipped (apt-get install wireshark-common)")
        return None
    out = DATA_DIR / "scratch-report.pcapng"
    repeat = max(ctx.args.repeat, SUBPROCESS_REPEAT)
    try:
        t = run_timed(["editcap", "-F", "pcapng", str(ctx.path), str(out)], repeat)
    finally:
        out.unlink(missing_ok=True)
    note = f"read+write a {ctx.mbytes:,.0f} MB file; subprocess, best of {repeat}"
    return ctx.add("ref", "editcap -F pcapng", t, note=note)


def _ratio(row: Row, ref: Row | None) -> None:
    if ref is not None and row.cpu_seconds and ref.cpu_seconds:
        row.vs["editcap"] = row.value / ref.value
        row.vs_cpu["editcap"] = ref.cpu_seconds / row.cpu_seconds  # same packet count


def _target(name: str, row: Row, goal: int) -> Row:
    cpu_pps = row.packets / row.cpu_seconds if row.cpu_seconds and row.packets else float("nan")
    status = "PASS" if row.value >= goal else "MISS"
    note = f"need >= {goal:,} pkt/s; by CPU time {cpu_pps:,.0f} pkt/s"
    return Row(NAME, "target", name, row.value, "pkt/s", status=status, note=note)


def _profile(packets: list[Packet]) -> None:
    """cProfile of encode, decode and decode + sink of both formats (to stderr), on at most
    PROFILE_PACKETS packets."""
    few = packets[:PROFILE_PACKETS]
    a = encode_a(few)
    b = encode_b(few)
    cases: list[tuple[str, Callable[[], object]]] = [
        ("format A encode", lambda: encode_a(few)),
        ("format A decode", lambda: decode("A", a)),
        ("format A decode + PcapngSink", lambda: decode_sink("A", a)),
        ("format B encode", lambda: encode_b(few)),
        ("format B decode", lambda: decode("B", b)),
        ("format B decode + PcapngSink", lambda: decode_sink("B", b)),
    ]
    for label, fn in cases:
        prof = cProfile.Profile()
        prof.runcall(fn)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(16)
        log(f"-- cProfile: {label}, {len(few):,} packets (sorted by tottime)\n{s.getvalue()}")


def run(args: argparse.Namespace) -> list[Row]:
    """Run the in-memory report benchmark and return its rows."""
    path = dataset(args.packets, args.size)
    packets = load(path)
    n = len(packets)
    ctx = _Ctx(args, path, n)
    nbytes = sum(len(p.data) for p in packets)
    log(f"input: {path} ({n:,} packets, mean {nbytes / n:.0f} bytes), held in memory")

    editcap = None if args.no_refs else _editcap(ctx)

    t = ctx.time(lambda: encode_a(packets), lambda _: n)
    reports_a: list[bytes] = t.result
    per = n / len(reports_a)
    enc_a = ctx.add("A", "encode (Encoder.add)", t, note=f"{per:.1f} packets per datagram")
    t = ctx.time(lambda: encode_a_raw(path), lambda _: n)
    if t.result != reports_a:
        raise RuntimeError("format A: add_raw's datagrams differ from add's")
    t.result = None
    note = "file read in bulk mode, reading included; datagrams identical to add's"
    raw_a = ctx.add("A", "encode raw (bulk Reader + add_raw)", t, note=note)
    t = ctx.time(lambda: decode("A", reports_a), int)
    dec_a = ctx.add("A", "decode (receive_datagram)", t, note="events drained per datagram")
    t = ctx.time(lambda: decode_sink("A", reports_a), int)
    sink_a = ctx.add("A", "decode + PcapngSink", t, note="written to a BytesIO")
    t = ctx.time(lambda: decode("A-raw", reports_a), int)
    dec_raw = ctx.add(
        "A", "decode raw (PacketBlocks)", t, note="as stm-recv: EPBs checked, not parsed"
    )
    t = ctx.time(lambda: decode_sink("A-raw", reports_a), int)
    ctx.add("A", "decode raw + PcapngSink", t, note="EPBs copied whole (Writer.copy_epbs)")

    # The same at MTU 9000 (jumbo frames; loopback's MTU is 65536): the per-datagram costs
    # are shared by ~9 times as many packets.
    t = ctx.time(lambda: encode_a(packets, JUMBO), lambda _: n)
    jumbo: list[bytes] = t.result
    note = f"{n / len(jumbo):.1f} packets per datagram"
    _ratio(ctx.add("A-9000", "encode, mtu=9000", t, note=note), editcap)
    t = ctx.time(lambda: decode("A", jumbo), int)
    _ratio(ctx.add("A-9000", "decode, mtu=9000", t), editcap)
    jumbo.clear()

    t = ctx.time(lambda: encode_b(packets), len)
    reports_b: list[bytes] = t.result
    size_b = sum(map(len, reports_b)) / len(reports_b)
    enc_b = ctx.add("B", "encode (TlvEncoder.add)", t, note=f"one {size_b:.0f}-byte message each")
    t = ctx.time(lambda: decode("B", reports_b), int)
    dec_b = ctx.add("B", "decode (receive_message)", t, note="events drained per message")
    t = ctx.time(lambda: decode_sink("B", reports_b), int)
    sink_b = ctx.add("B", "decode + PcapngSink", t, note="written to a BytesIO")

    for row in (enc_a, raw_a, dec_a, sink_a, enc_b, dec_b, sink_b):
        _ratio(row, editcap)
    check("A", packets, reports_a)
    check("B", packets, reports_b)
    if args.profile:
        _profile(packets)
    packets.clear()

    return [
        *ctx.rows,
        _target("format A encode", enc_a, ENCODE_A_TARGET),
        _target("format A encode raw, reading included", raw_a, ENCODE_A_TARGET),
        _target("format A decode", dec_a, DECODE_A_TARGET),
        _target("format A decode raw (PacketBlocks)", dec_raw, DECODE_A_TARGET),
    ]
