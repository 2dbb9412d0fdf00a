"""Tests of stm.tlv, the HEP3-compatible TLV codec of STM report format B.

Oracles independent of the code under test:

* byte vectors written by hand from the HEP3 layout (spec, not our encoder);
* ``_spec_parse``, a second parser written straight from the HEP3 layout, compared with
  ``decode_message`` on arbitrary bytes;
* tshark. Wireshark 4.0 has no HEP dissector of its own (sipcapture ships one only as a
  separate GPL Lua plugin, and scapy 2.8 has no HEP layer either), so the test loads a small
  Lua dissector written here from the HEP3 layout and lets Wireshark's own SIP dissector
  parse the payload chunk. That checks that a non-Python reader walks our chunks to the same
  fields, and that the SIP payload survives intact inside a real UDP/9060 packet.
"""

from __future__ import annotations

import ipaddress
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stm.errors import MalformedReport, UsageError
from stm.tlv import (
    GENERIC_VALUE_TYPES,
    HEP_VENDOR,
    MAX_MESSAGE_LENGTH,
    MAX_VALUE_LENGTH,
    STM_VALUE_TYPES,
    STM_VENDOR,
    Chunk,
    HepChunk,
    HepProto,
    HepVendor,
    Message,
    StmChunk,
    StmFragment,
    StmTimestamp,
    TlvFramer,
    ValueType,
    auth_key_matches,
    chunk_bytes,
    chunk_ipv4,
    chunk_ipv6,
    chunk_str,
    chunk_u8,
    chunk_u16,
    chunk_u32,
    decode_message,
    encode_message,
    frame_length,
    hep_chunk,
    stm_chunk,
    typed_value,
)

FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SIP_INVITE = (
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: Bob <sip:bob@example.com>\r\n"
    b"From: Alice <sip:alice@example.org>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.example.org\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@192.0.2.10>\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


# -- an independent parser, written from the HEP3 layout ----------------------------------


def _spec_parse(data: bytes) -> list[tuple[int, int, bytes]]:
    """HEP3: 'HEP3', u16 total length incl. header, chunks of u16 vendor, u16 type,
    u16 length incl. the 6-byte chunk header, value. ValueError on anything else."""
    if len(data) < 6 or data[0:4] != b"HEP3":
        raise ValueError("header")
    total = (data[4] << 8) | data[5]
    if total != len(data):
        raise ValueError("total length")
    out = []
    i = 6
    while i < total:
        if total - i < 6:
            raise ValueError("chunk header")
        vendor = (data[i] << 8) | data[i + 1]
        ctype = (data[i + 2] << 8) | data[i + 3]
        clen = (data[i + 4] << 8) | data[i + 5]
        if clen < 6 or i + clen > total:
            raise ValueError("chunk length")
        out.append((vendor, ctype, data[i + 6 : i + clen]))
        i += clen
    if not out:
        raise ValueError("no chunks")
    return out


def _triples(message: Message) -> list[tuple[int, int, bytes]]:
    return [(c.vendor, c.type, c.value) for c in message]


# -- strategies ------------------------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
chunks_st = st.builds(
    Chunk,
    vendor=st.one_of(st.sampled_from([HEP_VENDOR, STM_VENDOR]), u16),
    type=st.one_of(st.sampled_from(list(HepChunk) + list(StmChunk)), u16),
    value=st.one_of(st.binary(max_size=40), st.binary(min_size=200, max_size=2000)),
)
chunk_lists = st.lists(chunks_st, min_size=1, max_size=25)
small_chunks_st = st.builds(
    Chunk,
    vendor=st.sampled_from([HEP_VENDOR, STM_VENDOR, 1]),
    type=st.sampled_from([1, 3, 15, 0x0E, StmChunk.TIMESTAMP, 0x0600]),
    value=st.binary(max_size=12),
)
# Small messages for mutation fuzzing: cheap to generate, so many more mutations per second.
messages_st = st.lists(small_chunks_st, min_size=1, max_size=6).map(encode_message)


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(messages_st))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "add", "len", "chunklen"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "add":
            data += draw(st.binary(min_size=1, max_size=20))
        elif op == "len" and len(data) >= 6:
            data[4:6] = draw(u16).to_bytes(2, "big")
        elif op == "chunklen" and len(data) >= 12:
            data[10:12] = draw(u16).to_bytes(2, "big")
    return bytes(data)


# -- exact byte vectors ----------------------------------------------------------------------


def test_minimal_message_by_hand() -> None:
    # "HEP3", total 13, one chunk: vendor 0, type 1 (IP family), length 7, value 2 (IPv4).
    wire = bytes.fromhex("48455033 000d 0000 0001 0007 02")
    assert encode_message([chunk_u8(0, HepChunk.IP_FAMILY, 2)]) == wire
    message = decode_message(wire)
    assert message.chunks == (Chunk(0, 1, b"\x02"),)
    assert message.get(0, 1).as_u8() == 2


