"""How peers agree on one model: matchmaking, the group all-reduce, and the outer optimizer.

Nothing in this package knows about training loops; the maths are pure functions.

The names below load on first use (PEP 562), so that importing a light submodule
(`averaging.config`, `averaging.errors`) does not pull in torch and hivemind.
"""
from __future__ import annotations

from .lazy import lazy_exports

_WHERE = {
    "RoundResult": "allreduce", "weighted_allreduce": "allreduce",
    "Averager": "averager",
    "AggregatorConfig": "config", "AllReduceConfig": "config", "AveragerConfig": "config", "CodecConfig": "config",
    "MatchmakingConfig": "config", "OuterConfig": "config",
    "SwarmDHT": "dht",
    "AccessError": "errors", "AllReduceError": "errors", "AveragingError": "errors", "MatchmakingError": "errors", "ModelMismatchError": "errors",
    "NetworkError": "errors", "StateError": "errors", "StateMovedError": "errors", "SwarmError": "errors",
    "Group": "matchmaking", "Matchmaker": "matchmaking",
    "OuterOptimizer": "outer", "outer_step": "outer",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
