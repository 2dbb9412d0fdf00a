"""stm.capture: live capture on loopback, with real SIP traffic from SIPp.

Every capture here is on ``lo`` (or ``any``, which sees lo too) with a filter on ports
picked free for the test, and all traffic stays on 127.0.0.1. The tests need CAP_NET_RAW
(root): without it they are skipped, except the one that checks the message for that.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from stm import capture as cap
from stm import frames
from stm.errors import UsageError
from stm.pcapng import Interface, Packet, Section, Writer, read_events
from stm.pcapng import constants as c

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="AF_PACKET is Linux's"),
]

CALLS = 5
EXPECTED = ["INVITE", "180", "200", "ACK", "BYE", "200"]  # SIPp's uac/uas, per call
MAX_EVENTS = 10_000  # bound on what a collector keeps


def _can_capture() -> bool:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()
    except PermissionError:
        return False
    return True


needs_raw = pytest.mark.skipif(
    sys.platform.startswith("linux") and not _can_capture(),
    reason="live capture needs root or CAP_NET_RAW (run the tests as root)",
)


def _free_udp_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Collector:
    """A LiveCapture drained by a thread into a list (at most MAX_EVENTS events); ``keep``
    chooses the packets kept (all by default)."""

    def __init__(self, iface: str, bpf_filter: str | None, keep=None, **kwargs) -> None:
        self.keep = keep
        self.stop = threading.Event()
        self.events: list = []
        self.error: BaseException | None = None
        self.cpu: float | None = None
        self.capture = cap.LiveCapture(
            iface, bpf_filter, stop=self.stop, poll_interval=0.05, **kwargs
        )
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        started = time.thread_time()
        try:
            for event in self.capture.events():
                if self.keep is not None and type(event) is Packet and not self.keep(event):
                    continue
                self.events.append(event)
                if len(self.events) >= MAX_EVENTS:
                    break
        except BaseException as exc:  # handed to the test by finish()
            self.error = exc
        self.cpu = time.thread_time() - started

    @property
    def packets(self) -> list[Packet]:
        return [e for e in self.events if type(e) is Packet]

    def finish(self, timeout: float = 5.0) -> list:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the capture did not stop"
        if self.error is not None:
            raise self.error
        return self.events


def _wait_for(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def _sip(packet: Packet) -> tuple[str, str, int, bytes]:
    """(method or status code, Call-ID, source port, payload) of a captured SIP datagram."""
    s = frames.split(packet.linktype, packet.data)
    assert s is not None and s.proto == frames.UDP and s.family == 4
    payload = bytes(packet.data[s.offset : s.end])
    first, _, rest = payload.partition(b"\r\n")
    words = first.decode().split()
    kind = words[1] if words[0] == "SIP/2.0" else words[0]
    call_id = re.search(rb"^Call-ID:\s*(\S+)", rest, re.M | re.I)
    assert call_id, payload
    return kind, call_id.group(1).decode(), s.sport, payload


def _sent_messages(log: Path) -> list[bytes]:
    """The messages a SIPp instance sent, byte for byte, from its -trace_msg file."""
    data = log.read_bytes()
    out = []
    for m in re.finditer(rb"UDP message sent \((\d+) bytes\):\n\n", data):
        out.append(data[m.end() : m.end() + int(m.group(1))])
    return out


def _ipv4_header_ok(frame: bytes, l2: int) -> bool:
    header = frame[l2 : l2 + 20]
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF and struct.unpack_from("!H", header, 2)[0] == len(frame) - l2


@pytest.fixture(scope="module")
def sipp_run(tmp_path_factory):
    """CALLS SIPp calls on 127.0.0.1 between two free ports, captured on lo and any at
    once with several filters and snap lengths."""
    sipp = shutil.which("sipp")
    if sipp is None:
        pytest.skip("sipp is not installed (Debian: sip-tester)")
    if not _can_capture():
        pytest.skip("live capture needs root or CAP_NET_RAW (run the tests as root)")
    tmp = tmp_path_factory.mktemp("sipp")
    # SIPp's own uas scenario without its 4 s "timewait", so the UAS ends with its calls.
    uas_xml = subprocess.run([sipp, "-sd", "uas"], capture_output=True, text=True, timeout=10)
    scenario = re.sub(r"<timewait[^>]*/>", "", uas_xml.stdout)
    assert '<recv request="BYE">' in scenario
    (tmp / "uas.xml").write_text(scenario)
    uas_port, uac_port, unused = _free_udp_ports(3)
    flt = f"udp and (port {uas_port} or port {uac_port})"
    collectors = {
        "lo": Collector("lo", flt),
        "any": Collector("any", flt),
        "snap64": Collector("lo", flt, snaplen=64),
        "excluded": Collector("lo", f"udp port {unused} or (tcp and port {uas_port})"),
    }
    common = ["-i", "127.0.0.1", "-m", str(CALLS), "-timeout", "15s", "-nostdin", "-trace_msg"]
    start_ns = time.time_ns()
    procs = []
    try:
        uas = subprocess.Popen(
            [sipp, "-sf", str(tmp / "uas.xml"), "-p", str(uas_port), *common,
             "-message_file", str(tmp / "uas.log")],
            cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        procs.append(uas)
        time.sleep(0.2)  # the UAS binds its port
        uac = subprocess.run(
            [sipp, "-sn", "uac", f"127.0.0.1:{uas_port}", "-p", str(uac_port), "-r", "50",
             "-d", "20", *common, "-message_file", str(tmp / "uac.log")],
            cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30,
        )  # fmt: skip
        assert uac.returncode == 0, uac.stderr
        assert uas.wait(15) == 0, uas.stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    expected = CALLS * len(EXPECTED)
    for name in ("lo", "any", "snap64"):
        _wait_for(lambda n=name: len(collectors[n].packets) >= expected, 3.0)
    time.sleep(0.1)  # anything extra (a duplicate) would show up now
    result = {name: col.finish() for name, col in collectors.items()}
    result["stats"] = {name: col.capture.stats() for name, col in collectors.items()}
    result["cpu"] = {name: col.cpu for name, col in collectors.items()}
    result["window"] = (start_ns, time.time_ns())
    result["sent"] = {
        uac_port: _sent_messages(tmp / "uac.log"),
        uas_port: _sent_messages(tmp / "uas.log"),
    }
    result["ports"] = (uas_port, uac_port)
    return result


# -- the SIP calls --------------------------------------------------------------------------


def test_events_are_a_section_an_interface_then_packets(sipp_run):
    events = sipp_run["lo"]
    assert type(events[0]) is Section
    assert type(events[1]) is Interface
    assert all(type(e) is Packet for e in events[2:])
    iface = events[1]
    assert iface.linktype == c.LINKTYPE_ETHERNET  # lo frames have an all-zero Ethernet header
    assert iface.name == "lo"
    assert iface.snaplen == cap.MAX_SNAPLEN
    assert iface.tsresol == 9 and iface.units == 1_000_000_000
    assert all(p.interface is iface for p in events[2:])


def test_each_sip_message_of_each_call_is_captured_once_in_order(sipp_run):
    packets = [e for e in sipp_run["lo"] if type(e) is Packet]
    assert len(packets) == CALLS * len(EXPECTED)
    calls: dict[str, list[str]] = {}
    times: dict[str, list[int]] = {}
    for p in packets:
        kind, call_id, _, _ = _sip(p)
        calls.setdefault(call_id, []).append(kind)
        times.setdefault(call_id, []).append(p.ts)
    assert len(calls) == CALLS
    for call_id, kinds in calls.items():
        assert kinds == EXPECTED, call_id
        # Each message answers the one before it: strictly later.
        assert times[call_id] == sorted(set(times[call_id])), call_id


def test_captured_bytes_are_what_sipp_sent(sipp_run):
    """Each side's datagrams, in capture order, are the messages SIPp logged sending."""
    packets = [e for e in sipp_run["lo"] if type(e) is Packet]
    for port, sent in sipp_run["sent"].items():
        got = [payload for _, _, sport, payload in map(_sip, packets) if sport == port]
        assert len(sent) == len(got) > 0
        assert got == sent
    for p in packets:
        assert p.caplen == p.origlen == len(p.data)
        assert p.data[:12] == bytes(12)
        assert _ipv4_header_ok(bytes(p.data), 14)


