"""Rounds with more peers than one group holds: reduce in subgroups, combine exactly.

A round's group of n members larger than `cap` (MatchmakingConfig.max_group_size) is split by
rank into k = ⌈n / cap⌉ subgroups of near-equal size (contiguous ranks); the first member of
each is its head:

    phase 1  each subgroup all-reduces as an ordinary group (weighted_allreduce: the run's
             codec, aggregator and checks), so its head holds the subgroup's aggregate
             m_j [P] and its members' weights w_i; W_j = Σ w_i over its accepted members.
    phase 2  the k heads all-gather a status row [ok_j, w_i of its members…] (fp64: every
             head learns every member's weight and whether every subgroup completed), then,
             only if all did, all-reduce m_j with weight W_j in fp32 (the part-wise path):
                 Δ̄ = Σ_j W_j·m_j / Σ_j W_j  = Σ_i w_i·Δ_i / Σ_i w_i   (the mean aggregator)
    phase 3  each head broadcasts [ok, all n weights] and then Δ̄ to its subgroup.

Agreement: the heads decode the same bytes in phase 2 and broadcast them unchanged, so all
n members apply a bit-identical Δ̄. Honesty: the round is `complete` for a member only if
every subgroup completed and all three phases finished; any failure anywhere fails it for
everyone (Averager then lets the survivors retry, as for a flat group).

Stated approximations: with a robust aggregator, phase 1 is robust within each subgroup
and phase 2 across the k subgroup aggregates (not one robust aggregate over all n); a
contribution dropped in only some parts of phase 1 still counts in W_j. Cost: a head sends
the fp32 result to its cap − 1 members in phase 3, (cap − 1)·4P bytes on top of the
ring-equivalent traffic of phases 1 and 2; the other members send nothing more.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from .access import Credential
from .allreduce import Compression, RoundResult, _REAPER, _first_line, all_finite, make_gloo_group, weighted_allreduce
from .codecs import partition
from .faults import Tamper
from .matchmaking import Group
from .robust import AggregatorConfig

log = logging.getLogger(__name__)


def subgroups(n: int, cap: int) -> list[tuple[int, int]]:
    """Rank ranges [start, end) of the subgroups of an n-member group, each of at most `cap`."""
    if cap < 2:
        raise ValueError(f"cap must be >= 2, got {cap}")
    return partition(n, math.ceil(n / cap))


def hierarchical_allreduce(
    group: Group, delta: torch.Tensor, weight: float, *, cap: int, host: str, timeout_s: float,
    codec: str | Compression = "fp32", aggregator: AggregatorConfig | None = None, trusted: bool = False,
    tamper: Tamper | None = None, secret: Credential | None = None,
) -> RoundResult:
    """The weighted mean of `delta` over a group larger than `cap`, in subgroups (see above).

    Failure behaviour: never raises for network faults; blocks for at most about
    3 × 2·timeout_s (three phases, each with a rendezvous and a transfer). `delta` is never
    modified.
    """
    t0 = time.monotonic()
    n, P = group.size, delta.numel()
    spans = subgroups(n, cap)
    j = next(i for i, (lo, hi) in enumerate(spans) if lo <= group.rank < hi)
    lo, hi = spans[j]
    head = group.rank == lo
    sub = Group(group.round, group.members[lo:hi], group.rank - lo, f"{group.prefix}sub{j}/", group.store,
                leader=group.members[lo])
    inner = weighted_allreduce(sub, delta, weight, host=host, timeout_s=timeout_s, codec=codec, aggregator=aggregator,
                               trusted=trusted, tamper=tamper, secret=secret)
    sent, error = inner.bytes_sent, inner.error
    status = torch.zeros(1 + n, dtype=torch.float64)  # [ok, weights of all n members in rank order]
    mean = torch.empty(P, dtype=torch.float32)

    def failed(msg: str) -> RoundResult:
        log.warning("round %d failed: %s", group.round, msg)
        return RoundResult(group.round, "failed", group.members, (), time.monotonic() - t0, sent, msg,
                           rejected=inner.rejected)

    if head:
        try:
            ok, m_j = _combine_heads(group, spans, j, inner, host=host, timeout_s=timeout_s, aggregator=aggregator,
                                     secret=secret, status=status)
        except RuntimeError as e:  # gloo: a head died or stalled
            ok, m_j, error = False, None, f"combining {len(spans)} subgroups failed: {_first_line(e)}"
        if ok and m_j is not None:
            mean.copy_(m_j)
            sent += 4 * P * len(spans)  # phase 2, about 2·(k−1)/k of 4P, plus the status rows
        else:
            status.zero_()
            error = error or inner.error or "another subgroup of this round failed"
        sent += (hi - lo - 1) * (status.numel() * 8 + 4 * P)
    pg = None
    try:  # phase 3: the head's verdict and result to its subgroup
        pg = make_gloo_group(Group(group.round, sub.members, sub.rank, f"{sub.prefix}bcast/", group.store),
                             host=host, timeout_s=timeout_s)
        pg.broadcast(status, 0).wait()
        if status[0] == 1:
            pg.broadcast(mean, 0).wait()
    except RuntimeError as e:
        return failed(f"receiving the result of {n} peers from this subgroup's head failed: {_first_line(e)}")
    finally:
        if pg is not None:
            _REAPER.retire(pg)
    if status[0] != 1:
        return failed(error or "another subgroup of this round failed")
    if not all_finite(mean):
        return failed("non-finite values in the averaged result")
    weights = tuple(float(w) for w in status[1:])
    return RoundResult(group.round, "complete", group.members, weights, time.monotonic() - t0, sent, None,
                       mean.to(delta.device), rejected=inner.rejected)


def _combine_heads(
    group: Group, spans: list[tuple[int, int]], j: int, inner: RoundResult, *, host: str, timeout_s: float,
    aggregator: AggregatorConfig | None, secret: Credential | None, status: torch.Tensor,
) -> tuple[bool, torch.Tensor | None]:
    """Phase 2, run by the heads: fill `status` ([ok, all weights]) and return (ok, Δ̄)."""
    k, width = len(spans), 1 + max(e - s for s, e in spans)
    heads = tuple(group.members[s] for s, _ in spans)
    hg = Group(group.round, heads, j, f"{group.prefix}heads/", group.store, leader=heads[0])
    row = torch.zeros(width, dtype=torch.float64)  # [ok_j, weights of subgroup j's members…]
    if inner.ok:
        row[0] = 1.0
        row[1 : 1 + len(inner.weights)] = torch.tensor(inner.weights, dtype=torch.float64)
    rows = [torch.empty(width, dtype=torch.float64) for _ in range(k)]
    pg = make_gloo_group(Group(group.round, heads, j, f"{group.prefix}heads-status/", group.store), host=host,
                         timeout_s=timeout_s)
    try:
        pg.allgather([rows], [row]).wait()
    finally:
        _REAPER.retire(pg)
    if not all(float(r[0]) == 1.0 for r in rows):
        return False, None
    for (s, e), r in zip(spans, rows):
        status[1 + s : 1 + e] = r[1 : 1 + e - s]
    rejected = {pid for pid, _ in inner.rejected}
    w_j = sum(w for pid, w in zip(group.members[spans[j][0] : spans[j][1]], inner.weights) if pid not in rejected)
    assert inner.mean_delta is not None
    outer = weighted_allreduce(hg, inner.mean_delta.cpu(), w_j, host=host, timeout_s=timeout_s, codec="fp32",
                               aggregator=aggregator, secret=secret)
    if not outer.ok:
        return False, None
    status[0] = 1.0
    return True, outer.mean_delta
