//! `stm._accel`: the optional compiled half of stm's report hot paths.
//!
//! Everything here reads bytes that may come from the network, so every read is bounds
//! checked (`get` and explicit length checks; the only `unsafe` is taking a byte slice from
//! a Python buffer while the GIL is held, and writing into a bytearray this code has just
//! grown). The contract with the Python side is narrow and the same for every function: it
//! either returns exactly what the pure-Python code computes for the common case, or `None`,
//! which tells the caller to run the pure-Python path unchanged (which then also says what is
//! wrong, if anything). Streams, sequence accounting, fragments and events stay in Python.

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyList, PyTuple};
use std::collections::HashSet;
use std::io::Cursor;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Bumped whenever a signature changes, so a stale build is ignored rather than misused.
const ABI: u32 = 5;

const HEP3: &[u8; 4] = b"HEP3";
const STM: u16 = 0x5354;
const EPB: u32 = 6;
const MAX_MESSAGE: usize = 0xFFFF;

// -- reading --------------------------------------------------------------------------------

#[inline]
fn be16(d: &[u8], at: usize) -> Option<u16> {
    let s = d.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

#[inline]
fn be32(d: &[u8], at: usize) -> Option<u32> {
    let s = d.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

#[inline]
fn be64(d: &[u8], at: usize) -> Option<u64> {
    let s = d.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_be_bytes(a))
}

#[inline]
fn rd32(d: &[u8], at: usize, big: bool) -> Option<u32> {
    let s = d.get(at..at.checked_add(4)?)?;
    let a = [s[0], s[1], s[2], s[3]];
    Some(if big {
        u32::from_be_bytes(a)
    } else {
        u32::from_le_bytes(a)
    })
}

#[inline]
fn pad4(n: usize) -> usize {
    (4 - (n & 3)) & 3
}

/// Run `f` over the bytes of `obj` (bytes, bytearray, memoryview of bytes); `None` if `obj`
/// is not a contiguous byte buffer.
fn with_bytes<R>(obj: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Some(f(b.as_bytes()));
    }
    let buf = PyBuffer::<u8>::get(obj).ok()?;
    if !buf.is_c_contiguous() || buf.dimensions() > 1 {
        return None;
    }
    let len = buf.item_count();
    let ptr = buf.buf_ptr() as *const u8;
    if len == 0 {
        return Some(f(&[]));
    }
    // SAFETY: the buffer is held (exported) for the duration of `f`, so it cannot be
    // resized or freed, and the GIL is held, so no Python code runs concurrently.
    let slice = unsafe { std::slice::from_raw_parts(ptr, len) };
    Some(f(slice))
}

// -- writing --------------------------------------------------------------------------------

struct Out<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Out<'_> {
    #[inline]
    fn put(&mut self, s: &[u8]) {
        self.buf[self.pos..self.pos + s.len()].copy_from_slice(s);
        self.pos += s.len();
    }
    #[inline]
    fn u8(&mut self, v: u8) {
        self.buf[self.pos] = v;
        self.pos += 1;
    }
    #[inline]
    fn be16(&mut self, v: u16) {
        self.put(&v.to_be_bytes());
    }
    #[inline]
    fn be32(&mut self, v: u32) {
        self.put(&v.to_be_bytes());
    }
    #[inline]
    fn u32o(&mut self, v: u32, big: bool) {
        self.put(&if big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        });
    }
    #[inline]
    fn chunk(&mut self, vendor: u16, ctype: u16, len: usize) {
        self.be16(vendor);
        self.be16(ctype);
        self.be16(len as u16);
    }
    #[inline]
    fn zeros(&mut self, n: usize) {
        self.buf[self.pos..self.pos + n].fill(0);
        self.pos += n;
    }
}

// -- frames.split, exactly ------------------------------------------------------------------

struct Split {
    family: u8,
    proto: u8,
    src: (usize, usize),
    dst: (usize, usize),
    sport: u16,
    dport: u16,
    start: usize,
    end: usize,
}

/// `stm.frames._network_offset`: (IP version, offset of the IP header).
fn network_offset(linktype: u32, d: &[u8]) -> Option<(u8, usize)> {
    let n = d.len();
    let (etype, off) = match linktype {
        1 => {
            let mut off = 12usize;
            while off + 2 <= n {
                let e = be16(d, off)?;
                if e == 0x8100 || e == 0x88A8 || e == 0x9100 {
                    off += 4;
                    continue;
                }
                return match e {
                    0x0800 => Some((4, off + 2)),
                    0x86DD => Some((6, off + 2)),
                    _ => None,
                };
            }
            return None;
        }
        113 if n >= 16 => (be16(d, 14)?, 16),
        276 if n >= 20 => (be16(d, 0)?, 20),
        0 | 108 if n >= 4 => {
            let a = [d[0], d[1], d[2], d[3]];
            let af = if linktype == 0 && d[0] != 0 {
                u32::from_le_bytes(a)
            } else {
                u32::from_be_bytes(a)
            };
            return match af {
                2 => Some((4, 4)),
                10 | 24 | 28 | 30 => Some((6, 4)),
                _ => None,
            };
        }
        101 | 12 | 14 if n >= 1 => {
            let v = d[0] >> 4;
            return if v == 4 || v == 6 { Some((v, 0)) } else { None };
        }
        228 => return Some((4, 0)),
        229 => return Some((6, 0)),
        _ => return None,
    };
    match etype {
        0x0800 => Some((4, off)),
        0x86DD => Some((6, off)),
        _ => None,
    }
}

