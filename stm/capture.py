"""Live capture on a Linux interface, as the events ``stm.pcapng.read_events`` yields.

A raw ``AF_PACKET`` socket, with the capture filter compiled to classic BPF and run in the
kernel (``SO_ATTACH_FILTER``), so packets the filter rejects never reach Python. Every
packet comes with the kernel's receive timestamp in nanoseconds (``SO_TIMESTAMPNS``) and
its original length from ``PACKET_AUXDATA`` (the kernel cuts a packet to the snap length
before Python sees it, so the length ``recv`` returns is not the original one). What
libpcap does on Linux, done here as well:

- On the loopback device every packet passes the socket twice, outgoing and incoming:
  the outgoing copy is dropped (in the kernel, by two instructions put before the filter)
  so each packet is captured once.
- The kernel takes the 802.1Q/802.1ad tag out of every received frame before a packet
  socket sees it (and hands it over in ``PACKET_AUXDATA``): the tag is put back, so the
  bytes are those on the wire.
- Interfaces without a link-layer header (tun, WireGuard, IP tunnels) give raw IP
  (``LINKTYPE_RAW``); ``any`` and link types stm does not frame (PPP, ...) are captured
  in cooked mode (``LINKTYPE_LINUX_SLL``), and the filter's offsets are fixed for it.

The filter text is compiled by libpcap, called through ``ctypes`` (as scapy's
``compile_filter`` does, without scapy's import, and with the real snap length: scapy
compiles with 1514, which makes the kernel cut every longer frame). A handle opened on
the interface itself is used where the process may open one, so filters mean what they
mean to tcpdump there (``vlan``, ``inbound``); else a "dead" handle of the link type.
Without libpcap, ``tcpdump -ddd`` is asked instead.

One ``recvmsg`` per packet (~5 us of it the system call and Python's building of the
address), ~8 us a packet in all: 85,000 to 185,000 packets/s on lo on one core of the
2-core test machine, more than signalling needs and below the format A encoder (~280,000).
A ``PACKET_MMAP``/``TPACKET_V3`` ring, with no system call per packet, is the next step
if that is ever too slow.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from stm import __version__
from stm.errors import UsageError
from stm.pcapng import constants as c
from stm.pcapng.records import Interface, Packet, Section
from stm.pcapng.writer import HOST_ORDER

__all__ = ["MAX_SNAPLEN", "LiveCapture", "compile_filter", "live_events"]

MAX_SNAPLEN = 262144  # libpcap's largest
DEFAULT_BUFFER = 8 << 20

# Linux: <linux/if_ether.h>, <linux/if_packet.h>, <linux/filter.h>, <asm-generic/socket.h>.
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_STATISTICS = 6
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS = 35  # also SCM_TIMESTAMPNS; 64-bit and asm-generic architectures
SIOCGIFHWADDR = 0x8927
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
ETH_P_8021Q = 0x8100
SKF_AD_OFF = 0xFFFFF000  # -4096 as an unsigned offset
SKF_AD_PROTOCOL = 0
SKF_AD_PKTTYPE = 4
SKF_AD_IFINDEX = 8
BPF_MAXINSNS = 4096
SLL_HDR_LEN = 16

# BPF opcodes used here.
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06

# ARPHRD_* (<linux/if_arp.h>) -> (pcapng link type, libpcap DLT to compile for).
DLT_RAW = 12  # LINKTYPE_RAW (101) is DLT_RAW, 12 on Linux
DLT_LINUX_SLL = 113
_DIRECT = {
    1: (c.LINKTYPE_ETHERNET, 1),  # ARPHRD_ETHER (bridges, veth, bonds, VLAN devices too)
    772: (c.LINKTYPE_ETHERNET, 1),  # ARPHRD_LOOPBACK: an all-zero Ethernet header
    0xFFFE: (c.LINKTYPE_RAW, DLT_RAW),  # ARPHRD_NONE: tun, WireGuard
    768: (c.LINKTYPE_RAW, DLT_RAW),  # ARPHRD_TUNNEL (ipip)
    769: (c.LINKTYPE_RAW, DLT_RAW),  # ARPHRD_TUNNEL6
    776: (c.LINKTYPE_RAW, DLT_RAW),  # ARPHRD_SIT
}
_COOKED = (c.LINKTYPE_LINUX_SLL, DLT_LINUX_SLL)
ARPHRD_LOOPBACK = 772

_INSN = struct.Struct("=HBBI")  # struct sock_filter
_FPROG = struct.Struct("@HP")  # struct sock_fprog: length, pointer
_TIMESPEC = struct.Struct("@ll")
_AUXDATA = struct.Struct("=IIIHHHH")  # tp_status, tp_len, tp_snaplen, tp_mac, tp_net, tci, tpid
_SLL = struct.Struct("!HHH8sH")
_VLAN = struct.Struct("!HH")
_STATS = struct.Struct("=II")

Insn = tuple[int, int, int, int]  # code, jt, jf, k


class _Flag(Protocol):
    def is_set(self) -> bool: ...


# --- filter compilation -------------------------------------------------------------------


class _BpfInsn(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    )


class _BpfProgram(ctypes.Structure):
    _fields_ = (("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn)))


_pcap_lock = threading.Lock()  # pcap_compile is not thread-safe before libpcap 1.8
_libpcap: ctypes.CDLL | None = None
_libpcap_tried = False


def _load_libpcap() -> ctypes.CDLL | None:
    global _libpcap, _libpcap_tried
    if _libpcap_tried:
        return _libpcap
    _libpcap_tried = True
    # Debian's and most distributions' names first: find_library runs ldconfig.
    for name in ("libpcap.so.1", "libpcap.so.0.8", "libpcap.so", ctypes.util.find_library):
        if callable(name):
            name = name("pcap")
            if name is None:
                break
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        vp, cp = ctypes.c_void_p, ctypes.c_char_p
        lib.pcap_open_dead.argtypes = (ctypes.c_int, ctypes.c_int)
        lib.pcap_open_dead.restype = vp
        lib.pcap_create.argtypes = (cp, cp)
        lib.pcap_create.restype = vp
        lib.pcap_set_snaplen.argtypes = (vp, ctypes.c_int)
        lib.pcap_activate.argtypes = (vp,)
        lib.pcap_datalink.argtypes = (vp,)
        lib.pcap_compile.argtypes = (vp, ctypes.POINTER(_BpfProgram), cp, ctypes.c_int,
                                     ctypes.c_uint32)  # fmt: skip
        lib.pcap_geterr.argtypes = (vp,)
        lib.pcap_geterr.restype = cp
        lib.pcap_freecode.argtypes = (ctypes.POINTER(_BpfProgram),)
        lib.pcap_close.argtypes = (vp,)
        _libpcap = lib
        break
    return _libpcap


def _libpcap_compile(lib: ctypes.CDLL, text: str, dlt: int, snaplen: int, iface: str | None):
    """(instructions, how) from libpcap; UsageError with libpcap's message if it fails."""
    handle, how = None, "libpcap"
    if iface is not None:
        # A live handle, as tcpdump compiles with: kernel-specific code for vlan, inbound...
        errbuf = ctypes.create_string_buffer(256)
        handle = lib.pcap_create(iface.encode(), errbuf)
        if handle:
            lib.pcap_set_snaplen(handle, snaplen)
            if lib.pcap_activate(handle) < 0 or lib.pcap_datalink(handle) != dlt:
                lib.pcap_close(handle)
                handle = None
            else:
                how = "libpcap (live handle)"
    if handle is None:
        handle, how = lib.pcap_open_dead(dlt, snaplen), "libpcap"
        if not handle:
            raise UsageError("libpcap could not open a handle to compile the filter")
    prog = _BpfProgram()
    try:
        if lib.pcap_compile(handle, ctypes.byref(prog), text.encode(), 1, 0xFFFFFFFF) < 0:
            message = (lib.pcap_geterr(handle) or b"").decode(errors="replace")
            raise UsageError(f"bad capture filter {text!r}: {message}")
        insns = [(i.code, i.jt, i.jf, i.k) for i in prog.bf_insns[: prog.bf_len]]
        lib.pcap_freecode(ctypes.byref(prog))
    finally:
        lib.pcap_close(handle)
    return insns, how


