"""A short human summary of a capture file: what the demo and stm-recv print at the end."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction

from stm import pcapng
from stm.pcapng.constants import LINKTYPE_NAMES


@dataclass
class Summary:
    """Counts and extremes of one capture, collected in one streaming pass."""

    path: str
    format: str = ""
    sections: int = 0
    interfaces: list[str] = field(default_factory=list)
    packets: int = 0
    bytes: int = 0
    truncated: int = 0
    comments: int = 0
    first: Fraction | None = None
    last: Fraction | None = None

    def lines(self) -> list[str]:
        span = (
            f"{float(self.last - self.first):.6f} s"
            if self.first is not None and self.last is not None
            else "-"
        )
        return [
            f"{self.path}: {self.format}, {self.sections} section(s), "
            f"{len(self.interfaces)} interface(s)",
            f"  packets {self.packets}, captured bytes {self.bytes}, "
            f"truncated {self.truncated}, comments {self.comments}, span {span}",
            *(f"  interface {i}: {desc}" for i, desc in enumerate(self.interfaces)),
        ]


def summarize(path: str | os.PathLike) -> Summary:
    s = Summary(str(path))
    for ev in pcapng.read_events(path):
        if isinstance(ev, pcapng.Packet):
            s.packets += 1
            s.bytes += len(ev.data)
            s.truncated += len(ev.data) < ev.origlen
            s.comments += len(ev.comments)
            t = ev.time
            if t is not None:
                s.first = t if s.first is None or t < s.first else s.first
                s.last = t if s.last is None or t > s.last else s.last
        elif isinstance(ev, pcapng.Interface):
            name = LINKTYPE_NAMES.get(ev.linktype, str(ev.linktype))
            label = f"{ev.name or '-'} linktype {ev.linktype} ({name}), snaplen {ev.snaplen}"
            s.interfaces.append(f"{label}, tsresol {ev.tsresol}")
        elif isinstance(ev, pcapng.Section):
            s.format = ev.format
            s.sections += 1
    return s
