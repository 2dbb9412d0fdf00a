"""The rotating and splitting output (``stm.output.PcapngOutput`` over ``PcapngSink``) as a
library: rotation by size and by time with the time passed in, tcpdump's ring buffer and
file names, one output per producer or stream, loss statistics across files, errors. Every
file is read back by our reader, by python-pcapng and, when installed, by tshark."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import oracle_counts

from stm import pcapng
from stm.errors import StmError, UsageError
from stm.output import PcapngOutput, count_width, safe_token, split_name
from stm.pcapng import constants as c
from stm.pcapng.writer import HOST_ORDER
from stm.report import (
    Decoder,
    Encoder,
    Gap,
    PacketBlocks,
    Packets,
    Stream,
    TlvDecoder,
    TlvEncoder,
)
from stm.sink import PcapngSink

ROOT = Path(__file__).parents[1]
SAMPLES = sorted((ROOT / "samples").glob("*.pcap*"))
SIP_UDP = ROOT / "samples" / "sip_udp_ipv4.pcap"  # 11 packets
SIP_TCP = ROOT / "samples" / "sip_tcp_ipv4.pcap"  # 17 packets
TSHARK = shutil.which("tshark")
CAPINFOS = shutil.which("capinfos")
T0 = 1_700_000_000.0  # a wall-clock time to start from


def events(path: Path, producer: str, fmt: str = "A", drop=()):
    """The decoder events for one capture sent by ``producer`` (format A: PacketBlocks in
    the host's byte order; format B: Packets); datagrams whose index is in ``drop`` are
    lost on the way."""
    if fmt == "A":
        enc = Encoder(producer, byte_order=HOST_ORDER, session=7)
        dec = Decoder(raw_byte_order=HOST_ORDER)
        receive = dec.receive_datagram
    else:
        enc = TlvEncoder(producer, session=b"session!")
        dec = TlvDecoder()
        receive = dec.receive_message
    dgrams = []
    for p in pcapng.read(path):
        dgrams += enc.add(p, 0.0)
    dgrams += enc.flush()
    out = []
    for i, d in enumerate(dgrams):
        if i in drop:
            continue
        receive(d, None, 0.0)
        for ev in dec.events():
            if isinstance(ev, Gap):
                out.append(("loss", ev.stream, dec.stats(ev.stream).lost))
            elif isinstance(ev, (Packets, PacketBlocks)):
                out.append(ev)
    return out


def feed(out, evs, on_each=None) -> None:
    for ev in evs:
        if isinstance(ev, PacketBlocks):
            out.write_blocks(ev)
        elif isinstance(ev, Packets):
            out.write(ev.stream, ev.packets, now=T0)
        else:
            out.loss(ev[1], ev[2], now=T0)
        if on_each is not None:
            on_each()


def keys(path) -> list:
    """Every packet of a file as (bytes, original length, exact time)."""
    return [(bytes(p.data), p.origlen, p.time) for p in pcapng.read(path)]


def oracle_count(path) -> int:
    return oracle_counts([path])[0]


def tshark_count(path) -> int:
    r = subprocess.run(
        [TSHARK, "-r", str(path), "-T", "fields", "-e", "frame.number"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return len(r.stdout.split())


def check_files(paths, want) -> None:
    """Each file valid on its own for every reader; all packets there exactly once."""
    got = [keys(p) for p in paths]
    assert oracle_counts(paths) == [len(k) for k in got]
    assert sorted(k for ks in got for k in ks) == sorted(want)


def test_no_limit_writes_one_file_as_before(tmp_path):
    evs = events(SIP_UDP, "amf")
    out = PcapngOutput(str(tmp_path / "out.pcapng"), now=T0)
    feed(out, evs)
    out.close()
    assert out.files == [str(tmp_path / "out.pcapng")]
    assert out.packets == 11 and out.rejected == 0
    assert keys(tmp_path / "out.pcapng") == keys(SIP_UDP)
    assert oracle_count(tmp_path / "out.pcapng") == 11
    if TSHARK:
        assert tshark_count(tmp_path / "out.pcapng") == 11


@pytest.mark.parametrize("fmt", ["A", "B"])
def test_rotation_by_size_keeps_every_file_under_the_limit(tmp_path, fmt):
    limit = 2500
    evs = [ev for s in SAMPLES[1:] for ev in events(s, s.stem, fmt)]  # reports < 1,500 bytes
    out = PcapngOutput(str(tmp_path / "out.pcapng"), now=T0, size_limit=limit)
    sizes = []  # the sink's count of the current file, checked against the disk below

    def note():
        sink = out._single.sink
        sizes.append((out._single.name, sink.size))

    feed(out, evs, note)
    out.close()
    names = out.files
    assert names[:3] == [str(tmp_path / n) for n in ("out.pcapng", "out.pcapng1", "out.pcapng2")]
    assert names == [
        str(tmp_path / ("out.pcapng" + (str(i) if i else ""))) for i in range(len(names))
    ]
    assert len(names) > 5
    last_size = dict(sizes)
    for name in names:
        assert os.path.getsize(name) <= limit
        assert last_size[name] == os.path.getsize(name)  # the sink counts bytes exactly
    check_files(names, [k for s in SAMPLES[1:] for k in keys(s)])
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(n) for n in names)


@pytest.mark.parametrize("fmt", ["A", "B"])
def test_a_write_larger_than_the_limit_gets_a_file_of_its_own(tmp_path, fmt):
    jumbo = ROOT / "samples" / "sip_jumbo_udp_ipv4.pcap"  # 10,625 bytes, then 633 and 367
    out = PcapngOutput(str(tmp_path / "j.pcapng"), now=T0, size_limit=1000)
    feed(out, events(jumbo, "big", fmt))
    out.close()
    check_files(out.files, keys(jumbo))
    assert [len(keys(n)) for n in out.files] == ([1, 2] if fmt == "A" else [1, 1, 1])
    # format A sends the two small packets in one report: one write, kept whole
    assert os.path.getsize(out.files[0]) > 10625
    assert all(os.path.getsize(n) <= 1000 for n in out.files[1:]) == (fmt == "B")


def test_ring_buffer_keeps_the_newest_files(tmp_path):
    src = [k for s in SAMPLES[1:] for k in keys(s)]
    out = PcapngOutput(str(tmp_path / "ring.pcapng"), now=T0, size_limit=2000, max_files=3)
    order = []  # the file each write went to, in time order

    def note():
        if not order or order[-1] != out._single.name:
            order.append(out._single.name)

    feed(out, [ev for s in SAMPLES[1:] for ev in events(s, s.stem)], note)
    out.close()
    assert len(order) > 6  # the ring went round more than twice
    assert sorted(os.listdir(tmp_path)) == ["ring.pcapng0", "ring.pcapng1", "ring.pcapng2"]
    assert order[:4] == [str(tmp_path / f"ring.pcapng{i}") for i in (0, 1, 2, 0)]
    newest = order[-3:]  # oldest to newest of what is left
    got = [k for name in newest for k in keys(name)]
    oracle_counts(newest)
    assert got == src[len(src) - len(got) :]  # the tail of the traffic, in order


def test_count_width_follows_tcpdump():
    assert [count_width(n) for n in (None, 1, 2, 10, 11, 100, 101)] == [0, 0, 1, 1, 2, 2, 3]


def test_ring_names_are_zero_padded_to_the_count(tmp_path):
    out = PcapngOutput(str(tmp_path / "r"), now=T0, size_limit=1000, max_files=11)
    feed(out, events(SIP_TCP, "p"))
    out.close()
    assert out.files[:2] == [str(tmp_path / "r00"), str(tmp_path / "r01")]
    assert all(len(os.path.basename(n)) == 3 for n in out.files)


def test_rotation_by_time_with_strftime_names(tmp_path):
    pattern = str(tmp_path / "cap-%Y%m%d-%H%M%S.pcapng")
    name = lambda t: time.strftime(pattern, time.localtime(t))  # noqa: E731
    out = PcapngOutput(pattern, now=T0, rotate_seconds=60)
    assert out.files == [name(T0)]
    first, second = events(SIP_UDP, "a"), events(SIP_TCP, "b")
    feed(out, first)
    out.maybe_rotate(T0 + 59.9)  # not yet
    assert out.files == [name(T0)]
    out.maybe_rotate(T0 + 61)
    assert out.files == [name(T0), name(T0 + 61)]
    feed(out, second)
    out.maybe_rotate(T0 + 61 + 59)  # periods count from the last rotation, as in tcpdump
    assert len(out.files) == 2
    out.maybe_rotate(T0 + 200)  # a rotation with nothing written: an empty, valid file
    out.close()
    assert out.files == [name(T0), name(T0 + 61), name(T0 + 200)]
    assert keys(name(T0)) == keys(SIP_UDP)
    assert keys(name(T0 + 61)) == keys(SIP_TCP)
    assert keys(name(T0 + 200)) == [] and oracle_count(name(T0 + 200)) == 0
    oracle_counts(out.files)
    if TSHARK:
        assert tshark_count(name(T0 + 61)) == 17


def test_time_with_file_count_stops_after_that_many_files(tmp_path):
    out = PcapngOutput(str(tmp_path / "t-%H%M%S"), now=T0, rotate_seconds=10, max_files=2)
    feed(out, events(SIP_UDP, "a"))
    out.maybe_rotate(T0 + 10)
    assert not out.finished
    feed(out, events(SIP_TCP, "b"))
    out.maybe_rotate(T0 + 20)
    assert out.finished  # tcpdump: "Maximum file limit reached", exit 0
    feed(out, events(SIP_UDP, "c"))  # too late: not written anywhere
    out.close()
    assert len(out.files) == 2 and len(os.listdir(tmp_path)) == 2
    assert out.packets == 28 and out.rejected == 11
    check_files(out.files, keys(SIP_UDP) + keys(SIP_TCP))


def test_time_and_size_restart_the_count_each_period(tmp_path):
    out = PcapngOutput(
        str(tmp_path / "x-%H%M%S.pcapng"), now=T0, rotate_seconds=5, size_limit=2000, max_files=3
    )
    feed(out, events(SIP_TCP, "a"))
    out.maybe_rotate(T0 + 5)
    feed(out, events(SIP_UDP, "b"))
    out.close()
    assert not out.finished  # -W with -C and -G only bounds the count
    base0 = time.strftime(str(tmp_path / "x-%H%M%S.pcapng"), time.localtime(T0))
    base1 = time.strftime(str(tmp_path / "x-%H%M%S.pcapng"), time.localtime(T0 + 5))
    assert base0 + "0" in out.files and base0 + "1" in out.files
    assert base1 + "0" in out.files and base1 + "1" in out.files
    assert all(n[-1] in "012" for n in out.files)
    got = [k for n in sorted(os.listdir(tmp_path)) for k in keys(tmp_path / n)]
    assert len(got) <= 28
    oracle_counts(sorted(tmp_path.iterdir()))


def test_safe_tokens_cannot_escape_or_collide():
    assert safe_token("amf-1.core_a") == "amf-1.core_a"
    bad = ["../../etc/passwd", "a/b", "a_b~x", "", "é", "x" * 65, "/", "..", "a\x00b"]
    tokens = [safe_token(n) for n in bad]
    assert len(set(tokens)) == len(tokens)
    assert split_name("d/out.pcapng", safe_token("..")) == "d/out-...pcapng"  # one name
    assert split_name("d/", safe_token("..")) == "d/-.."
    for t in tokens:
        assert "/" not in t and "\x00" not in t and len(t) <= 64 + 13
        assert split_name("d/out.pcapng", t).startswith("d/out-")
    assert split_name("d/out.pcapng", "amf") == "d/out-amf.pcapng"
    assert split_name("out", "amf") == "out-amf"


@pytest.mark.parametrize("split_by", ["producer", "stream"])
def test_split_by_producer_or_stream(tmp_path, split_by):
    nasty = "../../evil/x"
    out = PcapngOutput(str(tmp_path / "out.pcapng"), now=T0, split_by=split_by, size_limit=3000)
    a, b = events(SIP_UDP, "amf-1"), events(SIP_TCP, nasty, fmt="B")
    mixed = [ev for pair in zip(a, b, strict=False) for ev in pair]
    feed(out, mixed + a[len(b) :] + b[len(a) :])
    out.close()
    assert {os.path.dirname(n) for n in out.files} == {str(tmp_path)}
    names = sorted(os.listdir(tmp_path))
    sa = Stream("amf-1", a[0].stream.key)
    sb = b[0].stream
    if split_by == "producer":
        ta, tb = "amf-1", safe_token(nasty)
    else:
        ta, tb = f"amf-1-{sa.key}", f"{safe_token(nasty)}-{sb.key}"
    assert f"out-{ta}.pcapng" in names and f"out-{tb}.pcapng" in names
    assert all(n.startswith((f"out-{ta}.pcapng", f"out-{tb}.pcapng")) for n in names)
    assert any(n.startswith(f"out-{tb}.pcapng") for n in names)
    mine = lambda t: [tmp_path / n for n in names if n.startswith(f"out-{t}.pcapng")]  # noqa: E731
    check_files(mine(ta), keys(SIP_UDP))
    check_files(mine(tb), keys(SIP_TCP))
    assert not (tmp_path.parent / "evil").exists()


def test_split_outputs_are_bounded(tmp_path):
    out = PcapngOutput(str(tmp_path / "o.pcapng"), now=T0, split_by="producer", max_outputs=2)
    for producer in ("a", "b", "c"):
        feed(out, events(SIP_UDP, producer))
    out.close()
    assert sorted(os.listdir(tmp_path)) == ["o-a.pcapng", "o-b.pcapng"]
    assert out.packets == 22 and out.rejected == 11 and out.rejected_outputs > 0


def test_loss_is_recorded_in_the_file_being_written(tmp_path):
    evs = events(SIP_TCP, "lossy", drop={1, 3})  # of 6 reports
    assert [e for e in evs if isinstance(e, tuple)]
    out = PcapngOutput(str(tmp_path / "l.pcapng"), now=T0, size_limit=2500)
    feed(out, evs)
    out.close()
    drops = []
    for name in out.files:
        for ev in pcapng.read_events(name):
            if isinstance(ev, pcapng.InterfaceStatistics):
                drops.append(dict(ev.options)[c.ISB_IFDROP])
    oracle_counts(out.files)
    assert drops == [1, 2]


def test_statistics_that_do_not_fit_start_the_next_file(tmp_path):
    """The interfaces of the stream are declared again before its ISBs in the new file."""
    files = []

    def next_file():
        files.append(io.BytesIO())
        return files[-1]

    first = io.BytesIO()
    sink = PcapngSink(first, size_limit=10**9, next_file=next_file)
    evs = events(SIP_UDP, "s")
    feed(sink, evs)
    stream = evs[0].stream
    sink.size_limit = sink.size + 20  # room for no ISB
    sink.loss(stream, 5, now=T0)
    sink.close()
    assert len(files) == 1 and sink.size == len(files[0].getvalue())
    evs2 = list(pcapng.read_events(files[0].getvalue()))
    kinds = [type(e).__name__ for e in evs2]
    assert kinds == ["Section", "Interface", "InterfaceStatistics"]
    assert evs2[1].name == f"s/{stream.key}/" + evs2[1].name.split("/")[-1]
    assert keys(first.getvalue()) == keys(SIP_UDP)
    path = tmp_path / "isb.pcapng"
    path.write_bytes(files[0].getvalue())
    assert oracle_count(path) == 0
    if TSHARK:
        assert tshark_count(path) == 0


def test_standard_output(tmp_path):
    buf = io.BytesIO()
    out = PcapngOutput("-", now=T0, stdout=buf)
    feed(out, events(SIP_UDP, "a"))
    out.close()
    assert keys(buf.getvalue()) == keys(SIP_UDP)
    assert not buf.closed
    for kw in ({"size_limit": 10}, {"rotate_seconds": 1}, {"split_by": "producer"}):
        with pytest.raises(UsageError, match="-w -"):
            PcapngOutput("-", now=T0, stdout=buf, **kw)


def test_bad_arguments(tmp_path):
    p = str(tmp_path / "o")
    for kw in (
        {"max_files": 3},
        {"size_limit": 0},
        {"rotate_seconds": 0},
        {"split_by": "nope"},
        {"size_limit": 1, "max_files": 0},
    ):
        with pytest.raises(UsageError):
            PcapngOutput(p, now=T0, **kw)


def test_unwritable_paths_fail_at_start(tmp_path):
    (tmp_path / "file").write_text("")
    for path in ("/nonexistent/dir/x.pcapng", str(tmp_path / "file" / "x"), str(tmp_path)):
        for split in (None, "producer"):
            if split and path == str(tmp_path):
                continue  # a directory is a fine place for split files
            with pytest.raises(UsageError, match="cannot write"):
                PcapngOutput(path, now=T0, split_by=split)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_full_disk_is_a_clear_error():
    out = PcapngOutput("/dev/full", now=T0)
    feed(out, events(SIP_UDP, "a"))
    with pytest.raises(StmError, match="cannot write /dev/full: No space left on device"):
        out.flush()
    out.close()  # after the failure, closing does not raise again


def test_a_file_that_cannot_be_created_later_is_a_clear_error(tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()
    out = PcapngOutput(str(folder / "x.pcapng"), now=T0, size_limit=2000)
    evs = events(SIP_TCP, "a")
    feed(out, evs[:1])
    shutil.rmtree(folder)  # the open file lives on; the next one cannot be created
    with pytest.raises(StmError, match=r"cannot write .*x\.pcapng1: No such file or directory"):
        feed(out, evs[1:])
    assert out.failed
    out.close()  # after the failure, closing does not raise again
