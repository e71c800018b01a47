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


@pytest.mark.timeout(120)
@pytest.mark.parametrize("persistent", [False, True], ids=["ephemeral-key", "identity-file"])
def test_client_mode_dht_never_listens_even_while_starting(tmp_path, persistent):
    """Regression: hivemind's "is this identity taken?" check starts a second, anonymous p2pd
    that listens on a TCP port for about a second. A client-mode node must skip it. Sampled
    every 10 ms over the whole start, so the brief listener cannot slip between samples."""
    import os
    import threading

    from averaging.dht import SwarmDHT

    boot = SwarmDHT.start("cm", host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    me = psutil.Process(os.getpid())
    ours = {p.pid for p in me.children(recursive=True)}  # the bootstrap's processes may listen
    # The DHT child is forked from this test process, so it inherits this process's open
    # sockets (a listener left by an earlier test in the same session would show up in it).
    # Those were not opened by the client; only new listeners count.
    inherited = {c.laddr for c in me.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    found: list = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for q in me.children(recursive=True):
                if q.pid not in ours:
                    found.extend(c for c in listening_sockets(q.pid) if c.laddr not in inherited)
            done.wait(0.01)

    sampler = threading.Thread(target=sample, name="listen-sampler")
    sampler.start()
    try:
        client = SwarmDHT.start("cm", initial_peers=boot.visible_maddrs(), client_mode=True,
                                identity_path=str(tmp_path / "id.key") if persistent else None)
        try:
            assert client.peer_id and client.peer_id != boot.peer_id
        finally:
            client.shutdown()
    finally:
        done.set()
        sampler.join()
        boot.shutdown()
    assert found == [], f"a client-mode DHT opened listening sockets: {found}"
