"""STM reports as 3GPP management data streaming: the sans-IO part.

TS 28.550 defines the streaming operations (``establishStreamingConnection``,
``reportStreamData``, ``terminateStreamingConnection``) and TS 28.532 clause 12.5.1 their
stage 3 on WebSocket (RFC 6455), with REST resources described by the OpenAPI file
``TS28532_StreamingDataMnS.yaml``. The seed proposal (``shared/seeds/000_*.txt``) mapped them
more simply: the Upgrade, then a Ping whose application data is the ``streamInfoList``,
answered by a Pong. Both are here, as data and state machines that take bytes, JSON and
time as arguments and never touch a socket (:mod:`stm.transport.websocket` does the I/O):

* :class:`StreamInfo`: one stream's meta-data, as the schema's ``streamInfo-Type`` (JSON)
  and as the compact binary form that fits a Ping (:func:`encode_ping`, :func:`decode_ping`);
* the JSON bodies of the published schema (field names from the OpenAPI file, never ours):
  ``connectionRequest-Type``, ``connectionInfo-Type``, ``streamInfoWithReporters-Type``,
  ``errorResponse-Type``, ``failedConnectionResponse-Type``;
* :class:`Registry`: the consumer's connection resources and what every REST request on
  them answers (:meth:`Registry.handle`);
* :class:`Session`: one WebSocket connection on the consumer side (which Pings establish it,
  which reports it admits, when it must be closed and with which status code).

See docs/streaming.md for the exchanges, the encodings and the choices made.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, quote, unquote, urlsplit

from stm import accel
from stm.errors import ProtocolError, UsageError
from stm.report.ownership import claims_only

__all__ = [
    "DEFAULT_PORTS",
    "MAX_MESSAGE",
    "MAX_PING",
    "PROCEDURES",
    "Registry",
    "Response",
    "SchemaError",
    "Session",
    "StreamInfo",
    "StreamInfoTooLong",
    "connection_request",
    "decode_ping",
    "encode_ping",
    "parse_connection_request",
    "parse_stream_list",
    "refusal",
]

DEFAULT_PORTS = {"ws": 8080, "wss": 8443}
"""The port of a ``ws://`` or ``wss://`` URL that gives none (HTTP's alternates)."""
PROCEDURES = ("ts28532", "seed")
"""The connection procedures: TS 28.532's REST resources, or the seed's Ping/Pong."""
MAX_PING = 125
"""RFC 6455 section 5.5: the payload of a control frame (Ping, Pong, Close)."""
MAX_MESSAGE = 0xFFFF
"""The largest report: what a UDP datagram (format A) or a HEP3 length field (B) holds."""
MAX_BODY = 64 << 10
"""The largest REST request body a consumer reads."""
MAX_STREAMS = 64
"""Streams one connection may carry (announced at once or added later)."""

# -- the schema's vocabulary (TS28532_StreamingDataMnS.yaml, components/schemas) --------------

STREAM_TYPES = ("TRACE", "PERFORMANCE", "ANALYTICS", "PROPRIETARY")
"""``streamType-Type``."""
SERIALIZATION_FORMATS = ("GPB", "ASN1")
"""``serializationFormat-Type``: a closed enum that names neither STM format."""
STM_STREAM_TYPE = "PROPRIETARY"
"""STM traffic is none of TRACE, PERFORMANCE, ANALYTICS: see docs/streaming.md."""
STM_SERIALIZATION = "ASN1"
"""A placeholder the closed enum forces on us; the real format is in ``additionalInfo``."""
VS_DATA_TYPE = "STM"
"""``vsDataContainer-Type.vsDataType`` of an STM stream; ``vsData`` is ``gre`` or ``tlv``."""
VS_DATA_VERSION = "1"
FORMATS = ("gre", "tlv")
"""stm's names for TS 28.560 format A (GRE-in-UDP pcapng) and B (TLV, HEP3 profile)."""

# -- the compact streamInfoList of the seed procedure (ours: the seed left it open) ----------

PING_MAGIC = b"STM"
PING_VERSION = 1
_PING_HEAD = struct.Struct("!3sBB")  # magic, version, producer length
_PING_STREAM = struct.Struct("!BI")  # streamType << 4 | serialization, stream ID
PING_SERIALIZATIONS = ("GPB", "ASN1", "gre", "tlv")
"""Codes 0-3 of the low nibble: the schema's two, then STM format A and B by name."""


