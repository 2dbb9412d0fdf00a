"""pcapng blocks as bytes: pure functions shared by the file writer and the report encoder."""

from __future__ import annotations

import struct
from collections.abc import Iterable

from stm.pcapng import constants as c
from stm.pcapng.options import (
    EPB_KINDS,
    GENERIC_KINDS,
    IDB_KINDS,
    ISB_KINDS,
    NRB_KINDS,
    SHB_KINDS,
    Option,
    encode_options,
)

PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
_S = {
    bo: {
        "I": struct.Struct(bo + "I"),
        "II": struct.Struct(bo + "II"),
        "epb": struct.Struct(bo + "IIIIIII"),
        "shb": struct.Struct(bo + "IIIHHq"),
        "idb": struct.Struct(bo + "IIHHI"),
        "isb": struct.Struct(bo + "IIIII"),
        "HH": struct.Struct(bo + "HH"),
        "pcaphdr": struct.Struct(bo + "IHHiIII"),
        "pcaprec": struct.Struct(bo + "IIII"),
    }
    for bo in "<>"
}


def block(bo: str, btype: int, body: bytes) -> bytes:
    """Frame ``body`` (already padded to 4 bytes) as a block of type ``btype``."""
    total = 12 + len(body)
    u32 = _S[bo]["I"]
    return b"".join((_S[bo]["II"].pack(btype, total), body, u32.pack(total)))


def shb(bo: str, options: Iterable[Option] = (), section_length: int = -1) -> bytes:
    opts = encode_options(options, bo, SHB_KINDS)
    total = 28 + len(opts)
    s = _S[bo]
    return b"".join(
        (
            s["shb"].pack(c.SHB, total, c.BYTE_ORDER_MAGIC, 1, 0, section_length),
            opts,
            s["I"].pack(total),
        )
    )


def idb(bo: str, linktype: int, snaplen: int, options: Iterable[Option] = ()) -> bytes:
    opts = encode_options(options, bo, IDB_KINDS)
    total = 20 + len(opts)
    s = _S[bo]
    return b"".join((s["idb"].pack(c.IDB, total, linktype, 0, snaplen), opts, s["I"].pack(total)))


def packet_options(
    bo: str,
    flags: int | None = None,
    comments: Iterable[str] = (),
    options: Iterable[Option] = (),
) -> bytes:
    """The option list of an EPB: flags first, then comments, then the rest."""
    opts: list[Option] = [(c.EPB_FLAGS, flags)] if flags is not None else []
    opts += ((c.OPT_COMMENT, x) for x in comments)
    opts += options
    return encode_options(opts, bo, EPB_KINDS)


def epb(
    bo: str,
    ifid: int,
    ts: int,
    data: bytes | memoryview,
    origlen: int,
    options: bytes = b"",
) -> bytes:
    """An enhanced packet block; ``options`` is an encoded option list (see packet_options)."""
    n = len(data)
    total = 32 + n + (-n & 3) + len(options)
    s = _S[bo]
    return b"".join(
        (
            s["epb"].pack(c.EPB, total, ifid, ts >> 32, ts & 0xFFFFFFFF, n, origlen),
            data,
            PAD[n & 3],
            options,
            s["I"].pack(total),
        )
    )


def spb(bo: str, data: bytes | memoryview, origlen: int) -> bytes:
    n = len(data)
    return block(bo, c.SPB, b"".join((_S[bo]["I"].pack(origlen), data, PAD[n & 3])))


def isb(bo: str, ifid: int, ts: int, options: Iterable[Option] = ()) -> bytes:
    opts = encode_options(options, bo, ISB_KINDS)
    total = 24 + len(opts)
    s = _S[bo]
    return b"".join(
        (s["isb"].pack(c.ISB, total, ifid, ts >> 32, ts & 0xFFFFFFFF), opts, s["I"].pack(total))
    )


def nrb(bo: str, records: Iterable[tuple[int, bytes]], options: Iterable[Option] = ()) -> bytes:
    hh = _S[bo]["HH"]
    parts = []
    for rtype, value in records:
        parts += (hh.pack(rtype, len(value)), value, PAD[len(value) & 3])
    parts.append(hh.pack(c.NRB_RECORD_END, 0))
    parts.append(encode_options(options, bo, NRB_KINDS))
    return block(bo, c.NRB, b"".join(parts))


def dsb(bo: str, secrets_type: int, data: bytes, options: Iterable[Option] = ()) -> bytes:
    body = b"".join(
        (
            _S[bo]["II"].pack(secrets_type, len(data)),
            data,
            PAD[len(data) & 3],
            encode_options(options, bo, GENERIC_KINDS),
        )
    )
    return block(bo, c.DSB, body)


def custom(bo: str, block_type: int, pen: int, data: bytes) -> bytes:
    """A custom block; ``data`` (custom data and any options) is opaque and padded here."""
    return block(bo, block_type, _S[bo]["I"].pack(pen) + data + PAD[len(data) & 3])


def pcap_header(bo: str, linktype: int, snaplen: int, nano: bool) -> bytes:
    magic = c.PCAP_MAGIC_NS if nano else c.PCAP_MAGIC_US
    return _S[bo]["pcaphdr"].pack(magic, 2, 4, 0, 0, snaplen, linktype)


def pcap_record(bo: str, sec: int, frac: int, data: bytes | memoryview, origlen: int) -> bytes:
    return _S[bo]["pcaprec"].pack(sec, frac, len(data), origlen) + bytes(data)
