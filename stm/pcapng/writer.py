"""Streaming pcapng and classic pcap writers over a binary file object.

The writer buffers whole blocks and hands them to the file in large writes, so a reader
following the file (or a ``kill -9``) only ever sees whole blocks up to the last flush.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterable
from typing import BinaryIO

from stm import accel
from stm.errors import UsageError
from stm.pcapng import constants as c
from stm.pcapng import encode as enc
from stm.pcapng.options import Option
from stm.pcapng.records import (
    CustomBlock,
    DecryptionSecrets,
    Interface,
    NameResolution,
    Packet,
    UnknownBlock,
    units_per_second,
)

HOST_ORDER = "<" if sys.byteorder == "little" else ">"
_FLUSH_AT = 1 << 18
_MAX_TS = (1 << 64) - 1


class Writer:
    """Writes one or more pcapng sections: SHB, IDBs, EPBs (and SPB, ISB, NRB, DSB, CB).

    ``byte_order`` is '<', '>' or ``None`` for the host's. Interfaces are numbered from 0 in
    the order they are added; a new section starts numbering again.
    """

    def __init__(
        self,
        file: BinaryIO,
        *,
        byte_order: str | None = None,
        options: Iterable[Option] = (),
    ) -> None:
        self.byte_order = byte_order or HOST_ORDER
        if self.byte_order not in "<>":
            raise UsageError(f"byte order must be '<' or '>', not {byte_order!r}")
        self._file = file
        self._buf = bytearray()
        bo = self.byte_order
        self._epb_head = struct.Struct(bo + "IIIIIII").pack
        # Padding and trailing length together, one packer per padding size.
        self._epb_tail = tuple(struct.Struct(bo + "x" * pad + "I").pack for pad in (0, 3, 2, 1))
        self._epb_ids = struct.Struct(bo + "III")  # block type, length, interface ID
        self._epb_id = struct.Struct(bo + "I")
        self.interfaces: list[Interface] = []
        self.packets = 0
        ext = accel.ext
        self._copy_epbs = None if ext is None else ext.copy_epbs
        self._epb_append = None if ext is None else ext.epb_append
        self._big = bo == ">"
        self.new_section(options)

    def _put(self, data: bytes | memoryview) -> None:
        self._buf += data
        if len(self._buf) >= _FLUSH_AT:
            self._drain()

    def _drain(self) -> None:
        if self._buf:
            self._file.write(self._buf)
            self._buf = bytearray()

    def flush(self) -> None:
        """Hand every whole block to the file and flush it."""
        self._drain()
        self._file.flush()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()

    def new_section(self, options: Iterable[Option] = ()) -> None:
        """Start a section: interfaces added before it can no longer be used."""
        self.interfaces = []
        self._put(enc.shb(self.byte_order, options))

    def add_interface(
        self,
        linktype: int,
        snaplen: int = 0,
        *,
        name: str | None = None,
        tsresol: int = 9,
        tsoffset: int = 0,
        options: Iterable[Option] = (),
    ) -> int:
        """Add an IDB and return its interface ID. New interfaces default to nanoseconds."""
        opts: list[Option] = [(c.IF_NAME, name)] if name is not None else []
        opts += [o for o in options if o[0] not in (c.IF_NAME, c.IF_TSRESOL, c.IF_TSOFFSET)]
        if tsresol != 6:
            opts.append((c.IF_TSRESOL, tsresol))
        if tsoffset:
            opts.append((c.IF_TSOFFSET, tsoffset))
        return self._add(Interface(linktype, snaplen, tuple(opts)))

    def copy_interface(self, interface: Interface, *, name: str | None = None) -> int:
        """Add an IDB that keeps the source's link type, snaplen, resolution and options."""
        opts = interface.options
        if name is not None:
            opts = ((c.IF_NAME, name), *(o for o in opts if o[0] != c.IF_NAME))
        return self._add(Interface(interface.linktype, interface.snaplen, opts))

    def _add(self, interface: Interface) -> int:
        ifid = len(self.interfaces)
        if interface.tsresol & 0x7F > (63 if interface.tsresol & 0x80 else 19):
            raise UsageError(f"if_tsresol 0x{interface.tsresol:02x} is out of range")
        self._put(
            enc.idb(self.byte_order, interface.linktype, interface.snaplen, interface.options)
        )
        self.interfaces.append(
            Interface(interface.linktype, interface.snaplen, interface.options, ifid)
        )
        return ifid

    def write_packet(
        self,
        interface_id: int,
        ts: int | None,
        data: bytes | memoryview,
        *,
        origlen: int | None = None,
        flags: int | None = None,
        comments: Iterable[str] = (),
        options: Iterable[Option] = (),
    ) -> None:
        """Write one packet; ``ts`` is in ticks of the interface's resolution.

        ``ts=None`` writes a Simple Packet Block, which only interface 0 can have.
        """
        if not 0 <= interface_id < len(self.interfaces):
            raise UsageError(f"interface {interface_id} has not been added")
        if origlen is None:
            origlen = len(data)
        if ts is not None and flags is None and not comments and not options:
            # The common case, framed in place: no option list to build.
            fast = self._epb_append
            if fast is not None and fast(self._buf, self._big, interface_id, ts, data, origlen):
                self.packets += 1
                if len(self._buf) >= _FLUSH_AT:
                    self._drain()
                return
            n = len(data)
            total = 32 + n + (-n & 3)
            try:
                head = self._epb_head(c.EPB, total, interface_id, ts >> 32, ts & 0xFFFFFFFF,
                                      n, origlen)  # fmt: skip
            except struct.error:
                raise UsageError(f"timestamp {ts} or length {origlen} does not fit") from None
            buf = self._buf
            buf += head
            buf += data
            buf += self._epb_tail[n & 3](total)
            self.packets += 1
            if len(buf) >= _FLUSH_AT:
                self._drain()
            return
        bo = self.byte_order
        if ts is None:
            if interface_id != 0 or flags is not None or comments or options:
                raise UsageError("a packet without timestamp can only be an SPB on interface 0")
            snaplen = self.interfaces[0].snaplen
            if len(data) != (min(origlen, snaplen) if snaplen else origlen):
                raise UsageError(
                    "an SPB's captured length is min(original length, snaplen): "
                    f"{len(data)} bytes do not fit original length {origlen}, snaplen {snaplen}"
                )
            self._put(enc.spb(bo, data, origlen))
        else:
            if not 0 <= ts <= _MAX_TS:
                raise UsageError(f"timestamp {ts} does not fit 64 bits at this resolution")
            opts = (
                enc.packet_options(bo, flags, comments, options)
                if flags is not None or comments or options
                else b""
            )
            self._put(enc.epb(bo, interface_id, ts, data, origlen, opts))
        self.packets += 1

    def write(self, packet: Packet, interface_id: int) -> None:
        """Write a packet read from elsewhere, converting its timestamp if resolutions differ."""
        ts = packet.ts
        if ts is not None:
            dst = self.interfaces[interface_id] if interface_id < len(self.interfaces) else None
            src = packet.interface
            if dst is not None and (dst.units, dst.tsoffset) != (src.units, src.tsoffset):
                ts = convert_ts(ts, src, dst)
        self.write_packet(
            interface_id,
            ts,
            packet.data,
            origlen=packet.origlen,
            flags=packet.flags,
            comments=packet.comments,
            options=packet.options,
        )

    def write_statistics(self, interface_id: int, ts: int, options: Iterable[Option] = ()) -> None:
        """Append an interface statistics block (``isb_ifdrop``, ``isb_ifrecv``, comments...)."""
        if not 0 <= interface_id < len(self.interfaces):
            raise UsageError(f"interface {interface_id} has not been added")
        self._put(enc.isb(self.byte_order, interface_id, ts, options))

    def write_block(
        self, block: NameResolution | DecryptionSecrets | CustomBlock | UnknownBlock
    ) -> None:
        """Copy a non-packet block read elsewhere (unknown blocks only in their byte order)."""
        bo = self.byte_order
        if isinstance(block, NameResolution):
            self._put(enc.nrb(bo, block.records, block.options))
        elif isinstance(block, DecryptionSecrets):
            self._put(enc.dsb(bo, block.secrets_type, block.data, block.options))
        elif isinstance(block, CustomBlock):
            self._put(enc.custom(bo, block.block_type, block.pen, block.data))
        elif isinstance(block, UnknownBlock):
            if block.byte_order != bo:
                raise UsageError("an unknown block can only be copied in its own byte order")
            self._put(enc.block(bo, block.block_type, block.body))
        else:
            raise UsageError(f"cannot write {type(block).__name__} with write_block")

    def copy_epbs(self, data: bytes, start: int, interface_ids: list[int | None]) -> int:
        """Copy the EPBs in ``data[start:]`` (already checked, in this writer's byte order)
        whole, renumbering their interfaces: ``interface_ids[i]`` is the ID here of their
        interface ``i``, or None to leave its packets out. Returns how many were written.

        A relay's hot path: no object per packet, three slices copied per block."""
        buf = self._buf
        fast = self._copy_epbs
        if fast is not None:
            written = fast(buf, data, start, interface_ids, self.byte_order == ">")
            if written is not None:  # else the blocks do not frame: the loop below decides
                self.packets += written
                if len(buf) >= _FLUSH_AT:
                    self._drain()
                return written
        mv = memoryview(data)
        head = self._epb_ids.unpack_from
        pack_id = self._epb_id.pack
        n = len(data)
        off = start
        written = 0
        while off < n:
            _, blen, ifid = head(data, off)
            new = interface_ids[ifid]
            if new is not None:
                buf += mv[off : off + 8]
                buf += pack_id(new)
                buf += mv[off + 12 : off + blen]
                written += 1
            off += blen
        self.packets += written
        if len(buf) >= _FLUSH_AT:
            self._drain()
        return written

    def write_raw(self, blocks: bytes | memoryview) -> None:
        """Append whole blocks already encoded in this writer's byte order."""
        self._put(blocks)