def test_generic_sip_message_by_hand() -> None:
    payload = b"OPTIONS sip:a SIP/2.0\r\n\r\n"  # 25 bytes
    wire = (
        bytes.fromhex(
            "48455033 007c"  # 6 + 7+7+10+10+8+8+10+10+7+10+31 = 124
            "0000 0001 0007 02"  # IP family IPv4
            "0000 0002 0007 11"  # IP protocol UDP (17)
            "0000 0003 000a c000020a"  # IPv4 source 192.0.2.10
            "0000 0004 000a c6336414"  # IPv4 destination 198.51.100.20
            "0000 0007 0008 13c4"  # source port 5060
            "0000 0008 0008 13c6"  # destination port 5062
            "0000 0009 000a 6553f100"  # seconds 1700000000
            "0000 000a 000a 0001e240"  # microseconds 123456
            "0000 000b 0007 01"  # protocol type SIP
            "0000 000c 000a 000007d1"  # capture agent ID 2001
            "0000 000f 001f"  # payload, 6 + 25 = 31
        )
        + payload
    )
    chunks = [
        hep_chunk(HepChunk.IP_FAMILY, 2),
        hep_chunk(HepChunk.IP_PROTO, 17),
        hep_chunk(HepChunk.IPV4_SRC, "192.0.2.10"),
        hep_chunk(HepChunk.IPV4_DST, ipaddress.IPv4Address("198.51.100.20")),
        hep_chunk(HepChunk.SRC_PORT, 5060),
        hep_chunk(HepChunk.DST_PORT, 5062),
        hep_chunk(HepChunk.TIMESTAMP_SEC, 1_700_000_000),
        hep_chunk(HepChunk.TIMESTAMP_USEC, 123_456),
        hep_chunk(HepChunk.PROTO_TYPE, HepProto.SIP),
        hep_chunk(HepChunk.CAPTURE_ID, 2001),
        hep_chunk(HepChunk.PAYLOAD, payload),
    ]
    assert encode_message(chunks) == wire
    message = decode_message(wire)
    assert message.chunks == tuple(chunks)
    assert _triples(message) == _spec_parse(wire)
    assert message.get(0, HepChunk.IPV4_DST).as_ipv4() == ipaddress.IPv4Address("198.51.100.20")
    assert message.get(0, HepChunk.DST_PORT).as_u16() == 5062
    assert message.get(0, HepChunk.TIMESTAMP_SEC).as_u32() == 1_700_000_000
    assert HepProto(message.get(0, HepChunk.PROTO_TYPE).as_u8()) is HepProto.SIP
    assert message.get(0, HepChunk.PAYLOAD).value == payload
    assert message.get(0, 0x0099) is None


def test_stm_chunks_by_hand() -> None:
    wire = bytes.fromhex(
        "48455033 0046"  # 6 + 8 + 23 + 12 + 11 + 10 = 70
        "5354 5303 0008 0001"  # LINKTYPE 1 (Ethernet)
        "5354 5304 0017 09 ffffffffffffffff 8000000000000000"  # TIMESTAMP 10**-9, max, min
        "5354 530b 000c 6869 c3a9 2121"  # COMMENT "hié!!" (6 bytes of UTF-8)
        "5354 530b 000b 616761696e"  # COMMENT "again"
        "5354 530c 000a 00000002"  # FLAGS: outbound
    )
    chunks = [
        stm_chunk(StmChunk.LINKTYPE, 1),
        StmTimestamp(9, 2**64 - 1, -(2**63)).to_chunk(),
        stm_chunk(StmChunk.COMMENT, "hié!!"),
        stm_chunk(StmChunk.COMMENT, "again"),
        stm_chunk(StmChunk.FLAGS, 2),
    ]
    assert encode_message(chunks) == wire
    message = decode_message(wire)
    assert [c.as_str() for c in message.get_all(STM_VENDOR, StmChunk.COMMENT)] == ["hié!!", "again"]
    assert StmTimestamp.from_chunk(message.get(STM_VENDOR, StmChunk.TIMESTAMP)) == (
        9,
        2**64 - 1,
        -(2**63),
    )
    assert typed_value(message.get(STM_VENDOR, StmChunk.FLAGS)) == 2


