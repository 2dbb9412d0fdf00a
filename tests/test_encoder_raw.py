"""Format A's bulk encode path: ``Encoder.add_raw`` against ``Encoder.add``, and stm-send.

``add_raw`` takes the reader's runs of packet blocks (``Reader(raw_packets=True)``) and
copies each EPB whole; whatever it cannot copy goes through ``add``. Its datagrams must be
those of ``add`` for the same packets: byte for byte where the blocks are as ``add`` would
write them (every corpus file rewritten by our writer), and the same packets once decoded
everywhere (the corpus files as they are: padding, option order, obsolete PBs...).
"""

from __future__ import annotations

import io
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Receiver, relay, send

from stm import pcapng
from stm.errors import MalformedPcapng
from stm.pcapng import (
    Interface,
    Packet,
    RawPackets,
    Section,
    Writer,
)
from stm.pcapng import constants as c
from stm.report import Decoder, Encoder, Packets

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO / "samples").glob("*.pcap*"))
POLICIES = ("fragment", "truncate", "drop")
MTUS = (1500, 9000)


# -- helpers ----------------------------------------------------------------------------------


def inputs(corpus_dir: Path) -> list[Path]:
    files = sorted(p for p in corpus_dir.rglob("*") if p.suffix in (".pcap", ".pcapng"))
    assert files, "corpus is empty"
    return files + SAMPLES


def rewrite(path: Path, byte_order: str) -> bytes:
    """The capture copied by our writer in ``byte_order``, as a lossless relay would."""
    return relay(pcapng.read_events(path), byte_order)


def by_add(data: bytes, **kwargs) -> tuple[Encoder, list[bytes]]:
    """Every packet through ``add`` (the per-packet reader), then ``flush``."""
    enc = Encoder("raw-test", session=0x5EED, **kwargs)
    out: list[bytes] = []
    for p in pcapng.read(data):
        out += enc.add(p, 0.0)
    out += enc.flush()
    return enc, out


def by_add_raw(data: bytes, chunk_size: int = 1 << 20, **kwargs) -> tuple[Encoder, list[bytes]]:
    """The bulk reader (in ``chunk_size`` reads): runs to ``add_raw``, pcap records to ``add``."""
    enc = Encoder("raw-test", session=0x5EED, **kwargs)
    out: list[bytes] = []
    interfaces: list[Interface] = []
    for ev in pcapng.read_events(io.BytesIO(data), raw_packets=True, chunk_size=chunk_size):
        if isinstance(ev, RawPackets):
            out += enc.add_raw(ev, interfaces, 0.0)
        elif isinstance(ev, Packet):
            out += enc.add(ev, 0.0)
        elif isinstance(ev, Interface):
            interfaces.append(ev)
        elif isinstance(ev, Section):
            interfaces = []
    out += enc.flush()
    return enc, out


def decoded(datagrams: list[bytes]) -> list[tuple]:
    dec = Decoder()
    got = []
    for d in datagrams:
        dec.receive_datagram(d)
        for ev in dec.events():
            if isinstance(ev, Packets):
                got += [(p.key(), p.options) for p in ev.packets]
    assert dec.malformed == 0
    return got


def canonical(data: bytes) -> bool:
    """Whether every packet has only flags and comments (what add() writes as it was read)."""
    return all(not p.options for p in pcapng.read(data))


def check_same(data: bytes, name: str, *, identical: bool, **kwargs) -> bool:
    """add_raw's datagrams decode to add's packets; returns whether they were byte-identical
    (asserted when ``identical``), and then add's statistics are asserted too. Otherwise a
    block copied whole may be longer or shorter than add() would write it (bytes past the
    captured length, no opt_endofopt...): only the packet count is certain to be the same.
    """
    enc_a, want = by_add(data, **kwargs)
    for chunk in (1 << 20, 4099):
        enc_r, got = by_add_raw(data, chunk, **kwargs)
        where = (name, kwargs, chunk)
        assert enc_r.stats.packets == enc_a.stats.packets, where
        if identical:
            assert got == want, where
        if got == want:
            assert enc_r.stats.as_dict() == enc_a.stats.as_dict(), where
            assert enc_r.sequence == enc_a.sequence, where
        else:
            assert decoded(got) == decoded(want), where
    return got == want


