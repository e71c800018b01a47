"""The averaging layer's settings: frozen pydantic dataclasses, one per component, each
checked once, on construction (pydantic: the types; `__post_init__`: the ranges and rules).

They are the `[sync.*]` sections of a peer's config (peer/config.py nests them, torchtitan
style): `[sync.outer]` OuterConfig, `[sync.matchmaking]` MatchmakingConfig, `[sync.allreduce]`
AllReduceConfig, `[sync.codec]` CodecConfig, `[sync.aggregator]` AggregatorConfig. Each
field's description is its `--help` text and its `--print-config` comment.

Kept apart from the code that uses them (matchmaking.py, outer.py, robust.py, averager.py)
and free of torch and hivemind imports, so that a command line can be parsed and checked,
and `--help` printed, before the heavy modules load.
"""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

if TYPE_CHECKING:
    from .access import Credential

# Wire codecs (codecs.py): fp32 (exact), fp16, bf16, int8 (blockwise absmax), sparse (top-k
# of 1/128 of the values at 2 bits, all-gathered: sparse.py, allgather.py).
CodecName = Literal["fp32", "fp16", "bf16", "int8", "sparse"]
CODECS: tuple[str, ...] = CodecName.__args__

# The settings classes (here, peer/config.py, bootstrap/config.py) are pydantic dataclasses with
# this config: a value of the wrong type, or a key no field has, is an error naming the key.
SETTINGS = ConfigDict(extra="forbid")

AggregatorName = Literal["mean", "trimmed_mean", "centered_clip"]
AGGREGATORS: tuple[str, ...] = AggregatorName.__args__
MAX_CLIP_ITERS = 100  # cost is O(clip_iters·n·L); more than this is a typo, not a setting


@dataclass(frozen=True, kw_only=True, config=SETTINGS)
class MatchmakingConfig:
    """How groups are formed at a sync point (matchmaking.py)."""

    min_group_size: int = Field(2, description="fewest peers (self included) that make a group")
    max_group_size: int = Field(64, description="most peers in one all-reduce; a round with more averages in "
                                                "subgroups of this size, combined into one result (hierarchy.py)")
    window: float = Field(15.0, description="seconds to wait at a sync point for other peers")
    join_timeout: float = Field(5.0, description="seconds to wait when connecting to a group leader and for its replies")

    def __post_init__(self) -> None:
        if self.min_group_size < 1:
            raise ValueError(f"min_group_size must be >= 1, got {self.min_group_size}")
        if self.max_group_size < self.min_group_size:
            raise ValueError(f"max_group_size ({self.max_group_size}) must be >= min_group_size ({self.min_group_size})")
        if not self.window > 0:
            raise ValueError(f"matchmaking window must be > 0, got {self.window}")
        if not self.join_timeout > 0:
            raise ValueError(f"join_timeout must be > 0, got {self.join_timeout}")


# The outer step's defaults per codec: DiLoCo's Nesterov step, except for the sparse codec.
# It delivers each value late, through its error feedback, which already acts as a momentum:
# Nesterov on top overshoots (measured on the convergence benchmark, seed 0: H=50 2.410 with
# 0.7/0.9 against 2.264 with plain averaging; docs/benchmarks.md), so SparseLoCo's plain
# outer step is its default. codec -> (lr, momentum).
OUTER_DEFAULTS = {"sparse": (1.0, 0.0)}
DILOCO_OUTER = (0.7, 0.9)


@dataclass(frozen=True, kw_only=True, config=SETTINGS)
class OuterConfig:
    """Hyper-parameters of the outer step (outer.py). lr and momentum None: the codec's
    defaults (DiLoCo's 0.7 and 0.9; 1.0 and 0 with the sparse codec), filled in by `resolved`."""

    lr: float | None = Field(None, description="outer learning rate (1.0 with momentum 0 = plain parameter averaging); "
                                               "default 0.7, or 1.0 with the sparse codec")
    momentum: float | None = Field(None, description="outer momentum; default 0.9, or 0 with the sparse codec (its "
                                                     "error feedback is the momentum, as in SparseLoCo)")
    nesterov: bool = Field(True, description="use Nesterov momentum in the outer step")
    # From a cold start the first pseudo-gradients are large and point in quickly changing
    # directions; full momentum on them overshoots (docs/benchmarks.md, "Outer warm-up").
    warmup: int = Field(4, description="outer steps over which the outer momentum ramps up linearly from 0 (with "
                                       "full momentum, a cold start's first pseudo-gradients overshoot)")

    def __post_init__(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"outer lr must be > 0, got {self.lr}")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {self.momentum}")
        if self.warmup < 0:
            raise ValueError(f"outer warm-up must be a whole number of outer steps >= 0, got {self.warmup!r}")
        if self.nesterov and self.momentum == 0:
            # torch.optim.SGD refuses this too: Nesterov without momentum is meaningless.
            object.__setattr__(self, "nesterov", False)

    def resolved(self, codec: str = "fp32") -> OuterConfig:
        """This config with lr and momentum filled in for `codec` where they are None."""
        if self.lr is not None and self.momentum is not None:
            return self
        lr, momentum = OUTER_DEFAULTS.get(codec, DILOCO_OUTER)
        return dataclasses.replace(self, lr=lr if self.lr is None else self.lr,
                                   momentum=momentum if self.momentum is None else self.momentum)

    def momentum_at(self, step: int | None) -> float:
        """The momentum of outer step `step` (0 for the first): μ·min(1, step / warmup); None
        (a caller that does not count steps): μ. Every member of a round passes the same step
        (its state's round), so all agree."""
        mu = self.resolved().momentum
        return mu if step is None or step >= self.warmup else mu * step / self.warmup


