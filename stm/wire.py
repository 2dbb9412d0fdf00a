"""Report traffic as a capture file, both ways.

``WireWriter`` is a destination like a socket: the reports it is given are written as the
Ethernet/IP/UDP (or TCP) frames that would have carried them, so a report stream can be
looked at in Wireshark or replayed with tcpreplay (``stm-send --output``). ``read_reports``
goes back: from a capture of report traffic (one taken by tcpdump on a collector, say) it
yields the UDP datagrams and the TCP messages, reassembling TCP streams, for the decoders
(``stm-recv --input``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from stm import frames, gre, tlv
from stm.errors import MalformedReport, UsageError
from stm.pcapng import constants as c
from stm.pcapng import read_events
from stm.pcapng.records import Packet
from stm.pcapng.writer import PcapWriter, Writer
from stm.transport.framing import DatagramFramer

# Locally administered unicast MACs: the frames were never on a real link. To replay them
# on one, tcprewrite --enet-dmac/--enet-smac puts in the real ones.
SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")
_ETH = {
    4: struct.Struct("!6s6sH").pack(DST_MAC, SRC_MAC, 0x0800),
    6: struct.Struct("!6s6sH").pack(DST_MAC, SRC_MAC, 0x86DD),
}
_TCP_HEADER = 20
_SYN, _ACK, _PSH, _FIN = 0x02, 0x10, 0x08, 0x01
_HEP = tlv.PROTOCOL_ID
_GRE_PTYPE = struct.Struct("!H")  # after RFC 4571's length and the GRE flags


def _local_address(family: int, dst: str, port: int) -> str:
    """The address this host would send from to reach ``dst`` (connecting a UDP socket
    sends nothing), or the loopback address when there is no route."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((dst, port))
            return s.getsockname()[0]
        except OSError:
            return "::1" if family == socket.AF_INET6 else "127.0.0.1"


