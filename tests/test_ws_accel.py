"""The WebSocket halves of the compiled accelerator against the `websockets` library.

``stm._accel.ws_client_frames`` writes the producer's report frames and
``ws_server_frames`` cuts them out of what the consumer reads; everything else stays with
websockets' sans-IO protocol. These tests check that the shortcut never changes what is
on the wire or what is read from it:

* the client's frames are what ``ClientProtocol.send_binary`` writes (but for the random
  masking keys), and a ``ServerProtocol`` reads them back exactly, however they are split;
* the server's cut agrees with an oracle written here from RFC 6455 and the function's
  contract (cross-checked with websockets' own parser) on streams of valid, invalid,
  truncated, mutated and random frames, and never raises on arbitrary bytes;
* over real connections on 127.0.0.1, a :class:`WsReceiver` built with the accelerator and
  one built without it give the same reports, Pongs, Close codes and counters, a refusal
  with more frames behind it in the same read included.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import pytest

pytest.importorskip("websockets")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_accel import FUZZ, needs_ext, pure
from test_websocket import HOST, Pump, report, wait
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri
from websockets.utils import apply_mask

import stm.accel
from stm.streaming import MAX_MESSAGE, StreamInfo, encode_ping
from stm.transport.websocket import WsReceiver

EXT = stm.accel.ext
EDGES = (0, 1, 125, 126, 127, 65535, 65536)
"""Payload lengths where the length encoding of a frame header changes."""


def sized(n: int, seed: int) -> bytes:
    """``n`` reproducible pseudo-random bytes (Hypothesis draws the seed, not the bytes)."""
    return random.Random(seed).randbytes(n)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the positions ``cuts`` (taken modulo its length + 1)."""
    at = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *at], [*at, len(data)], strict=True)]


# -- ws_client_frames: what ClientProtocol.send_binary writes -----------------------------------

payloads = st.one_of(
    st.binary(max_size=200),
    st.builds(sized, st.sampled_from(EDGES), st.integers(0, 2**16)),
    st.builds(sized, st.integers(0, 70_000), st.integers(0, 2**16)),
)


def header_size(length: int) -> int:
    """A masked frame header: 2 bytes, the extended length, the 4-byte masking key."""
    return 2 + (0 if length < 126 else 2 if length < 65536 else 8) + 4


@needs_ext
@FUZZ
@given(st.lists(payloads, max_size=8), st.lists(st.integers(0, 2**32), max_size=6))
def test_client_frames_are_what_send_binary_writes(reports: list[bytes], cuts: list[int]):
    blob = EXT.ws_client_frames(reports)
    pos = 0
    for r in reports:  # the same header as websockets', but for the key
        same = Frame(Opcode.BINARY, r).serialize(mask=True)
        key_at = header_size(len(r)) - 4
        assert blob[pos : pos + key_at] == same[:key_at]
        pos += len(same)
    assert pos == len(blob)
    for pieces in ([blob], split(blob, cuts)):
        server = ServerProtocol(state=State.OPEN, max_size=None)
        for piece in pieces:
            server.receive_data(piece)
        frames = server.events_received()
        assert server.parser_exc is None  # it would be set by an unmasked frame
        assert [(f.opcode, f.fin, f.data) for f in frames] == [
            (Opcode.BINARY, True, r) for r in reports
        ]


@needs_ext
@pytest.mark.parametrize("size", [1, 125, 126, 65536])
def test_client_frames_have_a_fresh_key_each(size: int):
    r = sized(size, size)
    one, two = EXT.ws_client_frames([r]), EXT.ws_client_frames([r])
    key_at = header_size(size) - 4
    assert one[:key_at] == two[:key_at] and one[key_at : key_at + 4] != two[key_at : key_at + 4]
    blob = EXT.ws_client_frames([r] * 8)
    step = key_at + 4 + size
    keys = {blob[i + key_at : i + key_at + 4] for i in range(0, len(blob), step)}
    assert len(keys) == 8


@needs_ext
@pytest.mark.parametrize(
    "reports",
    [[b"ok", bytearray(b"x")], ["x"], [b"ok", memoryview(b"x")], [b"ok", None]],
    ids=["bytearray", "str", "memoryview", "None"],
)
def test_client_frames_take_bytes_only(reports: list):
    assert EXT.ws_client_frames(reports) is None
    assert EXT.ws_client_frames([]) == b""


# -- ws_server_frames: an oracle from RFC 6455 and the contract ---------------------------------

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10


