"""STM reports over WebSocket (ws://, wss://) in both connection procedures: TS 28.532's REST
resources and the seed's streamInfoList Ping. Real connections on 127.0.0.1 only; the
peers are wsproto (another implementation than ours, which is on websockets' sans-IO
protocol), websockets' threaded client and server, http.client and curl."""

from __future__ import annotations

import http.client
import json
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("wsproto")
websockets_sync = pytest.importorskip("websockets.sync.client")
from test_tls import SERVER_NAME, make_pki  # noqa: E402
from websockets.sync.server import serve as ws_serve  # noqa: E402

from stm import pcapng  # noqa: E402
from stm.errors import StmError, UsageError  # noqa: E402
from stm.streaming import (  # noqa: E402
    MAX_PING,
    SERIALIZATION_FORMATS,
    STREAM_TYPES,
    Registry,
    StreamInfo,
    StreamInfoTooLong,
    decode_ping,
    encode_ping,
)
from stm.transport.url import parse_url  # noqa: E402
from stm.transport.websocket import Refused, WsReceiver, WsSender  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in (".pcap", ".pcapng"))
SIP_UDP = ROOT / "samples" / "sip_udp_ipv4.pcap"
PY = [sys.executable, "-m"]
HOST = "127.0.0.1"


def report(key: int, i: int, size: int = 200) -> bytes:
    """A format-A-shaped report (GRE with key = stream ID): enough for the stream checks."""
    return struct.pack("!HHI", 0x2000, 0x88B5, key) + i.to_bytes(4, "big") + b"x" * size


def wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Pump:
    """Drives a WsReceiver the way stm-recv's selector loop does, from a thread."""

    def __init__(self, receiver: WsReceiver) -> None:
        self.r = receiver
        self.reports: list[bytes] = []
        self.sources: list = []
        self.closes: list = []
        receiver.on_close = self.closes.append
        receiver.on_reports = self._take
        self._sel = selectors.DefaultSelector()
        receiver.register(self._sel)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _take(self, reports: list[bytes], source) -> None:
        self.reports += reports
        self.sources += [source] * len(reports)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop:
            for key, mask in self._sel.select(0.05):
                key.data.handle(key, mask)
            now = time.monotonic()
            if now - last >= 0.5:
                self.r.expire(now)
                last = now

    def wait(self, n: int, timeout: float = 10.0) -> bool:
        return wait(lambda: len(self.reports) >= n, timeout)

    def stop(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.r.close()
        self._sel.close()


@pytest.fixture
def rx():
    made = []

    def make(**kw) -> Pump:
        kw.setdefault("path", "/stm")
        pump = Pump(WsReceiver(HOST, kw.pop("port", 0), **kw))
        made.append(pump)
        return pump

    yield make
    for p in made:
        p.stop()


def url_of(pump: Pump, scheme: str = "ws") -> str:
    return f"{scheme}://{HOST}:{pump.r.address[1]}/stm"


def sender(url: str, **kw) -> WsSender:
    kw.setdefault("producer", "amf-1")
    kw.setdefault("streams", [StreamInfo.stm(0x1234, "gre")])
    kw.setdefault("connect_timeout", 2.0)
    return WsSender(parse_url(url), **kw)


# -- the schema (TS28532_StreamingDataMnS.yaml, components/schemas): field names and enums ---------

STREAM_INFO = {"streamType", "serializationFormat", "streamId", "additionalInfo"}
VS_DATA = {"vsDataType", "vsData", "vsDataFormatVersion"}


def check_stream_info(obj) -> None:
    assert set(obj) <= STREAM_INFO and {"streamType", "serializationFormat", "streamId"} <= set(obj)
    assert obj["streamType"] in STREAM_TYPES and obj["serializationFormat"] in ("GPB", "ASN1")
    assert isinstance(obj["streamId"], str)
    if "additionalInfo" in obj:
        assert set(obj["additionalInfo"]) <= VS_DATA


def check_connection_info(obj) -> None:
    assert set(obj) <= {"connection", "producer", "streams"}
    assert isinstance(obj["connection"], str) and all(isinstance(s, str) for s in obj["streams"])


def check_with_reporters(obj) -> None:
    assert set(obj) == {"streamInfo", "reporters"}
    check_stream_info(obj["streamInfo"])
    assert all(isinstance(r, str) for r in obj["reporters"])


def check_error(obj) -> None:
    assert set(obj) == {"error"} and set(obj["error"]) == {"errorInfo"}


def check_failed(obj) -> None:
    assert set(obj) == {"error"} and obj["error"]
    for item in obj["error"]:
        assert set(item) == {"streamId", "errorReason"}


# -- sans-IO ---------------------------------------------------------------------------------------


def test_stream_info_json_uses_the_schema_names_and_enums():
    info = StreamInfo.stm(0x96926B79, "tlv").to_json()
    check_stream_info(info)
    assert info == {
        "streamType": "PROPRIETARY",
        "serializationFormat": "ASN1",
        "streamId": "96926B79",
        "additionalInfo": {"vsDataType": "STM", "vsData": "tlv", "vsDataFormatVersion": "1"},
    }
    assert StreamInfo.from_json(info) == StreamInfo.stm(0x96926B79, "tlv")
    assert StreamInfo.from_json(info).stm_format == "tlv"
    assert SERIALIZATION_FORMATS == ("GPB", "ASN1")


def test_ping_encoding_round_trip_and_the_125_byte_edge():
    streams = [StreamInfo.stm(0x96926B79, "gre")]
    payload = encode_ping("amf-1", streams)
    assert payload == b"STM\x01\x05amf-1" + bytes([0x32]) + bytes.fromhex("96926b79")
    assert decode_ping(payload) == ("amf-1", streams)
    # 5 bytes of head, 5 a stream: a 115-byte producer name fills the Ping exactly
    full = encode_ping("p" * 115, streams)
    assert len(full) == MAX_PING and decode_ping(full)[0] == "p" * 115
    with pytest.raises(StreamInfoTooLong, match=r"126 bytes .* at most 125 .* at most 115 bytes"):
        encode_ping("p" * 116, streams)
    two = [StreamInfo.stm(1, "gre"), StreamInfo.stm(2, "tlv")]
    assert len(encode_ping("q" * 110, two)) == MAX_PING
    with pytest.raises(StreamInfoTooLong):
        encode_ping("q" * 111, two)


def test_rest_state_machine_without_sockets():
    reg = Registry("/stm", new_id=lambda: "c1")
    body = json.dumps({"producer": "amf-1", "streams": [StreamInfo.stm(7, "gre").to_json()]})
    r = reg.handle("POST", "/stm/connections", {"content-type": "application/json"}, body.encode())
    assert (r.status, r.headers) == (201, [("Location", "/stm/connections/c1")])
    assert reg.upgrade_target("/stm/connections/c1", None)[1] == 101
    assert reg.upgrade_target("/stm/connections/nope", None)[1] == 404
    assert reg.upgrade_target("/stm", None)[1] == 404  # the seed's Upgrade: not on ts28532
    # over wss, a stream ID owned by another certificate is refused at announcement
    owned = Registry("/stm", owner_of=lambda sid: "CN=amf-1" if sid == 7 else None)
    headers = {"content-type": "application/json"}
    r = owned.handle("POST", "/stm/connections", headers, body.encode(), identity="CN=amf-2")
    assert r.status == 403 and b"belongs to another producer (CN=amf-1)" in r.body
    r = owned.handle("POST", "/stm/connections", headers, body.encode(), identity="CN=amf-1")
    assert r.status == 201


# -- REST resources over real HTTP (http.client and curl as independent clients) -------------------


def request(port: int, method: str, path: str, obj=None, ctype="application/json"):
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    body = None if obj is None else (obj if isinstance(obj, bytes) else json.dumps(obj).encode())
    conn.request(method, path, body=body, headers={"Content-Type": ctype} if body else {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(data) if data else None


def test_rest_resources_status_codes_and_bodies(rx):
    pump = rx()
    port = pump.r.address[1]
    s7, s8, s9 = (StreamInfo.stm(i, "gre").to_json() for i in (7, 8, 9))
    status, headers, body = request(port, "POST", "/stm/connections",
                                    {"producer": "amf-1", "streams": [s7]})  # fmt: skip
    assert status == 201 and body is None
    location = headers["Location"]
    assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/stm/connections/[0-9a-f]{{16}}", location)
    cid = location.rsplit("/", 1)[1]
    path = f"/stm/connections/{cid}"
    # getConnectionInfo, one and several (the list takes the URI or the bare ID)
    status, _, info = request(port, "GET", path)
    assert status == 200 and info == {"connection": location, "producer": "amf-1",
                                      "streams": ["00000007"]}  # fmt: skip
    check_connection_info(info)
    assert request(port, "GET", f"/stm/connections?connectionIdList={location}")[0] == 200
    status, _, infos = request(port, "GET", f"/stm/connections?connectionIdList={cid},nope")
    assert status == 202 and [i["connection"] for i in infos] == [location]
    status, _, err = request(port, "GET", "/stm/connections/nope")
    assert status == 404
    check_error(err)
    # addStream: all taken (201), some (202), none (422)
    status, _, added = request(port, "POST", f"{path}/streams", [s8])
    assert status == 201 and added == [s8]
    foreign = {"streamType": "PERFORMANCE", "serializationFormat": "GPB", "streamId": "X1"}
    status, _, added = request(port, "POST", f"{path}/streams", [s9, foreign])
    assert status == 202 and added == [s9]
    status, _, err = request(port, "POST", f"{path}/streams", [foreign])
    assert status == 422 and "not an STM stream" in err["error"]["errorInfo"]
    # getStreamInfo
    status, _, got = request(port, "GET", f"{path}/streams?streamIds=00000007&streamIds=00000008")
    assert status == 200 and [g["streamInfo"] for g in got] == [s7, s8]
    for g in got:
        check_with_reporters(g)
        assert g["reporters"] == ["amf-1"]
    assert request(port, "GET", f"{path}/streams?streamIds=00000007,00000042")[0] == 202
    status, _, one = request(port, "GET", f"{path}/streams/00000009")
    assert status == 200 and one == {"streamInfo": s9, "reporters": ["amf-1"]}
    assert request(port, "GET", f"{path}/streams/00000042")[0] == 404
    # deleteStream
    assert request(port, "DELETE", f"{path}/streams?streamIds=00000008")[:2][0] == 204
    assert request(port, "DELETE", f"{path}/streams?streamIds=00000008")[0] == 404
    assert request(port, "DELETE", f"{path}/streams")[0] == 400  # streamIds is required
    assert request(port, "GET", path)[2]["streams"] == ["00000007", "00000009"]
    # what a bad request gets
    status, _, err = request(port, "POST", "/stm/connections", b"{not json")
    assert status == 400
    status, _, failed = request(port, "POST", "/stm/connections", {"producer": "x"})
    assert status == 400
    check_failed(failed)
    status, _, failed = request(port, "POST", "/stm/connections",
                                {"streams": [{**s7, "serializationFormat": "XML"}]})  # fmt: skip
    assert status == 400 and "serializationFormat" in failed["error"][0]["errorReason"]
    status, _, failed = request(port, "POST", "/stm/connections", {"streams": [foreign]})
    assert status == 422 and failed["error"][0]["streamId"] == "X1"
    assert request(port, "POST", "/stm/connections", {"streams": [s7]}, "text/plain")[0] == 415
    status, headers, _ = request(port, "PUT", path, {"x": 1})
    assert status == 405 and headers["Allow"] == "GET"
    assert request(port, "GET", "/elsewhere")[0] == 404


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_creates_and_reads_a_connection(rx):
    pump = rx()
    base = f"http://{HOST}:{pump.r.address[1]}/stm/connections"
    body = json.dumps({"producer": "amf-1", "streams": [StreamInfo.stm(5, "tlv").to_json()]})
    out = subprocess.run(
        ["curl", "-sS", "-i", "--noproxy", "*", "-X", "POST", "-H",
         "Content-Type: application/json", "--data", body, base],
        capture_output=True, text=True, timeout=20, check=True,
    ).stdout  # fmt: skip
    assert out.startswith("HTTP/1.1 201")
    location = re.search(r"(?im)^location: (\S+)", out).group(1)
    got = subprocess.run(["curl", "-sS", "--noproxy", "*", location], capture_output=True,
                         text=True, timeout=20, check=True).stdout  # fmt: skip
    assert json.loads(got) == {"connection": location, "producer": "amf-1", "streams": ["00000005"]}


# -- the procedures over real connections ----------------------------------------------------------


@pytest.mark.parametrize("procedure", ["ts28532", "seed"])
def test_reports_flow_in_order_and_close_from_the_producer_flushes(rx, procedure):
    pump = rx(procedure="any")
    s = sender(url_of(pump), procedure=procedure)
    s.connect()
    reports = [report(0x1234, i) for i in range(3000)]
    for i in range(0, len(reports), 100):
        s.send(reports[i : i + 100])
    s.close(10)
    assert s.stats()["sent"] == 3000 and s.stats()["undelivered"] == 0
    assert pump.wait(3000) and pump.reports == reports
    assert wait(lambda: pump.closes)
    assert (pump.closes[0].code, pump.closes[0].producer) == (1000, "amf-1")
    assert pump.r.stats()["closed"]["by_producer"] == 1
    assert pump.r.registry.connections == {}  # terminated: the resource went with it


def test_streams_added_and_deleted_while_connected(rx):
    pump = rx()
    s = sender(url_of(pump))
    s.connect()
    s.send([report(0x1234, 0), report(0x77, 1)])  # 0x77 not announced: dropped
    assert pump.wait(1) and wait(lambda: pump.r.unannounced == 1)
    assert s.add_streams([StreamInfo.stm(0x77, "gre")]) == [StreamInfo.stm(0x77, "gre").to_json()]
    info = s.connection_info()
    check_connection_info(info)
    assert info["streams"] == ["00001234", "00000077"] and info["connection"] == s.connection
    s.send([report(0x77, 2)])
    assert pump.wait(2)
    got = s.stream_info(["00000077"])
    assert got == [{"streamInfo": StreamInfo.stm(0x77, "gre").to_json(), "reporters": ["amf-1"]}]
    s.delete_streams(["00000077"])
    s.send([report(0x77, 3), report(0x1234, 4)])
    assert pump.wait(3)
    s.close(5)
    assert [r[8:12] for r in pump.reports] == [bytes([0, 0, 0, i]) for i in (0, 2, 4)]
    assert pump.r.unannounced == 2
    with pytest.raises(Refused, match="404"):
        s.connection_info()  # terminated


def test_consumer_close_then_restart_loses_nothing(rx):
    first = rx()
    port = first.r.address[1]
    s = sender(url_of(first), backoff_initial=0.05, backoff_max=0.2)
    s.connect()
    reports = [report(0x1234, i) for i in range(4000)]
    s.send(reports[:2000])
    assert first.wait(1000)
    first.stop()  # Close 1001 to the producer, mid-stream
    assert wait(lambda: not s.stats()["connected"], 5)
    s.send(reports[2000:])
    second = rx(port=port)
    s.close(15)
    stats = s.stats()
    assert stats["sent"] == 4000 and stats["undelivered"] == 0 and stats["reconnects"] >= 1
    assert second.wait(1)
    time.sleep(0.2)
    union = Counter(first.reports) + Counter(second.reports)
    assert set(union) == set(reports)  # every report arrived, some maybe twice
    assert second.reports[-1] == reports[-1]
    assert len(first.reports) + len(second.reports) - len(reports) <= stats["resent"]


# -- refusals: a clear error, no retrying forever --------------------------------------------------


def test_seed_producer_to_a_ts28532_consumer_is_refused(rx):
    pump = rx(procedure="ts28532")
    with pytest.raises(Refused, match=r"Upgrade GET /stm: 404 .*POST /stm/connections first"):
        sender(url_of(pump), procedure="seed").connect()


def test_ts28532_producer_to_a_seed_consumer_is_refused(rx):
    pump = rx(procedure="seed")
    with pytest.raises(Refused, match=r"POST /stm/connections: 404 Not Found"):
        sender(url_of(pump), procedure="ts28532").connect()


def raw_consumer(answer_ping: bool):
    """A one-connection WebSocket server (wsproto, by hand) that accepts the Upgrade, then
    answers the first Ping with a Close 1008 (``answer_ping``) or says nothing at all."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Ping, Request

    lsock = socket.create_server((HOST, 0))

    def serve():
        conn, _ = lsock.accept()
        conn.settimeout(3)
        ws = WSConnection(ConnectionType.SERVER)
        with conn:
            for _ in range(20):
                data = conn.recv(65536)
                if not data:
                    return
                ws.receive_data(data)
                for e in ws.events():
                    if isinstance(e, Request):
                        conn.sendall(ws.send(AcceptConnection()))
                    elif isinstance(e, Ping) and answer_ping:
                        conn.sendall(ws.send(CloseConnection(code=1008, reason="no STM here")))
            time.sleep(2)

    threading.Thread(target=serve, daemon=True).start()
    return lsock


def test_close_instead_of_pong_and_no_pong_are_refusals():
    with raw_consumer(answer_ping=True) as lsock:
        port = lsock.getsockname()[1]
        with pytest.raises(Refused, match=r"Close 1008 instead of a Pong.*no STM here"):
            sender(f"ws://{HOST}:{port}/", procedure="seed").connect()
    with raw_consumer(answer_ping=False) as lsock:
        port = lsock.getsockname()[1]
        with pytest.raises(Refused, match="no Pong to the streamInfoList Ping within 1 s"):
            sender(f"ws://{HOST}:{port}/", procedure="seed", connect_timeout=1.0).connect()


def test_a_stream_ping_that_does_not_fit_is_a_usage_error(rx):
    pump = rx(procedure="seed")
    with pytest.raises(StmError, match="at most 125"):
        sender(url_of(pump), procedure="seed", producer="p" * 116)


# -- independent peers: the websockets library -----------------------------------------------------


def test_websockets_client_on_our_consumer_both_procedures(rx):
    pump = rx(procedure="any")
    # the seed: Upgrade, Ping with the streamInfoList (a full 125 bytes), Pong, data
    ping = encode_ping("p" * 115, [StreamInfo.stm(0x1234, "gre")])
    with websockets_sync.connect(url_of(pump), proxy=None, compression=None) as ws:
        assert ws.ping(ping).wait(5)
        ws.send(report(0x1234, 1))
        ws.send(report(0x9999, 2))  # not announced: dropped
        ws.send(report(0x1234, 3))
        assert pump.wait(2)
    assert [r[8:12] for r in pump.reports] == [bytes([0, 0, 0, i]) for i in (1, 3)]
    assert wait(lambda: pump.closes) and pump.closes[0].code == 1000
    # TS 28.532: POST with http.client, then the Upgrade on the connection's resource
    status, headers, _ = request(pump.r.address[1], "POST", "/stm/connections",
                                 {"producer": "amf-2", "streams": [
                                     StreamInfo.stm(0x55, "tlv").to_json()]})  # fmt: skip
    assert status == 201
    path = headers["Location"].split(f":{pump.r.address[1]}", 1)[1]
    with websockets_sync.connect(f"ws://{HOST}:{pump.r.address[1]}{path}", proxy=None) as ws:
        ws.send(report(0x55, 4))
        assert ws.ping(b"k").wait(5)
    assert pump.wait(3) and pump.reports[-1] == report(0x55, 4)
    # a message over 65,535 bytes is closed with 1009 (message too big)
    with websockets_sync.connect(url_of(pump), proxy=None) as ws:
        assert ws.ping(ping).wait(5)
        ws.send(b"\x20\x00\x88\xb5" + b"y" * 70000)
        with pytest.raises(Exception) as err:
            ws.recv(timeout=5)
        assert "1009" in str(err.value)
    assert pump.r.stats()["oversize"] == 1


def test_a_wsproto_producer_on_our_consumer(rx):
    """Another implementation's frames, whole and fragmented, with Pings between them."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, Pong
    from wsproto.events import Request as WsprotoRequest

    pump = rx(procedure="seed")
    ws = WSConnection(ConnectionType.CLIENT)
    sent = [report(0x1234, i, size=50 + 37 * i) for i in range(300)]
    pongs, closed = [], []

    def take(sock) -> None:
        ws.receive_data(sock.recv(65536) or None)
        for event in ws.events():
            if isinstance(event, Pong):
                pongs.append(bytes(event.payload))
            elif isinstance(event, CloseConnection):
                closed.append(event.code)
            elif not isinstance(event, AcceptConnection):
                raise AssertionError(f"unexpected {event!r}")

    with socket.create_connection((HOST, pump.r.address[1]), timeout=5) as sock:
        sock.sendall(ws.send(WsprotoRequest(host=HOST, target="/stm")))
        take(sock)
        sock.sendall(ws.send(Ping(payload=encode_ping("amf-9", [StreamInfo.stm(0x1234, "gre")]))))
        take(sock)
        assert len(pongs) == 1
        out = b""
        for i, r in enumerate(sent):
            if i in (260, 275, 290):  # in three fragments (then websockets sees it all)
                out += ws.send(BytesMessage(data=r[:10], message_finished=False))
                out += ws.send(BytesMessage(data=r[10:20], message_finished=False))
                out += ws.send(BytesMessage(data=r[20:]))
            else:
                out += ws.send(BytesMessage(data=r))
            if i % 50 == 49:
                out += ws.send(Ping(payload=i.to_bytes(8, "big")))
        for at in range(0, len(out), 1000):  # in pieces, frames cut anywhere
            sock.sendall(out[at : at + 1000])
        assert pump.wait(len(sent))
        sock.sendall(ws.send(CloseConnection(code=1000)))
        deadline = time.monotonic() + 5
        while not closed and time.monotonic() < deadline:
            take(sock)
    assert pump.reports == sent
    assert pongs[1:] == [i.to_bytes(8, "big") for i in range(49, 300, 50)]
    assert closed == [1000] and wait(lambda: [c.code for c in pump.closes] == [1000])


def test_our_producer_on_a_websockets_server():
    got: list[bytes] = []

    def handler(ws):
        for message in ws:
            got.append(message)

    with ws_serve(handler, HOST, 0, compression=None) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        s = sender(f"ws://{HOST}:{port}/stm", procedure="seed")
        s.connect()
        reports = [report(0x1234, i) for i in range(500)]
        s.send(reports)
        s.close(5)
        assert s.stats()["sent"] == 500  # acknowledged by the library's automatic Pongs
        assert wait(lambda: len(got) == 500) and got == reports
        server.shutdown()


# -- bounds ----------------------------------------------------------------------------------------


def test_a_flood_of_connections_is_refused_without_harming_a_producer(rx):
    pump = rx(max_connections=8)
    s = sender(url_of(pump))
    s.connect()
    s.send([report(0x1234, 0)])
    assert pump.wait(1)
    flood = [socket.create_connection((HOST, pump.r.address[1]), timeout=2) for _ in range(30)]
    assert wait(lambda: pump.r.stats()["rejected_connections"] >= 23, 5)
    s.send([report(0x1234, i) for i in range(1, 200)])
    s.close(5)
    assert s.stats()["sent"] == 200 and pump.wait(200)
    for f in flood:
        f.close()


def test_silent_connections_are_closed_in_time(rx):
    pump = rx(procedure="seed", handshake_timeout=0.5)
    with websockets_sync.connect(url_of(pump), proxy=None) as ws:  # no streamInfoList Ping
        with pytest.raises(Exception) as err:
            ws.recv(timeout=5)
        assert "1008" in str(err.value)
    with socket.create_connection((HOST, pump.r.address[1]), timeout=5) as raw:
        raw.sendall(b"GET /stm HTTP/1.1\r\n")  # and never the rest
        assert raw.recv(100) == b""
    assert pump.r.stats()["rejected_connections"] == 1


# -- the CLIs --------------------------------------------------------------------------------------


def keys(paths) -> list:
    return [p.key()[1:] for f in paths for p in pcapng.read(f)]


class Recv:
    """stm-recv in a subprocess; every wait bounded."""

    def __init__(self, procs, out: Path, listen: str, *args: str) -> None:
        self.out = out
        self.err_path = out.with_suffix(".err")
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*PY, "stm.cli.recv", "--listen", listen, "-w", str(out), "--json",
                 "--flush-interval", "0.05", *args],
                stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        procs.append(self.proc)
        deadline = time.monotonic() + 20
        while not (m := re.search(r"listening on (\w+://\S+)", self.err_path.read_text())):
            assert self.proc.poll() is None, self.err_path.read_text()
            assert time.monotonic() < deadline, "stm-recv did not start"
            time.sleep(0.02)
        self.url = m.group(1) + "/stm"
        self.port = int(m.group(1).rsplit(":", 1)[1])

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, self.err_path.read_text()
        return json.loads(out)


def send(*args, check=True, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([*PY, "stm.cli.send", *map(str, args), "--json"],
                          capture_output=True, text=True, timeout=timeout, check=check)  # fmt: skip


def wait_packets(path: Path, n: int, timeout: float = 20) -> None:
    def enough():
        try:
            return sum(1 for _ in pcapng.read(path)) >= n
        except Exception:  # a block half flushed: try again
            return False

    wait(enough, timeout)


@pytest.mark.parametrize("procedure", ["ts28532", "seed"])
@pytest.mark.parametrize("fmt", ["gre", "tlv"])
def test_cli_delivers_the_samples_exactly(tmp_path, procs, procedure, fmt):
    rx = Recv(procs, tmp_path / "out.pcapng", "ws://127.0.0.1:0/stm", "--ws-procedure", procedure)
    result = json.loads(send(*SAMPLES, "--format", fmt, "--ws-procedure", procedure,
                             "--to", rx.url).stdout)  # fmt: skip
    dest = result["destinations"][rx.url]
    assert dest["sent"] == result["reports"] and dest["undelivered"] == 0
    assert dest["procedure"] == procedure
    wait_packets(rx.out, len(keys(SAMPLES)))
    summary = rx.stop()
    assert summary["packets_written"] == len(keys(SAMPLES)) and summary["lost"] == 0
    assert keys([rx.out]) == keys(SAMPLES)
    ws = summary["websocket"][0]
    assert ws["reports"] == result["reports"] and ws["closed"]["by_producer"] == 1


def test_cli_seed_ping_edge_and_refusals(tmp_path, procs):
    rx = Recv(procs, tmp_path / "out.pcapng", "ws://127.0.0.1:0/stm", "--ws-procedure", "seed")
    # a 115-byte producer name: the streamInfoList Ping is exactly 125 bytes, and flows
    ok = send(SIP_UDP, "--ws-procedure", "seed", "--producer", "p" * 115, "--to", rx.url)
    assert json.loads(ok.stdout)["destinations"][rx.url]["undelivered"] == 0
    # one byte more: refused before anything is read, with the limit and the way out
    r = send(SIP_UDP, "--ws-procedure", "seed", "--producer", "p" * 116, "--to", rx.url,
             check=False)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "at most 125" in r.stderr and "--ws-procedure ts28532" in r.stderr
    # the TS 28.532 procedure against a seed-only consumer: a one-line refusal, exit 1
    r = send(SIP_UDP, "--to", rx.url, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "refused the streams: POST /stm/connections: 404" in r.stderr
    wait_packets(rx.out, len(keys([SIP_UDP])))
    summary = rx.stop()
    assert summary["packets_written"] == len(keys([SIP_UDP]))
    assert pcapng.read(rx.out) and "p" * 115 in rx.out.read_bytes().decode("latin-1")


def test_cli_sender_reconnects_after_the_receiver_restarts(tmp_path, procs):
    first = Recv(procs, tmp_path / "a.pcapng", "ws://127.0.0.1:0/stm")
    expect = keys([SIP_UDP]) * 40
    sending = subprocess.Popen(
        [*PY, "stm.cli.send", str(SIP_UDP), "--loop", "40", "--rate", "200", "--to", first.url,
         "--json", "--format", "tlv"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs.append(sending)
    wait_packets(first.out, 60)
    a = first.stop()  # Close 1001 to the producer, mid-stream
    second = Recv(procs, tmp_path / "b.pcapng", f"ws://127.0.0.1:{first.port}/stm")
    out, err = sending.communicate(timeout=30)
    assert sending.returncode == 0, err
    result = json.loads(out)["destinations"][first.url]
    assert result["undelivered"] == 0 and result["reconnects"] >= 1, (result, err)
    assert "closed by the consumer: 1001" in err
    wait_packets(second.out, len(expect) - a["packets_written"])
    second.stop()
    got = Counter(keys([first.out])) + Counter(keys([second.out]))
    assert not Counter(expect) - got  # every packet arrived (some maybe in both files)


def test_cli_wss_with_mutual_tls(tmp_path, procs):
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    server = ["--cert", pki.path("server.crt"), "--key", pki.path("server.key"),
              "--ca", pki.path("ca.crt"), "--require-client-cert"]  # fmt: skip
    rx = Recv(procs, tmp_path / "out.pcapng", "wss://127.0.0.1:0/stm", *map(str, server))
    client = ["--cert", pki.path("amf-1.crt"), "--key", pki.path("amf-1.key"),
              "--ca", pki.path("ca.crt"), "--server-name", SERVER_NAME]  # fmt: skip
    result = json.loads(send(*SAMPLES, "--to", rx.url, *client).stdout)
    assert result["destinations"][rx.url]["sent"] == result["reports"]
    # no client certificate: the TLS handshake fails, nothing gets in
    r = send(SIP_UDP, "--to", rx.url, *client[4:], "--drain-timeout", "1", check=False)
    assert "Traceback" not in r.stderr
    wait_packets(rx.out, len(keys(SAMPLES)))
    summary = rx.stop()
    assert summary["packets_written"] == len(keys(SAMPLES)) and summary["tls_failures"] >= 1
    assert keys([rx.out]) == keys(SAMPLES)


def test_cli_wss_needs_its_tls_options(tmp_path):
    r = subprocess.run([*PY, "stm.cli.recv", "--listen", "wss://127.0.0.1:0", "-w",
                        str(tmp_path / "o.pcapng")], capture_output=True, text=True,
                       timeout=30)  # fmt: skip
    assert r.returncode == 2 and "needs a certificate" in r.stderr
    with pytest.raises(UsageError):
        parse_url("ws://127.0.0.1:0", schemes=("udp",))