def test_timestamps_are_the_kernel_s_and_plausible(sipp_run):
    start, end = sipp_run["window"]
    packets = [e for e in sipp_run["lo"] if type(e) is Packet]
    stamps = [p.ts for p in packets]
    assert all(start <= t <= end for t in stamps)
    assert len(set(stamps)) == len(stamps)
    # Capture order is time order, but for two packets sent at once from two processes.
    assert all(b - a > -1_000_000 for a, b in itertools.pairwise(stamps))
    assert packets[0].time_ns == packets[0].ts  # nanoseconds since 1970, no offset


def test_any_captures_the_same_packets_in_cooked_mode(sipp_run):
    lo = [e for e in sipp_run["lo"] if type(e) is Packet]
    events = sipp_run["any"]
    assert events[1].linktype == c.LINKTYPE_LINUX_SLL and events[1].name == "any"
    anyp = [e for e in events if type(e) is Packet]
    assert len(anyp) == len(lo)  # loopback's outgoing copies are left out here too
    for a, b in zip(lo, anyp, strict=True):
        pkttype, hatype, halen, addr, proto = struct.unpack_from("!HHH8sH", b.data)
        assert (pkttype, hatype, halen, addr, proto) == (0, 772, 6, bytes(8), 0x0800)
        assert bytes(b.data[16:]) == bytes(a.data[14:])
        assert b.origlen == b.caplen == a.caplen + 2
        assert abs(b.ts - a.ts) < 1_000_000
    kinds = [_sip(p)[0] for p in anyp]
    assert kinds.count("INVITE") == kinds.count("BYE") == CALLS