class WireWriter:
    """Writes reports as a capture of the packets that would carry them.

    A ``.pcap`` name gives classic pcap (nanoseconds), anything else pcapng; either way
    Ethernet frames, which tcpreplay sends as they are. UDP reports become one datagram
    each. TCP reports become a connection from a fixed source port: handshake, the
    messages cut into MSS-sized segments with running sequence numbers, and a FIN at
    :meth:`close`. Checksums are set, so Wireshark shows no errors. The time of each frame
    is the wall clock (``clock``, nanoseconds) when it was written, so ``--realtime``
    output keeps the capture's pacing.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        scheme: str,
        host: str,
        port: int,
        source_port: int,
        mtu: int = 1500,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if scheme not in ("udp", "tcp"):
            raise UsageError(f"--output writes udp:// or tcp:// traffic, not {scheme}://")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise UsageError(f"cannot resolve {host!r}: {exc.strerror}") from None
        family, _, _, _, addr = infos[0]
        self.family = 6 if family == socket.AF_INET6 else 4
        dst = addr[0]
        src = _local_address(family, dst, port)
        self.src = ipaddress.ip_address(src).packed
        self.dst = ipaddress.ip_address(dst).packed
        self.sport, self.dport = source_port, port
        self.scheme = scheme
        self.ip_header = 40 if self.family == 6 else 20
        self.mss = mtu - self.ip_header - _TCP_HEADER
        self.clock = clock
        self.url = f"{scheme}://{f'[{dst}]' if self.family == 6 else dst}:{port}"
        self.path = os.fspath(path)
        self.frames = 0
        self.sent = 0
        try:
            self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise UsageError(f"cannot write {self.path}: {exc.strerror}") from None
        if self.path.endswith(".pcap"):
            self._pcap: PcapWriter | None = PcapWriter(self._file, c.LINKTYPE_ETHERNET)
            self._pcapng = None
        else:
            self._pcap = None
            self._pcapng = Writer(self._file, options=[(c.SHB_USERAPPL, "stm-send --output")])
            self._pcapng.add_interface(c.LINKTYPE_ETHERNET, 262144, name="stm-send", tsresol=9)
        self._seq = self._ack = 0
        self._open = False

    def _frame(self, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes,
               seq: int = 0, ack: int = 0, flags: int = 0) -> None:  # fmt: skip
        proto = frames.UDP if self.scheme == "udp" else frames.TCP  # UDP has no seq, ack, flags
        ip = frames.synthesize(self.family, proto, src, dst, sport, dport, payload, seq,
                               ack=ack, flags=flags)  # fmt: skip
        data = _ETH[self.family] + ip
        ts = self.clock()
        if self._pcap is not None:
            self._pcap.write_packet(ts, data)
        else:
            self._pcapng.write_packet(0, ts, data)
        self.frames += 1

    def _client(self, payload: bytes, flags: int) -> None:
        self._frame(
            self.src,
            self.dst,
            self.sport,
            self.dport,
            payload,
            seq=self._seq,
            ack=self._ack,
            flags=flags,
        )
        self._seq = (self._seq + len(payload) + (flags & (_SYN | _FIN) != 0)) & 0xFFFFFFFF

    def _server(self, flags: int, seq: int) -> None:
        self._frame(
            self.dst, self.src, self.dport, self.sport, b"", seq=seq, ack=self._seq, flags=flags
        )

    def send(self, reports: list[bytes]) -> None:
        if self.scheme == "udp":
            for r in reports:
                self._frame(self.src, self.dst, self.sport, self.dport, r)
        else:
            if not self._open and reports:
                self._open = True
                self._seq, server_isn = 1000, 5000
                self._client(b"", _SYN)
                self._ack = server_isn + 1
                self._server(_SYN | _ACK, server_isn)
                self._client(b"", _ACK)
            for r in reports:
                for at in range(0, len(r), self.mss):
                    self._client(r[at : at + self.mss], _PSH | _ACK)
        self.sent += len(reports)

    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "frames": self.frames}

    def close(self, timeout: float = 0.0) -> None:
        """End the TCP connection, if any, and the file (``timeout``: nothing to wait for)."""
        if self._file.closed:
            return
        if self._open:
            self._client(b"", _FIN | _ACK)
            self._server(_FIN | _ACK, self._ack)
            self._ack += 1
            self._client(b"", _ACK)
            self._open = False
        try:
            if self._pcapng is not None:
                self._pcapng.flush()
            self._file.close()
        except OSError as exc:
            raise UsageError(f"cannot write {self.path}: {exc.strerror}") from None


# -- reading report traffic back ----------------------------------------------------------


@dataclass(slots=True)
class WireStats:
    """What a capture of report traffic held."""

    frames: int = 0
    datagrams: int = 0  # UDP payloads handed on
    messages: int = 0  # format-B messages cut out of TCP streams
    ignored: int = 0  # frames that are not report traffic (other protocols, IP fragments)
    tcp_gaps: int = 0  # TCP streams with bytes missing from the capture
    tcp_errors: int = 0  # TCP streams whose framing failed (given up)
    flows: dict = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, int]:
        return {
            k: getattr(self, k)
            for k in ("frames", "datagrams", "messages", "ignored", "tcp_gaps", "tcp_errors")
        }


class _Flow:
    """One direction of a TCP connection: bytes put in order, then cut into messages."""

    __slots__ = ("framer", "head", "held", "next", "synced")

    def __init__(self, isn: int | None) -> None:
        self.next = None if isn is None else (isn + 1) & 0xFFFFFFFF
        self.held: dict[int, bytes] = {}  # out-of-order segments by sequence number
        # Format B (TlvFramer) or format A in RFC 4571 framing (DatagramFramer), decided by
        # the first bytes; None until then, False for a stream that carries neither.
        self.framer: tlv.TlvFramer | DatagramFramer | bool | None = None
        self.head = b""
        self.synced = isn is not None  # seen from its SYN, so the first byte starts a message

    def take(self, chunk: bytes, protocol_type: int) -> None:
        """Bytes in order: to the framer, once the stream's first bytes have told which."""
        if self.framer is None:
            if not self.synced:  # joined mid-stream: only HEP3 says where a message starts
                at = chunk.find(_HEP)
                if at < 0:
                    return
                chunk, self.synced, self.framer = chunk[at:], True, tlv.TlvFramer()
            else:
                self.head += chunk
                if len(self.head) < 6:
                    return
                chunk, head = self.head, self.head
                self.head = b""
                if head.startswith(_HEP):
                    self.framer = tlv.TlvFramer()
                elif _GRE_PTYPE.unpack_from(head, 4)[0] == protocol_type:
                    self.framer = DatagramFramer()
                else:
                    self.framer = False
        if self.framer:
            self.framer.receive_data(chunk)

    def messages(self) -> list[bytes]:
        out = []
        framer = self.framer
        if not framer:
            return out
        cut = framer.next_frame if isinstance(framer, tlv.TlvFramer) else framer.next_message
        while (msg := cut()) is not None:
            out.append(msg)
        return out


