"""A swarmtrain training node: config, training loop, sync schedule, state, CLI, Python API.

`Peer` and the configs load on first use (PEP 562): the console scripts import this package
to parse their flags, and must not wait for torch and hivemind to do so.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Peer": "api",
    "CheckpointConfig": "config", "PeerConfig": "config", "RunConfig": "config", "SwarmConfig": "config",
    "SyncConfig": "config", "TrainConfig": "config",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'peer' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
