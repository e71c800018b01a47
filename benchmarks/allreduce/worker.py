"""One benchmark worker (run inside its namespace by bench.py; not meant to be run by hand).

Modes, each timed per repetition after a store barrier (all ranks start together):
    gloo    torch.distributed gloo all_reduce on a process group created once (the baseline)
    swarm   averaging.allreduce.weighted_allreduce end to end (includes the per-round
            process-group rendezvous, the private buffer copy and the result checks)
    split   the same two steps separately: make_gloo_group(...) (rendezvous) then a direct
            pg.allreduce on the [w·Δ | w·e_i | e_i] buffer (fp32 only)

Every result is checked against the known mean; a wrong result exits non-zero.
Prints one line "RESULT {json}" on success.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import sys
import time

import psutil
import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, TCPStore

from averaging.allreduce import make_gloo_group, weighted_allreduce

try:  # the result check weighted_allreduce uses (one sum reduction); older versions: full isfinite pass
    from averaging.allreduce import all_finite
except ImportError:  # pragma: no cover
    def all_finite(t: torch.Tensor) -> bool:
        return bool(torch.isfinite(t).all())
from averaging.matchmaking import Group

# Max |error| / max |expected| accepted per codec (two encodes for lossy codecs: contribution + mean).
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2, "int8": 1.2e-2}


def pattern(P: int, rank: int) -> torch.Tensor:
    """Rank r's delta: (r+1) + u, where u in [-0.5, 0.5) varies per element (same for all ranks)."""
    u = (torch.arange(P, dtype=torch.int64) * 7919 % 1000).to(torch.float32) / 1000.0 - 0.5
    return u.add_(rank + 1)


def expected_mean(P: int, n: int) -> torch.Tensor:
    return pattern(P, 0).add_((n + 1) / 2 - 1)


