"""Helpers shared by several test modules: stm-recv and stm-send as subprocesses on
loopback, and a relay of a capture through our writer."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pcapng as oracle  # python-pcapng, an independent reader

from stm.pcapng import Interface, InterfaceStatistics, Packet, Section, UnknownBlock, Writer


class Receiver:
    """stm-recv in a subprocess, listening on an ephemeral loopback port."""

    def __init__(self, out: Path, *args: str) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stm.cli.recv",
                "--listen",
                "udp://127.0.0.1:0",
                "-w",
                str(out),
                "--json",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stderr.readline()
        match = re.search(r"listening on (udp://\S+)", line)
        assert match, line
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])

    def finish(self, timeout: float = 30) -> dict:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return json.loads(out)

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        return self.finish()


def send(url: str, *files, extra=()) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "stm.cli.send", *map(str, files), "--to", url, "--json", *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def relay(events, byte_order):
    """Copy every event into a new file with our writer, as a lossless relay would."""
    out = io.BytesIO()
    w = None
    for ev in events:
        if isinstance(ev, Section):
            if w is None:
                w = Writer(out, byte_order=byte_order, options=ev.options)
            else:
                w.new_section(ev.options)
        elif isinstance(ev, Interface):
            w.copy_interface(ev)
        elif isinstance(ev, Packet):
            w.write(ev, ev.interface.id)
        elif isinstance(ev, InterfaceStatistics):
            w.write_statistics(ev.interface.id, ev.ts, ev.options)
        elif isinstance(ev, UnknownBlock) and ev.byte_order != byte_order:
            continue
        else:
            w.write_block(ev)
    w.flush()
    return out.getvalue()


def oracle_counts(paths) -> list[int]:
    """Packets per file as python-pcapng counts them, and capinfos (one run for all files,
    fast) when installed: they must agree, and neither may find a file damaged."""
    counts = []
    for path in paths:
        with open(path, "rb") as f:
            scanner = oracle.FileScanner(f)
            counts.append(sum(isinstance(b, oracle.blocks.EnhancedPacket) for b in scanner))
    capinfos = shutil.which("capinfos")
    if capinfos and paths:
        r = subprocess.run(
            [capinfos, "-c", "-M", "-T", "-r", *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert [int(line.split("\t")[-1]) for line in r.stdout.splitlines()] == counts
    return counts