def test_snaplen_cuts_the_bytes_and_keeps_the_original_length(sipp_run):
    lo = [e for e in sipp_run["lo"] if type(e) is Packet]
    events = sipp_run["snap64"]
    assert events[1].snaplen == 64
    short = [e for e in events if type(e) is Packet]
    assert len(short) == len(lo)
    for a, b in zip(lo, short, strict=True):
        assert bytes(b.data) == bytes(a.data[:64])
        assert b.origlen == a.origlen > 64


def test_a_filter_that_excludes_the_calls_captures_none(sipp_run):
    events = sipp_run["excluded"]
    assert [type(e) for e in events] == [Section, Interface]
    assert sipp_run["stats"]["excluded"] == {"received": 0, "dropped": 0}
    stats = sipp_run["stats"]["lo"]
    assert stats == {"received": CALLS * len(EXPECTED), "dropped": 0}


def test_capture_relays_exactly_through_the_writer(sipp_run):
    """Written with stm's Writer, read back by stm and by python-pcapng: the same."""
    pcapng = pytest.importorskip("pcapng", reason="python-pcapng is not installed")
    from pcapng import blocks

    events = sipp_run["lo"]
    section, iface = events[0], events[1]
    packets = events[2:]
    buf = io.BytesIO()
    with Writer(buf, byte_order=section.byte_order, options=section.options) as w:
        w.copy_interface(iface)
        for p in packets:
            w.write(p, 0)
    back = list(read_events(buf.getvalue()))
    assert back[0].options == section.options
    assert (back[1].linktype, back[1].snaplen, back[1].options) == (
        iface.linktype, iface.snaplen, iface.options,
    )  # fmt: skip
    assert back[2:] == packets

    buf.seek(0)
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # python-pcapng on its own if_tsresol option
        for b in pcapng.FileScanner(buf):
            if isinstance(b, blocks.EnhancedPacket):
                i = b.interface
                assert (i.link_type, i.snaplen) == (1, cap.MAX_SNAPLEN)
                assert i.options["if_name"] == "lo"
                assert i.options.get_raw("if_tsresol") == b"\x09"
                ticks = (b.timestamp_high << 32) | b.timestamp_low
                got.append((ticks, bytes(b.packet_data), b.packet_len))
    assert got == [(p.ts, bytes(p.data), p.origlen) for p in packets]


