"""Convergence and efficiency of swarmtrain against centralized training, one command.

    sudo .venv/bin/python -m benchmarks.convergence            # all variants, seeds 0 1 (~30 min, 2 cores)
    .venv/bin/python -m benchmarks.convergence --report-only   # redraw table + plot from results.jsonl

Runs every variant of harness.VARIANTS for every seed, appends each result to
benchmarks/convergence/results.jsonl (runs already there with the same setup are reused
unless --fresh), then writes docs/img/convergence.png and the table between the
convergence markers in docs/benchmarks.md. Root is only needed to count wire bytes in a
private network namespace; without it the table shows payload bytes only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from . import report
from .harness import BY_NAME, REPO, VARIANTS, Setup, run, steps_for_tokens

RESULTS = REPO / "benchmarks" / "convergence" / "results.jsonl"
PNG = REPO / "docs" / "img" / "convergence.png"
DOC = REPO / "docs" / "benchmarks.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=[v.name for v in VARIANTS], choices=list(BY_NAME), metavar="NAME",
                    help=f"which variants (default: the comparison; also the outer-optimizer sweep: {', '.join(BY_NAME)})")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--peers", type=int, default=Setup.peers)
    ap.add_argument("--steps", type=int, default=Setup.steps, help="inner steps per worker")
    ap.add_argument("--tokens-per-param", type=float, default=0.0, metavar="K",
                    help="instead of --steps: train on K x N tokens in all (20 = Chinchilla-optimal, the DiLoCo "
                         "scaling-law study's regime)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--fresh", action="store_true", help="rerun even if results.jsonl has this run")
    ap.add_argument("--no-netns", action="store_true", help="do not count wire bytes in a network namespace")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/ (plot and table to --results' folder)")
    a = ap.parse_args(argv)
    if a.tokens_per_param < 0:
        ap.error("--tokens-per-param must be > 0")
    if a.tokens_per_param:
        a.steps = steps_for_tokens(a.tokens_per_param, peers=a.peers, batch_size=Setup.batch_size)
        print(f"{a.tokens_per_param:g} tokens per parameter: {a.steps} inner steps per worker, {a.peers} worker(s)",
              flush=True)
    try:
        setup = Setup(peers=a.peers, steps=a.steps)
    except ValueError as e:
        ap.error(str(e))
    key = dataclasses.asdict(setup)
    key["model"] = list(key["model"])
    rows = _load(a.results, key)
    if not a.report_only:
        for seed in a.seeds:
            for name in a.variants:
                if not a.fresh and any(r["variant"] == name and r["seed"] == seed for r in rows):
                    print(f"{name} seed {seed}: reusing the recorded result", flush=True)
                    continue
                t = time.monotonic()
                with tempfile.TemporaryDirectory(prefix=f"conv-{name}-") as work:
                    res = run(BY_NAME[name], setup, seed, Path(work), netns=not a.no_netns)
                row = {**dataclasses.asdict(res), "setup": key, "machine": report.machine(), "time": time.time()}
                rows = [r for r in rows if not (r["variant"] == name and r["seed"] == seed)] + [row]
                a.results.parent.mkdir(parents=True, exist_ok=True)
                with a.results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{name} seed {seed}: val {res.val_final:.4f}, {res.payload_bytes_per_peer / 1e6:.1f} MB/peer, "
                      f"{res.wall_s:.0f}s, utilization {res.utilization:.3f} ({time.monotonic() - t:.0f}s)", flush=True)
    if a.report_only:  # everything recorded for this setup: the comparison and any sweep runs
        rows = [r for r in rows if r["variant"] in BY_NAME]
    else:
        rows = [r for r in rows if r["variant"] in a.variants and r["seed"] in a.seeds]
    if not rows:
        print("no results to report", file=sys.stderr)
        return 1
    png = (a.results.parent / "convergence.png") if a.no_doc else PNG
    seeds = sorted({r["seed"] for r in rows})
    drawn = report.plot(rows, png, f"byte-level GPT on the stdlib corpus, {setup.peers} workers, seeds {seeds}")
    text = report.section(rows, key, png, "sudo .venv/bin/python -m benchmarks.convergence")
    print(text)
    if not a.no_doc:
        report.update_doc(DOC, text)
        print(f"wrote {PNG.relative_to(REPO) if drawn else 'no plot'} and the convergence section of "
              f"{DOC.relative_to(REPO)}")
    return 0


def _load(path: Path, key: dict) -> list[dict]:
    """The recorded runs with this exact setup (the newest per variant and seed)."""
    if not path.exists():
        return []
    rows: dict[tuple[str, int], dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("setup") == key:
                rows[(r["variant"], r["seed"])] = r
    return list(rows.values())


if __name__ == "__main__":
    sys.exit(main())
