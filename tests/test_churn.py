"""Volunteers come and go: late join, crashes during checkpoint writes, a dead bootstrap node."""
from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest
import torch

from peer.state import CheckpointDir

from .conftest import PY, REPO, summary, wait_exit, wait_for


def theta(path) -> torch.Tensor:
    return CheckpointDir.load(path, fingerprint=None, numel=None).theta_sync


@pytest.mark.timeout(400)
def test_late_joiner_downloads_state_and_agrees(procs):
    boot, addr = procs.bootstrap()
    # Enough rounds left after round 3 for the late peer to start up (~10 s here) and take part.
    args = ["--sync.every-steps", "20", "--train.max-rounds", "12", "--checkpoint.keep-last", "0"]
    early = [procs.peer(f"early{i}", addr, *args, "--checkpoint.dir", str(procs.tmp / f"early{i}")) for i in range(2)]
    wait_for(lambda: "round 3 complete" in procs.log(early[0]), 200, "3 rounds in the 2-peer swarm", early[0])
    late = procs.peer("late", addr, *args, "--checkpoint.dir", str(procs.tmp / "late"))
    for p in [*early, late]:
        assert wait_exit(procs, p, 250) == 0, procs.log(p)[-3000:]
    log = procs.log(late)
    m = re.search(r"continuing from round (\d+) \(downloaded", log)
    assert m and int(m.group(1)) >= 3, log[-3000:]  # it joined at the swarm's round, not round 0
    own = [int(r) for r in re.findall(r"round (\d+) complete: 3 peers", log)]
    assert own, "the late peer never completed a round with the others"
    for r in own:  # after each complete round it holds exactly the others' parameters
        ref = theta(procs.tmp / "early0" / f"ckpt-r{r:06d}.safetensors")
        assert torch.equal(theta(procs.tmp / "late" / f"ckpt-r{r:06d}.safetensors"), ref)
    assert "served state of round" in procs.log(early[0]) + procs.log(early[1])
    assert len({summary(procs, n)["digest"] for n in ("early0", "early1", "late")}) == 1


@pytest.mark.timeout(120)
def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path):
    d = tmp_path / "ckpt"
    p = subprocess.Popen([PY, "-m", "tests.ckpt_writer", str(d)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:  # type: ignore[union-attr]
            if line.startswith("writing 3"):
                time.sleep(0.05)  # mid-write of round 3 (200 MB)
                p.kill()
                break
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -9
    ckpts = CheckpointDir(d)
    files = ckpts.list()
    assert files and all(int(f.name[6:12]) <= 3 for f in files)
    for f in files:  # every visible checkpoint is complete and loads
        CheckpointDir.load(f, fingerprint="fp", numel=None)
    latest = CheckpointDir.load(ckpts.latest(), fingerprint="fp", numel=None)
    assert latest.round in (2, 3) and torch.all(latest.theta_sync == float(latest.round))


@pytest.mark.timeout(400)
def test_training_survives_bootstrap_death_and_newcomer_joins_through_a_peer(procs):
    boot, addr = procs.bootstrap()
    args = ["--sync.every-steps", "20", "--train.max-rounds", "12"]
    peers = [procs.peer(f"p{i}", addr, *args) for i in range(2)]
    wait_for(lambda: "round 2 complete" in procs.log(peers[0]), 200, "2 rounds", peers[0])
    boot.send_signal(signal.SIGKILL)
    boot.wait(timeout=10)
    wait_for(lambda: "round 4 complete" in procs.log(peers[0]), 200, "2 more rounds without the bootstrap", peers[0])
    via = re.search(r"others can join through this peer: (\S+)", procs.log(peers[1])).group(1)
    newcomer = procs.peer("newcomer", via, *args)
    for p in [*peers, newcomer]:
        assert wait_exit(procs, p, 250) == 0, procs.log(p)[-3000:]
    assert "joined run" in procs.log(newcomer)
    assert summary(procs, "newcomer")["rounds"] == 12
    assert len({summary(procs, n)["digest"] for n in ("p0", "p1", "newcomer")}) == 1


@pytest.mark.timeout(400)
def test_slow_peer_is_not_waited_for_and_resyncs(procs):
    """A peer whose training stalls (here: its process is frozen with SIGSTOP, which is exactly
    what a much slower or overloaded machine looks like to the others, while its DHT node keeps
    answering) misses rounds: the others proceed after the matchmaking window instead of
    waiting for it, and once it moves again it catches up by downloading the swarm's state.

    Freezing the process, rather than giving it a bigger batch, makes the slowness independent
    of how many cores the test machine has."""
    boot, addr = procs.bootstrap()
    common = ["--sync.every-steps", "10", "--train.max-rounds", "10", "--sync.matchmaking.window", "4"]
    # The slow peer starts first: on a loaded machine a peer started last can find the others
    # rounds ahead, join by download and never log round 1 (the test then waited in vain).
    slow = procs.peer("slow", addr, *common)
    fast = [procs.peer(f"fast{i}", addr, *common) for i in range(2)]
    # Freeze it between rounds (it just finished a round and is training locally), not mid-round.
    first = wait_for(lambda: re.search(r"round (\d+) complete", procs.log(slow)), 200, "the slow peer's first round", slow)
    frozen_at = int(first.group(1))
    assert frozen_at <= 7, f"the slow peer's first round came too late to leave rounds for the others: {frozen_at}"
    slow.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: any(int(r) > frozen_at + 1 for r in re.findall(r"round (\d+) complete: 2 peers",
                                                                          procs.log(fast[0]))), 200,
                 "the fast peers to complete rounds without the frozen one", fast[0])
    finally:
        slow.send_signal(signal.SIGCONT)
    for p in fast:
        assert wait_exit(procs, p, 300) == 0, procs.log(p)[-3000:]
    log = procs.log(fast[0])
    sizes = [int(k) for k in re.findall(r"round \d+ complete: (\d+) peers", log)]
    assert sizes.count(2) >= 2, f"the fast peers did not proceed without the slow one: {sizes}"
    assert summary(procs, "fast0")["rounds"] == 10
    assert wait_exit(procs, slow, 200) == 0, procs.log(slow)[-3000:]
    m = re.search(r"continuing from round (\d+)", procs.log(slow))
    assert m and int(m.group(1)) > frozen_at + 1, "the slow peer never re-synced:\n" + procs.log(slow)[-3000:]
    assert summary(procs, "slow")["rounds"] >= 1