# -- the corpus -------------------------------------------------------------------------------


@pytest.mark.parametrize("mtu", MTUS)
@pytest.mark.parametrize("oversize", POLICIES)
@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_rewritten_corpus_is_byte_identical(corpus_dir, byte_order, oversize, mtu):
    """Every corpus file rewritten in each byte order; the encoder in the same order (the
    copying path) and in the other (every block through add)."""
    same = 0
    for path in inputs(corpus_dir):
        data = rewrite(path, byte_order)
        ident = canonical(data)
        for enc_order in (byte_order, "<" if byte_order == ">" else ">"):
            kwargs = dict(mtu=mtu, oversize=oversize, byte_order=enc_order)
            same += check_same(data, path.name, identical=ident, **kwargs)
    assert same > 0


@pytest.mark.parametrize("mtu", MTUS)
@pytest.mark.parametrize("oversize", POLICIES)
def test_corpus_as_it_is_decodes_the_same(corpus_dir, oversize, mtu):
    """The files as they are (their own padding, option order, PBs and SPBs, both byte
    orders), the encoder in each file's byte order: the same packets come out."""
    for path in inputs(corpus_dir):
        data = path.read_bytes()
        first = next(iter(pcapng.read_events(data)), None)
        if first is None:
            continue
        kwargs = dict(mtu=mtu, oversize=oversize, byte_order=first.byte_order)
        check_same(data, path.name, identical=False, **kwargs)


# -- hand-made inputs --------------------------------------------------------------------------


def multi_interface(bo: str, packets: int = 300) -> bytes:
    """Four interfaces used in turn (IDs that differ from the datagram-local ones), sizes
    from 40 to ~1440 bytes, flags and comments on some."""
    out = io.BytesIO()
    w = Writer(out, byte_order=bo, options=[(1, "generated")])
    w.add_interface(113, 262144, name="any", tsresol=6)
    w.add_interface(1, 65535, name="eth0", tsresol=9)
    w.add_interface(101, 0, name="raw", tsresol=0x80 | 20, tsoffset=1000)
    w.add_interface(229, 1500, name="v6", tsresol=3)
    for i in range(packets):
        ifid = (i * 7) % 4 if i % 5 else 3
        data = bytes((i + k) & 0xFF for k in range(40 + i * 13 % 1400))
        w.write_packet(
            ifid,
            1_700_000_000_000 + i,
            data,
            origlen=len(data) + (i % 3) * 10,
            flags=(i % 4) or None,
            comments=[f"packet {i}"] * (i % 3),
        )
    w.add_interface(1, 65535, name="eth0", tsresol=9)  # the same content again: one index
    for i in range(20):
        w.write_packet(4 if i % 2 else 1, i, b"\x01" * (60 + i))
    w.flush()
    return out.getvalue()


@pytest.mark.parametrize("bo", ["<", ">"])
@pytest.mark.parametrize("mtu", [600, 1500, 9000])
def test_multi_interface_ids_are_patched(bo, mtu):
    data = multi_interface(bo)
    for oversize in POLICIES:
        assert check_same(data, "multi", identical=True, mtu=mtu, oversize=oversize, byte_order=bo)
    _, got = by_add_raw(data, mtu=mtu, byte_order=bo)
    want = [(p.key(), p.options) for p in pcapng.read(data)]
    assert decoded(got) == want


def epb(bo: str, ifid: int, ts: int, data: bytes, opts: bytes = b"") -> bytes:
    n = len(data)
    total = 32 + n + (-n & 3) + len(opts)
    head = struct.pack(bo + "IIIIIII", c.EPB, total, ifid, ts >> 32, ts & 0xFFFFFFFF, n, n)
    return head + data + b"\0" * (-n & 3) + opts + struct.pack(bo + "I", total)


def shb_idb(bo: str, interfaces: int = 1) -> bytes:
    shb = struct.pack(bo + "IIIHHqI", c.SHB, 28, c.BYTE_ORDER_MAGIC, 1, 0, -1, 28)
    idb = struct.pack(bo + "IIHHII", c.IDB, 20, 1, 0, 0, 20)
    return shb + idb * interfaces


