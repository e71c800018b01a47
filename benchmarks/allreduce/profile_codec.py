"""Where one peer's CPU time goes in a compressed all-reduce round (no network).

    .venv/bin/python -m benchmarks.allreduce.profile_codec --peers 4 --size-mb 40 --codec int8

Replays, in one process on one torch thread (as in the benchmark workers), the local work that
averaging.allreduce._compressed_allreduce did (as of a4559e4) for one peer of an n-peer group: private copy
x = w·Δ, error-feedback encode of every part of every chunk, torch.cat of the parts, decode of the
n received parts of its own part + sum, error-feedback encode of the mean part, padding, decode of
all gathered parts, the result check and the residual commits. The received bytes are this peer's
own encoded parts (same sizes, same work). Since 65bd00d the own part is neither encoded nor decoded
(1/n less codec work than replayed here). Prints wall time per phase and the top torch ops.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from averaging.allreduce import PIPELINE_CHUNK, Compression, all_finite
from averaging.codecs import partition


def one_round(delta: torch.Tensor, n: int, r: int, comp: Compression, chunk: int, phases: dict) -> torch.Tensor:
    codec = comp.codec
    P = delta.numel()
    comp.ensure(P)
    clock = time.perf_counter

    t = clock()
    x = delta.detach().reshape(-1).to("cpu", torch.float32) * 1.0
    phases["copy w*delta"] += clock() - t
    chunks = [[(c0 + s, c0 + e) for s, e in partition(min(c0 + chunk, P) - c0, n)] for c0 in range(0, P, chunk)]
    pending = []
    scatters = []
    for parts in chunks:
        t = clock()
        encoded = []
        for s, e in parts:
            data, _, res = comp.contrib.compress(x[s:e], s)
            encoded.append(data)
            pending.append((comp.contrib, s, res))
        phases["encode contribution (EF)"] += clock() - t
        t = clock()
        part_bytes = codec.wire_bytes(parts[r][1] - parts[r][0])
        send = torch.cat(encoded)
        received = torch.empty(n * part_bytes, dtype=torch.uint8)
        for i in range(n):  # stands in for the bytes gloo writes
            received[i * part_bytes:(i + 1) * part_bytes] = encoded[r]
        phases["cat + receive buffer"] += clock() - t
        scatters.append((parts, received, part_bytes, send))
    gathers = []
    for parts, received, part_bytes, _ in scatters:
        my_s, my_e = parts[r]
        t = clock()
        acc = torch.zeros(my_e - my_s, dtype=torch.float32)
        for i in range(n):
            acc += codec.decode(received[i * part_bytes:(i + 1) * part_bytes], my_e - my_s)
        phases["decode n parts + sum"] += clock() - t
        t = clock()
        mean_data, _, res = comp.mean.compress(acc.div_(float(n)), my_s)
        pending.append((comp.mean, my_s, res))
        phases["encode mean part (EF)"] += clock() - t
        t = clock()
        max_bytes = codec.wire_bytes(max(e - s for s, e in parts))
        padded = torch.zeros(max_bytes, dtype=torch.uint8)
        padded[: mean_data.numel()] = mean_data
        gathered = [padded.clone() for _ in range(n)]  # stands in for the all-gather output
        phases["pad + gather buffers"] += clock() - t
        gathers.append((parts, gathered))
    t = clock()
    mean = torch.empty(P, dtype=torch.float32)
    for parts, gathered in gathers:
        for j, (s, e) in enumerate(parts):
            mean[s:e] = codec.decode(gathered[j][: codec.wire_bytes(e - s)], e - s)
    phases["decode gathered mean"] += clock() - t
    t = clock()
    ok = all_finite(mean)
    phases["result check (all_finite)"] += clock() - t
    t = clock()
    for fb, s, res in pending:
        fb.commit(s, res)
    phases["commit residuals"] += clock() - t
    assert ok
    return mean


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--size-mb", type=float, default=40.0)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=14)
    a = ap.parse_args()
    torch.set_num_threads(1)
    P = int(a.size_mb * 1e6) // 4
    delta = (torch.arange(P, dtype=torch.int64) * 7919 % 1000).to(torch.float32) / 1000.0 + 0.5
    comp = Compression.named(a.codec)
    one_round(delta, a.peers, 0, comp, PIPELINE_CHUNK, defaultdict(float))  # warm-up, allocates residuals
    phases: dict = defaultdict(float)
    t0 = time.perf_counter()
    for _ in range(a.repeats):
        one_round(delta, a.peers, 0, comp, PIPELINE_CHUNK, phases)
    total = (time.perf_counter() - t0) / a.repeats
    print(f"codec {a.codec}, N={a.peers}, S={a.size_mb:g} MB (P={P}), 1 thread: {total:.3f} s CPU per peer per round")
    for k, v in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {k:28s} {v / a.repeats:.3f} s  {100 * v / a.repeats / total:4.1f}%")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_round(delta, a.peers, 0, comp, PIPELINE_CHUNK, defaultdict(float))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))


if __name__ == "__main__":
    main()
