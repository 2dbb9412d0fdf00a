"""claims_only is stream_ids(report) <= allowed, exactly, whatever the payload holds."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from stm.report.ownership import _ID_HEADS, claims_only, stream_ids
from stm.tlv import PROTOCOL_ID

IDS = st.integers(0, 5)  # few IDs, so allowed and claimed sets meet often


@st.composite
def messages(draw):
    chunks = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["id", "payload", "lookalike", "other"]))
        if kind == "id":
            chunks.append(draw(st.sampled_from(_ID_HEADS)) + struct.pack("!I", draw(IDS)))
        else:
            value = draw(st.binary(max_size=30))
            if kind == "lookalike":  # an ID chunk header inside a payload's bytes
                at = draw(st.integers(0, len(value)))
                fake = draw(st.sampled_from(_ID_HEADS)) + struct.pack("!I", draw(IDS))
                value = value[:at] + fake + value[at:]
            vendor, ctype = (0, 0x0F) if kind != "other" else (draw(st.integers(0, 0xFFFF)), 9)
            chunks.append(struct.pack("!HHH", vendor, ctype, 6 + len(value)) + value)
    body = b"".join(chunks)
    data = PROTOCOL_ID + struct.pack("!H", 6 + len(body)) + body
    return data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data


@given(messages(), st.frozensets(IDS))
def test_claims_only_is_exact(report, allowed):
    assert claims_only(report, allowed) == (stream_ids(report) <= allowed)


@given(st.binary(max_size=40), st.frozensets(IDS))
def test_claims_only_on_anything(data, allowed):
    assert claims_only(data, allowed) == (stream_ids(data) <= allowed)
