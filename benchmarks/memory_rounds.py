"""Resident memory per sync round of a large model: does a long run grow? (issue 12)

Two in-process peers (one process, so RSS counts both) train a stack of Linear layers of
about `--params` parameters with plain SGD, syncing every step; RSS is sampled after each
completed round. Prints one JSON line per round and a final slope (MB per round, a least-squares
fit over the rounds after the first 3, when allocator pools have settled; RSS swings by
a few hundred MB between rounds as glibc returns and takes back large blocks).

    python -m benchmarks.memory_rounds --params 25e6 --rounds 12
"""
from __future__ import annotations

import argparse
import json
import threading

import psutil
import torch
from torch import nn

from averaging.dht import SwarmDHT
from peer import Peer, PeerConfig, SwarmConfig, SyncConfig


def model_of(n_params: float, width: int = 1024) -> nn.Module:
    layers = max(1, round(n_params / (width * width + width)))
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=25e6)
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    torch.manual_seed(0)
    init = model_of(args.params).state_dict()
    n = sum(t.numel() for t in init.values())
    boot = SwarmDHT.start("memory-bench", host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    proc = psutil.Process()
    rss: list[int] = []
    errors: list[BaseException] = []

    def train(i: int) -> None:
        try:
            model = model_of(args.params)
            model.load_state_dict(init)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            cfg = PeerConfig(swarm=SwarmConfig(run_id="memory-bench", initial_peers=boot.visible_maddrs(), host="127.0.0.1"),
                             sync=SyncConfig(every_steps=1, matchmaking={"window": 20}, allreduce={"timeout": 120}))
            with Peer(model, opt, cfg) as peer:
                while peer.round < args.rounds and peer.local_step < 4 * args.rounds:
                    x = torch.randn(4, 1024)
                    r = peer.step(model(x).square().mean(), samples=4)
                    if i == 0 and r is not None and r.ok:
                        rss.append(proc.memory_info().rss)
                        print(json.dumps({"round": peer.round, "rss_gb": round(rss[-1] / 1e9, 3)}), flush=True)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    boot.shutdown()
    if errors:
        raise errors[0]
    tail = rss[3:]
    mean_x, mean_y = (len(tail) - 1) / 2, sum(tail) / max(len(tail), 1)
    var = sum((x - mean_x) ** 2 for x in range(len(tail)))
    slope = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(tail)) / var if var else float("nan")
    print(json.dumps({"params": n, "rounds": len(rss), "rss_first_gb": round(rss[0] / 1e9, 3),
                      "rss_last_gb": round(rss[-1] / 1e9, 3), "slope_mb_per_round": round(slope / 1e6, 1)}))


if __name__ == "__main__":
    main()