_TCPDUMP_DLT = {1: "EN10MB", DLT_RAW: "RAW", DLT_LINUX_SLL: "LINUX_SLL"}


def _tcpdump_compile(tcpdump: str, text: str, dlt: int, snaplen: int) -> list[Insn]:
    cmd = [tcpdump, "-ddd", "-y", _TCPDUMP_DLT[dlt], "-s", str(snaplen), "--", text]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"cannot run tcpdump to compile the filter: {exc}") from None
    if proc.returncode:
        lines = [x for x in proc.stderr.splitlines() if x.strip() and "WARNING" not in x]
        message = lines[-1] if lines else f"tcpdump exited with {proc.returncode}"
        message = message.removeprefix("tcpdump: ")
        raise UsageError(f"bad capture filter {text!r}: {message}")
    try:
        rows = [tuple(int(v) for v in line.split()) for line in proc.stdout.split("\n") if line]
        count, insns = rows[0][0], [r for r in rows[1:]]
        if count != len(insns) or any(len(r) != 4 for r in insns):
            raise ValueError
    except (ValueError, IndexError):
        raise UsageError(f"tcpdump -ddd printed no program for {text!r}") from None
    return insns  # type: ignore[return-value]


def compile_filter(
    text: str, linktype: int = c.LINKTYPE_ETHERNET, snaplen: int = MAX_SNAPLEN, *,
    iface: str | None = None, tcpdump: bool | None = None,
) -> tuple[list[Insn], str]:  # fmt: skip
    """Compile a capture filter for ``linktype`` (a pcapng link type): ``(instructions,
    how)``, each instruction ``(code, jt, jf, k)``, ``how`` naming the compiler.

    libpcap through ctypes, on a handle opened on ``iface`` where allowed, else on a dead
    handle of the link type; ``tcpdump -ddd`` without libpcap (``tcpdump=True`` forces it,
    ``False`` forbids it). A filter that does not compile raises ``UsageError`` with the
    compiler's message. The program accepts ``snaplen`` bytes of a matching packet.
    """
    dlt = DLT_RAW if linktype == c.LINKTYPE_RAW else linktype
    lib = None if tcpdump else _load_libpcap()
    if lib is not None:
        with _pcap_lock:
            return _libpcap_compile(lib, text, dlt, snaplen, iface)
    path = shutil.which("tcpdump") if tcpdump is not False else None
    if path is None or dlt not in _TCPDUMP_DLT:
        raise UsageError(
            "a capture filter needs libpcap (Debian: libpcap0.8) or tcpdump, and neither was found"
        )
    return _tcpdump_compile(path, text, dlt, snaplen), "tcpdump -ddd"