/// `stm.frames.split`: where the UDP/TCP/SCTP payload of an unfragmented IP packet is.
fn split(linktype: u32, d: &[u8]) -> Option<Split> {
    let (version, mut off) = network_offset(linktype, d)?;
    let n = d.len();
    let proto;
    let src;
    let dst;
    let ip_end;
    if version == 4 {
        if off + 20 > n {
            return None;
        }
        let vhl = d[off];
        let length = be16(d, off + 2)? as usize;
        let frag = be16(d, off + 6)?;
        proto = d[off + 9];
        src = (off + 12, off + 16);
        dst = (off + 16, off + 20);
        let ihl = (vhl & 0x0F) as usize * 4;
        if vhl >> 4 != 4 || ihl < 20 || frag & 0x3FFF != 0 {
            return None;
        }
        ip_end = if length != 0 { off + length } else { n };
        off += ihl;
    } else {
        if off + 40 > n || d[off] >> 4 != 6 {
            return None;
        }
        let mut p = d[off + 6];
        let length = be16(d, off + 4)? as usize;
        ip_end = if length != 0 { off + 40 + length } else { n };
        src = (off + 8, off + 24);
        dst = (off + 24, off + 40);
        off += 40;
        while p == 0 || p == 43 || p == 60 || p == 44 {
            if off + 8 > n {
                return None;
            }
            if p == 44 {
                if be16(d, off + 2)? & 0xFFF9 != 0 {
                    return None;
                }
                p = d[off];
                off += 8;
            } else {
                p = d[off];
                off += (d[off + 1] as usize + 1) * 8;
            }
        }
        proto = p;
    }
    let hlen = match proto {
        17 => 8,
        6 => {
            if off + 13 > n {
                return None;
            }
            let h = (d[off + 12] >> 4) as usize * 4;
            if h < 20 {
                return None;
            }
            h
        }
        132 => 12,
        _ => return None,
    };
    if off + hlen > n {
        return None;
    }
    let sport = be16(d, off)?;
    let dport = be16(d, off + 2)?;
    let start = off + hlen;
    let end = if ip_end >= start { ip_end.min(n) } else { n };
    Some(Split {
        family: version,
        proto,
        src,
        dst,
        sport,
        dport,
        start,
        end,
    })
}

const SIP_STARTS: [&[u8]; 15] = [
    b"SIP/2.0 ",
    b"INVITE ",
    b"ACK ",
    b"BYE ",
    b"CANCEL ",
    b"REGISTER ",
    b"OPTIONS ",
    b"PRACK ",
    b"SUBSCRIBE ",
    b"NOTIFY ",
    b"PUBLISH ",
    b"INFO ",
    b"REFER ",
    b"MESSAGE ",
    b"UPDATE ",
];

/// `stm.frames.hep_protocol_type`: 1 SIP, 0x38 Diameter, else 0.
fn hep_protocol_type(s: &Split, payload: &[u8]) -> u8 {
    let head = &payload[..payload.len().min(10)];
    if s.sport == 5060
        || s.sport == 5061
        || s.dport == 5060
        || s.dport == 5061
        || SIP_STARTS.iter().any(|p| head.starts_with(p))
    {
        return 1;
    }
    if s.sport == 3868 || s.dport == 3868 {
        return 0x38;
    }
    0
}

// -- format B: the fixed-size chunks after the static ones (hep.LAYOUTS) ---------------------

/// Size of the fixed chunks for an address of `a` bytes: 12 chunk headers and their values.
#[inline]
fn layout_size(a: usize) -> usize {
    112 + 2 * a
}

/// The 6-byte chunk headers of the layout, with their offsets, for an address of `a` bytes.
fn layout_headers(a: usize) -> [(usize, u16, u16, u16); 12] {
    let (s, d) = if a == 4 {
        (0x0003, 0x0004)
    } else {
        (0x0005, 0x0006)
    };
    let a6 = 6 + a as u16;
    [
        (0, STM, 0x530A, 10),
        (10, STM, 0x5305, 10),
        (20, STM, 0x5304, 23),
        (43, 0, 0x0009, 10),
        (53, 0, 0x000A, 10),
        (63, 0, 0x0001, 7),
        (70, 0, 0x0002, 7),
        (77, 0, s, a6),
        (83 + a, 0, d, a6),
        (89 + 2 * a, 0, 0x0007, 8),
        (97 + 2 * a, 0, 0x0008, 8),
        (105 + 2 * a, 0, 0x000B, 7),
    ]
}

fn layout_matches(d: &[u8], off: usize, a: usize) -> bool {
    layout_headers(a).iter().all(|&(at, v, t, l)| {
        be16(d, off + at) == Some(v)
            && be16(d, off + at + 2) == Some(t)
            && be16(d, off + at + 4) == Some(l)
    })
}

// -- recent prefixes ------------------------------------------------------------------------

/// The few most recently used prefixes of a decoder (format A's SHB+IDBs, format B's static
/// chunks), in the decoder's order, each with a small integer of metadata. The Python side
/// owns the list and sets it here again whenever it changes.
#[pyclass(module = "stm._accel")]
struct Prefixes {
    items: Vec<(Vec<u8>, u32)>,
}

