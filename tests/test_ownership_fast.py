"""claims_only is stream_ids(report) <= allowed, exactly, whatever the payload holds; and so
is the accelerator's claims_only_run (stm._accel), for a list of reports at once."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import stm.accel
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


@st.composite
def gre_reports(draw):
    """Format A's first bytes: the GRE flags (key, checksum present or not) and the key."""
    flags = draw(st.sampled_from([0x2000, 0xA000, 0x0000, 0x8000, draw(st.integers(0, 0xFFFF))]))
    data = struct.pack("!HH", flags, 0x88B5) + draw(st.binary(max_size=12))
    return data[: draw(st.integers(0, len(data)))]


@pytest.mark.skipif(stm.accel.ext is None, reason="stm._accel is not built (or STM_NO_ACCEL)")
@given(
    st.lists(st.one_of(messages(), gre_reports(), st.binary(max_size=40)), max_size=8),
    st.integers(0, 9),
    st.frozensets(IDS),
)
def test_claims_only_run_counts_the_leading_reports_claims_only_takes(reports, start, allowed):
    expected = 0
    for report in reports[start:]:
        if not claims_only(report, allowed):
            break
        expected += 1
    assert stm.accel.ext.claims_only_run(reports, start, allowed) == expected