def _fix_cooked(insns: list[Insn], text: str) -> list[Insn]:
    """A program compiled for LINUX_SLL made to run on what a cooked socket's filter sees
    (the packet from its network header on), as libpcap's ``fix_program`` does."""
    out = []
    for code, jt, jf, k in insns:
        cls, mode = code & 0x07, code & 0xE0
        if cls in (0x00, 0x01) and mode in (0x20, 0x40, 0xA0) and k < SKF_AD_OFF:  # LD/LDX
            if k >= SLL_HDR_LEN:
                k -= SLL_HDR_LEN
            elif k == 0:
                k = SKF_AD_OFF + SKF_AD_PKTTYPE
            elif k == 14:
                k = SKF_AD_OFF + SKF_AD_PROTOCOL
            else:
                raise UsageError(
                    f"capture filter {text!r} reads link-layer header fields the kernel "
                    "cannot filter on in cooked mode"
                )
        out.append((code, jt, jf, k))
    return out


def _skip_outgoing(lo_index: int | None) -> list[Insn]:
    """Instructions put first: drop outgoing packets (of interface ``lo_index`` only, or
    of the interface bound to when None); the program proper follows."""
    pkttype = [
        (BPF_LD_W_ABS, 0, 0, SKF_AD_OFF + SKF_AD_PKTTYPE),
        (BPF_JEQ_K, 0, 1, PACKET_OUTGOING),
        (BPF_RET_K, 0, 0, 0),
    ]
    if lo_index is None:
        return pkttype
    return [
        (BPF_LD_W_ABS, 0, 0, SKF_AD_OFF + SKF_AD_IFINDEX),
        (BPF_JEQ_K, 0, 3, lo_index),
        *pkttype,
    ]


