"""Integration: a bootstrap node and 3 peer processes on loopback train together."""
from __future__ import annotations

import re
import signal

import pytest
import torch


from peer.state import CheckpointDir

from .conftest import summary, wait_exit

ROUNDS = 5


def load_theta(path) -> torch.Tensor:
    return CheckpointDir.load(path, fingerprint=None, numel=None).theta_sync


@pytest.mark.timeout(400)
def test_three_peers_train_and_agree(procs):
    boot, addr = procs.bootstrap()
    peers = {
        f"peer{i}": procs.peer(f"peer{i}", addr, "--sync.every-steps", "10", "--train.max-rounds", str(ROUNDS),
                               "--checkpoint.dir", str(procs.tmp / f"ckpt{i}"), "--checkpoint.keep-last", "0")
        for i in range(3)
    }
    for name, p in peers.items():
        assert wait_exit(procs, p, 300) == 0, procs.log(p)[-3000:]

    # After each completed round, every peer that took part holds the same parameters.
    for r in range(1, ROUNDS + 1):
        thetas = {n: load_theta(procs.tmp / f"ckpt{i}" / f"ckpt-r{r:06d}.safetensors")
                  for i, n in enumerate(peers) if (procs.tmp / f"ckpt{i}" / f"ckpt-r{r:06d}.safetensors").exists()}
        assert len(thetas) >= 2, f"round {r}: fewer than 2 peers completed it"
        ref = next(iter(thetas.values()))
        for n, t in thetas.items():
            assert torch.isfinite(t).all()
            assert (t - ref).abs().max().item() <= 1e-6, f"round {r}: {n} disagrees"

    sums = {n: summary(procs, n) for n in peers}
    for n, s in sums.items():
        assert s["rounds"] == ROUNDS
        # Loss at init is ~ln(256) = 5.5; a few hundred byte-level steps bring it well below.
        assert s["val_loss_final"] < s["val_loss_start"] - 1.0, (n, s)
    assert len({s["digest"] for s in sums.values()}) == 1, "peers ended with different parameters"
    for n, p in peers.items():  # one line per completed round, not two near-identical ones
        for r in range(1, ROUNDS + 1):
            said = re.findall(rf"\bround {r}(?::| complete:) \d+ peers", procs.log(p))
            assert len(said) == 1 and "complete" in said[0], (n, r, said)

    boot.send_signal(signal.SIGTERM)
    assert wait_exit(procs, boot, 30) == 0
    assert "bootstrap node stopped" in procs.log(boot)


@pytest.mark.timeout(200)
def test_single_peer_on_own_text_files_starts_a_new_swarm(procs, tmp_path):
    """No --join: the peer starts a new swarm, trains alone on the user's text, and says so."""
    data = tmp_path / "corpus"
    (data / "sub").mkdir(parents=True)
    words = "the quick brown fox jumps over the lazy dog while the swarm trains together "
    for i in range(20):
        (data / "sub" / f"f{i}.txt").write_text(words * 60 + f" file {i}\n")
    p = procs.spawn("solo", ["-m", "peer", "--swarm.host", "127.0.0.1", "--train.threads", "1", "--data.source", "text",
                             "--data.paths", str(data), "--train.max-steps", "60", "--sync.every-steps", "20",
                             "--train.eval-batches", "4", "--train.summary-file", str(tmp_path / "solo.json")])
    assert wait_exit(procs, p, 180) == 0, procs.log(p)[-3000:]
    s = summary(procs, "solo")
    assert s["steps"] == 60 and s["rounds"] == 0 and s["rounds_failed"] >= 2
    alone = [ln for ln in procs.log(p).splitlines() if "not completed (no other peer at this round)" in ln]
    assert len(alone) == 1 and "check the run id (--swarm.run-id)" in alone[0], alone  # said once, not per attempt
    assert "text: 20 files" in procs.log(p)


def test_console_scripts_installed():
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    bindir = Path(sys.executable).parent
    for script in ("swarm-peer", "swarm-bootstrap"):
        exe = shutil.which(script, path=str(bindir))
        assert exe, f"{script} is not installed next to {sys.executable}"
        out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage:" in out.stdout