def frame_head(data: bytes, pos: int) -> tuple[int, int, int, bytes | None] | None:
    """(first byte, payload length, header length, masking key or None) of the frame at
    ``pos``; None while its header is not all there."""
    if len(data) - pos < 2:
        return None
    first, second = data[pos], data[pos + 1]
    length, at = second & 0x7F, pos + 2
    extra = {126: 2, 127: 8}.get(length, 0)
    if extra:
        if len(data) - at < extra:
            return None
        length, at = int.from_bytes(data[at : at + extra], "big"), at + extra
    key = None
    if second & 0x80:
        if len(data) - at < 4:
            return None
        key, at = data[at : at + 4], at + 4
    return first, length, at - pos, key


def expected_cut(data: bytes, start: int, max_size: int) -> tuple[list[bytes], int, int]:
    """What ``ws_server_frames(data, start, max_size)`` must return."""
    out: list[bytes] = []
    pos = start
    while True:
        head = frame_head(data, pos)
        if head is None:  # the end of data, or a header cut short
            return out, pos, -1
        first, length, size, key = head
        plain = first & 0xF0 == 0x80  # FIN, no RSV bits
        opcode = first & 0x0F
        if key is not None and plain and opcode == BINARY and length <= max_size:
            body = pos + size
            if body + length > len(data):  # not complete yet: its whole length
                return out, pos, size + length if size + length < 2**63 else -1
            out.append(apply_mask(data[body : body + length], key))
            pos = body + length
        elif key is not None and plain and opcode in (PING, PONG) and length <= 125:
            return out, pos, size + length
        else:
            return out, pos, -2


def check_with_websockets(data: bytes, start: int, max_size: int, got) -> None:
    """websockets' parser reads the same: the run as complete binary messages, a whole Ping
    or Pong where ``next`` says so, and nothing of the kind where it says -1 or -2."""
    out, end, nxt = got
    server = ServerProtocol(state=State.OPEN, max_size=max_size)
    server.receive_data(data[start:end])
    assert server.parser_exc is None
    assert [(f.opcode, f.fin, f.data) for f in server.events_received()] == [
        (Opcode.BINARY, True, p) for p in out
    ]
    after = ServerProtocol(state=State.OPEN, max_size=max_size if nxt == -2 else None)
    after.receive_data(data[end : end + nxt] if nxt > 0 else data[end:])
    first = after.events_received()[:1]
    if nxt > 0 and end + nxt <= len(data):
        assert after.parser_exc is None and [f.opcode for f in first] in ([PING], [PONG])
    elif nxt == -1:
        assert first == []
    elif nxt == -2:
        assert not first or not first[0].fin or first[0].opcode not in (BINARY, PING, PONG)


def raw_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True):
    """A frame as websockets serializes it, with any opcode, FIN and RSV bits (its
    ``Frame.serialize`` refuses to write invalid frames, which are wanted here too)."""
    wire = Frame(Opcode.BINARY, payload).serialize(mask=mask)
    return bytes([(0x80 if fin else 0) | rsv | opcode]) + wire[1:]


@st.composite
def any_frames(draw) -> bytes:
    """One frame: mostly a report frame, else any other kind, valid or not."""
    n = draw(st.one_of(st.integers(0, 300), st.sampled_from(EDGES)))
    payload = sized(n, draw(st.integers(0, 255)))
    if draw(st.sampled_from((True, True, False))):
        return raw_frame(BINARY, payload)
    opcode = draw(st.sampled_from((BINARY, CONT, TEXT, CLOSE, PING, PING, PONG, PONG, 3, 11)))
    fin = draw(st.sampled_from((True,) * 3 + (False,)))
    rsv = draw(st.sampled_from((0,) * 6 + (0x40, 0x20, 0x10)))
    mask = draw(st.sampled_from((True,) * 6 + (False,)))
    if opcode == CLOSE and draw(st.booleans()):
        code = draw(st.sampled_from((1000, 1001, 1008, 3000, 4999)))
        payload = Close(code, draw(st.text(max_size=20))).serialize()
    elif opcode >= CLOSE:
        payload = draw(st.binary(max_size=130))  # control frames: 125 bytes at most
    return raw_frame(opcode, payload, fin=fin, rsv=rsv, mask=mask)