impl Prefixes {
    #[inline]
    fn find(&self, d: &[u8], at: usize) -> Option<usize> {
        let rest = d.get(at..)?;
        self.items.iter().position(|(p, _)| rest.starts_with(p))
    }
}

/// What a format-B message of ours carries, found by `hep_parse`.
struct HepFast {
    idx: usize,
    seq: u32,
    ts: u64,
    origlen: u32,
    parts: [(usize, usize); 2],
    trailers: Vec<(usize, usize)>,
    flags: Option<u32>,
}

impl HepFast {
    fn frame_len(&self) -> usize {
        self.parts
            .iter()
            .chain(self.trailers.iter())
            .map(|(a, b)| b - a)
            .sum()
    }
    fn write_frame(&self, d: &[u8], out: &mut Out) {
        for &(a, b) in self.parts.iter().chain(self.trailers.iter()) {
            out.put(&d[a..b]);
        }
    }
}

#[pymethods]
impl Prefixes {
    #[new]
    fn new() -> Self {
        Prefixes { items: Vec::new() }
    }

    /// Replace the list: `prefixes[i]` with `meta[i]`.
    fn set(&mut self, prefixes: Vec<Bound<'_, PyBytes>>, meta: Vec<u32>) -> PyResult<()> {
        if prefixes.len() != meta.len() {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "prefixes and meta differ in length",
            ));
        }
        self.items = prefixes
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .zip(meta)
            .collect();
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.items.len()
    }

    /// Format A as a relay takes it (``Decoder.receive_datagram`` with ``raw_byte_order``):
    /// a GRE header with key and sequence only, the protocol type ``ptype`` (any if < 0), a
    /// known SHB+IDB prefix (meta: ``number of interfaces << 1 | big-endian``), then only
    /// EPBs without options whose framing checks out. Returns (prefix index, key, sequence,
    /// offset of the first EPB, number of EPBs), or None for anything else.
    fn gre_run(
        &self,
        data: &Bound<'_, PyAny>,
        ptype: i64,
    ) -> Option<(usize, u32, u32, usize, usize)> {
        let b = data.cast::<PyBytes>().ok()?;
        let d = b.as_bytes();
        let n = d.len();
        if n < 12 || d[0] != 0x30 || d[1] != 0 {
            return None;
        }
        if ptype >= 0 && be16(d, 2)? as i64 != ptype {
            return None;
        }
        let key = be32(d, 4)?;
        let seq = be32(d, 8)?;
        let idx = self.find(d, 12)?;
        let (prefix, meta) = &self.items[idx];
        let big = meta & 1 == 1;
        let nif = (meta >> 1) as u64;
        let first = 12 + prefix.len();
        let mut off = first;
        let mut count = 0usize;
        while off < n {
            if off + 28 > n {
                return None;
            }
            let btype = rd32(d, off, big)?;
            let blen = rd32(d, off + 4, big)? as usize;
            let ifid = rd32(d, off + 8, big)? as u64;
            let caplen = rd32(d, off + 20, big)? as usize;
            if btype != EPB || ifid >= nif {
                return None;
            }
            let end = off.checked_add(blen)?;
            if end > n
                || blen != 32 + caplen + pad4(caplen)
                || rd32(d, end - 4, big)? as usize != blen
            {
                return None; // options, or anything odd: the Python path decides
            }
            off = end;
            count += 1;
        }
        Some((idx, key, seq, first, count))
    }

    /// Format B, one message of ours (``TlvDecoder._fast``) without comments or packet
    /// options: a known static prefix (``HEP3``, length, static chunks), the fixed chunks of
    /// an IPv4 or IPv6 packet, frame header, payload, then only trailers and flags.
    ///
    /// ``epb`` 0: returns (prefix index, sequence, ts, original length, frame, flags);
    /// 1 or 2: (prefix index, sequence, EPB) with the EPB on interface 0, little- (1) or
    /// big-endian (2), byte for byte what ``Writer.write_packet`` makes of that packet.
    /// None for anything else.
    fn hep_fast<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
        epb: u8,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let Ok(b) = data.cast::<PyBytes>() else {
            return Ok(None);
        };
        let d = b.as_bytes();
        let Some(m) = self.hep_parse(d) else {
            return Ok(None);
        };
        hep_result(py, d, &m, epb).map(Some)
    }

    /// ``hep_fast`` in EPB mode (``epb`` 1 or 2) over a list of messages, grouped into runs:
    /// consecutive messages it takes with the same prefix whose sequence numbers follow one
    /// another (mod 2^32). For each run, (prefix index, first sequence, count, the EPBs one
    /// after the other, length of the first EPB, bytes of all its messages, length of the
    /// first message); None for each message it does not take; in the messages' order.
    fn hep_fast_runs<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyList>,
        epb: u8,
    ) -> PyResult<Bound<'py, PyList>> {
        let big = epb == 2;
        let items: Vec<Bound<'py, PyAny>> = messages.iter().collect();
        let parsed: Vec<Option<(&[u8], HepFast)>> = items
            .iter()
            .map(|item| {
                let b = item.cast::<PyBytes>().ok()?;
                let d = b.as_bytes();
                self.hep_parse(d).map(|m| (d, m))
            })
            .collect();
        let out = PyList::empty(py);
        let mut i = 0;
        while i < parsed.len() {
            let Some((_, first)) = &parsed[i] else {
                out.append(py.None())?;
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < parsed.len() {
                match &parsed[j] {
                    Some((_, m))
                        if m.idx == first.idx
                            && m.seq == first.seq.wrapping_add((j - i) as u32) =>
                    {
                        j += 1
                    }
                    _ => break,
                }
            }
            let run = &parsed[i..j];
            let size: usize = run.iter().flatten().map(|(_, m)| epb_size(m)).sum();
            let nbytes: usize = run.iter().flatten().map(|(d, _)| d.len()).sum();
            let blob = PyBytes::new_with(py, size, |buf| {
                let mut o = Out { buf, pos: 0 };
                for (d, m) in run.iter().flatten() {
                    write_epb(&mut o, d, m, big);
                }
                Ok(())
            })?;
            let first_msg = run[0].as_ref().map_or(0, |(d, _)| d.len());
            let item = (
                first.idx,
                first.seq,
                j - i,
                blob,
                epb_size(first),
                nbytes,
                first_msg,
            );
            out.append(item.into_pyobject(py)?)?;
            i = j;
        }
        Ok(out)
    }

    /// ``hep_fast`` over a list of messages: a list of its results (tuple or None).
    fn hep_fast_many<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyList>,
        epb: u8,
    ) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for item in messages.iter() {
            let r = match item.cast::<PyBytes>() {
                Ok(b) => {
                    let d = b.as_bytes();
                    match self.hep_parse(d) {
                        Some(m) => Some(hep_result(py, d, &m, epb)?),
                        None => None,
                    }
                }
                Err(_) => None,
            };
            out.append(r)?;
        }
        Ok(out)
    }
}

