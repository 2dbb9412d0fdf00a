"""Stream-ID ownership: a producer may send only on the stream IDs it claimed first.

On TLS and DTLS the collector knows who sent a report: the subject of the client's
verified certificate. :class:`StreamOwners` remembers, for each stream ID, the first
identity it came from, and refuses the same stream ID from any other identity, so one
authenticated producer cannot inject reports into (or spoil the sequence tracking of)
another's stream. It is sans-IO, like the decoders, and is called *before* the decoder::

    owners = StreamOwners()
    # for every report from a TLS connection or a DTLS session:
    identity = listener.peer_identity(peer)  # or dtls_receiver.identity(addr)
    if owners.admit(report, identity):
        decoder.receive_message(report, peer, now)  # or receive_datagram
    # else: counted in owners.rejected; drop the report

A report without an identity (plain UDP/TCP, or a TLS client without a certificate) is
let through: there is nobody to own anything. The stream IDs of a report are read by
:func:`stream_ids` from the bytes: the GRE key of format A; every STM stream-ID chunk and
HEP capture-ID chunk of format B (all of them must be owned, so a message cannot claim one
ID to pass the check and carry another that the decoder uses).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from stm.errors import UsageError
from stm.tlv import HEP_VENDOR, PROTOCOL_ID, STM_VENDOR, HepChunk, StmChunk

__all__ = ["StreamOwners", "claims_only", "stream_ids"]

_GRE = struct.Struct("!HH")
_U32 = struct.Struct("!I")
_CHUNK = struct.Struct("!HHH")
_K, _C, _S = 0x2000, 0x8000, 0x1000
_STREAM = (STM_VENDOR, int(StmChunk.STREAM_ID))
_CAPTURE = (HEP_VENDOR, int(HepChunk.CAPTURE_ID))
_MAX_CHUNKS = 0xFFFF // 6 + 1
_ID_HEADS = (_CHUNK.pack(*_STREAM, 10), _CHUNK.pack(*_CAPTURE, 10))  # chunks that name an ID


def stream_ids(report: bytes | bytearray | memoryview) -> frozenset[int]:
    """The stream IDs a report claims: empty if it names none (or is not a report; the
    decoder will say so). Format B when it starts with ``HEP3``, else format A."""
    data = bytes(report[:65536]) if not isinstance(report, bytes) else report
    if data[:4] == PROTOCOL_ID:
        return _tlv_ids(data)
    if len(data) < 4:
        return frozenset()
    flags, _ = _GRE.unpack_from(data, 0)
    if not flags & _K:
        return frozenset()
    pos = 8 if flags & _C else 4
    if len(data) < pos + 4:
        return frozenset()
    return frozenset((_U32.unpack_from(data, pos)[0],))


def claims_only(report: bytes | bytearray | memoryview, allowed: frozenset[int]) -> bool:
    """Whether every stream ID the report claims is in ``allowed`` (True if it claims none):
    ``stream_ids(report) <= allowed``, exactly, but for format B without a chunk walk in
    Python in the usual case. ``bytes.find`` sees every ID chunk header, and perhaps some
    look-alikes inside a payload: when all it sees are allowed, so are the real ones; when
    one is not, the chunk walk decides."""
    data = bytes(report[:65536]) if not isinstance(report, bytes) else report
    if data[:4] != PROTOCOL_ID:
        return stream_ids(data) <= allowed
    unpack = _U32.unpack_from
    for head in _ID_HEADS:
        at = data.find(head, 6)
        while at >= 0:
            if at + 10 > len(data) or unpack(data, at + 6)[0] not in allowed:
                return _tlv_ids(data) <= allowed
            at = data.find(head, at + 6)
    return True


def _tlv_ids(data: bytes) -> frozenset[int]:
    end = len(data)
    if end >= 6:
        end = min(end, struct.unpack_from("!H", data, 4)[0])
    ids = set()
    pos = 6
    for _ in range(_MAX_CHUNKS):
        if pos + 6 > end:
            break
        vendor, ctype, length = _CHUNK.unpack_from(data, pos)
        if length < 6 or pos + length > end:
            break
        if (vendor, ctype) in (_STREAM, _CAPTURE) and length == 10:
            ids.add(_U32.unpack_from(data, pos + 6)[0])
        pos += length
    return frozenset(ids)


class StreamOwners:
    """First identity per stream ID wins; other identities are refused and counted.

    Bounded: at most ``max_streams`` stream IDs are remembered; once full, a report on a new
    stream ID from an identity is refused (``overflow``) rather than forgetting an owner,
    which would let a hijacker wait for the victim's entry to go. ``max_per_identity``
    bounds what one producer can claim, so one cannot fill the table for the others.
    """

    def __init__(self, max_streams: int = 65536, max_per_identity: int = 1024) -> None:
        if max_streams < 1 or max_per_identity < 1:
            raise UsageError("max_streams and max_per_identity must be positive")
        self.max_streams = max_streams
        self.max_per_identity = max_per_identity
        self.rejected = 0
        """Reports refused: a stream ID owned by another identity."""
        self.overflow = 0
        """Reports refused: a new stream ID with the table (or the identity's share) full."""
        self._owner: dict[int, str] = {}
        self._claimed: dict[str, int] = {}
        self._last_refused: tuple[int, str, str] | None = None

    def owner(self, stream_id: int) -> str | None:
        return self._owner.get(stream_id)

    def claim(self, stream_id: int, identity: str) -> bool:
        """True if ``identity`` owns ``stream_id`` (now, if nobody did); else counted."""
        owner = self._owner.get(stream_id)
        if owner == identity:
            return True
        if owner is not None:
            self.rejected += 1
            self._last_refused = (stream_id, identity, owner)
            return False
        claimed = self._claimed.get(identity, 0)
        if len(self._owner) >= self.max_streams or claimed >= self.max_per_identity:
            self.overflow += 1
            return False
        self._owner[stream_id] = identity
        self._claimed[identity] = claimed + 1
        return True

    def claim_all(self, ids: Iterable[int], identity: str) -> bool:
        """True if ``identity`` owns every one of ``ids`` (claiming the free ones only if
        none is owned by someone else). Counted once when refused."""
        ids = list(ids)
        for sid in ids:
            owner = self._owner.get(sid)
            if owner is not None and owner != identity:
                self.rejected += 1
                self._last_refused = (sid, identity, owner)
                return False
        return all(self.claim(sid, identity) for sid in ids)

    def admit(self, report: bytes | bytearray | memoryview, identity: str | None) -> bool:
        """Whether a report from ``identity`` may go to the decoder (see the module doc)."""
        if identity is None:
            return True
        ids = stream_ids(report)
        return not ids or self.claim_all(ids, identity)

    @property
    def last_refused(self) -> tuple[int, str, str] | None:
        """(stream ID, refused identity, owner) of the last refusal, for a log line."""
        return self._last_refused

    def stats(self) -> dict[str, int]:
        return {"streams": len(self._owner), "rejected": self.rejected, "overflow": self.overflow}