@st.composite
def streams(draw) -> tuple[bytes, list[int]]:
    """Frames one after the other, maybe then the start of one more and some garbage,
    maybe with a few bytes changed; and the offsets where the first frames start."""
    parts = draw(st.lists(any_frames(), max_size=8))
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + len(p))
    data = b"".join(parts)
    if draw(st.booleans()):
        last = draw(any_frames())
        data += last[: draw(st.integers(0, len(last) - 1))]
    data += draw(st.binary(max_size=20))
    if data:
        for at, byte in draw(
            st.lists(st.tuples(st.integers(0, 2**32), st.integers(0, 255)), max_size=3)
        ):
            at %= len(data)
            data = data[:at] + bytes([byte]) + data[at + 1 :]
    return data, starts


MAX_SIZES = st.sampled_from((MAX_MESSAGE,) * 4 + (0, 125, 126, 1000, 65536))


@needs_ext
@FUZZ
@given(streams(), st.data(), MAX_SIZES)
def test_server_frames_against_the_oracle(
    stream: tuple[bytes, list[int]], data: st.DataObject, max_size: int
):
    blob, starts = stream
    start = data.draw(st.sampled_from(starts))
    got = EXT.ws_server_frames(blob, start, max_size)
    assert got == expected_cut(blob, start, max_size)
    check_with_websockets(blob, start, max_size, got)


@needs_ext
@pytest.mark.parametrize(
    ("wire", "cut"),
    [
        (b"", ([], 0, -1)),
        (raw_frame(BINARY, b""), ([b""], 6, -1)),
        (raw_frame(BINARY, b"ab")[:5], ([], 0, -1)),  # the header cut short
        (raw_frame(5, b"ab")[:5], ([], 0, -1)),  # ... even of a frame to refuse
        (raw_frame(5, b"ab"), ([], 0, -2)),
        (raw_frame(BINARY, b"ab")[:7], ([], 0, 8)),  # the payload cut short: its length
        (raw_frame(TEXT, b"ab")[:7], ([], 0, -2)),
        (raw_frame(PING, b"abc")[:3], ([], 0, -1)),
        (raw_frame(PING, b"abc")[:7], ([], 0, 9)),  # complete or not: its length
        (raw_frame(PONG, b"x" * 125), ([], 0, 131)),
        (raw_frame(PING, b"x" * 126), ([], 0, -2)),
        (raw_frame(PING, b"abc", fin=False), ([], 0, -2)),
        (raw_frame(PING, b"abc", mask=False), ([], 0, -2)),
        (raw_frame(BINARY, b"ab", mask=False), ([], 0, -2)),
        (raw_frame(BINARY, b"ab", rsv=0x10), ([], 0, -2)),
        (raw_frame(BINARY, b"ab", fin=False), ([], 0, -2)),
        (raw_frame(CONT, b"ab"), ([], 0, -2)),
        (raw_frame(CLOSE, b"\x03\xe8"), ([], 0, -2)),
        (raw_frame(BINARY, b"x" * 65536)[:14], ([], 0, -2)),  # over max_size: refused at once
        (raw_frame(BINARY, b"x" * 65535)[:8], ([], 0, 65543)),
        # a length not in its shortest form is still a length
        (b"\x82\xfe\x00\x02abcd" + apply_mask(b"hi", b"abcd"), ([b"hi"], 10, -1)),
    ],
)
def test_server_frames_edges(wire: bytes, cut: tuple):
    assert EXT.ws_server_frames(wire, 0, MAX_MESSAGE) == cut == expected_cut(wire, 0, MAX_MESSAGE)


@needs_ext
@FUZZ
@given(st.binary(max_size=300), st.data(), st.one_of(MAX_SIZES, st.integers(0, 2**64 - 1)))
def test_server_frames_on_arbitrary_bytes(blob: bytes, data: st.DataObject, max_size: int):
    start = data.draw(st.integers(0, len(blob)))
    assert EXT.ws_server_frames(blob, start, max_size) == expected_cut(blob, start, max_size)


# -- end to end: the accelerated receiver and the pure-Python one, over real connections --------

STREAM, OTHER = 0x1234, 0x77
STREAMS_PING = encode_ping("amf-1", [StreamInfo.stm(STREAM, "gre")])
WAIT = 5.0
ENDINGS = (None, "text", "oversize", "close")
"""How the client ends: its EOF, a text frame, a frame over 65,535 bytes, a Close."""
CLOSE_CODE = {None: None, "text": 1003, "oversize": 1009, "close": 1000}
CHUNKS = (1, 3, 13, 14, 100, 1500, 9000, 70_000)