@pytest.mark.parametrize("bo", ["<", ">"])
def test_spb_pb_and_odd_options_take_add(bo):
    """SPBs, an obsolete PB (with drops), options in another order than add() writes them,
    no opt_endofopt, odd padding bytes: all decode as add() would give them."""
    pb_data = b"\x45" * 33
    pb = struct.pack(bo + "IIHHIIII", c.PB, 32 + 36, 1, 7, 0, 99, 33, 40) + pb_data + b"\0" * 3
    pb += struct.pack(bo + "I", 68)
    comment_then_flags = (
        struct.pack(bo + "HH", c.OPT_COMMENT, 2) + b"hi\0\0" + struct.pack(bo + "HHI", 2, 4, 1)
    )
    parts = [
        shb_idb(bo, 2),
        struct.pack(bo + "II", c.SPB, 16 + 8) + struct.pack(bo + "I", 5) + b"spb\x01\x02\0\0\0"
        + struct.pack(bo + "I", 24),
        epb(bo, 1, 10, b"a" * 61, comment_then_flags + b"\0\0\0\0"),
        epb(bo, 1, 11, b"b" * 62, comment_then_flags),  # no opt_endofopt
        epb(bo, 0, 12, b"c" * 63),
        pb,
        epb(bo, 1, 13, b"d" * 65, struct.pack(bo + "HH", c.EPB_DROPCOUNT, 8) + bytes(8) + bytes(4)),
        struct.pack(bo + "II", c.SPB, 16) + struct.pack(bo + "I", 0) + struct.pack(bo + "I", 16),
    ]  # fmt: skip
    data = b"".join(parts)
    data = data[:200] + data[200:].replace(b"c\0", b"c\x77", 1)  # junk in a padding byte
    for mtu in MTUS:
        for oversize in POLICIES:
            check_same(data, "hand", identical=False, mtu=mtu, oversize=oversize, byte_order=bo)
    _, got = by_add_raw(data, byte_order=bo)
    want = [(p.key(), p.options) for p in pcapng.read(data)]
    assert decoded(got) == want and len(want) == 7


@pytest.mark.parametrize("linger", [0.0, 0.005])
@pytest.mark.parametrize("step", [0.0, 0.002, 0.01])
def test_linger_is_that_of_a_per_packet_loop(linger, step):
    """add_raw(run, now) sends what ``add(p, now) or poll(now)`` does for each packet."""
    data = multi_interface("<", 200)
    packets = list(pcapng.read(data))
    ref = Encoder("raw-test", session=1, linger=linger)
    enc = Encoder("raw-test", session=1, linger=linger)
    want: list[bytes] = []
    got: list[bytes] = []
    interfaces: list[Interface] = []
    now = 0.0
    k = 0
    runs = 0
    for ev in pcapng.read_events(io.BytesIO(data), raw_packets=True, chunk_size=3000):
        if isinstance(ev, Interface):
            interfaces.append(ev)
        elif isinstance(ev, RawPackets):
            for p in packets[k : k + ev.count]:
                want += ref.add(p, now) or ref.poll(now)
            k += ev.count
            got += enc.add_raw(ev, interfaces, now)
            assert enc.deadline() == ref.deadline()
            now += step
            runs += 1
    assert runs > 10 and k == len(packets)
    assert got == want and enc.stats.as_dict() == ref.stats.as_dict()
    assert enc.flush() == ref.flush()


def test_malformed_options_raise_with_the_ready_datagrams():
    bo = "<"
    bad = struct.pack(bo + "HH", c.OPT_COMMENT, 200) + b"x" * 8  # runs past its block
    blocks = [epb(bo, 0, i, bytes(300)) for i in range(12)] + [epb(bo, 0, 99, b"z" * 50, bad)]
    data = shb_idb(bo) + b"".join(blocks)
    with pytest.raises(MalformedPcapng):
        list(pcapng.read(data))  # the per-packet reader refuses it too
    enc = Encoder("raw-test", session=1)
    interfaces: list[Interface] = []
    runs = []
    for ev in pcapng.read_events(data, raw_packets=True):
        if isinstance(ev, Interface):
            interfaces.append(ev)
        elif isinstance(ev, RawPackets):
            runs.append(ev)
    assert len(runs) == 1 and runs[0].count == 13
    with pytest.raises(MalformedPcapng) as info:
        enc.add_raw(runs[0], interfaces, 0.0)
    ready = info.value.datagrams
    assert ready and enc.stats.datagrams == len(ready) and enc.stats.packets == 12
    rest = enc.flush()
    assert len(decoded(ready + rest)) == 12


