"""pcapng and classic pcap: a sans-IO reader, block encoders and streaming writers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import BinaryIO

from stm.errors import MalformedPcapng
from stm.pcapng.reader import Event, Reader
from stm.pcapng.records import (
    CustomBlock,
    DecryptionSecrets,
    Interface,
    InterfaceStatistics,
    NameResolution,
    Packet,
    RawPackets,
    Section,
    UnknownBlock,
    units_per_second,
)
from stm.pcapng.writer import PcapWriter, Writer, convert_ts

CHUNK = 1 << 20

__all__ = [
    "CustomBlock",
    "DecryptionSecrets",
    "Event",
    "Interface",
    "InterfaceStatistics",
    "MalformedPcapng",
    "NameResolution",
    "Packet",
    "PcapWriter",
    "RawPackets",
    "Reader",
    "Section",
    "UnknownBlock",
    "Writer",
    "convert_ts",
    "read",
    "read_events",
    "units_per_second",
]


def read_events(
    source: str | os.PathLike | BinaryIO | bytes, *, chunk_size: int = CHUNK, **reader_args
) -> Iterator[Event]:
    """Every event of a capture: a path, a binary file object (pipes too) or bytes."""
    reader = Reader(**reader_args)
    if isinstance(source, (bytes, bytearray, memoryview)):
        reader.feed(source)
        reader.close()
        yield from reader
        return
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            yield from _pump(reader, f, chunk_size)
        return
    yield from _pump(reader, source, chunk_size)


def _pump(reader: Reader, f: BinaryIO, chunk_size: int) -> Iterator[Event]:
    # read1 returns what a pipe has now, so a live `tcpdump -U -w -` is not held back.
    take = getattr(f, "read1", None) or f.read
    while True:
        data = take(chunk_size)
        if not data:
            break
        reader.feed(data)
        yield from reader
    reader.close()
    yield from reader


def read(source: str | os.PathLike | BinaryIO | bytes, **kwargs) -> Iterator[Packet]:
    """The packets of a capture, in file order."""
    return (e for e in read_events(source, **kwargs) if type(e) is Packet)
