"""A peer that cannot accept connections (behind NAT, --swarm.client-mode) still averages."""
from __future__ import annotations

import subprocess

import psutil
import pytest

from .conftest import summary, wait_exit

ROUNDS = 3


def listening_sockets(pid: int) -> list:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        try:
            out += [c for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.timeout(300)
def test_client_mode_peer_takes_part_in_averaging(procs):
    boot, addr = procs.bootstrap()
    common = ["--sync.every-steps", "10", "--train.max-rounds", str(ROUNDS)]
    full = [procs.peer(f"full{i}", addr, *common) for i in range(2)]
    client = procs.peer("client", addr, *common, "--swarm.client-mode")
    listens = []
    while client.poll() is None:
        listens += listening_sockets(client.pid)  # sampled throughout the run
        try:
            client.wait(timeout=0.5)
        except subprocess.TimeoutExpired:  # still running: sample again
            continue
    assert client.returncode == 0, procs.log(client)[-3000:]
    for p in full:
        assert wait_exit(procs, p, 120) == 0, procs.log(p)[-3000:]
    assert listens == [], f"client-mode peer opened listening sockets: {listens}"
    sums = [summary(procs, n) for n in ("full0", "full1", "client")]
    assert all(s["rounds"] == ROUNDS for s in sums), sums
    assert len({s["digest"] for s in sums}) == 1, "client-mode peer disagrees with the others"
    # It completed rounds itself (through the relay), not only caught up by downloading state.
    log = procs.log(client)
    assert all(f"round {r} complete: 3 peers" in log for r in range(1, ROUNDS + 1)), log[-3000:]
