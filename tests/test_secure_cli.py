"""stm-send and stm-recv over tcp:// (format A framed), tls:// (mutual TLS), dtls://, with
--allow and stream ownership: real certificates made here, real processes and sockets."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_tls import SERVER_NAME, make_pki

from stm import pcapng
from stm.report import Encoder

ROOT = Path(__file__).resolve().parents[1]
SIP_UDP = ROOT / "samples" / "sip_udp_ipv4.pcap"
SAMPLES = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in (".pcap", ".pcapng"))
PY = [sys.executable, "-m"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def keys(paths) -> list:
    return [p.key()[1:] for f in paths for p in pcapng.read(f)]


class Recv:
    """stm-recv in a subprocess on any transport; every wait bounded."""

    def __init__(self, procs, out: Path, listen: str, *args: str) -> None:
        self.out = out
        self.err_path = out.with_suffix(".err")
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*PY, "stm.cli.recv", "--listen", listen, "-w", str(out), "--json", *args],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        procs.append(self.proc)
        deadline = time.monotonic() + 20
        while not (m := re.search(r"listening on (\w+://\S+)", self.err_path.read_text())):
            assert self.proc.poll() is None, self.err_path.read_text()
            assert time.monotonic() < deadline, "stm-recv did not start"
            time.sleep(0.02)
        self.url = m.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])

    def stop(self) -> dict:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, self.err_path.read_text()
        return json.loads(out)


def send(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*PY, "stm.cli.send", *map(str, args), "--json"],
        capture_output=True, text=True, timeout=60, check=check,
    )  # fmt: skip


def wait_for(path: Path, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sum(1 for _ in pcapng.read(path)) >= n:
                return
        except Exception:  # a block half flushed: try again
            pass
        time.sleep(0.05)


def client(pki, name: str | None) -> list[str]:
    own = ["--cert", pki.path(f"{name}.crt"), "--key", pki.path(f"{name}.key")] if name else []
    return [*own, "--ca", pki.path("ca.crt"), "--server-name", SERVER_NAME]


def server(pki, *extra: str) -> list[str]:
    return ["--cert", str(pki.path("server.crt")), "--key", str(pki.path("server.key")),
            "--ca", str(pki.path("ca.crt")), "--require-client-cert", *extra]  # fmt: skip


def test_format_a_over_tcp_is_framed_and_rebuilt_exactly(tmp_path, procs):
    rx = Recv(procs, tmp_path / "out.pcapng", "tcp://127.0.0.1:0", "--flush-interval", "0.05")
    result = json.loads(send(*SAMPLES, "--format", "gre", "--to", rx.url).stdout)
    assert result["destinations"][rx.url]["sent"] == result["reports"]
    wait_for(rx.out, len(keys(SAMPLES)))
    assert rx.stop()["packets_written"] == len(keys(SAMPLES))
    assert keys([rx.out]) == keys(SAMPLES)


@pytest.mark.parametrize("fmt", ["gre", "tlv"])
def test_mutual_tls_delivers_both_formats_with_the_producer_identity(tmp_path, procs, pki, fmt):
    rx = Recv(procs, tmp_path / "out.pcapng", "tls://127.0.0.1:0", *server(pki),
              "--flush-interval", "0.05")  # fmt: skip
    result = json.loads(
        send(*SAMPLES, "--format", fmt, "--to", rx.url, *client(pki, "amf-1")).stdout
    )
    assert result["destinations"][rx.url.replace("tls", "tls")]["sent"] == result["reports"]
    wait_for(rx.out, len(keys(SAMPLES)))
    summary = rx.stop()
    assert summary["packets_written"] == len(keys(SAMPLES)) and summary["tls_failures"] == 0
    assert keys([rx.out]) == keys(SAMPLES)


@pytest.mark.parametrize("who", [None, "rogue", "expired"])
def test_tls_refuses_producers_without_a_good_certificate(tmp_path, procs, pki, who):
    rx = Recv(procs, tmp_path / "out.pcapng", "tls://127.0.0.1:0", *server(pki))
    r = send(SIP_UDP, "--format", "tlv", "--to", rx.url, *client(pki, who),
             "--drain-timeout", "1.5")  # fmt: skip
    # With TLS 1.3 the server refuses a client certificate after the client has finished
    # its handshake, so the sender may count bytes the kernel took: the collector decides.
    assert r.returncode == 0, r.stderr
    summary = rx.stop()
    assert summary["packets_written"] == 0 and summary["tls_failures"] >= 1


def test_plain_tcp_client_on_a_tls_port_is_refused(tmp_path, procs, pki):
    rx = Recv(procs, tmp_path / "out.pcapng", "tls://127.0.0.1:0", *server(pki))
    send(SIP_UDP, "--format", "tlv", "--to", f"tcp://127.0.0.1:{rx.port}", "--drain-timeout", "1")
    summary = rx.stop()
    assert summary["packets_written"] == 0 and summary["tls_failures"] >= 1


def test_wrong_server_name_fails_on_the_sender_with_a_clear_error(tmp_path, procs, pki):
    rx = Recv(procs, tmp_path / "out.pcapng", "tls://127.0.0.1:0", *server(pki))
    own = [*client(pki, "amf-1")[:-1], "wrong.example"]
    r = send(SIP_UDP, "--format", "tlv", "--to", rx.url, *own, "--drain-timeout", "1.5")
    assert "wrong.example" in r.stderr and "Traceback" not in r.stderr
    rx.stop()


def test_a_stream_id_belongs_to_its_first_producer(tmp_path, procs, pki):
    rx = Recv(procs, tmp_path / "out.pcapng", "tls://127.0.0.1:0", *server(pki),
              "--flush-interval", "0.05")  # fmt: skip
    same = ("--format", "tlv", "--stream-id", "77", "--producer", "amf-1", "--to", rx.url)
    send(SIP_UDP, *same, *client(pki, "amf-1"))
    wait_for(rx.out, len(keys([SIP_UDP])))
    send(SIP_UDP, *same, *client(pki, "amf-2"), "--drain-timeout", "2")  # the hijack
    time.sleep(0.5)
    summary = rx.stop()
    assert summary["packets_written"] == len(keys([SIP_UDP]))
    assert summary["streams_refused"] == len(keys([SIP_UDP]))
    assert "stream 77 claimed by CN=amf-2" in rx.err_path.read_text()


@pytest.mark.parametrize("fmt", ["gre", "tlv"])
def test_dtls_round_trip_with_zero_loss(tmp_path, procs, pki, fmt):
    rx = Recv(procs, tmp_path / "out.pcapng", "dtls://127.0.0.1:0", *server(pki),
              "--flush-interval", "0.05")  # fmt: skip
    result = json.loads(
        send(*SAMPLES, "--format", fmt, "--to", rx.url, *client(pki, "amf-1")).stdout
    )
    assert result["destinations"][rx.url]["sent"] == result["reports"]
    wait_for(rx.out, len(keys(SAMPLES)))
    summary = rx.stop()
    assert summary["packets_written"] == len(keys(SAMPLES)) and summary["lost"] == 0
    assert keys([rx.out]) == keys(SAMPLES)


def test_dtls_refuses_a_producer_without_a_certificate(tmp_path, procs, pki):
    rx = Recv(procs, tmp_path / "out.pcapng", "dtls://127.0.0.1:0", *server(pki))
    r = send(SIP_UDP, "--to", rx.url, *client(pki, None), check=False)
    assert r.returncode == 1 and "DTLS handshake" in r.stderr and "Traceback" not in r.stderr
    assert rx.stop()["packets_written"] == 0


def test_allowlist_drops_other_addresses_before_parsing(tmp_path, procs):
    rx = Recv(procs, tmp_path / "out.pcapng", "udp://0.0.0.0:0", "--allow", "127.0.0.1/32",
              "--flush-interval", "0.05")  # fmt: skip
    n = len(keys([SIP_UDP]))
    enc = Encoder("intruder")
    reports = [r for p in pcapng.read(SIP_UDP) for r in enc.add(p, 0.0)] + enc.flush()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.2", 0))  # from 127.0.0.2: refused
        for r in reports:
            s.sendto(r, ("127.0.0.1", rx.port))
    send(SIP_UDP, "--to", f"udp://127.0.0.1:{rx.port}")
    wait_for(rx.out, n)
    summary = rx.stop()
    assert summary["packets_written"] == n and summary["denied"] == len(reports)
    assert summary["malformed"] == 0


def test_no_key_material_in_logs_or_output(tmp_path, procs, pki):
    rx = Recv(procs, tmp_path / "out.pcapng", "tls://127.0.0.1:0", *server(pki), "-vv",
              "--flush-interval", "0.05")  # fmt: skip
    r = send(SIP_UDP, "--format", "tlv", "--to", rx.url, *client(pki, "amf-1"), "-vv")
    wait_for(rx.out, len(keys([SIP_UDP])))
    rx.stop()
    seen = r.stdout + r.stderr + rx.err_path.read_text() + rx.out.read_bytes().decode("latin-1")
    for secret in pki.key_texts():
        assert secret not in seen


def test_security_options_need_a_secure_transport(tmp_path):
    r = subprocess.run(
        [*PY, "stm.cli.recv", "--listen", "udp://127.0.0.1:0", "--cert", "x.pem", "-w",
         str(tmp_path / "o.pcapng")], capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2 and "are for tls:// and dtls://" in r.stderr
