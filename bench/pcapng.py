"""pcapng read/write throughput against editcap and python-pcapng, and read memory.

All timings come from one run on one input file (generated once into ``bench/data/`` and
cached): ours and python-pcapng best of ``--repeat``, editcap and capinfos best of at
least 5. python-pcapng is timed on the first ``--ref-read``/``--ref-write`` packets only
(it is slow) and its rate extrapolated; the output says so. Memory is the peak RSS of a
child process that does nothing but one streaming read.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import stm.pcapng as sp
from bench.common import DATA_DIR, Row, Timing, best_of, log, run_timed

NAME = "pcapng"
GEN_VERSION = 2  # bump when the generated file changes, to drop stale caches
LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
T0_NS = 1_700_000_000 * 10**9
BIG_BYTES = 2 * 10**9
ROOT = Path(__file__).resolve().parent.parent

# Targets from the issue: ours / reference must be at least this.
READ_VS_EDITCAP = 0.5
WRITE_VS_EDITCAP = 0.3
VS_PYTHON_PCAPNG = 10.0
RSS_LIMIT_MB = 100.0
SUBPROCESS_REPEAT = 5

# Compact header forms (RFC 3261 7.3.3) keep the whole message inside ~240 bytes.
_SIP = (
    "MESSAGE sip:{i:08d}@ims.test SIP/2.0\r\n"
    "v: SIP/2.0/UDP 192.0.2.{h};branch=z9hG4bK{i:x}\r\n"
    "Max-Forwards: 70\r\n"
    "f: <sip:{j:08d}@ims.test>;tag={t:x}\r\n"
    "t: <sip:{i:08d}@ims.test>\r\n"
    "i: {i:x}@pcscf\r\n"
    "CSeq: {cseq} MESSAGE\r\n"
    "c: text/plain\r\n"
)
_BODY = b"stm benchmark payload " * 3000
_ETH = bytes.fromhex("0200000000010200000000020800")
_IP = struct.Struct("!BBHHHBBH4s4s")
_IP_WORDS = struct.Struct("!10H")
_UDP = struct.Struct("!HHHH")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark (also taken by ``all``)."""
    parser.add_argument("--packets", type=_positive, default=1_000_000, help="packets in the file")
    parser.add_argument("--size", type=_positive, default=300, help="mean frame size in bytes")
    parser.add_argument(
        "--ref-read",
        type=_positive,
        default=100_000,
        metavar="N",
        help="python-pcapng reads only the first N packets (rate extrapolated)",
    )
    parser.add_argument(
        "--ref-write",
        type=_positive,
        default=50_000,
        metavar="N",
        help="python-pcapng writes only N packets (rate extrapolated)",
    )
    parser.add_argument("--no-refs", action="store_true", help="time only stm")
    parser.add_argument(
        "--big",
        action="store_true",
        help="also build a ~2 GB file (by repetition) and show that read memory stays flat",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile stm's read and write paths; top functions go to stderr",
    )


# -- input ----------------------------------------------------------------------------------


def frame(i: int, size: int) -> bytes:
    """Packet ``i``: Ethernet/IPv4/UDP carrying a SIP MESSAGE, ``size`` ± 16 bytes long."""
    length = max(64, size + (i * 37) % 33 - 16)
    plen = length - 42
    head = _SIP.format(
        i=i,
        j=(i * 7919) % 10**8,
        h=1 + i % 200,
        t=(i * 2654435761) & 0xFFFFFFFF,
        cseq=1 + i % 65535,
    ).encode()
    room = plen - len(head) - len(b"l: \r\n\r\n")
    # Content-Length must count the body exactly; a second space absorbs a digit boundary.
    pad, body_len = next(
        ((p, room - p - d) for p in (0, 1) for d in range(1, 7) if len(str(room - p - d)) == d),
        (0, 0),
    )
    cl = b"l:%s %d\r\n\r\n" % (b" " * pad, body_len)
    payload = head + cl + _BODY[:body_len]
    payload = payload[:plen]  # only cut for sizes too small for a whole message
    src = bytes((192, 0, 2, 1 + i % 200))
    dst = bytes((198, 51, 100, 1 + (i * 7) % 200))
    ip = _IP.pack(0x45, 0, 28 + plen, i & 0xFFFF, 0x4000, 64, 17, 0, src, dst)
    s = sum(_IP_WORDS.unpack(ip))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    ip = ip[:10] + struct.pack("!H", ~s & 0xFFFF) + ip[12:]
    return b"".join((_ETH, ip, _UDP.pack(5060, 5060, 8 + plen, 0), payload))


