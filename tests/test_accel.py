"""The compiled accelerator (``stm._accel``) against the pure-Python paths it stands in for.

Every accelerated object is built twice, once with ``stm.accel.ext`` set to None (pure
Python), and fed the same input: valid reports (from the encoders, then dropped, duplicated,
reordered, restarted, fragmented), mutated reports and garbage. Messages, events, counters
and written files must be identical, and garbage must only ever be counted as Malformed.
The compiled functions are also called directly with arbitrary bytes: they must return,
never crash the process.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import struct
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stm.accel
from stm import frames, pcapng, tlv
from stm.errors import MalformedPcapng, MalformedReport
from stm.pcapng import Interface, Packet, RawPackets, Section, Writer
from stm.pcapng import constants as c
from stm.report import (
    AutoDecoder,
    Decoder,
    Encoder,
    Malformed,
    PacketBlocks,
    Packets,
    TlvDecoder,
    TlvEncoder,
)
from stm.sink import PcapngSink

EXT = stm.accel.ext
needs_ext = pytest.mark.skipif(EXT is None, reason="stm._accel is not built (or STM_NO_ACCEL)")
SAMPLES = sorted((Path(__file__).parents[1] / "samples").glob("*.pcap*"))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def pure():
    """Objects created inside use the pure-Python paths."""
    saved = stm.accel.ext
    stm.accel.ext = None
    try:
        yield
    finally:
        stm.accel.ext = saved


def both(factory):
    """(pure-Python object, accelerated object)."""
    with pure():
        slow = factory()
    return slow, factory()


# -- the build --------------------------------------------------------------------------------


def test_built_when_cargo_is_there():
    """pip install builds the extension wherever cargo is; only STM_NO_ACCEL turns it off."""
    if os.environ.get("STM_NO_ACCEL", "") not in ("", "0"):
        assert EXT is None
    elif shutil.which("cargo") is not None:
        assert EXT is not None, "cargo is installed but stm._accel was not built (pip install -e .)"


def test_no_accel_switch():
    code = "import stm.accel, stm.report.hep as h; print(stm.accel.ext, h.TlvDecoder()._accel)"
    env = {**os.environ, "STM_NO_ACCEL": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"]


# -- frames: every link type and header shape --------------------------------------------------

LINKTYPES = (0, 1, 12, 14, 101, 108, 113, 228, 229, 276, 147)


@st.composite
def ip_packets(draw) -> bytes:
    """An IPv4 or IPv6 packet, mostly well formed, sometimes odd (options, fragments,
    extension headers, lengths that disagree, any protocol)."""
    proto = draw(st.sampled_from((17, 6, 132, 17, 6, 1, 50)))
    payload = draw(
        st.one_of(
            st.binary(max_size=300),
            st.sampled_from((b"INVITE sip:a SIP/2.0\r\n", b"SIP/2.0 200 OK\r\n", b"\x01\x00")),
        )
    )
    sport = draw(st.sampled_from((5060, 5061, 3868, 1234, 0)))
    dport = draw(st.sampled_from((5060, 3868, 40000, 9)))
    if proto == 6:
        doff = draw(st.sampled_from((5, 5, 8, 4, 15)))
        transport = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, doff << 4, 0x18, 0, 0, 0)
        transport += bytes(max(0, doff * 4 - 20))
    elif proto == 132:
        transport = struct.pack("!HHII", sport, dport, 0, 0)
    elif proto == 17:
        transport = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    else:
        transport = b""
    body = transport + payload
    if draw(st.booleans()):
        ihl = draw(st.sampled_from((5, 5, 6, 4, 15)))
        frag = draw(st.sampled_from((0x4000, 0, 0x2000, 0x0010)))
        total = draw(st.sampled_from((20 + len(body), 0, 7, 20 + len(body) + 9)))
        head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total & 0xFFFF, 0, frag, 64, proto, 0,
                           b"\x0a\0\0\1", b"\x0a\0\0\2")  # fmt: skip
        return head + bytes(max(0, ihl * 4 - 20)) + body
    ext = b""
    nxt = proto
    for kind in draw(st.lists(st.sampled_from((0, 43, 60, 44)), max_size=3)):
        if kind == 44:
            off = draw(st.sampled_from((0, 0, 8, 1)))
            ext = struct.pack("!BBHI", nxt, 0, off, 0) + ext
        else:
            ext = struct.pack("!BB6x", nxt, 0) + ext
        nxt = kind
    plen = draw(st.sampled_from((len(ext) + len(body), 0, 3)))
    head = struct.pack("!IHBB", 6 << 28, plen, nxt, 64) + bytes(range(16)) + bytes(range(16, 32))
    return head + ext + body


@st.composite
def frames_of(draw, ip=None) -> tuple[int, bytes]:
    """(link type, frame): link headers around an IP packet, a trailer, a cut, or noise."""
    linktype = draw(st.sampled_from(LINKTYPES))
    packet = draw(ip_packets()) if ip is None else ip
    v6 = packet[:1] and packet[0] >> 4 == 6
    etype = struct.pack("!H", 0x86DD if v6 else 0x0800)
    if linktype == 1:
        vlans = b"".join(b"\x81\x00\x00\x01" for _ in range(draw(st.integers(0, 2))))
        head = bytes(12) + vlans + etype
    elif linktype == 113:
        head = bytes(14) + etype
    elif linktype == 276:
        head = etype + bytes(18)
    elif linktype in (0, 108):
        af = 10 if v6 else 2
        head = struct.pack("<I" if linktype == 0 else "!I", af)
    elif linktype in (12, 14, 101, 228, 229):
        head = b""
    else:
        head = bytes(4)
    frame = head + packet + draw(st.binary(max_size=8))
    choice = draw(st.integers(0, 9))
    if choice == 0:
        frame = frame[: draw(st.integers(0, len(frame)))]
    elif choice == 1:
        frame = draw(st.binary(max_size=80))
    return linktype, frame


@needs_ext
@FUZZ
@given(frames_of())
def test_split_is_frames_split(case):
    linktype, frame = case
    want = frames.split(linktype, frame)
    got = EXT.frame_split(linktype, frame)
    if want is None:
        assert got is None
    else:
        assert got == (want.family, want.proto, want.src, want.dst, want.sport, want.dport,
                       want.offset, want.end)  # fmt: skip


# -- format B encoding ---------------------------------------------------------------------------

TSRESOLS = (6, 9, 0, 3, 19, 0x80 | 20, 0x80 | 63, 20, 0x80 | 64, 0x7F)
TSOFFSETS = (0, 1000, -5, 1 << 62, -(1 << 63), 1 << 63)


def interface(linktype: int, tsresol: int, tsoffset: int, snaplen: int = 0) -> Interface:
    options = ((c.IF_NAME, "eth0"), (c.IF_TSRESOL, tsresol), (c.IF_TSOFFSET, tsoffset))
    return Interface(linktype, snaplen, options)


@st.composite
def packets(draw, plain: bool = False) -> Packet:
    linktype, frame = draw(frames_of())
    iface = interface(linktype, draw(st.sampled_from(TSRESOLS)), draw(st.sampled_from(TSOFFSETS)))
    ts = draw(st.one_of(st.integers(0, (1 << 64) - 1), st.sampled_from((0, 1 << 64, None))))
    origlen = draw(st.one_of(st.just(len(frame)), st.integers(0, (1 << 32) - 1), st.just(1 << 32)))
    if plain or draw(st.integers(0, 3)):
        return Packet(iface, ts, frame, origlen)
    flags = draw(st.one_of(st.none(), st.integers(0, 0xFFFFFFFF)))
    comments = tuple(draw(st.lists(st.text(max_size=10), max_size=2)))
    options = draw(st.sampled_from(((), ((c.EPB_DROPCOUNT, 3),))))
    return Packet(iface, ts, frame, origlen, flags, comments, options)


def encode_all(enc: TlvEncoder, pkts) -> tuple[list, dict]:
    out = []
    for p in pkts:
        try:
            out.append(("ok", enc.add(p, 0.0)))
        except Exception as exc:  # the pure path's errors must be the accelerated path's
            out.append(("error", type(exc).__name__, str(exc)))
    return out, {**enc.stats.as_dict(), "sequence": enc.sequence}


@needs_ext
@FUZZ
@given(
    st.lists(packets(), min_size=1, max_size=12),
    st.sampled_from(("fragment", "truncate", "drop")),
    st.sampled_from((("udp", 1500), ("udp", 576), ("tcp", 1500))),
)
def test_tlv_encoder_add_is_pure(pkts, oversize, transport):
    kind, mtu = transport

    def make():
        return TlvEncoder("acc", 7, session=b"s" * 8, oversize=oversize, transport=kind, mtu=mtu)

    slow, fast = both(make)
    assert encode_all(fast, pkts) == encode_all(slow, pkts)


def capture(pkts: list[Packet], byte_order: str) -> bytes:
    """A pcapng of these packets (interfaces declared in order of first use)."""
    buf = io.BytesIO()
    w = Writer(buf, byte_order=byte_order)
    ids: dict[int, int] = {}
    for p in pkts:
        key = id(p.interface)
        if key not in ids:
            ids[key] = w.copy_interface(p.interface)
        if p.ts is None:
            continue
        w.write_packet(ids[key], p.ts, p.data, origlen=p.origlen, flags=p.flags,
                       comments=p.comments, options=p.options)  # fmt: skip
    w.flush()
    return buf.getvalue()


def tlv_by_add(data: bytes) -> tuple[list[bytes], dict]:
    enc = TlvEncoder("raw", 3, session=bytes(8))
    out = []
    for p in pcapng.read(data):
        out += enc.add(p, 0.0)
    return out, enc.stats.as_dict()


def tlv_by_add_raw(data: bytes, chunk_size: int = 1 << 20) -> tuple[list[bytes], dict]:
    enc = TlvEncoder("raw", 3, session=bytes(8))
    out: list[bytes] = []
    interfaces: list[Interface] = []
    stream = io.BytesIO(data)
    for ev in pcapng.read_events(stream, raw_packets=True, chunk_size=chunk_size):
        if isinstance(ev, RawPackets):
            out += enc.add_raw(ev, interfaces, 0.0)
        elif isinstance(ev, Packet):
            out += enc.add(ev, 0.0)
        elif isinstance(ev, Interface):
            interfaces.append(ev)
        elif isinstance(ev, Section):
            interfaces = []
    return out, enc.stats.as_dict()


def valid_packets(draw_list) -> list[Packet]:
    """Packets a pcapng file can hold (u64 timestamps, u32 lengths, resolutions <= 2^-63)."""
    out = []
    for p in draw_list:
        iface = p.interface
        if p.ts is None or p.ts >= 1 << 64 or p.origlen >= 1 << 32:
            continue
        if iface.tsresol & 0x7F > (63 if iface.tsresol & 0x80 else 19):
            continue
        if not -(1 << 63) <= iface.tsoffset < 1 << 63:
            continue
        out.append(p)
    return out


@needs_ext
@FUZZ
@given(
    st.lists(packets(), min_size=1, max_size=20), st.sampled_from("<>"), st.sampled_from((64, 4096))
)
def test_tlv_add_raw_is_add(pkts, byte_order, chunk_size):
    data = capture(valid_packets(pkts), byte_order)
    want = tlv_by_add(data)
    assert tlv_by_add_raw(data, chunk_size) == want
    with pure():
        assert tlv_by_add_raw(data, chunk_size) == want
        assert tlv_by_add(data) == want


@needs_ext
@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_tlv_add_raw_on_samples(path):
    data = path.read_bytes()
    want = tlv_by_add(data)
    with pure():
        assert tlv_by_add(data) == want
        assert tlv_by_add_raw(data) == want
    assert tlv_by_add_raw(data) == want
    assert want[0]


@pytest.mark.parametrize("compiled", [True, False], ids=["accel", "pure"])
def test_tlv_add_raw_stops_at_a_malformed_block_with_the_ready_messages(compiled):
    from test_encoder_raw import epb, shb_idb

    if compiled and EXT is None:
        pytest.skip("stm._accel is not built (or STM_NO_ACCEL)")
    bo = "<"
    bad = struct.pack(bo + "HH", c.OPT_COMMENT, 200) + b"x" * 8  # runs past its block
    blocks = [epb(bo, 0, i, bytes(300)) for i in range(12)] + [epb(bo, 0, 99, b"z" * 50, bad)]
    interfaces: list[Interface] = []
    runs = []
    for ev in pcapng.read_events(shb_idb(bo) + b"".join(blocks), raw_packets=True):
        if isinstance(ev, Interface):
            interfaces.append(ev)
        elif isinstance(ev, RawPackets):
            runs.append(ev)
    with nullcontext() if compiled else pure():
        enc = TlvEncoder("raw", 3, session=bytes(8))
    with pytest.raises(MalformedPcapng) as info:
        enc.add_raw(runs[0], interfaces, 0.0)
    assert len(info.value.datagrams) == 12 and enc.stats.packets == 12


def test_tlv_add_raw_on_corpus(corpus_dir):
    files = sorted(p for p in corpus_dir.rglob("*") if p.suffix in (".pcap", ".pcapng"))
    for path in files:
        data = path.read_bytes()
        try:
            want = tlv_by_add(data)
        except Exception:
            continue  # files stm cannot read per packet are not add_raw's business
        assert tlv_by_add_raw(data) == want, path.name
        if EXT is not None:
            with pure():
                assert tlv_by_add_raw(data) == want, path.name


# -- format B decoding ---------------------------------------------------------------------------


def key(ev):
    """An event as comparable values (packet data copied out of views)."""
    if type(ev) is Packets:
        pkts = [(p.interface, p.ts, bytes(p.data), p.origlen, p.flags, p.comments, p.options)
                for p in ev.packets]  # fmt: skip
        return ("Packets", ev.stream, ev.sequence, pkts)
    if type(ev) is PacketBlocks:
        return ("PacketBlocks", ev.stream, ev.interfaces, bytes(ev.data), ev.start, ev.count,
                ev.sequence)  # fmt: skip
    return ev


def state(dec) -> dict:
    streams = {s: v.stats.as_dict() for s, v in dec.streams.items()}
    return {"streams": streams, "malformed": dec.malformed, "pending": dec.pending_fragments()}


def run_decoder(dec, reports, batch: bool = False) -> tuple[list, dict]:
    events = []
    if batch:
        many = getattr(dec, "receive_messages", None) or dec.receive_datagrams
        many(list(reports), ("10.0.0.1", 1), 0.0)
        events += [key(e) for e in dec.events()]
    else:
        receive = getattr(dec, "receive_datagram", None) or dec.receive_message
        for r in reports:
            receive(r, ("10.0.0.1", 1), 0.0)
            events += [key(e) for e in dec.events()]
    return events, state(dec)


def mutate(reports: list[bytes], rnd: random.Random, garbage: bool) -> list[bytes]:
    """Drop, duplicate, reorder, and (with ``garbage``) flip bytes, cut, inject noise."""
    out = []
    for r in reports:
        x = rnd.random()
        if x < 0.05:
            continue
        out.append(r)
        if x < 0.1:
            out.append(r)
        if garbage and x > 0.9:
            b = bytearray(r)
            for _ in range(rnd.randint(1, 3)):
                b[rnd.randrange(len(b))] = rnd.randrange(256)
            out.append(bytes(b))
        if garbage and 0.85 < x <= 0.9:
            out.append(r[: rnd.randrange(len(r))])
        if garbage and 0.8 < x <= 0.85:
            out.append(rnd.randbytes(rnd.randrange(64)))
    for _ in range(len(out) // 10):
        i = rnd.randrange(len(out))
        j = min(len(out) - 1, i + rnd.randint(1, 5))
        out[i], out[j] = out[j], out[i]
    return out


def tlv_reports(pkts, rnd, **kwargs) -> list[bytes]:
    """Messages of two producers, one restarting (a new session) halfway."""
    encs = [TlvEncoder("a", 1, session=b"1" * 8, **kwargs), TlvEncoder("b", 2, **kwargs)]
    out = []
    for i, p in enumerate(pkts):
        if i == len(pkts) // 2:
            encs[1] = TlvEncoder("b", 2, session=b"2" * 8, **kwargs)
        try:
            out += encs[rnd.randrange(2)].add(p, 0.0)
        except Exception:
            continue
    return out


@needs_ext
@FUZZ
@given(
    st.lists(packets(), min_size=1, max_size=25),
    st.randoms(use_true_random=False),
    st.sampled_from((None, "<", ">")),
    st.booleans(),
)
def test_tlv_decoder_is_pure(pkts, rnd, raw, garbage):
    reports = mutate(tlv_reports(pkts, rnd, mtu=700), rnd, garbage)
    slow, fast = both(lambda: TlvDecoder(raw_byte_order=raw, window=16))
    want = run_decoder(slow, reports)
    assert run_decoder(fast, reports) == want
    batch = TlvDecoder(raw_byte_order=raw, window=16)
    assert run_decoder(batch, reports, batch=True) == want


def write(dec, reports, sink_order: str) -> bytes:
    out = io.BytesIO()
    sink = PcapngSink(out, byte_order=sink_order)
    receive = getattr(dec, "receive_datagram", None) or dec.receive_message
    for r in reports:
        receive(r, ("10.0.0.1", 1), 0.0)
        for ev in dec.events():
            if type(ev) is PacketBlocks:
                sink.write_blocks(ev)
            elif type(ev) is Packets:
                sink.write(ev.stream, ev.packets, now=1.0)
    sink.close()
    return out.getvalue()


@needs_ext
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(packets(), min_size=1, max_size=25), st.randoms(use_true_random=False),
       st.sampled_from("<>"))  # fmt: skip
def test_tlv_receiver_file_is_byte_identical(pkts, rnd, order):
    """What stm-recv writes: pure Packets, pure PacketBlocks and accelerated, the same file."""
    reports = mutate(tlv_reports(pkts, rnd, mtu=700), rnd, False)
    with pure():
        want = write(TlvDecoder(), reports, order)
        assert write(TlvDecoder(raw_byte_order=order), reports, order) == want
    assert write(TlvDecoder(), reports, order) == want
    assert write(TlvDecoder(raw_byte_order=order), reports, order) == want
    assert write(AutoDecoder(raw_byte_order=order), reports, order) == want


@needs_ext
@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("order", "<>")
def test_tlv_samples_written_identically(path, order):
    reports = tlv_by_add(path.read_bytes())[0]
    with pure():
        want = write(TlvDecoder(), reports, order)
    assert write(TlvDecoder(raw_byte_order=order), reports, order) == want
    assert write(AutoDecoder(raw_byte_order=order), reports, order) == want


# -- format A decoding ---------------------------------------------------------------------------


def gre_reports(pkts, rnd, byte_order: str) -> list[bytes]:
    encs = [
        Encoder("a", 1, session=1, byte_order=byte_order, mtu=900),
        Encoder("b", 2, session=2, byte_order=byte_order, mtu=900, checksum=rnd.random() < 0.3),
    ]
    out = []
    for p in pkts:
        try:
            out += encs[rnd.randrange(2)].add(p, 0.0)
        except Exception:
            continue
    for e in encs:
        out += e.flush()
    return out


@needs_ext
@FUZZ
@given(
    st.lists(packets(), min_size=1, max_size=30),
    st.randoms(use_true_random=False),
    st.sampled_from("<>"),
    st.sampled_from(("<", ">", None)),
    st.booleans(),
)
def test_gre_decoder_is_pure(pkts, rnd, byte_order, raw, garbage):
    reports = mutate(gre_reports(pkts, rnd, byte_order), rnd, garbage)
    slow, fast = both(lambda: Decoder(raw_byte_order=raw, window=16))
    want = run_decoder(slow, reports)
    assert run_decoder(fast, reports) == want
    assert run_decoder(Decoder(raw_byte_order=raw, window=16), reports, batch=True) == want
    with pure():
        want = write(Decoder(), reports, "<")
    assert write(Decoder(raw_byte_order="<"), reports, "<") == want


@needs_ext
@FUZZ
@given(st.lists(packets(), min_size=1, max_size=20), st.randoms(use_true_random=False),
       st.booleans())  # fmt: skip
def test_auto_decoder_is_pure(pkts, rnd, garbage):
    half = len(pkts) // 2
    reports = gre_reports(pkts[:half], rnd, "<") + tlv_reports(pkts[half:], rnd)
    rnd.shuffle(reports)
    reports = mutate(reports, rnd, garbage)
    slow, fast = both(lambda: AutoDecoder(raw_byte_order="<", window=16))
    want = run_decoder(slow, reports)
    assert run_decoder(fast, reports) == want
    # a batch (the reports of one WebSocket read) of both formats, on either path
    for batch in both(lambda: AutoDecoder(raw_byte_order="<", window=16)):
        assert run_decoder(batch, reports, batch=True) == want


# -- the writer's block copy ----------------------------------------------------------------------


@needs_ext
@FUZZ
@given(st.lists(packets(plain=True), min_size=1, max_size=10), st.sampled_from("<>"),
       st.one_of(st.none(), st.integers(0, 5)))  # fmt: skip
def test_copy_epbs_is_pure(pkts, order, new_id):
    eth = interface(1, 9, 0)
    data = capture([Packet(eth, 1, p.data, len(p.data)) for p in pkts], order)
    shb = struct.unpack_from(order + "I", data, 4)[0]
    idb = struct.unpack_from(order + "I", data, shb + 4)[0]
    blocks = data[shb + idb :]
    ours = b"--" + blocks  # the blocks at an offset, as in a datagram
    results = []
    for make in (pure, nullcontext):
        with make():
            w = Writer(io.BytesIO(), byte_order=order)
        before = len(w._buf)
        n = w.copy_epbs(ours, 2, [new_id])
        results.append((n, bytes(w._buf[before:]), w.packets))
    assert results[0] == results[1]


# -- the TCP framer -------------------------------------------------------------------------------


def frame_all(framer: tlv.TlvFramer, chunks: list[bytes], batch: bool = False) -> list:
    out = []
    for chunk in [*chunks, b""]:
        try:
            framer.receive_data(chunk)
        except MalformedReport as exc:
            out.append(("error", str(exc)))
            break
        if batch:  # next_frames first: what it leaves, next_frame handles as always
            out += framer.next_frames()
        for _ in range(len(chunk) + 2):
            try:
                frame = framer.next_frame()
            except MalformedReport as exc:
                out.append(("error", str(exc), framer.failed))
                break
            if frame is None:
                break
            out.append(frame)
        out.append(("buffered", framer.buffered))
        if framer.failed:
            break
    return out


@needs_ext
@FUZZ
@given(
    st.lists(st.binary(min_size=0, max_size=40), max_size=6),
    st.randoms(use_true_random=False),
    st.sampled_from((65535, 64)),
)
def test_framer_is_pure(values, rnd, max_buffer):
    stream = b"".join(tlv.encode_message(tlv.Message((tlv.Chunk(0, 15, v),))) for v in values)
    if rnd.random() < 0.5 and stream:  # garbage somewhere
        at = rnd.randrange(len(stream))
        stream = stream[:at] + rnd.randbytes(rnd.randint(1, 8)) + stream[at:]
    if rnd.random() < 0.3:
        stream = stream[: rnd.randrange(len(stream) + 1)]
    cuts = sorted(rnd.randrange(len(stream) + 1) for _ in range(rnd.randint(0, 5)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    chunks = [x for x in chunks if x]
    slow, fast = both(lambda: tlv.TlvFramer(max_buffer))
    want = frame_all(slow, chunks)
    assert frame_all(fast, chunks) == want
    slow, fast = both(lambda: tlv.TlvFramer(max_buffer))
    assert frame_all(slow, chunks, batch=True) == want
    assert frame_all(fast, chunks, batch=True) == want


# -- garbage straight into the compiled functions ------------------------------------------------


@needs_ext
@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 400), st.sampled_from((0, 1, 2)))
def test_garbage_never_crashes(data, off, mode):
    prefixes = EXT.Prefixes()
    prefixes.set([data[:8], b"", b"HEP3"], [5, 0, 3])
    prefixes.gre_run(data, -1)
    prefixes.gre_run(b"\x30\x00" + bytes(10) + data, 0x88B5)
    prefixes.hep_fast(data, mode)
    prefixes.hep_fast(b"HEP3" + struct.pack("!H", len(data) + 6) + data, mode)
    prefixes.hep_fast_many([data, data[:off], 1, None], mode)
    EXT.hep_frames(bytearray(data), off, 65535, 100)
    EXT.hep_frames(memoryview(data), off, 10, 100)
    EXT.frame_split(off & 0x1FF, data)
    ifc = EXT.HepInterface(b"", 1, 6, 0, 1_000_000)
    EXT.hep_encode_packet(ifc, 0, off, len(data), data, 65535)
    EXT.hep_encode_run([ifc, None], memoryview(data), off % 64, mode == 2, 0, 65535)
    out = bytearray()
    EXT.copy_epbs(out, data, off, [None, 1, 2], mode == 2)


@needs_ext
@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=30), st.sampled_from((None, "<")))
def test_garbage_is_only_malformed(reports, raw):
    """Noise (and noise behind a valid header) into every accelerated decoder: counted and
    skipped, the same as the pure path, and never more than one event per report."""
    noisy = []
    for r in reports:
        noisy += [r, b"HEP3" + struct.pack("!H", len(r) + 6) + r, b"\x30\x00\x88\xb5" + r]
    for make in (
        lambda: TlvDecoder(raw_byte_order=raw),
        lambda: Decoder(raw_byte_order=raw),
        lambda: AutoDecoder(raw_byte_order=raw),
    ):
        slow, fast = both(make)
        got = run_decoder(fast, noisy)
        assert got == run_decoder(slow, noisy)
        for ev in got[0]:
            assert isinstance(ev, (Malformed, tuple)) or type(ev).__name__ in (
                "Gap", "Duplicate", "Reordered", "Restarted", "FragmentsExpired"
            )  # fmt: skip


@needs_ext
@FUZZ
@given(
    st.lists(
        st.tuples(
            st.one_of(st.integers(0, (1 << 64) - 1), st.sampled_from((-1, 1 << 64))),
            st.binary(max_size=70),
            st.one_of(st.none(), st.integers(0, (1 << 32) - 1), st.just(1 << 32)),
        ),
        max_size=8,
    ),
    st.sampled_from("<>"),
)
def test_write_packet_is_pure(rows, order):
    results = []
    for make in (pure, nullcontext):
        with make():
            out = io.BytesIO()
            w = Writer(out, byte_order=order)
        ifid = w.add_interface(1, 0)
        got = []
        for ts, data, origlen in rows:
            try:
                w.write_packet(ifid, ts, data, origlen=origlen)
                got.append("ok")
            except Exception as exc:
                got.append((type(exc).__name__, str(exc)))
        w.flush()
        results.append((got, out.getvalue(), w.packets))
    assert results[0] == results[1]


def write_batches(dec, reports, sink_order: str, size: int) -> tuple[bytes, int]:
    """``write`` with the reports in batches through ``receive_messages(coalesce=True)``;
    also the largest event (EPBs in one PacketBlocks)."""
    out = io.BytesIO()
    sink = PcapngSink(out, byte_order=sink_order)
    largest = 0
    for i in range(0, len(reports), size):
        dec.receive_messages(reports[i : i + size], ("10.0.0.1", 1), 0.0, coalesce=True)
        for ev in dec.events():
            if type(ev) is PacketBlocks:
                sink.write_blocks(ev)
                largest = max(largest, ev.count)
            elif type(ev) is Packets:
                sink.write(ev.stream, ev.packets, now=1.0)
    sink.close()
    return out.getvalue(), largest


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(packets(), min_size=1, max_size=25), st.randoms(use_true_random=False),
       st.sampled_from("<>"), st.integers(1, 9), st.booleans())  # fmt: skip
def test_coalesced_batches_write_the_same_file(pkts, rnd, order, size, garbage):
    reports = mutate(tlv_reports(pkts, rnd, mtu=700), rnd, garbage)
    with pure():
        want = write(TlvDecoder(), reports, order)
        assert write_batches(TlvDecoder(raw_byte_order=order), reports, order, size)[0] == want
    got = write_batches(TlvDecoder(raw_byte_order=order), reports, order, size)
    assert got[0] == want
    auto = write_batches(AutoDecoder(raw_byte_order=order), reports, order, size)
    assert auto[0] == want


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_coalesced_samples(path):
    data = path.read_bytes()
    reports = tlv_by_add(data)[0] * 3  # duplicates too
    want = write(TlvDecoder(), reports, "<")
    got, largest = write_batches(TlvDecoder(raw_byte_order="<"), reports, "<", 64)
    assert got == want
    plain = all(p.ts is not None and not p.comments and not p.options for p in pcapng.read(data))
    if plain and len(reports) > 3:
        assert largest > 1


def batches(dec, reports, size: int, coalesce: bool) -> tuple[list, dict]:
    events = []
    for i in range(0, len(reports), size):
        dec.receive_messages(reports[i : i + size], ("10.0.0.1", 1), 0.0, coalesce=coalesce)
        events += [key(e) for e in dec.events()]
    return events, state(dec)


@needs_ext
@FUZZ
@given(
    st.lists(packets(plain=True), min_size=1, max_size=40),
    st.randoms(use_true_random=False),
    st.sampled_from("<>"),
    st.integers(1, 50),
    st.booleans(),
    st.sampled_from((16, 1024)),
)
def test_coalesced_runs_are_pure(pkts, rnd, order, size, garbage, window):
    """The accelerated relay batch (runs of EPBs, accounted at once) against the pure one:
    the same events (coalesced the same way) and the same counters and sequence state."""
    reports = mutate(tlv_reports(pkts, rnd, mtu=700), rnd, garbage)
    if rnd.random() < 0.7:  # long in-order stretches of one stream too
        enc = TlvEncoder("one", 9, session=b"9" * 8, mtu=700)
        one: list[bytes] = []
        for p in pkts:
            try:
                one += enc.add(p, 0.0)
            except Exception:
                continue
        reports = one + reports
    slow, fast = both(lambda: TlvDecoder(raw_byte_order=order, window=window))
    want = batches(slow, reports, size, True)
    assert batches(fast, reports, size, True) == want
    seqs = [(v.top, v.mask, v.span) for v in slow.streams.values()]
    assert [(v.top, v.mask, v.span) for v in fast.streams.values()] == seqs


@needs_ext
def test_runs_after_a_duplicate_go_one_by_one():
    """A run whose first message is a duplicate leaves the stream elsewhere: the rest of the
    run is then delivered message by message, exactly as without runs."""
    enc = TlvEncoder("one", 9, session=b"9" * 8)
    pkts = [p for p in pcapng.read(SAMPLES[0].with_name("sip_udp_ipv4.pcap"))]
    m = [x for p in (pkts * 3)[:12] for x in enc.add(p, 0.0)]
    reports = m[:3] + m[1:4] + m[6:9] + m[4:6] + m[9:]  # a duplicate run, a gap, a late pair
    slow, fast = both(lambda: TlvDecoder(raw_byte_order="<", window=16))
    want = batches(slow, reports, len(reports), True)
    assert batches(fast, reports, len(reports), True) == want
    kinds = [type(e).__name__ if not isinstance(e, tuple) else e[0] for e in want[0]]
    assert "Duplicate" in kinds and "Gap" in kinds and "Reordered" in kinds
