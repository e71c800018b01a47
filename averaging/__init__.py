"""How peers agree on one model: matchmaking, the group all-reduce, and the outer optimizer.

Nothing in this package knows about training loops; the maths are pure functions.
"""
from .allreduce import RoundResult, weighted_allreduce
from .averager import Averager, AveragerConfig
from .dht import SwarmDHT
from .errors import (
    AllReduceError,
    AveragingError,
    MatchmakingError,
    ModelMismatchError,
    NetworkError,
    StateError,
    SwarmError,
)
from .matchmaking import Group, MatchmakingConfig, Matchmaker
from .outer import OuterConfig, OuterOptimizer, outer_step

__all__ = [
    "AllReduceError", "Averager", "AveragerConfig", "AveragingError", "Group", "MatchmakingConfig",
    "MatchmakingError", "Matchmaker", "ModelMismatchError", "NetworkError", "OuterConfig", "OuterOptimizer",
    "RoundResult", "StateError", "SwarmDHT", "SwarmError", "outer_step", "weighted_allreduce",
]
