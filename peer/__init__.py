"""A swarmtrain training node: config, training loop, sync schedule, state, CLI, Python API."""
from .api import Peer
from .config import CheckpointConfig, PeerConfig, RunConfig, SwarmConfig, SyncConfig, TrainConfig

__all__ = ["CheckpointConfig", "Peer", "PeerConfig", "RunConfig", "SwarmConfig", "SyncConfig", "TrainConfig"]