def test_idle_capture_waits_instead_of_spinning(sipp_run):
    # The "excluded" capture sat idle through the whole run, in poll().
    assert sipp_run["cpu"]["excluded"] < 0.2


# -- other frames, errors, stopping --------------------------------------------------------


@needs_raw
def test_vlan_tag_is_put_back_and_snaplen_keeps_origlen():
    """The kernel takes the 802.1Q tag out of a received frame; the capture puts it back.

    A raw Ethernet frame (no IP) is sent on lo with a packet socket; lo hands it back as
    received, and the kernel moves its tag into the packet's metadata on the way."""
    marker = os.urandom(8)
    frame = (
        bytes(12)
        + struct.pack("!HHH", 0x8100, (5 << 13) | 123, 0x88B5)
        + marker
        + bytes(range(256)) * 8
    )
    tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with tx:
        tx.bind(("lo", 0))
        full = Collector("lo", "vlan 123 and ether proto 0x88b5")
        short = Collector("lo", "ether proto 0x88b5", snaplen=100)
        other_vlan = Collector("lo", "vlan 124")
        tx.send(frame)
        for col in (full, short):
            assert _wait_for(lambda col=col: col.packets, 3.0)
        time.sleep(0.05)
        got = {
            name: [p for p in col.finish() if type(p) is Packet and marker in bytes(p.data)]
            for name, col in (("full", full), ("short", short), ("other", other_vlan))
        }
    assert [(bytes(p.data), p.origlen) for p in got["full"]] == [(frame, len(frame))]
    assert [(bytes(p.data), p.origlen) for p in got["short"]] == [(frame[:100], len(frame))]
    assert got["other"] == []


@needs_raw
def test_stop_returns_promptly_and_idle_yields_none():
    col = Collector("lo", f"udp port {_free_udp_ports(1)[0]}", idle=True)
    time.sleep(0.3)
    t0 = time.monotonic()
    col.stop.set()
    col.thread.join(2)
    waited = time.monotonic() - t0
    assert not col.thread.is_alive()
    assert waited < 0.25  # poll_interval (0.05 s) plus scheduling on a busy machine
    ticks = [e for e in col.events if e is None]
    assert 3 <= len(ticks) <= 10  # one per 50 ms poll while idle
    assert col.capture._sock is None  # closed when the events end
    assert col.cpu is not None and col.cpu < 0.1


@needs_raw
def test_no_filter_captures_everything_on_the_interface():
    (port,) = _free_udp_ports(1)
    marker = b"stm no filter " + os.urandom(8)
    col = Collector("lo", None, keep=lambda p: marker in bytes(p.data))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(marker, ("127.0.0.1", port))
    assert _wait_for(lambda: len(col.packets) >= 2, 3.0)
    time.sleep(0.05)
    events = col.finish()
    assert c.IF_FILTER not in dict(events[1].options)
    mine = events[2:]
    # The datagram once, then (nobody listens on the port) the ICMP error quoting it.
    assert [frames.split(p.linktype, p.data) is not None for p in mine] == [True, False]
    assert mine[1].data[23] == 1  # IPv4 protocol: ICMP


def test_bad_filter_is_a_usage_error_with_the_compiler_message():
    with pytest.raises(UsageError) as info:
        cap.LiveCapture("lo", "udp portt 5060")
    message = str(info.value)
    assert "\n" not in message
    assert "udp portt 5060" in message and "syntax error" in message
    with pytest.raises(UsageError, match="99999"):
        cap.live_events("lo", "udp port 99999")


def test_unknown_interface_is_a_usage_error():
    with pytest.raises(UsageError, match="no such interface: stm-nonesuch0"):
        cap.live_events("stm-nonesuch0", "udp")
    with pytest.raises(UsageError, match="no such interface"):
        cap.LiveCapture("x" * 40)