impl Prefixes {
    fn hep_parse(&self, d: &[u8]) -> Option<HepFast> {
        let n = d.len();
        if n < 6 || &d[..4] != HEP3 || be16(d, 4)? as usize != n {
            return None;
        }
        let idx = self.find(d, 6)?;
        let off = 6 + self.items[idx].0.len();
        let mut end = 0usize;
        let mut found = false;
        for a in [4usize, 16] {
            end = off + layout_size(a);
            if end + 12 <= n && layout_matches(d, off, a) {
                found = true;
                break;
            }
        }
        if !found {
            return None;
        }
        let seq = be32(d, off + 6)?;
        let origlen = be32(d, off + 16)?;
        let ts = be64(d, off + 27)?;
        // the frame header chunk, then the payload chunk
        if be16(d, end)? != STM || be16(d, end + 2)? != 0x5301 {
            return None;
        }
        let flen = be16(d, end + 4)? as usize;
        if flen < 6 {
            return None;
        }
        let pos = end + flen;
        if pos + 6 > n {
            return None;
        }
        let plen = be16(d, pos + 4)? as usize;
        if be16(d, pos)? != 0 || be16(d, pos + 2)? != 0x000F || plen < 6 || pos + plen > n {
            return None;
        }
        let mut m = HepFast {
            idx,
            seq,
            ts,
            origlen,
            parts: [(end + 6, end + flen), (pos + 6, pos + plen)],
            trailers: Vec::new(),
            flags: None,
        };
        let mut p = pos + plen;
        while p < n {
            if p + 6 > n {
                return None;
            }
            let vendor = be16(d, p)?;
            let ctype = be16(d, p + 2)?;
            let clen = be16(d, p + 4)? as usize;
            if vendor != STM || clen < 6 || p + clen > n {
                return None;
            }
            match ctype {
                0x530E => m.trailers.push((p + 6, p + clen)),
                0x530C if clen == 10 => m.flags = Some(be32(d, p + 6)?),
                _ => return None, // comments, packet options (the Python path), anything else
            }
            p += clen;
        }
        Some(m)
    }
}

/// The size of the EPB ``write_epb`` makes of a message.
fn epb_size(m: &HepFast) -> usize {
    let caplen = m.frame_len();
    32 + caplen + pad4(caplen) + if m.flags.is_some() { 12 } else { 0 }
}

/// The packet of a message as an EPB on interface 0: what ``Writer.write_packet`` writes.
fn write_epb(o: &mut Out, d: &[u8], m: &HepFast, big: bool) {
    let caplen = m.frame_len();
    let total = epb_size(m) as u32;
    o.u32o(EPB, big);
    o.u32o(total, big);
    o.u32o(0, big);
    o.u32o((m.ts >> 32) as u32, big);
    o.u32o(m.ts as u32, big);
    o.u32o(caplen as u32, big);
    o.u32o(m.origlen, big);
    m.write_frame(d, o);
    o.zeros(pad4(caplen));
    if let Some(flags) = m.flags {
        // encode_options([(EPB_FLAGS, flags)]): code 2, length 4, value, opt_endofopt
        let (code, len) = if big {
            (2u16.to_be_bytes(), 4u16.to_be_bytes())
        } else {
            (2u16.to_le_bytes(), 4u16.to_le_bytes())
        };
        o.put(&code);
        o.put(&len);
        o.u32o(flags, big);
        o.zeros(4);
    }
    o.u32o(total, big);
}