@dataclass
class Outcome:
    """What one conversation with a receiver gave, on both sides."""

    reports: list[bytes]
    pongs: list[bytes]
    close: int | None  # the code of the Close the client got
    ended: list[int | None]  # the codes of the receiver's on_close markers
    stats: dict


class Client:
    """A producer on a raw socket, its frames written by websockets' ClientProtocol: the
    Upgrade, then (``announce``) the seed's streamInfoList Ping and its Pong."""

    def __init__(self, port: int, announce: bool = True) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=WAIT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ws = ClientProtocol(parse_uri(f"ws://{HOST}:{port}/stm"))
        self.frames: list[Frame] = []
        self.eof = False
        self.ws.send_request(self.ws.connect())
        self.sock.sendall(b"".join(self.ws.data_to_send()))
        assert self.read(lambda: self.ws.state is State.OPEN)
        if not announce:
            return
        self.ws.send_ping(STREAMS_PING)
        self.sock.sendall(b"".join(self.ws.data_to_send()))
        assert self.read(lambda: STREAMS_PING in self.pongs)

    @property
    def pongs(self) -> list[bytes]:
        return [bytes(f.data) for f in self.frames if f.opcode is Opcode.PONG]

    @property
    def close_code(self) -> int | None:
        return None if self.ws.close_rcvd is None else self.ws.close_rcvd.code

    def read(self, done: Callable[[], bool]) -> bool:
        """Take in what the receiver sends (answering its Close) until ``done()``, the end
        of the connection or WAIT seconds; whether ``done()``."""
        deadline = time.monotonic() + WAIT
        while not done() and not self.eof and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            except OSError:  # reset: the receiver closed with our data unread
                data = b""
            if data:
                self.ws.receive_data(data)
            else:
                self.ws.receive_eof()
                self.eof = True
            self.frames += [e for e in self.ws.events_received() if isinstance(e, Frame)]
            for out in self.ws.data_to_send():
                if out and not self.eof:
                    try:
                        self.sock.sendall(out)
                    except OSError:
                        self.eof = True
        return done()

    def write(self, blob: bytes, rnd: random.Random) -> None:
        """``blob`` in chunks of random sizes (about 100 at most) with short pauses, so
        that the receiver's reads end anywhere in a frame."""
        pos = 0
        while pos < len(blob):
            n = max(rnd.choice(CHUNKS), len(blob) // 100)
            try:
                self.sock.sendall(blob[pos : pos + n])
            except OSError:  # the receiver closed the connection (a frame too big)
                return
            pos += n
            if rnd.random() < 0.3:
                time.sleep(0.001)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Script:
    """What a producer sends after its streamInfoList Ping, then how it ends."""

    steps: list[tuple]
    ending: str | None
    seed: int  # of the chunking

    def encode(self, ws: ClientProtocol) -> tuple[bytes, list[bytes], list[bytes], int]:
        """(the client's bytes, the reports to be decoded, the Pongs to be received, the
        reports of streams not announced)."""
        reports: list[bytes] = []
        pongs: list[bytes] = []
        unannounced = 0
        for i, (kind, key, size, pieces) in enumerate(self.steps):
            if kind == "ping":
                pongs.append(struct.pack("!Q", i))  # not "STM...": a keepalive
                ws.send_ping(pongs[-1])
                continue
            r = report(key, i, size)
            if key == STREAM:
                reports.append(r)
            else:
                unannounced += 1
            if kind == "report":
                ws.send_binary(r)
            else:  # a fragmented message, maybe with a Ping inside
                parts = split(r, pieces)
                ws.send_binary(parts[0], fin=len(parts) == 1)
                for n, part in enumerate(parts[1:], 2):
                    if kind == "fragments+ping" and n == 2:
                        pongs.append(struct.pack("!Q", i))
                        ws.send_ping(pongs[-1])
                    ws.send_continuation(part, fin=n == len(parts))
        if self.ending == "text":
            ws.send_text(b"not a report")
        elif self.ending == "oversize":
            ws.send_binary(report(STREAM, 1 << 20, 70_000))
        elif self.ending == "close":
            ws.send_close(1000, "bye")
        return b"".join(ws.data_to_send()), reports, pongs, unannounced


REPORT_SIZES = (0, 113, 114, 200, 200, 200, 1000, 65523)  # frames of 12 + size bytes
steps = st.tuples(
    st.sampled_from(("report",) * 6 + ("ping", "fragments", "fragments+ping")),
    st.sampled_from((STREAM,) * 4 + (OTHER,)),
    st.sampled_from(REPORT_SIZES),
    st.lists(st.integers(1, 2**20), min_size=1, max_size=3),
)
scripts = st.builds(
    Script, st.lists(steps, max_size=25), st.sampled_from(ENDINGS), st.integers(0, 2**32)
)


def converse(script: Script, accelerated: bool) -> tuple[Outcome, tuple]:
    """Play ``script`` to a new receiver, accelerated or pure Python: what happened, and
    what should have happened (reports, Pongs, unannounced reports)."""
    with nullcontext() if accelerated else pure():
        receiver = WsReceiver(HOST, 0, path="/stm", procedure="seed", handshake_timeout=WAIT)
    assert (receiver._ext is not None) == accelerated
    pump = Pump(receiver)
    try:
        client = Client(receiver.address[1])
        try:
            blob, *expected = script.encode(client.ws)
            client.write(blob, random.Random(script.seed))
            if script.ending is None:
                client.sock.shutdown(socket.SHUT_WR)
            client.read(lambda: False)  # until the receiver closes the connection
            assert client.eof, "the receiver did not close the connection"
        finally:
            client.close()
        assert wait(lambda: pump.closes and receiver.stats()["active"] == 0, WAIT)
        stats = receiver.stats()
        kept = ("connections", "reports", "bytes", "oversize", "unannounced", "closed")
        outcome = Outcome(
            reports=list(pump.reports),
            pongs=[p for p in client.pongs if p != STREAMS_PING],
            close=client.close_code,
            ended=[c.code for c in pump.closes],
            stats={k: stats[k] for k in kept},
        )
    finally:
        pump.stop()
    return outcome, tuple(expected)


@needs_ext
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scripts)
def test_receiver_with_and_without_the_accelerator(script: Script):
    fast, expected = converse(script, accelerated=True)
    slow, _ = converse(script, accelerated=False)
    assert fast == slow
    reports, pongs, unannounced = expected
    assert (slow.reports, slow.pongs) == (reports, pongs)
    code = CLOSE_CODE[script.ending]
    assert (slow.close, slow.ended) == (code, [code])
    assert slow.stats["unannounced"] == unannounced
    assert slow.stats["oversize"] == (script.ending == "oversize")
    by = {None: "dropped", "close": "by_producer"}.get(script.ending, "by_us")
    assert slow.stats["closed"] == {"by_producer": 0, "by_us": 0, "dropped": 0, by: 1}