def test_bad_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="snaplen"):
        cap.LiveCapture("lo", snaplen=0)
    with pytest.raises(UsageError, match="poll_interval"):
        cap.LiveCapture("lo", poll_interval=0)
    with pytest.raises(UsageError, match="promiscuous"):
        cap.LiveCapture("any", promisc=True)


_NO_PRIVILEGE = """
import os, sys
import stm.capture
from stm.errors import UsageError
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
for flt in (None, "udp port 5060"):
    try:
        stm.capture.LiveCapture("lo", flt)
    except UsageError as exc:
        print(exc)
    else:
        print("no error")
"""


def test_no_permission_message():
    expected = "live capture on lo needs root or CAP_NET_RAW"
    if not _can_capture():  # already unprivileged: the message is seen right here
        with pytest.raises(UsageError) as info:
            cap.LiveCapture("lo", "udp port 5060")
        assert str(info.value) == expected
        return
    if os.geteuid() != 0:
        pytest.skip("CAP_NET_RAW without root: cannot drop it by changing user")
    proc = subprocess.run(
        [sys.executable, "-c", _NO_PRIVILEGE],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(Path(cap.__file__).parents[1])},
    )
    if "PermissionError" in proc.stderr and "setuid" in proc.stderr:
        pytest.skip("this process may not change its user")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [expected, expected]


# -- the filter compiler --------------------------------------------------------------------


def _normalise_ret(insns):
    """Accepting returns differ only by the snap length compiled in."""
    return [(code, jt, jf, 1 if code == 0x06 and k else k) for code, jt, jf, k in insns]


def test_compiled_filter_matches_scapy_and_tcpdump():
    flt = "udp and (port 5060 or port 5061)"
    ours, how = cap.compile_filter(flt, c.LINKTYPE_ETHERNET, 65535)
    assert how == "libpcap"
    assert ours[-1] == (0x06, 0, 0, 0) and (0x06, 0, 0, 65535) in ours
    scapy_common = pytest.importorskip("scapy.arch.common", reason="scapy is not installed")
    prog = scapy_common.compile_filter(flt, linktype=1)
    theirs = [(i.code, i.jt, i.jf, i.k) for i in prog.bf_insns[: prog.bf_len]]
    assert _normalise_ret(theirs) == _normalise_ret(ours)
    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed: its -ddd fallback is not checked")
    for linktype in (c.LINKTYPE_ETHERNET, c.LINKTYPE_RAW, c.LINKTYPE_LINUX_SLL):
        dump, how = cap.compile_filter(flt, linktype, 65535, tcpdump=True)
        assert how == "tcpdump -ddd"
        assert dump == cap.compile_filter(flt, linktype, 65535, tcpdump=False)[0]
    with pytest.raises(UsageError, match="syntax error"):
        cap.compile_filter("udp portt 1", tcpdump=True)


def test_cooked_mode_fixes_offsets_as_libpcap_does():
    insns, _ = cap.compile_filter("udp port 5060", c.LINKTYPE_LINUX_SLL, 65535)
    fixed = cap._fix_cooked(insns, "udp port 5060")
    # The protocol field at 14 becomes the kernel's protocol; offsets past 16 move back.
    assert fixed[0] == (0x28, 0, 0, cap.SKF_AD_OFF + cap.SKF_AD_PROTOCOL)
    assert len(fixed) == len(insns)
    for (code, _, _, k), (_, _, _, k2) in zip(insns, fixed, strict=True):
        if code in (0x28, 0x30, 0x20, 0x48, 0x50, 0xB1) and k >= 16:
            assert k2 == k - 16
    link_addr, _ = cap.compile_filter("ether src 00:11:22:33:44:55", c.LINKTYPE_ETHERNET)
    assert link_addr
    with pytest.raises(UsageError, match="cooked"):
        cap._fix_cooked([(0x28, 0, 0, 6), (0x06, 0, 0, 0)], "x")
