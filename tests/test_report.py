"""Format A reports end to end: Encoder -> datagrams -> Decoder -> PcapngSink -> pcapng.

Sans-IO throughout (no sockets): datagrams are plain bytes handed from encoder to decoder,
dropped, duplicated and reordered on purpose. The rebuilt captures are checked with our own
reader and with independent ones: python-pcapng, scapy's GRE layer and tshark.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import warnings
from collections import Counter
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loss_schedule import expected_counters, schedule

from stm import gre, pcapng
from stm.pcapng import Interface, InterfaceStatistics, Packet, Writer
from stm.pcapng import constants as c
from stm.report import (
    STM_PEN,
    Decoder,
    Duplicate,
    Encoder,
    FragmentsExpired,
    Gap,
    Malformed,
    Packets,
    Reordered,
    Restarted,
    Stream,
    stm_options,
)
from stm.sink import PcapngSink

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO / "samples").glob("*.pcap*"))
ARRIVAL = (2988, (STM_PEN, b"timestamp=arrival"))
NOW = 1_700_000_000.25  # wall clock handed to the sink for packets without a timestamp
EVENT_TYPES = (Packets, Gap, Duplicate, Reordered, Restarted, FragmentsExpired, Malformed)
MASK32 = 0xFFFFFFFF

TSHARK = shutil.which("tshark")
CAPINFOS = shutil.which("capinfos")
needs_tshark = pytest.mark.skipif(
    TSHARK is None, reason="tshark (Wireshark 4.x) not installed: independent check skipped"
)

ETH = Interface(c.LINKTYPE_ETHERNET, 0, ((c.IF_TSRESOL, 9),))


# -- helpers ----------------------------------------------------------------------------------


def encode(packets, *, step: float = 0.001, **kwargs) -> tuple[Encoder, list[bytes]]:
    """Run packets through an Encoder, polling as a sender loop would; all datagrams out."""
    kwargs.setdefault("session", 0x5EED)
    enc = Encoder(kwargs.pop("producer", "probe"), **kwargs)
    out: list[bytes] = []
    now = 0.0
    for pkt in packets:
        out += enc.add(pkt, now)
        flushed = enc.poll(now)
        assert len(flushed) <= 1 and (not flushed or enc.deadline() is None)
        out += flushed
        now += step
    out += enc.flush()
    assert enc.flush() == [] and enc.deadline() is None
    assert enc.stats.datagrams == len(out)
    assert enc.stats.bytes == sum(map(len, out))
    return enc, out


def decode(datagrams, decoder: Decoder | None = None, now: float = 0.0):
    decoder = decoder or Decoder()
    for d in datagrams:
        decoder.receive_datagram(d, "test", now)
    return decoder, decoder.events()


def delivered(events) -> list[Packet]:
    return [p for e in events if isinstance(e, Packets) for p in e.packets]


def sink_file(events, *, byte_order=None, now: float = NOW) -> bytes:
    out = io.BytesIO()
    sink = PcapngSink(out, byte_order=byte_order)
    lost: Counter = Counter()
    for e in events:
        if isinstance(e, Packets):
            sink.write(e.stream, e.packets, now=now)
        elif isinstance(e, Gap):
            lost[e.stream] += e.missing  # these tests reorder nothing: gaps are the net loss
            sink.loss(e.stream, lost[e.stream], now=now)
    sink.close()
    return out.getvalue()


def assert_relayed(src: list[Packet], got: list[Packet], where: str) -> None:
    """Every packet kept exactly; SPB packets gain an arrival time and stm's marker option."""
    assert len(got) == len(src), where
    for i, (a, b) in enumerate(zip(src, got, strict=True)):
        if a.ts is None:
            assert b.ts is not None, (where, i)
            assert b.options == (ARRIVAL,), (where, i)
            assert (bytes(b.data), b.caplen, b.origlen) == (bytes(a.data), a.caplen, a.origlen)
            assert b.linktype == a.linktype and b.flags is None and b.comments == ()
            assert abs(b.time - Fraction(NOW)) < 1, (where, i)
        else:
            assert b.key() == a.key(), (where, i)
            assert b.options == a.options, (where, i)


def round_trip(path, *, mtu: int = 1500, ip_header: int = 20, **kwargs):
    src = list(pcapng.read(path))
    enc, dgrams = encode(src, mtu=mtu, ip_header=ip_header, **kwargs)
    limit = mtu - ip_header - 8
    assert all(len(d) <= limit for d in dgrams), (path, max(map(len, dgrams)), limit)
    dec, events = decode(dgrams)
    assert {type(e) for e in events} <= {Packets}, [e for e in events if type(e) is not Packets]
    assert dec.pending_fragments() == 0
    got = list(pcapng.read(sink_file(events)))
    assert_relayed(src, got, f"{path} mtu={mtu} ip_header={ip_header}")
    return src, enc, dgrams


