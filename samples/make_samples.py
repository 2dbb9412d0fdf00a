#!/usr/bin/env python3
"""Generate the deterministic SIP sample captures shipped in ``samples/``.

The SIP dialogue follows the signalling flows of the IETF draft
"SIP-based Tracker Protocol" (draft-chen-ppsp-sip-based-tracker-protocol-00):

* Peer Registration (PPSP CONNECT): REGISTER / 401 / REGISTER with
  Authorization / 200 OK (Figure 2),
* Join Swarm (PPSP JOIN): INVITE / 200 OK / ACK (Figure 4),
* Find Peerlist (PPSP FIND): INFO / 200 OK (Figure 6),
* Leave Swarm (PPSP LEAVE): BYE / 200 OK (Figure 5).

The draft only draws these flows; it gives no message texts, so the messages
below are written in plain RFC 3261 style, with CRLF line endings and a
computed Content-Length.  Everything (addresses, ports, tags, TCP sequence
numbers, timestamps) is fixed, so re-running the script gives byte-identical
files.

Usage: ``python samples/make_samples.py [OUTDIR]`` (default: this folder).
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet
from scapy.utils import PcapWriter

#: 2026-01-01T00:00:00Z, the timestamp of the first packet of every capture.
EPOCH_2026 = 1_767_225_600
#: Fixed gap between consecutive packets: 12.345678 ms (ns captures keep all digits).
STEP_NS = 12_345_678
#: Fixed gap between consecutive packets in the microsecond captures: 12.345 ms.
STEP_US = 12_345

SIP_PORT = 5060
PEER_TCP_PORT = 49152
PEER_ISN = 0x1A2B3C4D
TRACKER_ISN = 0x5E6F7081
MSS_V4 = 1460
MSS_V6 = 1440

# MAC addresses from the documentation block 00-00-5E-00-53-xx (RFC 7042).
PEER_MAC = "00:00:5e:00:53:0a"
TRACKER_MAC = "00:00:5e:00:53:14"

DLT_EN10MB = 1
SNAPLEN = 65535
#: ICE candidates per media stream in the large INVITE (makes its frame > 9000 bytes).
JUMBO_CANDIDATES = 56

# Digest credentials of the REGISTER exchange (the response is really computed).
REALM = "example.com"
USERNAME = "peer1"
PASSWORD = "ppsp-secret"
NONCE = "6b8c3a5e0f1d2c4b9a7e8d6f5c4b3a29"
CNONCE = "0a4f113b"
NONCE_COUNT = "00000001"


@dataclass(frozen=True)
class Net:
    """Addresses of one capture: peer, tracker and two other swarm members."""

    peer: str
    tracker: str
    others: tuple[str, str]
    ipv6: bool

    def host(self, addr: str) -> str:
        """Return ``addr`` as a SIP host (IPv6 references are bracketed)."""
        return f"[{addr}]" if self.ipv6 else addr

    @property
    def sdp_ip(self) -> str:
        """SDP address type, ``IP4`` or ``IP6``."""
        return "IP6" if self.ipv6 else "IP4"


NET_V4 = Net("192.0.2.10", "198.51.100.20", ("192.0.2.11", "192.0.2.12"), ipv6=False)
NET_V6 = Net("2001:db8::10", "2001:db8::20", ("2001:db8::11", "2001:db8::12"), ipv6=True)


@dataclass(frozen=True)
class SipMessage:
    """One SIP message: a label for comments, its direction and its bytes."""

    label: str
    from_peer: bool
    data: bytes


@dataclass(frozen=True)
class Frame:
    """One captured Ethernet frame with its pcapng comment."""

    comment: str
    data: bytes


def sip(*parts: str, **fields: str) -> bytes:
    """Join dedented template parts, format them, use CRLF ends and fix Content-Length."""
    text = "\n".join(textwrap.dedent(part).strip("\n") for part in parts).format(**fields)
    head, _, body = text.partition("\n\n")
    body_bytes = "".join(line + "\r\n" for line in body.splitlines()).encode()
    lines = []
    for line in head.splitlines():
        if line.lower().startswith("content-length:"):
            line = f"Content-Length: {len(body_bytes)}"
        lines.append(line)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body_bytes


def digest_response(method: str, uri: str) -> str:
    """Compute the RFC 2617 qop=auth digest response for the fixed credentials."""

    def md5(s: str) -> str:
        return hashlib.md5(s.encode()).hexdigest()

    ha1 = md5(f"{USERNAME}:{REALM}:{PASSWORD}")
    ha2 = md5(f"{method}:{uri}")
    return md5(f"{ha1}:{NONCE}:{NONCE_COUNT}:{CNONCE}:auth:{ha2}")


def tracker_flow(net: Net, transport: str) -> list[SipMessage]:
    """Build the PPSP CONNECT / JOIN / FIND / LEAVE dialogue over ``transport``."""
    uri_params = ";transport=tcp" if transport == "TCP" else ""
    registrar = f"sip:tracker.example.com{uri_params}"
    f = {
        "proto": transport,
        "peer": net.host(net.peer),
        "tracker": net.host(net.tracker),
        "peer_addr": net.peer,
        "tracker_addr": net.tracker,
        "other1": net.others[0],
        "other2": net.others[1],
        "ip": net.sdp_ip,
        "uri_params": uri_params,
        "registrar": registrar,
        "realm": REALM,
        "nonce": NONCE,
        "cnonce": CNONCE,
        "nc": NONCE_COUNT,
        "response": digest_response("REGISTER", registrar),
    }
    reg_common = """
        Max-Forwards: 70
        From: <sip:peer1@example.com>;tag=peer1-reg-7a3c
        To: <sip:peer1@example.com>
        Call-ID: ppsp-connect-0001@example.com
    """
    dialog_req = """
        From: <sip:peer1@example.com>;tag=peer1-join-5d21
        To: <sip:swarm-0001@tracker.example.com>;tag=tracker-join-9e04
        Call-ID: ppsp-join-swarm-0001@example.com
    """
    msgs = [
        SipMessage(
            "REGISTER",
            True,
            sip(
                """
                REGISTER {registrar} SIP/2.0
                Via: SIP/2.0/{proto} {peer}:5060;branch=z9hG4bK-ppsp-connect-1
                """,
                reg_common,
                """
                CSeq: 1 REGISTER
                Contact: <sip:peer1@{peer}:5060{uri_params}>
                Expires: 3600
                User-Agent: PPSP-Peer/0.1
                Content-Length: 0
                """,
                **f,
            ),
        ),
        SipMessage(
            "401 Unauthorized",
            False,
            sip(
                """
                SIP/2.0 401 Unauthorized
                Via: SIP/2.0/{proto} {peer}:5060;branch=z9hG4bK-ppsp-connect-1
                From: <sip:peer1@example.com>;tag=peer1-reg-7a3c
                To: <sip:peer1@example.com>;tag=tracker-reg-41f8
                Call-ID: ppsp-connect-0001@example.com
                CSeq: 1 REGISTER
                WWW-Authenticate: Digest realm="{realm}", nonce="{nonce}", algorithm=MD5, qop="auth"
                Server: PPSP-Tracker/0.1
                Content-Length: 0
                """,
                **f,
            ),
        ),
        SipMessage(
            "REGISTER",
            True,
            sip(
                """
                REGISTER {registrar} SIP/2.0
                Via: SIP/2.0/{proto} {peer}:5060;branch=z9hG4bK-ppsp-connect-2
                """,
                reg_common,
                """
                CSeq: 2 REGISTER
                Contact: <sip:peer1@{peer}:5060{uri_params}>
                Authorization: Digest username="peer1", realm="{realm}", nonce="{nonce}", \