def test_registry_numbers() -> None:
    # Numbers as listed by OpenSIPS hep.h, heplify-server, hep-wireshark and voipmonitor.
    assert [int(c) for c in list(HepChunk)[:18]] == list(range(1, 0x13))
    assert HepChunk.AUTH_KEY == 0x0E and HepChunk.PAYLOAD == 0x0F
    assert HepChunk.COMPRESSED_PAYLOAD == 0x10 and HepChunk.CORRELATION_ID == 0x11
    assert [int(p) for p in list(HepProto)[:13]] == list(range(1, 14))
    assert HepProto.DIAMETER == 0x38 and HepProto.LOG == 0x64
    assert HepVendor.OPENSIPS == 3
    assert STM_VENDOR not in {int(v) for v in HepVendor}
    assert set(GENERIC_VALUE_TYPES) == {int(c) for c in HepChunk}
    assert GENERIC_VALUE_TYPES[HepChunk.CAPTURE_ID] is ValueType.U32
    assert set(STM_VALUE_TYPES) == {int(c) for c in StmChunk}
    # STM types stay clear of the generic type range (vendor-blind collectors).
    assert min(StmChunk) > max(HepChunk)


# -- decoder errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "truncated"),
        (b"HEP", "truncated"),
        (b"HEP3\x00", "truncated"),
        (b"HEP2\x00\x0d\x00\x00\x00\x01\x00\x07\x02", "protocol ID"),
        (b"GET / HTTP/1.1\r\n", "protocol ID"),
        (b"\x02\x10\x02\x11\x13\xc4\x13\xc4", "HEPv2"),
        (b"\x01\x10\x02\x11\x13\xc4\x13\xc4", "HEPv2"),
        (b"\x02", "HEPv2"),
        (b"HEP3\x00\x00", "below"),
        (b"HEP3\x00\x05", "below"),
        (b"HEP3\x00\x06", "empty chunk list"),
        (b"HEP3\x00\x07\x00", "truncated chunk header"),
        (b"HEP3\x00\x0d\x00\x00\x00\x01\x00\x07", "length field"),  # shorter than announced
        (b"HEP3\x00\x0d\x00\x00\x00\x01\x00\x07\x02\x00", "length field"),  # longer
        (b"HEP3\x00\x0c\x00\x00\x00\x01\x00\x05", "below"),  # chunk length 5
        (b"HEP3\x00\x0c\x00\x00\x00\x01\x00\x00", "below"),  # chunk length 0
        (b"HEP3\x00\x0d\x00\x00\x00\x01\x00\x08\x02", "past the end"),
        (b"HEP3\x00\x10\x00\x00\x00\x01\x00\x07\x02\x00\x00\x00", "truncated chunk header"),
    ],
)
def test_decode_rejects(data: bytes, needle: str) -> None:
    with pytest.raises(MalformedReport, match=needle):
        decode_message(data)
    with pytest.raises(ValueError):
        _spec_parse(data)


def test_decode_accepts_buffers() -> None:
    wire = encode_message([chunk_u8(0, 1, 2)])
    for data in (bytearray(wire), memoryview(wire), memoryview(b"xx" + wire)[2:]):
        assert decode_message(data).chunks == (Chunk(0, 1, b"\x02"),)
    with pytest.raises(UsageError):
        decode_message("HEP3")  # type: ignore[arg-type]


def test_empty_chunk_value_and_max_sizes() -> None:
    wire = encode_message([Chunk(7, 8, b"")])
    assert wire == b"HEP3\x00\x0c\x00\x07\x00\x08\x00\x06"
    assert decode_message(wire).chunks == (Chunk(7, 8, b""),)
    biggest = encode_message([Chunk(0, HepChunk.PAYLOAD, bytes(MAX_VALUE_LENGTH))])
    assert len(biggest) == MAX_MESSAGE_LENGTH
    assert decode_message(biggest).chunks[0].value == bytes(MAX_VALUE_LENGTH)


# -- encoder usage errors -------------------------------------------------------------------


def test_encode_usage_errors() -> None:
    with pytest.raises(UsageError, match="at least one chunk"):
        encode_message([])
    with pytest.raises(UsageError, match="exceeds"):
        encode_message([Chunk(0, 15, bytes(MAX_VALUE_LENGTH)), Chunk(0, 1, b"")])
    with pytest.raises(UsageError):
        Chunk(0, 15, bytes(MAX_VALUE_LENGTH + 1))
    with pytest.raises(UsageError):
        Chunk(0x10000, 1, b"")
    with pytest.raises(UsageError):
        Chunk(0, -1, b"")
    with pytest.raises(UsageError):
        Chunk(0, 1, "text")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        Chunk("0", 1, b"")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        encode_message([b"not a chunk"])  # type: ignore[list-item]
    assert Chunk(0, 1, bytearray(b"ab")).value == b"ab"
    assert type(Chunk(HepVendor.KAMAILIO, HepChunk.PAYLOAD, b"").type) is int


