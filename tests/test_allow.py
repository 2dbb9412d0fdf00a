"""Who may send: source-address allowlists, stream-ID ownership, the HEP auth key.

Real sockets on 127.0.0.1 and 127.0.0.2 (the whole of 127.0.0.0/8 is loopback on Linux).
"""

from __future__ import annotations

import contextlib
import hmac
import selectors
import socket
import time

import pytest

from stm import tlv
from stm.errors import UsageError
from stm.pcapng import Interface, Packet
from stm.pcapng import constants as c
from stm.report import Encoder, TlvEncoder
from stm.report.ownership import StreamOwners, stream_ids
from stm.tlv import (
    HEP_VENDOR,
    STM_VENDOR,
    HepChunk,
    StmChunk,
    TlvFramer,
    chunk_bytes,
    chunk_u32,
    encode_message,
)
from stm.transport.allow import AddressFilter
from stm.transport.tcp import TcpListener
from stm.transport.udp import UdpReceiver

pytestmark = pytest.mark.timeout(60)


def _can_use_127_0_0_2() -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


needs_127_0_0_2 = pytest.mark.skipif(not _can_use_127_0_0_2(), reason="no 127.0.0.2 here")


# -- AddressFilter --------------------------------------------------------------------------


def test_address_filter_matches_cidrs() -> None:
    f = AddressFilter(["127.0.0.1/32", "10.1.0.0/16", "2001:db8::/32", "192.0.2.7"])
    assert f.allows(("127.0.0.1", 4754))
    assert f.allows("10.1.200.3")
    assert f.allows(("2001:db8::1", 4754, 0, 0))
    assert f.allows(("::ffff:10.1.2.3", 9, 0, 0))  # IPv4-mapped, from a dual-stack socket
    assert f.allows("192.0.2.7")
    assert f.denied == 0
    for refused in ("127.0.0.2", "10.2.0.1", "2001:db9::1", "::1", ("fe80::1%lo", 1, 0, 1), "x"):
        assert not f.allows(refused)
    assert f.denied == 6
    assert f.allows("127.0.0.1") and f.denied == 6  # cached answers count the same way
    assert not f.allows("127.0.0.2") and f.denied == 7


def test_address_filter_options() -> None:
    assert AddressFilter.from_options(None) is None
    assert AddressFilter.from_options([]) is None
    assert AddressFilter.from_options(["::/0"]).allows("2001:db8::5")
    assert AddressFilter(["10.0.0.1/8"]).networks[0].with_prefixlen == "10.0.0.0/8"
    with pytest.raises(UsageError, match="bad --allow 'nope'"):
        AddressFilter(["nope"])
    with pytest.raises(UsageError, match="at least one"):
        AddressFilter([])


# -- receivers ------------------------------------------------------------------------------


@needs_127_0_0_2
def test_udp_datagrams_from_127_0_0_2_are_dropped_before_parsing() -> None:
    allow = AddressFilter(["127.0.0.1/32"])
    rx = UdpReceiver("127.0.0.1", 0, allow=allow)
    good = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bad = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bad.bind(("127.0.0.2", 0))
    got: list[tuple[bytes, tuple]] = []
    try:
        for i in range(50):
            bad.sendto(b"evil %d" % i, rx.address)
            good.sendto(b"good %d" % i, rx.address)
        deadline = time.monotonic() + 5
        with selectors.DefaultSelector() as sel:
            sel.register(rx.sock, selectors.EVENT_READ)
            for _ in range(1000):
                if (len(got) == 50 and rx.denied == 50) or time.monotonic() > deadline:
                    break
                sel.select(0.05)
                got += rx.drain()
    finally:
        rx.close()
        good.close()
        bad.close()
    assert [d for d, _ in got] == [b"good %d" % i for i in range(50)]
    assert {a[0] for _, a in got} == {"127.0.0.1"}
    assert rx.denied == allow.denied == 50


