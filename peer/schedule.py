"""When to sync: every H inner steps, or every T seconds of wall-clock time.

With T, sync points are aligned to multiples of T since the Unix epoch, so peers that
started at different times still arrive at matchmaking together.
After a failed round the peer keeps training and retries sooner: after a quarter period.
"""
from __future__ import annotations

import math
import threading
import time


class SyncSchedule:
    def __init__(self, every_steps: int = 0, every_seconds: float = 0.0, now: float | None = None) -> None:
        if every_steps < 0 or every_seconds < 0 or (every_steps == 0 and every_seconds == 0):
            raise ValueError("sync schedule needs every_steps > 0 or every_seconds > 0")
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.steps_since_sync = 0
        self._next_step = every_steps if every_steps > 0 else math.inf
        self._next_time = self._boundary_after(time.time() if now is None else now)

    def _boundary_after(self, now: float) -> float:
        if self.every_seconds <= 0:
            return math.inf
        return (math.floor(now / self.every_seconds) + 1) * self.every_seconds

    def tick(self) -> None:
        """Count one inner step."""
        self.steps_since_sync += 1

    def due(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return self.steps_since_sync >= self._next_step or now >= self._next_time

    def after_next_step(self) -> None:
        """Make the next sync due after one more step (a peer that just caught up joins the
        round its swarm is waiting in, with one step of its own work)."""
        self._next_step = self.steps_since_sync + 1

    def done(self, ok: bool, now: float | None = None) -> None:
        """Record the outcome of a sync attempt."""
        now = time.time() if now is None else now
        if ok:
            self.steps_since_sync = 0
            self._next_step = self.every_steps if self.every_steps > 0 else math.inf
            self._next_time = self._boundary_after(now)
        else:  # keep training; try again after a quarter period
            if self.every_steps > 0:
                self._next_step = self.steps_since_sync + max(1, self.every_steps // 4)
            if self.every_seconds > 0:
                self._next_time = now + self.every_seconds / 4


class ComputeClock:
    """Seconds a peer spent training (wall time since it joined, minus time blocked in sync).

    Read from another thread (the announcer publishes it; the ledger credits it), so it must
    only ever grow: while a sync is in progress the wait so far is already excluded, and the
    value returned is never below one returned before. A counter that dipped when a long
    matchmaking wait ended was read by the ledger as a restart and credited twice.
    """

    def __init__(self, now: float | None = None) -> None:
        self._lock = threading.Lock()
        self._t0 = time.monotonic() if now is None else now
        self._waited = 0.0  # finished waits
        self._wait_since: float | None = None
        self._last = 0.0

    def begin_wait(self, now: float | None = None) -> None:
        with self._lock:
            self._wait_since = time.monotonic() if now is None else now

    def end_wait(self, now: float | None = None) -> float:
        """Close the current wait; returns its length."""
        now = time.monotonic() if now is None else now
        with self._lock:
            waited = now - self._wait_since if self._wait_since is not None else 0.0
            self._waited += waited
            self._wait_since = None
            return waited

    @property
    def waiting(self) -> bool:
        """True while the trainer is blocked in a sync (not computing)."""
        return self._wait_since is not None

    @property
    def wait_s(self) -> float:
        """Total time blocked in sync (finished waits only)."""
        return self._waited

    def compute_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            waiting = now - self._wait_since if self._wait_since is not None else 0.0
            self._last = max(self._last, now - self._t0 - self._waited - waiting)
            return self._last
