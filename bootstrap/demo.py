"""A local demo swarm: one bootstrap node and N peers on 127.0.0.1 train the embedded model.

    python -m bootstrap.demo            # 3 peers, 8 sync rounds, ends with a summary

Each peer is a real `swarm-peer` process; the demo only starts them, relays their round
lines, and checks the result: final loss per peer, rounds, and whether parameters agree.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from averaging.identity import short_id
from peer.state import CheckpointDir

PY = sys.executable


def _relay(name: str, stream, keep: list[str]) -> None:
    """Print a peer's interesting lines, prefixed with its name (runs in an owned thread)."""
    for raw in stream:
        line = raw.rstrip()
        keep.append(line)
        if any(k in line for k in ("validation loss", "joined run", "live peer", "Dashboard:")) or "error" in line.lower():
            print(f"[{name:>9}] {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bootstrap.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--every-steps", type=int, default=25, help="inner steps between syncs (H)")
    ap.add_argument("--workdir", default="", help="keep logs and checkpoints here (default: a temp dir)")
    ap.add_argument("--dashboard", type=int, default=0, help="dashboard port (0 = any free port, -1 = none)")
    args = ap.parse_args(argv)
    if args.peers < 2 or args.rounds < 1 or args.every_steps < 1:
        ap.error("need --peers >= 2, --rounds >= 1, --every-steps >= 1")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="swarmtrain-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: dict[str, subprocess.Popen] = {}
    relays: list[threading.Thread] = []
    logs: dict[str, list[str]] = {}

    def spawn(name: str, cmd: list[str]) -> None:
        p = subprocess.Popen([PY, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        procs[name], logs[name] = p, []
        t = threading.Thread(target=_relay, args=(name, p.stdout, logs[name]), name=f"relay-{name}", daemon=True)
        t.start()
        relays.append(t)

    def stop_all(*_: object) -> None:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)
    t0 = time.monotonic()
    try:
        maddrs = work / "bootstrap.maddrs"
        print(f"demo: starting a bootstrap node and {args.peers} peers (logs and checkpoints in {work})", flush=True)
        spawn("bootstrap", ["-m", "bootstrap", "--identity", str(work / "bootstrap.key"), "--host", "127.0.0.1",
                            "--port", "0", "--monitor-every", "10", "--maddrs-file", str(maddrs),
                            "--dashboard", str(args.dashboard), "--ledger", str(work / "ledger.json")])
        deadline = time.monotonic() + 60
        while not (maddrs.exists() and maddrs.read_text().strip()):
            if procs["bootstrap"].poll() is not None or time.monotonic() > deadline:
                print("demo: the bootstrap node failed to start:\n" + "\n".join(logs["bootstrap"][-20:]), file=sys.stderr)
                return 1
            time.sleep(0.1)
        addr = maddrs.read_text().split()[0]
        print(f"demo: bootstrap node at {addr}", flush=True)
        for i in range(1, args.peers + 1):
            spawn(f"peer{i}", ["-m", "peer", "--join", addr, "--swarm.host", "127.0.0.1", "--train.threads", "1",
                               "--sync.every-steps", str(args.every_steps), "--train.max-rounds", str(args.rounds),
                               "--checkpoint.dir", str(work / f"peer{i}"), "--train.summary-file", str(work / f"peer{i}.json")])
        codes = {n: p.wait() for n, p in procs.items() if n != "bootstrap"}
    finally:
        stop_all()
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for t in relays:
            t.join(timeout=5)
    return _report(work, codes, logs, time.monotonic() - t0, keep=bool(args.workdir))


def _report(work: Path, codes: dict[str, int], logs: dict[str, list[str]], wall: float, keep: bool) -> int:
    print("\n=== swarmtrain demo summary ===")
    summaries, finals = {}, {}
    for name, code in codes.items():
        f = work / f"{name}.json"
        if code != 0 or not f.exists():
            print(f"{name}: exited with code {code}; last lines:\n  " + "\n  ".join(logs[name][-5:]))
            continue
        s = summaries[name] = json.loads(f.read_text())
        ckpt = CheckpointDir(work / name).latest()
        if ckpt is not None:
            finals[name] = CheckpointDir.load(ckpt, fingerprint=None, numel=None).theta_sync
        print(f"{name}: {s['rounds']} sync rounds ({s['rounds_failed']} missed), {s['steps']} steps, "
              f"validation loss {s['val_loss_start']:.3f} -> {s['val_loss_final']:.3f}")
    ok = len(summaries) == len(codes)
    if finals:
        ref = next(iter(finals.values()))
        diff = max((t - ref).abs().max().item() for t in finals.values())
        agree = len({s["digest"] for s in summaries.values()}) == 1 and diff <= 1e-6
        print(f"sync rounds completed: {max(s['rounds'] for s in summaries.values())}")
        print(f"parameters agree across peers: {'yes' if agree else 'NO'} (max |difference| = {diff:.2e})")
        ok = ok and agree
    ledger = work / "ledger.csv"
    if ledger.exists():  # written by the bootstrap node when it stopped
        rows = list(csv.DictReader(ledger.read_text().splitlines()))
        print("contribution ledger (credit = samples x training FLOPs per sample):")
        for r in rows:
            print(f"  #{r['rank']} {short_id(r['peer_id'])}  {int(r['samples']):,} samples  {float(r['compute_s']):.0f}s compute  "
                  f"{r['rounds']} rounds  {float(r['credit']) / 1e12:.1f} TFLOP")
    print(f"wall time: {wall:.0f}s")
    if not keep and ok:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
