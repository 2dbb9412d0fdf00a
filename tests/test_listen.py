"""Out of file descriptors, a listener served from a selector loop must not leave that loop
spinning on a listening socket that stays readable: it refuses the waiting connections one
by one with its spare descriptor. Both listeners (TCP and WebSocket) share that code
(stm.transport.listen); each is run in a child process whose descriptor limit is low, and
connected to by this process as many times as the backlog takes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

CHILD = r"""
import json, os, resource, selectors, sys, time
from stm.transport.tcp import TcpListener
from stm.tlv import TlvFramer

kind = sys.argv[1]
if kind == "tcp":
    r = TcpListener("127.0.0.1", 0, framer_factory=TlvFramer, on_message=lambda m, p: None)
else:
    from stm.transport.websocket import WsReceiver
    r = WsReceiver("127.0.0.1", 0, path="/stm")
sel = selectors.DefaultSelector()
r.register(sel)
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
used = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 8, hard))  # room for a few connections
print(r.address[1], flush=True)
turns = 0
end = time.monotonic() + 3.0
while time.monotonic() < end:
    for key, mask in sel.select(0.05):
        key.data.handle(key, mask)
    turns += 1
print(json.dumps({"turns": turns, "connections": r.connections,
                  "rejected": r.rejected_connections}), flush=True)
"""


@pytest.mark.parametrize("kind", ["tcp", "ws"])
def test_out_of_descriptors_refuses_without_spinning(kind):
    if kind == "ws":
        pytest.importorskip("websockets")
    child = subprocess.Popen([sys.executable, "-c", CHILD, kind], stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    clients = []
    try:
        port = int(child.stdout.readline())
        for _ in range(40):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            time.sleep(0.005)
        out, _ = child.communicate(timeout=20)
    finally:
        for c in clients:
            c.close()
        child.kill()
    stats = json.loads(out.strip().splitlines()[-1])
    # 3 s of 0.05 s selects is ~60 turns; a loop spinning on a readable listener makes
    # hundreds of thousands
    assert stats["turns"] < 2000, stats
    assert stats["connections"] == 40 and stats["rejected"] > 0, stats
