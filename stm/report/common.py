"""What both report formats share: stm's PEN and options, stream IDs, sizes, counters."""

from __future__ import annotations

import zlib
from typing import Literal

from stm.errors import UsageError
from stm.pcapng import constants as c

# IANA Private Enterprise Number under which stm's custom options and blocks are written.
# 32473 is the number RFC 5612 sets aside for examples and documentation: stm uses it until
# it has a number of its own.
STM_PEN = 32473
IPV4_HEADER = 20
IPV6_HEADER = 40
UDP_HEADER = 8
MAX_UDP_PAYLOAD = 65507

Oversize = Literal["fragment", "truncate", "drop"]
OVERSIZE_POLICIES = ("fragment", "truncate", "drop")


def stream_id_for(producer: str, stream_id: int | None = None) -> int:
    """The stream ID (GRE key, HEP capture ID): ``stream_id`` if given, else a CRC-32 of the
    producer's name; UsageError when it does not fit 32 bits."""
    if stream_id is None:
        return zlib.crc32(producer.encode("utf-8"))
    if not 0 <= stream_id <= 0xFFFFFFFF:
        raise UsageError(f"stream ID {stream_id} does not fit 32 bits")
    return stream_id


def check_oversize(oversize: str) -> None:
    if oversize not in OVERSIZE_POLICIES:
        raise UsageError(f"oversize must be fragment, truncate or drop, not {oversize!r}")


def stm_option(key: str, value: str) -> tuple[int, tuple[int, bytes]]:
    """A ``key=value`` custom string option under stm's PEN."""
    return (c.OPT_CUSTOM_STR, (STM_PEN, f"{key}={value}".encode()))


def stm_options(options) -> dict[str, str]:
    """stm's own ``key=value`` custom string options of a block."""
    out = {}
    for code, value in options:
        if code == c.OPT_CUSTOM_STR and isinstance(value, tuple) and value[0] == STM_PEN:
            key, _, val = value[1].decode("utf-8", "replace").partition("=")
            out[key] = val
    return out


def without_stm_options(options) -> tuple:
    """The options of a block less stm's own, for writing the rebuilt capture."""
    return tuple(
        o
        for o in options
        if not (o[0] in c.CUSTOM_OPTIONS and isinstance(o[1], tuple) and o[1][0] == STM_PEN)
    )


class EncoderStats:
    """What an encoder has done; plain counters, read at the end or periodically."""

    __slots__ = ("bytes", "datagrams", "dropped", "fragmented", "packets", "truncated")

    def __init__(self) -> None:
        self.packets = self.datagrams = self.bytes = 0
        self.fragmented = self.truncated = self.dropped = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}
