"""End to end over emulated home links: bytes per sync, compute utilization, round time and
final loss of real swarm-peer processes, one variant per codec and schedule (issue 16).

    sudo .venv/bin/python -m benchmarks.wan [--rate 100mbit] [--peers 4] [--rounds 6] [--variants ...]

A bootstrap node and N peers, each in its own network namespace (198.18.0.0/15, a bridge,
tc tbf on both directions of every link, see benchmarks/allreduce/netns.py). Every peer is
told only the bootstrap node's address. Each variant trains the same GPT from the same
seed for the same number of rounds (H inner steps each), so the samples are the same:

    fp32            blocking syncs, dense fp32
    int8            blocking, int8 with error feedback
    sparse          blocking, the sparse codec (top-32 of 4096 values, 2 bits)
    sparse-overlap  the sparse codec, and training goes on during the round (--sync.overlap,
                    the outer step applied one round late)
    sparse-stream   the sparse codec, streaming: the parameters in 2 fragments, one averaged
                    every H/2 steps while training goes on (--sync.fragments 2), twice the
                    rounds, so each fragment is averaged every H steps and the samples match

Reported per variant: bytes sent per peer per sync of the whole model, i.e. per H steps (the
namespaces' eth0 tx_bytes counters, everything included: DHT, matchmaking, gloo; a streaming
round moves half of it) and the all-reduce payload alone (the peers' own byte counts), compute utilization (training time not
blocked in sync, over wall time, from each peer's summary), mean round time, the share of
rounds in which all N peers were in the group, final validation loss (mean over peers) and
whether all peers end at the same θ_sync. Rows go to benchmarks/wan/results.jsonl and a
Markdown table is printed for docs/benchmarks.md.
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
from dataclasses import dataclass
from pathlib import Path

from benchmarks.allreduce import netns

REPO = Path(__file__).resolve().parents[2]
# The 25M preset (25.5M parameters): a dense fp32 round at 100 Mbit/s among 4 peers moves
# 1.5 × 102 MB per peer (14 s on the wire), against about 7 s of compute for H = 8 steps of
# one 64-token window per peer on this 2-core machine (4 peers share it): blocking fp32
# spends most of its time in sync.
# (A smaller model makes the swarm's control traffic, about 0.2 MB per peer and round, the
# larger part of a sparse round.)
MODEL = ["--model.preset", "25M", "--model.block-size", "64", "--data.batch-size", "1"]


@dataclass(frozen=True)
class Variant:
    name: str
    codec: str
    overlap: bool = False
    fragments: int = 1


VARIANTS = {v.name: v for v in (Variant("fp32", "fp32"), Variant("int8", "int8"), Variant("sparse", "sparse"),
                                Variant("sparse-overlap", "sparse", overlap=True),
                                Variant("sparse-stream", "sparse", fragments=2))}


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


def tx_bytes(i: int) -> int:
    out = subprocess.run(["ip", "netns", "exec", netns.host_ns(i), "cat", "/sys/class/net/eth0/statistics/tx_bytes"],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def run_variant(v: Variant, n: int, rounds: int, every: int, work: Path) -> dict:
    if every % v.fragments:
        raise SystemExit(f"--every-steps {every} is not a multiple of {v.fragments} fragments")
    syncs = rounds  # whole-model syncs: a streaming variant runs `fragments` rounds per sync, each of 1/fragments
    rounds, every = rounds * v.fragments, every // v.fragments  # the same samples, each fragment every H steps
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []

    def spawn(i: int, name: str, args: list[str]) -> Path:
        log = work / f"{name}.log"
        procs.append(subprocess.Popen(["ip", "netns", "exec", netns.host_ns(i), sys.executable, *args], cwd=REPO,
                                      env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True))
        return log

    before = [tx_bytes(i) for i in range(1, n + 1)]
    try:
        boot = spawn(0, "boot", ["-m", "bootstrap", "--identity", str(work / "boot.key"), "--host", netns.host_addr(0),
                                 "--port", "31337", "--monitor-every", "0", "--maddrs-file", str(work / "boot.maddrs"),
                                 "--ledger", str(work / "ledger.json")])
        join = wait_line(boot, r"(/ip4/198\.18\.\S+)", procs[0]).group(1)
        logs = []
        for i in range(1, n + 1):  # every peer knows only the bootstrap node (see docs/operations.md)
            logs.append(spawn(i, f"peer{i}", [
                "-m", "peer", "--join", join, "--swarm.host", netns.host_addr(i), "--train.threads", "1", *MODEL,
                "--sync.every-steps", str(every), "--train.max-rounds", str(rounds), "--sync.matchmaking.window", "30",
                "--sync.allreduce.timeout", "60", "--sync.codec.name", v.codec, "--data.max-bytes", "2000000",
                "--train.eval-batches", "4", "--train.summary-file", str(work / f"peer{i}.json"), "--train.seed", "0",
                "--sync.fragments", str(v.fragments), *(["--sync.overlap"] if v.overlap else [])]))
        for p in procs[1:]:
            if p.wait(timeout=1200) != 0:
                raise RuntimeError(f"a peer failed; see the logs in {work}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
    sent = [tx_bytes(i) - b for i, b in zip(range(1, n + 1), before)]
    sums = [json.loads((work / f"peer{i}.json").read_text()) for i in range(1, n + 1)]
    groups = [int(k) for log in logs for k in re.findall(r"round \d+ complete: (\d+) peers", log.read_text())]
    return {
        "variant": v.name, "codec": v.codec, "overlap": v.overlap or v.fragments > 1, "fragments": v.fragments,
        "peers": n, "rounds": rounds, "every_steps": every,
        "bytes_per_peer_per_sync": statistics.mean(sent) / syncs,
        "bytes_per_peer_per_round": statistics.mean(sent) / rounds,
        "payload_per_peer_per_sync": statistics.mean(s["bytes_sent"] for s in sums) / syncs,
        "utilization_mean": statistics.mean(s["compute_utilization"] for s in sums),
        "utilization_min": min(s["compute_utilization"] for s in sums),
        "round_s_mean": statistics.mean(s["round_s_mean"] for s in sums),
        "full_groups": sum(1 for k in groups if k == n) / max(len(groups), 1),
        "rounds_done": min(s["rounds"] for s in sums),
        "val_loss_final": statistics.mean(s["val_loss_final"] for s in sums),
        "agree": len({s["digest"] for s in sums}) == 1,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--every-steps", type=int, default=8, help="H (a multiple of the streaming variant's 2 fragments)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces): sudo .venv/bin/python -m benchmarks.wan", file=sys.stderr)
        return 2
    rows = []
    try:
        netns.setup(args.peers + 1, args.rate)
        for name in args.variants:
            with tempfile.TemporaryDirectory(prefix=f"swarm-wan-{name}-") as d:
                row = run_variant(VARIANTS[name], args.peers, args.rounds, args.every_steps, Path(d))
            row.update(rate=args.rate, date=time.strftime("%Y-%m-%d"),
                       machine=f"{platform.machine()}, {os.cpu_count()} cores")
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(Path(__file__).resolve().parent / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    finally:
        netns.teardown()
    fp32 = next((r for r in rows if r["variant"] == "fp32"), None)
    print("| variant | on the wire per peer per sync | vs fp32 | all-reduce payload per peer per sync | vs fp32 | "
          "compute utilization (mean / min) | round time | groups of all peers | final val loss | vs fp32 | agree |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fewer = f"{fp32['bytes_per_peer_per_sync'] / r['bytes_per_peer_per_sync']:.0f}× fewer" if fp32 else "–"
        pfewer = f"{fp32['payload_per_peer_per_sync'] / r['payload_per_peer_per_sync']:.0f}× fewer" if fp32 else "–"
        dloss = f"{100 * (r['val_loss_final'] / fp32['val_loss_final'] - 1):+.1f}%" if fp32 else "–"
        print(f"| {r['variant']} | {r['bytes_per_peer_per_sync'] / 1e6:.3f} MB | {fewer} | "
              f"{r['payload_per_peer_per_sync'] / 1e6:.3f} MB | {pfewer} | {r['utilization_mean']:.3f} / "
              f"{r['utilization_min']:.3f} | {r['round_s_mean']:.2f} s | {100 * r['full_groups']:.0f}% | "
              f"{r['val_loss_final']:.3f} | {dloss} | {'yes' if r['agree'] else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
