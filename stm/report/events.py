"""Events a report decoder emits, and the per-stream counters it keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from stm.pcapng.records import Interface, Packet


@dataclass(frozen=True, slots=True)
class Stream:
    """One producer's stream: its name and the GRE key (stream ID) it sends with."""

    producer: str
    key: int

    def __str__(self) -> str:
        return f"{self.producer}/{self.key}"


class Packets(NamedTuple):
    """Packets of one report. Each packet's interface is the report's IDB, whose stm
    ``if=N`` option names the source interface (see ``stm_options``).

    The two per-report events are NamedTuples, immutable like the others but built in a
    third of the time of a frozen dataclass: there is one per report on the hot path."""

    stream: Stream
    packets: list[Packet]
    sequence: int | None


class PacketBlocks(NamedTuple):
    """The packets of one report as their EPBs, checked but not parsed, for a relay that
    copies them whole (a decoder built with ``raw_byte_order`` emits these instead of
    ``Packets`` when the report is in that byte order). ``data[start:]`` holds ``count``
    EPBs whose interface IDs index ``interfaces``."""

    stream: Stream
    interfaces: list[Interface]
    data: bytes
    start: int
    count: int
    sequence: int | None


@dataclass(frozen=True, slots=True)
class Gap:
    """``missing`` datagrams of ``stream`` did not arrive before ``sequence`` (maybe later)."""

    stream: Stream
    missing: int
    sequence: int


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A datagram already seen: its packets are not delivered again."""

    stream: Stream
    sequence: int


@dataclass(frozen=True, slots=True)
class Reordered:
    """A datagram that arrived after later ones; it fills an earlier gap."""

    stream: Stream
    sequence: int


@dataclass(frozen=True, slots=True)
class Restarted:
    """The producer started a new session (restart): sequence tracking starts again."""

    stream: Stream


@dataclass(frozen=True, slots=True)
class FragmentsExpired:
    """A fragmented packet that never completed (lost pieces, timeout or memory bound)."""

    stream: Stream
    packets: int


@dataclass(frozen=True, slots=True)
class Malformed:
    """Input that is not a valid report; it was skipped."""

    reason: str
    source: object = None


Event = (
    Packets | PacketBlocks | Gap | Duplicate | Reordered | Restarted | FragmentsExpired | Malformed
)


class StreamStats:
    """Per-stream counters kept by the decoder."""

    __slots__ = (
        "bytes",
        "datagrams",
        "duplicates",
        "fragments_expired",
        "lost",
        "packets",
        "reordered",
        "restarts",
    )

    def __init__(self) -> None:
        for k in self.__slots__:
            setattr(self, k, 0)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}