fn hep_result<'py>(
    py: Python<'py>,
    d: &[u8],
    m: &HepFast,
    epb: u8,
) -> PyResult<Bound<'py, PyTuple>> {
    let caplen = m.frame_len();
    if epb == 0 {
        let frame = PyBytes::new_with(py, caplen, |buf| {
            m.write_frame(d, &mut Out { buf, pos: 0 });
            Ok(())
        })?;
        return (m.idx, m.seq, m.ts, m.origlen, frame, m.flags).into_pyobject(py);
    }
    let big = epb == 2;
    let total = epb_size(m);
    let block = PyBytes::new_with(py, total, |buf| {
        write_epb(&mut Out { buf, pos: 0 }, d, m, big);
        Ok(())
    })?;
    (m.idx, m.seq, block).into_pyobject(py)
}

// -- format B encoding ----------------------------------------------------------------------

/// What ``TlvEncoder`` needs of one interface: its static chunks and timestamp parameters.
#[pyclass(module = "stm._accel", frozen)]
struct HepInterface {
    stat: Vec<u8>,
    linktype: u32,
    tsresol: u8,
    tsoffset: i64,
    units: u64,
}

#[pymethods]
impl HepInterface {
    #[new]
    fn new(
        stat: &Bound<'_, PyBytes>,
        linktype: u32,
        tsresol: u8,
        tsoffset: i64,
        units: u64,
    ) -> PyResult<Self> {
        if units == 0 {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "units must be positive",
            ));
        }
        Ok(HepInterface {
            stat: stat.as_bytes().to_vec(),
            linktype,
            tsresol,
            tsoffset,
            units,
        })
    }
}

/// The message ``TlvEncoder._encode`` makes of an IP packet with a timestamp and no flags,
/// comments or options, if it fits ``budget``; None otherwise.
fn hep_encode<'py>(
    py: Python<'py>,
    ifc: &HepInterface,
    seq: u32,
    ts: u64,
    origlen: u32,
    d: &[u8],
    budget: usize,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let Some(s) = split(ifc.linktype, d) else {
        return Ok(None);
    };
    let (start, end, n) = (s.start, s.end, d.len());
    let a = if s.family == 4 { 4 } else { 16 };
    let fh = 6 + start;
    let pl = 6 + (end - start);
    let tr = if end < n { 6 + (n - end) } else { 0 };
    if fh > MAX_MESSAGE || pl > MAX_MESSAGE || tr > MAX_MESSAGE {
        return Ok(None);
    }
    let total = 6 + ifc.stat.len() + layout_size(a) + fh + pl + tr;
    if total > MAX_MESSAGE || total > budget {
        return Ok(None);
    }
    let units = ifc.units as u128;
    let sec = (ts as u128 / units) as i128 + ifc.tsoffset as i128;
    let sec = sec.clamp(0, 0xFFFF_FFFF) as u32;
    let usec = ((ts as u128 % units) * 1_000_000 / units) as u32;
    let payload = &d[start..end];
    let ptype = hep_protocol_type(&s, payload);
    let msg = PyBytes::new_with(py, total, |buf| {
        let mut o = Out { buf, pos: 0 };
        o.put(HEP3);
        o.be16(total as u16);
        o.put(&ifc.stat);
        o.chunk(STM, 0x530A, 10);
        o.be32(seq);
        o.chunk(STM, 0x5305, 10);
        o.be32(origlen);
        o.chunk(STM, 0x5304, 23);
        o.u8(ifc.tsresol);
        o.put(&ts.to_be_bytes());
        o.put(&ifc.tsoffset.to_be_bytes());
        o.chunk(0, 0x0009, 10);
        o.be32(sec);
        o.chunk(0, 0x000A, 10);
        o.be32(usec);
        o.chunk(0, 0x0001, 7);
        o.u8(if s.family == 4 { 2 } else { 10 });
        o.chunk(0, 0x0002, 7);
        o.u8(s.proto);
        let (sc, dc) = if a == 4 {
            (0x0003, 0x0004)
        } else {
            (0x0005, 0x0006)
        };
        o.chunk(0, sc, 6 + a);
        o.put(&d[s.src.0..s.src.1]);
        o.chunk(0, dc, 6 + a);
        o.put(&d[s.dst.0..s.dst.1]);
        o.chunk(0, 0x0007, 8);
        o.be16(s.sport);
        o.chunk(0, 0x0008, 8);
        o.be16(s.dport);
        o.chunk(0, 0x000B, 7);
        o.u8(ptype);
        o.chunk(STM, 0x5301, fh);
        o.put(&d[..start]);
        o.chunk(0, 0x000F, pl);
        o.put(payload);
        if tr != 0 {
            o.chunk(STM, 0x530E, tr);
            o.put(&d[end..]);
        }
        debug_assert_eq!(o.pos, total);
        Ok(())
    })?;
    Ok(Some(msg))
}

/// One packet (``TlvEncoder.add``'s common case): the message, or None.
#[pyfunction]
fn hep_encode_packet<'py>(
    py: Python<'py>,
    ifc: PyRef<'py, HepInterface>,
    seq: u32,
    ts: &Bound<'py, PyAny>,
    origlen: &Bound<'py, PyAny>,
    data: &Bound<'py, PyAny>,
    budget: usize,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let (Ok(ts), Ok(origlen)) = (ts.extract::<u64>(), origlen.extract::<u32>()) else {
        return Ok(None);
    };
    match with_bytes(data, |d| hep_encode(py, &ifc, seq, ts, origlen, d, budget)) {
        Some(r) => r,
        None => Ok(None),
    }
}

