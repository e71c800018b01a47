"""A peer's local work per round, alone on one thread, no network (issue 15):

    python -m benchmarks.scale.local --preset 100M

Δ = θ_sync − θ_local into the round buffer, the in-place outer step, writing θ_sync into the
parameters, and the sha256 digest of θ_sync (hashed in a background thread by a peer).
Prints the median of 3 repetitions of each, in seconds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from averaging.config import OuterConfig
from averaging.flat import tensor_digest
from averaging.outer import OuterOptimizer
from peer.config import ModelConfig
from peer.model import build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="100M")
    a = ap.parse_args()
    torch.set_num_threads(1)
    params = list(build_model(ModelConfig(preset=a.preset)).parameters())
    opt = OuterOptimizer.from_params(params, OuterConfig())
    buf = opt.round_buffer()
    times: dict[str, list[float]] = {"delta": [], "outer_step": [], "write_params": [], "digest": []}
    for _ in range(3):
        t0 = time.perf_counter()
        opt.pseudo_gradient_(params, buf)
        t1 = time.perf_counter()
        opt.apply(buf)
        t2 = time.perf_counter()
        o = 0
        with torch.no_grad():
            for p in params:
                p.copy_(opt.theta_sync[o : o + p.numel()].view_as(p))
                o += p.numel()
        t3 = time.perf_counter()
        tensor_digest(opt.theta_sync)
        t4 = time.perf_counter()
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[k].append(v)
    print(json.dumps({"preset": a.preset, "params": opt.numel, **{k: round(statistics.median(v), 3) for k, v in times.items()}}))


if __name__ == "__main__":
    main()
