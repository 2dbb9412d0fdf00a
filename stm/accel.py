"""The optional compiled accelerator of the report hot paths (``stm._accel``, Rust).

``ext`` is the extension module, or None when it was not built (no cargo at install time),
when it was built for another version of this code, or when ``STM_NO_ACCEL=1`` is set.
The codecs look at ``ext`` when they are created and keep what they found, so every path
has a pure-Python twin that gives the same bytes and events: the extension only takes the
common case of each hot path and answers None for everything else, which the Python code
then handles as it always did (see ``rust/src/lib.rs``).
"""

from __future__ import annotations

import os
from types import ModuleType

ABI = 5  # the extension's ABI constant this code was written for


def _load() -> ModuleType | None:
    if os.environ.get("STM_NO_ACCEL", "").strip() not in ("", "0"):
        return None
    try:
        from stm import _accel  # type: ignore[attr-defined]
    except ImportError:
        return None
    if getattr(_accel, "ABI", None) != ABI:
        return None  # a stale build: ignore it rather than call it wrongly
    return _accel


ext: ModuleType | None = _load()


def available() -> bool:
    """Whether the accelerator is in use."""
    return ext is not None
