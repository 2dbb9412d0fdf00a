"""Our writer and reader agree with each other on every corpus file, in both byte orders."""

from __future__ import annotations

import io
import random

import pytest
from helpers import relay

from stm import pcapng
from stm.pcapng import (
    CustomBlock,
    DecryptionSecrets,
    Interface,
    InterfaceStatistics,
    NameResolution,
    Packet,
    RawPackets,
    Reader,
    Section,
    UnknownBlock,
    Writer,
)


def corpus_files(corpus_dir):
    return sorted(p for p in corpus_dir.rglob("*") if p.suffix in (".pcap", ".pcapng"))


def full_key(ev):
    if isinstance(ev, Packet):
        return ("packet", *ev.key(), ev.options, ev.block == pcapng.records.c.SPB)
    if isinstance(ev, Interface):
        return ("interface", ev.linktype, ev.snaplen, ev.options, ev.id)
    if isinstance(ev, Section):
        return ("section", ev.options)
    if isinstance(ev, InterfaceStatistics):
        return ("isb", ev.interface.id, ev.ts, ev.options)
    return (type(ev).__name__, ev)


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_corpus_relay_is_lossless(corpus_dir, byte_order):
    files = corpus_files(corpus_dir)
    assert files, "corpus is empty"
    for path in files:
        original = list(pcapng.read_events(path))
        copy = list(pcapng.read_events(relay(original, byte_order)))
        want = [full_key(e) for e in original if not _dropped(e, byte_order)]
        got = [full_key(e) for e in copy]
        if original[0].format == "pcap":
            # A classic pcap header becomes a pcapng section: compare from the interface on.
            want, got = want[1:], got[1:]
        assert got == want, path.name


def _dropped(ev, byte_order):
    return isinstance(ev, UnknownBlock) and ev.byte_order != byte_order


def test_corpus_has_what_the_manifest_says(corpus_dir):
    counts = {}
    for line in (corpus_dir / "real" / "MANIFEST.tsv").read_text().splitlines()[1:]:
        cols = line.split("\t")
        counts[cols[0]] = int(cols[7])
    for name, count in counts.items():
        assert sum(1 for _ in pcapng.read(corpus_dir / "real" / name)) == count, name


def test_random_chunking_gives_the_same_events(corpus_dir):
    rng = random.Random(4754)
    for path in corpus_files(corpus_dir):
        data = path.read_bytes()
        whole = [full_key(e) for e in pcapng.read_events(data)]
        for _ in range(3):
            reader = Reader()
            got = []
            pos = 0
            while pos < len(data):
                step = rng.choice((1, 2, 3, 7, 64, 1000, 65536))
                reader.feed(data[pos : pos + step])
                pos += step
                got += [full_key(e) for e in reader]
            reader.close()
            got += [full_key(e) for e in reader]
            assert got == whole, path.name


def test_bulk_mode_counts_every_packet(corpus_dir):
    for path in corpus_files(corpus_dir):
        per_packet = sum(1 for _ in pcapng.read(path))
        bulk = 0
        for ev in pcapng.read_events(path, raw_packets=True, chunk_size=4096):
            if isinstance(ev, RawPackets):
                bulk += ev.count
            elif isinstance(ev, Packet):
                bulk += 1  # classic pcap has no blocks to take whole
        assert bulk == per_packet, path.name


def test_bulk_runs_can_be_copied_whole():
    out = io.BytesIO()
    w = Writer(out, byte_order="<")
    w.add_interface(1, 65535)
    for i in range(100):
        w.write_packet(0, i, bytes([i]) * (i + 1), comments=[f"p{i}"] if i % 3 else [])
    w.flush()
    copy = io.BytesIO()
    w2 = Writer(copy, byte_order="<")
    for ev in pcapng.read_events(out.getvalue(), raw_packets=True, chunk_size=333):
        if isinstance(ev, Interface):
            w2.copy_interface(ev)
        elif isinstance(ev, RawPackets):
            w2.write_raw(ev.data)
    w2.flush()
    assert copy.getvalue() == out.getvalue()


def test_every_block_kind_round_trips_in_both_orders():
    for bo in "<>":
        out = io.BytesIO()
        w = Writer(out, byte_order=bo, options=[(1, "section one"), (4, "stm tests")])
        w.add_interface(1, 0, name="eth0", tsresol=9)
        w.add_interface(101, 1500, name="raw", tsresol=0x94, tsoffset=-7)
        w.write_packet(1, 12345, b"\x45" + bytes(19), origlen=40, flags=1, comments=["a", "b"])
        w.write_packet(
            0,
            2**64 - 1,
            b"x" * 5,
            options=[(3, b"\x02" + bytes(16)), (4, 9), (5, 2**63), (6, 3), (7, b"\x01ab")],
        )
        w.write_packet(0, None, b"spb data")
        w.write_statistics(0, 99, [(2, 1), (3, 2**40), (5, 17), (1, "stats")])
        w.write_block(NameResolution(((1, bytes([10, 0, 0, 1]) + b"host\0"),), ((2, "dns"),)))
        w.write_block(DecryptionSecrets(0x544C534B, b"CLIENT_RANDOM a b\n", ((1, "keys"),)))
        w.write_block(CustomBlock(0x00000BAD, 32473, b"custom data"))
        w.write_block(CustomBlock(0x40000BAD, 32473, b"no copy"))
        w.new_section([(2, "second section")])
        w.add_interface(113, 262144, name="any", tsresol=6)
        w.write_packet(0, 1_800_000_000_000_000_000, b"\0" * 16, comments=["ÿ \udcff raw"])
        w.flush()
        events = list(pcapng.read_events(out.getvalue()))
        assert [type(e).__name__ for e in events] == [
            "Section",
            "Interface",
            "Interface",
            "Packet",
            "Packet",
            "Packet",
            "InterfaceStatistics",
            "NameResolution",
            "DecryptionSecrets",
            "CustomBlock",
            "CustomBlock",
            "Section",
            "Interface",
            "Packet",
        ]
        sec, eth, raw, p1, p2, p3, isb, nrb, dsb, cb1, cb2, sec2, sll, p4 = events
        assert sec.byte_order == bo and sec.comments == ("section one",)
        assert (raw.tsresol, raw.tsoffset, raw.units, raw.name) == (0x94, -7, 2**20, "raw")
        assert p1.interface is raw and p1.ts == 12345 and p1.origlen == 40
        assert p1.flags == 1 and p1.comments == ("a", "b")
        assert p1.time == pcapng.records.Fraction(12345, 2**20) - 7
        assert p2.ts == 2**64 - 1 and dict(p2.options) == {
            3: b"\x02" + bytes(16),
            4: 9,
            5: 2**63,
            6: 3,
            7: b"\x01ab",
        }
        assert p3.ts is None and bytes(p3.data) == b"spb data" and p3.interface is eth
        assert isb.ts == 99 and dict(isb.options)[3] == 2**40
        assert nrb.records[0][1].endswith(b"host\0") and dsb.data.startswith(b"CLIENT")
        assert (cb1.pen, cb1.data[:11], cb2.block_type) == (32473, b"custom data", 0x40000BAD)
        assert sec2.index == 1 and sll.section == 1 and sll.id == 0
        assert p4.interface is sll and p4.comments == ("ÿ \udcff raw",)
        assert p4.time_ns == 1_800_000_000_000_000_000_000