/// A run of packet blocks (``TlvEncoder.add_raw``): from ``off``, every EPB without options
/// on an interface with a ``HepInterface`` (``ifaces[interface ID]``, None for others) whose
/// message fits ``budget``, numbered from ``seq``. Stops at the first block that is anything
/// else. Returns (messages, offset where it stopped, their total bytes).
#[pyfunction]
fn hep_encode_run<'py>(
    py: Python<'py>,
    ifaces: Vec<Option<PyRef<'py, HepInterface>>>,
    data: &Bound<'py, PyAny>,
    off: usize,
    big: bool,
    seq: u32,
    budget: usize,
) -> PyResult<(Bound<'py, PyList>, usize, usize)> {
    let out = PyList::empty(py);
    let r = with_bytes(data, |d| -> PyResult<(usize, usize)> {
        let n = d.len();
        let mut off = off;
        let mut seq = seq;
        let mut nbytes = 0usize;
        while off < n {
            if off + 28 > n {
                break;
            }
            let (
                Some(btype),
                Some(blen),
                Some(ifid),
                Some(hi),
                Some(lo),
                Some(caplen),
                Some(origlen),
            ) = (
                rd32(d, off, big),
                rd32(d, off + 4, big),
                rd32(d, off + 8, big),
                rd32(d, off + 12, big),
                rd32(d, off + 16, big),
                rd32(d, off + 20, big),
                rd32(d, off + 24, big),
            )
            else {
                break;
            };
            let (blen, caplen) = (blen as usize, caplen as usize);
            if btype != EPB || blen != 32 + caplen + pad4(caplen) || off + blen > n {
                break;
            }
            if rd32(d, off + blen - 4, big) != Some(blen as u32) {
                break;
            }
            let Some(Some(ifc)) = ifaces.get(ifid as usize) else {
                break;
            };
            let ts = (hi as u64) << 32 | lo as u64;
            match hep_encode(
                py,
                ifc,
                seq,
                ts,
                origlen,
                &d[off + 28..off + 28 + caplen],
                budget,
            )? {
                Some(msg) => {
                    nbytes += msg.as_bytes().len();
                    out.append(msg)?;
                }
                None => break,
            }
            seq = seq.wrapping_add(1);
            off += blen;
        }
        Ok((off, nbytes))
    });
    match r {
        Some(res) => {
            let (stop, nbytes) = res?;
            Ok((out, stop, nbytes))
        }
        None => Ok((out, off, 0)),
    }
}

// -- pcapng output --------------------------------------------------------------------------

/// ``Writer.copy_epbs``: append the EPBs in ``data[start:]`` to ``out`` with interface IDs
/// renumbered by ``ids`` (None: leave that interface's packets out). Returns how many were
/// written, or None (nothing appended) when the blocks do not frame exactly.
#[pyfunction]
fn copy_epbs(
    out: &Bound<'_, PyByteArray>,
    data: &Bound<'_, PyAny>,
    start: usize,
    ids: Vec<Option<u32>>,
    big: bool,
) -> PyResult<Option<usize>> {
    let Ok(b) = data.cast::<PyBytes>() else {
        return Ok(None);
    };
    let d = b.as_bytes();
    let n = d.len();
    // First pass: check the framing and size what is copied.
    let mut off = start;
    let mut size = 0usize;
    let mut written = 0usize;
    while off < n {
        let (Some(blen), Some(ifid)) = (rd32(d, off + 4, big), rd32(d, off + 8, big)) else {
            return Ok(None);
        };
        let blen = blen as usize;
        if blen < 12 || off + blen > n {
            return Ok(None);
        }
        let Some(new) = ids.get(ifid as usize) else {
            return Ok(None);
        };
        if new.is_some() {
            size += blen;
            written += 1;
        }
        off += blen;
    }
    if off != n || start > n {
        return Ok(None);
    }
    let old = out.len();
    out.resize(old + size)?;
    // SAFETY: the bytearray was just resized to hold `size` more bytes; no Python code runs
    // between here and the end of the copy, so it cannot be resized or freed meanwhile.
    let dst = unsafe { out.as_bytes_mut() };
    let mut o = Out {
        buf: &mut dst[old..],
        pos: 0,
    };
    let mut off = start;
    while off < n {
        let blen = rd32(d, off + 4, big).unwrap_or(0) as usize;
        let ifid = rd32(d, off + 8, big).unwrap_or(0) as usize;
        if let Some(Some(new)) = ids.get(ifid) {
            o.put(&d[off..off + 8]);
            o.u32o(*new, big);
            o.put(&d[off + 12..off + blen]);
        }
        off += blen;
    }
    Ok(Some(written))
}

