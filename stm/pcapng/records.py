"""What the reader yields and the writer takes: small records, one per block.

Timestamps stay exact: a packet carries the raw tick count of its interface, and the
interface carries the resolution and offset, so any value a file can hold (even
microsecond stamps near 1.8e13 s, past a 64-bit nanosecond count) is kept as it is.
``Packet.time`` gives the exact instant as a ``Fraction`` of seconds when one is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from stm.pcapng import constants as c
from stm.pcapng.options import Option, first


def units_per_second(tsresol: int) -> int:
    """Ticks per second for an ``if_tsresol`` byte (MSB clear: 10^-n, set: 2^-n)."""
    if tsresol & 0x80:
        return 1 << (tsresol & 0x7F)
    return 10 ** (tsresol & 0x7F)


@dataclass(frozen=True, slots=True)
class Section:
    """A section header: byte order ('<' or '>'), version, options; ``format`` tells pcap apart."""

    byte_order: str
    major: int = 1
    minor: int = 0
    length: int = -1
    options: tuple[Option, ...] = ()
    format: str = "pcapng"
    index: int = 0

    @property
    def comments(self) -> tuple[str, ...]:
        return tuple(v for k, v in self.options if k == c.OPT_COMMENT)


@dataclass(frozen=True, slots=True)
class Interface:
    """An interface (IDB, or the header of a classic pcap file).

    ``tsresol`` is the raw ``if_tsresol`` byte (6 when absent) and ``tsoffset`` the
    ``if_tsoffset`` seconds (0 when absent); ``options`` keeps every option as read.
    """

    linktype: int
    snaplen: int = 0
    options: tuple[Option, ...] = ()
    id: int = 0
    section: int = 0
    tsresol: int = field(init=False)
    tsoffset: int = field(init=False)
    units: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tsresol = first(self.options, c.IF_TSRESOL, 6)
        tsoffset = first(self.options, c.IF_TSOFFSET, 0)
        object.__setattr__(self, "tsresol", tsresol if isinstance(tsresol, int) else 6)
        object.__setattr__(self, "tsoffset", tsoffset if isinstance(tsoffset, int) else 0)
        object.__setattr__(self, "units", units_per_second(self.tsresol))

    @property
    def name(self) -> str | None:
        return first(self.options, c.IF_NAME)

    @property
    def description(self) -> str | None:
        return first(self.options, c.IF_DESCRIPTION)

    @property
    def fcslen(self) -> int | None:
        return first(self.options, c.IF_FCSLEN)


class Packet:
    """One captured packet (EPB, SPB or obsolete PB, or a classic pcap record).

    ``ts`` is in ticks of ``interface.tsresol`` (``None`` for a Simple Packet Block, which
    has no timestamp); ``data`` is a memoryview into the read buffer where possible: copy
    it (``bytes(p.data)``) to keep it past the next read. ``options`` holds every option
    other than flags and comments.
    """

    __slots__ = ("block", "comments", "data", "flags", "interface", "options", "origlen", "ts")

    def __init__(
        self,
        interface: Interface,
        ts: int | None,
        data: bytes | memoryview,
        origlen: int,
        flags: int | None = None,
        comments: tuple[str, ...] = (),
        options: tuple[Option, ...] = (),
        block: int = c.EPB,
    ) -> None:
        self.interface = interface
        self.ts = ts
        self.data = data
        self.origlen = origlen
        self.flags = flags
        self.comments = comments
        self.options = options
        self.block = block

    @property
    def caplen(self) -> int:
        return len(self.data)

    @property
    def linktype(self) -> int:
        return self.interface.linktype

    @property
    def time(self) -> Fraction | None:
        """The exact capture time in seconds since 1970, offset included."""
        if self.ts is None:
            return None
        return Fraction(self.ts, self.interface.units) + self.interface.tsoffset

    @property
    def time_ns(self) -> int | None:
        """The capture time in whole nanoseconds (floored); may exceed 64 bits."""
        t = self.time
        return None if t is None else (t.numerator * 1_000_000_000) // t.denominator

    def key(self) -> tuple:
        """What a lossless relay must keep: for comparing packets across files."""
        return (
            self.linktype,
            self.time,
            self.caplen,
            self.origlen,
            bytes(self.data),
            self.flags,
            self.comments,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Packet):
            return NotImplemented
        return self.key() == other.key() and self.options == other.options

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Packet(linktype={self.linktype}, ts={self.ts}, caplen={self.caplen}, "
            f"origlen={self.origlen}, flags={self.flags}, comments={self.comments!r})"
        )


@dataclass(frozen=True, slots=True)
class NameResolution:
    """A name resolution block: records as (type, raw value) plus options."""

    records: tuple[tuple[int, bytes], ...]
    options: tuple[Option, ...] = ()


@dataclass(frozen=True, slots=True)
class InterfaceStatistics:
    """An interface statistics block; ``ts`` in the interface's ticks."""

    interface: Interface
    ts: int
    options: tuple[Option, ...] = ()


@dataclass(frozen=True, slots=True)
class DecryptionSecrets:
    """A decryption secrets block (TLS key log, WireGuard keys, ...)."""

    secrets_type: int
    data: bytes
    options: tuple[Option, ...] = ()


@dataclass(frozen=True, slots=True)
class CustomBlock:
    """A custom block (0x00000BAD may be copied, 0x40000BAD may not); data is opaque."""

    block_type: int
    pen: int
    data: bytes


@dataclass(frozen=True, slots=True)
class UnknownBlock:
    """A block of a type stm does not know: its body is kept verbatim, in ``byte_order``."""

    block_type: int
    body: bytes
    byte_order: str


@dataclass(frozen=True, slots=True)
class RawPackets:
    """A run of packet blocks taken whole (the reader's bulk mode), for callers that relay.

    ``data`` holds ``count`` consecutive EPB/SPB/PB blocks of ``section``, in its byte order.
    """

    section: Section
    data: memoryview
    count: int