def check(name: str, got: torch.Tensor, exp: torch.Tensor, tol: float) -> float:
    if got.shape != exp.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(exp.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: non-finite values in the result")
    err = float((got.float() - exp).abs().max() / exp.abs().max())
    if not err <= tol:
        raise AssertionError(f"{name}: WRONG RESULT, max rel error {err:.3g} > {tol:g}")
    return err


class Barrier:
    def __init__(self, store, rank: int, n: int, timeout_s: float) -> None:
        self.store, self.rank, self.n, self.k = store, rank, n, 0
        self.timeout = datetime.timedelta(seconds=timeout_s)

    def __call__(self) -> None:
        self.k += 1
        self.store.set(f"barrier/{self.k}/{self.rank}", "1")
        self.store.wait([f"barrier/{self.k}/{i}" for i in range(self.n)], self.timeout)


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--peers", type=int, required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--master", required=True)
    ap.add_argument("--port", type=int, default=29600)
    ap.add_argument("--size-mb", type=float, required=True)
    ap.add_argument("--codec", default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="gloo,swarm,split")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--trusted", action="store_true", help="fp32: the trusted ring-SUM path instead of the validated part-wise one")
    a = ap.parse_args()
    torch.set_num_threads(1)
    try:  # a peer fixes glibc's mmap threshold at start (averaging/memory.py): measure the same
        from averaging.memory import steady_malloc
        steady_malloc()
    except ImportError:  # an older version of averaging/
        pass
    n, rank = a.peers, a.rank
    P = int(a.size_mb * 1e6) // 4
    modes = [m for m in a.modes.split(",") if m]
    proc = psutil.Process()
    tol = TOLERANCE.get(a.codec, 1e-2)

    store = TCPStore(a.master, a.port, n, rank == 0, timeout=datetime.timedelta(seconds=a.timeout),
                     wait_for_workers=False)
    barrier = Barrier(store, rank, n, a.timeout)
    delta = pattern(P, rank)
    exp = expected_mean(P, n)
    out: dict = {"rank": rank, "P": P}

    def record(mode: str, key: str, value: float) -> None:
        out.setdefault(mode, {}).setdefault(key, []).append(value)

    has_codec = "codec" in inspect.signature(weighted_allreduce).parameters
    if a.codec != "fp32" and not has_codec:
        raise SystemExit(f"codec {a.codec} not available: weighted_allreduce has no codec parameter")
    kw = {"codec": a.codec} if has_codec else {}
    if a.trusted:
        kw["trusted"] = True
    members = tuple(str(i) for i in range(n))
    # A peer's round buffer, allocated once and reused by every round (weighted_allreduce's `out`,
    # when this version has it); without it, each round allocates (and page-faults) its result.
    reuse = torch.empty(P, dtype=torch.float32) if "out" in inspect.signature(weighted_allreduce).parameters else None

    if "gloo" in modes:
        t = time.perf_counter()
        dist.init_process_group("gloo", store=PrefixStore("baseline/", store), rank=rank, world_size=n,
                                timeout=datetime.timedelta(seconds=a.timeout))
        record("gloo", "init_s", time.perf_counter() - t)

    # Modes are interleaved within each repetition, so that background load hits all of them alike.
    for k in range(a.repeats):
        if "gloo" in modes:
            buf = delta.clone()
            barrier()
            c0, t0 = cpu_s(proc), time.perf_counter()
            dist.all_reduce(buf)
            t1, c1 = time.perf_counter(), cpu_s(proc)
            record("gloo", "time_s", t1 - t0)
            record("gloo", "cpu", (c1 - c0) / (t1 - t0))
            record("gloo", "err", check(f"gloo rep {k}", buf.div_(n), exp, TOLERANCE["fp32"]))
            del buf

        if "swarm" in modes:
            group = Group(round=k, members=members, rank=rank, prefix=f"bench/{k}/", store=store, leader="0")
            src = delta
            if reuse is not None:  # as a peer does: Δ is in its round buffer, and the round works in it
                reuse.copy_(delta)
                src = kw["out"] = reuse
            barrier()
            c0, t0 = cpu_s(proc), time.perf_counter()
            res = weighted_allreduce(group, src, weight=1.0, host=a.host, timeout_s=a.timeout, **kw)
            t1, c1 = time.perf_counter(), cpu_s(proc)
            if not res.ok:
                raise AssertionError(f"swarm rep {k}: round failed: {res.error}")
            record("swarm", "time_s", t1 - t0)
            record("swarm", "cpu", (c1 - c0) / (t1 - t0))
            record("swarm", "bytes_sent", res.bytes_sent)
            record("swarm", "err", check(f"swarm/{a.codec} rep {k}", res.mean_delta, exp, tol))
            if list(res.weights) != [1.0] * n:
                raise AssertionError(f"swarm rep {k}: weights {res.weights}")
            del res

        if "split" in modes and a.codec == "fp32":
            group = Group(round=k, members=members, rank=rank, prefix=f"split/{k}/", store=store, leader="0")
            barrier()
            # The same steps as weighted_allreduce's fp32 path, timed one by one.
            t0 = time.perf_counter()
            buf = torch.empty(P + 2 * n, dtype=torch.float32)
            torch.mul(delta.reshape(-1), 1.0, out=buf[:P])
            buf[P:] = 0.0
            buf[P + rank] = 1.0
            buf[P + n + rank] = 1.0
            t1 = time.perf_counter()
            pg = make_gloo_group(group, host=a.host, timeout_s=a.timeout)
            t2 = time.perf_counter()
            c2 = cpu_s(proc)
            pg.allreduce([buf]).wait()
            t3, c3 = time.perf_counter(), cpu_s(proc)
            pg = None
            t4 = time.perf_counter()
            ok = torch.equal(buf[P + n:], torch.ones(n)) and torch.equal(buf[P:P + n], torch.ones(n))
            mean = buf[:P].div_(float(n))
            ok = ok and all_finite(mean)
            t5 = time.perf_counter()
            record("split", "prep_s", t1 - t0)
            record("split", "pg_create_s", t2 - t1)
            record("split", "time_s", t3 - t2)
            record("split", "pg_release_s", t4 - t3)
            record("split", "post_s", t5 - t4)
            record("split", "total_s", t5 - t0)
            record("split", "cpu", (c3 - c2) / (t3 - t2))
            if not ok:
                raise AssertionError(f"split rep {k}: metadata {buf[P:].tolist()}")
            record("split", "err", check(f"split rep {k}", mean, exp, TOLERANCE["fp32"]))
            del buf, mean

    if "gloo" in modes:
        dist.destroy_process_group()

    barrier()
    # Rank 0 hosts the store: it leaves only after every other rank is past its last wait.
    store.set(f"done/{rank}", "1")
    if rank == 0:
        store.wait([f"done/{i}" for i in range(n)], datetime.timedelta(seconds=a.timeout))
    out["max_rss_mb"] = proc.memory_info().rss / 1e6
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AssertionError as e:
        print(f"VERIFY FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