/// ``Writer.write_packet``'s common case: append an EPB without options to ``out``.
/// False (nothing appended) when ``ts`` is not a u64, ``origlen`` not a u32 or ``data`` not
/// a byte buffer: the Python path then says what is wrong.
#[pyfunction]
fn epb_append(
    out: &Bound<'_, PyByteArray>,
    big: bool,
    ifid: u32,
    ts: &Bound<'_, PyAny>,
    data: &Bound<'_, PyAny>,
    origlen: &Bound<'_, PyAny>,
) -> PyResult<bool> {
    let (Ok(ts), Ok(origlen)) = (ts.extract::<u64>(), origlen.extract::<u32>()) else {
        return Ok(false);
    };
    let r = with_bytes(data, |d| -> PyResult<bool> {
        let n = d.len();
        let total = 32 + n + pad4(n);
        if total > u32::MAX as usize {
            return Ok(false);
        }
        let old = out.len();
        out.resize(old + total)?;
        // SAFETY: just resized to hold `total` more bytes; no Python code runs until the
        // copy is done, so the bytearray cannot be resized or freed meanwhile.
        let dst = unsafe { out.as_bytes_mut() };
        let mut o = Out {
            buf: &mut dst[old..],
            pos: 0,
        };
        o.u32o(EPB, big);
        o.u32o(total as u32, big);
        o.u32o(ifid, big);
        o.u32o((ts >> 32) as u32, big);
        o.u32o(ts as u32, big);
        o.u32o(n as u32, big);
        o.u32o(origlen, big);
        o.put(d);
        o.zeros(pad4(n));
        o.u32o(total as u32, big);
        Ok(true)
    });
    r.unwrap_or(Ok(false))
}

// -- format B over a byte stream ------------------------------------------------------------

/// ``TlvFramer``'s common case: from ``pos`` in ``buf``, every complete message whose header
/// is sound (``HEP3``, a length of 6 to ``max``), at most ``limit`` of them, as bytes.
/// Returns (messages, offset after the last one); it stops before anything else, which the
/// Python framer then handles (and reports) as before.
#[pyfunction]
fn hep_frames<'py>(
    py: Python<'py>,
    buf: &Bound<'py, PyAny>,
    pos: usize,
    max: usize,
    limit: usize,
) -> PyResult<(Bound<'py, PyList>, usize)> {
    let out = PyList::empty(py);
    let r = with_bytes(buf, |d| -> PyResult<usize> {
        let n = d.len();
        let mut pos = pos;
        let mut k = 0;
        while k < limit && pos < n && n - pos >= 6 {
            if &d[pos..pos + 4] != HEP3 {
                break;
            }
            let total = be16(d, pos + 4).unwrap_or(0) as usize;
            if total < 6 || total > max || n - pos < total {
                break;
            }
            out.append(PyBytes::new(py, &d[pos..pos + total]))?;
            pos += total;
            k += 1;
        }
        Ok(pos)
    });
    match r {
        Some(p) => Ok((out, p?)),
        None => Ok((out, pos)),
    }
}

/// ``frames.split`` (for tests): (family, proto, src, dst, sport, dport, start, end) or None.
#[pyfunction]
fn frame_split<'py>(
    py: Python<'py>,
    linktype: u32,
    data: &Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, PyTuple>>> {
    let r = with_bytes(data, |d| {
        split(linktype, d).map(|s| {
            (
                s.family,
                s.proto,
                PyBytes::new(py, &d[s.src.0..s.src.1]),
                PyBytes::new(py, &d[s.dst.0..s.dst.1]),
                s.sport,
                s.dport,
                s.start,
                s.end,
            )
        })
    });
    match r.flatten() {
        Some(t) => Ok(Some(t.into_pyobject(py)?)),
        None => Ok(None),
    }
}

// -- WebSocket data frames (stm.transport.websocket) ----------------------------------------
//
// The frame headers are tungstenite's (`FrameHeader::parse` and `format`); only the XOR with
// the 4-byte masking key (RFC 6455 section 5.3) is done here, as tungstenite keeps its own
// private. Everything that is not a plain report frame is left to the websockets library.

/// RFC 6455 section 5.3: ``dst[i] = src[i] ^ key[i % 4]``.
#[inline]
fn xor_mask(dst: &mut [u8], src: &[u8], key: [u8; 4]) {
    let word = u32::from_ne_bytes(key);
    let mut d = dst.chunks_exact_mut(4);
    let mut s = src.chunks_exact(4);
    for (o, i) in (&mut d).zip(&mut s) {
        let v = u32::from_ne_bytes([i[0], i[1], i[2], i[3]]) ^ word;
        o.copy_from_slice(&v.to_ne_bytes());
    }
    for (n, (o, i)) in d.into_remainder().iter_mut().zip(s.remainder()).enumerate() {
        *o = i ^ key[n];
    }
}

fn binary_header(mask: [u8; 4]) -> FrameHeader {
    FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode: OpCode::Data(Data::Binary),
        mask: Some(mask),
    }
}

/// A client's frames for ``reports``: each one final binary frame, masked with a fresh
/// random key (what websockets' ``send_binary`` writes, but for the key). None if a report
/// is not bytes.
#[pyfunction]
fn ws_client_frames<'py>(
    py: Python<'py>,
    reports: &Bound<'py, PyList>,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let mut parts: Vec<Bound<'py, PyBytes>> = Vec::with_capacity(reports.len());
    let mut total = 0usize;
    for item in reports.iter() {
        let Ok(b) = item.cast_into::<PyBytes>() else {
            return Ok(None);
        };
        let n = b.as_bytes().len();
        total += binary_header([0; 4]).len(n as u64) + n;
        parts.push(b);
    }
    let blob = PyBytes::new_with(py, total, |buf| {
        let mut pos = 0;
        for b in &parts {
            let data = b.as_bytes();
            let key: [u8; 4] = rand::random();
            let header = binary_header(key);
            let hlen = header.len(data.len() as u64);
            let mut w = &mut buf[pos..pos + hlen];
            header
                .format(data.len() as u64, &mut w)
                .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
            pos += hlen;
            xor_mask(&mut buf[pos..pos + data.len()], data, key);
            pos += data.len();
        }
        Ok(())
    })?;
    Ok(Some(blob))
}

