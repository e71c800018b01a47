"""Summarize convergence runs: a Markdown table, a PNG plot, and the section in docs/benchmarks.md."""
from __future__ import annotations

import os
import platform
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from .harness import BY_NAME, REPO, SWEEP, VARIANTS

BEGIN, END = "<!-- convergence:begin -->", "<!-- convergence:end -->"


def machine() -> str:
    import torch

    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPU cores{mem}, no GPU used, torch {torch.__version__}, Linux {platform.release()}"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


def aggregate(rows: list[dict[str, Any]], names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per variant: mean and half-range over seeds of every reported quantity."""
    out: dict[str, dict[str, Any]] = {}
    for name in names or list(BY_NAME):
        rs = [r for r in rows if r["variant"] == name]
        if not rs:
            continue
        finals = [r["val_final"] for r in rs]
        wires = [r["wire_bytes_per_peer"] for r in rs if r["wire_bytes_per_peer"] is not None]
        out[name] = {
            "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
            "val_mean": statistics.fmean(finals), "val_half_range": (max(finals) - min(finals)) / 2,
            "payload": statistics.fmean(r["payload_bytes_per_peer"] for r in rs),
            "wire": statistics.fmean(wires) if wires else None,
            "wall": statistics.fmean(r["wall_s"] for r in rs),
            "util": statistics.fmean(r["utilization"] for r in rs),
            "rounds": min(r["rounds"] for r in rs), "rounds_failed": max(r["rounds_failed"] for r in rs),
        }
    return out


def table(agg: dict[str, dict[str, Any]], ddp: dict[str, Any] | None) -> str:
    head = ("| variant | final val loss (mean ± half-range) | vs DDP | sent per peer (wire) | payload per peer "
            "| fewer bytes than DDP | wall time | compute utilization | rounds |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for name, a in agg.items():
        vs = f"{(a['val_mean'] / ddp['val_mean'] - 1) * 100:+.1f} %" if ddp else "n/a"
        key = "wire" if ddp and ddp["wire"] and a["wire"] else "payload"
        ratio = f"{ddp[key] / a[key]:.0f}×" if ddp and a[key] and name != "ddp" else ("1×" if name == "ddp" else "–")
        rounds = f"{a['rounds']}" + (f" ({a['rounds_failed']} retried)" if a["rounds_failed"] else "") if a["rounds"] else "–"
        val = f"{a['val_mean']:.4f} ± {a['val_half_range']:.4f}" if a["n"] > 1 else f"{a['val_mean']:.4f} (1 seed)"
        lines.append(f"| {BY_NAME[name].label} | {val} | {vs} "
                     f"| {_fmt_bytes(a['wire'])} | {_fmt_bytes(a['payload'])} | {ratio} | {a['wall']:.0f} s "
                     f"| {a['util'] * 100:.1f} % | {rounds} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Draw the loss curves into `path`; False (and a note) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:  # the `bench` extra; results and the table do not need it
        print(f"matplotlib is not installed (pip install -e '.[bench]'): {path.name} not drawn", file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for v in VARIANTS:
        name = v.name
        rs = [r for r in rows if r["variant"] == name]
        if not rs:
            continue
        # Mean over seeds on the first seed's evaluation points (seeds share the schedule).
        xs = np.array([p[0] for p in rs[0]["curve"]], dtype=float)
        ys = np.array([np.interp(xs, [p[0] for p in r["curve"]], [p[1] for p in r["curve"]]) for r in rs])
        style = {"single": ":", "ddp": "--"}.get(v.kind, "-")
        line, = ax.plot(xs, ys.mean(axis=0), style, marker="o", markersize=3, label=v.label)
        if len(rs) > 1:
            ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training samples, all workers together")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_ylim(top=min(3.2, ax.get_ylim()[1]))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def update_doc(doc: Path, section: str) -> None:
    """Replace the text between the convergence markers in `doc` (appended if missing)."""
    text = doc.read_text() if doc.exists() else ""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def section(rows: list[dict[str, Any]], setup: dict[str, Any], png: Path, command: str) -> str:
    main = aggregate(rows, [v.name for v in VARIANTS])
    seeds = sorted({r["seed"] for r in rows if r["variant"] in main})
    rel = os.path.relpath(png, REPO / "docs")
    text = (
        f"Produced by `{command}` on {rows[-1].get('machine', machine())}.\n"
        f"{setup['peers']} workers × {setup['steps']} inner steps × batch {setup['batch_size']} "
        f"(single peer: {setup['peers'] * setup['steps']} steps), seeds {seeds}; validation loss over "
        f"{setup['eval_batches']} fixed batches.\n\n"
        + table(main, main.get("ddp")) + f"\n![validation loss against training samples]({rel})\n"
    )
    sweep = aggregate(rows, ["diloco-h50", *(v.name for v in SWEEP)])
    if len(sweep) > 1:
        seeds = sorted({r["seed"] for r in rows if r["variant"] in sweep})
        text += (f"\nSweep of outer optimizers, sync intervals and the sparse codec (`--variants {' '.join(v.name for v in SWEEP)}`), "
                 f"same setup; DDP as above:\n\n" + table(sweep, main.get("ddp")))
    return text
