"""stm.wire: reports written as a capture of UDP/TCP traffic, and read back from one,
including TCP streams captured out of order, with retransmissions, or from the middle."""

from __future__ import annotations

import io
import random
from pathlib import Path

import dpkt
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from stm import frames, pcapng
from stm.pcapng import constants as c
from stm.report import AutoDecoder, Encoder, Packets, TlvEncoder
from stm.wire import WireStats, WireWriter, read_reports

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in (".pcap", ".pcapng"))


def reports(fmt: str, transport: str = "udp") -> tuple[list[bytes], list]:
    """Every sample packet as reports, and the packets' keys."""
    enc = Encoder("amf-1") if fmt == "gre" else TlvEncoder("amf-1", transport=transport)
    out, want = [], []
    for s in SAMPLES:
        for p in pcapng.read(s):
            out += enc.add(p, 0.0)
            want.append(p.key()[1:])
    return out + enc.flush(), want


def decode(source, stats=None) -> list:
    d = AutoDecoder()
    got = []
    for _, data, peer, t in read_reports(source, stats=stats):
        d.receive_datagram(data, peer, t)  # tells format A from B by the first bytes
        got += [p.key()[1:] for ev in d.events() if type(ev) is Packets for p in ev.packets]
    return got


def write(path, reps, scheme="udp", host="127.0.0.1", port=4754) -> None:
    w = WireWriter(path, scheme=scheme, host=host, port=port, source_port=50000, mtu=1500)
    w.send(reps)
    w.close()


@pytest.mark.parametrize("fmt", ["gre", "tlv"])
@pytest.mark.parametrize("name", ["w.pcap", "w.pcapng"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_udp_round_trip(tmp_path, fmt, name, host):
    reps, want = reports(fmt)
    write(tmp_path / name, reps, host=host)
    stats = WireStats()
    assert decode(tmp_path / name, stats) == want
    assert stats.datagrams == len(reps) and stats.ignored == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_tcp_round_trip(tmp_path, host):
    reps, want = reports("tlv", "tcp")
    write(tmp_path / "w.pcapng", reps, "tcp", host, 9060)
    stats = WireStats()
    assert decode(tmp_path / "w.pcapng", stats) == want
    assert stats.messages == len(reps) and stats.tcp_gaps == stats.tcp_errors == 0


def test_format_a_over_tcp_round_trip_and_other_streams_ignored(tmp_path):
    from stm.transport.framing import frame

    reps, want = reports("gre")
    write(tmp_path / "a.pcapng", frame(reps), "tcp", "127.0.0.1", 4754)
    stats = WireStats()
    assert decode(tmp_path / "a.pcapng", stats) == want
    assert stats.messages == len(reps)
    # A TCP stream that is neither format: counted as ignored, nothing decoded.
    write(tmp_path / "http.pcapng", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"] * 3, "tcp")
    stats = WireStats()
    assert decode(tmp_path / "http.pcapng", stats) == []
    assert stats.messages == stats.tcp_errors == 0 and stats.ignored >= 3


def test_independent_readers_agree(tmp_path):
    """scapy and dpkt read our frames with valid checksums and the report as payload."""
    reps, _ = reports("gre")
    write(tmp_path / "w.pcap", reps)
    for pkt, rep in zip(rdpcap(str(tmp_path / "w.pcap")), reps, strict=True):
        assert bytes(pkt[UDP].payload) == rep and pkt[UDP].dport == 4754
        again = Ether(bytes(pkt))
        del again[IP].chksum, again[UDP].chksum
        again = Ether(bytes(again))
        assert (again[IP].chksum, again[UDP].chksum) == (pkt[IP].chksum, pkt[UDP].chksum)
    with open(tmp_path / "w.pcap", "rb") as f:
        got = [dpkt.ethernet.Ethernet(buf).data.data.data for _, buf in dpkt.pcap.Reader(f)]
    assert got == reps


def test_tcp_segments_out_of_order_retransmitted_and_mid_stream(tmp_path):
    reps, want = reports("tlv", "tcp")
    write(tmp_path / "w.pcap", reps, "tcp", "127.0.0.1", 9060)
    pkts = list(rdpcap(str(tmp_path / "w.pcap")))
    data = [p for p in pkts if len(p[TCP].payload)]
    rng = random.Random(7)
    # Swap neighbours and resend some segments (a retransmission, and a longer one that
    # overlaps what came before), as a capture on a busy link shows.
    shuffled = data[:]
    for i in range(0, len(shuffled) - 1, 5):
        shuffled[i], shuffled[i + 1] = shuffled[i + 1], shuffled[i]
    for p in rng.sample(data, 10):
        shuffled.insert(rng.randrange(len(shuffled)), p)
    out = tmp_path / "mixed.pcap"
    with open(out, "wb") as f:
        w = pcapng.PcapWriter(f, c.LINKTYPE_ETHERNET)
        for p in [*pkts[:3], *shuffled, *pkts[-3:]]:
            w.write_packet(int(p.time * 10**9), bytes(p))
    assert decode(out) == want
    # Taken from the middle of the connection: no SYN, and the first segment starts inside
    # a message. Reading starts at the first HEP3 and gives the messages from there on.
    cut = tmp_path / "cut.pcap"
    with open(cut, "wb") as f:
        w = pcapng.PcapWriter(f, c.LINKTYPE_ETHERNET)
        for p in data[len(data) // 2 :]:
            w.write_packet(int(p.time * 10**9), bytes(p))
    got = decode(cut)
    assert got and got == want[-len(got) :]


def test_other_traffic_is_ignored(tmp_path):
    reps, want = reports("gre")
    buf = io.BytesIO()
    w = pcapng.Writer(buf)
    w.add_interface(c.LINKTYPE_RAW, 65535)
    lo = bytes([127, 0, 0, 1])
    for i, rep in enumerate(reps):
        w.write_packet(0, i, frames.synthesize(4, frames.UDP, lo, lo, 50000, 4754, rep))
        w.write_packet(0, i, frames.synthesize(4, frames.UDP, lo, lo, 5353, 53, b"\x12" * 30))
    w.write_packet(0, 0, b"\x45not an ip packet")
    w.flush()
    stats = WireStats()
    assert decode(buf.getvalue(), stats) == want
    assert stats.ignored == len(reps) + 1 and stats.frames == 2 * len(reps) + 1
