"""Robust aggregation: how the owner of one part of the all-reduce combines the n contributions.

In swarmtrain's all-reduce the vector is split into n parts (codecs.partition); the member
owning part j receives every member's contribution for part j, reduces them to one vector
and sends it back to everyone. The functions here are that reduction, as pure maths:
no network, no torch.distributed, CPU float32 in and out.

    x: [n, L] float32   row i = member i's update Δ_i for this part (already divided by w_i)
    w: [n]    float32   member i's weight (samples since the last sync), positive and finite
    →  [L]    float32

| name          | result                                         | time                   | tolerates f of n |
| ------------- | ---------------------------------------------- | ---------------------- | ---------------- |
| mean          | Σ w_i·x_i / Σ w_i                              | O(n·L)                 | 0                |
| trimmed_mean  | per coordinate: drop the k lowest and k        | O(n log n · L) (sort)  | k = ⌊trim·n⌋     |
|               | highest of the n values, average the rest      |                        |                  |
| centered_clip | from the coordinate-wise median, iterate       | O(n log n · L) median  | ⌊n/10⌋ (theory:  |
|               | v ← v + (1/n)·Σ_i clip(x_i − v, τ)             | + O(clip_iters·n·L)    | δ = f/n ≤ 0.1)   |

Extra memory: O(L) float64 vectors, plus, for the sorts, O(n·chunk) with chunk ≈ 4M/n
columns sorted at a time (`_SORT_CHUNK`). trimmed_mean and centered_clip are unweighted.
See `tolerated_faults` for what the last column promises, and what it does not.

Why trimmed_mean and centered_clip ignore the weights: w_i is self-reported. A hostile
member could claim w = 1e30 and own any weighted statistic (a weighted median or weighted
trimmed mean would put all its mass on that member). Counting members, not samples, caps
its influence at 1/n. The cost: honest members that trained on more samples get no more
say than others in a robust round.

Determinism. Every member must be able to recompute the owner's result bit for bit, so no
randomness and no reduction whose summation order depends on the CPU (torch's sum/norm
kernels reassociate differently under AVX2 and AVX-512). What is used instead:
  - sums over members are done row by row, in a fixed order, with elementwise ops;
  - sums over the L coordinates of a part (the norms of centered_clip) use a fixed
    pairwise tree of elementwise adds (`_tree_sum`);
  - sorting is stable, so even ±0.0 ties come out in a fixed order;
  - accumulation is in float64 and rounded once to float32 at the end.
Elementwise IEEE-754 add, multiply, divide and sqrt are correctly rounded on every CPU, so
the result depends only on the inputs (unless a process enables flush-to-zero for
denormals, torch.set_flush_denormal, which changes IEEE arithmetic itself).

Finiteness. float32 inputs near ±3.4e38 overflow a float32 sum or difference; in float64
nothing here can overflow. Every aggregator's exact result lies, per coordinate, within
[min_i x_i, max_i x_i] (each is a convex combination of the inputs), and the result is
clamped to that range after rounding, so finite inputs always give a finite output.
Non-finite inputs are rejected with ValueError: a member that sends NaN or inf is faulty
beyond doubt, and the caller should exclude it (or fail the round) rather than have the
maths guess.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from .config import AggregatorConfig

# Columns sorted at once: torch.sort also returns int64 indices (8 bytes per value), so
# sorting a whole [n, L] part could need 3x its size; chunking bounds that.
_SORT_CHUNK = 1 << 22


def trim_count(trim: float, n: int) -> int:
    """k = floor(trim·n), on the decimal value of `trim` as written, capped so that n − 2k >= 1."""
    k = math.floor(Fraction(repr(float(trim))) * n)
    return min(k, (n - 1) // 2)


def tolerated_faults(cfg: AggregatorConfig, n: int) -> int:
    """How many of a group of n members may be Byzantine while the aggregator keeps its guarantee.

    Byzantine: a member that sends any vector it likes (knowing the others', colluding with
    the other faulty ones). The guarantee differs per aggregator:

    mean           0. One member alone moves the result anywhere.
    trimmed_mean   k = floor(trim·n). With at most k faulty members, every coordinate of the
                   result lies within [min, max] of the HONEST members' values for that
                   coordinate: the faulty ones cannot push it outside the honest range (they
                   can still bias it within that range).
    centered_clip  floor(n/10): the regime δ = f/n ≤ 0.1 in which Karimireddy, He & Jaggi
                   (ICML 2021, "Learning from History for Byzantine Robust Optimization",
                   robustness theorem for centered clipping) prove it a (δ, c)-robust
                   aggregator: the expected squared error to the honest mean is O(δ·ρ²),
                   where ρ² bounds the honest members' spread. Their proof sets τ from ρ and
                   from the starting point's error; the data-driven τ here
                   (see AggregatorConfig.clip_tau) is a heuristic, so this number is the
                   theory's regime, not a proof about this implementation. In practice it
                   withstands more (e.g. 1 bad member of 5, see tests/test_robust.py), and
                   the coordinate-wise median it starts from breaks down only at f >= n/2,
                   but no bound is claimed beyond δ ≤ 0.1. Groups of fewer than 10 get 0.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1; got {n!r}")
    if cfg.name == "mean":
        return 0
    if cfg.name == "trimmed_mean":
        return trim_count(cfg.trim, n)
    return n // 10