def convert_ts(ts: int, src: Interface, dst: Interface) -> int:
    """Re-express ``ts`` ticks of ``src`` in ``dst`` ticks (floored where not exact)."""
    num = (ts + src.tsoffset * src.units - dst.tsoffset * src.units) * dst.units
    return num // src.units


class PcapWriter:
    """Classic pcap (one link type, microsecond or nanosecond), for tools that want it."""

    def __init__(
        self,
        file: BinaryIO,
        linktype: int,
        *,
        snaplen: int = 262144,
        nano: bool = True,
        byte_order: str | None = None,
    ) -> None:
        self._file = file
        self.byte_order = byte_order or HOST_ORDER
        self.nano = nano
        self.units = units_per_second(9 if nano else 6)
        file.write(enc.pcap_header(self.byte_order, linktype, snaplen, nano))

    def write_packet(self, ts: int, data: bytes | memoryview, origlen: int | None = None) -> None:
        """``ts`` in nanoseconds or microseconds, as chosen at creation."""
        sec, frac = divmod(ts, self.units)
        if not 0 <= sec <= 0xFFFFFFFF:
            raise UsageError(f"timestamp {ts} does not fit classic pcap")
        self._file.write(
            enc.pcap_record(
                self.byte_order, sec, frac, data, len(data) if origlen is None else origlen
            )
        )

    def flush(self) -> None:
        self._file.flush()
