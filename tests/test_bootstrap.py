"""The bootstrap node: persistent identity, clean shutdown, clear errors."""
from __future__ import annotations

import signal
import subprocess

from .conftest import PY, REPO, wait_exit, wait_for


def peer_id(maddr: str) -> str:
    return maddr.rsplit("/p2p/", 1)[1]


def test_identity_persists_across_restarts(procs):
    key = procs.tmp / "keys" / "node.key"
    b1, a1 = procs.bootstrap("b1", identity=key)
    assert key.exists()
    # The addresses file appears before the banner is printed: wait for the banner.
    log = wait_for(lambda: "swarm-peer --join" in procs.log(b1) and procs.log(b1), 30, "the join command", b1)
    assert "swarm-peer --join /ip4/127.0.0.1/" in log and peer_id(a1) in log
    b1.send_signal(signal.SIGINT)
    assert wait_exit(procs, b1, 30) == 0
    b2, a2 = procs.bootstrap("b2", identity=key)
    assert peer_id(a2) == peer_id(a1)
    b2.send_signal(signal.SIGTERM)
    assert wait_exit(procs, b2, 30) == 0
    assert "bootstrap node stopped" in procs.log(b2)


def test_corrupt_identity_is_reported_and_kept(tmp_path):
    key = tmp_path / "node.key"
    key.write_bytes(b"not a key")
    p = subprocess.run([PY, "-m", "bootstrap", "--identity", str(key), "--host", "127.0.0.1", "--port", "0"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    errs = [l for l in p.stderr.splitlines() if l.startswith("swarm-bootstrap: error:")]
    assert len(errs) == 1 and "is not a valid libp2p private key" in errs[0]
    assert key.read_bytes() == b"not a key"


def test_bad_port():
    p = subprocess.run([PY, "-m", "bootstrap", "--port", "70000"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "port must be in 0..65535" in p.stderr


def test_ctrl_c_to_the_whole_group_stops_quietly_and_the_ledger_sits_beside_the_identity(procs):
    """Ctrl+C at a terminal signals the whole foreground process group (the node, its DHT
    process and p2pd). A normal stop prints no go-libp2p error and no grace-period warning,
    leaves no process behind, and the default ledger is saved beside the identity file (two
    nodes started in one directory, each with its own key, never share one)."""
    import os

    import psutil

    maddrs = procs.tmp / "q.maddrs"
    b = procs.spawn("q", ["-m", "bootstrap", "--identity", str(procs.tmp / "q.key"), "--host", "127.0.0.1", "--port", "0",
                          "--maddrs-file", str(maddrs)])
    wait_for(lambda: "swarm-peer --join" in procs.log(b), 60, "the banner", b)
    family = psutil.Process(b.pid).children(recursive=True)
    assert family, "the DHT runs in a child process (and p2pd under it)"
    os.killpg(b.pid, signal.SIGINT)  # what a terminal's Ctrl+C does: the whole foreground group
    assert wait_exit(procs, b, 30) == 0
    log = procs.log(b)
    assert "bootstrap node stopped" in log
    for noise in ("error accepting connection", "grace period", "Traceback", "ERROR", "WARN"):
        assert noise not in log, log[-3000:]
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, alive
    assert (procs.tmp / "q.ledger.json").exists() and not (REPO / "q.ledger.json").exists()
