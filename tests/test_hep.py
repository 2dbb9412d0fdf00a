"""Format B reports end to end: TlvEncoder -> HEP3 messages -> TlvDecoder -> PcapngSink.

Sans-IO throughout (no sockets): messages are plain bytes handed from encoder to decoder,
dropped, duplicated, reordered and cut on purpose. The generic HEP chunks are checked
independently of stm's own parsing (``stm.tlv.decode_message`` for the layout, scapy for
what the frame holds); foreign HEP3 built by hand is rebuilt into frames tshark dissects.
"""

from __future__ import annotations

import io
import ipaddress
import random
import shutil
import subprocess
from collections import Counter
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loss_schedule import expected_counters, schedule

from stm import frames, pcapng, tlv
from stm.pcapng import Interface, Packet
from stm.pcapng import constants as c
from stm.report import (
    STM_PEN,
    AutoDecoder,
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
    TlvDecoder,
    TlvEncoder,
)
from stm.sink import PcapngSink
from stm.tlv import STM_VENDOR, HepChunk, StmChunk, hep_chunk

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO / "samples").glob("*.pcap*"))
ARRIVAL = (2988, (STM_PEN, b"timestamp=arrival"))
NOW = 1_700_000_000.25  # wall clock handed to the sink for packets without a timestamp
EVENT_TYPES = (Packets, Gap, Duplicate, Reordered, Restarted, FragmentsExpired, Malformed)
MASK32 = 0xFFFFFFFF
SESSION = b"\x5e\xed" * 4

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(
    TSHARK is None, reason="tshark (Wireshark 4.x) not installed: independent check skipped"
)

ETH = Interface(c.LINKTYPE_ETHERNET, 0, ((c.IF_TSRESOL, 9),))
RAW = Interface(c.LINKTYPE_RAW, 0, ())

# (transport, mtu, ip_header): every size budget the encoder knows.
CONFIGS = [
    ("udp", 1500, 20),
    ("udp", 1500, 40),
    ("udp", 9000, 20),
    ("udp", 9000, 40),
    ("tcp", 0, 0),
]
CONFIG_IDS = [f"{t}-{m}-{h}" if t == "udp" else t for t, m, h in CONFIGS]


# -- helpers ----------------------------------------------------------------------------------


def budget(transport: str, mtu: int = 1500, ip_header: int = 20) -> int:
    """The largest message allowed: a UDP payload within the MTU, or a whole HEP3 message."""
    return 0xFFFF if transport == "tcp" else mtu - ip_header - 8


def encoder(transport: str = "udp", mtu: int = 1500, ip_header: int = 20, **kwargs) -> TlvEncoder:
    kwargs.setdefault("session", SESSION)
    if transport == "tcp":
        return TlvEncoder(kwargs.pop("producer", "probe"), transport="tcp", **kwargs)
    return TlvEncoder(
        kwargs.pop("producer", "probe"), transport="udp", mtu=mtu, ip_header=ip_header, **kwargs
    )


def encode(packets, transport: str = "udp", mtu: int = 1500, ip_header: int = 20, **kwargs):
    """Run packets through a TlvEncoder; (encoder, every message)."""
    enc = encoder(transport, mtu, ip_header, **kwargs)
    out: list[bytes] = []
    now = 0.0
    for pkt in packets:
        out += enc.add(pkt, now)
        assert enc.poll(now) == [] and enc.deadline() is None  # nothing ever lingers
        now += 0.001
    assert enc.flush() == []
    assert enc.stats.datagrams == len(out)
    assert enc.stats.bytes == sum(map(len, out))
    limit = budget(transport, mtu, ip_header)
    assert all(len(m) <= limit for m in out), (max(map(len, out)), limit)
    return enc, out


def decode(messages, decoder: TlvDecoder | None = None, now: float = 0.0, source="test"):
    decoder = decoder or TlvDecoder()
    for m in messages:
        decoder.receive_message(m, source, now)
    return decoder, decoder.events()


def delivered(events) -> list[Packet]:
    return [p for e in events if isinstance(e, Packets) for p in e.packets]


def sink_file(events, *, now: float = NOW) -> bytes:
    out = io.BytesIO()
    sink = PcapngSink(out)
    for e in events:
        if isinstance(e, Packets):
            sink.write(e.stream, e.packets, now=now)
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


def sequence_of(message: bytes) -> int:
    chunk = tlv.decode_message(message).get(STM_VENDOR, StmChunk.SEQUENCE)
    assert chunk is not None
    return chunk.as_u32()


def framed(stream: bytes, cuts: list[int]) -> list[bytes]:
    """Feed a byte stream to a TlvFramer in pieces cut at ``cuts``; every message, re-encoded."""
    framer = tlv.TlvFramer()
    out = []
    start = 0
    for end in [*sorted(cuts), len(stream)]:
        if end == start:
            continue  # b"" would mean the end of the stream
        framer.receive_data(stream[start:end])
        start = end
        while (m := framer.next_message()) is not None:
            out.append(m.encode())
    framer.receive_data(b"")
    assert framer.next_message() is None and framer.buffered == 0
    return out


def round_trip(path, transport: str, mtu: int, ip_header: int):
    src = list(pcapng.read(path))
    enc, msgs = encode(src, transport, mtu, ip_header)
    # Sequence numbers are contiguous, fragments included: the receiver sees no gap.
    assert [sequence_of(m) for m in msgs] == list(range(len(msgs)))
    if transport == "tcp":  # a TCP sender writes them back to back: frame them again
        cuts = random.Random(len(msgs)).sample(range(sum(map(len, msgs))), min(50, len(msgs)))
        assert framed(b"".join(msgs), cuts) == msgs
    dec, events = decode(msgs)
    assert {type(e) for e in events} <= {Packets}, [e for e in events if type(e) is not Packets]
    assert dec.pending_fragments() == 0 and dec.malformed == 0
    got = list(pcapng.read(sink_file(events)))
    assert_relayed(src, got, f"{path} {transport} mtu={mtu} ip_header={ip_header}")
    return src, enc, msgs


