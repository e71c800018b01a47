"""A heartbeat file: how a supervisor (Docker's HEALTHCHECK, systemd, a script) asks a node if it is
making progress, without guessing from /proc or its command line.

    SWARMTRAIN_HEARTBEAT=/tmp/swarmtrain-heartbeat.json swarm-peer ...     (the images set it)

The node's own loop (the training loop of `swarm-peer`, the watch loop of `swarm-bootstrap`)
calls `beat()` as it goes; the file is rewritten atomically at most every `every` seconds:

    {"pid": 12, "role": "peer", "time": 1764700000.0, "stale_after": 180.0, "ok": true,
     "detail": "step 410, round 8 (last complete 25 s ago)", ...}

Beats come from the loop itself, never from a thread of their own: a loop that hangs stops
beating. `stale_after` is the writer's own bound on the gap to its next beat (a peer knows its
step time and its sync timeouts), so the reader needs no configuration. `close()` removes the
file: a node that stopped is not healthy. docker/healthcheck.py is the reader.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .fsutil import write_text_atomic

ENV = "SWARMTRAIN_HEARTBEAT"


class Heartbeat:
    """Owner: the node's main loop. `beat()` is cheap when called more often than `every`.
    With no path (the variable unset) every method does nothing. As a context manager it
    writes a first beat ("starting", with the generous bound `starting_s`) and removes the
    file on exit."""

    def __init__(self, path: str | Path | None, role: str, *, every: float = 5.0, starting_s: float = 600.0) -> None:
        self.path = Path(path) if path else None
        self.role, self.every, self.starting_s = role, every, starting_s
        self._last = 0.0

    @classmethod
    def from_env(cls, role: str, *, starting_s: float = 600.0) -> "Heartbeat":
        return cls(os.environ.get(ENV, ""), role, starting_s=starting_s)

    def __enter__(self) -> "Heartbeat":
        self.beat(detail="starting", stale_after=self.starting_s, force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def beat(self, *, ok: bool = True, detail: str = "", stale_after: float = 120.0, force: bool = False,
             **fields: Any) -> None:
        """Write the heartbeat if `every` seconds have passed (or `force`). An unwritable file is
        ignored: the heartbeat is for a supervisor and must never stop the node."""
        now = time.time()
        if self.path is None or (not force and now - self._last < self.every):
            return
        self._last = now
        doc = {"pid": os.getpid(), "role": self.role, "time": now, "stale_after": max(stale_after, 3 * self.every),
               "ok": ok, "detail": detail, **fields}
        try:
            write_text_atomic(self.path, json.dumps(doc))
        except OSError:  # a full or read-only disk must never stop the node; the supervisor sees a stale beat
            pass

    def close(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
