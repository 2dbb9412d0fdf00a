"""wireshark/stm.lua, run by tshark on report traffic as a collector would capture it.

The captures are made by one module fixture (``captures``). The report traffic of both
formats is what ``stm-send SAMPLE --output FILE`` writes (over UDP, and format B over TCP
too); should stm-send lack ``--output``, the same is made with the library
(``stm.report.Encoder``, ``TlvEncoder``). What stm-send does not write is made with the
library: several messages in one TCP segment, other link types and protocols inside,
foreign HEP3, reports corrupted, cut short, dropped, repeated and reordered. The oracle for
what tshark must show is stm's own decoder: each report's producer, sequence number and the
SIP first lines of its packets.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stm import frames, pcapng, tlv
from stm.gre import internet_checksum
from stm.report import AutoDecoder, Encoder, TlvDecoder, TlvEncoder
from stm.report.events import Packets

ROOT = Path(__file__).resolve().parents[1]
LUA = ROOT / "wireshark" / "stm.lua"
SAMPLES = ROOT / "samples"
TSHARK = shutil.which("tshark")

pytestmark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")

COLLECTOR = bytes([10, 0, 0, 2])
SENDER = bytes([10, 0, 0, 1])
T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in microseconds
AGG = "|"  # tshark's aggregator for repeated fields (no SIP first line here has one)

# (sample, producer, byte order of the format-A section)
SOURCES = [
    ("sip_udp_ipv4.pcap", "amf-1", "<"),
    ("sip_tcp_ipv6.pcapng", "smf-1", ">"),
    ("sip_udp_ipv6.pcapng", "amf-1", "<"),
    ("sip_jumbo_udp_ipv4.pcap", "upf-1", "<"),
]


# -- frames around the reports ----------------------------------------------------------------


def _ipv4(proto: int, src: bytes, dst: bytes, transport: bytes, ident: int) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(transport), ident & 0xFFFF, 0x4000, 64, proto, 0,
        src, dst,
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    eth = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00"
    if src == COLLECTOR:
        eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
    return eth + header + transport


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, proto, length)


def udp_frame(payload: bytes, dport: int, sport: int = 50000, ident: int = 0) -> bytes:
    head = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    csum = internet_checksum(_pseudo(SENDER, COLLECTOR, 17, 8 + len(payload)) + head + payload)
    head = head[:6] + struct.pack("!H", csum or 0xFFFF)
    return _ipv4(17, SENDER, COLLECTOR, head + payload, ident)


def tcp_frame(
    payload: bytes,
    flags: int,
    seq: int,
    ack: int,
    dport: int,
    to_collector: bool = True,
    client_port: int = 40000,
) -> bytes:
    src, dst = (SENDER, COLLECTOR) if to_collector else (COLLECTOR, SENDER)
    sport, dport = (client_port, dport) if to_collector else (dport, client_port)
    head = struct.pack("!HHIIHHHH", sport, dport, seq, ack, 5 << 12 | flags, 65535, 0, 0)
    csum = internet_checksum(_pseudo(src, dst, 6, 20 + len(payload)) + head + payload)
    head = head[:16] + struct.pack("!H", csum) + head[18:]
    return _ipv4(6, src, dst, head + payload, seq)


SYN, ACK, PSH = 0x02, 0x10, 0x08


def tcp_stream(segments: list[bytes], dport: int) -> list[bytes]:
    """A connection to the collector: handshake, then one frame per segment."""
    cs, ss = 0x1000, 0x9000
    out = [
        tcp_frame(b"", SYN, cs, 0, dport),
        tcp_frame(b"", SYN | ACK, ss, cs + 1, dport, to_collector=False),
        tcp_frame(b"", ACK, cs + 1, ss + 1, dport),
    ]
    seq = cs + 1
    for seg in segments:
        out.append(tcp_frame(seg, PSH | ACK, seq, ss + 1, dport))
        seq += len(seg)
    return out


def write_capture(
    path: Path, frame_list: list[bytes], snaplen: dict | None = None, linktype: int = 1
) -> None:
    """One frame per packet, 1 ms apart; ``snaplen`` (frame number -> bytes kept) cuts
    some short, as ``tcpdump -s`` does, keeping their original length."""
    snaplen = snaplen or {}
    with open(path, "wb") as f:
        w = pcapng.Writer(f)
        w.add_interface(linktype, 262144, name="collector", tsresol=6)
        for i, data in enumerate(frame_list):
            kept = data[: snaplen.get(i + 1, len(data))]
            w.write_packet(0, T0 + i * 1000, kept, origlen=len(data))
        w.flush()


# -- what each report holds, by stm's own decoder ---------------------------------------------


def sip_first_line(packet) -> str | None:
    """The SIP request or status line of a packet, if it carries the start of one."""
    split = frames.split(packet.interface.linktype, bytes(packet.data))
    if split is None:
        return None
    payload = bytes(packet.data[split.offset : split.end])
    line = payload.split(b"\r\n", 1)[0].decode("ascii", "replace")
    if line.startswith("SIP/2.0 ") or line.endswith(" SIP/2.0"):
        return line
    return None


def report_lines(decoder, feed, report: bytes) -> list[str]:
    """SIP first lines of the packets one report carries (none for a fragment)."""
    feed(report)
    lines = []
    while (event := decoder.next_event()) is not None:
        if isinstance(event, Packets):
            lines += [x for x in map(sip_first_line, event.packets) if x]
    return lines


def is_fragment_a(report: bytes) -> bool:
    return struct.pack("<I", 0x40000BAD) in report or struct.pack(">I", 0x40000BAD) in report


def is_fragment_b(message: bytes) -> bool:
    chunks = tlv.decode_message(message).chunks
    return any(c.vendor == tlv.STM_VENDOR and c.type == tlv.StmChunk.FRAGMENT for c in chunks)


@dataclass
class Report:
    producer: str
    seq: int
    sip: list[str]  # SIP first lines the report carries, in order
    fragment: bool = False
    proto_type: int | None = None  # format B: the HEP protocol type chunk


@dataclass
class Capture:
    path: Path
    reports: dict[int, list[Report]] = field(default_factory=dict)  # by frame number
    malformed: dict[int, str] = field(default_factory=dict)  # frame -> what is wrong
    notes: dict[int, str] = field(default_factory=dict)  # frame -> expected expert


def encode_gre(sample: str, producer: str, byte_order: str, batch: bool = True) -> list[bytes]:
    """Reports as stm-send makes them: as many packets as fit each (``batch``), or one
    packet per report (its linger over before the next packet comes)."""
    enc = Encoder(producer, byte_order=byte_order)
    out = []
    for i, packet in enumerate(pcapng.read(SAMPLES / sample)):
        out += enc.add(packet, float(i))
        if not batch:
            out += enc.poll(i + 1.0)
    return out + enc.flush()


def encode_tlv(sample: str, producer: str, transport: str = "udp") -> list[bytes]:
    enc = TlvEncoder(producer, transport=transport)
    out = []
    for packet in pcapng.read(SAMPLES / sample):
        out += enc.add(packet)
    return out


def gre_seq(report: bytes) -> int:
    return struct.unpack_from("!I", report, 8)[0]


def tlv_field(message: bytes, ctype: int) -> bytes:
    found = tlv.decode_message(message).get_all(tlv.STM_VENDOR, ctype)
    return found[0].value


def tlv_seq(message: bytes) -> int:
    return struct.unpack("!I", tlv_field(message, tlv.StmChunk.SEQUENCE))[0]


def tlv_chunks(message: bytes) -> list[tuple[int, int, int, int]]:
    """(offset, vendor, type, length) of each chunk."""
    out, off = [], 6
    while off < len(message):
        vendor, ctype, length = struct.unpack_from("!HHH", message, off)
        out.append((off, vendor, ctype, length))
        off += length
    return out


def with_total(body: bytes) -> bytes:
    return b"HEP3" + struct.pack("!H", 6 + len(body)) + body


# -- the captures ---------------------------------------------------------------------------


# -- report traffic as stm-send writes it --------------------------------------------------


def send_has_output() -> bool:
    """Whether this stm-send has ``--output`` (write the reports as a capture)."""
    result = subprocess.run(
        [sys.executable, "-m", "stm.cli.send", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return "--output" in result.stdout


def sent_frames(
    tmp: Path, samples: list[str], producer: str, fmt: str, url: str, cli: bool
) -> tuple[int, list[bytes]]:
    """(link type, frames) of the report traffic of one sender:
    ``stm-send SAMPLES --producer P --format FMT --to URL --output FILE`` when ``cli``,
    else the same made with the library, as stm-send makes it."""
    files = [SAMPLES / x for x in samples]
    if cli:
        out = tmp / f"{producer}-{fmt}-{url.split(':')[0]}.pcapng"
        args = ["--producer", producer, "--format", fmt, "--to", url, "--output", str(out)]
        subprocess.run(
            [sys.executable, "-m", "stm.cli.send", *map(str, files), *args, "-q"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        packets = list(pcapng.read(out))
        assert len({p.linktype for p in packets}) == 1, "one link type per capture"
        return packets[0].linktype, [bytes(p.data) for p in packets]
    if fmt == "gre":
        reports = [r for f in files for r in encode_gre(f, producer, "<")]
        return 1, [udp_frame(r, 4754, ident=i) for i, r in enumerate(reports)]
    if url.startswith("udp"):
        messages = [m for f in files for m in encode_tlv(f, producer)]
        return 1, [udp_frame(m, 9060, ident=i) for i, m in enumerate(messages)]
    stream = b"".join(m for f in files for m in encode_tlv(f, producer, "tcp"))
    return 1, tcp_stream([stream[i : i + 1460] for i in range(0, len(stream), 1460)], 9060)


def describe(report: bytes, decoder) -> Report:
    """A report (format A datagram payload or format B message) as the tests expect the
    plugin to show it, by stm's own decoder: producer, sequence number, the SIP first lines
    of its packets (none for a piece of a packet: the plugin does not reassemble)."""
    if report[:4] == tlv.PROTOCOL_ID:
        lines = report_lines(decoder, decoder.receive_message, report)
        fragment = is_fragment_b(report)
        found = tlv.decode_message(report).get_all(0, tlv.HepChunk.PROTO_TYPE)
        producer = tlv_field(report, tlv.StmChunk.PRODUCER).decode()
        return Report(
            producer,
            tlv_seq(report),
            [] if fragment else lines,
            fragment,
            found[0].value[0] if found else None,
        )
    lines = report_lines(decoder, decoder.receive_datagram, report)
    fragment = is_fragment_a(report)
    producer = re.search(rb"producer=([^\x00]*)", report).group(1).decode()
    return Report(producer, gre_seq(report), [] if fragment else lines, fragment)


def expected_reports(linktype: int, frame_list: list[bytes]) -> dict[int, list[Report]]:
    """Frame number -> the reports it holds: a UDP datagram's, or the messages whose last
    byte a TCP segment (towards the collector) carries."""
    decoder = AutoDecoder()
    streams: dict[tuple, bytearray] = {}
    out: dict[int, list[Report]] = {}
    for number, data in enumerate(frame_list, start=1):
        split = frames.split(linktype, data)
        if split is None or split.end <= split.offset:
            continue
        payload = data[split.offset : split.end]
        if split.proto == frames.UDP:
            out[number] = [describe(payload, decoder)]
        elif split.proto == frames.TCP and split.sport != 9060:
            buf = streams.setdefault((split.src, split.sport, split.dst, split.dport), bytearray())
            buf += payload
            while len(buf) >= 6 and len(buf) >= struct.unpack_from("!H", buf, 4)[0]:
                size = struct.unpack_from("!H", buf, 4)[0]
                out.setdefault(number, []).append(describe(bytes(buf[:size]), decoder))
                del buf[:size]
    return out


def make_sent(path: Path, senders: list[tuple[list[str], str, str, str]], cli: bool) -> Capture:
    """The traffic of several senders (samples, producer, format, URL), one after the
    other in one capture."""
    linktypes, frame_list = set(), []
    for samples, producer, fmt, url in senders:
        linktype, sent = sent_frames(path.parent, samples, producer, fmt, url, cli)
        linktypes.add(linktype)
        frame_list += sent
    assert len(linktypes) == 1
    linktype = linktypes.pop()
    write_capture(path, frame_list, linktype=linktype)
    return Capture(path, expected_reports(linktype, frame_list))


JUMBO = "sip_jumbo_udp_ipv4.pcap"
SENDERS_GRE = [
    (["sip_udp_ipv4.pcap"], "amf-1", "gre", "udp://127.0.0.1:4754"),
    (["sip_tcp_ipv6.pcapng"], "smf-1", "gre", "udp://127.0.0.1:4754"),
    (["sip_udp_ipv6.pcapng", JUMBO], "upf-1", "gre", "udp://127.0.0.1:4754"),
]
SENDERS_TLV_UDP = [(files, p, "tlv", "udp://127.0.0.1:9060") for files, p, _, _ in SENDERS_GRE]
SENDERS_TLV_TCP = [(["sip_udp_ipv4.pcap", JUMBO], "pcscf-1", "tlv", "tcp://127.0.0.1:9060")]


def make_tlv_tcp_mixed(path: Path, port: int = 9060) -> Capture:
    """Format B over TCP cut into segments as stm-send does not: one connection where most
    segments hold one message, but message 1 is split across two segments, messages 4 to 6
    share one segment (the last one split into the next), and the jumbo INVITE (one 10 KB
    message over TCP) spans many segments."""
    cap = Capture(path)
    decoder = TlvDecoder()
    messages = encode_tlv("sip_udp_ipv4.pcap", "pcscf-1", "tcp")
    messages += encode_tlv("sip_jumbo_udp_ipv4.pcap", "pcscf-2", "tcp")
    expected = []
    for m in messages:
        lines = report_lines(decoder, decoder.receive_message, m)
        expected.append(Report(tlv_field(m, tlv.StmChunk.PRODUCER).decode(), tlv_seq(m), lines))
    stream = b"".join(messages)
    ends = []
    pos = 0
    for m in messages:
        pos += len(m)
        ends.append(pos)
    cuts = [e for i, e in enumerate(ends) if i not in (4, 5)]
    cuts.append(ends[1] - 40)  # message 1 in two segments
    cuts.append(ends[6] - 100)  # 4, 5 and the start of 6 together
    segments, prev = [], 0
    for cut in sorted(cuts):
        piece = stream[prev:cut]
        size = 1448 if len(piece) > 4000 else len(piece)  # the jumbo message: MSS segments
        while piece:
            segments.append(piece[:size])
            piece = piece[size:]
        prev = cut
    frame_list = tcp_stream(segments, port)
    # Which frame completes which message: the one holding its last byte.
    done, pos, m = 0, 0, 0
    for number, seg in enumerate(segments, start=4):
        pos += len(seg)
        while m < len(messages) and ends[m] <= pos:
            cap.reports.setdefault(number, []).append(expected[m])
            m += 1
        done = number
    assert m == len(messages) and done == len(frame_list)
    write_capture(path, frame_list)
    return cap


# Signalling other than SIP, and link types other than Ethernet, for the packets inside.
def _diameter_cer() -> bytes:
    def avp(code: int, data: bytes, flags: int = 0x40) -> bytes:
        n = 8 + len(data)
        return struct.pack("!IB", code, flags) + n.to_bytes(3, "big") + data + bytes(-n % 4)

    body = avp(264, b"amf.example.com") + avp(296, b"example.com") + avp(266, bytes(4))
    body += avp(257, b"\x00\x01\xc0\x00\x02\x0a") + avp(269, b"stm", 0)
    head = b"\x01" + (20 + len(body)).to_bytes(3, "big") + b"\x80" + (257).to_bytes(3, "big")
    return head + struct.pack("!III", 0, 1, 1) + body  # Capabilities-Exchange-Request


# An NGSetupRequest (APER, TS 38.413) from gNB "free5gc", as free5gc's tests send it.
NG_SETUP_REQUEST = bytes.fromhex(
    "0015003500000400 1b00080002f83910 0001020052400903 0066726565356763"
    "0000660010000000 00010002f8390000 1008010203001540 0140".replace(" ", "")
)
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


def _sctp(payload: bytes, ppid: int, sport: int, dport: int) -> bytes:
    chunk = struct.pack("!BBHIHHI", 0, 3, 16 + len(payload), 1, 0, 0, ppid) + payload
    chunk += bytes(-len(chunk) % 4)
    return _ipv4(132, SENDER, COLLECTOR, struct.pack("!HHII", sport, dport, 1, 0) + chunk, 1)


def inner_packets(client_port: int) -> list[tuple[object, str]]:
    """(packet, "LINK APP"): the protocol its link type is dissected as, right after stm
    in frame.protocols, and the protocol it carries."""
    sip4 = next(iter(pcapng.read(SAMPLES / "sip_udp_ipv4.pcap")))
    sip6 = next(iter(pcapng.read(SAMPLES / "sip_udp_ipv6.pcapng")))
    ip4, ip6 = bytes(sip4.data[14:]), bytes(sip6.data[14:])
    mac = b"\x00\x00\x5e\x00\x53\x0a"
    arp = b"\xff" * 6 + mac + b"\x08\x06" + bytes.fromhex("0001080006040001") + mac
    arp += bytes([192, 0, 2, 10]) + bytes(6) + bytes([198, 51, 100, 20]) + bytes(18)
    sll = struct.pack("!HHH", 0, 1, 6) + mac + b"\0\0\x08\x00"
    sll2 = struct.pack("!HHIHBB", 0x0800, 0, 2, 1, 0, 6) + mac + b"\0\0"
    flags, port = PSH | ACK, client_port  # a TCP or SCTP flow of its own per call
    cases = [
        (1, tcp_frame(_diameter_cer(), flags, 1, 1, 3868, client_port=port), "eth diameter"),
        (1, tcp_frame(HTTP2_PREFACE, flags, 1, 1, 80, client_port=port), "eth http2"),
        (1, _sctp(NG_SETUP_REQUEST, 60, port, 38412), "eth ngap"),
        (1, arp, "eth arp"),
        (101, ip4, "raw sip"),
        (228, ip4, "ip sip"),
        (229, ip6, "ipv6 sip"),
        (113, sll + ip4, "sll sip"),
        (276, sll2 + ip4, "sll sip"),
        (0, struct.pack("<I", 2) + ip4, "null sip"),
        (108, struct.pack(">I", 2) + ip4, "null sip"),
    ]  # fmt: skip
    return [
        (pcapng.Packet(pcapng.Interface(lt, 65535), T0 + i, data, len(data)), chain)
        for i, (lt, data, chain) in enumerate(cases)
    ]


def foreign_hep3(payload: bytes, proto_type: int, ip_proto: int, dport: int) -> bytes:
    """A HEP3 message as sngrep or Kamailio send it: generic chunks only."""

    def chunk(ctype: int, value: bytes) -> bytes:
        return struct.pack("!HHH", 0, ctype, 6 + len(value)) + value

    body = chunk(1, b"\x02") + chunk(2, bytes([ip_proto])) + chunk(3, bytes([192, 0, 2, 10]))
    body += chunk(4, bytes([198, 51, 100, 20])) + chunk(7, struct.pack("!H", 5060))
    body += chunk(8, struct.pack("!H", dport)) + chunk(9, struct.pack("!I", T0 // 10**6))
    body += chunk(10, bytes(4)) + chunk(11, bytes([proto_type])) + chunk(12, struct.pack("!I", 7))
    return with_total(body + chunk(15, payload))


def make_inner(path: Path) -> Capture:
    """Each packet of inner_packets() in a format-A report and in a format-B message, then
    foreign HEP3 (SIP by protocol type, Diameter by port). ``notes`` holds the protocols
    expected inside, by frame."""
    cap = Capture(path)
    frame_list = []
    enc = Encoder("inner-a", byte_order=">")  # a big-endian section (the rest: host order)
    for i, (packet, chain) in enumerate(inner_packets(41000)):
        for report in enc.add(packet, float(i)) + enc.poll(i + 1.0):
            frame_list.append(udp_frame(report, 4754))
            cap.notes[len(frame_list)] = chain
    tlv_enc = TlvEncoder("inner-b")
    for packet, chain in inner_packets(42000):  # other TCP flows: no retransmissions
        for message in tlv_enc.add(packet):
            frame_list.append(udp_frame(message, 9060))
            cap.notes[len(frame_list)] = chain
    sip = next(iter(pcapng.read(SAMPLES / "sip_udp_ipv4.pcap")))
    frame_list.append(udp_frame(foreign_hep3(bytes(sip.data[42:]), 1, 17, 5060), 9060))
    cap.notes[len(frame_list)] = "sip sip"
    frame_list.append(udp_frame(foreign_hep3(_diameter_cer(), 0, 6, 3868), 9060))
    cap.notes[len(frame_list)] = "diameter diameter"
    write_capture(path, frame_list)
    return cap


def make_heuristic(path: Path) -> Capture:
    """Reports on ports nobody registered: format A on UDP 5555, format B on UDP 6666 and
    on TCP 7777 (found by the GRE and HEP3 heuristics); then format A with GRE protocol type
    0x88B6 (frames 8 and 9), found only when the preference says so."""
    cap = Capture(path)
    frame_list = []
    a = encode_gre("sip_udp_ipv4.pcap", "amf-7", "<")[0]
    b = encode_tlv("sip_udp_ipv4.pcap", "amf-8")[0]
    frame_list.append(udp_frame(a, 5555))
    cap.reports[1] = [Report("amf-7", 0, [])]
    frame_list.append(udp_frame(b, 6666))
    cap.reports[2] = [Report("amf-8", 0, [])]
    tcp_msgs = encode_tlv("sip_udp_ipv4.pcap", "amf-9", "tcp")[:2]
    frame_list += tcp_stream(tcp_msgs, 7777)[0:5]
    cap.reports[6] = [Report("amf-9", 0, [])]
    cap.reports[7] = [Report("amf-9", 1, [])]
    # Another GRE protocol type (stm-send --protocol-type 0x88B6), on 4754 and on 5555.
    enc = Encoder("amf-10", protocol_type=0x88B6)
    other = []
    for i, packet in enumerate(pcapng.read(SAMPLES / "sip_udp_ipv4.pcap")):
        other += enc.add(packet, float(i)) + enc.poll(i + 1.0)
    frame_list += [udp_frame(other[0], 4754), udp_frame(other[1], 5555)]
    cap.reports[8] = [Report("amf-10", 0, [])]
    cap.reports[9] = [Report("amf-10", 1, [])]
    write_capture(path, frame_list)
    return cap


def make_malformed(path: Path) -> Capture:
    """Valid reports, each followed by a broken copy; plus sequence trouble."""
    cap = Capture(path)
    frame_list: list[bytes] = []

    def good(frame: bytes) -> None:
        frame_list.append(frame)

    def bad(frame: bytes, why: str) -> None:
        frame_list.append(frame)
        cap.malformed[len(frame_list)] = why

    # Format A: one report with two EPBs (little-endian), one fragment.
    reports = encode_gre("sip_udp_ipv4.pcap", "bad-a", "<")
    r = reports[0]
    good(udp_frame(r, 4754))
    shb_len = struct.unpack_from("<I", r, 12 + 4)[0]
    idb = 12 + shb_len
    idb_len = struct.unpack_from("<I", r, idb + 4)[0]
    epb = idb + idb_len

    def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
        b = bytearray(data)
        struct.pack_into(fmt, b, offset, value)
        return bytes(b)

    bad(udp_frame(r[:-50], 4754), "truncated report")
    bad(udp_frame(patch(r, idb + 4, "<I", 13), 4754), "block length 13")
    bad(udp_frame(patch(r, len(r) - 4, "<I", 8), 4754), "trailing length differs")
    bad(udp_frame(patch(r, 12 + 8, "<I", 0xDEADBEEF), 4754), "bad byte-order magic")
    bad(udp_frame(r[:12] + bytes(40), 4754), "no SHB")
    bad(udp_frame(patch(r, epb + 20, "<I", 0xFFFF), 4754), "caplen past the block")
    bad(udp_frame(patch(r, epb + 8, "<I", 7), 4754), "unknown interface")
    bad(udp_frame(patch(r, 12 + 24 + 2, "<H", 0x400), 4754), "option past its block")
    bad(udp_frame(r[:12], 4754), "empty report")
    frag = encode_gre("sip_jumbo_udp_ipv4.pcap", "bad-f", "<")[1]
    assert is_fragment_a(frag)
    cb = frag.index(struct.pack("<I", 0x40000BAD))
    good(udp_frame(frag, 4754))
    bad(udp_frame(patch(frag, cb + 20, "<I", 1 << 30), 4754), "fragment past its total")

    # Format B over UDP.
    m = encode_tlv("sip_udp_ipv4.pcap", "bad-b")[0]
    chunks = tlv_chunks(m)
    good(udp_frame(m, 9060))
    bad(udp_frame(m[:-20], 9060), "length field larger than the datagram")
    off = chunks[2][0]
    bad(udp_frame(patch(m, off + 4, "!H", 3), 9060), "chunk length 3")
    last = chunks[-1][0]
    bad(udp_frame(patch(m, last + 4, "!H", chunks[-1][3] + 100), 9060), "chunk past the end")
    bad(udp_frame(b"\x02\x10" + m[2:], 9060), "HEPv2")
    bad(udp_frame(b"XXXX" + m[4:], 9060), "not HEP3")
    seq_off = next(o for o, v, t, _ in chunks if v == tlv.STM_VENDOR and t == 0x530A)
    short_seq = struct.pack("!HHH", tlv.STM_VENDOR, 0x530A, 9) + b"\x00\x00\x01"
    body = m[6:seq_off] + short_seq + m[seq_off + 10 :]
    bad(udp_frame(with_total(body), 9060), "SEQUENCE of 3 bytes")
    lt_off = next(o for o, v, t, _ in chunks if v == tlv.STM_VENDOR and t == 0x5303)
    body = m[6:lt_off] + m[lt_off + 8 :]
    bad(udp_frame(with_total(body), 9060), "no LINKTYPE")
    bad(udp_frame(b"HEP3\x00\x06", 9060), "empty chunk list")
    # Format B over TCP: a message, then bytes that are not one.
    good_tcp = encode_tlv("sip_udp_ipv4.pcap", "bad-t", "tcp")[0]
    frame_list += tcp_stream([good_tcp, b"GARBAGE!" * 4], 9061)
    cap.malformed[len(frame_list)] = "TCP framing error"

    # Sequence trouble, both formats: 0 1 [2 3 lost] 4 4 6 5 7.
    order = [0, 1, 4, 4, 6, 5, 7]
    notes = {2: "gap:2", 3: "duplicate", 4: "gap:1", 5: "late"}
    a_reports = encode_gre("sip_udp_ipv4.pcap", "seq-a", "<", batch=False)
    a_reports += encode_gre("sip_udp_ipv4.pcap", "seq-a", "<", batch=False)  # a new session
    b_messages = encode_tlv("sip_udp_ipv4.pcap", "seq-b")
    for source, port in ((a_reports, 4754), (b_messages, 9060)):
        for i, n in enumerate(order):
            good(udp_frame(source[n], port))
            if i in notes:
                cap.notes[len(frame_list)] = notes[i]
    good(udp_frame(a_reports[len(a_reports) // 2], 4754))
    cap.notes[len(frame_list)] = "restart"
    # Reports the capture cut short (its snaplen): not malformed, just not all there.
    cut = {}
    for report, port in ((a_reports[3], 4754), (a_reports[4], 4754), (b_messages[3], 9060)):
        good(udp_frame(report, port))
        cut[len(frame_list)] = 42 + 300
        cap.notes[len(frame_list)] = "snapped"
    write_capture(path, frame_list, cut)
    return cap


def block_ends(report: bytes) -> set[int]:
    """Where each pcapng block of a format-A report ends (offsets in the datagram)."""
    bo = "<" if report[20:24] == b"\x4d\x3c\x2b\x1a" else ">"
    ends, off = set(), 12
    while off < len(report):
        off += struct.unpack_from(bo + "I", report, off + 4)[0]
        ends.add(off)
    return ends


def make_fuzz(path: Path) -> Capture:
    """Reports cut short at every 7th byte, and with random bytes overwritten (fixed seed).
    ``malformed`` holds the cuts that must be flagged: every format-B one, and every
    format-A one that does not fall between two blocks after the first packet."""
    cap = Capture(path)
    rnd = random.Random(28560)
    sources = [
        (encode_gre("sip_udp_ipv4.pcap", "fz-a", "<")[0], 4754),
        (encode_gre("sip_tcp_ipv6.pcapng", "fz-b", ">")[3], 4754),
        (encode_gre("sip_jumbo_udp_ipv4.pcap", "fz-c", "<")[2], 4754),
        (encode_tlv("sip_tcp_ipv6.pcapng", "fz-d")[3], 9060),
        (encode_tlv("sip_jumbo_udp_ipv4.pcap", "fz-e")[1], 9060),
    ]
    frame_list = []
    for report, port in sources:
        if port == 4754:
            ends = block_ends(report)
            whole = {e for e in ends if e > min(ends) + 40}  # after the SHB and an IDB
        for cut in range(1, len(report), 7):
            frame_list.append(udp_frame(report[:cut], port))
            if (port == 9060 and cut >= 4) or (port == 4754 and cut >= 12 and cut not in whole):
                cap.malformed[len(frame_list)] = f"cut at {cut}"
        for _ in range(80):
            data = bytearray(report)
            for _ in range(rnd.randint(1, 4)):
                data[rnd.randrange(len(data))] = rnd.randrange(256)
            frame_list.append(udp_frame(bytes(data), port))
    stream = bytearray(b"".join(encode_tlv("sip_udp_ipv4.pcap", "fz-t", "tcp")))
    for _ in range(6):
        stream[rnd.randrange(len(stream))] = rnd.randrange(256)
    cuts = sorted(rnd.sample(range(1, len(stream)), 12))
    frame_list += tcp_stream(
        [bytes(stream[a:b]) for a, b in zip([0, *cuts], [*cuts, None], strict=True)], 9060
    )
    write_capture(path, frame_list)
    return cap


@pytest.fixture(scope="module")
def captures(tmp_path_factory) -> dict[str, Capture]:
    """Report traffic as a collector's tcpdump would show it, by name.

    The plain report traffic of both formats is what ``stm-send --output`` writes (made
    with the library instead if this stm-send has no ``--output``); what stm-send never
    writes (several messages in one TCP segment, damage, loss, other link types inside) is
    made here with the library and ``pcapng.Writer``.
    """
    d = tmp_path_factory.mktemp("wireshark")
    cli = send_has_output()
    return {
        "gre": make_sent(d / "gre.pcapng", SENDERS_GRE, cli),
        "tlv_udp": make_sent(d / "tlv_udp.pcapng", SENDERS_TLV_UDP, cli),
        "tlv_tcp": make_sent(d / "tlv_tcp.pcapng", SENDERS_TLV_TCP, cli),
        "tlv_tcp_mixed": make_tlv_tcp_mixed(d / "tlv_tcp_mixed.pcapng"),
        "heuristic": make_heuristic(d / "heuristic.pcapng"),
        "inner": make_inner(d / "inner.pcapng"),
        "fuzz": make_fuzz(d / "fuzz.pcapng"),
        "malformed": make_malformed(d / "malformed.pcapng"),
    }


# -- running tshark -------------------------------------------------------------------------


def tshark(*args: str, env: dict | None = None) -> str:
    """tshark with the plugin (``-X lua_script:``, or installed in the per-user plugin
    folder of ``env["HOME"]``); its stderr must be clean (no Lua error, no warning)."""
    plugin = [] if env else ["-X", f"lua_script:{LUA}"]
    result = subprocess.run(
        [TSHARK, *args[:2], *plugin, *args[2:]] if args[0] == "-G" else [TSHARK, *plugin, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    err = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith("Running as user")
    ]
    assert result.returncode == 0 and not err, result.stderr
    return result.stdout


def fields(path: Path, names: list[str], *extra: str) -> dict[int, dict[str, list[str]]]:
    """frame number -> field -> values, for every frame shown."""
    args = ["-r", str(path), "-T", "fields", "-E", f"aggregator={AGG}", "-e", "frame.number"]
    for name in names:
        args += ["-e", name]
    out = {}
    for line in tshark(*args, *extra).splitlines():
        number, *values = line.split("\t")
        out[int(number)] = {
            n: v.split(AGG) if v else [] for n, v in zip(names, values, strict=True)
        }
    return out


REPORT_FIELDS = [
    "stm.format",
    "stm.producer",
    "stm.sequence",
    "sip.Request-Line",
    "sip.Status-Line",
    "stm.fragment.packet_id",
    "stm.fragment.offset",
    "stm.fragment.total_length",
    "stm.malformed",
    "_ws.malformed",
    "_ws.lua.error",
]


def check_reports(cap: Capture, got: dict, fmt: str) -> None:
    for number, row in got.items():
        assert not row["stm.malformed"] and not row["_ws.malformed"], (number, row)
        assert not row["_ws.lua.error"], (number, row)
        reports = cap.reports.get(number)
        if reports is None:
            assert not row["stm.format"], (number, row)  # TCP handshake, partial segment
            continue
        assert row["stm.format"] == [fmt] * len(reports), (number, row)
        assert row["stm.producer"] == [r.producer for r in reports], number
        assert row["stm.sequence"] == [str(r.seq) for r in reports], number
        lines = row["sip.Request-Line"] + row["sip.Status-Line"]
        want = [x for r in reports for x in r.sip]
        assert sorted(lines) == sorted(want), (number, lines, want)
        fragments = [r for r in reports if r.fragment]
        assert len(row["stm.fragment.packet_id"]) == len(fragments), (number, row)
        assert len(row["stm.fragment.total_length"]) == len(fragments), (number, row)


# -- tests -------------------------------------------------------------------------------------


def test_plugin_loads_and_registers_fields_and_prefs(tmp_path):
    """Installed as docs/wireshark.md says, in the per-user plugin folder."""
    folder = tmp_path / ".local" / "lib" / "wireshark" / "plugins"
    folder.mkdir(parents=True)
    shutil.copy(LUA, folder)
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / ".config")}
    assert str(folder / "stm.lua") in tshark("-G", "plugins", env=env)
    listing = tshark("-G", "fields", env=env)
    names = {line.split("\t")[2] for line in listing.splitlines() if line.startswith("F\t")}
    for name in (
        "stm.producer",
        "stm.session",
        "stm.stream_id",
        "stm.sequence",
        "stm.linktype",
        "stm.timestamp",
        "stm.fragment.packet_id",
        "stm.block.type",
        "stm.chunk.type",
        "stm.hep.proto_type",
        "stm.malformed",
        "stm.gap",
    ):
        assert name in names, name
    prefs = tshark("-G", "defaultprefs", env=env)
    for pref in ("stm.protocol_type", "stm.udp_ports", "stm.tcp_ports", "stm.gre_udp_ports"):
        assert pref + ":" in prefs, pref


def test_format_a_every_report_and_packet(captures):
    cap = captures["gre"]
    got = fields(cap.path, REPORT_FIELDS)
    assert set(got) == set(cap.reports)
    check_reports(cap, got, "1")
    # The pieces of the jumbo INVITE, by name with their fields.
    fragments = [n for n, rs in cap.reports.items() if rs[0].fragment]
    assert len(fragments) > 5
    offsets = [int(got[n]["stm.fragment.offset"][0]) for n in fragments]
    assert offsets == sorted(offsets) and offsets[0] == 0
    total = {got[n]["stm.fragment.total_length"][0] for n in fragments}
    assert len(total) == 1 and int(total.pop()) > 10000


def test_format_b_udp_every_report_and_packet(captures):
    cap = captures["tlv_udp"]
    got = fields(cap.path, REPORT_FIELDS)
    assert set(got) == set(cap.reports)
    check_reports(cap, got, "2")
    assert any(r[0].fragment for r in cap.reports.values())


@pytest.mark.parametrize("name", ["tlv_tcp", "tlv_tcp_mixed"])
def test_format_b_tcp_reassembly(captures, name):
    """Messages split across segments are reassembled (the 10 KB INVITE spans several), and
    a segment holding several messages shows them all (tlv_tcp_mixed)."""
    cap = captures[name]
    got = fields(cap.path, REPORT_FIELDS)
    check_reports(cap, got, "2")
    if name == "tlv_tcp_mixed":
        assert any(len(rs) > 1 for rs in cap.reports.values()), "several messages a segment"
    lines = [x for row in got.values() for x in row["sip.Request-Line"]]
    assert sum(x.startswith("INVITE") for x in lines) == 2  # the jumbo one too
    shown = sum(len(row["stm.sequence"]) for row in got.values())
    assert shown == sum(map(len, cap.reports.values()))


def test_inner_packets_fully_dissected(captures):
    """The packets inside show with their own protocols and fields: IPv4 and IPv6, UDP and
    TCP, SIP headers and SDP bodies, and the comments of the pcapng sample."""
    names = ["ip.src", "ipv6.src", "udp.srcport", "tcp.srcport", "sip.Call-ID", "sdp.version",
             "stm.comment", "stm.if_name", "stm.timestamp"]  # fmt: skip
    for key in ("gre", "tlv_udp"):
        got = fields(captures[key].path, names)
        found = {n for row in got.values() for n, v in row.items() if v}
        assert found == set(names), (key, set(names) - found)


def test_link_types_and_protocols_inside(captures):
    """Every link type stm carries goes to its dissector, and Diameter, HTTP/2, NGAP and
    non-IP frames show inside both formats; foreign HEP3 payloads go by protocol type or
    port."""
    cap = captures["inner"]
    got = fields(cap.path, ["frame.protocols", "stm.linktype", "stm.malformed", "_ws.malformed"])
    assert set(got) == set(cap.notes)
    for number, want in cap.notes.items():
        row = got[number]
        assert not row["stm.malformed"] and not row["_ws.malformed"], (number, row)
        inside = row["frame.protocols"][0].split(":stm:")[-1].split(":")
        link, app = want.split()
        assert inside[0] == link and app in inside, (number, inside, want)


def test_display_filters_select_reports(captures):
    cap = captures["gre"]
    amf = {n for n, rs in cap.reports.items() if rs[0].producer == "amf-1"}
    got = fields(cap.path, ["stm.producer"], "-Y", 'stm.producer == "amf-1"')
    assert set(got) == amf
    got = fields(cap.path, ["stm.sequence"], "-Y", "stm.fragment && stm.linktype == 1")
    assert set(got) == {n for n, rs in cap.reports.items() if rs[0].fragment}
    got = fields(
        cap.path, ["stm.sequence"], "-Y", 'stm.producer == "smf-1" && sip.Method == "INVITE"'
    )
    assert len(got) == 1
    cap = captures["tlv_udp"]
    got = fields(cap.path, ["stm.producer"], "-Y", "stm.format == 2 && stm.hep.proto_type == 1")
    assert set(got) == {n for n, rs in cap.reports.items() if rs[0].proto_type == 1}
    got = fields(cap.path, ["stm.sequence"], "-Y", 'stm.producer == "upf-1" && stm.sequence == 0')
    assert len(got) == 1


def test_ports_by_heuristic_and_preference(captures):
    cap = captures["heuristic"]
    got = fields(cap.path, ["stm.format", "stm.producer", "stm.sequence", "sip.Request-Line"])
    assert got[1]["stm.format"] == ["1"] and got[1]["stm.producer"] == ["amf-7"]
    assert got[2]["stm.format"] == ["2"] and got[2]["stm.producer"] == ["amf-8"]
    assert got[6]["stm.producer"] == ["amf-9"] and got[7]["stm.sequence"] == ["1"]
    assert all(got[n]["sip.Request-Line"] or got[n]["stm.producer"] for n in (1, 2, 6, 7))
    assert not got[8]["stm.producer"] and not got[9]["stm.producer"]
    got = fields(cap.path, ["stm.producer", "stm.sequence"], "-o", "stm.protocol_type:0x88B6")
    assert got[8]["stm.producer"] == ["amf-10"] and got[9]["stm.sequence"] == ["1"]
    assert not got[1]["stm.producer"]  # 0x88B5 is no longer ours
    # With the heuristics off, the port preference alone finds format B.
    off = ["--disable-heuristic", "stm_udp", "--disable-heuristic", "stm_tcp"]
    got = fields(cap.path, ["stm.producer"], *off, "-o", "stm.udp_ports:6666")
    assert got[2]["stm.producer"] == ["amf-8"] and not got[6]["stm.producer"]


def test_malformed_reports_raise_expert_info_not_lua_errors(captures):
    cap = captures["malformed"]
    got = fields(cap.path, ["stm.format", "stm.malformed", "_ws.lua.error", "_ws.expert.message"])
    for number, row in got.items():
        assert not row["_ws.lua.error"], (number, row)
        if number in cap.malformed:
            assert row["stm.malformed"], (number, cap.malformed[number], row)
        else:
            assert not row["stm.malformed"], (number, row)
    text = tshark("-r", str(cap.path), "-V")
    assert "Lua Error" not in text and "Lua error" not in text
    summary = tshark("-r", str(cap.path), "-q", "-z", "expert")
    assert "Malformed STM report" in summary


def test_sequence_gaps_duplicates_late_restart(captures):
    cap = captures["malformed"]
    names = ["stm.gap", "stm.sequence.lost", "stm.duplicate", "stm.late", "stm.restart",
             "stm.snapped"]  # fmt: skip
    for extra in ((), ("-2",)):  # one pass, and two passes (what the GUI does)
        got = fields(cap.path, names, *extra)
        for number, note in cap.notes.items():
            row = got[number]
            if note.startswith("gap:"):
                assert row["stm.gap"] and row["stm.sequence.lost"] == [note[4:]], (number, row)
            else:
                assert row["stm." + note], (number, note, row)
        flagged = {n for n, row in got.items() if row["stm.gap"] or row["stm.duplicate"]}
        assert flagged == {n for n, x in cap.notes.items() if x.startswith("gap") or
                           x == "duplicate"}  # fmt: skip


def test_corrupted_reports_never_raise_lua_errors(captures):
    cap = captures["fuzz"]
    got = fields(cap.path, ["stm.format", "stm.malformed", "_ws.lua.error", "_ws.expert.message"])
    for number, row in got.items():
        assert not row["_ws.lua.error"], (number, row)
        assert not any("Lua Error" in x for x in row["_ws.expert.message"]), (number, row)
        if number in cap.malformed:
            assert row["stm.malformed"], (number, cap.malformed[number], row)
