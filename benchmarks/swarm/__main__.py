"""Every volunteer's work counts: mixed speeds, more peers than a group holds, a peer killed
mid-transfer, a late joiner. 8 (or 3–4) real peer processes on 127.0.0.1.

    .venv/bin/python -m benchmarks.swarm [--only NAME ...] [--rounds 8]

Each peer (benchmarks/swarm/worker.py) trains a small MLP through the Python API with its
compute per step emulated (`step_s × slow` of wall time), so that relative speeds hold on
a 2-core machine. Per scenario it prints one Markdown row:
  - share of computed samples that reached an average: Σ averaged / Σ (averaged + discarded)
    (samples still pending when a peer stops, i.e. trained after its last round, are not in
    either: they had no round to go into);
  - fast peers' time blocked in sync: mean of sync_wait_s / wall_s over the peers with slow = 1;
  - rounds: the swarm's last round, and failed attempts summed over peers;
  - agreement: every peer that finished ends at the same round and θ_sync digest;
  - val loss: MSE of the swarm's θ_sync on a fixed validation set at the end.
Results are appended to benchmarks/swarm/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from averaging.dht import SwarmDHT

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    slow: tuple[float, ...]  # one entry per peer: its compute slowdown
    every_steps: int = 40
    every_seconds: float = 0.0
    max_group: int = 64
    crash: int | None = None  # index of a peer SIGKILLed mid-transfer of round 3
    late: int | None = None  # index of a peer started LATE_S after the others
    max_stale: int | None = None  # sync.max_stale_rounds; 0 = drop a left-out peer's work (before 2026-12)


LATE_S = 15.0
SCENARIOS = (
    Scenario(name="8 equal peers, one group", slow=(1,) * 8),
    Scenario(name="8 peers, max_group_size 3", slow=(1,) * 8, max_group=3),
    Scenario(name="3 peers, one 4x slower, every 40 steps", slow=(1, 1, 4)),
    Scenario(name="3 peers, one 8x slower, every 40 steps", slow=(1, 1, 8)),
    Scenario(name="3 peers, one 12x slower, every 40 steps", slow=(1, 1, 12)),
    Scenario(name="3 peers, one 4x slower, every 4 s", slow=(1, 1, 4), every_steps=0, every_seconds=4.0),
    Scenario(name="3 peers, one 8x slower, every 4 s", slow=(1, 1, 8), every_steps=0, every_seconds=4.0),
    Scenario(name="3 peers, one 12x slower, every 4 s", slow=(1, 1, 12), every_steps=0, every_seconds=4.0),
    Scenario(name="8 peers, max_group_size 3, every 4 s", slow=(1,) * 8, max_group=3, every_steps=0, every_seconds=4.0),
    # The stale-contribution rule against dropping a left-out peer's work, on the loss:
    Scenario(name="3 peers, one 12x slower, every 40 steps, work dropped", slow=(1, 1, 12), max_stale=0),
    Scenario(name="4 peers, one SIGKILLed mid-transfer", slow=(1,) * 4, crash=3),
    Scenario(name="4 peers, one joins 15 s late", slow=(1,) * 4, late=3),
)


def run(sc: Scenario, rounds: int, work: Path) -> dict:
    boot = SwarmDHT.start(f"bench-{SCENARIOS.index(sc)}", host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    procs: list[subprocess.Popen] = []
    try:
        addr = boot.visible_maddrs()[0]

        def spawn(i: int) -> subprocess.Popen:
            args = [sys.executable, "-m", "benchmarks.swarm.worker", "--join", addr, "--out", str(work / f"{i}.json"),
                    "--run-id", boot.run_id, "--seed", str(i), "--slow", str(sc.slow[i]),
                    "--every-steps", str(sc.every_steps), "--every-seconds", str(sc.every_seconds),
                    "--max-group", str(sc.max_group), "--rounds", str(rounds),
                    *(["--crash-at-round", "3"] if sc.crash == i else []),
                    *(["--max-stale", str(sc.max_stale)] if sc.max_stale is not None else [])]
            return subprocess.Popen(args, cwd=REPO, stdout=open(work / f"{i}.log", "w"), stderr=subprocess.STDOUT,
                                    start_new_session=True)

        procs = [spawn(i) for i in range(len(sc.slow)) if i != sc.late]
        if sc.late is not None:
            time.sleep(LATE_S)  # the scenario itself: a peer that arrives after the swarm has started
            procs.append(spawn(sc.late))
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        boot.shutdown()
    peers = [json.loads((work / f"{i}.json").read_text()) for i in range(len(sc.slow)) if (work / f"{i}.json").exists()]
    averaged, discarded = sum(p["averaged"] for p in peers), sum(p["discarded"] for p in peers)
    fast = [p["wait_s"] / p["wall_s"] for p in peers if p["slow"] == 1]
    return dict(
        scenario=sc.name, peers=len(sc.slow), finished=len(peers),
        share_averaged=averaged / max(averaged + discarded, 1), fast_blocked=sum(fast) / max(len(fast), 1),
        last_round=max((p["round"] for p in peers), default=0), failed=sum(p["rounds_failed"] for p in peers),
        agree=len({(p["round"], p["digest"]) for p in peers}) == 1,
        val_loss=min((p["val_loss"] for p in peers if p["round"] == max(q["round"] for q in peers)), default=float("nan")),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="scenario names (substrings) to run")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--keep", type=Path, default=None, help="keep each scenario's peer logs and summaries under this folder")
    a = ap.parse_args()
    chosen = [s for s in SCENARIOS if not a.only or any(o in s.name for o in a.only)]
    print("| scenario | samples in an average | fast peers blocked | last round, failed attempts | agree | val loss |")
    print("|---|---|---|---|---|---|")
    for sc in chosen:
        if a.keep is not None:
            work = a.keep / f"{SCENARIOS.index(sc):02d}"
            work.mkdir(parents=True, exist_ok=True)
            r = run(sc, a.rounds, work)
        else:
            with tempfile.TemporaryDirectory(prefix="swarm-bench-") as d:
                r = run(sc, a.rounds, Path(d))
        r.update(machine=f"{platform.node()} {platform.processor() or platform.machine()}", date=time.strftime("%Y-%m-%d"),
                 rounds=a.rounds)
        with open(REPO / "benchmarks" / "swarm" / "results.jsonl", "a") as f:
            f.write(json.dumps({**r, **asdict(sc)}) + "\n")
        print(f"| {sc.name} | {r['share_averaged']:.1%} | {r['fast_blocked']:.0%} | {r['last_round']}, {r['failed']} | "
              f"{'yes' if r['agree'] else 'NO'} ({r['finished']}/{r['peers']} finished) | {r['val_loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
