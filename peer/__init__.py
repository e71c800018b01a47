"""A swarmtrain training node: config, training loop, sync schedule, state, CLI, Python API.

`Peer` and the configs load on first use (PEP 562): the console scripts import this package
to parse their flags, and must not wait for torch and hivemind to do so.
"""
from __future__ import annotations

from averaging.lazy import lazy_exports

_WHERE = {
    "Peer": "api", "AsyncPeer": "aio", "PeerStats": "stats", "RoundCost": "stats",
    "CheckpointConfig": "config", "PeerConfig": "config", "RunConfig": "config", "SwarmConfig": "config",
    "SyncConfig": "config", "TrainConfig": "config",
    # the [sync.*] sections, defined in averaging/config.py
    "AggregatorConfig": "config", "AllReduceConfig": "config", "CodecConfig": "config", "MatchmakingConfig": "config",
    "OuterConfig": "config",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
