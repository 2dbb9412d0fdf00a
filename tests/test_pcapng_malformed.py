"""Every kind of malformed capture raises MalformedPcapng with its offset, and nothing else."""

from __future__ import annotations

import contextlib
import io
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stm import pcapng
from stm.errors import MalformedPcapng, StmError
from stm.pcapng import Reader, Writer


def good_file(bo="<") -> bytes:
    out = io.BytesIO()
    w = Writer(out, byte_order=bo)
    w.add_interface(1, 65535, name="eth0")
    w.write_packet(0, 10, b"abcdefgh", comments=["one"])
    w.write_packet(0, 20, b"ijk")
    w.flush()
    return out.getvalue()


GOOD = good_file()
SHB_LEN = 28
IDB_END = SHB_LEN + struct.unpack_from("<I", GOOD, SHB_LEN + 4)[0]


def parse(data: bytes, **kw):
    return list(pcapng.read_events(data, **kw))


def patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize(
    ("data", "offset", "words"),
    [
        (GOOD[:-3], len(GOOD) - 36, "truncated"),
        (patch(GOOD, IDB_END + 4, "<I", 30), IDB_END, "multiple of 4"),
        (patch(GOOD, IDB_END + 4, "<I", 8), IDB_END, "minimum"),
        (patch(GOOD, IDB_END + 4, "<I", 1 << 30), IDB_END, "over the limit"),
        (patch(GOOD, IDB_END + 4, "<I", 44), IDB_END, "trailing block length"),
        (patch(GOOD, 8, "<I", 0x11223344), 0, "byte-order magic"),
        (patch(GOOD, IDB_END + 8, "<I", 3), IDB_END, "interface 3"),
        (patch(GOOD, IDB_END + 20, "<I", 200), IDB_END, "runs past the block"),
        (patch(GOOD, IDB_END + 38, "<H", 400), IDB_END + 36, "past the end of its block"),
        (b"GARBAGE!" * 4, 0, "not a pcapng or pcap file"),
        (GOOD[SHB_LEN:], 0, "magic 0x00000001"),
        (patch(GOOD, 12, "<H", 2), 0, "major version"),
    ],
)
def test_malformed_input_names_offset_and_problem(data, offset, words):
    with pytest.raises(MalformedPcapng) as info:
        parse(data)
    assert info.value.offset == offset
    assert words in str(info.value)
    assert f"at byte {offset}" in str(info.value)
    assert isinstance(info.value, StmError)


def test_block_limit_is_configurable():
    parse(GOOD, max_block_size=64)
    with pytest.raises(MalformedPcapng, match="over the limit of 40"):
        parse(GOOD, max_block_size=40)


def test_the_reader_stays_failed():
    reader = Reader()
    reader.feed(b"\0" * 16)
    with pytest.raises(MalformedPcapng):
        reader.next_event()
    with pytest.raises(MalformedPcapng):
        reader.next_event()


def test_classic_pcap_variants():
    header = struct.pack("<IHHiIII", 0xA1B2CD34, 2, 4, 0, 0, 65535, 1)
    record = struct.pack("<IIII", 1, 2, 3, 3) + struct.pack("<IHBB", 1, 8, 4, 0) + b"abc"
    (pkt,) = pcapng.read(header + record)
    assert bytes(pkt.data) == b"abc" and pkt.flags == 0x02  # outgoing
    navtel = struct.pack("<IHHiIII", 0xA12B3C4D, 2, 4, 0, 0, 65535, 1)
    with pytest.raises(MalformedPcapng, match="Navtel"):
        parse(navtel)
    bad = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + struct.pack(
        "<IIII", 1, 2, 1 << 30, 10
    )
    with pytest.raises(MalformedPcapng, match="over the limit"):
        parse(bad)


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_malformed(data):
    with contextlib.suppress(MalformedPcapng):
        parse(data)


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_mutated_files_parse_or_raise_malformed(data):
    base = bytearray(data.draw(st.sampled_from([GOOD, good_file(">")])))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(base) - 1))
        base[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    for blob in (bytes(base), bytes(base[:cut])):
        for raw in (False, True):
            with contextlib.suppress(MalformedPcapng):
                parse(blob, raw_packets=raw)
