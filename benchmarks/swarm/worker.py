"""One peer of the swarm benchmark: a small MLP on y = x·w with emulated compute per step.

    python -m benchmarks.swarm.worker --join ADDR --out FILE [--slow 4] [--step-s 0.05] ...

Emulated compute: each inner step takes `step_s × slow` seconds of wall time (the real step
is tiny; the rest is a sleep), so 8 peers keep their relative speeds on a 2-core machine.
Stops once the peer reaches `--rounds` (or after `--limit-s`) and writes one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch import nn

from averaging.faults import Tamper
from averaging.flat import write_flat_
from peer import Peer, PeerConfig, SwarmConfig, SyncConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--join", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--run-id", default="swarm-bench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow", type=float, default=1.0, help="this peer's compute is this many times slower")
    ap.add_argument("--step-s", type=float, default=0.05, help="emulated seconds per step of a fast peer")
    ap.add_argument("--every-steps", type=int, default=40)
    ap.add_argument("--every-seconds", type=float, default=0.0)
    ap.add_argument("--max-group", type=int, default=64)
    ap.add_argument("--window", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--limit-s", type=float, default=240.0)
    ap.add_argument("--crash-at-round", type=int, default=0, help="SIGKILL this peer mid-transfer of this round")
    ap.add_argument("--max-stale", type=int, default=None, help="sync.max_stale_rounds (default: the config's)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # one initialisation for every peer
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
    w_true = torch.randn(32, 1, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    cfg = PeerConfig(swarm=SwarmConfig(run_id=a.run_id, initial_peers=[a.join], host="127.0.0.1"),
                     sync=SyncConfig(every_steps=a.every_steps, every_seconds=a.every_seconds,
                                     matchmaking={"max_group_size": a.max_group, "window": a.window},
                                     allreduce={"timeout": 20},
                                     **({} if a.max_stale is None else {"max_stale_rounds": a.max_stale})))
    gen = torch.Generator().manual_seed(100 + a.seed)
    with Peer(model, opt, cfg) as peer:
        t0 = time.monotonic()
        while peer.round < a.rounds and time.monotonic() - t0 < a.limit_s:
            if a.crash_at_round and peer.round + 1 == a.crash_at_round and peer._averager is not None:
                peer._averager.tamper = Tamper(mode="crash")  # the fault seam: dies once its next transfer begins
            t, waited = time.monotonic(), peer.sync_wait_s
            x = torch.randn(16, 32, generator=gen)
            peer.step(nn.functional.mse_loss(model(x), x @ w_true), samples=len(x))
            computed = time.monotonic() - t - (peer.sync_wait_s - waited)  # this step's compute, its sync excluded
            time.sleep(max(0.0, a.step_s * a.slow - computed))
        wall = time.monotonic() - t0
    # The swarm's model (θ_sync), on a fixed validation set: comparable across peers and runs.
    agreed = copy.deepcopy(model)
    write_flat_([p for p in agreed.parameters()], peer.state.theta_sync)
    xv = torch.randn(2048, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        val = nn.functional.mse_loss(agreed(xv), xv @ w_true).item()
    with open(a.out, "w") as f:
        json.dump(dict(slow=a.slow, total=peer.total_samples, averaged=peer.samples_averaged,
                       discarded=peer.samples_discarded, pending=peer.samples_since_sync, wait_s=peer.sync_wait_s,
                       wall_s=wall, rounds_ok=peer.rounds_ok, rounds_failed=peer.rounds_failed, round=peer.round,
                       digest=peer.digest, val_loss=val), f)


if __name__ == "__main__":
    main()