def timestamp(i: int) -> int:
    """Nanoseconds: 100k packets/s with some jitter, always increasing."""
    return T0_NS + i * 10_000 + (i * 7919) % 5_000


def _open_writer(f: io.BufferedWriter | io.BytesIO) -> sp.Writer:
    w = sp.Writer(f, options=[(4, "stm bench")])  # shb_userappl
    w.add_interface(LINKTYPE_ETHERNET, SNAPLEN, name="bench0", tsresol=9)
    return w


def dataset(packets: int, size: int) -> Path:
    """The benchmark file, generated deterministically on first use and cached."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    path = DATA_DIR / f"pcapng-v{GEN_VERSION}-{packets}x{size}.pcapng"
    if path.exists():
        return path
    log(f"generating {path.name} ({packets:,} packets of ~{size} bytes)...")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        w = _open_writer(f)
        for i in range(packets):
            w.write_packet(0, timestamp(i), frame(i, size))
        w.flush()
    os.replace(tmp, path)
    return path


def big_dataset(base: Path, packets: int) -> tuple[Path, int]:
    """A ~2 GB file: the base file's packet blocks repeated after its SHB and IDB.

    Timestamps go back at each repetition: the file is for memory, not for analysis.
    """
    path = base.with_name(base.stem + "-big.pcapng")
    header = io.BytesIO()
    _open_writer(header).flush()
    head = header.getvalue()
    body_len = base.stat().st_size - len(head)
    reps = max(1, -(-BIG_BYTES // body_len))
    if not path.exists():
        log(f"building {path.name} ({reps} x {body_len / 1e6:.0f} MB)...")
        with open(base, "rb") as f:
            if f.read(len(head)) != head:
                raise RuntimeError(f"{base} does not start with the expected header")
            body = f.read()
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(head)
            for _ in range(reps):
                f.write(body)
        del body
        os.replace(tmp, path)
    return path, packets * reps


def load_packets(path: Path, limit: int | None = None) -> list[tuple[int, bytes, int]]:
    """(ts, data, origlen) of the file's packets, as bytes, for the write benchmarks."""
    out = []
    for p in sp.read(path):
        out.append((p.ts, bytes(p.data), p.origlen))
        if limit is not None and len(out) >= limit:
            break
    return out


# -- the measured functions -----------------------------------------------------------------


def stm_read(path: Path) -> int:
    """Per-packet read: one ``Packet`` per EPB, touching its data."""
    n = 0
    nbytes = 0
    for p in sp.read(path):
        nbytes += len(p.data)
        n += 1
    return n


def stm_read_bulk(path: Path) -> int:
    """Bulk read: runs of packet blocks as ``RawPackets``, no object per packet."""
    n = 0
    raw = sp.RawPackets
    for ev in sp.read_events(path, raw_packets=True):
        if type(ev) is raw:
            n += ev.count
    return n


def stm_write(out: Path, packets: list[tuple[int, bytes, int]]) -> int:
    """``Writer.write_packet`` for every packet."""
    with open(out, "wb") as f:
        w = _open_writer(f)
        write = w.write_packet
        for ts, data, origlen in packets:
            write(0, ts, data, origlen=origlen)
        w.flush()
    return len(packets)