# -- a known discrepancy: what follows a refused frame in the same read --------------------------


def refused_then_closed(first: str, accelerated: bool) -> tuple:
    """A frame the receiver refuses and the client's Close right after it, in one write:
    (the Close code the client got, the receiver's counters of ended connections, the
    codes of its on_close markers, whether it closed the connection at once)."""
    with nullcontext() if accelerated else pure():
        receiver = WsReceiver(HOST, 0, path="/stm", procedure="seed", handshake_timeout=1.0)
    pump = Pump(receiver)
    try:
        client = Client(receiver.address[1], announce=first == "bad streamInfoList")
        try:
            if first == "bad streamInfoList":
                client.ws.send_ping(b"STM\x09")  # 1007: not a version-1 streamInfoList
            else:
                client.ws.send_binary(report(STREAM, 0))  # 1008: before the streamInfoList
            client.ws.send_close(1000, "bye")
            began = time.monotonic()
            client.sock.sendall(b"".join(client.ws.data_to_send()))
            client.read(lambda: False)
            prompt = client.eof and time.monotonic() - began < 0.5
        finally:
            client.close()
        assert wait(lambda: receiver.stats()["active"] == 0, WAIT)
        return client.close_code, receiver.stats()["closed"], [c.code for c in pump.closes], prompt
    finally:
        pump.stop()


@needs_ext
@pytest.mark.parametrize("first", ["report before the streamInfoList", "bad streamInfoList"])
def test_a_refusal_and_a_close_in_one_read(first: str):
    assert refused_then_closed(first, True) == refused_then_closed(first, False)


@needs_ext
def test_a_huge_length_under_a_huge_max_size_is_incomplete_not_an_overflow():
    wire = b"\x82\xff" + (2**64 - 1).to_bytes(8, "big") + b"abcd"
    assert EXT.ws_server_frames(wire, 0, 2**64 - 1) == ([], 0, -1)