class SchemaError(ProtocolError):
    """A JSON body that does not follow the published schema (answered with 400)."""


class StreamInfoTooLong(UsageError):
    """A streamInfoList that does not fit the 125 bytes of a Ping."""


@dataclass(frozen=True)
class StreamInfo:
    """One reporting stream (``streamInfo-Type``).

    ``stream_id`` is the schema's string; for an STM stream it is the report's stream ID
    (GRE key, HEP capture ID) as 8 upper-case hex digits. ``additional_info`` is kept as the
    peer sent it (any of the schema's four kinds); an STM stream's is a ``vsDataContainer``
    naming the format.
    """

    stream_id: str
    stream_type: str = STM_STREAM_TYPE
    serialization_format: str = STM_SERIALIZATION
    additional_info: dict | None = field(default=None, compare=False, hash=False)
    stm_format: str | None = None
    """``gre`` or ``tlv`` for an STM stream, None for anything else."""

    @classmethod
    def stm(cls, stream_id: int, fmt: str) -> StreamInfo:
        """The description of our stream ``stream_id`` in format ``fmt`` (gre or tlv)."""
        if fmt not in FORMATS:
            raise UsageError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        if not 0 <= stream_id <= 0xFFFFFFFF:
            raise UsageError(f"stream ID {stream_id} does not fit 32 bits")
        info = {"vsDataType": VS_DATA_TYPE, "vsData": fmt, "vsDataFormatVersion": VS_DATA_VERSION}
        return cls(f"{stream_id:08X}", additional_info=info, stm_format=fmt)

    @property
    def report_id(self) -> int | None:
        """The stream ID as the reports carry it (u32), or None if it is not one."""
        return _hex_u32(self.stream_id)

    def to_json(self) -> dict:
        out = {
            "streamType": self.stream_type,
            "serializationFormat": self.serialization_format,
            "streamId": self.stream_id,
        }
        if self.additional_info is not None:
            out["additionalInfo"] = self.additional_info
        return out

    @classmethod
    def from_json(cls, obj: object) -> StreamInfo:
        """Parse and check one ``streamInfo-Type``; SchemaError names what is wrong."""
        if not isinstance(obj, dict):
            raise SchemaError("a streamInfo must be a JSON object")
        for name in ("streamType", "serializationFormat", "streamId"):
            if name not in obj:
                raise SchemaError(f"streamInfo without {name} (required)")
            if not isinstance(obj[name], str):
                raise SchemaError(f"streamInfo {name} must be a string")
        if obj["streamType"] not in STREAM_TYPES:
            raise SchemaError(f"streamType {obj['streamType']!r} is not one of {STREAM_TYPES}")
        if obj["serializationFormat"] not in SERIALIZATION_FORMATS:
            raise SchemaError(
                f"serializationFormat {obj['serializationFormat']!r} is not one of "
                f"{SERIALIZATION_FORMATS}"
            )
        extra = obj.get("additionalInfo")
        if extra is not None and not isinstance(extra, dict):
            raise SchemaError("streamInfo additionalInfo must be an object")
        fmt = None
        if (
            obj["streamType"] == STM_STREAM_TYPE
            and extra is not None
            and extra.get("vsDataType") == VS_DATA_TYPE
            and extra.get("vsData") in FORMATS
        ):
            fmt = extra["vsData"]
        return cls(obj["streamId"], obj["streamType"], obj["serializationFormat"], extra, fmt)

    def refusal(self) -> str | None:
        """Why an STM consumer cannot take this stream, or None if it can."""
        if self.stm_format is None:
            return (
                f"not an STM stream (want streamType {STM_STREAM_TYPE} and additionalInfo "
                f'{{"vsDataType": "{VS_DATA_TYPE}", "vsData": "gre" or "tlv"}})'
            )
        if self.report_id is None:
            return "an STM streamId is the report's 32-bit stream ID in 1 to 8 hex digits"
        return None


def _hex_u32(text: str) -> int | None:
    if not 1 <= len(text) <= 8 or any(c not in "0123456789abcdefABCDEF" for c in text):
        return None
    return int(text, 16)


