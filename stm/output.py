"""Where stm-recv's pcapng goes: a file or standard output, rotated as tcpdump's ``-C``,
``-G`` and ``-W`` rotate theirs, and optionally one output per producer or per stream.

File names, as tcpdump makes them:

- with ``rotate_seconds`` (``-G``) the name is passed through ``time.strftime`` with the
  local time the current period started, ``out-%H%M%S.pcapng`` for instance;
- with ``split_by`` the producer (``producer``), or the producer and stream ID
  (``stream``: ``amf-1-42``), goes before the last extension: ``out.pcapng`` becomes
  ``out-amf-1.pcapng``. Only ``A-Z a-z 0-9 . _ -`` are kept; a name that had anything
  else (``/`` included), was empty or longer than 64 characters has them replaced by
  ``_`` and gets ``~`` and 12 hex digits of its SHA-1 appended, so it can never leave
  the directory nor share a file with another;
- with ``size_limit`` (``-C``) a count follows: the first file has none, then ``1``,
  ``2``...; with ``max_files`` (``-W``) too, the count starts at ``0``, is zero-padded to
  the width of ``max_files - 1`` and wraps around, overwriting the oldest file (a ring
  buffer of ``max_files`` files per output).

Rotation, as tcpdump documents it:

- ``size_limit``: a new file starts before a write that would take the current one past
  the limit (see ``PcapngSink``);
- ``rotate_seconds``: every that many seconds (``maybe_rotate`` with the time), every
  output starts a new file; the count of ``size_limit`` starts again at 0;
- ``max_files`` with ``rotate_seconds`` and no ``size_limit``: after that many files
  ``finished`` is set and nothing more is written (tcpdump exits with status 0). With both
  ``size_limit`` and ``rotate_seconds`` it only bounds the count within each period.

Time is passed in (``now``), so rotation is tested without sleeping. Every file is a
whole pcapng: a new file starts with a section header and declares the interfaces its
packets need. A file that cannot be opened raises ``UsageError`` when the output is
created and ``StmError`` later; a failed write raises ``StmError`` naming the file
(``BrokenPipeError`` on standard output is left as it is: the reader went away).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections import OrderedDict
from typing import BinaryIO

from stm.errors import StmError, UsageError
from stm.pcapng.records import Packet
from stm.report import PacketBlocks, Stream
from stm.sink import PcapngSink

SPLIT_BY = ("producer", "stream")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_TOKEN = 64


def safe_token(name: str) -> str:
    """``name`` as a part of a file name: ``A-Z a-z 0-9 . _ -`` only; anything else, or an
    empty or over-long name, gets ``~`` and a hash so two names never share a file."""
    clean = _UNSAFE.sub("_", name)[:_MAX_TOKEN]
    if clean != name or not name:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        clean = f"{clean}~{digest}"
    return clean


def split_name(path: str, token: str) -> str:
    """``dir/out.pcapng`` and ``amf`` give ``dir/out-amf.pcapng`` (before the last extension)."""
    head, tail = os.path.split(path)
    stem, ext = os.path.splitext(tail)
    return os.path.join(head, f"{stem}-{token}{ext}")


def count_width(max_files: int | None) -> int:
    """Digits of the file count with ``-W``: enough for ``max_files - 1`` (tcpdump's rule)."""
    return len(str(max_files - 1)) if max_files and max_files > 1 else 0


class _Target:
    """One output (the only one, or one producer's or stream's): its current file."""

    __slots__ = ("count", "file", "key", "name", "sink")

    def __init__(self, key) -> None:
        self.key = key
        self.count = 0
        self.name = ""
        self.file: BinaryIO | None = None
        self.sink: PcapngSink | None = None


class PcapngOutput:
    """stm-recv's output: the methods of ``PcapngSink`` (``write``, ``write_blocks``,
    ``loss``, ``maybe_flush``, ``flush``, ``close``, ``packets``, ``rejected``) over one file
    or standard output (``path`` ``-``), rotated and split as the module describes.

    ``now`` is the wall-clock time at start (it names the first file with
    ``rotate_seconds``); ``maybe_rotate(now)`` is called with the time as it goes on.
    ``max_outputs`` bounds the outputs ``split_by`` opens (each holds an open file): the
    packets of a producer or stream beyond it are rejected.
    """

    def __init__(
        self,
        path: str,
        *,
        now: float,
        size_limit: int | None = None,
        rotate_seconds: float | None = None,
        max_files: int | None = None,
        split_by: str | None = None,
        flush_interval: float = 1.0,
        byte_order: str | None = None,
        max_interfaces: int = 65536,
        max_outputs: int = 256,
        stdout: BinaryIO | None = None,
    ) -> None:
        if split_by is not None and split_by not in SPLIT_BY:
            raise UsageError(f"split by must be one of {', '.join(SPLIT_BY)}, not {split_by!r}")
        if size_limit is not None and size_limit < 1:
            raise UsageError("the file size limit must be at least 1 byte")
        if rotate_seconds is not None and not rotate_seconds > 0:
            raise UsageError("the rotation period must be more than 0 seconds")
        if max_files is not None and max_files < 1:
            raise UsageError("the file count must be at least 1")
        if max_files is not None and size_limit is None and rotate_seconds is None:
            raise UsageError("a file count (-W) needs a file size (-C) or a period (-G)")
        if path == "-" and (size_limit or rotate_seconds or split_by):
            raise UsageError("rotation (-C/-G) and --split-by need a file name, not -w -")
        self.path = path
        self.size_limit = size_limit
        self.rotate_seconds = rotate_seconds
        self.max_files = max_files
        self.split_by = split_by
        self.flush_interval = flush_interval
        self.byte_order = byte_order
        self.max_interfaces = max_interfaces
        self.max_outputs = max_outputs
        self.packets = 0
        self.rejected = 0
        self.rejected_outputs = 0  # producers or streams refused by max_outputs
        self.rotations = 0  # time rotations so far
        self.finished = False  # max_files periods are over: nothing more is written
        self.failed = False
        self.closed = False
        self._files: OrderedDict[str, None] = OrderedDict()  # names, in the order last opened
        self._width = count_width(max_files)
        self._period_start = now
        self._deadline = None if rotate_seconds is None else now + rotate_seconds
        self._last_flush = time.monotonic()
        self._stdout = None
        if path == "-":
            self._stdout = stdout if stdout is not None else sys.stdout.buffer
        self._targets: dict[object, _Target] = {}
        self._single: _Target | None = None
        if split_by is None:
            self._single = self._open_target(None, at_start=True)
        else:
            self._check_directory()

    # -- names and files ----------------------------------------------------------------------

    def file_name(self, key=None, count: int = 0) -> str:
        """The name of an output's file number ``count`` in the current period."""
        if self.path == "-":
            return "-"
        name = self.path
        if self.rotate_seconds is not None:
            name = time.strftime(name, time.localtime(self._period_start))
        if key is not None:
            name = split_name(name, self._token(key))
        if self.size_limit is not None and (count or self._width):
            name = f"{name}{count:0{self._width}d}"
        return name

    def _token(self, key) -> str:
        if isinstance(key, Stream):
            return f"{safe_token(key.producer)}-{key.key}"
        return safe_token(key)

    def _check_directory(self) -> None:
        name = self.file_name("x")
        folder = os.path.dirname(name) or "."
        if not os.path.isdir(folder):
            raise UsageError(f"cannot write {name}: no such directory {folder}")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write {name}: permission denied in {folder}")

    def _open_file(self, name: str, at_start: bool) -> BinaryIO:
        if name == "-":
            return self._stdout
        try:
            file = open(name, "wb")  # noqa: SIM115 - closed by _close_file
        except OSError as exc:
            error = UsageError if at_start else StmError
            self.failed = not at_start
            raise error(f"cannot write {name}: {exc.strerror or exc}") from None
        self._files.pop(name, None)
        self._files[name] = None
        if len(self._files) > 1024:
            self._files.popitem(last=False)
        return file

    def _open_target(self, key, at_start: bool = False) -> _Target:
        t = _Target(key)
        t.name = self.file_name(key, 0)
        t.file = self._open_file(t.name, at_start)
        t.sink = PcapngSink(
            t.file,
            byte_order=self.byte_order,
            flush_interval=self.flush_interval,
            max_interfaces=self.max_interfaces,
            size_limit=self.size_limit,
            next_file=(lambda: self._next_file(t)) if self.size_limit is not None else None,
        )
        if key is not None:
            self._targets[key] = t
        return t

    def _next_file(self, t: _Target) -> BinaryIO:
        """The sink's file is full (its writer is flushed): close it, open the next."""
        self._close_file(t)
        t.count += 1
        if self.max_files is not None and t.count >= self.max_files:
            t.count = 0
        t.name = self.file_name(t.key, t.count)
        t.file = self._open_file(t.name, at_start=False)
        return t.file

    def _close_file(self, t: _Target) -> None:
        file, t.file = t.file, None
        if file is None:
            return
        try:
            if file is self._stdout:
                file.flush()  # standard output stays open
            else:
                file.close()
        except OSError as exc:
            raise self._error(t, exc) from None

    def _error(self, t: _Target, exc: OSError) -> Exception:
        self.failed = True
        if isinstance(exc, BrokenPipeError):
            return exc
        name = "standard output" if t.name == "-" else t.name
        return StmError(f"cannot write {name}: {exc.strerror or exc}")

    def _target(self, stream: Stream) -> _Target | None:
        if self.split_by is None:
            return self._single  # None once finished or closed
        key = stream.producer if self.split_by == "producer" else stream
        t = self._targets.get(key)
        if t is None:
            if self.finished or self.closed or len(self._targets) >= self.max_outputs:
                self.rejected_outputs += 1
                return None
            t = self._open_target(key)
        return t

    # -- what the sink does -------------------------------------------------------------------

    def write(self, stream: Stream, packets: list[Packet], now: float | None = None) -> None:
        t = self._target(stream)
        if t is None or t.sink is None:
            self.rejected += len(packets)
            return
        sink = t.sink
        packets_before, rejected_before = sink.packets, sink.rejected
        try:
            sink.write(stream, packets, now)
        except OSError as exc:
            raise self._error(t, exc) from None
        self.packets += sink.packets - packets_before
        self.rejected += sink.rejected - rejected_before

    def write_blocks(self, event: PacketBlocks) -> None:
        t = self._target(event.stream)
        if t is None or t.sink is None:
            self.rejected += event.count
            return
        sink = t.sink
        packets_before, rejected_before = sink.packets, sink.rejected
        try:
            sink.write_blocks(event)
        except OSError as exc:
            raise self._error(t, exc) from None
        self.packets += sink.packets - packets_before
        self.rejected += sink.rejected - rejected_before

    def loss(self, stream: Stream, lost: int, now: float | None = None) -> None:
        if self.split_by is None:
            t = self._single
        else:
            key = stream.producer if self.split_by == "producer" else stream
            t = self._targets.get(key)  # a stream with no packets in any file has no ISB
        if t is None or t.sink is None:
            return
        try:
            t.sink.loss(stream, lost, now)
        except OSError as exc:
            raise self._error(t, exc) from None

    def maybe_rotate(self, now: float) -> None:
        """Start new files if the period of ``rotate_seconds`` is over at wall time ``now``."""
        if self._deadline is None or now < self._deadline or self.finished:
            return
        self.rotations += 1
        self._period_start = now
        self._deadline = now + self.rotate_seconds
        self._close_targets()
        if (
            self.max_files is not None
            and self.size_limit is None
            and self.rotations >= self.max_files
        ):
            self.finished = True
            return
        if self.split_by is None:
            self._single = self._open_target(None)

    def maybe_flush(self, monotonic_now: float) -> bool:
        """Flush if ``flush_interval`` has passed since the last time; True if it did."""
        if monotonic_now - self._last_flush >= self.flush_interval:
            self.flush()
            self._last_flush = monotonic_now
            return True
        return False

    def flush(self) -> None:
        for t in self._all():
            if t.sink is not None and t.file is not None:
                try:
                    t.sink.flush()
                except OSError as exc:
                    raise self._error(t, exc) from None

    def close(self) -> None:
        """Flush and close every file (standard output is flushed). After a failure,
        errors are not raised again."""
        failed = self.failed
        self.closed = True
        try:
            self._close_targets()
        except (StmError, OSError):
            if not failed:
                raise
        finally:
            self._single = None

    def _all(self) -> list[_Target]:
        targets = list(self._targets.values())
        if self._single is not None:
            targets.append(self._single)
        return targets

    def _close_targets(self) -> None:
        """Close every file, all of them even when one fails; raise the first error."""
        first = None
        for t in self._all():
            sink, t.sink = t.sink, None
            if sink is not None and t.file is not None:
                try:
                    sink.flush()
                except OSError as exc:
                    first = first or self._error(t, exc)
            try:
                self._close_file(t)  # closed even when the flush before failed
            except (StmError, OSError) as exc:
                first = first or exc
        self._targets.clear()
        if first is not None:
            raise first

    @property
    def files(self) -> list[str]:
        """The names of the files opened so far (at most the last 1,024), in the order they
        were last opened (a ring buffer reopens its names)."""
        return list(self._files)
