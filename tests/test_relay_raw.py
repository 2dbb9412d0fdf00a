"""The relay path: reports in the output's byte order are copied block by block
(``PacketBlocks``), and the file written must be byte-identical to the per-packet path."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stm import pcapng
from stm.report import Decoder, Encoder, Malformed, PacketBlocks, Packets
from stm.sink import PcapngSink

SAMPLES = sorted((Path(__file__).parents[1] / "samples").glob("*.pcap*"))


def corpus(corpus_dir):
    files = sorted(p for p in corpus_dir.rglob("*") if p.suffix in (".pcap", ".pcapng"))
    return files + SAMPLES


def datagrams(path, byte_order, mtu=1500):
    enc = Encoder("relay", byte_order=byte_order, session=7, mtu=mtu)
    out = []
    for p in pcapng.read(path):
        out += enc.add(p, 0.0)
    return out + enc.flush()


def rebuild(dgrams, raw_byte_order, sink_order="<"):
    dec = Decoder(raw_byte_order=raw_byte_order)
    out = io.BytesIO()
    sink = PcapngSink(out, byte_order=sink_order)
    kinds = set()
    for d in dgrams:
        dec.receive_datagram(d, None, 0.0)
        for ev in dec.events():
            kinds.add(type(ev).__name__)
            if isinstance(ev, PacketBlocks):
                sink.write_blocks(ev)
            elif isinstance(ev, Packets):
                sink.write(ev.stream, ev.packets, now=1.0)
    sink.close()
    return out.getvalue(), kinds, sink


@pytest.mark.parametrize("mtu", [1500, 9000])
def test_raw_relay_writes_the_same_file(corpus_dir, mtu):
    used_blocks = False
    for path in corpus(corpus_dir):
        dgrams = datagrams(path, "<", mtu)
        want, _, _ = rebuild(dgrams, None)
        got, kinds, sink = rebuild(dgrams, "<")
        assert got == want, path.name
        used_blocks |= "PacketBlocks" in kinds
        assert sink.packets == sum(1 for _ in pcapng.read(path)), path.name
    assert used_blocks


def test_other_byte_order_takes_the_per_packet_path(corpus_dir):
    path = corpus_dir / "real" / "sip_udp_auth_call.pcap"
    dgrams = datagrams(path, ">")
    got, kinds, _ = rebuild(dgrams, "<")
    want, _, _ = rebuild(dgrams, None)
    assert "PacketBlocks" not in kinds and got == want


def test_duplicates_are_not_copied_twice(corpus_dir):
    dgrams = datagrams(corpus_dir / "real" / "sip_udp_auth_call.pcap", "<")
    doubled = [d for d in dgrams for _ in range(2)]
    got, _, _ = rebuild(doubled, "<")
    want, _, _ = rebuild(dgrams, "<")
    assert got == want


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_mutated_reports_never_break_the_relay(data):
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    base = SAMPLE_DGRAMS[rng.randrange(len(SAMPLE_DGRAMS))]
    dec = Decoder(raw_byte_order="<")
    for d in SAMPLE_DGRAMS[:3]:  # warm the prefix cache so mutations reach the fast path
        dec.receive_datagram(d)
    dec.events()
    blob = bytearray(base)
    for _ in range(rng.randint(1, 4)):
        blob[rng.randrange(12, len(blob))] = rng.randrange(256)
    dec.receive_datagram(bytes(blob[: rng.randint(0, len(blob))]))
    out = io.BytesIO()
    sink = PcapngSink(out, byte_order="<")
    for ev in dec.events():
        assert isinstance(ev, (PacketBlocks, Packets, Malformed)) or type(ev).__name__ in (
            "Gap", "Duplicate", "Reordered", "Restarted",
        )  # fmt: skip
        if isinstance(ev, PacketBlocks):
            sink.write_blocks(ev)
        elif isinstance(ev, Packets):
            sink.write(ev.stream, ev.packets, now=1.0)
    sink.close()
    list(pcapng.read(out.getvalue()))  # whatever was written is a valid pcapng


SAMPLE_DGRAMS = [d for sample in SAMPLES for d in datagrams(sample, "<")]
