"""stm.pcapng against independent oracles: python-pcapng, scapy, dpkt and Wireshark.

1. Files written by the others (python-pcapng, scapy, dpkt, editcap, mergecap) are read by
   stm and must give what the writer was told to write (or what Wireshark reads back).
2. Files written by stm (both byte orders, several sections, mixed link types, decimal and
   base-2 resolutions, offsets, every block type) are read by python-pcapng, scapy, dpkt,
   tshark and capinfos and must give what stm was told to write.
3. Classic pcap written by stm's PcapWriter is read by dpkt, scapy and tshark.
4. Every capture of the shared corpus gives the same packets in stm and in tshark.

Expectations always come from the writer's input or from the oracle, never from stm's reader.
Wireshark shows times floored to the nanosecond, so times are compared at that precision
with tshark and exactly (as fractions of a second) everywhere else.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest

import stm.pcapng as sp
from stm.errors import UsageError
from stm.pcapng import constants as c

SAMPLES = Path(__file__).parents[1] / "samples"

# Wireshark's WTAP_ENCAP numbers (frame.encap_type) for the link types used here.
WTAP_ENCAP = {0: 15, 1: 1, 101: 7, 113: 25, 228: 129, 229: 130, 276: 210}

# Wireshark's tools say this on stderr whenever they run as root (CI containers do).
_ROOT_WARNING = re.compile(r'^Running as user ".*" and group ".*"\. This could be dangerous\.$')


# -- oracles ---------------------------------------------------------------------------------


def _lib(name: str):
    return pytest.importorskip(name, reason=f"the {name} oracle is not installed")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} (Wireshark) is not on PATH")
    return path


def _checked(args, returncode: int, stdout: bytes, stderr: bytes) -> str:
    """The tool's stdout; it must exit 0 and print nothing on stderr but the root warning."""
    err = [
        line
        for line in stderr.decode(errors="replace").splitlines()
        if line.strip() and not _ROOT_WARNING.match(line)
    ]
    assert returncode == 0 and not err, f"{Path(args[0]).name} exited {returncode}: {err}"
    return stdout.decode()


def _run(*args) -> str:
    args = [str(a) for a in args]
    proc = subprocess.run(args, capture_output=True, timeout=120, check=False)
    return _checked(args, proc.returncode, proc.stdout, proc.stderr)


def _units(tsresol: int) -> int:
    return 1 << (tsresol & 0x7F) if tsresol & 0x80 else 10 ** (tsresol & 0x7F)


def _ns(t: Fraction | None) -> Fraction | None:
    """A time as Wireshark shows it: floored to the nanosecond."""
    return None if t is None else Fraction(math.floor(t * 10**9), 10**9)


def _payload(n: int, seed: int) -> bytes:
    return bytes((seed * 37 + k * 31 + 1) & 0xFF for k in range(n))


@dataclass(frozen=True)
class Exp:
    """One packet as a writer was told to write it."""

    linktype: int
    ticks: int | None
    data: bytes
    origlen: int
    flags: int | None = None
    comments: tuple[str, ...] = ()
    options: tuple = ()
    tsresol: int = 6
    tsoffset: int = 0
    section: int = 0
    ifid: int = 0

    @property
    def time(self) -> Fraction | None:
        if self.ticks is None:
            return None
        return Fraction(self.ticks, _units(self.tsresol)) + self.tsoffset

    def key(self) -> tuple:
        """Same shape as stm's Packet.key()."""
        return (
            self.linktype,
            self.time,
            len(self.data),
            self.origlen,
            self.data,
            self.flags,
            self.comments,
        )


@dataclass(frozen=True)
class Row:
    """One packet as tshark shows it (or as stm's view of it should look in tshark)."""

    section: int
    ifid: int
    encap: int | None
    time: Fraction | None
    origlen: int
    caplen: int
    data: bytes
    comments: tuple[str, ...] = ()
    flags: int | None = None
    extra: dict = field(default_factory=dict)


_EXTRA = {c.EPB_DROPCOUNT: "frame.drop_count", c.EPB_PACKETID: "frame.packet_id"}
_EXTRA[c.EPB_QUEUE] = "frame.interface_queue"


def _extra(options) -> dict:
    return {_EXTRA[k]: v for k, v in options if k in _EXTRA}


def _row_of_exp(e: Exp) -> Row:
    return Row(
        e.section,
        e.ifid,
        WTAP_ENCAP.get(e.linktype),
        _ns(e.time),
        e.origlen,
        len(e.data),
        e.data,
        e.comments,
        e.flags,
        _extra(e.options),
    )


def _row_of_packet(p: sp.Packet) -> Row:
    return Row(
        p.interface.section,
        p.interface.id,
        WTAP_ENCAP.get(p.linktype),
        _ns(p.time),
        p.origlen,
        p.caplen,
        bytes(p.data),
        tuple(x.split("\0")[0] for x in p.comments),  # Wireshark shows up to a NUL
        p.flags,
        _extra(p.options),
    )


def _all_values(pairs):
    """JSON object hook keeping repeated keys (tshark repeats frame.comment)."""
    out: dict = {}
    for k, v in pairs:
        out.setdefault(k, []).append(v)
    return out


def _tshark_rows(path: Path, *, pcap: bool = False) -> list[Row]:
    out = _run(_tool("tshark"), "-n", "-r", path, "-T", "json", "-x", "-j", "frame pkt_comment")
    rows = []
    for doc in json.loads(out, object_pairs_hook=_all_values) if out.strip() else []:
        layers = doc["_source"][0]["layers"][0]
        frame = {k: v[0] for k, v in layers["frame"][0].items()}
        if "frame.cb_pen" in frame:  # Wireshark 4 shows custom blocks as records
            continue
        epoch = frame.get("frame.time_epoch")
        flags = frame.get("frame.packet_flags")
        rows.append(
            Row(
                int(frame.get("frame.section_number", 1)) - 1,
                0 if pcap else int(frame["frame.interface_id"]),
                int(frame["frame.encap_type"]),
                None if epoch is None else Fraction(epoch),
                int(frame["frame.len"]),
                int(frame["frame.cap_len"]),
                bytes.fromhex(layers.get("frame_raw", [[""]])[0][0]),
                tuple(layers.get("pkt_comment", [{}])[0].get("frame.comment", ())),
                None if flags is None else int(flags, 16),
                {k: int(frame[k]) for k in _EXTRA.values() if k in frame},
            )
        )
    return rows


