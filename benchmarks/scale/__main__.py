"""Scale benchmark (issue 15): memory, per-round cost and state transfer of the embedded GPT at
25M-100M parameters, with real peer processes on 127.0.0.1.

    python -m benchmarks.scale --preset 100M --peers 3 --rounds 10

1. The plain training loop (same model, AdamW, no swarm): its peak RSS is the baseline.
2. A DHT node and `--peers` peer processes train together (H = --every-steps); when they
   reach round 2, `--late` more peers join late and must download the state and take part.
3. Reported: peak RSS and overhead over the plain loop in bytes per parameter, RSS after
   round 2 and after the last round, the per-round time split (matchmaking, transfer, the
   peer's own local work), the late joiners' download and time to their first round, and
   whether every peer ends at the same digest. One JSON line is appended to
   benchmarks/scale/results.jsonl; a Markdown row is printed for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from averaging.dht import SwarmDHT

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


class Worker:
    """A worker process and the JSON lines it has printed (read by a thread it owns)."""

    def __init__(self, name: str, args: list[str]) -> None:
        self.name = name
        self.lines: list[dict] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.scale.worker", *args], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=open(f"/tmp/scale-{name}.log", "w"),
                                     text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name=f"scale-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.append(json.loads(line))

    def of(self, kind: str) -> list[dict]:
        return [x for x in list(self.lines) if x.get("kind") == kind]

    def round(self) -> int:
        rounds = self.of("round")
        return rounds[-1]["round"] if rounds else 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(timeout=5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="25M")
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--late", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--every-steps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=3600)
    a = ap.parse_args()

    plain = Worker("plain", ["plain", "--preset", a.preset, "--steps", "10"])
    plain.proc.wait()
    plain._reader.join()
    base = plain.of("plain")[0]
    P = base["params"]
    print(f"plain loop: {P:,} parameters, peak RSS {base['peak_rss'] / 1e9:.2f} GB, {base['step_s']:.2f} s/step", flush=True)

    boot = SwarmDHT.start("scale-bench", host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    addr = boot.visible_maddrs()[0]
    common = ["--preset", a.preset, "--join", addr, "--rounds", str(a.rounds), "--every-steps", str(a.every_steps)]
    peers = [Worker(f"p{i}", ["peer", *common, "--seed", str(i + 1)]) for i in range(a.peers)]
    late: list[Worker] = []
    deadline = time.monotonic() + a.timeout
    try:
        while time.monotonic() < deadline:
            time.sleep(1)
            if not late and min(w.round() for w in peers) >= 2:
                late = [Worker(f"late{i}", ["peer", *common, "--seed", str(100 + i)]) for i in range(a.late)]
            if all(w.proc.poll() is not None for w in peers + late) and (late or a.late == 0):
                break
            for w in peers + late:
                if w.proc.poll() not in (None, 0):
                    raise SystemExit(f"{w.name} exited with {w.proc.returncode}: see /tmp/scale-{w.name}.log")
        else:
            raise SystemExit("timed out")
    finally:
        for w in peers + late:
            w.stop()
        boot.shutdown()

    everyone = peers + late
    done = [w.of("done")[0] for w in everyone if w.of("done")]
    top = max(d["round"] for d in done)
    rounds = [r for w in peers for r in w.of("round")]
    rss_at = lambda w, k: next((r["rss"] for r in w.of("round") if r["round"] == k), None)  # noqa: E731
    growth = [(rss_at(w, a.rounds) - rss_at(w, 2)) / rss_at(w, 2) for w in peers if rss_at(w, 2) and rss_at(w, a.rounds)]
    peak = max(d["peak_rss"] for w in peers for d in w.of("done"))
    joined = [w.of("joined")[0] for w in late]
    res = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "preset": a.preset, "params": P, "peers": a.peers, "late": a.late, "rounds": a.rounds, "H": a.every_steps,
        "plain_peak_gb": base["peak_rss"] / 1e9, "peer_peak_gb": peak / 1e9,
        "overhead_b_per_param": (peak - base["peak_rss"]) / P,
        "rss_growth_round2_to_last": max(growth) if growth else None,
        "matchmaking_s": statistics.median(r["matchmaking_s"] for r in rounds),
        "transfer_s": statistics.median(r["transfer_s"] for r in rounds),
        "local_s": statistics.median(r["local_s"] for r in rounds),
        "download_s": [j["download_s"] for j in joined], "state_mb": [j["state_mb"] for j in joined],
        "joined_s": [j["joined_s"] for j in joined],
        "late_first_round_s": [w.of("round")[0]["first_round_s"] if w.of("round") else None for w in late],
        "late_rounds": [len(w.of("round")) for w in late],
        "agree": len({d["digest"] for d in done if d["round"] == top}) == 1 and len(done) == len(everyone),
    }
    res["local_over_transfer"] = res["local_s"] / res["transfer_s"]
    # Did serving the state slow the donors' training? Their step times while a late joiner
    # was downloading, against the others (all processes share the 2 cores, the joiner too).
    windows = [(j["t"] - j["download_s"], j["t"]) for j in joined if j.get("download_s")]
    inside = [s["dt"] for w in peers for s in w.of("step") if any(a0 <= s["t"] <= a1 for a0, a1 in windows)]
    outside = [s["dt"] for w in peers for s in w.of("step") if not any(a0 - 5 <= s["t"] <= a1 + 5 for a0, a1 in windows)]
    if inside and outside:
        res["donor_step_s_during_download"] = statistics.median(inside)
        res["donor_step_s_otherwise"] = statistics.median(outside)
    with open(HERE / "results.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    print(json.dumps(res, indent=1))
    print(f"| {a.preset} | {res['plain_peak_gb']:.2f} GB | {res['peer_peak_gb']:.2f} GB | "
          f"{res['overhead_b_per_param']:+.1f} B/param | {100 * (res['rss_growth_round2_to_last'] or 0):+.1f}% | "
          f"{res['matchmaking_s']:.2f} / {res['transfer_s']:.2f} / {res['local_s']:.2f} s "
          f"({100 * res['local_over_transfer']:.0f}%) | "
          + ", ".join(f"{mb:.0f} MB in {s:.1f} s" for mb, s in zip(res["state_mb"], res["download_s"]) if s)
          + f" | {', '.join(f'{s:.0f} s' for s in res['late_first_round_s'] if s)} | {res['agree']} |")


if __name__ == "__main__":
    main()