def test_typed_builders() -> None:
    assert chunk_u8(0, 1, 255).value == b"\xff"
    assert chunk_u16(0, 7, 0xABCD).value == b"\xab\xcd"
    assert chunk_u32(0, 12, 0xDEADBEEF).value == b"\xde\xad\xbe\xef"
    assert chunk_str(0, 0x11, "é").value == b"\xc3\xa9"
    assert chunk_bytes(0, 15, memoryview(b"xy")).value == b"xy"
    assert chunk_ipv4(0, 3, b"\xc0\x00\x02\x01").as_ipv4() == ipaddress.IPv4Address("192.0.2.1")
    v6 = ipaddress.IPv6Address("2001:db8::1")
    assert chunk_ipv6(0, 5, "2001:db8::1").value == v6.packed
    assert chunk_ipv6(0, 5, v6).as_ipv6() == v6
    for bad in (
        lambda: chunk_u8(0, 1, 256),
        lambda: chunk_u16(0, 1, -1),
        lambda: chunk_u32(0, 1, 2**32),
        lambda: chunk_u32(0, 1, "1"),
        lambda: chunk_str(0, 1, b"x"),
        lambda: chunk_str(0, 1, "\udc80"),
        lambda: chunk_ipv4(0, 3, "2001:db8::1"),
        lambda: chunk_ipv4(0, 3, v6),
        lambda: chunk_ipv6(0, 5, "192.0.2.1"),
        lambda: hep_chunk(HepChunk.SRC_PORT, 70000),
        lambda: hep_chunk(0x00FF, b""),
        lambda: stm_chunk(StmChunk.TIMESTAMP, 5),
        lambda: stm_chunk(StmChunk.FRAGMENT, b""),
        lambda: StmTimestamp(256, 0).to_chunk(),
        lambda: StmTimestamp(6, -1).to_chunk(),
        lambda: StmTimestamp(6, 0, 2**63).to_chunk(),
        lambda: StmFragment(1, 10, 11, b"xx").to_chunk(),
        lambda: StmFragment(1, 0, 2**32, b"").to_chunk(),
        lambda: StmFragment(1, 0, 10, 5).to_chunk(),
    ):
        with pytest.raises(UsageError):
            bad()


def test_typed_readers_reject_bad_values() -> None:
    for reader, value in (
        (Chunk.as_u8, b""),
        (Chunk.as_u8, b"\x00\x00"),
        (Chunk.as_u16, b"\x00"),
        (Chunk.as_u32, b"\x00\x00\x00"),
        (Chunk.as_ipv4, b"\x00" * 16),
        (Chunk.as_ipv6, b"\x00" * 4),
        (Chunk.as_str, b"\xff"),
        (StmTimestamp.from_chunk, b"\x00" * 16),
        (StmFragment.from_chunk, b"\x00" * 11),
        (StmFragment.from_chunk, struct.pack("!III", 1, 5, 6) + b"ab"),
    ):
        with pytest.raises(MalformedReport):
            reader(Chunk(0, 1, value))
    with pytest.raises(MalformedReport):
        typed_value(Chunk(0, HepChunk.SRC_PORT, b"\x01"))


def test_typed_value_dispatch() -> None:
    frag = StmFragment(7, 100, 300, b"abc")
    assert stm_chunk(StmChunk.FRAGMENT, frag).value[:12] == struct.pack("!III", 7, 100, 300)
    assert typed_value(frag.to_chunk()) == frag
    assert typed_value(hep_chunk(HepChunk.IPV6_SRC, "::1")) == ipaddress.IPv6Address("::1")
    assert typed_value(hep_chunk(HepChunk.CORRELATION_ID, "abc")) == "abc"
    assert typed_value(hep_chunk(HepChunk.AUTH_KEY, b"k")) == b"k"
    assert typed_value(Chunk(HepVendor.OPENSIPS, 1, b"\x02")) == b"\x02"
    assert typed_value(Chunk(0, 0x0FFF, b"raw")) == b"raw"
    assert typed_value(Chunk(STM_VENDOR, StmChunk.FRAME, b"ab")) == b"ab"
    assert typed_value(stm_chunk(StmChunk.SEQUENCE, 5)) == 5
    assert typed_value(stm_chunk(StmChunk.PRODUCER, "stm 0.1")) == "stm 0.1"


# -- auth key ---------------------------------------------------------------------------------


