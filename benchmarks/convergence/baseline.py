"""Centralized baselines for the convergence benchmark: one process, or torch DDP over gloo.

    python -m benchmarks.convergence.baseline --mode single --steps 3200 --out single.json
    python -m benchmarks.convergence.baseline --mode ddp --rank R --world 4 --port P ... (x4)

Same model, data, optimizer and validation windows as `swarm-peer` (peer/train.py), so the
only difference to a swarm worker is how the workers communicate. DDP gets a comm hook
that all-reduces each gradient bucket synchronously and times it: that makes "time spent
waiting for the network" exact (compute utilization) and counts the bytes. On a CPU-only
machine DDP's usual overlap of all-reduce with backward buys little: both compete for the
same cores.
"""
# (no `from __future__ import annotations`: DDP inspects the comm hook's annotations at runtime)

import argparse
import json
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from peer.data import BatchSampler, DataConfig, estimate_loss, load_corpus
from peer.model import ModelConfig, build_model


class _CommStats:
    def __init__(self, world: int) -> None:
        self.world = world
        self.seconds = 0.0
        self.payload_bytes = 0.0


def _timed_allreduce_hook(state: _CommStats, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buf = bucket.buffer()  # flat gradients of one bucket, [numel]
    t = time.perf_counter()
    dist.all_reduce(buf)  # blocking: the time below is time not spent computing
    buf.div_(state.world)
    state.seconds += time.perf_counter() - t
    # Per-worker volume of a ring all-reduce (reduce-scatter + all-gather): 2(n-1)/n x size.
    state.payload_bytes += 2 * (state.world - 1) / state.world * buf.numel() * buf.element_size()
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buf)
    return fut


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("single", "ddp"), required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--max-bytes", type=int, default=8_000_000)
    ap.add_argument("--out", required=True)
    a, model_flags = ap.parse_known_args(argv)
    t_start = time.monotonic()
    torch.set_num_threads(1)
    mcfg = ModelConfig(**{f.removeprefix("--model.").replace("-", "_"): int(v)
                          for f, v in zip(model_flags[::2], model_flags[1::2])})
    corpus = load_corpus(DataConfig(max_bytes=a.max_bytes), block_size=mcfg.block_size)
    model = build_model(mcfg, seed=a.seed)  # the same initial weights as every swarm peer with this seed
    stats = _CommStats(a.world)
    if a.mode == "ddp":
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank,
                                world_size=a.world, timeout=timedelta(minutes=5))
        net: torch.nn.Module = DistributedDataParallel(model)
        net.register_comm_hook(stats, _timed_allreduce_hook)
        shard = (a.rank, a.world)  # disjoint data per worker, as the swarm's workers get
    else:
        net, shard = model, None
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    sampler = iter(BatchSampler(corpus.train, block_size=mcfg.block_size, batch_size=a.batch_size, shard=shard,
                                seed=a.seed * 1000 + a.rank))

    def val() -> float:
        return estimate_loss(model, corpus.val, block_size=mcfg.block_size, batch_size=a.batch_size,
                             n_batches=a.eval_batches, device=torch.device("cpu"))

    val_start = val()
    curve = [(0, val_start)]
    t_train = time.monotonic()
    for step in range(1, a.steps + 1):
        x, y = next(sampler)  # [B, T] each
        _, loss = net(x, y)
        loss.backward()  # DDP: buckets are all-reduced (and timed) inside backward
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % a.eval_every == 0 or step == a.steps:
            curve.append((step * a.batch_size, val()))  # this worker's samples
    train_s = time.monotonic() - t_train
    summary = {
        "val_start": val_start, "val_final": curve[-1][1], "curve": curve, "payload_bytes": stats.payload_bytes,
        "comm_s": stats.seconds, "utilization": 1 - stats.seconds / max(train_s, 1e-9),
        "wall_s": time.monotonic() - t_start,
    }
    if a.mode == "ddp":
        dist.destroy_process_group()
    with open(a.out, "w") as f:
        json.dump(summary, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
