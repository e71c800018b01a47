"""Aggregation of sparse contributions by all-gather (the `sparse` codec, sparse.py).

A top-k vector does not add up in a reduce-scatter: the owner of a part would have to
re-sparsify the sum, losing what the members' error feedback cannot see. So every member
sends its whole compressed contribution to every other member, and each one decodes and
aggregates all of them itself:

    1. metadata rows all-gathered (allreduce.declare): weights, sizes, credentials; every
       member computes the same set of valid members;
    2. every member's message, wire_bytes(P) bytes of its w·Δ + error-feedback residual,
       is all-gathered (excluded members send zeros of that size: a collective needs
       everyone, and their rows are never read);
    3. each valid member's message is parsed and checked (sparse.parse: byte count, finite
       non-negative levels, positions in range, strictly increasing); a message that fails
       is dropped and its sender named in `rejected`, like a NaN contribution on the
       part-wise path;
    4. the accepted messages are aggregated in ranges of AGG_CHUNK values: `mean` adds them
       in rank order and divides each value by the total weight of the members that *sent*
       that value; a robust aggregator sees each Δ_i = message_i / w_i densely (zeros where
       a member sent nothing), one range at a time.

Why the mean is taken over senders only: the members' top-k sets barely overlap (at density
1/128 and n = 4, most sent values come from one member), so dividing by the whole group's
weight shrinks a value sent by one member n-fold, while that member's error feedback treats
it as fully sent: the swarm moves 1/n of the progress it has paid for. On the convergence
benchmark (docs/benchmarks.md) the plain group mean ended 11% above fp32 DiLoCo at H = 5
and 10; the mean over senders ends level with it at H = 5. Where all members send a value it
is the ordinary weighted mean.
Every member reads the same bytes and does the same operations in the same order, so all
agree exactly; a member's own contribution goes in as decoded from its own bytes, not
exact. The round is `complete` only if this member's message was accepted and the result
is finite; the error-feedback residual is committed only then.

Bytes on the wire per member: (n − 1) · wire_bytes(P), against 2(n − 1)/n · 4P for a dense
fp32 ring; with 64 bytes per 4096 values, 128× fewer at n = 4 (fewer as n grows: 32× at
n = 16, where hierarchical subgroups, hierarchy.py, keep the all-gather small).
"""
from __future__ import annotations

import logging
import time

import torch

from . import sparse
from .access import Credential
from .allreduce import (
    _REAPER,
    Compression,
    RoundResult,
    _first_line,
    all_finite,
    declare,
    make_gloo_group,
)
from .faults import Tamper
from .identity import short_id
from .matchmaking import Group
from .robust import AggregatorConfig, aggregate

log = logging.getLogger(__name__)

AGG_CHUNK = 256 * sparse.CHUNK  # values aggregated at once: 1M, so temporaries stay at a few MB per member


def sparse_allreduce(
    group: Group, delta: torch.Tensor, weight: float, *, host: str, timeout_s: float, comp: Compression,
    agg: AggregatorConfig, tamper: Tamper | None = None, secret: Credential | None = None, out: torch.Tensor,
) -> RoundResult:
    """`weighted_allreduce` for the sparse codec: same contract (never raises for network
    faults; `failed` within about 2·timeout_s if a member dies or stalls; bad contributions
    dropped and named; `out` receives the result and may be `delta`)."""
    t0 = time.monotonic()
    n, r = group.size, group.rank
    P = delta.numel()
    comp.ensure(P)
    assert comp.contrib is not None
    sent = (n - 1) * (2 + n) * 8
    weights: tuple[float, ...] = ()
    rejected: list[tuple[str, str]] = []

    def failed(msg: str) -> RoundResult:
        log.warning("round %d failed: %s", group.round, msg)
        return RoundResult(group.round, "failed", group.members, weights, time.monotonic() - t0, sent, msg,
                           rejected=tuple(rejected))

    # This member's message: w·Δ plus what earlier rounds left unsent, top-k'd. The residual
    # of this message is kept aside and committed only if the round completes.
    x = delta.detach().reshape(-1).to("cpu", torch.float32) * weight
    if tamper is not None:
        x = tamper.apply(x, group.round)
    data, _, residual = comp.contrib.compress(x)
    del x
    if tamper is not None:
        data = tamper.wire(data, P)
    pg = None
    try:
        pg = make_gloo_group(group, host=host, timeout_s=timeout_s)
        weights, valid, size = declare(pg, group, weight, P, secret, rejected, tamper)
        if r in valid and size != P:  # cannot happen for an honest peer; a guard against misuse
            return failed(f"this peer's update has {P} values but the group agreed on {size}")
        if not valid:
            return failed("no member's contribution is valid")
        nbytes = sparse.wire_bytes(size)
        mine = data if r in valid and data.numel() == nbytes else torch.zeros(nbytes, dtype=torch.uint8)
        rows = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(n)]
        sent += (n - 1) * nbytes
        pg.allgather([rows], [mine]).wait()
    except RuntimeError as e:  # gloo reports peer death, timeouts and rendezvous failures as RuntimeError
        return failed(f"sparse all-gather over {n} peers failed: {_first_line(e)}")
    finally:
        if pg is not None:
            _REAPER.retire(pg)

    accepted: list[tuple[int, sparse.Parsed]] = []
    for i in valid:
        try:
            accepted.append((i, sparse.parse(rows[i], size)))
        except sparse.SparseError as e:
            rejected.append((group.members[i], f"undecodable: {e}"))
    del rows
    if rejected:
        log.warning("round %d: dropped contributions: %s", group.round,
                    "; ".join(f"{short_id(pid)}: {why}" for pid, why in sorted(set(rejected))))
    if r not in {i for i, _ in accepted}:
        return failed("this peer's contribution was excluded by the group (see the other peers' logs)")
    min_w = min(weights[i] for i, _ in accepted)  # > 0: declare() rejects non-positive weights
    if size != P:
        return failed(f"the group agreed on {size} values, this peer has {P}")
    out = out.reshape(-1)
    w = torch.tensor([weights[i] for i, _ in accepted], dtype=torch.float32)
    step = AGG_CHUNK // sparse.CHUNK
    nc = sparse.chunks(size)
    for c0 in range(0, nc, step):
        c1 = min(nc, c0 + step)
        s0, s1 = c0 * sparse.CHUNK, min(size, c1 * sparse.CHUNK)
        dst = out[s0:s1]
        if agg.name == "mean":  # per value: Σ w·Δ / Σ w over the members that sent it, in rank order
            dst.copy_(accepted[0][1].dense(size, c0, c1))
            den = accepted[0][1].support(size, c0, c1).mul_(w[0])
            for (_, msg), wi in zip(accepted[1:], w[1:].tolist()):
                dst.add_(msg.dense(size, c0, c1))
                den.add_(msg.support(size, c0, c1), alpha=wi)
            dst.div_(den.clamp_min_(min_w))  # unsent values: 0 / min_w = 0
        else:
            stacked = torch.stack([msg.dense(size, c0, c1) for _, msg in accepted]) / w[:, None]  # [m, L]: Δ_i
            try:
                dst.copy_(aggregate(stacked, w, agg, group_size=n))
            except ValueError as e:
                return failed(f"could not aggregate: {e}")
    if not all_finite(out):
        return failed("non-finite values in the averaged result")
    comp.contrib.commit(0, residual)
    return RoundResult(group.round, "complete", group.members, weights, time.monotonic() - t0, sent, None, out,
                       rejected=tuple(sorted(set(rejected))))