def stm_copy(path: Path, out: Path) -> int:
    """What editcap does, per packet: read each packet and write it with ``Writer.write``."""
    n = 0
    ifmap: dict[int, int] = {}
    with open(out, "wb") as f:
        w = sp.Writer(f)
        for ev in sp.read_events(path):
            if type(ev) is sp.Packet:
                w.write(ev, ifmap[ev.interface.id])
                n += 1
            elif type(ev) is sp.Interface:
                ifmap[ev.id] = w.copy_interface(ev)
        w.flush()
    return n


def stm_copy_bulk(path: Path, out: Path) -> int:
    """The same copy in bulk mode: ``RawPackets`` handed to ``Writer.write_raw``."""
    n = 0
    with open(out, "wb") as f:
        w = sp.Writer(f)
        for ev in sp.read_events(path, raw_packets=True):
            if type(ev) is sp.RawPackets:
                w.write_raw(ev.data)
                n += ev.count
            elif type(ev) is sp.Interface:
                w.copy_interface(ev)
        w.flush()
    return n


def pp_read(path: Path, limit: int) -> int:
    """python-pcapng's ``FileScanner``, touching each EPB's data, up to ``limit`` packets."""
    from pcapng import FileScanner
    from pcapng.blocks import EnhancedPacket

    n = 0
    nbytes = 0
    with open(path, "rb") as f:
        for block in FileScanner(f):
            if isinstance(block, EnhancedPacket):
                nbytes += len(block.packet_data)
                n += 1
                if n >= limit:
                    break
    return n


def pp_write(out: Path, packets: list[tuple[int, bytes, int]]) -> int:
    """python-pcapng's ``FileWriter`` with one ``EnhancedPacket`` per packet."""
    from pcapng import FileWriter, blocks

    with open(out, "wb") as f:
        shb = blocks.SectionHeader(options={"shb_userappl": "stm bench"})
        shb.new_member(
            blocks.InterfaceDescription,
            link_type=LINKTYPE_ETHERNET,
            snaplen=SNAPLEN,
            options={"if_name": "bench0", "if_tsresol": b"\x09"},
        )
        w = FileWriter(f, shb)
        for ts, data, origlen in packets:
            epb = shb.new_member(blocks.EnhancedPacket)
            epb.interface_id = 0
            epb.timestamp_high = ts >> 32
            epb.timestamp_low = ts & 0xFFFFFFFF
            epb.packet_data = data
            epb.packet_len = origlen
            w.write_block(epb)
    return len(packets)


# -- driver ---------------------------------------------------------------------------------


class _Ctx:
    """Shared state of one run: sizes, rows, and the scratch output file."""

    def __init__(self, args: argparse.Namespace, path: Path) -> None:
        self.args = args
        self.path = path
        self.size = path.stat().st_size
        self.packets = args.packets
        self.rows: list[Row] = []
        self.out = DATA_DIR / "scratch-out.pcapng"

    def add(self, section: str, name: str, packets: int, t: Timing, *, note: str = "") -> Row:
        """Record a throughput row (packets/s from the best wall time)."""
        pps = packets / t.wall
        mb_s = self.size * packets / self.packets / t.wall / 1e6
        row = Row(NAME, section, name, pps, "pkt/s", packets, t.wall, t.cpu, mb_s, note=note)
        self.rows.append(row)
        log(f"  {section:6} {name:34} {pps:>12,.0f} pkt/s  {t.wall:7.3f} s  cpu {t.cpu:7.3f} s")
        return row

    def time(self, fn: Callable[[], int], expect: int) -> Timing:
        """Best of ``--repeat`` runs of ``fn``, which must return the packet count."""
        t = best_of(self.args.repeat, fn)
        if t.result != expect:
            raise RuntimeError(f"{fn} handled {t.result} packets, expected {expect}")
        self.clean()
        return t

    def clean(self) -> None:
        self.out.unlink(missing_ok=True)