def _attach(sock: socket.socket, insns: list[Insn]) -> None:
    code = b"".join(_INSN.pack(*i) for i in insns)
    buf = ctypes.create_string_buffer(code, len(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    _FPROG.pack(len(insns), ctypes.addressof(buf)))  # fmt: skip


# --- the capture --------------------------------------------------------------------------


def _hardware_type(iface: str) -> int:
    """The interface's ARPHRD_* type; UsageError when there is no such interface."""
    try:
        socket.if_nametoindex(iface)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifreq = fcntl.ioctl(s, SIOCGIFHWADDR, struct.pack("16s16x", iface.encode()))
    except (OSError, ValueError, UnicodeError):
        raise UsageError(f"no such interface: {iface}") from None
    return struct.unpack_from("=H", ifreq, 16)[0]


class LiveCapture:
    """A live capture on ``iface`` (a name, or ``any``); everything is checked and the
    socket opened here, so bad arguments fail before the first event is asked for.

    ``events()`` yields a ``Section``, one ``Interface`` and then a ``Packet`` per captured
    frame, until ``stop`` (a ``threading.Event``, or anything with ``is_set``) is set,
    which it notices within ``poll_interval`` seconds; it waits in ``poll``, never spins.
    With ``idle=True`` it also yields ``None`` while no packet comes, at least every
    ``poll_interval`` seconds and when ``wake()`` (a ``time.monotonic`` time or None) is
    due, so a caller can flush what it holds (stm.source.CaptureInput does the same).

    Packets: the frame's bytes (at most ``snaplen``), the kernel's receive time in
    nanoseconds since 1970 (``if_tsresol`` 9), the original length. ``promisc`` puts the
    interface in promiscuous mode while the socket is open; ``buffer_size`` is the socket's
    receive buffer, what absorbs a burst while the consumer is busy (``stats()`` counts
    what the kernel dropped).
    """

    def __init__(
        self,
        iface: str,
        bpf_filter: str | None = None,
        *,
        snaplen: int = MAX_SNAPLEN,
        stop: _Flag | None = None,
        poll_interval: float = 0.1,
        promisc: bool = False,
        buffer_size: int = DEFAULT_BUFFER,
        idle: bool = False,
        wake: Callable[[], float | None] | None = None,
    ) -> None:
        if not 1 <= snaplen <= MAX_SNAPLEN:
            raise UsageError(f"snaplen must be 1 to {MAX_SNAPLEN}, not {snaplen}")
        if not poll_interval > 0:
            raise UsageError("poll_interval must be positive")
        if not hasattr(socket, "AF_PACKET"):
            raise UsageError("live capture needs Linux (AF_PACKET sockets)")
        self.iface = iface
        self.filter = bpf_filter
        self.snaplen = snaplen
        self.stop = stop
        self.poll_interval = poll_interval
        self.idle = idle
        self.wake = wake
        self._received = self._dropped = 0
        any_iface = iface == "any"
        if any_iface:
            if promisc:
                raise UsageError("promiscuous mode cannot be set on the 'any' device")
            linktype, dlt = _COOKED
            try:
                lo_index: int | None = socket.if_nametoindex("lo")
            except OSError:
                lo_index = None
        else:
            hatype = _hardware_type(iface)
            linktype, dlt = _DIRECT.get(hatype, _COOKED)
            lo_index = None
        self.cooked = dlt == DLT_LINUX_SLL

        # Compile before the socket, so a bad filter is told without privileges too.
        self.compiler = None
        if bpf_filter is not None and bpf_filter.strip():
            program, self.compiler = compile_filter(bpf_filter, linktype, snaplen, iface=iface)
            if self.cooked:
                program = _fix_cooked(program, bpf_filter)
        else:
            program = [(BPF_RET_K, 0, 0, snaplen)]
        if any_iface:
            if lo_index is not None:
                program = _skip_outgoing(lo_index) + program
        elif hatype == ARPHRD_LOOPBACK:
            program = _skip_outgoing(None) + program
        if len(program) > BPF_MAXINSNS:
            raise UsageError(
                f"capture filter {bpf_filter!r} compiles to {len(program)} instructions; "
                f"the kernel takes at most {BPF_MAXINSNS}"
            )

        kind = socket.SOCK_DGRAM if self.cooked else socket.SOCK_RAW
        try:
            sock = socket.socket(socket.AF_PACKET, kind, socket.htons(ETH_P_ALL))
        except PermissionError:
            raise UsageError(f"live capture on {iface} needs root or CAP_NET_RAW") from None
        try:
            self._setup(sock, program, any_iface, promisc, buffer_size)
        except BaseException:
            sock.close()
            raise
        self._sock: socket.socket | None = sock

        options: list = [(c.IF_NAME, iface), (c.IF_TSRESOL, 9)]
        if bpf_filter:
            options.append((c.IF_FILTER, b"\0" + bpf_filter.encode()))  # 0: libpcap syntax
        options.append((c.IF_OS, f"{os.uname().sysname} {os.uname().release}"))
        self.section = Section(HOST_ORDER, options=((c.SHB_USERAPPL, f"stm {__version__}"),))
        self.interface = Interface(linktype, snaplen, tuple(options))

    def _setup(self, sock, program, any_iface, promisc, buffer_size) -> None:
        # Nothing before the filter: reject all, bind, empty the queue, then filter.
        _attach(sock, [(BPF_RET_K, 0, 0, 0)])
        if not any_iface:
            try:
                sock.bind((self.iface, ETH_P_ALL))
            except OSError as exc:
                if exc.errno in (errno.ENODEV, errno.ENXIO):
                    raise UsageError(f"no such interface: {self.iface}") from None
                raise
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):  # FORCE passes rmem_max, as root
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, buffer_size)
                break
            except OSError:
                continue
        if promisc:
            index = socket.if_nametoindex(self.iface)
            mreq = struct.pack("=iHH8s", index, PACKET_MR_PROMISC, 0, b"")
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        sock.setblocking(False)
        for _ in range(100_000):
            try:
                sock.recv(1)
            except BlockingIOError:
                break
        try:
            _attach(sock, program)
        except OSError as exc:
            raise UsageError(
                f"the kernel refused capture filter {self.filter!r}: {exc.strerror}"
            ) from None
        sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS.size)  # count from here on

    def stats(self) -> dict[str, int]:
        """Packets the socket has received (passed the filter) and dropped for want of
        buffer space since it was opened, as libpcap's ps_recv and ps_drop."""
        if self._sock is not None:
            got = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS.size)
            packets, drops = _STATS.unpack(got)  # reading resets the kernel's counters
            self._received += packets
            self._dropped += drops
        return {"received": self._received, "dropped": self._dropped}

    def close(self) -> None:
        if self._sock is not None:
            self.stats()
            self._sock.close()
            self._sock = None

    def __enter__(self) -> LiveCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Section | Interface | Packet | None]:
        return self.events()

    def events(self) -> Iterator[Section | Interface | Packet | None]:
        """The events; the socket is closed when this ends (stop, or the iterator closed)."""
        if self._sock is None:
            raise UsageError("this capture is closed")
        try:
            yield self.section
            yield self.interface
            yield from self._packets()
        finally:
            self.close()

    def _packets(self) -> Iterator[Packet | None]:
        sock = self._sock
        assert sock is not None
        snaplen = self.snaplen
        buf = bytearray(snaplen)
        mv = memoryview(buf)
        bufs = [buf]
        recv = sock.recvmsg_into
        ancsize = socket.CMSG_SPACE(_TIMESPEC.size) + socket.CMSG_SPACE(_AUXDATA.size)
        ts_unpack, aux_unpack = _TIMESPEC.unpack, _AUXDATA.unpack
        iface = self.interface
        cooked = self.cooked
        vlan_at = 14 if cooked else 12 if iface.linktype == c.LINKTYPE_ETHERNET else -1
        sll, vlan = _SLL.pack, _VLAN.pack
        time_ns = time.time_ns
        stopped = self.stop.is_set if self.stop is not None else (lambda: False)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poll_ms = max(1, round(self.poll_interval * 1000))
        idle, wake, monotonic = self.idle, self.wake, time.monotonic
        while not stopped():
            try:
                n, anc, _, addr = recv(bufs, ancsize)
            except BlockingIOError:
                timeout = poll_ms
                if wake is not None:
                    due = wake()
                    if due is not None:
                        timeout = min(poll_ms, max(0, int((due - monotonic()) * 1000) + 1))
                if not poller.poll(timeout) and idle:
                    yield None
                continue
            except OSError as exc:
                raise OSError(exc.errno, f"capture on {self.iface}: {exc.strerror}") from None
            ts = origlen = None
            status = 0
            for level, kind, data in anc:
                if kind == SO_TIMESTAMPNS and level == socket.SOL_SOCKET:
                    sec, nsec = ts_unpack(data)
                    ts = sec * 1_000_000_000 + nsec
                elif kind == PACKET_AUXDATA and level == SOL_PACKET:
                    status, origlen, _, _, _, tci, tpid = aux_unpack(data)
            if n > snaplen:
                n = snaplen
            if cooked:
                # sockaddr_ll as Python gives it: (name, protocol, pkttype, hatype, address)
                _, proto, pkttype, hatype, hwaddr = addr
                frame = sll(pkttype, hatype, len(hwaddr), hwaddr, proto) + mv[:n]
                origlen = (n if origlen is None else origlen) + SLL_HDR_LEN
            else:
                frame = bytes(mv[:n])
                if origlen is None:
                    origlen = n
            if status & TP_STATUS_VLAN_VALID and vlan_at >= 0 and len(frame) >= vlan_at:
                if not (tpid or status & TP_STATUS_VLAN_TPID_VALID):
                    tpid = ETH_P_8021Q
                frame = frame[:vlan_at] + vlan(tpid, tci) + frame[vlan_at:]
                origlen += 4
            if len(frame) > snaplen:
                frame = frame[:snaplen]
            yield Packet(iface, time_ns() if ts is None else ts, frame, origlen)


def live_events(
    iface: str,
    bpf_filter: str | None = None,
    *,
    snaplen: int = MAX_SNAPLEN,
    stop: _Flag | None = None,
    poll_interval: float = 0.1,
    **options,
) -> Iterator[Section | Interface | Packet | None]:
    """The events of a live capture on ``iface``, as ``read_events`` gives a file's.

    The socket is opened (and every argument checked: ``UsageError``) before this returns;
    it is closed when the iterator ends or is closed. ``options`` go to ``LiveCapture``.
    """
    capture = LiveCapture(
        iface, bpf_filter, snaplen=snaplen, stop=stop, poll_interval=poll_interval, **options
    )
    return capture.events()