def small_packets(n: int, rng: random.Random, iface: Interface = ETH) -> list[Packet]:
    return [
        Packet(iface, 1_700_000_000 * 10**9 + i, rng.randbytes(rng.randrange(40, 700)), 700)
        for i in range(n)
    ]


def one_per_datagram(n: int, iface: Interface = ETH) -> list[Packet]:
    """Packets of 1000 bytes: at MTU 1500 each datagram carries exactly one."""
    return [Packet(iface, 10**18 + i, bytes([i % 256]) * 1000, 1000) for i in range(n)]


def tshark(*args: str) -> str:
    assert TSHARK is not None
    r = subprocess.run(
        [TSHARK, *args], capture_output=True, text=True, encoding="utf-8", timeout=120
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


# -- 1. corpus and sample round trips --------------------------------------------------------


def test_corpus_round_trip(corpus_dir):
    files = sorted(corpus_dir.rglob("*.pcap*"))
    assert files, f"no captures under {corpus_dir}"
    spb = 0
    for path in files:
        src, _, _ = round_trip(path)
        spb += sum(p.ts is None for p in src)
    assert spb > 0, "the corpus should hold Simple Packet Blocks (pcapng-test-generator)"


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_round_trip(path):
    src, _, _ = round_trip(path)
    assert src


@pytest.mark.parametrize(
    ("name", "biggest"),
    [("sip_jumbo_rawip4.pcap", 9000), ("5gc_roaming_lbo.pcapng", 9000), ("bigtcp_80k.pcap", 80000)],
)
@pytest.mark.parametrize(("mtu", "ip_header"), [(1500, 20), (1500, 40), (9000, 20), (9000, 40)])
def test_big_frames_fragment_and_reassemble(corpus_dir, name, biggest, mtu, ip_header):
    path = next(corpus_dir.rglob(name), None)
    if path is None:
        pytest.skip(f"{name} not in the corpus")
    src, enc, _ = round_trip(path, mtu=mtu, ip_header=ip_header)
    assert max(p.caplen for p in src) > biggest
    assert enc.stats.fragmented >= sum(p.caplen > mtu - ip_header - 8 for p in src) > 0


@pytest.mark.parametrize("size", [65_535, 65_536, 80_066, 200_000])
@pytest.mark.parametrize(("mtu", "ip_header"), [(1500, 40), (9000, 40), (65_535, 20)])
@pytest.mark.parametrize("checksum", [False, True])
def test_synthetic_huge_frame(size, mtu, ip_header, checksum):
    """The corpus has no 64 KiB frame: make some, around the 16-bit boundaries."""
    data = random.Random(size).randbytes(size)
    pkt = Packet(ETH, 123, data, size + 7, flags=3, comments=("big ✓",))
    enc, dgrams = encode([pkt], mtu=mtu, ip_header=ip_header, checksum=checksum)
    assert all(len(d) <= min(mtu - ip_header - 8, 65_507) for d in dgrams)
    assert enc.stats.fragmented == 1 and len(dgrams) > 1
    _, events = decode(dgrams)
    (got,) = delivered(events)
    assert got == pkt


# -- 2. generated files, checked with python-pcapng and tshark --------------------------------

LINKTYPES = [1, 101, 113, 228, 229]
RESOLUTIONS = [6, 9, 0x80 | 20, 0x80 | 30, 3]  # us, ns, 2^-20, 2^-30, ms
EPB_OPTIONS = [
    (c.EPB_DROPCOUNT, 7),
    (c.EPB_PACKETID, 2**64 - 1),
    (c.EPB_QUEUE, 3),
    (c.EPB_HASH, b"\x02abcd"),
    (c.OPT_CUSTOM_STR, (12345, b"k=v")),
    (c.OPT_CUSTOM_BIN, (12345, b"\x00\x01\xff")),
]
COMMENTS = ["a", "héllo ✓", "x" * 300, "", "multi\nline", "tab\there"]


def generated_file(seed: int, byte_order: str, *, sections: int = 2, spb: bool = True) -> bytes:
    rng = random.Random(seed)
    out = io.BytesIO()
    w = Writer(out, byte_order=byte_order, options=[(c.OPT_COMMENT, f"generated {seed}")])
    for section in range(sections):
        if section:
            w.new_section([(c.SHB_USERAPPL, "second section")])
        linktypes, resolutions = LINKTYPES[:], RESOLUTIONS[:]
        rng.shuffle(linktypes)
        rng.shuffle(resolutions)
        for lt, tsresol in zip(linktypes, resolutions, strict=True):
            w.add_interface(
                lt,
                rng.choice([0, 65535, 262144]),
                name=f"s{section}-lt{lt}",
                tsresol=tsresol,
                tsoffset=rng.choice([0, 0, 1_000_000_000, -1000]),
                options=[(c.OPT_COMMENT, f"interface {lt} ✓")],
            )
        if spb:
            w.write_packet(0, None, rng.randbytes(rng.choice([0, 5, 64, 2000])))
        for _ in range(rng.randrange(15, 30)):
            ifid = rng.randrange(len(w.interfaces))
            iface = w.interfaces[ifid]
            n = rng.choice([0, 1, 3, 60, 200, 1400, 3000])
            data = rng.randbytes(n)
            if spb and ifid == 0 and rng.random() < 0.3:
                w.write_packet(0, None, data)
                continue
            units = iface.units
            ts = rng.choice(
                [0, 2**64 - 1, rng.randrange(2**64), 1_700_000_000 * units + rng.randrange(units)]
            )
            if iface.tsoffset < 0:  # keep times positive: negative epochs print oddly
                ts = max(ts, -iface.tsoffset * units)
            w.write_packet(
                ifid,
                min(ts, 2**64 - 1),
                data,
                origlen=n + rng.choice([0, 0, 5, 100_000]),
                flags=rng.choice([None, 0, 1, 2, 0x01000005, 0xFFFFFFFF]),
                comments=rng.sample(COMMENTS, rng.randrange(3)),
                options=rng.sample(EPB_OPTIONS, rng.randrange(4)),
            )
    w.flush()
    return out.getvalue()


def relay_generated(seed, writer_bo, encoder_bo, sink_bo, mtu=1500):
    raw = generated_file(seed, writer_bo)
    src = list(pcapng.read(raw))
    linktypes = {p.linktype for p in src}
    assert len(linktypes) >= 3
    _, dgrams = encode(src, byte_order=encoder_bo, mtu=mtu)
    assert all(len(d) <= mtu - 28 for d in dgrams)
    _, events = decode(dgrams)
    out = sink_file(events, byte_order=sink_bo)
    got = list(pcapng.read(out))
    assert_relayed(src, got, f"seed {seed}")
    return src, got, out


def check_with_python_pcapng(out: bytes, got: list[Packet]) -> None:
    pypcapng = pytest.importorskip("pcapng", reason="python-pcapng not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # python-pcapng's own
        blocks = [
            b
            for b in pypcapng.FileScanner(io.BytesIO(out))
            if isinstance(b, pypcapng.blocks.EnhancedPacket)
        ]
    assert len(blocks) == len(got)
    for b, p in zip(blocks, got, strict=True):
        assert b.packet_data == bytes(p.data)
        assert (b.captured_len, b.packet_len) == (p.caplen, p.origlen)
        assert b.interface.link_type == p.linktype
        comments = b.options.get_all("opt_comment") if "opt_comment" in b.options else []
        assert tuple(comments) == p.comments
        assert ((b.timestamp_high << 32) | b.timestamp_low) == p.ts


def _tshark_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _epoch(p: Packet) -> Fraction:
    return Fraction(p.time_ns, 10**9)  # tshark floors to nanoseconds


def check_with_tshark(out: bytes, got: list[Packet], tmp_path: Path) -> None:
    path = tmp_path / "out.pcapng"
    path.write_bytes(out)
    fields = ["frame.time_epoch", "frame.len", "frame.cap_len", "frame.comment"]
    lines = tshark("-r", str(path), "-T", "fields", *(x for f in fields for x in ("-e", f)))
    rows = [line.split("\t") for line in lines.splitlines()]
    assert len(rows) == len(got)
    for i, (row, p) in enumerate(zip(rows, got, strict=True)):
        epoch, length, caplen, comment = row
        assert Fraction(Decimal(epoch)) == _epoch(p), (i, epoch, p.time)
        assert (int(length), int(caplen)) == (p.origlen, p.caplen), i
        assert comment == ",".join(_tshark_escape(x) for x in p.comments), i


@pytest.mark.parametrize(
    ("seed", "writer_bo", "encoder_bo", "sink_bo"),
    [(0, "<", "<", "<"), (1, ">", "<", ">"), (2, "<", ">", ">"), (3, ">", ">", "<")],
)
def test_generated_files_independent_readers(seed, writer_bo, encoder_bo, sink_bo, tmp_path):
    src, got, out = relay_generated(seed, writer_bo, encoder_bo, sink_bo)
    assert any(p.ts == 2**64 - 1 for p in src)
    assert any(p.ts is None for p in src)
    assert {p.interface.tsresol for p in src} >= {6, 9, 0x80 | 20}
    check_with_python_pcapng(out, got)
    if TSHARK is not None:
        check_with_tshark(out, got, tmp_path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    bos=st.tuples(*[st.sampled_from("<>")] * 3),
    mtu=st.sampled_from([576, 1500, 9000]),
)
def test_generated_files_property(seed, bos, mtu):
    _, got, out = relay_generated(seed, *bos, mtu=mtu)
    check_with_python_pcapng(out, got)


# -- 3. oversize policies and fragment reassembly --------------------------------------------


def big_packet(i: int, size: int, iface: Interface = ETH, **kw) -> Packet:
    return Packet(iface, 10**18 + i, random.Random(i).randbytes(size), size + 10, **kw)


def test_oversize_truncate_keeps_origlen_and_fits():
    pkts = [
        big_packet(1, 12_000, comments=("short",), flags=1),
        big_packet(2, 70_000, comments=("c" * 6000,)),
        big_packet(3, 100),
        Packet(ETH, None, b"s" * 12_000, 12_000),  # an SPB cannot say it was cut: fragmented
    ]
    for mtu, ip_header in ((1500, 20), (1280, 40), (9000, 40)):
        enc, dgrams = encode(pkts, oversize="truncate", mtu=mtu, ip_header=ip_header)
        assert all(len(d) <= mtu - ip_header - 8 for d in dgrams)
        assert (enc.stats.truncated, enc.stats.fragmented) == (2, 1)
        _, events = decode(dgrams)
        got = delivered(events)
        assert len(got) == 4
        by_ts = {p.ts: p for p in got}
        for p in pkts[:3]:
            q = by_ts[p.ts]
            assert q.origlen == p.origlen
            assert q.caplen <= p.caplen and bytes(q.data) == bytes(p.data)[: q.caplen]
        assert by_ts[pkts[0].ts].caplen < 12_000
        assert by_ts[pkts[0].ts].comments == ("short",) and by_ts[pkts[0].ts].flags == 1
        assert by_ts[pkts[1].ts].comments == ()  # too long to keep: the bytes matter more
        assert by_ts[pkts[2].ts] == pkts[2]
        (spb,) = (p for p in got if p.ts is None)
        assert bytes(spb.data) == b"s" * 12_000


def test_oversize_drop_counts():
    rng = random.Random(5)
    pkts = small_packets(30, rng)
    for i in (3, 7, 8, 20):
        pkts[i] = big_packet(i, 2000 + i * 100)
    enc, dgrams = encode(pkts, oversize="drop")
    assert enc.stats.dropped == 4 and enc.stats.packets == 30
    _, events = decode(dgrams)
    got = delivered(events)
    assert [bytes(p.data) for p in got] == [
        bytes(p.data) for i, p in enumerate(pkts) if i not in (3, 7, 8, 20)
    ]


def fragment_stream(producer: str, key: int, sizes, session: int, mtu: int = 1500):
    pkts = [big_packet(key * 100 + i, s) for i, s in enumerate(sizes)]
    _, dgrams = encode(pkts, producer=producer, stream_id=key, session=session, mtu=mtu)
    return pkts, dgrams


@pytest.mark.parametrize("seed", range(6))
def test_fragments_reassemble_shuffled_and_interleaved(seed):
    rng = random.Random(seed)
    streams = {}
    for k in range(3):
        sizes = [rng.choice([3000, 9000, 20_000, 80_066, 120]) for _ in range(4)]
        streams[k] = fragment_stream(f"producer-{k}", 1000 + k, sizes, session=k + 1)
    arrivals = []
    for k, (_, dgrams) in streams.items():
        order = list(reversed(dgrams)) if k == 0 else rng.sample(dgrams, len(dgrams))
        arrivals.append(order)
    merged = []
    while any(arrivals):  # interleave the three streams at random
        q = rng.choice([a for a in arrivals if a])
        merged.append(q.pop(0))
    dec, events = decode(merged)
    assert dec.pending_fragments() == 0
    assert not [e for e in events if isinstance(e, (Malformed, FragmentsExpired, Duplicate))]
    for k, (pkts, dgrams) in streams.items():
        stream = Stream(f"producer-{k}", 1000 + k)
        got = [p for e in events if type(e) is Packets and e.stream == stream for p in e.packets]
        assert sorted((p.ts, bytes(p.data), p.origlen) for p in got) == sorted(
            (p.ts, bytes(p.data), p.origlen) for p in pkts
        )
        stats = dec.stats(stream)
        # (lost is not checked: see test_first_datagrams_reordered_do_not_make_loss_negative)
        assert (stats.duplicates, stats.datagrams, stats.packets) == (0, len(dgrams), len(pkts))


def test_missing_fragment_expires():
    _, dgrams = fragment_stream("lossy", 7, [20_000], session=1)
    assert len(dgrams) > 3
    dec = Decoder(fragment_timeout=2.0)
    stream = Stream("lossy", 7)
    for d in dgrams[:2] + dgrams[3:]:
        dec.receive_datagram(d, None, 10.0)
    events = dec.events()
    assert [type(e) for e in events] == [Gap]  # the lost middle piece
    assert dec.pending_fragments() == 1
    dec.expire(11.9)
    assert dec.events() == [] and dec.pending_fragments() == 1
    dec.expire(12.0)
    assert dec.events() == [FragmentsExpired(stream, 1)]
    assert dec.pending_fragments() == 0
    assert dec.stats(stream).fragments_expired == 1
    dec.receive_datagram(dgrams[2], None, 13.0)  # too late: nothing to complete
    assert not delivered(dec.events())


def test_pending_packet_bound_evicts_and_counts():
    pkts, dgrams = fragment_stream("bound", 9, [9000] * 4, session=1)
    per = len(dgrams) // 4
    heads = [dgrams[i * per] for i in range(4)]
    rest = [dgrams[i * per + 1 : (i + 1) * per] for i in range(4)]
    dec = Decoder(max_pending_packets=2)
    stream = Stream("bound", 9)
    for h in heads:
        dec.receive_datagram(h)
        assert dec.pending_fragments() <= 2
    events = dec.events()
    expired = [e for e in events if isinstance(e, FragmentsExpired)]
    assert expired == [FragmentsExpired(stream, 1)] * 2
    assert dec.stats(stream).fragments_expired == 2
    for d in rest[2] + rest[3]:  # the two packets still pending complete
        dec.receive_datagram(d)
    got = delivered(dec.events())
    assert [bytes(p.data) for p in got] == [bytes(p.data) for p in pkts[2:]]
    assert dec.pending_fragments() == 0


def test_pending_byte_bound_evicts_and_counts():
    pkts, dgrams = fragment_stream("bytes", 10, [20_000] * 3, session=1)
    per = len(dgrams) // 3
    dec = Decoder(max_pending_bytes=45_000)
    stream = Stream("bytes", 10)
    for i in range(3):
        dec.receive_datagram(dgrams[i * per])
    assert dec.pending_fragments() == 2
    assert [e for e in dec.events() if isinstance(e, FragmentsExpired)] == [
        FragmentsExpired(stream, 1)
    ]
    assert dec.stats(stream).fragments_expired == 1
    for d in dgrams[per + 1 : 2 * per] + dgrams[2 * per + 1 :]:
        dec.receive_datagram(d)
    got = delivered(dec.events())
    assert [bytes(p.data) for p in got] == [bytes(p.data) for p in pkts[1:]]
    assert dec.pending_fragments() == 0


# -- 4. loss, duplicates, reordering, wrap-around, restart, ISBs -----------------------------


def build_stream(seed: int, sequence: int = 0, n_packets: int = 600):
    rng = random.Random(seed)
    _, dgrams = encode(small_packets(n_packets, rng), sequence=sequence, producer="sched")
    per_dgram = [
        sorted(bytes(p.data) for p in delivered(decode([d])[1])) for d in dgrams
    ]  # what each datagram carries, decoded alone
    return dgrams, per_dgram


@pytest.mark.parametrize("sequence", [0, 2**32 - 3, 2**32 - 150])
@pytest.mark.parametrize("seed", range(4))
def test_loss_duplicates_reordering(seed, sequence, tmp_path):
    dgrams, per_dgram = build_stream(seed, sequence)
    n = len(dgrams)
    assert n > 100
    order, dropped = schedule(n, random.Random(seed * 7919 + 1))
    dup, reord, gaps = expected_counters(order)
    assert dup and reord and dropped  # the schedule does all three
    dec, events = decode(dgrams[i] for i in order)
    (stream,) = dec.streams
    stats = dec.stats(stream)
    assert stats.lost == len(dropped) == gaps - reord
    assert (stats.duplicates, stats.reordered, stats.restarts) == (dup, reord, 0)
    assert sum(e.missing for e in events if isinstance(e, Gap)) == gaps
    assert sum(isinstance(e, Duplicate) for e in events) == dup
    assert sum(isinstance(e, Reordered) for e in events) == reord
    assert not [e for e in events if isinstance(e, (Malformed, Restarted))]
    packets_events = [e for e in events if isinstance(e, Packets)]
    assert [e.sequence for e in packets_events] == [
        (sequence + i) & MASK32 for i in dict.fromkeys(order)
    ]
    # Nothing delivered twice, nothing from a dropped datagram, everything else exactly once.
    want = Counter(x for i in range(n) if i not in dropped for x in per_dgram[i])
    assert Counter(bytes(p.data) for p in delivered(events)) == want
    assert stats.datagrams == n - len(dropped)
    if sequence > 2**31:
        assert any(e.sequence < 100 for e in packets_events)  # did wrap
    # The merged capture notes every gap as an ISB with a running isb_ifdrop.
    out = sink_file(events)
    read = list(pcapng.read_events(out))
    isbs = [e for e in read if isinstance(e, InterfaceStatistics)]
    running = 0
    want_drops = []
    for e in events:
        if isinstance(e, Gap):
            running += e.missing
            want_drops.append(running)
    assert [dict(e.options)[c.ISB_IFDROP] for e in isbs] == want_drops
    assert sum(isinstance(e, Packet) for e in read) == sum(want.values())
    if TSHARK is not None:
        check_isb_file_with_tshark(out, sum(want.values()), tmp_path)


def check_isb_file_with_tshark(out: bytes, frames: int, tmp_path: Path) -> None:
    path = tmp_path / "loss.pcapng"
    path.write_bytes(out)
    numbers = tshark("-r", str(path), "-T", "fields", "-e", "frame.number").split()
    assert len(numbers) == frames
    if CAPINFOS is not None:
        r = subprocess.run([CAPINFOS, "-c", str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert str(frames) in r.stdout


def test_sequence_wraps_without_false_loss():
    rng = random.Random(11)
    _, dgrams = encode(small_packets(40, rng), sequence=2**32 - 3)
    seqs = [gre.decode(d)[0].sequence for d in dgrams]
    assert seqs[:4] == [2**32 - 3, 2**32 - 2, 2**32 - 1, 0]
    dec, events = decode(dgrams[:2] + dgrams[3:5] + dgrams[6:])  # lose 2**32-1 and 2
    (stream,) = dec.streams
    assert [e.missing for e in events if isinstance(e, Gap)] == [1, 1]
    assert [e.sequence for e in events if isinstance(e, Gap)] == [0, 3]
    assert dec.stats(stream).lost == 2


def test_sender_restart():
    rng = random.Random(3)
    _, first = encode(small_packets(30, rng), producer="p", session=1)
    _, second = encode(small_packets(30, rng), producer="p", session=2)
    dec = Decoder()
    _, events = decode(first[:2] + first[3:], dec)
    stream = Stream("p", gre.decode(first[0])[0].key)
    before = dec.stats(stream).as_dict()
    assert before["lost"] == 1 and before["restarts"] == 0
    _, events = decode(second, dec)
    assert isinstance(events[0], Restarted) and events[0].stream == stream
    assert not [e for e in events if isinstance(e, (Gap, Reordered, Duplicate))]
    after = dec.stats(stream).as_dict()
    assert after["restarts"] == 1
    assert after["lost"] == 1  # counters continue across the restart
    assert after["datagrams"] == before["datagrams"] + len(second)
    assert after["packets"] == before["packets"] + len(delivered(events))


def test_sequence_far_behind_same_session_is_a_restart():
    rng = random.Random(4)
    _, dgrams = encode(small_packets(200, rng), producer="far")
    dec = Decoder(window=8)
    _, events = decode(dgrams[20:30] + dgrams[2:3], dec)
    assert isinstance(events[-2], Restarted) and isinstance(events[-1], Packets)
    assert dec.stats(next(iter(dec.streams))).restarts == 1


@needs_tshark
def test_loss_isbs_readable_by_tshark_for_every_interface(tmp_path):
    """Two source interfaces (ns and us): an ISB for each on every gap."""
    us = Interface(c.LINKTYPE_LINUX_SLL, 0, ())
    pkts = [
        Packet(ETH if i % 2 else us, 1_700_000_000 * (10**9 if i % 2 else 10**6), b"p" * 900, 900)
        for i in range(20)
    ]
    _, dgrams = encode(pkts)
    _, events = decode(dgrams[:3] + dgrams[5:])
    assert sum(e.missing for e in events if isinstance(e, Gap)) == 2
    out = sink_file(events)
    isbs = [e for e in pcapng.read_events(out) if isinstance(e, InterfaceStatistics)]
    assert len(isbs) == 2 and {e.interface.id for e in isbs} == {0, 1}
    assert all(dict(e.options)[c.ISB_IFDROP] == 2 for e in isbs)
    check_isb_file_with_tshark(out, len(delivered(events)), tmp_path)


# -- 5. the stream bound ----------------------------------------------------------------------


def test_streams_are_bounded():
    rng = random.Random(8)
    pkt = small_packets(1, rng)
    dec = Decoder(max_streams=16)
    for key in range(100):
        _, dgrams = encode(pkt, producer="many", stream_id=key, session=key)
        dec.receive_datagram(dgrams[0])
        assert len(dec.streams) <= 16
    assert dec.evicted_streams == 84
    assert {s.key for s in dec.streams} == set(range(84, 100))
    assert len(delivered(dec.events())) == 100


def test_forged_key_flood_is_bounded():
    _, (dgram, *_) = encode(small_packets(1, random.Random(9)), producer="flood")
    dec = Decoder(max_streams=32)
    for key in range(5000):
        forged = dgram[:4] + key.to_bytes(4, "big") + dgram[8:]
        dec.receive_datagram(forged)
    assert len(dec.streams) == 32
    assert dec.evicted_streams == 5000 - 32
    dec.events()


# -- 6. independent dissection: scapy and tshark ---------------------------------------------


@pytest.mark.parametrize("checksum", [False, True])
def test_scapy_and_tshark_dissect_our_gre(checksum, tmp_path):
    gre_layer = pytest.importorskip("scapy.layers.l2", reason="scapy not installed").GRE
    from scapy.layers.inet import IP, UDP
    from scapy.packet import Raw
    from scapy.utils import wrpcap

    rng = random.Random(12)
    enc, dgrams = encode(small_packets(20, rng), sequence=2**32 - 2, checksum=checksum)
    sport = gre.entropy_source_port(enc.stream_id)
    seqs = [(2**32 - 2 + i) & MASK32 for i in range(len(dgrams))]
    for d, seq in zip(dgrams, seqs, strict=True):
        g = gre_layer(d)
        assert (g.key_present, g.seqnum_present, g.chksum_present) == (1, 1, int(checksum))
        assert (g.key, g.sequence_number, g.proto) == (enc.stream_id, seq, 0x88B5)
        assert bytes(g.payload) == d[16 if checksum else 12 :]
        if checksum:  # scapy recomputes the checksum and gets ours
            again = g.copy()
            again.chksum = None
            assert bytes(again) == d
    frames = [
        IP(src="192.0.2.1", dst="198.51.100.2") / UDP(sport=sport, dport=4754) / Raw(d)
        for d in dgrams
    ]
    path = tmp_path / "gre.pcap"
    wrpcap(str(path), frames)
    if TSHARK is None:
        pytest.skip("tshark not installed: scapy part done, tshark part skipped")
    fields = ["gre.key", "gre.sequence_number", "gre.proto", "gre.checksum.status"]
    out = tshark(
        "-r", str(path), "-d", "udp.port==4754,gre", "-T", "fields",
        *(x for f in fields for x in ("-e", f)),
    )  # fmt: skip
    rows = [line.split("\t") for line in out.splitlines()]
    assert len(rows) == len(dgrams)
    for row, seq in zip(rows, seqs, strict=True):
        key, sequence, proto, status = row
        assert int(key, 16) == enc.stream_id
        assert int(sequence) == seq
        assert proto.lower() == "0x88b5"
        assert status == ("1" if checksum else "")  # 1: checksum good


# -- 7. fuzzing the decoder -------------------------------------------------------------------


def _pool() -> list[bytes]:
    rng = random.Random(13)
    sll = Interface(c.LINKTYPE_LINUX_SLL, 262144, ((c.IF_NAME, "any"),))
    pkts = [
        *small_packets(6, rng),
        Packet(sll, 5, b"x" * 50, 60, flags=1, comments=("c",), options=EPB_OPTIONS[:3]),
        Packet(ETH, None, b"spb" * 10, 30),
        big_packet(1, 4000),
    ]
    pool = []
    for bo in "<>":
        for checksum in (False, True):
            _, dgrams = encode(pkts, byte_order=bo, checksum=checksum, mtu=1500)
            pool += dgrams
    return pool


POOL = _pool()
FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))


def check_decoder_survives(*datagrams: bytes) -> None:
    dec = Decoder()
    malformed = 0
    for d in datagrams:
        dec.receive_datagram(d, "fuzz", 1.0)
        for e in dec.events():
            assert isinstance(e, EVENT_TYPES), e
            if isinstance(e, Malformed):
                malformed += 1
                assert isinstance(e.reason, str) and e.source == "fuzz"
            elif isinstance(e, Packets):
                for p in e.packets:
                    assert isinstance(p.interface, Interface)
                    p.key()  # every field readable
                    assert p.caplen >= 0
    dec.expire(100.0)
    assert all(isinstance(e, EVENT_TYPES) for e in dec.events())
    assert dec.malformed == malformed


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes(data):
    check_decoder_survives(data)
    check_decoder_survives(POOL[0], data)  # with the caches warm: the fast path


@FUZZ
@given(st.data())
def test_fuzz_mutated_datagrams(data):
    original = data.draw(st.sampled_from(POOL))
    mutated = bytearray(original)
    how = data.draw(st.sampled_from(["flip", "truncate", "version", "checksum", "splice"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            pos = data.draw(st.integers(0, len(mutated) - 1))
            mutated[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "truncate":
        mutated = mutated[: data.draw(st.integers(0, len(mutated) - 1))]
    elif how == "version":
        mutated[1] = (mutated[1] & 0xF8) | data.draw(st.integers(1, 7))
    elif how == "checksum":
        mutated[4] ^= data.draw(st.integers(1, 255))  # the checksum word, or the key
    else:
        pos = data.draw(st.integers(0, len(mutated)))
        mutated[pos:pos] = data.draw(st.binary(min_size=1, max_size=64))
    check_decoder_survives(original, bytes(mutated), original)


def test_bad_checksum_and_version_are_malformed():
    pkts = small_packets(2, random.Random(1))
    _, (dgram, *_) = encode(pkts, checksum=True)
    dec = Decoder()
    bad = bytearray(dgram)
    bad[dgram.index(bytes(pkts[0].data[:16]))] ^= 0x40  # a byte of packet data
    dec.receive_datagram(bytes(bad), "x")
    version = bytearray(dgram)
    version[1] |= 1
    dec.receive_datagram(bytes(version), "y")
    other = Decoder(protocol_type=0x6558)
    other.receive_datagram(dgram, "z")
    events = dec.events() + other.events()
    assert [type(e) for e in events] == [Malformed] * 3
    assert "checksum" in events[0].reason and "version" in events[1].reason
    assert [e.source for e in events] == ["x", "y", "z"]
    lax = Decoder(verify_checksum=False)
    lax.receive_datagram(bytes(bad))
    assert [type(e) for e in lax.events()] == [Packets]


def test_linger_poll_and_deadline():
    enc = Encoder("linger", linger=0.5, session=1)
    assert enc.deadline() is None and enc.poll(100.0) == []
    assert enc.add(small_packets(1, random.Random(2))[0], 10.0) == []
    assert enc.deadline() == 10.5
    assert enc.poll(10.49) == []
    (dgram,) = enc.poll(10.5)
    assert enc.deadline() is None
    _, events = decode([dgram])
    (ev,) = events
    assert stm_options(ev.packets[0].interface.options) == {"if": "0"}


# -- regressions: bugs found while writing these tests ---------------------------------------


def test_poll_at_deadline_flushes():
    enc = Encoder("float", linger=0.005, session=1)
    enc.add(one_per_datagram(1)[0], 0.006)
    assert len(enc.poll(enc.deadline())) == 1


def test_duplicate_after_reordering_is_not_delivered_twice():
    _, dgrams = encode(one_per_datagram(10), producer="dup")
    dec, events = decode([dgrams[i] for i in (1, 5, 2, 3, 4, 6, 5)], Decoder(window=4))
    (stream,) = dec.streams
    stats = dec.stats(stream)
    assert sum(isinstance(e, Packets) for e in events) == 6  # datagram 5 only once
    assert (stats.duplicates, stats.reordered, stats.lost) == (1, 3, 0)


def test_first_datagrams_reordered_do_not_make_loss_negative():
    _, dgrams = encode(one_per_datagram(10), producer="first")
    dec, events = decode([dgrams[1], dgrams[0], *dgrams[2:]])
    (stream,) = dec.streams
    assert len(delivered(events)) == 10
    assert dec.stats(stream).lost == 0


def test_sink_keeps_interleaved_producers_apart():
    _, alice = encode(one_per_datagram(3), producer="alice")
    _, bob = encode(one_per_datagram(3), producer="bob")
    assert len(alice) == len(bob) == 3
    _, events = decode([d for pair in zip(alice, bob, strict=True) for d in pair])
    by_stream = Counter(e.stream.producer for e in events if isinstance(e, Packets))
    assert by_stream == {"alice": 3, "bob": 3}
    got = list(pcapng.read(sink_file(events)))
    names = Counter(p.interface.name.split("/")[0] for p in got)
    assert names == {"alice": 3, "bob": 3}


def test_sink_loss_on_picosecond_interface():
    ps = Interface(c.LINKTYPE_ETHERNET, 0, ((c.IF_TSRESOL, 12),))
    _, dgrams = encode(one_per_datagram(6, ps))
    _, events = decode(dgrams[:1] + dgrams[2:])
    assert any(isinstance(e, Gap) for e in events)
    read = list(pcapng.read_events(sink_file(events)))
    assert any(isinstance(e, InterfaceStatistics) for e in read)


def test_sink_survives_any_decoded_interface():
    odd = Interface(c.LINKTYPE_ETHERNET, 0, ((c.IF_TSRESOL, 0x7F),))
    _, dgrams = encode([Packet(odd, 1, b"odd!", 4)])
    _, events = decode(dgrams)
    assert [type(e) for e in events] == [Packets]
    out = io.BytesIO()
    sink = PcapngSink(out)
    sink.write(events[0].stream, events[0].packets, now=NOW)
    assert sink.rejected + sink.packets == 1
