"""Hugging Face Llamas in a swarm against a plain `transformers` training loop (issue 18).

    python -m benchmarks.hf --presets llama-10M llama-100M

1. Token shards: `swarm-peer prepare` of the Python standard library's sources (8 MB) with a
   byte-level BPE of --vocab tokens trained on them (once; kept in --workdir).
2. Per preset, the plain loop: `LlamaForCausalLM` of the same config, AdamW, the same batches
   from the shards, one torch thread, no swarm: tokens/s (all steps but the first, batches
   included) and peak RSS. --peers of them run at once, as the swarm's peers do: the same
   share of this machine's cores and memory bandwidth.
3. Per preset, the swarm: a bootstrap node and --peers `swarm-peer` processes (one torch thread
   each, one core each on this 2-core machine) on the same shards, each its own data.shard,
   H = --every-steps, --rounds rounds: tokens/s per peer while training (steps, syncs and the
   evaluations between, from the summary's `tokens_per_s`), peak RSS, and the overhead over the
   plain loop in bytes per parameter; the last validation loss; whether the peers agree.
One JSON line per preset is appended to benchmarks/hf/results.jsonl and a Markdown row printed.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def plain(preset: str, vocab: int, data: str, batch: int, block: int, steps: int) -> None:
    """The baseline, in its own process: a plain transformers loop on the same batches."""
    import torch
    from transformers import LlamaForCausalLM

    from peer.config import ModelConfig
    from peer.hf import llama_config
    from peer.shards import WindowSampler, open_shards

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(ModelConfig(preset=preset, vocab_size=vocab)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sampler = WindowSampler(open_shards(data).train, block_size=block, batch_size=batch, shard=None, seed=0)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        x, y = next(sampler)
        loss = model(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()),
                      "tokens_per_s": batch * block * (steps - 1) / sum(times[1:]),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def swarm(preset: str, vocab: int, data: str, a: argparse.Namespace, work: Path) -> list[dict]:
    boot_log = open(work / f"{preset}-boot.log", "w")
    maddrs = work / f"{preset}.maddrs"
    maddrs.unlink(missing_ok=True)
    run_id = f"bench-{preset.lower()}"
    boot = subprocess.Popen([sys.executable, "-m", "bootstrap", "--identity", str(work / "boot.key"), "--host", "127.0.0.1",
                             "--port", "0", "--run-id", run_id, "--maddrs-file", str(maddrs), "--ledger", ""],
                            cwd=REPO, stdout=boot_log, stderr=subprocess.STDOUT, start_new_session=True)
    peers = []
    try:
        deadline = time.monotonic() + 60
        while not (maddrs.exists() and maddrs.read_text().strip()):
            if time.monotonic() > deadline or boot.poll() is not None:
                raise SystemExit(f"bootstrap node did not start: {work / f'{preset}-boot.log'}")
            time.sleep(0.2)
        addr = maddrs.read_text().split()[0]
        for i in range(a.peers):
            summary = work / f"{preset}-p{i}.json"
            summary.unlink(missing_ok=True)
            peers.append((summary, subprocess.Popen(
                [sys.executable, "-m", "peer", "--join", addr, "--swarm.run-id", run_id, "--swarm.host", "127.0.0.1",
                 "--model.preset", preset, "--model.vocab-size", str(vocab), "--model.block-size", str(a.block),
                 "--data.source", "shards", "--data.paths", data, "--data.batch-size", str(a.batch),
                 "--data.shard", f"{i}/{a.peers}", "--train.threads", "1", "--train.eval-batches", "2",
                 "--train.eval-every-rounds", "1000", "--sync.every-steps", str(a.every_steps),
                 "--sync.matchmaking.window", "120", "--sync.allreduce.timeout", "300", "--train.max-rounds", str(a.rounds),
                 "--train.summary-file", str(summary), "--log-format", "text"],
                cwd=REPO, stdout=open(work / f"{preset}-p{i}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)))
        for summary, p in peers:
            if p.wait(timeout=3600) != 0:
                raise SystemExit(f"peer failed: see {work / summary.name.replace('.json', '.log')}")
        return [json.loads(s.read_text()) for s, _ in peers]
    finally:
        for _, p in peers:
            if p.poll() is None:
                p.kill()
        boot.terminate()
        boot.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["llama-10M", "llama-100M"])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--every-steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--plain-steps", type=int, default=12)
    ap.add_argument("--workdir", default="/tmp/swarmtrain-bench-hf")
    ap.add_argument("--plain", nargs=1, metavar="PRESET", help=argparse.SUPPRESS)  # the baseline's own process
    ap.add_argument("--data", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.plain:
        return plain(a.plain[0], a.vocab, a.data, a.batch, a.block, a.plain_steps)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"stdlib-bpe{a.vocab}"
    if not data.exists():
        from peer.data import _read_capped, list_stdlib_files

        corpus = work / "stdlib"
        if not corpus.exists():
            for rel, content in _read_capped(list_stdlib_files(), 8_000_000):
                (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
                (corpus / rel).write_bytes(content)
        t = time.monotonic()
        subprocess.run([sys.executable, "-m", "peer", "prepare", str(corpus), "--out", str(data),
                        "--train-tokenizer", str(a.vocab)], cwd=REPO, check=True)
        print(f"prepared {data} in {time.monotonic() - t:.0f} s", flush=True)
    for preset in a.presets:
        loops = [subprocess.Popen([sys.executable, "-m", "benchmarks.hf", "--plain", preset, "--vocab", str(a.vocab),
                                   "--data", str(data), "--batch", str(a.batch), "--block", str(a.block),
                                   "--plain-steps", str(a.plain_steps)], cwd=REPO, stdout=subprocess.PIPE, text=True)
                 for _ in range(a.peers)]
        bases = [json.loads(p.communicate(timeout=3600)[0].strip().splitlines()[-1]) for p in loops]
        base = {"params": bases[0]["params"], "tokens_per_s": statistics.mean(b["tokens_per_s"] for b in bases),
                "peak_rss_mb": max(b["peak_rss_mb"] for b in bases)}
        sums = swarm(preset, a.vocab, str(data), a, work)
        P = base["params"]
        peak = max(s["peak_rss_mb"] for s in sums)
        res = {
            "date": str(date.today()), "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
            "preset": preset, "params": P, "vocab": a.vocab, "batch": a.batch, "block": a.block, "peers": a.peers,
            "H": a.every_steps, "rounds": [s["rounds"] for s in sums],
            "plain_tokens_per_s": round(base["tokens_per_s"], 1), "plain_peak_mb": round(base["peak_rss_mb"], 1),
            "peer_tokens_per_s": [s["tokens_per_s"] for s in sums], "peer_utilization": [s["compute_utilization"] for s in sums],
            "peer_peak_mb": peak, "overhead_b_per_param": round((peak - base["peak_rss_mb"]) * 2**20 / P, 1),
            "val_loss": [[round(s["val_loss_start"], 3), round(s["val_loss_final"], 3)] for s in sums],
            "agree": len({s["digest"] for s in sums}) == 1,
        }
        with (HERE / "results.jsonl").open("a") as f:
            f.write(json.dumps(res) + "\n")
        print(json.dumps(res), flush=True)
        print(f"| {preset} | {P / 1e6:.1f}M | {res['plain_tokens_per_s']:.0f} | "
              f"{' / '.join(f'{t:.0f}' for t in res['peer_tokens_per_s'])} | {res['plain_peak_mb'] / 1024:.2f} GB | "
              f"{peak / 1024:.2f} GB | {res['overhead_b_per_param']:+.1f} B/param | "
              f"{res['val_loss'][0][0]:.2f} → {res['val_loss'][0][1]:.2f} | {'yes' if res['agree'] else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