def test_big_endian_run_with_a_little_endian_encoder_is_not_copied():
    data = multi_interface(">", 50)
    _, got = by_add_raw(data, byte_order="<")
    assert all(d[12 + 8 : 12 + 12] == struct.pack("<I", c.BYTE_ORDER_MAGIC) for d in got)
    assert got == by_add(data, byte_order="<")[1]


# -- stm-send, end to end over loopback UDP ---------------------------------------------------


def full(path: Path) -> list[tuple]:
    return [(p.key(), p.options) for p in pcapng.read(path)]


@pytest.mark.parametrize("mtu", ["1500", "9000"])
def test_stm_send_rebuilds_big_endian_and_multi_interface_files(tmp_path, corpus_dir, mtu):
    files = []
    for bo in "<>":
        f = tmp_path / f"multi{'le' if bo == '<' else 'be'}.pcapng"
        f.write_bytes(multi_interface(bo))
        files.append(f)
    for name in ("5gc_registration.pcapng", "pcapng_11if_null_rawip.pcapng"):
        f = tmp_path / f"be-{name}"
        f.write_bytes(rewrite(corpus_dir / "real" / name, ">"))
        files.append(f)
    for f in files:
        n = len(full(f))
        rx = Receiver(tmp_path / f"out-{f.name}", "--count", str(n), "--duration", "60")
        summary = send(rx.url, f, extra=("--mtu", mtu, "--producer", f.stem))
        assert summary["packets"] == n
        assert rx.finish()["packets_written"] == n
        assert full(rx.out) == full(f), f.name
        # The per-packet path (--rate) sends the same reports; a long linger keeps the
        # batching independent of timing.
        fast = send("udp://127.0.0.1:9", f, extra=("--mtu", mtu, "--linger", "60"))
        slow = send("udp://127.0.0.1:9", f, extra=("--mtu", mtu, "--linger", "60", "--rate", "1e9"))
        for key in ("packets", "reports", "bytes", "fragmented", "truncated", "dropped"):
            assert fast[key] == slow[key], (f.name, key)


def test_stm_send_follows_the_input_byte_order(tmp_path):
    """The reports of a big-endian capture are big-endian (so its EPBs can be copied)."""
    f = tmp_path / "be.pcapng"
    f.write_bytes(multi_interface(">", 60))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)
    port = sock.getsockname()[1]
    with sock:
        summary = send(f"udp://127.0.0.1:{port}", f, extra=("--mtu", "9000"))
        got = [sock.recv(65535) for _ in range(summary["reports"])]
    magic = struct.pack(">I", c.BYTE_ORDER_MAGIC)
    assert all(d[12 + 8 : 12 + 12] == magic for d in got)
    assert decoded(got) == full(f)


@pytest.mark.parametrize("extra", [(), ("--rate", "1e9")])
def test_stm_send_sends_what_came_before_a_malformed_block(tmp_path, extra):
    bo = "<"
    bad = struct.pack(bo + "HH", c.OPT_COMMENT, 200) + b"x" * 8
    blocks = [epb(bo, 0, i, bytes(300)) for i in range(12)] + [epb(bo, 0, 99, b"z" * 50, bad)]
    f = tmp_path / "bad.pcapng"
    f.write_bytes(shb_idb(bo) + b"".join(blocks))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.5)
    with sock:
        result = subprocess.run(
            [sys.executable, "-m", "stm.cli.send", str(f), "--json",
             "--to", f"udp://127.0.0.1:{sock.getsockname()[1]}", *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        got = []
        try:
            while True:
                got.append(sock.recv(65535))
        except TimeoutError:
            pass
    assert result.returncode == 1 and "runs past the end of its block" in result.stderr
    assert len(decoded(got)) == 12