# -- the seed procedure's Ping payload ---------------------------------------------------------


def encode_ping(producer: str, streams: Iterable[StreamInfo]) -> bytes:
    """The streamInfoList (with the producer, as establishStreamingConnection has it) in
    one Ping payload: ``"STM"``, version 1, producer length, producer (UTF-8), then 5 bytes
    a stream: type and serialization in one byte, the 32-bit stream ID.

    Raises :class:`StreamInfoTooLong` if that exceeds the 125 bytes of a control frame.
    """
    name = producer.encode("utf-8")
    streams = list(streams)
    if not streams:
        raise UsageError("a streamInfoList needs at least one stream")
    if len(name) > 255:
        raise StreamInfoTooLong(f"producer name of {len(name)} bytes: at most 255 fit")
    parts = [_PING_HEAD.pack(PING_MAGIC, PING_VERSION, len(name)), name]
    for s in streams:
        sid = s.report_id
        ser = s.stm_format or s.serialization_format
        if sid is None or ser not in PING_SERIALIZATIONS:
            raise UsageError(f"stream {s.stream_id} cannot be put in the compact form")
        code = STREAM_TYPES.index(s.stream_type) << 4 | PING_SERIALIZATIONS.index(ser)
        parts.append(_PING_STREAM.pack(code, sid))
    payload = b"".join(parts)
    if len(payload) > MAX_PING:
        room = MAX_PING - _PING_HEAD.size - _PING_STREAM.size * len(streams)
        raise StreamInfoTooLong(
            f"the streamInfoList is {len(payload)} bytes and a Ping carries at most "
            f"{MAX_PING} (RFC 6455 5.5): use a producer name of at most {max(room, 0)} bytes, "
            "or the TS 28.532 procedure (--ws-procedure ts28532)"
        )
    return payload


def is_stream_ping(payload: bytes) -> bool:
    """Whether a Ping claims to carry a streamInfoList (others are keepalives)."""
    return payload[:3] == PING_MAGIC


def decode_ping(payload: bytes) -> tuple[str, list[StreamInfo]]:
    """(producer, streams) of a Ping built by :func:`encode_ping`; ProtocolError if bad."""
    if len(payload) > MAX_PING:
        raise ProtocolError(f"a {len(payload)}-byte Ping payload (at most {MAX_PING})")
    if len(payload) < _PING_HEAD.size:
        raise ProtocolError("streamInfoList Ping too short")
    magic, version, n = _PING_HEAD.unpack_from(payload)
    if magic != PING_MAGIC or version != PING_VERSION:
        raise ProtocolError(f"not a version-{PING_VERSION} streamInfoList")
    rest = len(payload) - _PING_HEAD.size - n
    if rest <= 0 or rest % _PING_STREAM.size:
        raise ProtocolError("streamInfoList Ping: bad length")
    try:
        producer = payload[_PING_HEAD.size : _PING_HEAD.size + n].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("streamInfoList Ping: producer is not UTF-8") from None
    streams = []
    for pos in range(_PING_HEAD.size + n, len(payload), _PING_STREAM.size):
        code, sid = _PING_STREAM.unpack_from(payload, pos)
        kind, ser = code >> 4, code & 0x0F
        if kind >= len(STREAM_TYPES) or ser >= len(PING_SERIALIZATIONS):
            raise ProtocolError(f"streamInfoList Ping: unknown type/format code 0x{code:02x}")
        name = PING_SERIALIZATIONS[ser]
        if name in FORMATS:
            info = StreamInfo.stm(sid, name)
            if STREAM_TYPES[kind] != STM_STREAM_TYPE:
                info = StreamInfo(info.stream_id, STREAM_TYPES[kind], stm_format=None)
        else:
            info = StreamInfo(f"{sid:08X}", STREAM_TYPES[kind], name)
        streams.append(info)
    return producer, streams


# -- JSON bodies ---------------------------------------------------------------------------------


def connection_request(producer: str, streams: Iterable[StreamInfo]) -> dict:
    """``connectionRequest-Type``: the body of ``POST /connections``."""
    return {"producer": producer, "streams": [s.to_json() for s in streams]}


