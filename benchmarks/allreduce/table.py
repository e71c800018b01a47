"""Summary table from results.jsonl: one row per (N, link, S, codec), latest measurement of each.

    .venv/bin/python -m benchmarks.allreduce.table [--since 2026-11-23T21:50] [--write]

--write replaces results.md with the table (plus the machine line); without it, prints the table.
"""
from __future__ import annotations

import argparse
import json
import time

from .bench import HERE, RESULTS_JSONL, RESULTS_MD

# Records written before bench.py recorded the code version: which averaging/ code the workers ran,
# inferred from the commit log and averaging/allreduce.py's modification time (22:06:06, committed as 65bd00d).
INFERRED_CODE = [("2026-11-23T22:06:06", "65bd00d"), ("2026-11-23T21:50:31", "a4559e4")]
CODEC_ORDER = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3}
HEADER = (
    "| N | link | S (MB) | codec | B (MB/s) | ring bound (s, fp32) | gloo fp32 time (s) | gloo ratio | "
    "swarmtrain time (s) | ratio to fp32 bound | bytes on the wire per peer (MB) | CPU per worker | code |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def load(since: str) -> tuple[dict, dict, dict]:
    swarm, gloo, machine = {}, {}, {}
    for line in RESULTS_JSONL.read_text().splitlines():
        r = json.loads(line)
        if r["time"] < since:
            continue
        cfg = (r["N"], r["rate"], r["S_MB"])
        if r["method"] == "swarm":
            swarm[cfg + (r["codec"],)] = r  # later lines win
        elif r["method"] == "gloo":
            gloo[cfg] = r
        machine = r["machine"]
    return swarm, gloo, machine


def code_of(r: dict) -> str:
    if r["machine"].get("code"):
        return r["machine"]["code"]
    for since, code in INFERRED_CODE:
        if r["time"] >= since:
            return code + "*"
    return "?"


def wire_mb(r: dict) -> str:
    sent = [b for p in r["per_rank"] for b in p.get("bytes_sent", [])]
    return f"{max(sent) / 1e6:.1f}" if sent else "?"


def rows(since: str) -> tuple[list[str], dict]:
    swarm, gloo, machine = load(since)
    out = []
    rate_key = {"100mbit": 0, "1gbit": 1}
    for key in sorted(swarm, key=lambda k: (k[2], k[0], rate_key.get(k[1], 9), CODEC_ORDER.get(k[3], 9))):
        n, rate, s_mb, codec = key
        r = swarm[key]
        g = gloo.get((n, rate, s_mb))
        gt = f"{g['median_s']:.3f}" if g else "–"
        gr = f"{g['ratio']:.3f}" if g else "–"
        reps = len(r["times_s"])
        out.append(f"| {n} | {rate} | {s_mb:g} | {codec} | {r['B_MBps']:.2f} | {r['bound_s']:.3f} | {gt} | {gr} | "
                   f"{r['median_s']:.3f} ({reps} rep{'s' if reps > 1 else ''}) | **{r['ratio']:.3f}** | "
                   f"{wire_mb(r)} | {100 * r['cpu_per_worker']:.0f}% | {code_of(r)} |")
    return out, machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--since", default="2026-11-23T21:50", help="ignore records older than this ISO time")
    ap.add_argument("--write", action="store_true", help="write results.md")
    a = ap.parse_args()
    body, m = rows(a.since)
    table = HEADER + "\n" + "\n".join(body)
    if not a.write:
        print(table)
        return
    text = [
        "# All-reduce benchmark results", "",
        f"Machine: {m.get('nproc')} cores, {m.get('cpu_model')}, {m.get('mem_gb')} GiB, kernel {m.get('kernel')}, "
        f"torch {m.get('torch')}, Python {m.get('python')}. Generated {time.strftime('%Y-%m-%d %H:%M')} by "
        f"`python -m benchmarks.allreduce.table --write` from `results.jsonl` (records since {a.since}; "
        "latest per configuration).", "",
        "Time = median over repetitions of the slowest worker; ring bound = 2(N−1)/N·S/B with S the fp32 size and "
        "B the raw TCP bandwidth measured on the same links; ratio = time / that bound, for every codec. "
        "CPU = process CPU time / wall time per worker (100% = one core; all N workers share the machine's cores). "
        "Bytes on the wire = `RoundResult.bytes_sent` (per peer, payload only). code = commit of averaging/ the "
        "workers ran (* = inferred from the time of the record, for records written before bench.py stored it).", "",
        table, "",
    ]
    (HERE / RESULTS_MD.name).write_text("\n".join(text))
    print(f"wrote {RESULTS_MD}")


if __name__ == "__main__":
    main()