def _warm(path: Path) -> None:
    """Read the file once so every contender finds it in the page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def _editcap(ctx: _Ctx) -> dict[str, Row]:
    """editcap (read + write, to pcapng and to pcap) and capinfos (read only).

    They are cheap, so they get at least 5 runs: the best of more runs favours the
    reference, which keeps our ratios on the safe side on a noisy machine.
    """
    refs: dict[str, Row] = {}
    n = ctx.packets
    repeat = max(ctx.args.repeat, SUBPROCESS_REPEAT)
    if shutil.which("editcap") is None:
        log("  editcap not found: skipped (apt-get install wireshark-common)")
        return refs
    for fmt in ("pcapng", "pcap"):
        t = run_timed(["editcap", "-F", fmt, str(ctx.path), str(ctx.out)], repeat)
        if fmt == "pcapng" and shutil.which("capinfos"):
            out = subprocess.run(
                ["capinfos", "-c", "-M", str(ctx.out)], capture_output=True, text=True
            ).stdout
            if str(n) not in out.split():
                log(f"  warning: editcap's output count not confirmed: {out.strip()}")
        ctx.clean()
        name = f"editcap -F {fmt} (read+write)"
        refs[f"editcap-{fmt}"] = ctx.add("ref", name, n, t, note=f"subprocess, best of {repeat}")
    if shutil.which("capinfos"):
        t = run_timed(["capinfos", "-c", str(ctx.path)], repeat)
        note = f"subprocess, best of {repeat}"
        refs["capinfos"] = ctx.add("ref", "capinfos -c (read only)", n, t, note=note)
    return refs


def _memory(path: Path, packets: int, label: str = "", section: str = "memory") -> list[Row]:
    """Peak RSS of child processes that each do one streaming read of ``path``."""
    rows = []
    size_mb = path.stat().st_size / 1e6
    for mode in ("baseline", "packets", "bulk") if not label else ("packets", "bulk"):
        proc = subprocess.run(
            [sys.executable, "-m", "bench._rss", mode, str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        res = json.loads(proc.stdout)
        mb = (res["vmhwm_kib"] or res["maxrss_kib"]) * 1024 / 1e6
        name = {
            "baseline": "python + import stm.pcapng",
            "packets": f"stm read() per-packet{label}",
            "bulk": f"stm read bulk{label}",
        }[mode]
        status = ""
        note = "no read: the interpreter's own"
        if mode != "baseline":
            if res["packets"] != packets:
                raise RuntimeError(f"{mode} read {res['packets']} packets, expected {packets}")
            status = "PASS" if mb < RSS_LIMIT_MB else "MISS"
            note = f"peak RSS, {size_mb:,.0f} MB file; aim < {RSS_LIMIT_MB:g} MB"
        rows.append(Row(NAME, section, name, mb, "MB", status=status, note=note))
        log(f"  memory {name:34} {mb:8.1f} MB")
    return rows


def _ratios(row: Row, refs: dict[str, Row | None]) -> None:
    for key, ref in refs.items():
        if ref is not None:
            row.vs[key] = row.value / ref.value
            assert row.cpu_seconds and ref.cpu_seconds and row.packets and ref.packets
            row.vs_cpu[key] = (row.packets / row.cpu_seconds) / (ref.packets / ref.cpu_seconds)


def _target(name: str, row: Row, ref: str, goal: float) -> Row:
    ratio = row.vs.get(ref)
    if ratio is None:
        return Row(NAME, "target", name, float("nan"), "x", status="n/a", note="not measured")
    status = "PASS" if ratio >= goal else "MISS"
    note = f"need >= {goal:g}x; by CPU time {row.vs_cpu[ref]:.2f}x"
    return Row(NAME, "target", name, ratio, "x", status=status, note=note)


def _profile(ctx: _Ctx, packets: list[tuple[int, bytes, int]]) -> None:
    """cProfile of stm's read and write paths (to stderr)."""
    cases: list[tuple[str, Callable[[], int]]] = [
        ("read() per-packet", lambda: stm_read(ctx.path)),
        ("Writer.write_packet", lambda: stm_write(ctx.out, packets)),
    ]
    for label, fn in cases:
        prof = cProfile.Profile()
        prof.runcall(fn)
        ctx.clean()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
        log(f"-- cProfile: stm {label} (sorted by tottime)\n{s.getvalue()}")