uri="{registrar}", response="{response}", algorithm=MD5, cnonce="{cnonce}", qop=auth, nc={nc}
                Expires: 3600
                User-Agent: PPSP-Peer/0.1
                Content-Length: 0
                """,
                **f,
            ),
        ),
        SipMessage(
            "200 OK (REGISTER)",
            False,
            sip(
                """
                SIP/2.0 200 OK
                Via: SIP/2.0/{proto} {peer}:5060;branch=z9hG4bK-ppsp-connect-2
                From: <sip:peer1@example.com>;tag=peer1-reg-7a3c
                To: <sip:peer1@example.com>;tag=tracker-reg-41f8
                Call-ID: ppsp-connect-0001@example.com
                CSeq: 2 REGISTER
                Contact: <sip:peer1@{peer}:5060{uri_params}>;expires=3600
                Date: Thu, 01 Jan 2026 00:00:00 GMT
                Server: PPSP-Tracker/0.1
                Content-Length: 0
                """,
                **f,
            ),
        ),
        SipMessage(
            "INVITE",
            True,
            sip(
                """
                INVITE sip:swarm-0001@tracker.example.com{uri_params} SIP/2.0
                Via: SIP/2.0/{proto} {peer}:5060;branch=z9hG4bK-ppsp-join-1
                Max-Forwards: 70
                From: <sip:peer1@example.com>;tag=peer1-join-5d21
                To: <sip:swarm-0001@tracker.example.com>
                Call-ID: ppsp-join-swarm-0001@example.com
                CSeq: 1 INVITE
                Contact: <sip:peer1@{peer}:5060{uri_params}>
                Allow: INVITE, ACK, BYE, CANCEL, INFO, REGISTER
                Subject: PPSP JOIN swarm-0001
                User-Agent: PPSP-Peer/0.1
                Content-Type: application/sdp
                Content-Length: 0

                v=0
                o=peer1 2026010100 2026010100 IN {ip} {peer_addr}
                s=PPSP JOIN swarm-0001
                c=IN {ip} {peer_addr}
                t=0 0
                m=video 49170 RTP/AVP 96
                a=rtpmap:96 H264/90000
                a=sendrecv
                """,
                **f,
            ),
        ),
        SipMessage(
            "200 OK (INVITE)",
            False,
            sip(
                """
                SIP/2.0 200 OK
                Via: SIP/2.0/{proto} {peer}:5060;branch=z9hG4bK-ppsp-join-1
                From: <sip:peer1@example.com>;tag=peer1-join-5d21
                To: <sip:swarm-0001@tracker.example.com>;tag=tracker-join-9e04
                Call-ID: ppsp-join-swarm-0001@example.com
                CSeq: 1 INVITE
                Contact: <sip:swarm-0001@{tracker}:5060{uri_params}>
                Allow: INVITE, ACK, BYE, CANCEL, INFO, REGISTER
                Server: PPSP-Tracker/0.1
                Content-Type: application/sdp
                Content-Length: 0

                v=0
                o=tracker 2026010101 2026010101 IN {ip} {tracker_addr}
                s=PPSP swarm-0001
                c=IN {ip} {tracker_addr}
                t=0 0
                m=video 51372 RTP/AVP 96
                a=rtpmap:96 H264/90000
                a=sendrecv
                """,
                **f,
            ),
        ),
        SipMessage(
            "ACK",
            True,
            sip(
                """
                ACK sip:swarm-0001@{tracker}:5060{uri_params} SIP/2.0
                Via: SIP/2.0/{proto} {peer}:5060;branch=z9hG4bK-ppsp-join-ack-1
                Max-Forwards: 70
                """,
                dialog_req,
                """
                CSeq: 1 ACK
                Content-Length: 0
                """,
                **f,
            ),
        ),
        SipMessage(
            "INFO",
            True,
            sip(
                """
                INFO sip:swarm-0001@{tracker}:5060{uri_params} SIP/2.0
                Via: SIP/2.0/{proto} {peer}:5060;branch=z9hG4bK-ppsp-find-1
                Max-Forwards: 70
                """,
                dialog_req,
                """
                CSeq: 2 INFO
                Subject: PPSP FIND swarm-0001
                Content-Type: application/xml
                Content-Length: 0

                <?xml version="1.0" encoding="UTF-8"?>
                <find swarm="swarm-0001" peer="peer1" max-peers="2"/>
                """,
                **f,
            ),
        ),
        SipMessage(
            "200 OK (INFO)",
            False,
            sip(
                """
                SIP/2.0 200 OK
                Via: SIP/2.0/{proto} {peer}:5060;branch=z9hG4bK-ppsp-find-1
                """,
                dialog_req,
                """
                CSeq: 2 INFO
                Server: PPSP-Tracker/0.1
                Content-Type: application/xml
                Content-Length: 0

                <?xml version="1.0" encoding="UTF-8"?>
                <peerlist swarm="swarm-0001">
                  <peer id="peer2" addr="{other1}" port="5060"/>
                  <peer id="peer3" addr="{other2}" port="5060"/>
                </peerlist>
                """,
                **f,
            ),
        ),
        SipMessage(
            "BYE",
            True,
            sip(
                """
                BYE sip:swarm-0001@{tracker}:5060{uri_params} SIP/2.0
                Via: SIP/2.0/{proto} {peer}:5060;branch=z9hG4bK-ppsp-leave-1
                Max-Forwards: 70
                """,
                dialog_req,
                """
                CSeq: 3 BYE
                Subject: PPSP LEAVE swarm-0001
                Content-Length: 0
                """,
                **f,
            ),
        ),
        SipMessage(
            "200 OK (BYE)",
            False,
            sip(
                """
                SIP/2.0 200 OK
                Via: SIP/2.0/{proto} {peer}:5060;branch=z9hG4bK-ppsp-leave-1
                """,
                dialog_req,
                """
                CSeq: 3 BYE
                Server: PPSP-Tracker/0.1
                Content-Length: 0
                """,
                **f,
            ),
        ),
    ]
    return msgs


def jumbo_flow(net: Net) -> list[SipMessage]:
    """Build an INVITE / 200 OK / ACK whose INVITE frame is over 9000 bytes.

    The INVITE carries a long SDP offer: two media streams with many ICE
    candidates each.
    """
    via = "Via: SIP/2.0/UDP {peer}:5060;branch=z9hG4bK-ppsp-jumbo-1"
    media = []
    for kind, port, rtpmap in (("video", 49170, "H264/90000"), ("audio", 49270, "opus/48000/2")):
        media += [f"m={kind} {port} RTP/AVP 96", f"a=rtpmap:96 {rtpmap}"]
        for i in range(JUMBO_CANDIDATES):
            host = f"192.0.2.{100 + i}" if i % 2 == 0 else f"198.51.100.{100 + i}"
            media.append(
                f"a=candidate:{i + 1} 1 UDP {2130706431 - i * 256} {host} {port + i} typ host"
                f" generation 0 network-id {i + 1}"
            )
    f = {
        "peer": net.host(net.peer),
        "tracker": net.host(net.tracker),
        "peer_addr": net.peer,
        "tracker_addr": net.tracker,
        "ip": net.sdp_ip,
    }
    dialog = """
        From: <sip:peer1@example.com>;tag=peer1-jumbo-3b17
        To: <sip:swarm-0001@tracker.example.com>;tag=tracker-jumbo-c2a9
        Call-ID: ppsp-join-jumbo-0001@example.com
    """
    invite = sip(
        """
        INVITE sip:swarm-0001@tracker.example.com SIP/2.0
        """,
        via,
        """
        Max-Forwards: 70
        From: <sip:peer1@example.com>;tag=peer1-jumbo-3b17
        To: <sip:swarm-0001@tracker.example.com>
        Call-ID: ppsp-join-jumbo-0001@example.com
        CSeq: 1 INVITE
        Contact: <sip:peer1@{peer}:5060>
        Allow: INVITE, ACK, BYE, CANCEL, INFO, REGISTER
        Subject: PPSP JOIN swarm-0001 (large offer)
        User-Agent: PPSP-Peer/0.1
        Content-Type: application/sdp
        Content-Length: 0

        v=0
        o=peer1 2026010102 2026010102 IN {ip} {peer_addr}
        s=PPSP JOIN swarm-0001
        c=IN {ip} {peer_addr}
        t=0 0
        """,
        "\n".join(media),
        **f,
    )
    ok = sip(
        "SIP/2.0 200 OK",
        via,
        dialog,
        """
        CSeq: 1 INVITE
        Contact: <sip:swarm-0001@{tracker}:5060>
        Server: PPSP-Tracker/0.1
        Content-Type: application/sdp
        Content-Length: 0

        v=0
        o=tracker 2026010103 2026010103 IN {ip} {tracker_addr}
        s=PPSP swarm-0001
        c=IN {ip} {tracker_addr}
        t=0 0
        m=video 51372 RTP/AVP 96
        a=rtpmap:96 H264/90000
        m=audio 51472 RTP/AVP 96
        a=rtpmap:96 opus/48000/2
        """,
        **f,
    )
    ack = sip(
        """
        ACK sip:swarm-0001@{tracker}:5060 SIP/2.0
        Via: SIP/2.0/UDP {peer}:5060;branch=z9hG4bK-ppsp-jumbo-ack-1
        Max-Forwards: 70
        """,
        dialog,
        """
        CSeq: 1 ACK
        Content-Length: 0
        """,
        **f,
    )
    return [
        SipMessage("INVITE (large SDP offer)", True, invite),
        SipMessage("200 OK (INVITE)", False, ok),
        SipMessage("ACK", True, ack),
    ]


def l3(net: Net, from_peer: bool, ip_id: int) -> Packet:
    """Return Ether/IP or Ether/IPv6 headers for one direction."""
    src, dst = (net.peer, net.tracker) if from_peer else (net.tracker, net.peer)
    smac, dmac = (PEER_MAC, TRACKER_MAC) if from_peer else (TRACKER_MAC, PEER_MAC)
    eth = Ether(src=smac, dst=dmac)
    if net.ipv6:
        return eth / IPv6(src=src, dst=dst, hlim=64)
    return eth / IP(src=src, dst=dst, ttl=64, id=ip_id)


def udp_frames(net: Net, msgs: list[SipMessage]) -> list[Frame]:
    """Put each SIP message in one UDP datagram between ports 5060."""
    frames = []
    for i, m in enumerate(msgs):
        pkt = l3(net, m.from_peer, 0x1000 + i) / UDP(sport=SIP_PORT, dport=SIP_PORT) / m.data
        frames.append(Frame(f"SIP {m.label}", bytes(pkt)))
    return frames


def tcp_frames(net: Net, msgs: list[SipMessage]) -> list[Frame]:
    """Run the SIP messages over one TCP connection: handshake, data, FIN close."""
    mss = MSS_V6 if net.ipv6 else MSS_V4
    seq = {True: PEER_ISN, False: TRACKER_ISN}
    frames: list[Frame] = []

    def seg(comment: str, from_peer: bool, flags: str, payload: bytes = b"") -> None:
        sport, dport = (PEER_TCP_PORT, SIP_PORT) if from_peer else (SIP_PORT, PEER_TCP_PORT)
        ack = 0 if flags == "S" else seq[not from_peer]
        opts = [("MSS", mss)] if "S" in flags else []
        tcp = TCP(
            sport=sport,
            dport=dport,
            seq=seq[from_peer],
            ack=ack,
            flags=flags,
            window=64240,
            options=opts,
        )
        pkt = l3(net, from_peer, 0x2000 + len(frames)) / tcp
        if payload:
            pkt = pkt / payload
        frames.append(Frame(comment, bytes(pkt)))
        seq[from_peer] = (seq[from_peer] + len(payload) + ("S" in flags) + ("F" in flags)) % (
            1 << 32
        )

    seg("TCP SYN", True, "S")
    seg("TCP SYN/ACK", False, "SA")
    seg("TCP ACK", True, "A")
    for m in msgs:
        if len(m.data) > mss:
            raise ValueError(f"{m.label}: {len(m.data)} bytes does not fit one {mss}-byte segment")
        seg(f"SIP {m.label}", m.from_peer, "PA", m.data)
    seg("TCP FIN", True, "FA")
    seg("TCP FIN", False, "FA")
    seg("TCP ACK", True, "A")
    return frames


def write_pcap(path: Path, frames: list[Frame]) -> None:
    """Write a little-endian classic pcap (microsecond) with scapy's PcapWriter."""
    with PcapWriter(
        str(path), linktype=DLT_EN10MB, endianness="<", snaplen=SNAPLEN, nano=False
    ) as w:
        w.write_header(None)
        for i, fr in enumerate(frames):
            sec, usec = divmod(EPOCH_2026 * 1_000_000 + i * STEP_US, 1_000_000)
            w.write_packet(fr.data, sec=sec, usec=usec)


