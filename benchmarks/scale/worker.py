"""One process of the scale benchmark: the plain training loop, or a swarm peer.

    python -m benchmarks.scale.worker plain --preset 100M --steps 20
    python -m benchmarks.scale.worker peer --preset 100M --join ADDR --rounds 10 --every-steps 5

Prints JSON lines: for a peer, one per completed round (RSS now, peak RSS, the round's time
split) and a final one; for the plain loop, one at the end. Peak RSS is this process's
ru_maxrss (the DHT's child processes are not counted, in either case).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import psutil
import torch

from peer.config import ModelConfig
from peer.model import build_model

def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def say(**kv) -> None:
    print(json.dumps(kv), flush=True)


def batch(cfg: ModelConfig, g: torch.Generator, b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    xy = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=g)  # random bytes: the loss does not matter here
    return xy[:, :-1], xy[:, 1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["plain", "peer"])
    ap.add_argument("--preset", default="25M")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--join", default="")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--every-steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    # Small batches: memory is about the parameters (the plain loop uses the same), and 4
    # processes of 100M share 2 cores.
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(1)  # several processes share this machine's cores
    cfg = ModelConfig(preset=a.preset)
    torch.manual_seed(0)
    model = build_model(cfg)  # the same weights in every process
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(a.seed)

    def loss_of() -> torch.Tensor:
        x, y = batch(cfg, g, a.batch, a.seq)
        return model(x, y)[1]  # (logits, mean cross-entropy)

    if a.mode == "plain":
        t0 = time.monotonic()
        for _ in range(a.steps):
            loss = loss_of()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        say(kind="plain", params=n, peak_rss=peak_rss(), step_s=(time.monotonic() - t0) / a.steps)
        return

    from peer import Peer, PeerConfig, SwarmConfig, SyncConfig

    pcfg = PeerConfig(swarm=SwarmConfig(run_id="scale-bench", initial_peers=[a.join], host="127.0.0.1"),
                      sync=SyncConfig(every_steps=a.every_steps, matchmaking={"window": 60, "join_timeout": 15}, allreduce={"timeout": 300}))
    proc = psutil.Process()
    t0 = time.monotonic()
    with Peer(model, opt, pcfg) as peer:
        say(kind="joined", joined_s=time.monotonic() - t0, round=peer.round, t=time.time(),
            download_s=peer._rounds.last_download_s, state_mb=8 * n / 1e6 if peer._rounds.last_download_s else 0)
        first_round_s = None
        while peer.round < a.rounds:
            ts = time.time()
            r = peer.step(loss_of(), samples=a.batch)
            if r is None:  # a training step only (a step that synced includes the round)
                say(kind="step", t=ts, dt=time.time() - ts)
            if r is not None and r.ok:
                if first_round_s is None:
                    first_round_s = time.monotonic() - t0
                c = peer.round_costs[-1]
                say(kind="round", round=peer.round, members=len(r.members), rss=proc.memory_info().rss, peak_rss=peak_rss(),
                    matchmaking_s=c.matchmaking_s, transfer_s=c.transfer_s, local_s=c.local_s,
                    first_round_s=first_round_s, digest=peer.digest)
        say(kind="done", round=peer.round, digest=peer.digest, params=n, peak_rss=peak_rss())


if __name__ == "__main__":
    sys.exit(main())