def run(args: argparse.Namespace) -> list[Row]:
    """Run the pcapng benchmark and return its rows."""
    path = dataset(args.packets, args.size)
    _warm(path)
    ctx = _Ctx(args, path)
    n = args.packets
    log(f"input: {path} ({ctx.size / 1e6:,.0f} MB, {n:,} packets)")

    # References first: editcap reads and writes, so it serves for both directions.
    ed = {} if args.no_refs else _editcap(ctx)
    editcap = ed.get("editcap-pcapng")
    packets = load_packets(path)
    pp_r = pp_w = None
    if not args.no_refs:
        k = min(n, args.ref_read)
        t = best_of(args.repeat, lambda: pp_read(path, k))
        note = "" if k == n else f"first {k:,} of {n:,} packets; rate extrapolated"
        pp_r = ctx.add("ref", "python-pcapng FileScanner (read)", k, t, note=note)
        k = min(n, args.ref_write)
        t = best_of(args.repeat, lambda: pp_write(ctx.out, packets[:k]))
        ctx.clean()
        note = "" if k == n else f"{k:,} of {n:,} packets; rate extrapolated"
        pp_w = ctx.add("ref", "python-pcapng FileWriter (write)", k, t, note=note)

    read_refs = {"editcap": editcap, "python-pcapng": pp_r}
    r_pkt = ctx.add("read", "stm read() per-packet", n, ctx.time(lambda: stm_read(path), n))
    _ratios(r_pkt, read_refs)
    t = ctx.time(lambda: stm_read_bulk(path), n)
    r_bulk = ctx.add("read", "stm Reader(raw_packets=True)", n, t)
    _ratios(r_bulk, read_refs)

    t = best_of(args.repeat, lambda: stm_write(ctx.out, packets))
    if ctx.out.read_bytes() != path.read_bytes():
        log("  warning: stm's write output is not byte-identical to the input file")
    ctx.clean()
    w = ctx.add("write", "stm Writer.write_packet", n, t, note="packets held in memory")
    _ratios(w, {"editcap": editcap, "python-pcapng": pp_w})

    t = ctx.time(lambda: stm_copy(path, ctx.out), n)
    _ratios(ctx.add("copy", "stm read() + Writer.write", n, t), {"editcap": editcap})
    t = ctx.time(lambda: stm_copy_bulk(path, ctx.out), n)
    _ratios(ctx.add("copy", "stm raw_packets + write_raw", n, t), {"editcap": editcap})

    if args.profile:
        _profile(ctx, packets)
    packets.clear()  # free the copies before the memory children run

    rows = ctx.rows
    rows += _memory(path, n)
    if args.big:
        big, big_n = big_dataset(path, n)
        gb = big.stat().st_size / 1e9
        t = best_of(1, lambda: stm_read(big))
        rows.append(
            Row(
                NAME,
                "big",
                "stm read() per-packet",
                big_n / t.wall,
                "pkt/s",
                big_n,
                t.wall,
                t.cpu,
                gb * 1e3 / t.wall,
                note=f"{gb:.2f} GB file, one run",
            )
        )
        rows += _memory(big, big_n, f" ({gb:.1f} GB)", "big")

    rows += [
        _target("read per-packet vs editcap", r_pkt, "editcap", READ_VS_EDITCAP),
        _target("read bulk vs editcap", r_bulk, "editcap", READ_VS_EDITCAP),
        _target("write vs editcap", w, "editcap", WRITE_VS_EDITCAP),
        _target("read per-packet vs python-pcapng", r_pkt, "python-pcapng", VS_PYTHON_PCAPNG),
        _target("read bulk vs python-pcapng", r_bulk, "python-pcapng", VS_PYTHON_PCAPNG),
        _target("write vs python-pcapng", w, "python-pcapng", VS_PYTHON_PCAPNG),
    ]
    return rows
