"""The averaging layer's settings: plain frozen dataclasses, validated once, on construction.

Kept apart from the code that uses them (matchmaking.py, outer.py, robust.py, averager.py)
and free of torch and hivemind imports, so that a command line can be parsed and checked,
and `--help` printed, before the heavy modules load.
"""
from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .access import Credential

# Wire codecs (codecs.py): fp32 (exact), fp16, bf16, int8 (blockwise absmax), sparse (top-k
# of 1/128 of the values at 2 bits, all-gathered: sparse.py, allgather.py).
CODECS = ("fp32", "fp16", "bf16", "int8", "sparse")

AggregatorName = Literal["mean", "trimmed_mean", "centered_clip"]
AGGREGATORS = ("mean", "trimmed_mean", "centered_clip")
MAX_CLIP_ITERS = 100  # cost is O(clip_iters·n·L); more than this is a typo, not a setting


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True, kw_only=True)
class MatchmakingConfig:
    """How groups are formed at a sync point."""

    # A group needs at least this many peers (including self) to average.
    min_group_size: int = 2
    # Most peers in one all-reduce: a round with more reduces in subgroups of at most this
    # size, combined exactly into one result (hierarchy.py).
    max_group_size: int = 64
    # Longest a peer waits at a sync point for others to arrive, in seconds.
    window: float = 10.0
    # Timeout for connecting to a leader and reading its replies, in seconds.
    join_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.min_group_size < 1:
            raise ValueError(f"min_group_size must be >= 1, got {self.min_group_size}")
        if self.max_group_size < self.min_group_size:
            raise ValueError(f"max_group_size ({self.max_group_size}) must be >= min_group_size ({self.min_group_size})")
        if not self.window > 0:
            raise ValueError(f"matchmaking window must be > 0, got {self.window}")
        if not self.join_timeout > 0:
            raise ValueError(f"join_timeout must be > 0, got {self.join_timeout}")


