"""The swarm heals: a bootstrap node killed and restarted with the same identity and port is
found again (it calls back the peers it saved beside its identity, and they re-dial their
initial peers), and a newcomer joining through it averages with the swarm."""
from __future__ import annotations

import os
import re
import signal

import pytest

from .conftest import free_port, wait_for


def _live(log: str) -> int:
    """The bootstrap monitor's latest count of live peers."""
    counts = re.findall(r"run 'swarmtrain-demo': (\d+) live peer", log)
    return int(counts[-1]) if counts else 0


@pytest.mark.timeout(400)
def test_a_restarted_bootstrap_node_is_found_again(procs):
    key, port = procs.tmp / "boot.key", free_port()

    def start(name: str):
        maddrs = procs.tmp / f"{name}.maddrs"
        p = procs.spawn(name, ["-m", "bootstrap", "--identity", str(key), "--host", "127.0.0.1", "--port", str(port),
                               "--monitor-every", "1", "--poll-every", "1", "--maddrs-file", str(maddrs)])
        wait_for(lambda: maddrs.exists() and maddrs.read_text().strip(), 60, f"{name} to start", p)
        return p, maddrs.read_text().split()[0]

    boot, addr = start("boot")
    peers = [procs.peer(f"p{i}", addr, "--sync.every-steps", "10") for i in range(3)]
    for p in peers:
        wait_for(lambda p=p: "round 1 complete" in procs.log(p), 200, "round 1", p)
    wait_for(lambda: _live(procs.log(boot)) == 3, 60, "the bootstrap to see 3 peers", boot)
    contacts = procs.tmp / "boot.contacts"  # the peers' addresses, saved beside the identity
    wait_for(lambda: contacts.exists() and len(contacts.read_text().split()) >= 3, 30, "the saved contacts", boot)

    os.killpg(boot.pid, signal.SIGKILL)
    boot.wait(10)
    boot2, addr2 = start("boot2")
    assert addr2 == addr  # same identity and port: the same address
    wait_for(lambda: _live(procs.log(boot2)) == 3, 30, "the restarted bootstrap to see all 3 peers again", boot2)

    newcomer = procs.peer("late", addr2, "--sync.every-steps", "10")
    wait_for(lambda: re.search(r"round \d+ complete: [2-4] peers", procs.log(newcomer)), 120,
             "the newcomer to complete a round with the swarm", newcomer)
    for p in [*peers, newcomer]:
        assert p.poll() is None, procs.log(p)[-3000:]

