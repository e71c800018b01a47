"""Run one variant of the convergence benchmark and return what it measured.

Every variant trains the embedded byte-level GPT (peer/model.py, default config) on the
stdlib corpus with the same inner optimizer (AdamW, lr 1e-3, grad clip 1), the same batch
per worker, the same total number of training samples and the same validation windows
(peer.data.estimate_loss, fixed seed), so final losses are directly comparable:

    single   one process, batch B, peers x steps inner steps (= the same total samples)
    ddp      `peers` processes, torch DDP over gloo, gradients all-reduced every step
    swarm    a bootstrap node + `peers` real `swarm-peer` processes, syncing every H steps

Workers get disjoint data shards (i/n), as DiLoCo's workers do; the single peer samples the
whole training split. All processes use one torch thread: on the 2-core benchmark machine
four workers already oversubscribe the CPU, and one thread each keeps them comparable.

Bytes: `payload` is what the all-reduce itself accounts (swarmtrain's RoundResult bytes;
for DDP the ring all-reduce volume 2(n-1)/n x bucket bytes, counted in a comm hook).
`wire` is measured: each variant runs in its own network namespace with only a loopback
interface, and lo's tx_bytes counter afterwards is everything the run sent (TCP/IP headers,
DHT, matchmaking, keepalives), divided by the number of workers. Needs root and `ip`;
without them wire bytes are reported as unknown.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


@dataclass(frozen=True, kw_only=True)
class Setup:
    """What every variant shares. `steps` is inner steps per worker."""

    peers: int = 4
    steps: int = 800
    batch_size: int = 16
    lr: float = 1e-3
    eval_batches: int = 16
    eval_every_steps: int = 50  # per-worker steps between evaluations (baselines); swarms evaluate at rounds
    max_bytes: int = 8_000_000  # stdlib corpus size, as in the demo
    model: tuple[str, ...] = ()  # extra --model.* flags, e.g. ("--model.n-layer", "4")

    def __post_init__(self) -> None:
        if self.peers < 1 or self.steps < 1 or self.batch_size < 1 or self.eval_every_steps < 1:
            raise ValueError("peers, steps, batch_size and eval_every_steps must be >= 1")


@dataclass(frozen=True, kw_only=True)
class Variant:
    name: str
    kind: str  # "single" | "ddp" | "swarm"
    label: str
    every: int = 0  # H, swarm only
    every_seconds: float = 0.0  # T, swarm only: time-based sync (then `every` is 0)
    outer_lr: float = 0.7
    momentum: float = 0.9
    codec: str = "fp32"
    ef_decay: float = 1.0  # --sync.codec.error-feedback-decay (lossy codecs)
    warmup: int = 0  # --sync.outer.warmup: outer steps over which the outer momentum ramps up


VARIANTS: tuple[Variant, ...] = (
    Variant(name="single", kind="single", label="single peer (same total samples)"),
    Variant(name="ddp", kind="ddp", label="DDP over gloo (all-reduce every step)"),
    Variant(name="diloco-h10", kind="swarm", label="swarmtrain DiLoCo H=10", every=10),
    Variant(name="diloco-h50", kind="swarm", label="swarmtrain DiLoCo H=50, no outer warm-up (the default before)",
            every=50),
    Variant(name="diloco-h50-w4", kind="swarm", label="swarmtrain DiLoCo H=50, outer warm-up 4 (the default)", every=50,
            warmup=4),
    Variant(name="diloco-h200", kind="swarm", label="swarmtrain DiLoCo H=200", every=200),
    Variant(name="avg-h50", kind="swarm", label="swarmtrain plain averaging H=50", every=50, outer_lr=1.0, momentum=0.0),
    Variant(name="int8-h50", kind="swarm", label="swarmtrain DiLoCo H=50, int8", every=50, codec="int8"),
    # The sparse codec's defaults: plain averaging as the outer step (its error feedback is the
    # momentum), each value averaged over the members that sent it (allgather.py). Sparse rounds
    # are ~128x cheaper than dense ones, so the sparse row syncs 10x as often (H=5).
    Variant(name="sparse-h5", kind="swarm", label="swarmtrain H=5, sparse (top-k 1/128, 2 bits), plain averaging",
            every=5, codec="sparse", outer_lr=1.0, momentum=0.0),
)
# Outer-optimizer sweep, run on request (--variants ...) to choose the defaults. (Sparse rows
# recorded before 2026-12-02 16:30 UTC averaged over the whole group; see docs/benchmarks.md.)
SWEEP: tuple[Variant, ...] = (
    Variant(name="sparse-h10", kind="swarm", label="H=10, sparse, plain averaging", every=10, codec="sparse",
            outer_lr=1.0, momentum=0.0),
    Variant(name="sparse-h50", kind="swarm", label="H=50, sparse, plain averaging", every=50, codec="sparse",
            outer_lr=1.0, momentum=0.0),
    Variant(name="diloco-h50-olr1.0", kind="swarm", label="DiLoCo H=50, outer lr 1.0", every=50, outer_lr=1.0),
    Variant(name="diloco-h50-olr0.4", kind="swarm", label="DiLoCo H=50, outer lr 0.4", every=50, outer_lr=0.4),
    Variant(name="diloco-h50-m0.5", kind="swarm", label="DiLoCo H=50, outer lr 0.7, momentum 0.5", every=50,
            momentum=0.5),
    # Time-based sync (the default since 2026-12: every peer syncs at the same wall-clock instants).
    Variant(name="diloco-t10", kind="swarm", label="DiLoCo T=10 s (the default)", every_seconds=10.0),
    Variant(name="diloco-t30", kind="swarm", label="DiLoCo T=30 s", every_seconds=30.0),
)
BY_NAME = {v.name: v for v in (*VARIANTS, *SWEEP)}


@dataclass(kw_only=True)
class Result:
    variant: str
    seed: int
    val_start: float
    val_final: float
    curve: list[tuple[int, float]]  # (total training samples across all workers, validation loss)
    payload_bytes_per_peer: float
    wire_bytes_per_peer: float | None
    wall_s: float
    utilization: float  # fraction of training wall time in forward/backward/optimizer, not waiting
    rounds: int = 0
    rounds_failed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Netns:
    """A private network namespace with only `lo`, to count every byte a run sends.

    Falls back to the host's network (and no byte count) when namespaces are unavailable.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.name: str | None = None
        if enabled and os.geteuid() == 0 and shutil.which("ip"):
            name = f"stconv{os.getpid()}"
            ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
            if ok:
                self.name = name
                subprocess.run(self.prefix + ["ip", "link", "set", "lo", "up"], check=True)

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name] if self.name else []

    def tx_bytes(self) -> int | None:
        if not self.name:
            return None
        out = subprocess.run(self.prefix + ["cat", "/sys/class/net/lo/statistics/tx_bytes"],
                             capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    def close(self) -> None:
        if self.name:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            self.name = None

    def __enter__(self) -> "Netns":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _spawn(cmd: list[str], log: Path, ns: Netns) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(ns.prefix + cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p, log in zip(procs, logs):
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{log.name}: still running after {timeout:.0f}s") from None
        if rc != 0:
            raise RuntimeError(f"{log.name} exited with {rc}:\n{log.read_text(errors='replace')[-2000:]}")


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steps_for_tokens(tokens_per_param: float, *, peers: int, batch_size: int, model: tuple[str, ...] = ()) -> int:
    """Inner steps per worker so that all workers together train on tokens_per_param x N
    tokens (N = the model's parameter count; 20 is Chinchilla's compute-optimal budget)."""
    from peer.model import ModelConfig, build_model

    cfg = ModelConfig(**{f.removeprefix("--model.").replace("-", "_"): int(v) for f, v in zip(model[::2], model[1::2])})
    n = sum(p.numel() for p in build_model(cfg, seed=0).parameters())
    return max(1, round(tokens_per_param * n / (peers * batch_size * cfg.block_size)))


def _timeout(setup: Setup) -> float:
    return 120 + setup.steps * setup.peers * 0.5  # generous: about 5x the expected time on 2 cores


def run(variant: Variant, setup: Setup, seed: int, work: Path, *, netns: bool = True) -> Result:
    """Run `variant` once with `seed`; raise RuntimeError (with the failing log's tail) on failure."""
    work.mkdir(parents=True, exist_ok=True)
    with Netns(netns) as ns:
        before = ns.tx_bytes()
        t0 = time.monotonic()
        if variant.kind == "swarm":
            res = _run_swarm(variant, setup, seed, work, ns)
        else:
            res = _run_baseline(variant, setup, seed, work, ns)
        res.wall_s = round(time.monotonic() - t0, 1)
        after = ns.tx_bytes()
    if before is not None and after is not None:
        res.wire_bytes_per_peer = (after - before) / (1 if variant.kind == "single" else setup.peers)
    return res


def _baseline_cmd(setup: Setup, seed: int, out: Path, *, mode: str, rank: int = 0, world: int = 1,
                  port: int = 0, steps: int) -> list[str]:
    return [PY, "-m", "benchmarks.convergence.baseline", "--mode", mode, "--rank", str(rank), "--world", str(world),
            "--port", str(port), "--seed", str(seed), "--steps", str(steps), "--batch-size", str(setup.batch_size),
            "--lr", str(setup.lr), "--eval-batches", str(setup.eval_batches),
            "--eval-every", str(setup.eval_every_steps * (setup.peers if mode == "single" else 1)),
            "--max-bytes", str(setup.max_bytes), "--out", str(out), *setup.model]


def _run_baseline(variant: Variant, setup: Setup, seed: int, work: Path, ns: Netns) -> Result:
    if variant.kind == "single":
        # The same total number of samples as `peers` workers x `steps`, at the same batch size.
        specs = [("single", 0, 1, setup.steps * setup.peers)]
    else:
        specs = [("ddp", r, setup.peers, setup.steps) for r in range(setup.peers)]
    port = _free_port()
    outs = [work / f"{variant.name}-s{seed}-r{r}.json" for _, r, _, _ in specs]
    logs = [o.with_suffix(".log") for o in outs]
    procs = [_spawn(_baseline_cmd(setup, seed, o, mode=m, rank=r, world=w, port=port, steps=s), log, ns)
             for (m, r, w, s), o, log in zip(specs, outs, logs)]
    try:
        _wait_all(procs, logs, _timeout(setup) * (2 if variant.kind == "single" else 1))
    finally:
        _kill(procs)
    sums = [json.loads(o.read_text()) for o in outs]
    s0 = sums[0]
    scale = len(sums)  # DDP: every rank saw its own samples; the curve counts all of them
    return Result(
        variant=variant.name, seed=seed, val_start=s0["val_start"], val_final=s0["val_final"],
        curve=[(n * scale, v) for n, v in s0["curve"]],
        payload_bytes_per_peer=sum(s["payload_bytes"] for s in sums) / len(sums),
        wire_bytes_per_peer=None, wall_s=0.0,
        utilization=sum(s["utilization"] for s in sums) / len(sums),
    )


def swarm_peer_args(variant: Variant, setup: Setup, seed: int, rank: int) -> list[str]:
    """The `swarm-peer` flags of worker `rank` of a swarm variant."""
    args = [
        "--swarm.host", "127.0.0.1", "--train.threads", "1", "--train.seed", str(seed),
        "--train.max-steps", str(setup.steps), "--train.lr", str(setup.lr),
        "--train.eval-batches", str(setup.eval_batches),
        "--train.eval-every-rounds", str(max(1, setup.eval_every_steps // variant.every) if variant.every else 1),
        "--data.batch-size", str(setup.batch_size), "--data.max-bytes", str(setup.max_bytes),
        "--data.shard", f"{rank}/{setup.peers}",
        "--sync.every-steps", str(variant.every), "--sync.every-seconds", str(variant.every_seconds),
        "--sync.outer.lr", str(variant.outer_lr),
        "--sync.outer.momentum", str(variant.momentum), "--sync.codec.name", variant.codec,
        "--sync.codec.error-feedback-decay", str(variant.ef_decay), "--sync.outer.warmup", str(variant.warmup),
        # Every round waits for all workers, so each outer step averages exactly `peers` workers.
        "--sync.matchmaking.min-group-size", str(setup.peers), "--sync.matchmaking.window", "60",
        "--log.format", "text", *setup.model,
    ]
    if variant.momentum == 0:
        args.append("--no-sync.outer.nesterov")
    return args


def _run_swarm(variant: Variant, setup: Setup, seed: int, work: Path, ns: Netns) -> Result:
    tag = f"{variant.name}-s{seed}"
    maddrs = work / f"{tag}-bootstrap.maddrs"
    maddrs.unlink(missing_ok=True)
    logs = [work / f"{tag}-bootstrap.log"]
    procs = [_spawn([PY, "-m", "bootstrap", "--host", "127.0.0.1", "--port", "0", "--identity", str(work / f"{tag}.key"),
                     "--maddrs-file", str(maddrs), "--ledger", "", "--monitor-every", "0"], logs[0], ns)]
    try:
        deadline = time.monotonic() + 60
        while not (maddrs.exists() and maddrs.read_text().strip()):
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bootstrap did not start:\n{logs[0].read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        join = maddrs.read_text().split()[0]
        outs = [work / f"{tag}-p{r}.json" for r in range(setup.peers)]
        for r, out in enumerate(outs):
            logs.append(work / f"{tag}-p{r}.log")
            procs.append(_spawn([PY, "-m", "peer", "--join", join, *swarm_peer_args(variant, setup, seed, r),
                                 "--train.summary-file", str(out)], logs[-1], ns))
        _wait_all(procs[1:], logs[1:], _timeout(setup))
    finally:
        for p in procs[:1]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
        _kill(procs)
    sums = [json.loads(o.read_text()) for o in outs]
    if len({s["digest"] for s in sums}) != 1:
        raise RuntimeError(f"{tag}: workers ended with different parameters: {[s['digest'][:8] for s in sums]}")
    s0 = sums[0]
    return Result(
        variant=variant.name, seed=seed, val_start=s0["val_loss_start"], val_final=s0["val_loss_final"],
        # A round averages all `peers` workers (min group size), so the swarm has seen peers x this peer's samples.
        curve=[(n * setup.peers, v) for n, v in s0["val_loss_by_samples"]],
        payload_bytes_per_peer=sum(s["bytes_sent"] for s in sums) / len(sums),
        wire_bytes_per_peer=None, wall_s=0.0,
        utilization=sum(s["compute_utilization"] for s in sums) / len(sums),
        rounds=min(s["rounds"] for s in sums), rounds_failed=max(s["rounds_failed"] for s in sums),
    )