def test_auth_key_matches() -> None:
    base = [hep_chunk(HepChunk.PROTO_TYPE, HepProto.SIP)]
    with_key = Message((*base, hep_chunk(HepChunk.AUTH_KEY, b"s3cret")))
    assert auth_key_matches(with_key, b"s3cret")
    assert not auth_key_matches(with_key, b"s3cre")
    assert not auth_key_matches(with_key, b"s3cret!")
    assert not auth_key_matches(with_key, b"S3cret")
    assert not auth_key_matches(Message(base), b"s3cret")
    # The key of another vendor is not the generic auth key.
    assert not auth_key_matches(Message((*base, Chunk(STM_VENDOR, 0x0E, b"s3cret"))), b"s3cret")
    twice = Message((*with_key.chunks, hep_chunk(HepChunk.AUTH_KEY, b"s3cret")))
    assert not auth_key_matches(twice, b"s3cret")
    with pytest.raises(UsageError):
        auth_key_matches(with_key, b"")
    with pytest.raises(UsageError):
        auth_key_matches(with_key, "s3cret")  # type: ignore[arg-type]


# -- TCP framer -------------------------------------------------------------------------------


def _stream() -> tuple[bytes, list[Message]]:
    messages = [
        Message((hep_chunk(HepChunk.PROTO_TYPE, 1), hep_chunk(HepChunk.PAYLOAD, SIP_INVITE))),
        Message((Chunk(0, 1, b"\x02"),)),
        Message((stm_chunk(StmChunk.COMMENT, "x" * 300), Chunk(9, 9, b""))),
    ]
    return b"".join(m.encode() for m in messages), messages


def _drain(framer: TlvFramer) -> list[Message]:
    out = []
    while (message := framer.next_message()) is not None:
        out.append(message)
    return out


def test_framer_every_split_point_and_coalesced() -> None:
    data, expected = _stream()
    framer = TlvFramer()
    framer.receive_data(data)
    assert _drain(framer) == expected
    for cut in range(len(data) + 1):
        framer = TlvFramer()
        got = []
        for piece in (data[:cut], data[cut:]):
            if piece:  # b"" means end of stream
                framer.receive_data(piece)
                got += _drain(framer)
        framer.receive_data(b"")
        got += _drain(framer)
        assert got == expected, cut
        assert framer.buffered == 0


def test_framer_byte_by_byte() -> None:
    data, expected = _stream()
    framer = TlvFramer()
    got = []
    for i in range(len(data)):
        framer.receive_data(data[i : i + 1])
        got += _drain(framer)
    assert got == expected


@ROUND
@given(st.lists(st.lists(chunks_st, min_size=1, max_size=6), min_size=1, max_size=5), st.data())
def test_framer_random_splits(lists: list[list[Chunk]], data: st.DataObject) -> None:
    wires = [encode_message(chunks) for chunks in lists]
    stream = b"".join(wires)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    framer = TlvFramer()
    got = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        piece = stream[prev:cut]
        if piece:  # b"" would mean end of stream
            framer.receive_data(piece)
            got += _drain(framer)
        prev = cut
    got += _drain(framer)
    assert [m.encode() for m in got] == wires


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\n\r\n", b"X", b"HEX", b"\x02\x10\x02\x11\x00\x00", b"hep3\x00\x0c"],
)
def test_framer_garbage_is_final(garbage: bytes) -> None:
    data, _ = _stream()
    framer = TlvFramer()
    framer.receive_data(garbage + data)
    with pytest.raises(MalformedReport):
        framer.next_message()
    assert framer.failed
    for call in (framer.next_message, lambda: framer.receive_data(data), framer.next_message):
        with pytest.raises(MalformedReport, match="already failed"):
            call()


def test_framer_garbage_after_good_message() -> None:
    data, expected = _stream()
    framer = TlvFramer()
    framer.receive_data(data + b"JUNK")
    assert [framer.next_message() for _ in expected] == expected
    with pytest.raises(MalformedReport, match="protocol ID"):
        framer.next_message()
    with pytest.raises(MalformedReport, match="already failed"):
        framer.next_message()


@pytest.mark.parametrize("length", range(6))
def test_framer_lengths_0_to_5(length: int) -> None:
    framer = TlvFramer()
    framer.receive_data(b"HEP3" + length.to_bytes(2, "big") + bytes(20))
    with pytest.raises(MalformedReport, match="below"):
        framer.next_message()
    with pytest.raises(MalformedReport, match="already failed"):
        framer.next_message()


def test_framer_length_over_limit() -> None:
    framer = TlvFramer(max_buffer=100)
    framer.receive_data(b"HEP3\x00\x65")  # 101, header only: fails before the body arrives
    with pytest.raises(MalformedReport, match="max_buffer"):
        framer.next_message()
    framer = TlvFramer(max_buffer=100)
    ok = encode_message([Chunk(0, 15, bytes(88))])
    assert len(ok) == 100
    framer.receive_data(ok)
    assert framer.next_message() == decode_message(ok)
    with pytest.raises(UsageError):
        TlvFramer(max_buffer=11)