def parse_connection_request(obj: object) -> tuple[str | None, list[StreamInfo]]:
    if not isinstance(obj, dict):
        raise SchemaError("a connectionRequest must be a JSON object")
    producer = obj.get("producer")
    if producer is not None and not isinstance(producer, str):
        raise SchemaError("connectionRequest producer must be a string (a DN)")
    return producer, parse_stream_list(obj.get("streams"), "connectionRequest streams")


def parse_stream_list(obj: object, what: str = "the body") -> list[StreamInfo]:
    """An array of ``streamInfo-Type`` (non-empty, bounded, no stream ID twice)."""
    if not isinstance(obj, list) or not obj:
        raise SchemaError(f"{what} must be a non-empty array of streamInfo")
    if len(obj) > MAX_STREAMS:
        raise SchemaError(f"{what}: {len(obj)} streams, at most {MAX_STREAMS}")
    out = [StreamInfo.from_json(x) for x in obj]
    if len({s.stream_id for s in out}) != len(out):
        raise SchemaError(f"{what}: a streamId appears twice")
    return out


def error_body(text: str) -> dict:
    """``errorResponse-Type``."""
    return {"error": {"errorInfo": text}}


def failed_body(refused: Iterable[tuple[str, str]]) -> dict:
    """``failedConnectionResponse-Type``: (streamId, errorReason) for each refused stream."""
    return {"error": [{"streamId": sid, "errorReason": why} for sid, why in refused]}


def refusal(status: int, reason: str, body: bytes) -> str:
    """One line saying why a consumer refused a request, from its JSON error body."""
    if not reason:
        with contextlib.suppress(ValueError):
            reason = HTTPStatus(status).phrase
    text = f"{status} {reason}".strip()
    try:
        obj = json.loads(body) if body else None
    except ValueError:
        obj = None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict) and isinstance(err.get("errorInfo"), str):
        return f"{text}: {err['errorInfo']}"
    if isinstance(err, list):
        items = [
            f"stream {e.get('streamId')}: {e.get('errorReason')}"
            for e in err
            if isinstance(e, dict)
        ]
        if items:
            return f"{text}: {'; '.join(items)}"
    return text


# -- the consumer's resources --------------------------------------------------------------------


