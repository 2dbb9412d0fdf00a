"""Hypothesis: whatever packets we write, we read back identically."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st

from stm import pcapng
from stm.pcapng import Writer

comments = st.lists(st.text(max_size=20), max_size=3)
packets = st.lists(
    st.tuples(
        st.integers(0, 2),  # interface
        st.integers(0, 2**64 - 1),  # ticks
        st.binary(max_size=200),
        st.integers(0, 1000),  # extra original length
        st.none() | st.integers(0, 2**32 - 1),
        comments,
    ),
    max_size=30,
)
interfaces = st.tuples(
    st.sampled_from([1, 101, 113, 228, 276, 0]),
    st.integers(0, 2**32 - 1),
    st.sampled_from([6, 9, 3, 0x80 | 20, 0x80 | 10]),
    st.integers(-(2**63), 2**63 - 1),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from("<>"), st.lists(interfaces, min_size=3, max_size=3), packets)
def test_written_packets_read_back_identically(bo, ifaces, pkts):
    out = io.BytesIO()
    w = Writer(out, byte_order=bo)
    for linktype, snaplen, tsresol, tsoffset in ifaces:
        w.add_interface(linktype, snaplen, tsresol=tsresol, tsoffset=tsoffset, name="if")
    for ifid, ts, data, extra, flags, notes in pkts:
        w.write_packet(ifid, ts, data, origlen=len(data) + extra, flags=flags, comments=notes)
    w.flush()
    got = list(pcapng.read(out.getvalue()))
    assert len(got) == len(pkts)
    for p, (ifid, ts, data, extra, flags, notes) in zip(got, pkts, strict=False):
        linktype, _, tsresol, tsoffset = ifaces[ifid]
        assert p.interface.id == ifid and p.linktype == linktype
        assert (p.interface.tsresol, p.interface.tsoffset) == (tsresol, tsoffset)
        assert p.ts == ts and bytes(p.data) == data and p.origlen == len(data) + extra
        assert p.flags == flags and list(p.comments) == notes