def test_framer_header_split_detects_garbage_early() -> None:
    framer = TlvFramer()
    framer.receive_data(b"HE")
    assert framer.next_message() is None
    framer.receive_data(b"Q")
    with pytest.raises(MalformedReport):
        framer.next_message()


def test_framer_eof_inside_message() -> None:
    data, expected = _stream()
    framer = TlvFramer()
    framer.receive_data(data[:-1])
    framer.receive_data(b"")
    assert _drain_until_error(framer) == expected[:-1]
    with pytest.raises(MalformedReport, match="already failed"):
        framer.next_message()
    framer = TlvFramer()
    framer.receive_data(b"")
    assert framer.next_message() is None
    with pytest.raises(UsageError):
        framer.receive_data(b"HEP3")


def _drain_until_error(framer: TlvFramer) -> list[Message]:
    out = []
    with pytest.raises(MalformedReport, match="inside a message"):
        while (message := framer.next_message()) is not None:
            out.append(message)
    return out


def test_framer_bad_chunks_in_sound_frame_are_skipped() -> None:
    bad = b"HEP3\x00\x0d\x00\x00\x00\x01\x00\x08\x02"  # chunk runs past its message
    empty = b"HEP3\x00\x06"
    data, expected = _stream()
    framer = TlvFramer()
    framer.receive_data(bad + data[: len(data) // 2])
    with pytest.raises(MalformedReport, match="past the end"):
        framer.next_message()
    assert not framer.failed
    framer.receive_data(data[len(data) // 2 :] + empty + data)
    got = []
    with pytest.raises(MalformedReport, match="empty chunk list"):
        while True:
            message = framer.next_message()
            assert message is not None
            got.append(message)
    assert got == expected
    assert _drain(framer) == expected


def test_framer_rejects_non_bytes() -> None:
    framer = TlvFramer()
    with pytest.raises(UsageError):
        framer.receive_data("HEP3")  # type: ignore[arg-type]


def test_frame_length() -> None:
    wire = encode_message([Chunk(0, 1, b"\x02")])
    assert frame_length(wire) == 13
    assert frame_length(wire + b"more") == 13
    assert frame_length(wire[:5]) is None
    assert frame_length(b"") is None
    with pytest.raises(MalformedReport):
        frame_length(b"HX")
    with pytest.raises(MalformedReport, match="HEPv2"):
        frame_length(b"\x02\x10")
    with pytest.raises(MalformedReport, match="below"):
        frame_length(b"HEP3\x00\x05")


# -- property tests -------------------------------------------------------------------------


@ROUND
@given(chunk_lists)
def test_round_trip(chunks: list[Chunk]) -> None:
    assume(sum(6 + len(c.value) for c in chunks) + 6 <= MAX_MESSAGE_LENGTH)
    wire = encode_message(chunks)
    assert frame_length(wire) == len(wire)
    message = decode_message(wire)
    assert message.chunks == tuple(chunks)
    assert _triples(message) == _spec_parse(wire)
    assert message.encode() == wire


def _check_against_oracle(data: bytes) -> None:
    try:
        expected = _spec_parse(data)
    except ValueError:
        expected = None
    try:
        message = decode_message(data)
    except MalformedReport:
        assert expected is None
        return
    assert _triples(message) == expected
    assert encode_message(message.chunks) == data


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    _check_against_oracle(data)
    _check_against_oracle(b"HEP3" + data)
    _check_against_oracle(b"HEP3" + (len(data) + 6).to_bytes(2, "big")[-2:] + data)


@FUZZ
@given(mutated_messages())
def test_mutated_messages(data: bytes) -> None:
    _check_against_oracle(data)


@FUZZ
@given(st.lists(st.one_of(mutated_messages(), st.binary(max_size=30)), max_size=5), st.data())
def test_framer_on_garbage_never_leaks_other_errors(
    parts: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    framer = TlvFramer(max_buffer=data.draw(st.integers(12, MAX_MESSAGE_LENGTH)))
    prev = 0
    for cut in [*cuts, len(stream), None]:
        chunk = b"" if cut is None else stream[prev:cut]
        if cut is not None and not chunk:
            continue
        try:
            framer.receive_data(chunk)
            while True:
                try:
                    if framer.next_message() is None:
                        break
                except MalformedReport:
                    if framer.failed:
                        raise
        except MalformedReport:
            assert framer.failed
            with pytest.raises(MalformedReport):
                framer.next_message()
            return
        if cut is not None:
            prev = cut
    assert framer.buffered == 0


# -- tshark oracle -----------------------------------------------------------------------------

ORACLE_LUA = r"""
-- Minimal HEP3 reader written from the HEP3 layout, for the stm test suite only.
local p = Proto("stmhep", "HEP3 test oracle")
local F = {
  id = ProtoField.string("stmhep.id", "Protocol ID"),
  len = ProtoField.uint16("stmhep.length", "Total length"),
  ok = ProtoField.uint8("stmhep.ok", "Walked exactly to the end"),
  vendor = ProtoField.uint16("stmhep.vendor", "Chunk vendor", base.HEX),
  ctype = ProtoField.uint16("stmhep.type", "Chunk type", base.HEX),
  family = ProtoField.uint8("stmhep.ip_family", "IP family"),
  ipproto = ProtoField.uint8("stmhep.ip_proto", "IP protocol"),
  src4 = ProtoField.ipv4("stmhep.src_ipv4", "Source IPv4"),
  dst4 = ProtoField.ipv4("stmhep.dst_ipv4", "Destination IPv4"),
  src6 = ProtoField.ipv6("stmhep.src_ipv6", "Source IPv6"),
  dst6 = ProtoField.ipv6("stmhep.dst_ipv6", "Destination IPv6"),
  sport = ProtoField.uint16("stmhep.src_port", "Source port"),
  dport = ProtoField.uint16("stmhep.dst_port", "Destination port"),
  tsec = ProtoField.uint32("stmhep.ts_sec", "Seconds"),
  tusec = ProtoField.uint32("stmhep.ts_usec", "Microseconds"),
  ptype = ProtoField.uint8("stmhep.proto_type", "Protocol type", base.DEC, {[1] = "SIP"}),
  capid = ProtoField.uint32("stmhep.capture_id", "Capture agent ID"),
  auth = ProtoField.string("stmhep.auth_key", "Auth key"),
  corr = ProtoField.string("stmhep.correlation_id", "Correlation ID"),
  payload = ProtoField.bytes("stmhep.payload", "Payload"),
}
p.fields = { F.id, F.len, F.ok, F.vendor, F.ctype, F.family, F.ipproto, F.src4, F.dst4,
  F.src6, F.dst6, F.sport, F.dport, F.tsec, F.tusec, F.ptype, F.capid, F.auth, F.corr,
  F.payload }
local by_type = { [1] = F.family, [2] = F.ipproto, [3] = F.src4, [4] = F.dst4,
  [5] = F.src6, [6] = F.dst6, [7] = F.sport, [8] = F.dport, [9] = F.tsec, [10] = F.tusec,
  [11] = F.ptype, [12] = F.capid, [14] = F.auth, [15] = F.payload, [17] = F.corr }

function p.dissector(tvb, pinfo, tree)
  if tvb:len() < 6 or tvb(0, 4):string() ~= "HEP3" then return 0 end
  local total = tvb(4, 2):uint()
  local t = tree:add(p, tvb())
  t:add(F.id, tvb(0, 4))
  t:add(F.len, tvb(4, 2))
  local off = 6
  local ptype, payload = nil, nil
  while off + 6 <= total and off + 6 <= tvb:len() do
    local vendor = tvb(off, 2):uint()
    local ctype = tvb(off + 2, 2):uint()
    local clen = tvb(off + 4, 2):uint()
    if clen < 6 or off + clen > total then break end
    local c = t:add(tvb(off, clen), string.format("Chunk %04x/%04x", vendor, ctype))
    c:add(F.vendor, tvb(off, 2))
    c:add(F.ctype, tvb(off + 2, 2))
    if vendor == 0 and clen > 6 and by_type[ctype] then
      local v = tvb(off + 6, clen - 6)
      c:add(by_type[ctype], v)
      if ctype == 11 then ptype = v:uint() end
      if ctype == 15 then payload = v end
    end
    off = off + clen
  end
  if off == total and total == tvb:len() then t:add(F.ok, tvb(4, 2), 1) end
  pinfo.cols.protocol = "STMHEP"
  if ptype == 1 and payload then
    Dissector.get("sip"):call(payload:tvb(), pinfo, tree)
  end
  return tvb:len()
end

DissectorTable.get("udp.port"):add(9060, p)
"""

TSHARK_FIELDS = [
    "frame.number",
    "stmhep.id",
    "stmhep.length",
    "stmhep.ok",
    "stmhep.ip_family",
    "stmhep.ip_proto",
    "stmhep.src_ipv4",
    "stmhep.dst_ipv4",
    "stmhep.src_ipv6",
    "stmhep.dst_ipv6",
    "stmhep.src_port",
    "stmhep.dst_port",
    "stmhep.ts_sec",
    "stmhep.ts_usec",
    "stmhep.proto_type",
    "stmhep.capture_id",
    "stmhep.auth_key",
    "stmhep.correlation_id",
    "stmhep.vendor",
    "sip.Method",
    "sip.Call-ID",
    "sip.CSeq",
]


def _sip_message(version: int) -> bytes:
    family, src, dst = (
        (2, "192.0.2.10", "198.51.100.20") if version == 4 else (10, "2001:db8::10", "2001:db8::20")
    )
    src_type, dst_type = (
        (HepChunk.IPV4_SRC, HepChunk.IPV4_DST)
        if version == 4
        else (HepChunk.IPV6_SRC, HepChunk.IPV6_DST)
    )
    return encode_message(
        [
            hep_chunk(HepChunk.IP_FAMILY, family),
            hep_chunk(HepChunk.IP_PROTO, 17),
            hep_chunk(src_type, src),
            hep_chunk(dst_type, dst),
            hep_chunk(HepChunk.SRC_PORT, 5060),
            hep_chunk(HepChunk.DST_PORT, 5062),
            hep_chunk(HepChunk.TIMESTAMP_SEC, 1_700_000_000),
            hep_chunk(HepChunk.TIMESTAMP_USEC, 123_456),
            hep_chunk(HepChunk.PROTO_TYPE, HepProto.SIP),
            hep_chunk(HepChunk.CAPTURE_ID, 2001),
            hep_chunk(HepChunk.AUTH_KEY, b"myHep"),
            stm_chunk(StmChunk.LINKTYPE, 1),
            StmTimestamp(9, 1_700_000_000_123_456_789).to_chunk(),
            hep_chunk(HepChunk.CORRELATION_ID, "a84b4c76e66710@pc33.example.org"),
            hep_chunk(HepChunk.PAYLOAD, SIP_INVITE),
        ]
    )


def test_tshark_dissects_sip_inside_our_message(tmp_path: Path) -> None:
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark (Wireshark) is not installed: the tshark oracle cannot run")
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    from scapy.utils import wrpcap

    messages = [_sip_message(4), _sip_message(6)]
    packets = [
        Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=40000, dport=9060) / Raw(m)
        for m in messages
    ]
    pcap = tmp_path / "hep.pcap"
    wrpcap(str(pcap), packets)
    lua = tmp_path / "stmhep.lua"
    lua.write_text(ORACLE_LUA)
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    base = [tshark, "-n", "-r", str(pcap), "-X", f"lua_script:{lua}"]
    fields = subprocess.run(
        [*base, "-T", "fields", "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=,"]
        + [arg for name in TSHARK_FIELDS for arg in ("-e", name)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert fields.returncode == 0, fields.stderr
    rows = [
        dict(zip(TSHARK_FIELDS, line.split("|"), strict=True))
        for line in fields.stdout.splitlines()
    ]
    assert len(rows) == 2, fields.stdout + fields.stderr
    for row, message in zip(rows, messages, strict=True):
        assert row["stmhep.id"] == "HEP3"
        assert int(row["stmhep.length"]) == len(message)
        assert row["stmhep.ok"] == "1"
        assert row["stmhep.ip_proto"] == "17"
        assert row["stmhep.src_port"] == "5060"
        assert row["stmhep.dst_port"] == "5062"
        assert row["stmhep.ts_sec"] == "1700000000"
        assert row["stmhep.ts_usec"] == "123456"
        assert row["stmhep.proto_type"] == "1"
        assert row["stmhep.capture_id"] == "2001"
        assert row["stmhep.auth_key"] == "myHep"
        assert row["stmhep.correlation_id"] == "a84b4c76e66710@pc33.example.org"
        # 13 generic chunks and 2 of our vendor, which the reader skips.
        vendors = [int(v, 16) for v in row["stmhep.vendor"].split(",")]
        assert vendors.count(0) == 13 and vendors.count(STM_VENDOR) == 2
        # Wireshark's own SIP dissector parsed the payload chunk.
        assert row["sip.Method"] == "INVITE"
        assert row["sip.Call-ID"] == "a84b4c76e66710@pc33.example.org"
        assert row["sip.CSeq"] == "314159 INVITE"
    assert rows[0]["stmhep.ip_family"] == "2"
    assert (rows[0]["stmhep.src_ipv4"], rows[0]["stmhep.dst_ipv4"]) == (
        "192.0.2.10",
        "198.51.100.20",
    )
    assert rows[1]["stmhep.ip_family"] == "10"
    assert (rows[1]["stmhep.src_ipv6"], rows[1]["stmhep.dst_ipv6"]) == (
        "2001:db8::10",
        "2001:db8::20",
    )
    verbose = subprocess.run(
        [*base, "-V"], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert verbose.returncode == 0, verbose.stderr
    assert "Lua Error" not in verbose.stdout
    assert "Malformed" not in verbose.stdout
    assert verbose.stdout.count("Session Initiation Protocol (INVITE)") == 2
    assert "Request-Line: INVITE sip:bob@example.com SIP/2.0" in verbose.stdout
