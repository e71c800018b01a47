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


class _NoDHT:
    """Rediscovery's planning reads only this node's id (the dialing goes through the DHT)."""
    peer_id = "QmSelf"


def _rec(pid: str, role: str = "trainer"):
    from peer.membership import PeerRecord
    return PeerRecord(peer_id=pid, round=1, fingerprint="f", schema="s", digest="d", host="198.18.1.9", port=1,
                      role=role, maddrs=(f"/ip4/198.18.1.9/tcp/4000/p2p/{pid}",))


def test_every_peer_seen_is_dialed_with_its_records_address_and_again_after_refresh():
    """p2pd drops the addresses of peers that connect from addresses that are neither
    loopback nor private (go-libp2p's identify keeps only public ones), so peers that met
    through the bootstrap node cannot reach each other unless told where: each peer is dialed
    with its record's address as soon as it is seen, and again every `refresh` seconds."""
    from peer.membership import Rediscovery
    r = Rediscovery(_NoDHT(), initial=["/ip4/198.18.1.1/tcp/1/p2p/QmBoot"], refresh=60.0)
    a, b = _rec("QmA"), _rec("QmB")
    first = r._plan({"QmA": a, "QmSelf": _rec("QmSelf")}, now=100.0)
    assert a.maddrs[0] in first and not any("QmSelf" in t for t in first)
    assert r._plan({"QmA": a}, now=105.0) == []  # dialed 5 s ago: nothing to do
    assert r._plan({"QmA": a, "QmB": b}, now=110.0) == [b.maddrs[0]]  # a newcomer, at once
    assert a.maddrs[0] in r._plan({"QmA": a, "QmB": b}, now=161.0)  # refreshed after 60 s
    left = r._plan({"QmA": _rec("QmA", role="left"), "QmB": b}, now=230.0)
    assert b.maddrs[0] in left and a.maddrs[0] not in left, left  # a peer that left is not dialed again