MAX_HELD = 1024  # out-of-order segments held per flow before the gap is given up on
MAX_FLOWS = 65536  # TCP flows followed at once; the oldest is forgotten past this


def read_reports(
    source: str | os.PathLike | BinaryIO,
    *,
    protocol_type: int = gre.STM_PROTOCOL_TYPE,
    stats: WireStats | None = None,
) -> Iterator[tuple[str, bytes, tuple[str, int], float]]:
    """``("datagram" | "message", bytes, (source address, port), capture time)`` for every
    report in a capture of report traffic, in capture order.

    UDP payloads that look like reports (GRE with ``protocol_type``, or ``HEP3``) are
    datagrams; TCP streams that carry ``HEP3`` messages, or format A framed as RFC 4571
    says, are reassembled (out-of-order segments put back in order, retransmissions
    dropped) and cut into reports. Everything
    else is counted as ignored. A capture started in the middle of a connection is picked
    up at the first ``HEP3`` in it.
    """
    st = stats if stats is not None else WireStats()
    flows: dict[tuple, _Flow] = st.flows
    for ev in read_events(source):
        if type(ev) is not Packet:
            continue
        st.frames += 1
        s = frames.split(ev.interface.linktype, ev.data)
        if s is None or s.proto not in (frames.UDP, frames.TCP):
            st.ignored += 1
            continue
        t = float(ev.time) if ev.ts is not None else 0.0
        peer = (str(ipaddress.ip_address(s.src)), s.sport)
        data = ev.data
        if s.proto == frames.UDP:
            payload = bytes(data[s.offset : s.end])
            if payload[:4] == _HEP or (
                len(payload) >= 4 and _GRE_PTYPE.unpack_from(payload, 2)[0] == protocol_type
            ):
                st.datagrams += 1
                yield "datagram", payload, peer, t
            else:
                st.ignored += 1
            continue
        yield from _tcp(st, flows, s, bytes(data[s.transport : s.end]), peer, t, protocol_type)


def _tcp(
    st: WireStats, flows: dict, s: frames.Split, segment: bytes, peer, t: float, protocol_type: int
):
    seq, flags = struct.unpack_from("!I", segment, 4)[0], segment[13]
    hlen = (segment[12] >> 4) * 4
    payload = segment[hlen:]
    key = (s.src, s.sport, s.dst, s.dport)
    flow = flows.get(key)
    if flow is None or flags & _SYN:
        if not payload and not flags & _SYN:
            return
        if len(flows) >= MAX_FLOWS:
            del flows[next(iter(flows))]
        flow = flows[key] = _Flow(seq if flags & _SYN else None)
        if flags & _SYN:
            return
        flow.next = seq
    if flow.framer is False or (flow.framer and flow.framer.failed):
        st.ignored += 1
        return
    if payload:
        delta = (seq - flow.next) & 0xFFFFFFFF
        if delta >= 0x80000000:  # starts before what we have: a retransmission, maybe longer
            overlap = (flow.next - seq) & 0xFFFFFFFF
            if overlap >= len(payload):
                return
            payload, seq = payload[overlap:], flow.next
            delta = 0
        if delta:
            if len(flow.held) >= MAX_HELD:  # the capture lost bytes: go on after the gap
                st.tcp_gaps += 1
                flow.framer, flow.head = None, b""
                flow.synced = False
                flow.next = min(flow.held, key=lambda q: (q - flow.next) & 0xFFFFFFFF)
                flow.held[seq] = payload
            else:
                flow.held[seq] = payload
                return
        else:
            flow.held[seq] = payload
        while flow.next in flow.held:
            chunk = flow.held.pop(flow.next)
            flow.next = (flow.next + len(chunk)) & 0xFFFFFFFF
            flow.take(chunk, protocol_type)
        if flow.framer is False:
            st.ignored += 1
            return
        try:
            msgs = flow.messages()
        except MalformedReport:
            st.tcp_errors += 1
            return
        for msg in msgs:
            st.messages += 1
            yield "message", msg, peer, t
    if flags & _FIN:
        flows.pop(key, None)
