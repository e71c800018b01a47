"""Compute utilization of real swarm-peer processes on emulated WAN links: sync vs overlap.

    sudo .venv/bin/python -m benchmarks.utilization [--rate 100mbit] [--peers 4] [--rounds 6]

A bootstrap node and N peers, each in its own network namespace (198.18.0.0/15, tc tbf on
both directions of every link, see benchmarks/allreduce/netns.py). Every peer trains a
wider GPT (so that averaging takes noticeable time at 100 Mbit/s) for a fixed number of
rounds, once with blocking syncs and once with --sync.overlap. Compute utilization is the
fraction of training wall time not spent blocked in sync (from each peer's summary).
Results are printed as a Markdown table and appended to benchmarks/utilization.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.allreduce import netns

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--model.n-embd", "256", "--model.n-layer", "4", "--model.n-head", "8"]  # ~3.2M params, 12.8 MB


def wait_line(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text(errors="replace")) if path.exists() else None
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"{path.name} exited with {proc.returncode}:\n{path.read_text()[-2000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"{path.name}: no line matching {pattern!r} within {timeout}s")


def run_mode(n: int, rounds: int, every: int, overlap: bool, work: Path) -> dict:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []

    def spawn(i: int, name: str, args: list[str]) -> Path:
        log = work / f"{name}.log"
        procs.append(subprocess.Popen(["ip", "netns", "exec", netns.host_ns(i), sys.executable, *args], cwd=REPO,
                                      env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT))
        return log

    try:
        boot = spawn(0, "boot", ["-m", "bootstrap", "--identity", str(work / "boot.key"), "--host", netns.host_addr(0),
                                 "--port", "31337", "--monitor-every", "0", "--maddrs-file", str(work / "boot.maddrs"),
                                 "--ledger", str(work / "ledger.json")])
        joins = [wait_line(boot, r"(/ip4/198\.18\.\S+)", procs[0]).group(1)]
        for i in range(1, n + 1):
            # p2pd treats 198.18.0.0/15 as unroutable: give each peer every earlier peer directly.
            log = spawn(i, f"peer{i}", ["-m", "peer", *sum((["--join", j] for j in joins), []),
                                        "--swarm.host", netns.host_addr(i), "--train.threads", "1", *MODEL,
                                        "--sync.every-steps", str(every), "--train.max-rounds", str(rounds),
                                        "--sync.matchmaking-window", "30", "--data.max-bytes", "2000000",
                                        "--train.eval-batches", "2", "--train.summary-file", str(work / f"peer{i}.json"),
                                        *(["--sync.overlap"] if overlap else [])])
            joins.append(wait_line(log, r"others can join through this peer: (\S+)", procs[-1]).group(1))
        for p in procs[1:]:
            if p.wait(timeout=900) != 0:
                raise RuntimeError("a peer failed; see logs in " + str(work))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
    sums = [json.loads((work / f"peer{i}.json").read_text()) for i in range(1, n + 1)]
    return {
        "overlap": overlap, "peers": n, "rounds": rounds, "every_steps": every,
        "utilization_mean": statistics.mean(s["compute_utilization"] for s in sums),
        "utilization_min": min(s["compute_utilization"] for s in sums),
        "sync_wait_s_mean": statistics.mean(s["sync_wait_s"] for s in sums),
        "wall_s_mean": statistics.mean(s["wall_s"] for s in sums),
        "val_loss_final": statistics.mean(s["val_loss_final"] for s in sums),
        "agree": len({s["digest"] for s in sums}) == 1,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--every-steps", type=int, default=20)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    rows = []
    try:
        netns.setup(args.peers + 1, args.rate)
        for overlap in (False, True):
            with tempfile.TemporaryDirectory(prefix="swarm-util-") as d:
                row = run_mode(args.peers, args.rounds, args.every_steps, overlap, Path(d))
            row.update(rate=args.rate, machine=f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}")
            rows.append(row)
    finally:
        netns.teardown()
    print("| mode | peers | link | H | rounds | compute utilization (mean / min) | blocked in sync per peer | wall | final val loss | agree |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'overlap' if r['overlap'] else 'blocking'} | {r['peers']} | {r['rate']} | {r['every_steps']} | {r['rounds']} "
              f"| {r['utilization_mean']:.3f} / {r['utilization_min']:.3f} | {r['sync_wait_s_mean']:.1f} s "
              f"| {r['wall_s_mean']:.0f} s | {r['val_loss_final']:.3f} | {'yes' if r['agree'] else 'NO'} |")
    with open(REPO / "benchmarks" / "utilization.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
