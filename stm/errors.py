"""One exception hierarchy for everything stm raises on purpose.

Protocol errors (bad bytes from a file or the network) are kept apart from local
misuse (bad arguments, wrong API calls), as h11 does: a receiver counts and skips
the first kind and never crashes on it; the second is a bug or a user error.
"""

from __future__ import annotations


class StmError(Exception):
    """Base of every error stm raises on purpose."""


class ProtocolError(StmError):
    """Input bytes (file, pipe, network) that do not follow the format."""


class MalformedPcapng(ProtocolError):
    """A pcapng or classic pcap stream that cannot be parsed.

    ``offset`` is the byte offset in the stream where the bad block or record starts.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.offset = offset
        self.reason = message
        super().__init__(message if offset is None else f"at byte {offset}: {message}")


class MalformedReport(ProtocolError):
    """An STM report (GRE datagram or TLV message) that cannot be decoded."""


class UsageError(StmError):
    """Local misuse: bad arguments or an API called out of order."""
