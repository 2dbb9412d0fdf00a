"""Where stm-send's packets come from: capture files, a pipe, or a file still growing.

Reads whole chunks straight from the file descriptor, so a pipe (``tcpdump -U -w - |``)
is not held back by buffering, and waits with ``select``/a short sleep rather than a
blocking read, so a stop request (SIGINT, SIGTERM) is seen within ``poll`` seconds even
when the input is idle.
"""

from __future__ import annotations

import os
import select
import stat
import time
from collections.abc import Callable, Iterator, Sequence

from stm.errors import UsageError
from stm.pcapng import Reader
from stm.pcapng.reader import Event
from stm.pipeline import Stop

CHUNK = 1 << 20
CAPTURE_MAGICS = (
    b"\x0a\x0d\x0d\x0a", b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1",
    b"\xa1\xb2\x3c\x4d", b"\x34\xcd\xb2\xa1", b"\xa1\xb2\xcd\x34",
)  # fmt: skip


def check_capture(path: str, *, allow_empty: bool = False) -> int | None:
    """Fail early (UsageError) on a file that cannot be read or is not a capture; the
    file's size when it is a regular file. ``allow_empty`` passes a file not written yet."""
    if path == "-":
        return None
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"cannot read {path}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            return None  # a FIFO or device: reading its magic would consume it
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if magic not in CAPTURE_MAGICS and not (allow_empty and not magic):
        raise UsageError(f"{path} is not a pcap or pcapng file")
    return st.st_size


class CaptureInput:
    """The events of capture files in order (``-`` is standard input), stoppable.

    ``follow`` keeps reading the last file as it grows, like ``tail -f``, until ``stop``
    is set. While the input is idle the events include ``None`` at least every ``poll``
    seconds, and when ``wake()`` (a monotonic time, or None) comes, so the caller can
    send a report that has lingered long enough. ``on_chunk`` is called after every chunk
    read; ``bytes_read`` and ``total_bytes`` (None when unknown: a pipe, ``follow``) say
    how far it has got.
    """

    def __init__(
        self,
        paths: Sequence[str],
        *,
        follow: bool = False,
        stop: Stop | None = None,
        poll: float = 0.2,
        raw_packets: bool = False,
        chunk_size: int = CHUNK,
        wake: Callable[[], float | None] = lambda: None,
        on_chunk: Callable[[], None] = lambda: None,
    ) -> None:
        if follow and (len(paths) != 1 or paths[0] == "-"):
            raise UsageError("--follow takes exactly one capture file (not -)")
        sizes = [check_capture(p, allow_empty=follow) for p in paths]
        self.paths = list(paths)
        self.follow = follow
        self.stop = stop or Stop()
        self.wake = wake
        self.on_chunk = on_chunk
        self.poll = poll
        self.raw_packets = raw_packets
        self.chunk_size = chunk_size
        self.bytes_read = 0
        self.total_bytes = None if follow or None in sizes else sum(s or 0 for s in sizes)

    def events(self) -> Iterator[Event]:
        for path in self.paths:
            if self.stop.is_set():
                return
            yield from self._one(path)

    def _one(self, path: str) -> Iterator[Event]:
        reader = Reader(raw_packets=self.raw_packets)
        if path == "-":
            fd, own = 0, False
        else:
            try:
                fd, own = os.open(path, os.O_RDONLY), True
            except OSError as exc:
                raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            while True:
                data = self._read(fd, regular)
                if data is None:  # stopped
                    return
                if data is _IDLE:
                    yield None
                    continue
                if not data:
                    if self.follow:
                        if self.stop.wait(self._timeout()):
                            return  # what is half written stays unread, not an error
                        yield None
                        continue
                    break
                self.bytes_read += len(data)
                reader.feed(data)
                yield from reader
                self.on_chunk()
            reader.close()
            yield from reader
        finally:
            if own:
                os.close(fd)

    def _timeout(self) -> float:
        wake = self.wake()
        return self.poll if wake is None else min(self.poll, max(0.0, wake - time.monotonic()))

    def _read(self, fd: int, regular: bool) -> bytes | None:
        """The next chunk, b"" at the end, _IDLE after a wait, None once stopped."""
        if self.stop.is_set():
            return None
        if not regular:
            ready, _, _ = select.select([fd], [], [], self._timeout())
            if not ready:
                return _IDLE
        return os.read(fd, self.chunk_size)


_IDLE = b"idle"  # a marker, compared by identity