def test_udp_receiver_without_a_filter_takes_everything() -> None:
    rx = UdpReceiver("127.0.0.1", 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(5):
            s.sendto(bytes([i]), rx.address)
        deadline = time.monotonic() + 2
        got: list = []
        while len(got) < 5 and time.monotonic() < deadline:
            got += rx.drain()
            time.sleep(0.01)
    rx.close()
    assert len(got) == 5 and rx.denied == 0


@needs_127_0_0_2
def test_tcp_connections_from_127_0_0_2_are_closed_on_accept() -> None:
    allow = AddressFilter(["127.0.0.1"])
    messages: list = []
    sel = selectors.DefaultSelector()
    lst = TcpListener(
        "127.0.0.1",
        0,
        framer_factory=TlvFramer,
        on_message=lambda m, p: messages.append(p),
        allow=allow,
    )
    lst.register(sel)
    msg = encode_message([chunk_u32(STM_VENDOR, StmChunk.STREAM_ID, 1)])

    def pump(cond) -> bool:
        deadline = time.monotonic() + 5
        for _ in range(10000):
            if cond() or time.monotonic() > deadline:
                break
            for key, mask in sel.select(0.05):
                key.data.handle(key, mask)
        return cond()

    try:
        with socket.create_connection(lst.address, 2, source_address=("127.0.0.2", 0)) as bad:
            bad.sendall(msg)
            assert pump(lambda: lst.denied == 1)
            bad.settimeout(2)
            with contextlib.suppress(ConnectionResetError):  # closed: EOF or reset
                assert bad.recv(1) == b""
        with socket.create_connection(lst.address, 2) as good:
            good.sendall(msg)
            assert pump(lambda: len(messages) == 1)
    finally:
        lst.close()
        sel.close()
    assert messages[0][0] == "127.0.0.1"
    assert lst.connections == 1 and allow.denied == 1 and lst.bytes == len(msg)


# -- stream ownership -----------------------------------------------------------------------

ETH = Interface(c.LINKTYPE_ETHERNET, 0, ())


def _packet(i: int) -> Packet:
    data = b"\x00" * 14 + bytes([i]) * 40
    return Packet(ETH, 1_700_000_000_000_000 + i, data, len(data))


def test_stream_ids_of_both_formats() -> None:
    for checksum in (False, True):
        enc = Encoder("amf-1", 0xA1B2C3D4, checksum=checksum)
        reports = enc.add(_packet(1), 0.0) + enc.flush()
        assert reports and {stream_ids(r) for r in reports} == {frozenset({0xA1B2C3D4})}
    tlv_enc = TlvEncoder("amf-1", 77)
    reports = tlv_enc.add(_packet(1)) + tlv_enc.flush()
    assert reports and {stream_ids(r) for r in reports} == {frozenset({77})}
    foreign = encode_message(
        [chunk_u32(HEP_VENDOR, HepChunk.CAPTURE_ID, 9), chunk_bytes(HEP_VENDOR, 0x0F, b"x")]
    )
    assert stream_ids(foreign) == {9}
    # a message naming two stream IDs claims both
    sneaky = encode_message(
        [chunk_u32(STM_VENDOR, StmChunk.STREAM_ID, 1), chunk_u32(STM_VENDOR, StmChunk.STREAM_ID, 2)]
    )
    assert stream_ids(sneaky) == {1, 2}
    assert stream_ids(b"") == frozenset() and stream_ids(b"\x00\x00\x88\xb5") == frozenset()
    assert stream_ids(memoryview(b"\x20\x00\x88\xb5\x00\x00\x00\x05")) == {5}


def test_first_authenticated_owner_wins() -> None:
    owners = StreamOwners()
    a = TlvEncoder("amf-1", 7)
    b = TlvEncoder("amf-2", 7)
    mine = (a.add(_packet(1)) + a.flush())[0]
    theirs = (b.add(_packet(2)) + b.flush())[0]
    assert owners.admit(mine, "CN=amf-1")
    assert not owners.admit(theirs, "CN=amf-2")
    assert owners.admit(mine, "CN=amf-1")
    assert owners.admit(theirs, None)  # no identity (plain transport): nothing to enforce
    assert owners.admit(b"garbage", "CN=amf-2")  # no stream ID: the decoder will refuse it
    sneaky = encode_message(
        [chunk_u32(STM_VENDOR, StmChunk.STREAM_ID, 8), chunk_u32(STM_VENDOR, StmChunk.STREAM_ID, 7)]
    )
    assert not owners.admit(sneaky, "CN=amf-2")
    assert owners.owner(8) is None  # refused whole: nothing of it claimed
    assert owners.rejected == 2 and owners.last_refused == (7, "CN=amf-2", "CN=amf-1")
    assert owners.stats() == {"streams": 1, "rejected": 2, "overflow": 0}


def test_ownership_table_is_bounded() -> None:
    owners = StreamOwners(max_streams=3, max_per_identity=2)
    assert owners.claim(1, "a") and owners.claim(2, "a")
    assert not owners.claim(3, "a")  # a's share is full
    assert owners.claim(3, "b")
    assert not owners.claim(4, "b")  # the table is full; no owner is ever forgotten
    assert owners.overflow == 2 and owners.rejected == 0
    assert owners.claim(1, "a") and not owners.claim(1, "b")
    with pytest.raises(UsageError):
        StreamOwners(max_streams=0)


# -- the HEP auth key -----------------------------------------------------------------------


def test_auth_key_is_compared_in_constant_time(monkeypatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(tlv.hmac, "compare_digest", spy)
    key = b"s3cret-k3y"
    msg = tlv.decode_message(
        encode_message([chunk_bytes(HEP_VENDOR, HepChunk.AUTH_KEY, key)]) + b""
    )
    assert tlv.auth_key_matches(msg, key)
    assert not tlv.auth_key_matches(msg, b"s3cret-k3z")
    assert calls == [(key, key), (key, b"s3cret-k3z")]
    # the report decoder uses the same primitive
    from stm.report import hep

    monkeypatch.setattr(hep.hmac, "compare_digest", spy)
    calls.clear()
    enc = TlvEncoder("amf-1", 3, auth_key=key)
    dec = hep.TlvDecoder(auth_key=key)
    for report in enc.add(_packet(1)) + enc.flush():
        dec.receive_message(report, "test", 0.0)
    assert calls and all(pair == (key, key) for pair in calls)
