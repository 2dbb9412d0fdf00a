"""The consumer-driven streaming session of seed 001, sans-IO: request and response bodies
as pure functions, shaped after the streaming data reporting service of TS 28.532 clause
12.5 (``streamInfo``, ``connectionRequest``, ``failedConnectionResponse``, ``errorResponse``).

The MnS consumer (``stm-recv --establish``) asks the MnS producer (``stm-send
--accept-sessions``) to establish a logical streaming session: it gives its message broker
endpoints, the topic and the streamInfoList it wants; the producer validates the request,
answers with a session ID (or a refusal that says why) and publishes the streams to those
brokers until the session is terminated. HTTP carries it (``stm.transport.kafka``); the
exact requests and responses are in docs/streaming.md.

Nothing here touches a socket or a clock: bodies in, bodies (or ``SessionRefused``) out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from stm.errors import StmError

API_ROOT = "/StreamingDataReportingMnS/v1"
SESSIONS_PATH = API_ROOT + "/sessions"
STREAMS_PATH = API_ROOT + "/streams"

STREAM_TYPE = "PROPRIETARY"  # TS 28.532's streamType-Type has no value for signalling traffic
SERIALIZATION = {"gre": "STM_FORMAT_A", "tlv": "STM_FORMAT_B"}
PROTOCOLS = ("KAFKA",)
MAX_BODY = 64 * 1024
MAX_BROKERS = 16
MAX_STREAMS = 64
MAX_NAME = 256

# Kafka's own rule for topic names (kafka.common.internals.Topic)
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


class SessionRefused(StmError):
    """A request the producer does not accept: the HTTP status and the JSON body to send."""

    def __init__(self, status: int, body: dict) -> None:
        super().__init__(describe_refusal(body) or f"HTTP {status}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class SessionRequest:
    """A validated establish request."""

    brokers: tuple[str, ...]
    topic: str
    streams: tuple[dict, ...]
    consumer: str = ""
    protocol: str = "KAFKA"


@dataclass
class Session:
    """One established session, as the producer keeps it."""

    session_id: str
    request: SessionRequest
    producer: str
    state: str = "ACTIVE"
    statistics: dict = field(default_factory=dict)


# -- bodies ---------------------------------------------------------------------------------------


def stream_info(stream_id: int, fmt: str, producer: str) -> dict:
    """The streamInfo of one STM stream: its ID (the GRE key / HEP capture ID, in decimal),
    the report format and, as vendor-specific data, the producer (NF) name."""
    return {
        "streamId": str(stream_id),
        "streamType": STREAM_TYPE,
        "serializationFormat": SERIALIZATION[fmt],
        "additionalInfo": {
            "vsDataType": "STM_REPORT",
            "vsDataFormatVersion": "TS 28.560",
            "vsData": producer,
        },
    }


def error_body(info: str) -> dict:
    """errorResponse-Type: a refusal of the request as a whole."""
    return {"error": {"errorInfo": info}}


def failed_streams_body(errors: list[tuple[str, str]]) -> dict:
    """failedConnectionResponse-Type: the streams that cannot be served, and why."""
    return {"error": [{"streamId": sid, "errorReason": reason} for sid, reason in errors]}


def build_request(
    brokers: list[str] | tuple[str, ...],
    topic: str,
    streams: list[dict],
    consumer: str = "",
) -> dict:
    """The consumer's establish request (POST ``SESSIONS_PATH``)."""
    body: dict = {
        "messageBus": {"protocol": "KAFKA", "brokerEndpoints": list(brokers), "topic": topic},
        "streams": [dict(s) for s in streams],
    }
    if consumer:
        body["consumer"] = consumer
    return body


def session_info(session: Session) -> dict:
    """What the producer answers about a session (201 on establish, 200 on GET)."""
    r = session.request
    body = {
        "sessionId": session.session_id,
        "producer": session.producer,
        "messageBus": {
            "protocol": r.protocol,
            "brokerEndpoints": list(r.brokers),
            "topic": r.topic,
        },
        "streams": [dict(s) for s in r.streams],
        "state": session.state,
    }
    if r.consumer:
        body["consumer"] = r.consumer
    if session.statistics:
        body["statistics"] = dict(session.statistics)
    return body


def session_path(session_id: str) -> str:
    return f"{SESSIONS_PATH}/{session_id}"


def encode(body) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


# -- validation (producer side) -------------------------------------------------------------------


def check_topic(topic: object) -> str:
    """A Kafka topic name, or ValueError saying what is wrong with it."""
    if not isinstance(topic, str) or not _TOPIC.fullmatch(topic) or topic in (".", ".."):
        raise ValueError(
            f"bad topic {topic!r}: 1 to 249 of A-Z a-z 0-9 . _ - (not . or ..)"
            if isinstance(topic, str)
            else "topic must be a string"
        )
    return topic