@dataclass
class Response:
    """An HTTP response to send: status, headers, body (JSON already encoded)."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @classmethod
    def json(cls, status: int, obj, headers=()) -> Response:
        body = json.dumps(obj, separators=(",", ":")).encode()
        return cls(status, [("Content-Type", "application/json"), *headers], body)

    @classmethod
    def error(cls, status: int, text: str, headers=()) -> Response:
        return cls.json(status, error_body(text), headers)


@dataclass
class Connection:
    """One connection resource: created by POST (or by a seed Ping), open once upgraded."""

    id: str
    uri: str
    producer: str | None
    identity: str | None
    created: float
    procedure: str
    streams: dict[str, StreamInfo] = field(default_factory=dict)
    open: bool = False
    version: int = 0
    """Bumped on every change of ``streams``."""

    def info(self) -> dict:
        """``connectionInfo-Type``."""
        out: dict = {"connection": self.uri, "streams": list(self.streams)}
        if self.producer is not None:
            out["producer"] = self.producer
        return out

    def report_ids(self) -> frozenset[int]:
        return frozenset(s.report_id for s in self.streams.values() if s.report_id is not None)


class Registry:
    """The connection resources of one consumer, and the REST requests on them.

    ``base`` is the path the resources live under (the listen URL's path: ``/stm`` gives
    ``/stm/connections``). ``procedure`` is ``ts28532``, ``seed`` or ``any``: with ``seed``
    alone no REST resource is served. Bounded: ``max_connections`` resources, pending ones
    (created, never upgraded) forgotten after ``pending_timeout`` seconds (:meth:`expire`).

    ``owner_of(report_id)`` (optional) tells which authenticated identity owns a stream ID,
    so a stream owned by another producer is refused at announcement (403).
    """

    def __init__(
        self,
        base: str = "",
        *,
        procedure: str = "ts28532",
        max_connections: int = 1024,
        pending_timeout: float = 30.0,
        owner_of=None,
        new_id=None,
    ) -> None:
        if procedure not in (*PROCEDURES, "any"):
            raise UsageError(f"procedure must be ts28532, seed or any, not {procedure!r}")
        self.base = base.rstrip("/")
        self.procedure = procedure
        self.max_connections = max_connections
        self.pending_timeout = pending_timeout
        self.owner_of = owner_of
        self.new_id = new_id or (lambda: secrets.token_hex(8))
        self.connections: dict[str, Connection] = {}
        self.refused = 0
        """Requests answered with a 4xx or 5xx status."""

    @property
    def rest(self) -> bool:
        return self.procedure in ("ts28532", "any")

    @property
    def seed(self) -> bool:
        return self.procedure in ("seed", "any")

    # -- state changes, also used by sessions --------------------------------------------

    def create(
        self,
        producer: str | None,
        streams: list[StreamInfo],
        identity: str | None,
        now: float,
        origin: str,
        procedure: str,
    ) -> Connection:
        cid = self.new_id()
        uri = f"{origin}{self.base}/connections/{quote(cid)}"
        conn = Connection(cid, uri, producer, identity, now, procedure)
        conn.streams = {s.stream_id: s for s in streams}
        self.connections[cid] = conn
        return conn

    def remove(self, cid: str) -> None:
        self.connections.pop(cid, None)

    def full(self) -> bool:
        return len(self.connections) >= self.max_connections

    def expire(self, now: float) -> int:
        """Forget connections created but never upgraded within ``pending_timeout``."""
        stale = [
            c.id
            for c in self.connections.values()
            if not c.open and now - c.created >= self.pending_timeout
        ]
        for cid in stale:
            del self.connections[cid]
        return len(stale)

    def check_streams(
        self, streams: list[StreamInfo], identity: str | None
    ) -> list[tuple[str, str]]:
        """(streamId, errorReason) of each stream this consumer refuses."""
        refused = []
        for s in streams:
            why = s.refusal()
            if why is None and identity is not None and self.owner_of is not None:
                owner = self.owner_of(s.report_id)
                if owner is not None and owner != identity:
                    why = f"stream {s.stream_id} belongs to another producer ({owner})"
            if why is not None:
                refused.append((s.stream_id, why))
        return refused

    def upgrade_target(
        self, target: str, identity: str | None
    ) -> tuple[Connection | None, int, str]:
        """Which resource an Upgrade GET on ``target`` opens: (connection or None for the
        seed procedure, 101, "") when it may go on, else (None, status, reason)."""
        path = urlsplit(target).path
        if self.seed and path.rstrip("/") == self.base:
            return None, 101, ""
        parts = self._route(path)
        if self.rest and parts is not None and len(parts) == 2:
            conn = self.connections.get(parts[1])
            if conn is None:
                return None, 404, f"no connection {parts[1]} (POST {self.base}/connections first)"
            if conn.identity is not None and conn.identity != identity:
                return None, 403, "the connection belongs to another producer"
            if conn.open:
                return None, 409, f"connection {conn.id} is open already"
            return conn, 101, ""
        if self.rest and path.rstrip("/") == self.base:
            return (
                None,
                404,
                f"this consumer takes the TS 28.532 procedure: POST {self.base}/connections first",
            )
        return None, 404, f"no WebSocket resource at {path}"

    # -- REST ----------------------------------------------------------------------------

    def _route(self, path: str) -> list[str] | None:
        if not path.startswith(self.base + "/"):
            return None
        parts = [unquote(p) for p in path[len(self.base) + 1 :].split("/")]
        if parts and parts[-1] == "":
            parts.pop()
        if not parts or parts[0] != "connections" or len(parts) > 4:
            return None
        if len(parts) >= 3 and parts[2] != "streams":
            return None
        return parts

    def handle(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        *,
        identity: str | None = None,
        origin: str = "",
        now: float = 0.0,
    ) -> Response:
        """Answer one REST request (not an Upgrade). ``headers`` have lower-case names;
        ``origin`` is ``http://host:port`` as the client reached us (for Location)."""
        response = self._handle(method, target, headers, body, identity, origin, now)
        if response.status >= 400:
            self.refused += 1
        return response

    def _handle(self, method, target, headers, body, identity, origin, now) -> Response:
        split = urlsplit(target)
        parts = self._route(split.path) if self.rest else None
        if parts is None:
            return Response.error(404, f"no resource at {split.path}")
        query = parse_qs(split.query)
        allowed = {1: "GET, POST", 2: "GET", 3: "GET, POST, DELETE", 4: "GET"}[len(parts)]
        if method not in allowed.split(", "):
            return Response.error(405, f"{method} is not allowed here", [("Allow", allowed)])
        if method == "POST":
            if headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return Response.error(415, "the body must be application/json")
            try:
                obj = json.loads(body)
            except ValueError:
                return Response.error(400, "the body is not JSON")
        if len(parts) == 1:
            if method == "POST":
                return self._create(obj, identity, origin, now)
            return self._list(_list_param(query, "connectionIdList"))
        conn = self.connections.get(parts[1])
        if conn is None:
            return Response.error(404, f"no connection {parts[1]}")
        if len(parts) == 2:
            return Response.json(200, conn.info())
        if conn.identity is not None and conn.identity != identity and method != "GET":
            return Response.error(403, "the connection belongs to another producer")
        if len(parts) == 4:
            s = conn.streams.get(parts[3])
            if s is None:
                return Response.error(404, f"no stream {parts[3]} on connection {conn.id}")
            return Response.json(200, self._with_reporters(s))
        if method == "POST":
            return self._add(conn, obj, identity)
        ids = _list_param(query, "streamIds")
        if not ids:
            return Response.error(400, "streamIds is required")
        if method == "DELETE":
            missing = [i for i in ids if i not in conn.streams]
            if missing:
                return Response.error(
                    404, f"no stream {', '.join(missing)} on connection {conn.id}"
                )
            for i in ids:
                del conn.streams[i]
            conn.version += 1
            return Response(204)
        found = [conn.streams[i] for i in ids if i in conn.streams]
        if not found:
            return Response.error(404, f"none of {', '.join(ids)} is on connection {conn.id}")
        return Response.json(
            200 if len(found) == len(ids) else 202, [self._with_reporters(s) for s in found]
        )

    def _create(self, obj, identity, origin, now) -> Response:
        try:
            producer, streams = parse_connection_request(obj)
        except SchemaError as exc:
            return Response.json(400, failed_body([("", str(exc))]))
        refused = self.check_streams(streams, identity)
        if refused:
            status = 403 if any("belongs to" in why for _, why in refused) else 422
            return Response.json(status, failed_body(refused))
        self.expire(now)
        if self.full():
            return Response.json(
                503, failed_body([("", f"{len(self.connections)} connections (the maximum)")])
            )
        conn = self.create(producer, streams, identity, now, origin, "ts28532")
        return Response(201, [("Location", conn.uri)])

    def _list(self, wanted: list[str]) -> Response:
        if not wanted:
            return Response.json(200, [c.info() for c in self.connections.values()])
        ids = [w.rstrip("/").rsplit("/", 1)[-1] for w in wanted]  # a URI or the bare ID
        found = [self.connections[i].info() for i in ids if i in self.connections]
        if not found:
            return Response.error(404, "none of the connections in connectionIdList exists")
        return Response.json(200 if len(found) == len(ids) else 202, found)

    def _add(self, conn: Connection, obj, identity) -> Response:
        try:
            streams = parse_stream_list(obj)
        except SchemaError as exc:
            return Response.error(400, str(exc))
        refused = dict(self.check_streams(streams, identity))
        for s in streams:
            if s.stream_id in conn.streams and s.stream_id not in refused:
                refused[s.stream_id] = "already on this connection"
        ok = [s for s in streams if s.stream_id not in refused]
        if len(conn.streams) + len(ok) > MAX_STREAMS:
            return Response.error(422, f"at most {MAX_STREAMS} streams on a connection")
        if not ok:
            why = "; ".join(f"stream {k}: {v}" for k, v in refused.items())
            forbidden = any("belongs to" in v for v in refused.values())
            return Response.error(403 if forbidden else 422, why)
        for s in ok:
            conn.streams[s.stream_id] = s
        conn.version += 1
        return Response.json(201 if not refused else 202, [s.to_json() for s in ok])

    def _with_reporters(self, s: StreamInfo) -> dict:
        """``streamInfoWithReporters-Type``: the producers of every connection with it."""
        reporters = []
        for c in self.connections.values():
            if s.stream_id in c.streams and c.producer and c.producer not in reporters:
                reporters.append(c.producer)
        return {"streamInfo": s.to_json(), "reporters": reporters}


