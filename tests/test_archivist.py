"""A bootstrap node with --checkpoint-dir keeps the run alive after every trainer has left."""
from __future__ import annotations

import signal

import pytest

from peer.state import CheckpointDir
from .conftest import summary, wait_exit, wait_for


@pytest.mark.timeout(400)
def test_run_survives_all_trainers_leaving(procs):
    archive = procs.tmp / "archive"
    boot, addr = procs.bootstrap("bootstrap", "--checkpoint-dir", str(archive), "--archive-every", "1",
                                 "--keep-last", "2")
    first = [procs.peer(f"a{i}", addr, "--sync.every-steps", "10", "--train.max-rounds", "3") for i in range(2)]
    for p in first:
        assert wait_exit(procs, p, 200) == 0, procs.log(p)[-3000:]
    done = summary(procs, "a0")
    assert done["rounds"] == 3
    ckpt = archive / "ckpt-r000003.safetensors"
    wait_for(ckpt.exists, 60, "the archivist to save round 3", boot)
    archived = CheckpointDir.load(ckpt, fingerprint=None, numel=None)
    assert archived.round == 3
    assert len(list(archive.glob("ckpt-r*.safetensors"))) <= 2  # keep_last

    # Every trainer has left. New trainers continue from the archived round, not from scratch.
    second = [procs.peer(f"b{i}", addr, "--sync.every-steps", "10", "--train.max-rounds", "5") for i in range(2)]
    for p in second:
        assert wait_exit(procs, p, 200) == 0, procs.log(p)[-3000:]
    for name in ("b0", "b1"):
        s = summary(procs, name)
        assert s["val_loss_by_round"][0][0] == 3, s["val_loss_by_round"]  # started at round 3
        assert abs(s["val_loss_start"] - done["val_loss_final"]) < 1e-4
        assert s["rounds"] == 5
    assert summary(procs, "b0")["digest"] == summary(procs, "b1")["digest"]
    boot.send_signal(signal.SIGTERM)
    assert wait_exit(procs, boot, 30) == 0