def _capinfos(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """capinfos -M: the file-level lines and the first listing of the interfaces."""
    out = _run(_tool("capinfos"), "-M", path)
    top: dict[str, str] = {}
    ifaces: list[dict[str, str]] = []
    current = None
    listings = 0
    for line in out.splitlines():
        if re.match(r"Interface #\d+ info:", line):
            current = {} if listings == 1 else None
            if current is not None:
                ifaces.append(current)
        elif line.startswith(" ") and "=" in line and current is not None:
            key, value = line.split("=", 1)
            current[key.strip()] = value.strip()
        elif ":" in line and not line.startswith(" "):
            key, value = line.split(":", 1)
            if key == "Number of interfaces in file":
                listings += 1
            top.setdefault(key.strip(), value.strip())
            current = None
    return top, ifaces


def _ours(source) -> list[sp.Packet]:
    return list(sp.read(source))


def _events(source) -> list:
    return list(sp.read_events(source))


# -- 1. files written by others, read by stm ---------------------------------------------------


# python-pcapng warns about its own untyped if_tsresol option.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("bo", ["<", ">"], ids=["le", "be"])
def test_python_pcapng_writer_is_read_exactly(bo):
    pcapng = _lib("pcapng")
    from pcapng import blocks, strictness

    shb = blocks.SectionHeader(
        endianness=bo,
        options={"shb_hardware": "oracle", "shb_os": "any", "shb_userappl": "python-pcapng"},
    )
    ifaces = [  # linktype, snaplen, if_tsresol byte, if_tsoffset, name
        (1, 0, 9, 0, "eth0"),
        (101, 65535, 0x94, 3600, "raw0"),
        (113, 262144, None, -7200, None),
        (1, 0, 3, 0, "ms"),
    ]
    for lt, snap, res, off, name in ifaces:
        opts: dict = {}
        if name is not None:
            opts["if_name"] = name
        if res is not None:
            opts["if_tsresol"] = bytes([res])
        if off:
            opts["if_tsoffset"] = off
        shb.new_member(blocks.InterfaceDescription, link_type=lt, snaplen=snap, options=opts)
    buf = io.BytesIO()
    writer = pcapng.FileWriter(buf, shb)
    exp: list[Exp] = []
    plan = [  # ifid, ticks, caplen, origlen, flags, comments, hash/dropcount/packetid/queue
        (0, 1_700_000_000_123_456_789, 60, 60, 1, ["first", "zweite ✓"], {}),
        (1, (1_700_000_000 << 20) + 1, 1, 1500, 2, [], {"epb_dropcount": 4}),
        (2, 1_700_000_000_999_999, 3, 3, None, ["x, y"], {"epb_packetid": 2**64 - 1}),
        (3, 1_700_000_001_001, 2, 2, 0x01000002, [], {"epb_queue": 3}),
        (0, 1, 1514, 1514, None, [], {"epb_hash": [(2, bytes(range(16)))]}),
    ]
    for i, (ifid, ticks, caplen, origlen, flags, comments, more) in enumerate(plan):
        opts = dict(more)
        if comments:
            opts["opt_comment"] = comments
        if flags is not None:
            opts["epb_flags"] = flags
        data = _payload(caplen, i)
        writer.write_block(
            shb.new_member(
                blocks.EnhancedPacket,
                interface_id=ifid,
                timestamp_high=ticks >> 32,
                timestamp_low=ticks & 0xFFFFFFFF,
                packet_data=data,
                packet_len=origlen,
                options=opts,
            )
        )
        lt, _, res, off, _ = ifaces[ifid]
        options = []
        if "epb_hash" in more:
            options.append((c.EPB_HASH, bytes([2]) + bytes(range(16))))
        for name, code in (("epb_dropcount", 4), ("epb_packetid", 5), ("epb_queue", 6)):
            if name in more:
                options.append((code, more[name]))
        exp.append(
            Exp(lt, ticks, data, origlen, flags, tuple(comments), tuple(options), res or 6, off)
        )
    records = [
        {"type": 1, "address": "192.0.2.1", "names": ["a.example", "b.example"]},
        {"type": 2, "address": "2001:db8::1", "names": ["v6.example"]},
    ]
    writer.write_block(
        shb.new_member(blocks.NameResolution, records=records, options={"ns_dnsname": "ns"})
    )
    isb_opts = {"isb_ifrecv": 100, "isb_ifdrop": 3, "isb_osdrop": 2, "opt_comment": ["st"]}
    writer.write_block(
        shb.new_member(
            blocks.InterfaceStatistics,
            interface_id=1,
            timestamp_high=7,
            timestamp_low=9,
            options=isb_opts,
        )
    )
    # An obsolete Packet Block: python-pcapng only writes one when told not to be strict.
    saved = strictness.strict_level
    strictness.set_strictness(strictness.Strictness.NONE)
    try:
        writer.write_block(
            shb.new_member(
                blocks.ObsoletePacket,
                interface_id=2,
                drops_count=5,
                timestamp_high=0,
                timestamp_low=123,
                packet_data=b"\x01\x02\x03\x04\x05",
                packet_len=9,
                options={"pack_flags": 1},
            )
        )
    finally:
        strictness.set_strictness(saved)
    exp.append(Exp(113, 123, b"\x01\x02\x03\x04\x05", 9, 1, (), ((4, 5),), 6, -7200))
    # Second section: one interface, Simple Packet Blocks (one cut by the snaplen).
    shb2 = blocks.SectionHeader(endianness=bo)
    shb2.new_member(blocks.InterfaceDescription, link_type=1, snaplen=256)
    writer.write_block(shb2)
    for data, origlen in ((_payload(61, 1), 61), (_payload(256, 2), 300), (b"\x01\x02\x03", 3)):
        writer.write_block(
            shb2.new_member(blocks.SimplePacket, packet_data=data, packet_len=origlen)
        )
        exp.append(Exp(1, None, data, origlen, section=1))

    events = _events(buf.getvalue())
    packets = [e for e in events if isinstance(e, sp.Packet)]
    assert [p.key() for p in packets] == [e.key() for e in exp]
    assert [p.options for p in packets] == [e.options for e in exp]
    assert [p.block for p in packets] == [c.EPB] * 5 + [c.PB] + [c.SPB] * 3
    sections = [e for e in events if isinstance(e, sp.Section)]
    assert [s.byte_order for s in sections] == [bo, bo]
    assert dict(sections[0].options) == {2: "oracle", 3: "any", 4: "python-pcapng"}
    interfaces = [e for e in events if isinstance(e, sp.Interface)]
    assert [(i.linktype, i.snaplen, i.tsresol, i.tsoffset, i.name) for i in interfaces] == [
        (lt, snap, res or 6, off, name) for lt, snap, res, off, name in ifaces
    ] + [(1, 256, 6, 0, None)]
    (nrb,) = [e for e in events if isinstance(e, sp.NameResolution)]
    assert nrb.records == (
        (1, socket.inet_aton("192.0.2.1") + b"a.example\0b.example\0"),
        (2, socket.inet_pton(socket.AF_INET6, "2001:db8::1") + b"v6.example\0"),
    )
    assert nrb.options == ((c.NS_DNSNAME, "ns"),)
    (isb,) = [e for e in events if isinstance(e, sp.InterfaceStatistics)]
    assert (isb.interface.id, isb.ts) == (1, (7 << 32) | 9)
    assert sorted(isb.options, key=str) == sorted(
        [(c.ISB_IFRECV, 100), (c.ISB_IFDROP, 3), (c.ISB_OSDROP, 2), (c.OPT_COMMENT, "st")],
        key=str,
    )


def _scapy_packets():
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import CookedLinux, Ether
    from scapy.packet import Raw

    eth = Ether(src="00:00:5e:00:53:01", dst="00:00:5e:00:53:02") / IP(dst="192.0.2.7")
    return [
        eth / UDP(sport=5060, dport=5060) / Raw(b"INVITE sip:a@b SIP/2.0\r\n\r\n"),
        IP(src="192.0.2.1", dst="192.0.2.2") / UDP() / Raw(b"x" * 3),
        CookedLinux(pkttype=4, proto=0x0800) / IP() / UDP() / Raw(b"sll"),
        eth / UDP() / Raw(_payload(1400, 9)),
    ]


@pytest.mark.parametrize(
    ("nano", "endianness"),
    [(False, "<"), (True, ">"), (True, "<"), (False, ">")],
    ids=["us-le", "ns-be", "ns-le", "us-be"],
)
def test_scapy_pcap_writer_is_read_exactly(tmp_path, nano, endianness):
    utils = _lib("scapy.utils")
    units = 10**9 if nano else 10**6
    ticks = [1_700_000_000_123_456_789, 1_700_000_001_000_000_000, 999_999_999, 5]
    exp = []
    for i, p in enumerate(_scapy_packets()):
        t = ticks[i] if nano else ticks[i] // 1000
        exp.append(Exp(1, t, bytes(p), len(p) + 100 * i, tsresol=9 if nano else 6))
    path = tmp_path / "scapy.pcap"
    with utils.PcapWriter(str(path), linktype=1, nano=nano, endianness=endianness) as w:
        w.write_header(None)
        for e in exp:  # bytes with explicit seconds and (micro|nano)seconds
            sec, frac = divmod(e.ticks, units)
            w.write_packet(e.data, sec=sec, usec=frac, wirelen=e.origlen)
    events = _events(path)
    assert (events[0].format, events[0].byte_order) == ("pcap", endianness)
    assert [p.key() for p in events[2:]] == [e.key() for e in exp]


def test_scapy_wrpcap_is_read_exactly(tmp_path):
    utils = _lib("scapy.utils")
    pkts = _scapy_packets()
    pkts = pkts[:1] + pkts[3:]  # Ethernet only: a classic pcap has one link type
    times = [Decimal("1700000000.654321"), Decimal("1700000009.000001")]
    for p, t in zip(pkts, times, strict=True):
        p.time = t  # wrpcap takes the time and the wire length from the packets
        p.wirelen = len(p) + 4
    path = tmp_path / "wrpcap.pcap"
    utils.wrpcap(str(path), pkts)
    assert [p.key() for p in _ours(path)] == [
        Exp(1, int(t * 10**6), bytes(p), len(p) + 4).key() for p, t in zip(pkts, times, strict=True)
    ]


def test_scapy_pcapng_writer_is_read_exactly(tmp_path):
    utils = _lib("scapy.utils")
    pkts = _scapy_packets()
    # scapy writes int(float(time) * 1e6): times that are binary fractions stay exact.
    times = [1_700_000_000.5, 1_700_000_000.015625, 1_700_000_001.25, 1_700_000_002.0]
    sniffed = [None, "ip0", "any", "eth1"]
    linktypes = [1, 228, 113, 1]
    comments = [[b"one"], [b"two", "drei ✓".encode()], None, [b"a, b"]]
    directions = [1, 2, None, 0]
    for p, t, s, com, d in zip(pkts, times, sniffed, comments, directions, strict=True):
        p.time = t
        p.wirelen = len(p) + 1
        if s is not None:
            p.sniffed_on = s
        if com is not None:
            p.comments = com
        if d is not None:
            p.direction = d
    path = tmp_path / "scapy.pcapng"
    with utils.PcapNgWriter(str(path)) as w:
        w.write(pkts)
    got = _ours(path)
    assert [p.key() for p in got] == [
        Exp(
            lt,
            int(float(t) * 1_000_000),
            bytes(p),
            len(p) + 1,
            None if d is None else d & 3,
            tuple(x.decode() for x in com or ()),
        ).key()
        for p, t, lt, com, d in zip(pkts, times, linktypes, comments, directions, strict=True)
    ]
    assert [p.interface.id for p in got] == [0, 1, 2, 3]
    assert [p.interface.name for p in got] == sniffed


@pytest.mark.parametrize("nano", [False, True], ids=["us", "ns"])
@pytest.mark.parametrize("little", [True, False], ids=["le", "be"])
def test_dpkt_pcap_writer_is_read_exactly(monkeypatch, nano, little):
    dpkt = _lib("dpkt")
    monkeypatch.setattr(dpkt.pcap.Writer, "_Writer__le", little)
    times = ["1700000000.000001", "1700000000.999999", "1700000001.5", "1"]
    if nano:
        times += ["1700000002.000000001", "1700000002.999999999"]
    buf = io.BytesIO()
    writer = dpkt.pcap.Writer(buf, snaplen=65535, linktype=101, nano=nano)
    exp = []
    units = 10**9 if nano else 10**6
    for i, t in enumerate(times):
        data = _payload(i * 7, i)
        writer.writepkt(data, ts=Decimal(t))  # dpkt: int(ts), round(ts % 1 * units)
        exp.append(Exp(101, int(Decimal(t) * units), data, len(data), tsresol=9 if nano else 6))
    events = _events(buf.getvalue())
    assert events[0].byte_order == ("<" if little else ">")
    assert events[1].snaplen == 65535
    assert [p.key() for p in events[2:]] == [e.key() for e in exp]


@pytest.mark.parametrize("little", [True, False], ids=["le", "be"])
def test_dpkt_pcapng_writer_is_read_exactly(monkeypatch, little):
    dpkt = _lib("dpkt")
    ng = dpkt.pcapng
    monkeypatch.setattr(ng.Writer, "_Writer__le", little)
    sfx = "LE" if little else ""
    Opt = getattr(ng, "PcapngOption" + sfx)
    bo = "<" if little else ">"

    # The default interface: microseconds, bytes and float times given to writepkt.
    buf = io.BytesIO()
    writer = ng.Writer(buf, snaplen=1500, linktype=113)
    times = [1_700_000_000.25, 1_700_000_000.5, 1_700_000_001.0]
    datas = [_payload(n, n) for n in (1, 16, 99)]
    for t, d in zip(times, datas, strict=True):
        writer.writepkt(d, ts=t)
    got = _ours(buf.getvalue())
    assert [p.key() for p in got] == [
        Exp(113, round(t * 1_000_000), d, len(d)).key() for t, d in zip(times, datas, strict=True)
    ]

    # An interface with if_tsresol=9 and if_tsoffset, blocks with comments and flags.
    shb = getattr(ng, "SectionHeaderBlock" + sfx)(
        opts=[Opt(code=ng.PCAPNG_OPT_SHB_USERAPPL, data=b"dpkt"), Opt(code=0)]
    )
    idb = getattr(ng, "InterfaceDescriptionBlock" + sfx)(
        linktype=1,
        snaplen=65535,
        opts=[
            Opt(code=ng.PCAPNG_OPT_IF_TSRESOL, data=b"\x09"),
            Opt(code=ng.PCAPNG_OPT_IF_TSOFFSET, data=struct.pack(bo + "q", 86400)),
            Opt(code=0),
        ],
    )
    buf = io.BytesIO()
    writer = ng.Writer(buf, shb=shb, idb=idb)
    EPB = getattr(ng, "EnhancedPacketBlock" + sfx)
    exp = []
    for i, ticks in enumerate([1_700_000_000_000_000_001, 1_699_999_999_999_999_999, 5]):
        data = _payload(60 + i, i)
        opts = [Opt(code=ng.PCAPNG_OPT_COMMENT, text=f"comment {i}")] * (i + 1)
        opts += [Opt(code=2, data=struct.pack(bo + "I", i + 1)), Opt(code=0)]
        writer.writepkt(
            EPB(ts_high=ticks >> 32, ts_low=ticks & 0xFFFFFFFF, pkt_data=data, opts=opts)
        )
        exp.append(Exp(1, ticks, data, len(data), i + 1, (f"comment {i}",) * (i + 1), (), 9, 86400))
    events = _events(buf.getvalue())
    assert events[0].byte_order == bo
    assert dict(events[0].options) == {c.SHB_USERAPPL: "dpkt"}
    assert [e.key() for e in events if isinstance(e, sp.Packet)] == [e.key() for e in exp]


def _assert_ours_match_tshark(path: Path, *, pcap: bool = False) -> list[sp.Packet]:
    ours = _ours(path)
    assert [_row_of_packet(p) for p in ours] == _tshark_rows(path, pcap=pcap)
    return ours


def _sample(name: str) -> Path:
    path = SAMPLES / name
    if not path.exists():
        pytest.skip(f"sample {path} is missing")
    return path


@pytest.mark.parametrize("fmt", ["pcapng", "pcap", "nsecpcap"])
@pytest.mark.parametrize("name", ["sip_udp_ipv6.pcapng", "sip_tcp_ipv4.pcap"])
def test_editcap_conversions_are_read_exactly(tmp_path, name, fmt):
    source = _sample(name)
    out = tmp_path / f"out.{fmt}"
    _run(_tool("editcap"), "-F", fmt, source, out)
    got = _assert_ours_match_tshark(out, pcap=fmt != "pcapng")
    src = _ours(source)
    assert len(got) == len(src) > 0
    units = 10**6 if fmt == "pcap" else 10**9
    for g, s in zip(got, src, strict=True):
        assert (g.linktype, g.caplen, g.origlen, bytes(g.data)) == (
            s.linktype,
            s.caplen,
            s.origlen,
            bytes(s.data),
        )
        # pcap keeps microseconds (editcap truncates); the others keep the exact time.
        assert g.time == Fraction(math.floor(s.time * units), units)
    want = {"pcap": 6, "nsecpcap": 9}.get(fmt, src[0].interface.tsresol)
    assert _events(out)[1].tsresol == want


# -- 2. files written by stm, read by the others -----------------------------------------------

IFACES = {  # name: linktype, snaplen, if_tsresol, if_tsoffset
    "any": (113, 0, 0x94, 1000),  # Linux SLL, 2^-20 s ticks, +1000 s
    "raw0": (101, 65535, 6, 0),  # raw IP, microseconds (no if_tsresol option)
    "eth0": (1, 0, 9, 0),  # Ethernet, nanoseconds
    "ip4": (228, 262144, 3, -3600),  # raw IPv4, milliseconds, -1 h
}
HASH = (c.EPB_HASH, b"\x02" + bytes(range(16)))
PACKETS = [  # interface, seconds, sub-second ticks, caplen, origlen, flags, comments, options
    ("eth0", 1_700_000_000, 123_456_789, 60, 60, 0x1, ("first",), ()),
    ("any", 1_700_000_000, 5, 16, 16, 0x2, ("a, b", "héllo ✓", "", "three\nlines"), ()),
    ("raw0", 1_700_000_001, 1, 1, 60, None, (), (HASH, (4, 5), (5, 2**63 + 1), (6, 7))),
    ("ip4", 1_700_000_002, 999, 20, 1500, 0x01000001, (), ()),
    ("eth0", 1_700_000_003, 999_999_999, 0, 0, None, ("empty frame",), ((4, 0),)),
    ("any", 1_700_000_004, (1 << 20) - 1, 2, 2, None, (), ((6, 1),)),
    ("eth0", 1_700_000_005, 0, 1514, 1514, 0x1, (), ()),
    ("raw0", 1_700_000_006, 999_999, 3, 3, None, ("x",) * 3, ((5, 0),)),
]
SHB_OPTIONS = [
    (c.SHB_HARDWARE, "x86_64"),
    (c.SHB_OS, "Linux"),
    (c.SHB_USERAPPL, "stm oracle tests"),
    (c.OPT_COMMENT, "section one"),
]
NRB = sp.NameResolution(
    (
        (c.NRB_RECORD_IPV4, socket.inet_aton("192.0.2.1") + b"host.example\0"),
        (c.NRB_RECORD_IPV6, socket.inet_pton(socket.AF_INET6, "2001:db8::2") + b"v6.example\0"),
    ),
    ((c.NS_DNSNAME, "dns.example"), (c.OPT_COMMENT, "names")),
)
DSB = sp.DecryptionSecrets(
    0x544C534B, b"CLIENT_RANDOM " + b"ab" * 32 + b" " + b"cd" * 48 + b"\n", ((1, "keys"),)
)
CB_COPY = sp.CustomBlock(c.CB_COPY, 32473, b"copy me")
CB_NOCOPY = sp.CustomBlock(c.CB_NOCOPY, 32473, b"do not copy")
EXTRA_BLOCKS = {1: CB_COPY, 2: NRB, 4: DSB, 5: CB_NOCOPY}  # written after packet N


def _isb_options(units: int) -> list:
    return [
        (c.ISB_STARTTIME, 1_700_000_000 * units),
        (c.ISB_ENDTIME, 1_700_000_007 * units + 1),
        (c.ISB_IFRECV, 100),
        (c.ISB_IFDROP, 3),
        (c.ISB_FILTERACCEPT, 90),
        (c.ISB_OSDROP, 1),
        (c.ISB_USRDELIV, 88),
        (c.OPT_COMMENT, "stats"),
    ]


def _write_rich(path: Path, bo: str, order: tuple[str, ...], sections: int = 3) -> list[Exp]:
    """An stm file with every feature; returns the packets it was told to write."""
    exp: list[Exp] = []
    with open(path, "wb") as f, sp.Writer(f, byte_order=bo, options=SHB_OPTIONS) as w:
        ids = {}
        for name in order:
            lt, snap, res, off = IFACES[name]
            ids[name] = w.add_interface(lt, snap, name=name, tsresol=res, tsoffset=off)
        for i, (name, sec, sub, caplen, origlen, flags, comments, opts) in enumerate(PACKETS):
            lt, snap, res, off = IFACES[name]
            ticks = sec * _units(res) + sub
            data = _payload(caplen, i)
            w.write_packet(
                ids[name],
                ticks,
                data,
                origlen=origlen,
                flags=flags,
                comments=comments,
                options=opts,
            )
            exp.append(Exp(lt, ticks, data, origlen, flags, comments, opts, res, off, 0, ids[name]))
            if i in EXTRA_BLOCKS:
                w.write_block(EXTRA_BLOCKS[i])
        for name in order:
            units = _units(IFACES[name][2])
            w.write_statistics(ids[name], 1_700_000_008 * units, _isb_options(units))
        if sections > 1:  # one interface, Simple Packet Blocks
            w.new_section([(c.OPT_COMMENT, "section two")])
            w.add_interface(1, 65535, name="spb", tsresol=6)
            for i, n in enumerate((3, 61, 1514)):
                data = _payload(n, 50 + i)
                w.write_packet(0, None, data)
                exp.append(Exp(1, None, data, n, section=1))
            w.write_packet(0, 1_700_000_010_000_000, _payload(61, 9), flags=1)
            exp.append(Exp(1, 1_700_000_010_000_000, _payload(61, 9), 61, 1, section=1))
        if sections > 2:  # the interfaces again, in the reverse order
            w.new_section()
            for ifid, name in enumerate(reversed(order)):
                lt, snap, res, off = IFACES[name]
                w.add_interface(lt, snap, tsresol=res, tsoffset=off)
                ticks = 1_700_000_020 * _units(res) + ifid
                data = _payload(40 + ifid, ifid)
                w.write_packet(ifid, ticks, data, comments=[name])
                exp.append(Exp(lt, ticks, data, len(data), None, (name,), (), res, off, 2, ifid))
    return exp


RICH_CASES = [
    ("<", ("eth0", "raw0", "any", "ip4")),
    (">", ("any", "ip4", "raw0", "eth0")),
    (">", ("eth0", "raw0", "any", "ip4")),
    ("<", ("ip4", "any", "eth0", "raw0")),
]


@pytest.fixture(
    scope="module",
    params=RICH_CASES,
    ids=[f"{'le' if bo == '<' else 'be'}-{'-'.join(o)}" for bo, o in RICH_CASES],
)
def rich(request, tmp_path_factory):
    bo, order = request.param
    tmp = tmp_path_factory.mktemp("rich")
    path, single = tmp / "rich.pcapng", tmp / "single.pcapng"
    return SimpleNamespace(
        bo=bo,
        order=order,
        path=path,
        exp=_write_rich(path, bo, order),
        single=single,
        exp_single=_write_rich(single, bo, order, sections=1),
    )


def test_rich_file_is_read_back_by_stm(rich):
    events = _events(rich.path)
    packets = [e for e in events if isinstance(e, sp.Packet)]
    assert [p.key() for p in packets] == [e.key() for e in rich.exp]
    assert [p.options for p in packets] == [e.options for e in rich.exp]
    assert [(p.interface.section, p.interface.id) for p in packets] == [
        (e.section, e.ifid) for e in rich.exp
    ]
    sections = [e for e in events if isinstance(e, sp.Section)]
    assert [s.byte_order for s in sections] == [rich.bo] * 3
    assert list(sections[0].options) == SHB_OPTIONS
    blocks = [e for e in events if isinstance(e, (sp.NameResolution, sp.DecryptionSecrets))]
    assert blocks == [NRB, DSB]
    cbs = [e for e in events if isinstance(e, sp.CustomBlock)]
    # Custom data has no length field: it comes back with the block's padding.
    assert [(b.block_type, b.pen, b.data.rstrip(b"\0")) for b in cbs] == [
        (b.block_type, b.pen, b.data) for b in (CB_COPY, CB_NOCOPY)
    ]
    isbs = [e for e in events if isinstance(e, sp.InterfaceStatistics)]
    assert [(s.interface.id, s.options) for s in isbs] == [
        (i, tuple(_isb_options(_units(IFACES[n][2])))) for i, n in enumerate(rich.order)
    ]


def _swap_words(value: int) -> int:
    return ((value & 0xFFFFFFFF) << 32) | (value >> 32)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_rich_file_is_read_by_python_pcapng(rich):
    pcapng = _lib("pcapng")
    from pcapng import blocks

    names = {"epb_hash": 3, "epb_dropcount": 4, "epb_packetid": 5, "epb_queue": 6}
    got, nrbs, isbs, unknown = [], [], [], []
    section = -1
    with open(rich.path, "rb") as f:
        for b in pcapng.FileScanner(f):
            if isinstance(b, blocks.SectionHeader):
                section += 1
                assert b.endianness == rich.bo
            elif isinstance(b, (blocks.EnhancedPacket, blocks.SimplePacket)):
                iface = b.interface
                res = iface.options.get("if_tsresol", b"\x06")[0]
                ticks = None
                opts: tuple = ()
                flags = None
                comments: tuple = ()
                if isinstance(b, blocks.EnhancedPacket):
                    ticks = (b.timestamp_high << 32) | b.timestamp_low
                    flags = int(b.options["epb_flags"]) if "epb_flags" in b.options else None
                    comments = tuple(b.options.get_all("opt_comment"))
                    opts = tuple(
                        (names[k], bytes([v[0][0]]) + v[0][1] if k == "epb_hash" else v[0])
                        for k, v in b.options.iter_all_items()
                        if k in names
                    )
                got.append(
                    Exp(
                        iface.link_type,
                        ticks,
                        bytes(b.packet_data),
                        b.packet_len,
                        flags,
                        comments,
                        opts,
                        res,
                        iface.options.get("if_tsoffset", 0),
                        section,
                        b.interface_id,
                    )
                )
            elif isinstance(b, blocks.NameResolution):
                nrbs.append(b)
            elif isinstance(b, blocks.InterfaceStatistics):
                isbs.append(b)
            elif isinstance(b, blocks.UnknownBlock):
                unknown.append((b.block_type, b.data))
    # python-pcapng keeps options in its own order: compare them sorted.
    norm = [
        (e.section, e.ifid, e.key(), e.tsresol, e.tsoffset, sorted(e.options)) for e in rich.exp
    ]
    assert [
        (g.section, g.ifid, g.key(), g.tsresol, g.tsoffset, sorted(g.options)) for g in got
    ] == norm
    (nrb,) = nrbs
    assert nrb.records == [
        {"type": 1, "address": "192.0.2.1", "names": ["host.example"]},
        {"type": 2, "address": "2001:db8::2", "names": ["v6.example"]},
    ]
    assert dict(nrb.options) == {"ns_dnsname": "dns.example", "opt_comment": "names"}
    assert [s.interface_id for s in isbs] == list(range(len(rich.order)))
    for s, name in zip(isbs, rich.order, strict=True):
        want = dict(_isb_options(_units(IFACES[name][2])))
        assert (s.timestamp_high << 32 | s.timestamp_low) == 1_700_000_008 * _units(IFACES[name][2])
        # python-pcapng decodes isb_starttime/endtime as one u64, not as two u32 words.
        fix = (lambda v: v) if rich.bo == ">" else _swap_words
        assert fix(s.options["isb_starttime"]) == want[c.ISB_STARTTIME]
        assert fix(s.options["isb_endtime"]) == want[c.ISB_ENDTIME]
        for key in ("ifrecv", "ifdrop", "filteraccept", "osdrop", "usrdeliv"):
            assert s.options["isb_" + key] == want[getattr(c, "ISB_" + key.upper())]
        assert s.options["opt_comment"] == "stats"
    u32 = struct.Struct(rich.bo + "I")
    dsb_body = u32.pack(DSB.secrets_type) + u32.pack(len(DSB.data)) + DSB.data
    assert [(t, d[: 8 + len(DSB.data)] if t == c.DSB else d) for t, d in unknown] == [
        (c.CB_COPY, u32.pack(32473) + b"copy me\0"),
        (c.DSB, dsb_body),
        (c.CB_NOCOPY, u32.pack(32473) + b"do not copy\0"),
    ]


def test_rich_file_is_read_by_tshark_and_capinfos(rich):
    assert _tshark_rows(rich.path) == [_row_of_exp(e) for e in rich.exp]
    top, ifaces = _capinfos(rich.path)
    assert top["File type"] == "pcapng"
    assert top["Number of packets"] == str(len(rich.exp))
    assert top["Capture hardware"] == "x86_64"
    assert top["Capture application"] == "stm oracle tests"
    assert top["Number of resolved IPv4 addresses in file"] == "1"
    assert top["Number of decryption secrets in file"] == "1"
    # Interfaces of every section, numbered across the file.
    names = [*rich.order, "spb", *reversed(rich.order)]
    assert top["Number of interfaces in file"] == str(len(names))
    for info, name in zip(ifaces, names, strict=True):
        lt, snap, res, off = IFACES.get(name, (1, 65535, 6, 0))
        assert f"({WTAP_ENCAP[lt]} - " in info["Encapsulation"]
        assert info["Capture length"] == str(snap)
        assert info["Time ticks per second"] == str(_units(res))
        assert info.get("Time resolution") == (None if res == 6 else f"0x{res:02x}")
        assert info.get("Timestamp offset") == (str(off) if off else None)


def test_single_section_file_is_read_by_capinfos(rich):
    top, ifaces = _capinfos(rich.single)
    assert top["Number of packets"] == str(len(rich.exp_single))
    assert top["Strict time order"] == "False"
    assert len(ifaces) == len(rich.order)
    for ifid, (info, name) in enumerate(zip(ifaces, rich.order, strict=True)):
        assert info["Name"] == name
        assert info["Number of stat entries"] == "1"
        assert info["Number of packets"] == str(sum(e.ifid == ifid for e in rich.exp_single))


def test_single_section_file_is_read_by_scapy(rich):
    utils = _lib("scapy.utils")
    # scapy keeps one interface list for the whole file (it does not restart it at an SHB)
    # and ignores if_tsoffset: it gets the single-section file, compared by raw ticks.
    got = []
    with utils.RawPcapNgReader(str(rich.single)) as reader:
        for data, meta in reader:
            got.append(
                (
                    meta.linktype,
                    meta.tsresol,
                    (meta.tshigh << 32) | meta.tslow,
                    data,
                    meta.wirelen,
                    tuple(x.decode() for x in meta.comments or ()),
                    meta.direction,
                    meta.ifname.decode(),
                )
            )
    assert got == [
        (
            e.linktype,
            _units(e.tsresol),
            e.ticks,
            e.data,
            e.origlen,
            e.comments,
            None if e.flags is None else e.flags & 3,
            rich.order[e.ifid],
        )
        for e in rich.exp_single
    ]
    pkts = utils.rdpcap(str(rich.single))
    assert len(pkts) == len(rich.exp_single)
    for p, e in zip(pkts, rich.exp_single, strict=True):
        assert p.wirelen == e.origlen
        assert abs(Fraction(Decimal(p.time)) - Fraction(e.ticks, _units(e.tsresol))) < 1e-12
        assert p.sniffed_on == rich.order[e.ifid]


@pytest.mark.parametrize(
    ("bo", "linktype", "tsresol", "tsoffset"),
    [("<", 1, 9, 0), (">", 1, 6, 0), (">", 113, 0x94, 3600), ("<", 101, 0x94, 0), (">", 1, 3, -60)],
)
def test_simple_file_is_read_by_dpkt(bo, linktype, tsresol, tsoffset):
    dpkt = _lib("dpkt")
    units = _units(tsresol)
    buf = io.BytesIO()
    exp = []
    with sp.Writer(buf, byte_order=bo, options=[(c.OPT_COMMENT, "for dpkt")]) as w:
        w.add_interface(linktype, 65535, name="if0", tsresol=tsresol, tsoffset=tsoffset)
        w.write_block(NRB)
        for i in range(6):
            ticks = (1_700_000_000 + i) * units + i * (units - 1) // 5
            data = _payload(i * 13 + 1, i)
            w.write_packet(0, ticks, data, flags=i or None, comments=["c"] * i)
            exp.append((ticks, data))
            if i == 2:
                w.write_block(CB_COPY)
                w.write_block(DSB)
        w.write_statistics(0, 1_700_000_009 * units, _isb_options(units))
    buf.seek(0)
    reader = dpkt.pcapng.Reader(buf)
    assert reader.datalink() == linktype
    assert reader.snaplen == 65535
    # dpkt computes tsoffset + ticks / float(units): the same float, if the ticks are right.
    assert list(reader) == [(tsoffset + t / float(units), d) for t, d in exp]


def test_single_section_files_are_converted_by_editcap(rich, tmp_path):
    out = tmp_path / "ed.pcapng"
    _run(_tool("editcap"), "-F", "pcapng", rich.single, out)
    got = _assert_ours_match_tshark(out)
    # editcap folds if_tsoffset into the ticks (through nanoseconds) and drops empty comments:
    # what it wrote is checked against tshark above; the packets themselves must not change.
    assert [(p.linktype, p.caplen, p.origlen, bytes(p.data), p.flags) for p in got] == [
        (e.linktype, len(e.data), e.origlen, e.data, e.flags) for e in rich.exp_single
    ]
    assert [tuple(x for x in p.comments if x) for p in got] == [
        tuple(x for x in e.comments if x) for e in rich.exp_single
    ]
    _assert_within_a_tick(got, rich.exp_single)


def test_both_byte_orders_are_merged_by_mergecap(tmp_path):
    a, b = tmp_path / "le.pcapng", tmp_path / "be.pcapng"
    exp = _write_rich(a, "<", RICH_CASES[0][1], sections=1)
    exp += _write_rich(b, ">", RICH_CASES[1][1], sections=1)
    out = tmp_path / "merged.pcapng"
    _run(_tool("mergecap"), "-a", "-F", "pcapng", "-w", out, a, b)
    got = _assert_ours_match_tshark(out)
    # Wireshark drops empty comments.
    assert [(p.linktype, bytes(p.data), p.origlen, p.flags, p.comments) for p in got] == [
        (e.linktype, e.data, e.origlen, e.flags, tuple(x for x in e.comments if x)) for e in exp
    ]
    _assert_within_a_tick(got, exp)


def _assert_within_a_tick(got: list[sp.Packet], exp: list[Exp]) -> None:
    """Wireshark's writers floor times to nanoseconds, then to the interface's ticks (folding
    if_tsoffset in): a 2^-20 s tick may come back up to a tick and a nanosecond early."""
    for p, e in zip(got, exp, strict=True):
        assert 0 <= e.time - p.time < Fraction(1, _units(e.tsresol)) + Fraction(1, 10**9), (p, e)


def _spb_case(snaplen: int, data: bytes, origlen: int):
    buf = io.BytesIO()
    w = sp.Writer(buf, byte_order="<")
    w.add_interface(1, snaplen, tsresol=6)
    w.write_packet(0, None, data, origlen=origlen)
    w.flush()
    return buf.getvalue()


@pytest.mark.parametrize(
    ("snaplen", "data", "origlen"),
    [(0, b"abcde", 100), (4, b"abcdefgh", 8)],
    ids=["shorter-than-origlen", "longer-than-snaplen"],
)
def test_simple_packet_block_is_refused_or_read_back(tmp_path, snaplen, data, origlen):
    try:
        raw = _spb_case(snaplen, data, origlen)
    except UsageError:
        return  # refusing what an SPB cannot carry is fine
    (p,) = _ours(raw)
    assert (bytes(p.data), p.origlen) == (data, origlen)
    path = tmp_path / "spb.pcapng"
    path.write_bytes(raw)
    assert _tshark_rows(path) == [Row(0, 0, 1, None, origlen, len(data), data)]


# -- 3. classic pcap written by stm --------------------------------------------------------------

CLASSIC_CASES = [(False, "<"), (False, ">"), (True, "<"), (True, ">")]


@pytest.fixture(
    scope="module",
    params=CLASSIC_CASES,
    ids=[f"{'ns' if n else 'us'}-{'le' if bo == '<' else 'be'}" for n, bo in CLASSIC_CASES],
)
def classic(request, tmp_path_factory):
    nano, bo = request.param
    units = 10**9 if nano else 10**6
    path = tmp_path_factory.mktemp("classic") / "stm.pcap"
    exp = []
    with open(path, "wb") as f:
        w = sp.PcapWriter(f, 113, snaplen=65535, nano=nano, byte_order=bo)
        for i, (sec, frac) in enumerate(
            [(1_700_000_000, 0), (1_700_000_000, units - 1), (1, 1), (0xFFFFFFFF, units // 3)]
        ):
            data = _payload(16 + i * 50, i)
            origlen = len(data) + (i % 2) * 1000
            w.write_packet(sec * units + frac, data, origlen)
            exp.append(Exp(113, sec * units + frac, data, origlen, tsresol=9 if nano else 6))
        w.write_packet(1_700_000_001 * units, b"", 0)
        exp.append(Exp(113, 1_700_000_001 * units, b"", 0, tsresol=9 if nano else 6))
        w.flush()
    return SimpleNamespace(nano=nano, bo=bo, units=units, path=path, exp=exp)


def test_classic_pcap_is_read_back_by_stm(classic):
    events = _events(classic.path)
    assert (events[0].format, events[0].byte_order) == ("pcap", classic.bo)
    assert (events[1].linktype, events[1].snaplen) == (113, 65535)
    assert [p.key() for p in events[2:]] == [e.key() for e in classic.exp]


def test_classic_pcap_is_read_by_dpkt(classic):
    dpkt = _lib("dpkt")
    with open(classic.path, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        assert (reader.datalink(), reader.snaplen) == (113, 65535)
        got = list(reader)
    # dpkt gives sec + frac / Decimal('1E9') (exact) for ns, sec + frac / 1E6 (float) for us.
    div = Decimal("1E9") if classic.nano else 1e6
    assert got == [
        (e.ticks // classic.units + (e.ticks % classic.units) / div, e.data) for e in classic.exp
    ]


def test_classic_pcap_is_read_by_scapy(classic):
    utils = _lib("scapy.utils")
    with utils.RawPcapReader(str(classic.path)) as reader:
        assert reader.linktype == 113
        got = [(m.sec, m.usec, m.caplen, m.wirelen, d) for d, m in reader]
    assert got == [
        (*divmod(e.ticks, classic.units), len(e.data), e.origlen, e.data) for e in classic.exp
    ]


def test_classic_pcap_is_read_by_tshark(classic):
    assert _tshark_rows(classic.path, pcap=True) == [_row_of_exp(e) for e in classic.exp]
    top, _ = _capinfos(classic.path)
    assert top["File type"] == ("nsecpcap" if classic.nano else "pcap")
    assert top["File encapsulation"] == "linux-sll"
    assert top["File timestamp precision"].startswith(
        "nanoseconds" if classic.nano else "microseconds"
    )


# -- 4. the shared corpus: stm and tshark see the same packets ----------------------------------

_CAPTURE_MAGICS = {
    b"\x0a\x0d\x0d\x0a",
    *(struct.pack(bo + "I", m) for bo in "<>" for m in (0xA1B2C3D4, 0xA1B23C4D, 0xA1B2CD34)),
}


def _corpus_root() -> Path:  # the same rule as the corpus_dir fixture, for collection
    env = os.environ.get("STM_CORPUS")
    return Path(env) if env else Path(__file__).parents[1].parent / "shared" / "corpus"


def _corpus_files() -> list[str]:
    root = _corpus_root()
    if not root.is_dir():
        return []
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                if f.read(4) in _CAPTURE_MAGICS:  # names do not always tell the format
                    files.append(p.relative_to(root).as_posix())
    return files


CORPUS_FILES = _corpus_files()
_TSHARK_FIELDS = ["frame.time_epoch", "frame.len", "frame.cap_len", "frame.cb_pen"]


class _TsharkAhead:
    """One tshark per corpus file, a few started ahead of the test that needs them."""

    def __init__(self, tshark: str, root: Path, out_dir: Path) -> None:
        self.tshark, self.root, self.out_dir = tshark, root, out_dir
        self.width = (os.cpu_count() or 2) + 1
        self.running: dict[str, tuple] = {}

    def _start(self, rel: str) -> None:
        fields = [x for name in _TSHARK_FIELDS for x in ("-e", name)]
        args = [self.tshark, "-n", "-r", str(self.root / rel), "-T", "fields", *fields]
        args += ["--disable-protocol", "ALL"]  # only frame fields are needed
        out = open(self.out_dir / f"{len(self.running)}.out", "w+b")  # noqa: SIM115
        err = open(self.out_dir / f"{len(self.running)}.err", "w+b")  # noqa: SIM115
        self.running[rel] = (args, subprocess.Popen(args, stdout=out, stderr=err), out, err)

    def output(self, rel: str) -> str:
        at = CORPUS_FILES.index(rel)
        for ahead in CORPUS_FILES[at : at + self.width]:
            if ahead not in self.running:
                self._start(ahead)
        args, proc, out, err = self.running[rel]
        returncode = proc.wait(timeout=120)
        with out, err:
            out.seek(0)
            err.seek(0)
            return _checked(args, returncode, out.read(), err.read())

    def close(self) -> None:
        for _, proc, out, err in self.running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
            err.close()


@pytest.fixture(scope="module")
def corpus_tshark(corpus_dir, tmp_path_factory):
    ahead = _TsharkAhead(_tool("tshark"), corpus_dir, tmp_path_factory.mktemp("tshark"))
    yield ahead
    ahead.close()


@pytest.mark.parametrize("rel", CORPUS_FILES or [pytest.param(None, id="no-corpus")])
def test_corpus_file_matches_tshark(corpus_dir, corpus_tshark, rel):
    out = corpus_tshark.output(rel)
    rows = [line.split("\t") for line in out.splitlines()]
    want = [(Fraction(t) if t else None, int(n), int(cap)) for t, n, cap, pen in rows if not pen]
    got = [(_ns(p.time), p.origlen, p.caplen) for p in _ours(corpus_dir / rel)]
    assert len(got) == len(want)
    assert got == want


RELAYED = [  # odd corpus files: big-endian obsolete Packet Blocks, many interfaces, ns + us
    "real/pfcp_be_pb.pcap",
    "real/pcapng_11if_null_rawip.pcapng",
    "real/pcapng_2if_eth_sll.pcapng",
    "real/nsec_be.pcap",
    "pcapng-test-generator/output_be/difficult/test202.pcapng",
]


def _relay(source: Path, out: Path, bo: str) -> list[sp.Packet]:
    """Copy every section, interface, packet and known block of ``source`` with stm's Writer."""
    packets = []
    with open(out, "wb") as f:
        w = None
        for event in sp.read_events(source):
            if isinstance(event, sp.Section):
                if w is None:
                    w = sp.Writer(f, byte_order=bo, options=event.options)
                else:
                    w.new_section(event.options)
            elif isinstance(event, sp.Interface):
                w.copy_interface(event)
            elif isinstance(event, sp.Packet):
                w.write(event, event.interface.id)
                packets.append(event)
            elif isinstance(event, (sp.NameResolution, sp.DecryptionSecrets, sp.CustomBlock)):
                w.write_block(event)
            elif isinstance(event, sp.InterfaceStatistics):
                w.write_statistics(event.interface.id, event.ts, event.options)
        w.flush()
    return packets


@pytest.mark.parametrize("rel", RELAYED)
def test_corpus_relayed_in_the_other_byte_order_is_read_by_tshark(corpus_dir, tmp_path, rel):
    source = corpus_dir / rel
    if not source.exists():
        pytest.skip(f"{rel} is not in the corpus at {corpus_dir}")
    bo = ">" if _events(source)[0].byte_order == "<" else "<"
    out = tmp_path / "relayed.pcapng"
    packets = _relay(source, out, bo)
    assert packets
    assert _tshark_rows(out) == [_row_of_packet(p) for p in packets]