def _option(code: int, value: bytes) -> bytes:
    """Encode one pcapng option, padded to 32 bits."""
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _block(block_type: int, body: bytes) -> bytes:
    """Wrap a (32-bit aligned) block body with type and total-length fields."""
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def write_pcapng(path: Path, frames: list[Frame], tsresol: int) -> None:
    """Write a pcapng file: SHB, one Ethernet IDB ("eth0", if_tsresol=10^-tsresol), EPBs.

    scapy's PcapNgWriter cannot set if_tsresol (and goes through float
    timestamps), so this small writer is used instead.  Every EPB carries an
    opt_comment naming its SIP method / status (or TCP control segment).
    """
    units = 10**tsresol
    step = STEP_NS // (10 ** (9 - tsresol))
    end = _option(0, b"")
    shb = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
    shb += _option(4, b"stm samples/make_samples.py") + end  # shb_userappl
    idb = struct.pack("<HHI", DLT_EN10MB, 0, SNAPLEN)
    idb += _option(2, b"eth0") + _option(9, bytes([tsresol])) + end  # if_name, if_tsresol
    out = [_block(0x0A0D0D0A, shb), _block(1, idb)]
    for i, fr in enumerate(frames):
        ts = EPOCH_2026 * units + i * step
        epb = struct.pack("<IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, len(fr.data), len(fr.data))
        epb += fr.data + b"\0" * (-len(fr.data) % 4)
        epb += _option(1, fr.comment.encode()) + end  # opt_comment
        out.append(_block(6, epb))
    path.write_bytes(b"".join(out))


SAMPLES: dict[str, Callable[[Path], None]] = {
    "sip_udp_ipv4.pcap": lambda p: write_pcap(p, udp_frames(NET_V4, tracker_flow(NET_V4, "UDP"))),
    "sip_tcp_ipv4.pcap": lambda p: write_pcap(p, tcp_frames(NET_V4, tracker_flow(NET_V4, "TCP"))),
    "sip_udp_ipv6.pcapng": lambda p: write_pcapng(
        p, udp_frames(NET_V6, tracker_flow(NET_V6, "UDP")), tsresol=9
    ),
    "sip_tcp_ipv6.pcapng": lambda p: write_pcapng(
        p, tcp_frames(NET_V6, tracker_flow(NET_V6, "TCP")), tsresol=6
    ),
    "sip_jumbo_udp_ipv4.pcap": lambda p: write_pcap(p, udp_frames(NET_V4, jumbo_flow(NET_V4))),
}


def main(argv: list[str] | None = None) -> int:
    """Write every sample capture into OUTDIR (default: the script's folder)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", nargs="?", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    outdir: Path = args.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    for name, make in SAMPLES.items():
        path = outdir / name
        make(path)
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
