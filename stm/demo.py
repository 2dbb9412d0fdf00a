"""The README's main job: send the bundled samples over loopback and rebuild them.

Starts ``stm-recv`` on 127.0.0.1 (UDP and TCP, both formats), sends the samples with
``stm-send`` (format A over UDP and format B over TCP, in turn), waits until every packet
is written, then prints a summary of the rebuilt pcapng (and ``capinfos`` output where
Wireshark's tools are installed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from stm import pcapng

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


def cli(name: str) -> list[str]:
    return [sys.executable, "-m", f"stm.cli.{name}"]


def wait_for_urls(proc: subprocess.Popen, count: int, timeout: float = 10.0) -> list[str]:
    """Read stm-recv's stderr until it says where it listens."""
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    urls: list[str] = []
    while time.monotonic() < deadline and len(urls) < count:
        line = proc.stderr.readline()
        if not line:
            break
        match = re.search(r"listening on ((?:udp|tcp)://\S+)", line)
        if match:
            urls.append(match.group(1))
    if len(urls) < count:
        proc.kill()
        raise RuntimeError("stm-recv did not start")
    return urls


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    output = Path(args[0]) if args else ROOT / "out" / "demo.pcapng"
    output.parent.mkdir(parents=True, exist_ok=True)
    samples = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".pcap", ".pcapng"))
    total = sum(1 for s in samples for _ in pcapng.read(s))
    recv = subprocess.Popen(
        [*cli("recv"), "--listen", "udp://127.0.0.1:0", "--listen", "tcp://127.0.0.1:0",
         "-w", str(output), "--count", str(total), "--duration", "60"],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    udp, tcp = wait_for_urls(recv, 2)
    print(f"stm-recv listening on {udp} and {tcp}, writing {output}")
    for i, sample in enumerate(samples):
        how = ["--to", udp] if i % 2 == 0 else ["--format", "tlv", "--to", tcp]
        subprocess.run([*cli("send"), str(sample), *how, "--producer", sample.stem], check=True)
    _, err = recv.communicate(timeout=90)
    sys.stderr.write(err)  # stm-recv's summary: streams, loss, and the file it wrote
    if shutil.which("capinfos"):
        subprocess.run(["capinfos", "-c", "-E", "-I", str(output)], check=False)
    return recv.returncode


if __name__ == "__main__":
    raise SystemExit(main())