def check_broker(broker: object) -> str:
    """``host:port`` or ``[v6]:port``, or ValueError."""
    if not isinstance(broker, str) or len(broker) > MAX_NAME:
        raise ValueError("a broker endpoint must be a string 'host:port'")
    host, sep, port = broker.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad broker endpoint {broker!r}: want host:port")
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        if not inner or not re.fullmatch(r"[0-9A-Fa-f:.]+", inner):
            raise ValueError(f"bad broker endpoint {broker!r}: bad IPv6 literal")
    elif not _HOST.fullmatch(host):
        raise ValueError(f"bad broker endpoint {broker!r}: bad host")
    return broker


def parse_request(body: bytes, offered: list[dict]) -> SessionRequest:
    """Check an establish request against the streams this producer offers.

    Raises ``SessionRefused``: 400 with an errorResponse for a malformed request, 422 with
    a failedConnectionResponse naming each stream that cannot be served.
    """
    if len(body) > MAX_BODY:
        raise SessionRefused(413, error_body(f"request body over {MAX_BODY} bytes"))
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SessionRefused(400, error_body(f"body is not JSON: {exc}")) from None
    if not isinstance(doc, dict):
        raise SessionRefused(400, error_body("body must be a JSON object"))

    def bad(info: str):
        return SessionRefused(400, error_body(info))

    bus = doc.get("messageBus")
    if not isinstance(bus, dict):
        raise bad("messageBus (an object with protocol, brokerEndpoints, topic) is missing")
    protocol = bus.get("protocol", "KAFKA")
    if not isinstance(protocol, str) or protocol.upper() not in PROTOCOLS:
        raise bad(f"messageBus.protocol {protocol!r} is not supported: use one of {PROTOCOLS}")
    brokers = bus.get("brokerEndpoints")
    if not isinstance(brokers, list) or not brokers:
        raise bad("messageBus.brokerEndpoints must be a non-empty list of 'host:port'")
    if len(brokers) > MAX_BROKERS:
        raise bad(f"messageBus.brokerEndpoints: at most {MAX_BROKERS} endpoints")
    try:
        brokers = [check_broker(b) for b in brokers]
        topic = check_topic(bus.get("topic"))
    except ValueError as exc:
        raise bad(f"messageBus: {exc}") from None
    consumer = doc.get("consumer", "")
    if not isinstance(consumer, str) or len(consumer) > MAX_NAME:
        raise bad(f"consumer must be a string of at most {MAX_NAME} characters")
    streams = doc.get("streams")
    if not isinstance(streams, list) or not streams:
        raise bad("streams (the streamInfoList) must be a non-empty list")
    if len(streams) > MAX_STREAMS:
        raise bad(f"streams: at most {MAX_STREAMS} entries")

    by_id = {s["streamId"]: s for s in offered}
    errors: list[tuple[str, str]] = []
    chosen: list[dict] = []
    for s in streams:
        if not isinstance(s, dict) or not isinstance(s.get("streamId"), str):
            raise bad("each entry of streams must be an object with a string streamId")
        sid = s["streamId"][:MAX_NAME]
        have = by_id.get(sid)
        if have is None:
            known = ", ".join(sorted(by_id)) or "none"
            errors.append((sid, f"unknown stream (this producer offers {known})"))
            continue
        for key in ("streamType", "serializationFormat"):
            if key in s and s[key] != have[key]:
                errors.append((sid, f"{key} {s[key]!r} is not offered (it is {have[key]!r})"))
                break
        else:
            if have not in chosen:
                chosen.append(have)
    if errors:
        raise SessionRefused(422, failed_streams_body(errors))
    return SessionRequest(tuple(brokers), topic, tuple(chosen), consumer, protocol.upper())


# -- the consumer's reading of the answers --------------------------------------------------------


def describe_refusal(body: object) -> str:
    """One line out of an errorResponse or a failedConnectionResponse ('' if neither)."""
    if not isinstance(body, dict):
        return ""
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("errorInfo"), str):
        return error["errorInfo"]
    if isinstance(error, list):
        parts = [
            f"stream {e.get('streamId')}: {e.get('errorReason')}"
            for e in error
            if isinstance(e, dict)
        ]
        return "; ".join(parts)
    return ""


def parse_answer(status: int, body: bytes) -> dict:
    """The producer's answer to an establish request: the session info on 201, else
    ``SessionRefused`` with the reason in one line."""
    try:
        doc = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        doc = {}
    if status != 201:
        reason = describe_refusal(doc) or f"HTTP {status}"
        raise SessionRefused(status, doc if isinstance(doc, dict) else {"error": reason})
    if not isinstance(doc, dict) or not isinstance(doc.get("sessionId"), str):
        raise SessionRefused(status, error_body("the answer carries no sessionId"))
    return doc