def aggregate(x: torch.Tensor, w: torch.Tensor, cfg: AggregatorConfig, *, group_size: int | None = None) -> torch.Tensor:
    """Reduce n members' contributions for one part to one vector.

    x: [n, L] float32 on CPU, finite; row i is member i's Δ_i for this part.
    w: [n] floating, positive and finite; member i's weight (only `mean` uses it).
    group_size: the group's size, when some members' contributions were already dropped
    (NaN, undecodable) so that n is smaller. trimmed_mean then trims floor(trim·group_size)
    per side (capped so one value remains): the faults the group was formed to tolerate stay
    tolerated after a bad member has been dropped (5 members at trim 0.2, one NaN dropped:
    k stays 1 on the 4 rows, not floor(0.8) = 0).
    Returns a new [L] float32 tensor (empty if L == 0). Deterministic: identical inputs give
    bit-identical outputs. Raises ValueError on malformed input.
    """
    _check_inputs(x, w)
    n, L = x.shape
    if L == 0:
        return torch.empty(0, dtype=torch.float32)
    if cfg.name == "mean":
        out = weighted_mean(x, w)
    elif cfg.name == "trimmed_mean":
        out = trimmed_mean(x, min(trim_count(cfg.trim, max(n, group_size or n)), (n - 1) // 2))
    else:
        out = centered_clip(x, cfg.clip_tau, cfg.clip_iters)
    return _finish(out, x)


def _check_inputs(x: torch.Tensor, w: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise ValueError("x and w must be torch tensors")
    if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"x must be a [n, L] float32 CPU tensor; got {x.dtype} {tuple(x.shape)} on {x.device}")
    n = x.shape[0]
    if n < 1:
        raise ValueError("x has no rows: a part needs at least one member's contribution")
    if w.dim() != 1 or w.shape[0] != n or not w.dtype.is_floating_point or w.device.type != "cpu":
        raise ValueError(f"w must be a [{n}] floating CPU tensor; got {w.dtype} {tuple(w.shape)} on {w.device}")
    if not (torch.isfinite(w).all() and (w > 0).all()):
        raise ValueError(f"weights must be positive and finite; got {w.tolist()}")
    if not torch.isfinite(x).all():
        bad = [i for i in range(n) if not torch.isfinite(x[i]).all()]
        raise ValueError(f"non-finite values in the contributions of rows {bad}")


def _finish(out64: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float64 [L] → float32 [L], clamped to the per-coordinate range of the inputs.

    The exact result of every aggregator lies in [min_i x_i, max_i x_i]; rounding can leave it
    a hair outside (even past float32's range when the inputs sit at ±3.4e38). Clamping makes
    the range, and thus finiteness, a guarantee. Zeros are then made +0.0: which of ±0.0 an
    amin/amax over ties returns is up to the kernel, and must not show in the output.
    """
    out = out64.to(torch.float32)
    out = torch.minimum(torch.maximum(out, x.amin(dim=0)), x.amax(dim=0))
    return torch.where(out == 0, torch.zeros_like(out), out)


def weighted_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ w_i·x_i / Σ w_i, x [n, L] float32, w [n] → float64 [L].

    The same formula as swarmtrain's all-reduce (sum of w_i·Δ_i, divided by the total
    weight). The all-reduce sums in float32 in the ring's order, so the two agree to float32
    rounding, not bit for bit; here members are summed in rank order in float64 (w_i·x_i
    is exact in float64: 24 + 24 bits of mantissa), which cannot overflow.
    """
    weights = [float(v) for v in w]
    acc = torch.zeros(x.shape[1], dtype=torch.float64)
    for i, wi in enumerate(weights):
        acc += x[i].to(torch.float64) * wi
    total = 0.0
    for wi in weights:  # rank order, like acc
        total += wi
    return acc / total


def trimmed_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """Coordinate-wise trimmed mean, x [n, L] float32 → float64 [L], dropping k values per side.

    Unweighted (see the module docstring). Requires 0 <= 2k < n. With k == 0 it is the plain
    mean, summed in rank order without sorting, so it equals `mean` with all weights 1.
    Sorting is per coordinate, so the result for a coordinate does not depend on how the
    vector was split into parts.
    """
    n, L = x.shape
    if not (0 <= k and 2 * k < n):
        raise ValueError(f"cannot trim {k} values from each side of {n}")
    if k == 0:
        return weighted_mean(x, torch.ones(n, dtype=torch.float32))
    m = n - 2 * k  # values kept per coordinate, >= 1
    out = torch.empty(L, dtype=torch.float64)
    step = max(1, _SORT_CHUNK // n)
    for s in range(0, L, step):
        e = min(L, s + step)
        srt = torch.sort(x[:, s:e], dim=0, stable=True).values  # [n, e−s], ascending per column
        acc = srt[k].to(torch.float64)
        for j in range(k + 1, n - k):  # fixed order: the sorted order
            acc += srt[j]
        out[s:e] = acc / m
    return out


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median, x [n, L] float32 → float64 [L]; mean of the two middle values for even n."""
    n, L = x.shape
    out = torch.empty(L, dtype=torch.float64)
    step = max(1, _SORT_CHUNK // n)
    lo, hi = (n - 1) // 2, n // 2
    for s in range(0, L, step):
        e = min(L, s + step)
        srt = torch.sort(x[:, s:e], dim=0, stable=True).values
        a = srt[lo].to(torch.float64)
        # 0.5·a + 0.5·b: halving is exact, and unlike (a + b)/2 this form could not overflow
        # even in float32.
        out[s:e] = a if lo == hi else a * 0.5 + srt[hi].to(torch.float64) * 0.5
    return out


def centered_clip(x: torch.Tensor, clip_tau: float, iters: int) -> torch.Tensor:
    """Centered clipping (Karimireddy, He & Jaggi 2021), x [n, L] float32 → float64 [L].

        v_0     = coordinate-wise median of the rows        (a robust start)
        τ       = clip_tau × median_i ‖x_i − v_0‖₂           (fixed for all iterations)
        v_{t+1} = v_t + (1/n)·Σ_i clip(x_i − v_t, τ),   clip(z, τ) = z·min(1, τ/‖z‖₂)

    Unweighted. BTARD (Gorbunov et al. 2022) runs the same procedure per part of a
    butterfly all-reduce, as here: the norms are over this part's L coordinates only, so
    the result depends on the partition (which every member computes identically).

    Zero norms: a row equal to v has ‖z‖ = 0 and contributes z = 0, whatever τ (no division:
    the clip factor is 1 when ‖z‖ <= τ). If more than half of the rows equal v_0, τ = 0, every
    other row is clipped to nothing, and the result is v_0: the majority's value.

    Each step keeps v, per coordinate, within [min_i x_i, max_i x_i]: with c_i ∈ [0, 1] the
    clip factors, v + (1/n)·Σ c_i·(x_i − v) = (1 − Σc_i/n)·v + Σ (c_i/n)·x_i is a convex
    combination of v and the x_i.
    """
    n, L = x.shape
    v = coordinate_median(x)
    if iters == 0 or n == 1:
        return v
    norms = [_norm(x[i].to(torch.float64) - v) for i in range(n)]
    tau = clip_tau * _median(norms)
    if tau == 0.0:
        return v  # every update below would be exactly zero
    for t in range(iters):
        acc = torch.zeros(L, dtype=torch.float64)
        for i in range(n):
            z = x[i].to(torch.float64) - v  # [L]
            nz = norms[i] if t == 0 else _norm(z)
            if nz <= tau:
                acc += z
            else:
                acc += z * (tau / nz)
        v = v + acc / n
    return v


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * s[n // 2 - 1] + 0.5 * s[n // 2]


def _norm(z: torch.Tensor) -> float:
    """‖z‖₂ of a float64 [L] vector, the same bits on every CPU (see `_tree_sum`)."""
    return math.sqrt(_tree_sum(z * z))


def _tree_sum(t: torch.Tensor) -> float:
    """Sum of a 1-D float64 tensor by a fixed pairwise tree: fold the second half onto the first.

    torch.sum's order of additions depends on the SIMD width it was dispatched to; here each
    level is one elementwise add, so the order depends only on the length. Pairwise summation
    also keeps the rounding error at O(log L) ulps. O(L) work, log2(L) torch calls.
    """
    while t.numel() > 1:
        h = t.numel() // 2
        folded = t[:h] + t[h : 2 * h]
        t = folded if t.numel() == 2 * h else torch.cat([folded, t[2 * h :]])
    return float(t[0]) if t.numel() else 0.0