@dataclass(frozen=True, kw_only=True, config=SETTINGS)
class AllReduceConfig:
    """How a formed group reduces its pseudo-gradients (allreduce.py, averager.py)."""

    timeout: float = Field(60.0, description="seconds before a stalled all-reduce is declared failed (a dead peer "
                                             "fails the round within it)")
    trusted: bool = Field(False, description="all peers are trusted (private run): fp32+mean uses gloo's faster ring "
                                             "SUM, which cannot drop a bad contribution (a NaN fails the round)")
    ban_after: int = Field(3, description="ban a peer for the rest of the run after this many rounds with a rejected "
                                          "contribution")

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"allreduce timeout must be > 0, got {self.timeout}")
        if self.ban_after < 1:
            raise ValueError(f"ban_after must be >= 1, got {self.ban_after}")


@dataclass(frozen=True, kw_only=True, config=SETTINGS)
class CodecConfig:
    """The wire codec of the pseudo-gradients (codecs.py, sparse.py). Every member of a group
    uses the same one: it is part of the meeting key."""

    name: CodecName = Field("fp32", description="fp32 exact; fp16/bf16 half the bytes; int8 a quarter; sparse 1/256 "
                                                "(top-k, 2 bits, all-gathered); the lossy ones with error feedback")
    error_feedback_decay: float = Field(1.0, description="lossy codecs: each round, the unsent residual is scaled by "
                                                         "this before the new pseudo-gradient is added (SparseLoCo's "
                                                         "beta; 1 = keep it all)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_feedback_decay <= 1.0:
            raise ValueError(f"error_feedback_decay must be in [0, 1], got {self.error_feedback_decay}")


@dataclass(frozen=True, kw_only=True, config=SETTINGS)
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

    name: AggregatorName = Field("mean", description="how each part is reduced: mean (weighted), or robust to hostile "
                                                     "peers: trimmed_mean, centered_clip")
    trim: float = Field(0.2, description="trimmed_mean: fraction of values dropped at EACH end, per coordinate "
                                         "(0 <= trim < 0.5)")
    clip_tau: float = Field(1.0, description="centered_clip: clipping radius, relative to the median distance of the "
                                             "updates")
    clip_iters: int = Field(3, description=f"centered_clip: fixed-point iterations (0..{MAX_CLIP_ITERS})")

    def __post_init__(self) -> None:
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim must be a number in [0, 0.5); got {self.trim!r}")
        if not (math.isfinite(self.clip_tau) and self.clip_tau > 0):
            raise ValueError(f"clip_tau must be a finite number > 0; got {self.clip_tau!r}")
        if not 0 <= self.clip_iters <= MAX_CLIP_ITERS:
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class AveragerConfig:
    """What the averager needs: its addresses, and the components of a round, each checked by
    its own class (a plain dataclass: it holds a credential, not settings from a file)."""

    # Address the TCPStore listens on (0.0.0.0 = all interfaces).
    listen_host: str = "0.0.0.0"
    # Address other peers use to reach this one (for the store and for gloo).
    announce_host: str = "127.0.0.1"
    # Behind NAT: never listen; average through the group leader (see relay.py).
    client_mode: bool = False
    matchmaking: MatchmakingConfig = dataclasses.field(default_factory=MatchmakingConfig)
    allreduce: AllReduceConfig = dataclasses.field(default_factory=AllReduceConfig)
    codec: CodecConfig = dataclasses.field(default_factory=CodecConfig)
    aggregator: AggregatorConfig = dataclasses.field(default_factory=AggregatorConfig)
    # A private run's shared secret (None = open run): see access.py.
    secret: Credential | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_group_sizes(self.aggregator, self.matchmaking)