def _list_param(query: dict[str, list[str]], name: str) -> list[str]:
    """An OpenAPI array in the query: ``a=1&a=2`` (form, exploded) or ``a=1,2``."""
    out = []
    for value in query.get(name, []):
        out.extend(v for v in value.split(",") if v)
    return out


# -- one WebSocket connection on the consumer's side -------------------------------------------

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_INVALID = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


class Session:
    """The consumer's side of one WebSocket connection, as a state machine.

    Built when an Upgrade was accepted: ``connection`` is the resource it opened (TS 28.532)
    or None (seed procedure: the connection is established by the first streamInfoList
    Ping). Each method returns what to do:

    * :meth:`ping` -> ``("pong", payload)`` or ``("close", code, reason)`` (no Pong: the
      streamInfoList is refused);
    * :meth:`report` -> True to hand the report to the decoder, False to drop it (its stream
      was not announced, or no longer is: counted in ``unannounced``), or it raises
      :class:`ProtocolError` (data before the seed's Ping): close with :data:`CLOSE_POLICY`.

    :meth:`closed` ends it (the resource goes with it).
    """

    def __init__(
        self,
        registry: Registry,
        connection: Connection | None,
        *,
        identity: str | None = None,
        origin: str = "",
    ) -> None:
        self.registry = registry
        self.connection = connection
        self.identity = identity
        self.origin = origin
        self.unannounced = 0
        self.reports = 0
        self._ids: frozenset[int] = frozenset()
        self._version = -1
        self._ext = accel.ext
        if connection is not None:
            connection.open = True

    @property
    def established(self) -> bool:
        return self.connection is not None

    @property
    def producer(self) -> str | None:
        return None if self.connection is None else self.connection.producer

    def ping(self, payload: bytes, now: float) -> tuple:
        if not is_stream_ping(payload):
            return ("pong", payload)  # a keepalive, answered as RFC 6455 says
        if not self.registry.seed:
            return ("close", CLOSE_POLICY, "streamInfoList Pings are not taken here")
        try:
            producer, streams = decode_ping(payload)
        except ProtocolError as exc:
            return ("close", CLOSE_INVALID, str(exc)[:100])
        refused = self.registry.check_streams(streams, self.identity)
        if refused:
            sid, why = refused[0]
            return ("close", CLOSE_POLICY, f"stream {sid}: {why}"[:120])
        if self.connection is None:
            self.registry.expire(now)
            if self.registry.full():
                return ("close", CLOSE_GOING_AWAY, "too many connections")
            self.connection = self.registry.create(
                producer or None, streams, self.identity, now, self.origin, "seed"
            )
            self.connection.open = True
        else:  # a later list replaces the connection's: the seed's add and delete
            self.connection.producer = producer or self.connection.producer
            self.connection.streams = {s.stream_id: s for s in streams}
            self.connection.version += 1
        return ("pong", payload)

    def report(self, data: bytes) -> bool:
        conn = self.connection
        if conn is None:
            raise ProtocolError("data before the streamInfoList Ping")
        if not claims_only(data, self._allowed(conn)):
            self.unannounced += 1
            return False
        self.reports += 1
        return True

    def report_run(self, reports: list, start: int) -> int:
        """How many of ``reports[start:]``, from the first on, :meth:`report` would take
        (taken now): in one call of the accelerator, or 0 without it (and when the first
        is not one: :meth:`report` then says what it is)."""
        conn = self.connection
        if self._ext is None or conn is None:
            return 0
        n = self._ext.claims_only_run(reports, start, self._allowed(conn))
        self.reports += n
        return n

    def _allowed(self, conn: Connection) -> frozenset[int]:
        """The stream IDs the connection's reports may carry (the streams change with
        addStream/deleteStream, or a later streamInfoList Ping)."""
        if conn.version != self._version:
            self._ids = conn.report_ids()
            self._version = conn.version
        return self._ids

    def closed(self) -> None:
        if self.connection is not None:
            self.registry.remove(self.connection.id)
