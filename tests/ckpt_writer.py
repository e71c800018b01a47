"""Fault-injection helper: writes ever larger checkpoints until it is killed.

Usage: python -m tests.ckpt_writer DIR. Prints "writing N" before each save of round N.
"""
import sys

import torch

from peer.state import CheckpointDir, SwarmState

ckpts = CheckpointDir(sys.argv[1], keep_last=0)
ckpts.save(SwarmState(1, "fp", torch.arange(1000, dtype=torch.float32), None))
print("saved 1", flush=True)
for r in range(2, 1000):
    theta = torch.full((50_000_000,), float(r))  # 200 MB: the write takes a while
    print(f"writing {r}", flush=True)
    ckpts.save(SwarmState(r, "fp", theta, None))