/// A server's reading of ``data[start:]``: ``(payloads, end, next)``. ``payloads`` are
/// those of the complete, final, masked binary frames without reserved bits and of at
/// most ``max_size`` bytes from ``start`` on, unmasked; ``end`` is where they stop. There,
/// ``next`` says what follows: -1 the end of ``data`` or a frame header not complete yet;
/// a length L > 0, the whole length of the frame at ``end``: such a binary frame not
/// complete yet, or a Ping or Pong frame (complete or not) for the websockets library; -2
/// anything else, which websockets must see with everything after it.
#[pyfunction]
fn ws_server_frames<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyBytes>,
    start: usize,
    max_size: usize,
) -> PyResult<(Bound<'py, PyList>, usize, i64)> {
    let d = data.as_bytes();
    let out = PyList::empty(py);
    let mut pos = start.min(d.len());
    let next = loop {
        if pos >= d.len() {
            break -1;
        }
        let mut cursor = Cursor::new(&d[pos..]);
        let (header, length) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(h)) => h,
            Ok(None) => break -1,
            Err(_) => break -2,
        };
        let plain = header.is_final && !header.rsv1 && !header.rsv2 && !header.rsv3;
        let Some(key) = header.mask else { break -2 };
        let body = pos + cursor.position() as usize;
        match header.opcode {
            OpCode::Data(Data::Binary) if plain && length <= max_size as u64 => {
                let end = match body.checked_add(length as usize) {
                    Some(end) if end <= d.len() => end,
                    // not complete yet: how long it is (so the caller waits for all of it)
                    Some(end) => break i64::try_from(end - pos).unwrap_or(-1),
                    None => break -1,
                };
                let payload = PyBytes::new_with(py, length as usize, |buf| {
                    xor_mask(buf, &d[body..end], key);
                    Ok(())
                })?;
                out.append(payload)?;
                pos = end;
            }
            OpCode::Control(Control::Ping | Control::Pong) if plain && length <= 125 => {
                break (body - pos) as i64 + length as i64;
            }
            _ => break -2,
        }
    };
    Ok((out, pos, next))
}

// -- stream ownership (stm.report.ownership) -----------------------------------------------

const STREAM_ID: u16 = 0x5309; // StmChunk.STREAM_ID
const CAPTURE_ID: u16 = 0x000C; // HepChunk.CAPTURE_ID (vendor 0)

/// ``stream_ids(report) <= allowed`` of ``stm.report.ownership``, for one report.
fn claims_only_one(d: &[u8], allowed: &HashSet<u32>) -> bool {
    if d.len() >= 4 && &d[..4] == HEP3 {
        let mut end = d.len();
        if end >= 6 {
            end = end.min(be16(d, 4).unwrap_or(0) as usize);
        }
        let mut pos = 6;
        while pos + 6 <= end {
            let (Some(vendor), Some(ctype), Some(length)) =
                (be16(d, pos), be16(d, pos + 2), be16(d, pos + 4))
            else {
                break;
            };
            let length = length as usize;
            if length < 6 || pos + length > end {
                break;
            }
            let names_id =
                (vendor == STM && ctype == STREAM_ID) || (vendor == 0 && ctype == CAPTURE_ID);
            if names_id && length == 10 {
                match be32(d, pos + 6) {
                    Some(id) if allowed.contains(&id) => {}
                    _ => return false,
                }
            }
            pos += length;
        }
        return true;
    }
    let Some(flags) = be16(d, 0) else { return true };
    if flags & 0x2000 == 0 {
        return true; // no key: no stream ID
    }
    let at = if flags & 0x8000 != 0 { 8 } else { 4 };
    match be32(d, at) {
        Some(id) => allowed.contains(&id),
        None => true,
    }
}

/// How many of ``reports[start:]``, from the first on, are bytes that claim only stream
/// IDs in ``allowed`` (``claims_only`` true for each): the Python code looks at the next.
#[pyfunction]
fn claims_only_run(reports: &Bound<'_, PyList>, start: usize, allowed: HashSet<u32>) -> usize {
    let mut n = 0;
    for item in reports.iter().skip(start) {
        match item.cast::<PyBytes>() {
            Ok(b) if claims_only_one(b.as_bytes(), &allowed) => n += 1,
            _ => break,
        }
    }
    n
}

#[pymodule]
fn _accel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ABI", ABI)?;
    m.add_class::<Prefixes>()?;
    m.add_class::<HepInterface>()?;
    m.add_function(wrap_pyfunction!(hep_encode_packet, m)?)?;
    m.add_function(wrap_pyfunction!(hep_encode_run, m)?)?;
    m.add_function(wrap_pyfunction!(copy_epbs, m)?)?;
    m.add_function(wrap_pyfunction!(epb_append, m)?)?;
    m.add_function(wrap_pyfunction!(hep_frames, m)?)?;
    m.add_function(wrap_pyfunction!(frame_split, m)?)?;
    m.add_function(wrap_pyfunction!(ws_client_frames, m)?)?;
    m.add_function(wrap_pyfunction!(ws_server_frames, m)?)?;
    m.add_function(wrap_pyfunction!(claims_only_run, m)?)?;
    Ok(())
}