def tshark(*args: str) -> str:
    assert TSHARK is not None
    r = subprocess.run(
        [TSHARK, *args], capture_output=True, text=True, encoding="utf-8", timeout=120
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


# -- 1. corpus and sample round trips --------------------------------------------------------


@pytest.mark.parametrize(("transport", "mtu", "ip_header"), CONFIGS, ids=CONFIG_IDS)
def test_corpus_round_trip(corpus_dir, transport, mtu, ip_header):
    files = sorted(corpus_dir.rglob("*.pcap*"))
    assert files, f"no captures under {corpus_dir}"
    spb = fragmented = 0
    for path in files:
        src, enc, _ = round_trip(path, transport, mtu, ip_header)
        spb += sum(p.ts is None for p in src)
        fragmented += enc.stats.fragmented
    assert spb > 0, "the corpus should hold Simple Packet Blocks (pcapng-test-generator)"
    assert fragmented > 0  # at least the 80,066-byte BIG TCP frame


@pytest.mark.parametrize(("transport", "mtu", "ip_header"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_round_trip(path, transport, mtu, ip_header):
    src, enc, msgs = round_trip(path, transport, mtu, ip_header)
    assert src
    big = sum(p.caplen > budget(transport, mtu, ip_header) for p in src)
    assert enc.stats.fragmented >= big
    if transport == "tcp":
        assert len(msgs) == len(src) and enc.stats.fragmented == 0


# -- 2. the generic chunks, checked independently ---------------------------------------------


def _generic_fields(message: bytes) -> dict:
    m = tlv.decode_message(message)
    out = {}
    for chunk in m:
        key = (chunk.vendor, chunk.type)
        assert key not in out or key == (STM_VENDOR, StmChunk.COMMENT), f"repeated {key}"
        out[key] = chunk
    return out


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_generic_chunks_match_scapy(path):
    scapy_utils = pytest.importorskip("scapy.utils", reason="scapy not installed")
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    src = list(pcapng.read(path))
    theirs = scapy_utils.rdpcap(str(path))  # timestamps read by scapy, not by us
    assert len(theirs) == len(src)
    enc = encoder("tcp", producer="generic", stream_id=0xC0FFEE)
    g = HepChunk
    checked = 0
    for i, (p, sp) in enumerate(zip(src, theirs, strict=True)):
        (message,) = enc.add(p)
        f = _generic_fields(message)
        frame = bytes(p.data)
        e = Ether(frame)
        l4 = e[UDP] if UDP in e else e[TCP]
        ip = e[IP] if IP in e else e[IPv6]
        where = (path.name, i)
        assert f[0, g.IP_FAMILY].as_u8() == (2 if isinstance(ip, IP) else 10), where
        assert f[0, g.IP_PROTO].as_u8() == (17 if isinstance(l4, UDP) else 6), where
        if isinstance(ip, IP):
            assert str(f[0, g.IPV4_SRC].as_ipv4()) == ip.src
            assert str(f[0, g.IPV4_DST].as_ipv4()) == ip.dst
            assert (0, g.IPV6_SRC) not in f and (0, g.IPV6_DST) not in f
        else:
            assert f[0, g.IPV6_SRC].as_ipv6() == ipaddress.IPv6Address(ip.src)
            assert f[0, g.IPV6_DST].as_ipv6() == ipaddress.IPv6Address(ip.dst)
            assert (0, g.IPV4_SRC) not in f and (0, g.IPV4_DST) not in f
        assert f[0, g.SRC_PORT].as_u16() == l4.sport, where
        assert f[0, g.DST_PORT].as_u16() == l4.dport, where
        t = Decimal(sp.time)
        sec = int(t)
        assert f[0, g.TIMESTAMP_SEC].as_u32() == sec, where
        assert f[0, g.TIMESTAMP_USEC].as_u32() == int((t - sec) * 1_000_000), where
        assert f[0, g.PROTO_TYPE].as_u8() == tlv.HepProto.SIP, where
        assert f[0, g.CAPTURE_ID].as_u32() == 0xC0FFEE == f[STM_VENDOR, StmChunk.STREAM_ID].as_u32()
        payload = f[0, g.PAYLOAD].value
        assert payload == bytes(l4.payload), where
        assert f[STM_VENDOR, StmChunk.FRAME_HEADER].value + payload == frame, where
        assert (STM_VENDOR, StmChunk.FRAME) not in f
        assert (0, g.AUTH_KEY) not in f
        checked += bool(payload)
    assert checked == (3 if "jumbo" in path.name else 11)  # the SIP messages


def test_non_ip_frame_travels_whole():
    arp = Interface(c.LINKTYPE_ETHERNET, 0, ())
    data = bytes.fromhex("ffffffffffff00005e00530a0806") + bytes(28)
    (message,) = encoder().add(Packet(arp, 5, data, 60))
    f = _generic_fields(message)
    assert f[STM_VENDOR, StmChunk.FRAME].value == data
    assert not [k for k in f if k[0] == 0 and k[1] in (HepChunk.PAYLOAD, HepChunk.IP_FAMILY)]
    (got,) = delivered(decode([message])[1])
    assert (bytes(got.data), got.origlen, got.ts) == (data, 60, 5)


def test_payload_chunk_excludes_ethernet_padding():
    pytest.importorskip("scapy", reason="scapy not installed")
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    eth = Interface(c.LINKTYPE_ETHERNET, 0, ())
    mac = {"src": "00:00:5e:00:53:0a", "dst": "00:00:5e:00:53:14"}
    ack = Ether(**mac) / IP(src="192.0.2.10", dst="198.51.100.20") / TCP(sport=49152, dport=5060)
    udp = Ether(**mac) / IP(src="192.0.2.10", dst="198.51.100.20") / UDP() / b"hi"
    for pkt, payload in ((ack, b""), (udp, b"hi")):
        frame = bytes(pkt) + bytes(60 - len(pkt))  # padded to the Ethernet minimum
        (message,) = encoder().add(Packet(eth, 1, frame, 60))
        assert _generic_fields(message)[0, HepChunk.PAYLOAD].value == payload


# -- 3. oversize: truncate, drop, fragment ----------------------------------------------------


def big_packet(i: int, size: int, iface: Interface = ETH, **kw) -> Packet:
    return Packet(iface, 10**18 + i, random.Random(i).randbytes(size), size + 10, **kw)


def small_packets(n: int, rng: random.Random, iface: Interface = ETH) -> list[Packet]:
    return [
        Packet(iface, 1_700_000_000 * 10**9 + i, rng.randbytes(rng.randrange(40, 700)), 700)
        for i in range(n)
    ]


@pytest.mark.parametrize(("mtu", "ip_header"), [(1500, 20), (1280, 40), (9000, 40)])
def test_oversize_truncate_keeps_origlen_and_fits(mtu, ip_header):
    pkts = [
        big_packet(1, 12_000, comments=("short",), flags=1),
        big_packet(2, 70_000, comments=("c" * 6000,)),
        big_packet(3, 100),
        Packet(ETH, None, b"s" * 12_000, 12_000),  # an SPB cannot say it was cut: fragmented
    ]
    assert all(frames.split(c.LINKTYPE_ETHERNET, p.data) is None for p in pkts)
    enc, msgs = encode(pkts, "udp", mtu, ip_header, oversize="truncate")
    assert (enc.stats.truncated, enc.stats.fragmented) == (2, 1)
    got = delivered(decode(msgs)[1])
    assert len(got) == 4
    by_ts = {p.ts: p for p in got}
    for p in pkts[:3]:
        q = by_ts[p.ts]
        assert q.origlen == p.origlen
        assert q.caplen <= p.caplen and bytes(q.data) == bytes(p.data)[: q.caplen]
    assert by_ts[pkts[0].ts].caplen < 12_000
    assert by_ts[pkts[0].ts].comments == ("short",) and by_ts[pkts[0].ts].flags == 1
    if mtu < 6000:  # too long to keep: the bytes matter more
        assert by_ts[pkts[1].ts].comments == ()
    assert by_ts[pkts[2].ts] == pkts[2]
    (spb,) = (p for p in got if p.ts is None)
    assert bytes(spb.data) == b"s" * 12_000


@pytest.mark.parametrize(("mtu", "ip_header"), [(1500, 20), (9000, 40)])
def test_oversize_truncate_ip_frame(mtu, ip_header):
    src = list(pcapng.read(REPO / "samples" / "sip_jumbo_udp_ipv4.pcap"))
    assert src[0].caplen == 10_625
    enc, msgs = encode(src, "udp", mtu, ip_header, oversize="truncate")
    got = delivered(decode(msgs)[1])
    assert (enc.stats.truncated, enc.stats.fragmented) == (1, 0)
    assert len(msgs) == 3
    assert got[0].origlen == 10_625 and got[0].caplen < 10_625
    assert bytes(got[0].data) == bytes(src[0].data)[: got[0].caplen]


def test_oversize_drop_counts():
    rng = random.Random(5)
    pkts = small_packets(30, rng)
    for i in (3, 7, 8, 20):
        pkts[i] = big_packet(i, 2000 + i * 100)
    jumbo = list(pcapng.read(REPO / "samples" / "sip_jumbo_udp_ipv4.pcap"))
    pkts += jumbo  # an IP frame too
    enc, msgs = encode(pkts, oversize="drop")
    assert enc.stats.dropped == 5 and enc.stats.packets == 33
    assert enc.stats.datagrams == len(msgs) == 28
    got = delivered(decode(msgs)[1])
    assert [bytes(p.data) for p in got] == [
        bytes(p.data) for i, p in enumerate(pkts) if i not in (3, 7, 8, 20, 30)
    ]


def _reassemble_shuffled(pkt: Packet, transport, mtu, ip_header, seed: int):
    enc, msgs = encode([pkt], transport, mtu, ip_header)
    assert enc.stats.fragmented == 1 and len(msgs) > 1
    assert [sequence_of(m) for m in msgs] == list(range(len(msgs)))
    shuffled = random.Random(seed).sample(msgs, len(msgs))
    dec, events = decode(shuffled)
    assert not [e for e in events if isinstance(e, (Malformed, FragmentsExpired, Duplicate))]
    assert dec.pending_fragments() == 0
    (got,) = delivered(events)
    assert got == pkt and bytes(got.data) == bytes(pkt.data)
    return msgs


@pytest.mark.parametrize(("transport", "mtu", "ip_header"), CONFIGS, ids=CONFIG_IDS)
def test_bigtcp_80k_fragments_reassemble_shuffled(corpus_dir, transport, mtu, ip_header):
    path = next(corpus_dir.rglob("bigtcp_80k.pcap"), None)
    if path is None:
        pytest.skip("bigtcp_80k.pcap not in the corpus")
    (pkt,) = pcapng.read(path)
    pkt.data = bytes(pkt.data)
    assert pkt.caplen == 80_066
    for seed in range(3):
        _reassemble_shuffled(pkt, transport, mtu, ip_header, seed)


@pytest.mark.parametrize("size", [65_535, 65_536, 80_066, 200_000])
@pytest.mark.parametrize(
    ("transport", "mtu", "ip_header"), [*CONFIGS[1::2], CONFIGS[-1]], ids=[*CONFIG_IDS[1::2], "tcp"]
)
def test_synthetic_huge_frame(size, transport, mtu, ip_header):
    """Raw IPv4 TCP frames of 64 KiB and more (IP total length 0, as BIG TCP sends)."""
    payload = random.Random(size).randbytes(size - 40)
    data = frames.synthesize(4, 6, bytes([192, 0, 2, 1]), bytes([198, 51, 100, 2]), 1, 2, payload)
    assert len(data) == size
    pkt = Packet(RAW, 123, data, size + 7, flags=3, comments=("big ✓",))
    _reassemble_shuffled(pkt, transport, mtu, ip_header, size)


def test_missing_fragment_expires():
    _, msgs = encode([big_packet(1, 20_000)], producer="lossy", stream_id=7)
    assert len(msgs) > 3
    dec = TlvDecoder(fragment_timeout=2.0)
    stream = Stream("lossy", 7)
    for m in msgs[:2] + msgs[3:]:
        dec.receive_message(m, None, 10.0)
    events = dec.events()
    assert [type(e) for e in events] == [Gap]  # the lost middle piece
    assert dec.pending_fragments() == 1
    dec.expire(11.9)
    assert dec.events() == [] and dec.pending_fragments() == 1
    dec.expire(12.0)
    assert dec.events() == [FragmentsExpired(stream, 1)]
    assert dec.pending_fragments() == 0
    assert dec.stats(stream).fragments_expired == 1
    dec.receive_message(msgs[2], None, 13.0)  # too late: nothing to complete
    assert not delivered(dec.events())


# -- 4. foreign HEP3, built by hand ------------------------------------------------------------

V4 = ("192.0.2.10", "198.51.100.20")
V6 = ("2001:db8::10", "2001:db8::20")
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z


def sip_payloads() -> list[bytes]:
    """The SIP messages of the UDP sample, as scapy dissects them."""
    scapy_utils = pytest.importorskip("scapy.utils", reason="scapy not installed")
    from scapy.layers.inet import UDP

    return [bytes(p[UDP].payload) for p in scapy_utils.rdpcap(str(SAMPLES_BY_NAME["udp4"]))]


SAMPLES_BY_NAME = {"udp4": REPO / "samples" / "sip_udp_ipv4.pcap"}


def foreign(
    payload: bytes,
    *,
    family: int = 4,
    proto: int = 17,
    sport: int = 5060,
    dport: int = 5060,
    capture: int = 77,
    sec: int = T0,
    usec: int = 0,
    extra=(),
    drop=(),
    reverse: bool = False,
) -> bytes:
    """A HEP3 message as a third-party agent sends it: generic chunks only."""
    src, dst = V4 if family == 4 else V6
    if reverse:
        src, dst = dst, src
    g = HepChunk
    chunks = [
        hep_chunk(g.IP_FAMILY, tlv.IP_FAMILY_IPV4 if family == 4 else tlv.IP_FAMILY_IPV6),
        hep_chunk(g.IP_PROTO, proto),
        hep_chunk(g.IPV4_SRC if family == 4 else g.IPV6_SRC, src),
        hep_chunk(g.IPV4_DST if family == 4 else g.IPV6_DST, dst),
        hep_chunk(g.SRC_PORT, sport),
        hep_chunk(g.DST_PORT, dport),
        hep_chunk(g.TIMESTAMP_SEC, sec),
        hep_chunk(g.TIMESTAMP_USEC, usec),
        hep_chunk(g.PROTO_TYPE, tlv.HepProto.SIP),
        hep_chunk(g.CAPTURE_ID, capture),
        *extra,
        hep_chunk(g.PAYLOAD, payload),
    ]
    return tlv.encode_message([ch for ch in chunks if ch.type not in drop])


def _first_line(payload: bytes) -> tuple[str, str]:
    """(method, status code) of a SIP message, one of them empty."""
    words = payload.split(b"\r\n", 1)[0].decode().split()
    return ("", words[1]) if words[0] == "SIP/2.0" else (words[0], "")


def _check_foreign_with_tshark(path: Path, expected: list[tuple[str, ...]]) -> None:
    checks = [
        "-o", "udp.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE",
        "-o", "ip.check_checksum:TRUE",
    ]  # fmt: skip
    fields = ["sip.Method", "sip.Status-Code", "ip.src", "ipv6.src", "udp.srcport", "tcp.srcport"]
    out = tshark(
        "-r", str(path), *checks, "-Y", "sip", "-T", "fields",
        *(x for f in fields for x in ("-e", f)),
    )  # fmt: skip
    rows = [tuple(line.split("\t")) for line in out.splitlines()]
    assert rows == expected
    bad = tshark("-r", str(path), *checks, "-Y", "_ws.malformed || _ws.expert.severity >= error")
    assert bad == ""


@needs_tshark
def test_foreign_hep_becomes_raw_ip_that_dissects_as_sip(tmp_path):
    payloads = sip_payloads()
    assert len(payloads) == 11
    messages, expected = [], []
    for i, payload in enumerate(payloads):
        for family in (4, 6):
            for proto in (17, 6):
                sport = 40_000 + 10 * i + family + proto  # one TCP connection per message
                messages.append(
                    foreign(
                        payload, family=family, proto=proto, sport=sport, sec=T0 + i, usec=1000 * i
                    )
                )
                method, status = _first_line(payload)
                src = (V4 if family == 4 else V6)[0]
                expected.append(
                    (method, status, src if family == 4 else "", src if family == 6 else "",
                     str(sport) if proto == 17 else "", str(sport) if proto == 6 else "")
                )  # fmt: skip
    dec, events = decode(messages, source=("192.0.2.99", 9060))
    assert [type(e) for e in events] == [Packets] * len(messages)
    got = delivered(events)
    for i, p in enumerate(got):
        assert p.linktype == c.LINKTYPE_RAW
        assert p.ts == (T0 + i // 4) * 10**6 + 1000 * (i // 4)
        assert p.origlen == p.caplen
        assert bytes(p.data).endswith(payloads[i // 4])
        assert frames.split(c.LINKTYPE_RAW, p.data).dport == 5060
    (stream,) = {e.stream for e in events}
    assert stream == Stream("hep:192.0.2.99", 77)
    assert dec.stats(stream).packets == len(messages)
    path = tmp_path / "foreign.pcapng"
    path.write_bytes(sink_file(events))
    back = list(pcapng.read(path))
    assert [bytes(p.data) for p in back] == [bytes(p.data) for p in got]
    assert {p.linktype for p in back} == {c.LINKTYPE_RAW}
    _check_foreign_with_tshark(path, expected)


@needs_tshark
@pytest.mark.parametrize("family", [4, 6])
def test_foreign_hep_tcp_connection_dissects_as_sip(tmp_path, family):
    """Real agents send every SIP message of a TCP connection with the same addresses and
    ports: each must still dissect as SIP (a TCP sequence number running per flow), not as
    a retransmission of the first."""
    payloads = sip_payloads()
    messages, expected = [], []
    for i, payload in enumerate(payloads):
        method, status = _first_line(payload)
        response = bool(status)  # requests 49152 -> 5060, responses back
        ports = (5060, 49152) if response else (49152, 5060)
        messages.append(
            foreign(payload, family=family, proto=6, sport=ports[0], dport=ports[1],
                    sec=T0 + i, reverse=response)
        )  # fmt: skip
        src = (V4 if family == 4 else V6)[int(response)]
        expected.append(
            (method, status, src if family == 4 else "", src if family == 6 else "", "",
             str(ports[0]))
        )  # fmt: skip
    _, events = decode(messages, source=("192.0.2.99", 9060))
    got = delivered(events)
    assert len(got) == len(payloads)
    path = tmp_path / "tcp.pcapng"
    path.write_bytes(sink_file(events))
    _check_foreign_with_tshark(path, expected)


def test_foreign_timestamps_and_streams():
    payload = b"OPTIONS sip:a@example.com SIP/2.0\r\n\r\n"
    msgs = [
        foreign(payload, capture=1, sec=5, usec=999_999),
        foreign(payload, capture=1, sec=2**32 - 1, usec=1),
        foreign(payload, capture=2, drop=(HepChunk.TIMESTAMP_SEC, HepChunk.TIMESTAMP_USEC)),
        foreign(payload, capture=3, drop=(HepChunk.CAPTURE_ID,)),
    ]
    _, events = decode(msgs, source=("198.51.100.7", 1234))
    assert [p.ts for p in delivered(events)] == [5_999_999, (2**32 - 1) * 10**6 + 1, 0, T0 * 10**6]
    assert [e.stream for e in events] == [
        Stream("hep:198.51.100.7", 1),
        Stream("hep:198.51.100.7", 1),
        Stream("hep:198.51.100.7", 2),
        Stream("hep:198.51.100.7", 0),
    ]
    names = {p.interface.name for p in delivered(events)}
    assert names == {"hep-1", "hep-2", "hep-0"}


def _good_message() -> bytes:
    return foreign(b"OPTIONS sip:a@example.com SIP/2.0\r\n\r\n")


def _malformed_cases() -> dict[str, bytes]:
    good = _good_message()
    n = len(good)
    return {
        "HEPv2": bytes([2, 16, 2, 17]) + bytes(12) + b"payload",
        "HEPv1": bytes([1, 16, 2, 17]) + bytes(12),
        "other magic": b"HEP4" + good[4:],
        "short": b"HEP",
        "length field too big": good[:4] + (n + 1).to_bytes(2, "big") + good[6:],
        "length field too small": good[:4] + (n - 1).to_bytes(2, "big") + good[6:],
        "length field below header": good[:4] + (3).to_bytes(2, "big") + good[6:],
        "chunk header cut": good[:4] + (n + 3).to_bytes(2, "big") + good[6:] + b"\x00\x00\x00",
        "chunk value cut": good[:4] + (n - 1).to_bytes(2, "big") + good[6:-1],
        "chunk past end": good[:10] + (0xFFFF).to_bytes(2, "big") + good[12:],
        "chunk length below 6": good[:10] + (5).to_bytes(2, "big") + good[12:],
        "zero chunk length": good[:10] + (0).to_bytes(2, "big") + good[12:],
        "zero-length chunk list": tlv.PROTOCOL_ID + (6).to_bytes(2, "big"),
        "compressed payload only": foreign(
            b"", extra=[hep_chunk(HepChunk.COMPRESSED_PAYLOAD, b"\x1f\x8b\x08\x00")],
            drop=(HepChunk.PAYLOAD,),
        ),
        "bad family": tlv.encode_message(
            [hep_chunk(HepChunk.IP_FAMILY, 7), *tlv.decode_message(good).chunks[1:]]
        ),
        "empty family": tlv.encode_message(
            [tlv.Chunk(0, HepChunk.IP_FAMILY, b""), *tlv.decode_message(good).chunks[1:]]
        ),
        "port of 3 bytes": tlv.encode_message(
            [tlv.Chunk(0, HepChunk.SRC_PORT, b"abc") if ch.type == HepChunk.SRC_PORT else ch
             for ch in tlv.decode_message(good)]
        ),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(_malformed_cases()))
def test_malformed_messages(name):
    data = _malformed_cases()[name]
    for dec in (TlvDecoder(), AutoDecoder()):
        dec.receive_message(data, "src", 1.0)
        events = dec.events()
        assert [type(e) for e in events] == [Malformed], (name, events)
        assert events[0].source == "src" and dec.malformed == 1
    if name.startswith("HEPv"):
        assert f"HEPv{data[0]}" in events[0].reason
        auto = AutoDecoder()
        auto.receive_datagram(data, "src")  # a version byte sends it to the TLV decoder
        assert "HEPv" in auto.events()[0].reason


# Required chunks: a message without one of them cannot be turned into a frame.
FOREIGN_REQUIRED = [
    HepChunk.IP_FAMILY, HepChunk.IP_PROTO, HepChunk.IPV4_SRC, HepChunk.IPV4_DST,
    HepChunk.SRC_PORT, HepChunk.DST_PORT, HepChunk.PAYLOAD,
]  # fmt: skip
OURS_REQUIRED = [
    StmChunk.LINKTYPE, StmChunk.INTERFACE, StmChunk.ORIGINAL_LENGTH, StmChunk.FRAME_HEADER,
]  # fmt: skip


@pytest.mark.parametrize("missing", FOREIGN_REQUIRED, ids=[m.name for m in FOREIGN_REQUIRED])
def test_foreign_message_missing_chunk_is_malformed(missing):
    dec = TlvDecoder()
    dec.receive_message(foreign(b"SIP/2.0 200 OK\r\n\r\n", drop=(missing,)), "src")
    assert [type(e) for e in dec.events()] == [Malformed]


def test_foreign_family_without_its_addresses_is_malformed():
    """IP family 10 (IPv6) with IPv4 address chunks: the IPv6 ones are missing."""
    chunks = list(tlv.decode_message(foreign(b"SIP/2.0 200 OK\r\n\r\n", family=4)))
    chunks[0] = hep_chunk(HepChunk.IP_FAMILY, tlv.IP_FAMILY_IPV6)
    dec = TlvDecoder()
    dec.receive_message(tlv.encode_message(chunks), "src")
    assert [type(e) for e in dec.events()] == [Malformed]


@pytest.mark.parametrize(
    ("family", "ctype", "value"),
    [
        (4, HepChunk.IPV4_SRC, b"\xc0\x00\x02"),
        (4, HepChunk.IPV4_DST, b"\xc6\x33\x64\x14\x00"),
        (6, HepChunk.IPV6_SRC, bytes(15)),
        (6, HepChunk.IPV6_DST, bytes(17)),
    ],
    ids=["v4-src-3", "v4-dst-5", "v6-src-15", "v6-dst-17"],
)
def test_foreign_address_of_wrong_size_is_malformed(family, ctype, value):
    good = foreign(b"SIP/2.0 200 OK\r\n\r\n", family=family)
    chunks = [
        tlv.Chunk(0, ctype, value) if ch.type == ctype else ch for ch in tlv.decode_message(good)
    ]
    dec = TlvDecoder()
    dec.receive_message(tlv.encode_message(chunks), "src")
    assert [type(e) for e in dec.events()] == [Malformed]


@pytest.mark.parametrize("missing", OURS_REQUIRED, ids=[m.name for m in OURS_REQUIRED])
def test_our_message_missing_chunk_is_malformed(missing):
    (message,) = encoder().add(next(iter(pcapng.read(SAMPLES_BY_NAME["udp4"]))))
    chunks = [
        ch for ch in tlv.decode_message(message) if (ch.vendor, ch.type) != (STM_VENDOR, missing)
    ]
    dec = TlvDecoder()
    dec.receive_message(tlv.encode_message(chunks), "src")
    assert [type(e) for e in dec.events()] == [Malformed]


def test_auth_key():
    key = b"s3cret \x00 key"
    pkts = list(pcapng.read(SAMPLES_BY_NAME["udp4"]))
    _, right = encode(pkts, producer="right", auth_key=key)
    assert all(tlv.auth_key_matches(tlv.decode_message(m), key) for m in right)
    _, wrong = encode(pkts[:3], producer="wrong", auth_key=b"s3cret \x00 kez")
    _, missing = encode(pkts[:2], producer="missing")
    hand = [
        foreign(b"SIP/2.0 200 OK\r\n\r\n", extra=[hep_chunk(HepChunk.AUTH_KEY, key)]),
        foreign(b"SIP/2.0 200 OK\r\n\r\n", extra=[hep_chunk(HepChunk.AUTH_KEY, key[:-1])]),
        foreign(b"SIP/2.0 200 OK\r\n\r\n"),
    ]
    for dec in (TlvDecoder(auth_key=key), AutoDecoder(auth_key=key)):
        _, events = decode([*right, *wrong, *missing, *hand], dec)
        assert len(delivered(events)) == len(pkts) + 1
        assert {e.stream.producer for e in events if isinstance(e, Packets)} == {
            "right",
            "hep:test",
        }
        bad = [e for e in events if isinstance(e, Malformed)]
        assert len(bad) == dec.malformed == dec.rejected_auth == 3 + 2 + 2
        assert all("auth" in e.reason for e in bad)
    # Without a key configured, every message passes: the key chunk is just carried.
    _, events = decode([*right, *wrong, *missing, *hand])
    assert len(delivered(events)) == len(pkts) + 3 + 2 + 3


# -- 5. loss, duplicates, reordering, restart, stream bound -----------------------------------


def build_stream(seed: int, sequence: int = 0, n_packets: int = 300):
    rng = random.Random(seed)
    pkts = small_packets(n_packets, rng)
    _, msgs = encode(pkts, sequence=sequence, producer="sched")
    assert len(msgs) == n_packets  # one message per packet
    return msgs, [bytes(p.data) for p in pkts]


@pytest.mark.parametrize("sequence", [0, 2**32 - 3, 2**32 - 150])
@pytest.mark.parametrize("seed", range(3))
def test_loss_duplicates_reordering(seed, sequence):
    msgs, per_msg = build_stream(seed, sequence)
    n = len(msgs)
    order, dropped = schedule(n, random.Random(seed * 7919 + 1))
    dup, reord, gaps = expected_counters(order)
    assert dup and reord and dropped  # the schedule does all three
    dec, events = decode(msgs[i] for i in order)
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
    want = Counter(per_msg[i] for i in range(n) if i not in dropped)
    assert Counter(bytes(p.data) for p in delivered(events)) == want
    assert stats.datagrams == n - len(dropped) and stats.packets == sum(want.values())
    if sequence > 2**31:
        assert any(e.sequence < 100 for e in packets_events)  # did wrap


def test_sender_restart():
    rng = random.Random(3)
    _, first = encode(small_packets(30, rng), producer="p", stream_id=5, session=b"first!!!")
    _, second = encode(small_packets(30, rng), producer="p", stream_id=5, session=b"second!!")
    dec = TlvDecoder()
    decode(first[:2] + first[3:], dec)
    stream = Stream("p", 5)
    before = dec.stats(stream).as_dict()
    assert before["lost"] == 1 and before["restarts"] == 0
    _, events = decode(second, dec)
    assert isinstance(events[0], Restarted) and events[0].stream == stream
    assert not [e for e in events if isinstance(e, (Gap, Reordered, Duplicate))]
    after = dec.stats(stream).as_dict()
    assert after["restarts"] == 1
    assert after["lost"] == 1  # counters continue across the restart
    assert after["datagrams"] == before["datagrams"] + len(second)
    assert after["packets"] == before["packets"] + len(delivered(events)) == 60 - 1


def test_sequence_far_behind_same_session_is_a_restart():
    _, msgs = encode(small_packets(200, random.Random(4)), producer="far")
    dec = TlvDecoder(window=8)
    _, events = decode(msgs[20:30] + msgs[2:3], dec)
    assert isinstance(events[-2], Restarted) and isinstance(events[-1], Packets)
    assert dec.stats(next(iter(dec.streams))).restarts == 1


def test_streams_are_bounded():
    pkt = small_packets(1, random.Random(8))
    dec = TlvDecoder(max_streams=16)
    for key in range(100):
        _, msgs = encode(pkt, producer="many", stream_id=key, session=key.to_bytes(8, "big"))
        dec.receive_message(msgs[0])
        assert len(dec.streams) <= 16
    assert dec.evicted_streams == 84
    assert {s.key for s in dec.streams} == set(range(84, 100))
    assert len(delivered(dec.events())) == 100


def test_forged_capture_id_flood_is_bounded():
    dec = TlvDecoder(max_streams=32)
    for key in range(5000):
        dec.receive_message(foreign(b"x", capture=key), ("203.0.113.9", 9060))
    assert len(dec.streams) == 32
    assert dec.evicted_streams == 5000 - 32
    assert len(delivered(dec.events())) == 5000


def test_forged_capture_id_flood_does_not_grow_interface_cache():
    dec = TlvDecoder(max_streams=32)
    for key in range(6000):
        dec.receive_message(foreign(b"x", capture=key), ("203.0.113.9", 9060))
    dec.events()
    assert len(dec._interfaces) <= 4097


# -- 6. AutoDecoder: format A and format B on one socket --------------------------------------


def encode_format_a(packets, **kwargs) -> list[bytes]:
    enc = Encoder(kwargs.pop("producer", "alpha"), session=0x5EED, **kwargs)
    out: list[bytes] = []
    now = 0.0
    for pkt in packets:
        out += enc.add(pkt, now)
        out += enc.poll(now)
        now += 0.001
    return out + enc.flush()


def test_auto_decoder_mixes_formats():
    a_src = list(pcapng.read(REPO / "samples" / "sip_tcp_ipv6.pcapng"))
    b_src = list(pcapng.read(REPO / "samples" / "sip_udp_ipv4.pcap"))
    b_src += list(pcapng.read(REPO / "samples" / "sip_jumbo_udp_ipv4.pcap"))  # fragmented
    a_msgs = encode_format_a(a_src, producer="alpha", stream_id=1)
    _, b_msgs = encode(b_src, producer="beta", stream_id=2)
    assert a_msgs and b_msgs
    rng = random.Random(6)
    arrivals = [list(a_msgs), list(b_msgs)]
    merged = []
    while any(arrivals):
        q = rng.choice([a for a in arrivals if a])
        merged.append(q.pop(0))
    junk_a = b"\x30\x00\x88\xb5" + b"not a GRE/pcapng payload"
    junk_b = tlv.PROTOCOL_ID + (40).to_bytes(2, "big") + b"short"
    merged[5:5] = [junk_a]
    merged[9:9] = [junk_b]
    dec = AutoDecoder()
    for d in merged:
        dec.receive_datagram(d, "mix", 0.0)
    events = dec.events()
    bad = [e for e in events if isinstance(e, Malformed)]
    assert len(bad) == dec.malformed == 2
    assert not [e for e in events if isinstance(e, (Gap, Duplicate, Reordered, Restarted))]
    assert dec.pending_fragments() == 0
    assert "length field" in bad[1].reason and "length field" not in bad[0].reason
    assert set(dec.streams) == {Stream("alpha", 1), Stream("beta", 2)}
    for stream, src in ((Stream("alpha", 1), a_src), (Stream("beta", 2), b_src)):
        mine = [e for e in events if isinstance(e, Packets) and e.stream == stream]
        assert_relayed(src, list(pcapng.read(sink_file(mine))), str(stream))


@pytest.mark.parametrize(
    "cls",
    [
        Decoder,
        pytest.param(
            AutoDecoder,
        ),
    ],
)
def test_pending_byte_accounting_after_expiry(cls):
    a_big = [big_packet(i, 8_000) for i in range(3)]
    a_msgs = encode_format_a(a_big, producer="alpha", stream_id=1)
    per = len(a_msgs) // 3
    assert len(a_msgs) == 3 * per  # each packet in its own datagrams
    dec = cls(max_pending_bytes=20_000, fragment_timeout=1.0)
    dec.receive_datagram(a_msgs[0], "x", 0.0)  # packet 0 never completes
    dec.expire(5.0)
    assert [type(e) for e in dec.events()] == [FragmentsExpired]
    # Packets 1 and 2 interleaved: 16 KB pending at most, under the 20 KB bound.
    p1, p2 = a_msgs[per : 2 * per], a_msgs[2 * per :]
    for m1, m2 in zip(p1, p2, strict=False):
        dec.receive_datagram(m1, "x", 6.0)
        dec.receive_datagram(m2, "x", 6.0)
    events = dec.events()
    assert not [e for e in events if isinstance(e, FragmentsExpired)]
    assert [bytes(p.data) for p in delivered(events)] == [bytes(p.data) for p in a_big[1:]]


# -- 7. fuzzing the decoders ------------------------------------------------------------------


def _pool() -> tuple[list[bytes], list[bytes]]:
    rng = random.Random(13)
    sll = Interface(c.LINKTYPE_LINUX_SLL, 262144, ((c.IF_NAME, "any"),))
    pkts = [
        *small_packets(3, rng),
        *list(pcapng.read(SAMPLES_BY_NAME["udp4"]))[:3],
        *list(pcapng.read(REPO / "samples" / "sip_tcp_ipv6.pcapng"))[3:5],
        Packet(sll, 5, b"x" * 50, 60, flags=1, comments=("c",), options=((c.EPB_QUEUE, 3),)),
        Packet(ETH, None, b"spb" * 10, 30),
        big_packet(1, 3000),
    ]
    _, ours = encode(pkts, auth_key=b"k")
    hand = [
        foreign(b"INVITE sip:x SIP/2.0\r\n\r\n", family=f, proto=p) for f in (4, 6) for p in (6, 17)
    ]
    gre = encode_format_a(pkts[:6], producer="alpha")
    return ours + hand, gre


POOL_B, POOL_A = _pool()


def check_survives(*messages: bytes, auto: bool = False, auth: bool = False) -> None:
    """Only allowed events, counters that add up, and no exception."""
    dec = (AutoDecoder if auto else TlvDecoder)(auth_key=b"k" if auth else None)
    malformed = 0
    for m in messages:
        if auto:
            dec.receive_datagram(m, "fuzz", 1.0)
        else:
            dec.receive_message(m, "fuzz", 1.0)
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


FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.binary(max_size=1500), st.booleans())
def test_fuzz_random_bytes(data, auto):
    check_survives(data, auto=auto)
    check_survives(POOL_B[0], data, POOL_A[0], auto=True)
    check_survives(tlv.PROTOCOL_ID + (6 + len(data)).to_bytes(2, "big") + data)


def _chunk_spans(message: bytes) -> list[tuple[int, int]]:
    """(start, end) of each chunk's value in a well-formed message."""
    spans, pos = [], tlv.HEADER_LENGTH
    while pos < len(message):
        length = int.from_bytes(message[pos + 4 : pos + 6], "big")
        spans.append((pos + 6, pos + length))
        pos += length
    return spans


@FUZZ
@given(
    st.sampled_from(POOL_B),
    st.sampled_from(["flip", "resize", "cut"]),
    st.integers(0, 2**64),
    st.booleans(),
    st.booleans(),
)
def test_fuzz_mutated_values(original, how, seed, auto, auth):
    """Chunk values flipped, shortened or lengthened (lengths fixed up), messages cut.

    The mutation is drawn from ``seed`` (few hypothesis draws keep 3000 examples quick).
    """
    rng = random.Random(seed)
    spans = [(a, b) for a, b in _chunk_spans(original) if b > a]
    if how == "cut":
        mutated = original[: rng.randrange(len(original))]
    else:
        start, end = rng.choice(spans)
        value = bytearray(original[start:end])
        if how == "flip":
            for _ in range(rng.randint(1, 8)):
                value[rng.randrange(len(value))] ^= 1 << rng.randrange(8)
        else:
            value = value[: rng.randint(0, len(value))] + rng.randbytes(rng.randint(0, 20))
        delta = len(value) - (end - start)
        head = bytearray(original[: start - 6])
        head[4:6] = (len(original) + delta).to_bytes(2, "big")
        chunk_head = bytearray(original[start - 6 : start])
        chunk_head[4:6] = (end - start + 6 + delta).to_bytes(2, "big")
        mutated = bytes(head + chunk_head + value) + original[end:]
    check_survives(original, mutated, original, auto=auto, auth=auth)


def test_fuzz_mutated_messages():
    """Any byte of a real message: headers too (a chunk can lose its type or swallow another).

    A seeded loop rather than hypothesis, so every run tries the same 3000 mutations.
    """
    rng = random.Random(2024)
    pool = POOL_B + POOL_A
    for _ in range(3000):
        original = rng.choice(pool)
        mutated = bytearray(original)
        how = rng.choice(["flip", "truncate", "splice", "version"])
        if how == "flip":
            for _ in range(rng.randint(1, 8)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        elif how == "truncate":
            mutated = mutated[: rng.randrange(len(mutated))]
        elif how == "version":
            mutated[0] = rng.choice([1, 2, 0x30, 0xB0, ord("H")])
        else:
            pos = rng.randint(0, len(mutated))
            mutated[pos:pos] = rng.randbytes(rng.randint(1, 64))
        if original[:4] == tlv.PROTOCOL_ID and how != "truncate":  # reach the chunks
            mutated[4:6] = len(mutated).to_bytes(2, "big")
        check_survives(original, bytes(mutated), original, auto=True)
        if original[:4] == tlv.PROTOCOL_ID:
            check_survives(original, bytes(mutated), original)


def _with_sequence(message: bytes, seq: int) -> bytes:
    """The same message with another SEQUENCE value (chunk order kept)."""
    chunks = [
        tlv.Chunk(STM_VENDOR, StmChunk.SEQUENCE, (seq & MASK32).to_bytes(4, "big"))
        if (ch.vendor, ch.type) == (STM_VENDOR, StmChunk.SEQUENCE)
        else ch
        for ch in tlv.decode_message(message)
    ]
    return tlv.encode_message(chunks)


def _outcome(events) -> list:
    """What a decoder made of one message: its packets (exactly) and Malformed events."""
    out: list = []
    for e in events:
        if isinstance(e, Packets):
            out += [(p.key(), p.options, p.interface) for p in e.packets]
        elif isinstance(e, Malformed):
            out.append("malformed")
    return out


def _warm_and_cold(message: bytes, primer: bytes) -> tuple[list, list]:
    """Decode ``message`` after ``primer`` of the same stream (so the decoder knows the
    stream's static chunks and may take its fast path) and with a fresh decoder."""
    warm = TlvDecoder()
    warm.receive_message(primer)
    warm.events()
    warm.receive_message(message)
    cold = TlvDecoder()
    cold.receive_message(message)
    return _outcome(warm.events()), _outcome(cold.events())


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_warm_decoder_equals_fresh_decoder(path):
    """Each message decoded by a decoder that has seen the stream and by a fresh one."""
    src = list(pcapng.read(path))
    _, msgs = encode(src, "udp", 9000, 20)
    for m in msgs:
        if tlv.decode_message(m).get(STM_VENDOR, StmChunk.FRAGMENT) is not None:
            continue
        warm, cold = _warm_and_cold(m, _with_sequence(m, sequence_of(m) + 500))
        assert warm == cold and len(cold) == 1 and cold[0] != "malformed"


OURS_WHOLE = [
    m
    for m in POOL_B
    if tlv.decode_message(m).get(STM_VENDOR, StmChunk.STREAM_ID) is not None
    and tlv.decode_message(m).get(STM_VENDOR, StmChunk.FRAGMENT) is None
]


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(OURS_WHOLE), st.booleans(), st.integers(0, 2**64))
def test_fuzz_warm_decoder_equals_fresh_decoder(original, resize, seed):
    """Mutated values: the same packets, or Malformed, however warm the decoder is."""
    rng = random.Random(seed)
    spans = [(a, b) for a, b in _chunk_spans(original) if b > a]
    start, end = rng.choice(spans)
    value = bytearray(original[start:end])
    if resize:
        value = value[: rng.randint(0, len(value))] + rng.randbytes(rng.randint(0, 12))
    else:
        for _ in range(rng.randint(1, 4)):
            value[rng.randrange(len(value))] ^= 1 << rng.randrange(8)
    delta = len(value) - (end - start)
    head = bytearray(original[: start - 6])
    head[4:6] = (len(original) + delta).to_bytes(2, "big")
    chunk_head = bytearray(original[start - 6 : start])
    chunk_head[4:6] = (end - start + 6 + delta).to_bytes(2, "big")
    mutated = bytes(head + chunk_head + value) + original[end:]
    primer = _with_sequence(original, sequence_of(original) + 500)
    warm, cold = _warm_and_cold(mutated, primer)
    if warm == [] and cold:
        return  # the mutation hit the sequence number: a duplicate of the primer
    assert warm == cold


# -- 8. TlvFramer over a TCP byte stream -------------------------------------------------------


def _stream_messages() -> tuple[list[bytes], list[Packet]]:
    src = [p for path in SAMPLES for p in pcapng.read(path)]
    src.append(
        Packet(RAW, 99, frames.synthesize(4, 6, bytes(4), bytes(4), 1, 2, bytes(70_000)), 70_040)
    )
    _, msgs = encode(src, "tcp", producer="framed")
    assert len(msgs) > len(src)  # the 70 KB frame is in pieces
    return msgs, src


@pytest.mark.parametrize("seed", range(6))
def test_framer_random_splits_give_the_same_packets(seed):
    msgs, src = _stream_messages()
    stream = b"".join(msgs)
    rng = random.Random(seed)
    n_cuts = [1, 10, 100, 1000, 5000, len(stream) // 3][seed]
    cuts = rng.sample(range(1, len(stream)), n_cuts)
    again = framed(stream, cuts)
    assert again == msgs
    _, one_by_one = decode(msgs)
    _, streamed = decode(again)
    a, b = delivered(one_by_one), delivered(streamed)
    assert len(a) == len(b) == len(src)
    for p, q, s in zip(a, b, src, strict=True):
        assert p == q == s
        assert p.interface == q.interface


def test_framer_byte_by_byte():
    msgs = encode(list(pcapng.read(SAMPLES_BY_NAME["udp4"]))[:4], "tcp")[1]
    stream = b"".join(msgs)
    assert framed(stream, list(range(1, len(stream)))) == msgs