@dataclass(frozen=True, kw_only=True)
class OuterConfig:
    """Hyper-parameters of the outer step (DiLoCo defaults: lr 0.7, momentum 0.9, Nesterov)."""

    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True
    # Outer steps over which the momentum ramps linearly from 0 to `momentum` (0: none). From
    # a cold start the first pseudo-gradients are large and point in quickly changing
    # directions; full momentum on them overshoots (see docs/benchmarks.md, "Outer warm-up").
    warmup: int = 0

    def __post_init__(self) -> None:
        if not (self.lr > 0):
            raise ValueError(f"outer lr must be > 0, got {self.lr}")
        if not (0 <= self.momentum < 1):
            raise ValueError(f"outer momentum must be in [0, 1), got {self.momentum}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"outer warm-up must be a whole number of outer steps >= 0, got {self.warmup!r}")
        if self.nesterov and self.momentum == 0:
            # torch.optim.SGD refuses this too: Nesterov without momentum is meaningless.
            object.__setattr__(self, "nesterov", False)

    def momentum_at(self, step: int | None) -> float:
        """The momentum of outer step `step` (0 for the first): μ·min(1, step / warmup); None
        (a caller that does not count steps): μ. Every member of a round passes the same step
        (its state's round), so all agree."""
        return self.momentum if step is None or step >= self.warmup else self.momentum * step / self.warmup


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig:
    """Which reduction a part owner applies to the n contributions for its part.

    name           "mean" (swarmtrain's default: the weighted mean), "trimmed_mean" or
                   "centered_clip".
    trim           trimmed_mean: fraction of the n values trimmed from EACH side of each
                   coordinate, 0 <= trim < 0.5. k = floor(trim·n) values are dropped per side,
                   computed on the decimal value as written (trim=0.29, n=100 gives k=29,
                   where float arithmetic would give 28); at least one value always remains.
    clip_tau       centered_clip: clipping radius RELATIVE to the data, > 0 and finite. The
                   absolute radius is τ = clip_tau × median_i ‖x_i − v_0‖₂, where v_0 is the
                   coordinate-wise median of the rows and the median over the n norms is the
                   middle value (mean of the two middle values for even n). τ is computed
                   once, from v_0, and kept for all iterations. It scales with the data
                   (aggregating c·x gives c times the result), so one setting works for any
                   learning rate or training stage. With clip_tau = 1, about half of the
                   members (those nearest the median) are not clipped in the first iteration.
    clip_iters     centered_clip: number of fixed-point iterations, 0..100 (0 returns the
                   coordinate-wise median). The paper finds few iterations enough.
    """

    name: AggregatorName = "mean"
    trim: float = 0.2
    clip_tau: float = 1.0
    clip_iters: int = 3

    def __post_init__(self) -> None:
        if self.name not in AGGREGATORS:
            raise ValueError(f"name must be one of {', '.join(AGGREGATORS)}; got {self.name!r}")
        if not _is_real(self.trim) or not (0 <= self.trim < 0.5):
            raise ValueError(f"trim must be a number in [0, 0.5); got {self.trim!r}")
        if not _is_real(self.clip_tau) or not (math.isfinite(self.clip_tau) and self.clip_tau > 0):
            raise ValueError(f"clip_tau must be a finite number > 0; got {self.clip_tau!r}")
        if not isinstance(self.clip_iters, int) or isinstance(self.clip_iters, bool) or not (
            0 <= self.clip_iters <= MAX_CLIP_ITERS
        ):
            raise ValueError(f"clip_iters must be an integer in [0, {MAX_CLIP_ITERS}]; got {self.clip_iters!r}")

    @property
    def min_members(self) -> int:
        """The smallest group in which this aggregator outvotes one bad member.

        mean           1: it promises nothing against a bad member at any size.
        trimmed_mean   the smallest n >= 3 with floor(trim·n) >= 1, i.e. max(3, ceil(1/trim)):
                       trim 0.2 needs 5, trim 0.25 needs 4, trim 0.34 needs 3. In a smaller
                       group it trims nothing and is the plain (unweighted) mean. trim 0 asks
                       for no trimming: 1.
        centered_clip  3: its starting point, the coordinate-wise median, keeps every
                       coordinate within the honest range with one bad member of 3 or more; of
                       2 it is their midpoint. (Its proven regime is stricter: tolerated_faults.)

        A group this size or larger is required (AveragerConfig checks min_group_size against
        it, and the averager fails a round whose group is smaller), so that choosing a robust
        aggregator never silently averages like `mean`.
        """
        if self.name == "trimmed_mean":
            return 1 if self.trim == 0 else max(3, math.ceil(1 / Fraction(repr(float(self.trim)))))
        return 3 if self.name == "centered_clip" else 1


def check_group_sizes(agg: AggregatorConfig, mm: MatchmakingConfig) -> None:
    """Raise ValueError (one line, naming the settings) if groups of `mm`'s sizes would be too
    small for `agg` to outvote one bad member: min_group_size below agg.min_members, or
    max_group_size so small that a round split into subgroups (hierarchy.py: ⌈n/cap⌉
    near-equal subgroups, the smallest ⌊(cap+1)/2⌋ at n = cap+1) gets one that is."""
    need = agg.min_members
    what = f"{agg.name} (trim {agg.trim})" if agg.name == "trimmed_mean" else agg.name
    if mm.min_group_size < need:
        hint = " or a larger trim" if agg.name == "trimmed_mean" else ""
        raise ValueError(f"{what} needs groups of at least {need} peers to outvote one bad member, but "
                         f"min_group_size is {mm.min_group_size}: set min_group_size >= {need}{hint}")
    if (mm.max_group_size + 1) // 2 < need:
        raise ValueError(f"{what} needs groups of at least {need} peers, but max_group_size {mm.max_group_size} "
                         f"splits a larger round into subgroups of {(mm.max_group_size + 1) // 2}: "
                         f"set max_group_size >= {2 * need - 1}")


@dataclass(frozen=True, kw_only=True)
class AveragerConfig:
    """Network settings of the averager."""

    # Address the TCPStore listens on (0.0.0.0 = all interfaces).
    listen_host: str = "0.0.0.0"
    # Address other peers use to reach this one (for the store and for gloo).
    announce_host: str = "127.0.0.1"
    # Rendezvous and transfer timeout, in seconds; a dead peer fails the round within it.
    allreduce_timeout: float = 60.0
    # Wire codec: fp32 (exact), fp16, bf16, int8 (blockwise absmax) or sparse (top-k, 2 bits);
    # the lossy ones with error feedback.
    codec: str = "fp32"
    # A lossy codec's error feedback: the unsent residual is scaled by this before the next
    # round's contribution is added (SparseLoCo's β; 1 = nothing is forgotten).
    ef_decay: float = 1.0
    # Behind NAT: never listen; average through the group leader (see relay.py).
    client_mode: bool = False
    matchmaking: MatchmakingConfig = MatchmakingConfig()
    # How each part is reduced: mean (weighted), trimmed_mean or centered_clip (robust.py).
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    # All peers trusted (a private run): fp32 + mean may use gloo's ring SUM, which is faster
    # but cannot drop a bad contribution (one NaN then fails the round instead).
    trusted: bool = False
    # Ban a peer for the rest of the run after this many rounds with a rejected contribution.
    ban_after: int = 3
    # A private run's shared secret (None = open run): see access.py.
    secret: Credential | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.allreduce_timeout > 0:
            raise ValueError(f"allreduce_timeout must be > 0, got {self.allreduce_timeout}")
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r} (choose {', '.join(CODECS[:-1])} or {CODECS[-1]})")
        if self.ban_after < 1:
            raise ValueError(f"ban_after must be >= 1, got {self.ban_after}")
        if not 0.0 <= self.ef_decay <= 1.0:
            raise ValueError(f"ef_decay must be in [0, 1], got {self.ef_decay}")
        check_group_sizes(self.aggregator, self.matchmaking)
