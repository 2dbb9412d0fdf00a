"""One packet block, read on its own against interfaces the caller already has."""

from __future__ import annotations

from collections.abc import Iterator

from stm.errors import MalformedPcapng
from stm.pcapng import constants as c
from stm.pcapng import encode as enc
from stm.pcapng.reader import Reader
from stm.pcapng.records import Interface, Packet


def packet_from_block(
    block: bytes | memoryview,
    byte_order: str,
    interfaces: list[Interface],
    max_block_size: int = c.DEFAULT_MAX_BLOCK,
) -> Packet:
    """The packet of one EPB, SPB or obsolete PB in ``byte_order``, as the reader gives it,
    with ``interfaces`` (its interface IDs index them) as its interface. MalformedPcapng if
    the block is not exactly one valid packet block: the rare paths (reassembled fragments,
    blocks a relay cannot copy) share the reader's rules instead of parsing by hand."""
    packets = list(packets_from_blocks(block, byte_order, interfaces, max_block_size))
    if len(packets) != 1:
        raise MalformedPcapng(f"expected one packet block, found {len(packets)} packets")
    return packets[0]


def packets_from_blocks(
    blocks: bytes | memoryview,
    byte_order: str,
    interfaces: list[Interface],
    max_block_size: int = c.DEFAULT_MAX_BLOCK,
) -> Iterator[Packet]:
    """The packets of packet blocks one after the other (a run of ``RawPackets``), as
    :func:`packet_from_block` gives each, read by one reader for all of them; a block that
    is not a valid packet block raises MalformedPcapng when its turn comes."""
    reader = Reader(max_block_size=max_block_size)
    reader.feed(enc.shb(byte_order))
    for i in interfaces:
        reader.feed(enc.idb(byte_order, i.linktype, i.snaplen, i.options))
    reader.feed(bytes(blocks))
    reader.close()
    for event in reader:
        if isinstance(event, Packet):
            event.interface = interfaces[event.interface.id]
            yield event
