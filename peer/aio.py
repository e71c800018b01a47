"""`AsyncPeer`: a Peer for asyncio applications.

    async with AsyncPeer(model, opt, PeerConfig(swarm=SwarmConfig(initial_peers=[ADDR]))) as peer:
        async for x, y in batches():
            loss = loss_fn(model(x), y)
            await peer.step(loss, samples=len(x))   # backward, inner step, and a sync when due

The inner step (backward, optimizer step) runs in the calling task, as in a blocking loop:
it is the application's own compute. The peer's network work runs as tasks on the event
loop the peer owns (peer/loop.py: announcing, rediscovery, serving state, each round's
matchmaking waits and all-reduce). What would block the caller's loop (joining, applying a
round's result, downloading a state, leaving) runs on this AsyncPeer's one worker thread
and is awaited. So the application's event loop stays free while this peer is in
matchmaking or an all-reduce: other tasks, other AsyncPeers, a web server, all keep
running. The application needs no thread of its own.

Ownership and cancellation. The AsyncPeer owns its worker thread and the Peer it wraps
(whose parts own theirs: docs/python-api.md). Cancelling a task that awaits `step()` stops
the wait at once; the round already running finishes in the worker within its own bounds
(matchmaking window + all-reduce timeouts, applied or dropped honestly, never half-applied),
and the next `step()` or `close()` waits for it first. `close()` (or leaving `async with`,
also by cancellation) leaves the swarm: when it returns, no thread, process or listening
port of the peer is left.
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from averaging.allreduce import RoundResult
from averaging.faults import Tamper

from .api import Peer
from .config import PeerConfig
from .state import SwarmState
from .stats import PeerStats


class AsyncPeer:
    """The asyncio form of `Peer`: same arguments, awaitable lifecycle and steps."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, config: PeerConfig | None = None,
                 *, flops_per_sample: float | None = None, tamper: Tamper | None = None) -> None:
        self._args = (model, optimizer, config)
        self._kw = dict(flops_per_sample=flops_per_sample, tamper=tamper)
        self._worker: ThreadPoolExecutor | None = None
        self._peer: Peer | None = None
        self._running: Future | None = None  # the sync round on the worker, if one is running
        self.model, self.optimizer = model, optimizer

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> "AsyncPeer":
        """Join the swarm (Peer's constructor, on the worker). Raises what Peer raises."""
        if self._worker is not None:
            raise RuntimeError("AsyncPeer already started")
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="swarmtrain-async-peer")
        try:
            self._peer = await self._on_worker(functools.partial(Peer, *self._args, **self._kw))
        except BaseException:
            await self._stop_worker()
            raise
        return self

    async def close(self) -> None:
        """Leave the swarm. Idempotent; safe to call from a cancelled task (see module doc)."""
        if self._worker is None:
            return
        try:
            await self._settle()
            if self._peer is not None:
                await self._on_worker(self._peer.close)
        finally:
            await self._stop_worker()

    async def __aenter__(self) -> "AsyncPeer":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------------ training
    async def step(self, loss: torch.Tensor | None = None, *, samples: int = 1) -> RoundResult | None:
        """Count one inner step (with `loss`: backward, optimizer step, zero_grad, here in the
        calling task); when a sync is due, await it on the worker. Returns its RoundResult, or
        None. Never raises for network faults (as Peer.step)."""
        peer = self._live()
        await self._settle()  # a round left running by a cancelled step() ends before the next step
        if loss is not None:
            if self.optimizer is None:
                raise ValueError("step(loss) needs an optimizer; pass one to AsyncPeer or step it yourself")
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not peer._rounds.tick(samples, None if loss is None else loss.detach()):
            await asyncio.sleep(0)  # let the loop's other tasks run between steps, as a cooperative task should
            return None
        return await self.sync()

    async def sync(self) -> RoundResult | None:
        """Average with the peers at this round now (Peer.sync, on the worker)."""
        peer = self._live()
        await self._settle()
        assert self._worker is not None
        self._running = self._worker.submit(peer.sync)
        # Not cancellable once submitted: a cancelled await leaves it running (see _settle).
        result = await asyncio.shield(asyncio.wrap_future(self._running))
        self._running = None
        return result

    async def wait_for_peers(self, n: int, timeout: float = 60.0) -> int:
        """Peer.wait_for_peers, awaited."""
        return await self._on_worker(functools.partial(self._live().wait_for_peers, n, timeout))

    # ------------------------------------------------------------------ what it knows (read-only, no waiting)
    def stats(self) -> PeerStats:
        return self._live(closed_ok=True).stats()

    @property
    def peer(self) -> Peer:
        """The blocking Peer underneath (for reading; do not call its blocking methods from the event loop)."""
        return self._live(closed_ok=True)

    @property
    def round(self) -> int:
        return self.peer.round

    @property
    def digest(self) -> str:
        return self.peer.digest

    @property
    def state(self) -> SwarmState:
        return self.peer.state

    @property
    def peer_id(self) -> str:
        return self.peer.peer_id

    @property
    def addrs(self) -> list[str]:
        return self.peer.addrs

    # ------------------------------------------------------------------ internals
    def _live(self, closed_ok: bool = False) -> Peer:
        if self._peer is None or (self._worker is None and not closed_ok):
            raise RuntimeError("AsyncPeer is not started (use `async with AsyncPeer(...)` or `await peer.start()`)"
                               if self._peer is None else "AsyncPeer is closed")
        return self._peer

    async def _on_worker(self, fn: Any) -> Any:
        assert self._worker is not None
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn)

    async def _settle(self) -> None:
        """Wait for a round still running on the worker (left by a cancelled step()). The wait
        is shielded: cancelling us does not cancel the round, which ends within its bounds."""
        running = self._running
        if running is None:
            return
        if not running.done():
            await asyncio.shield(asyncio.wrap_future(running))
        self._running = None

    async def _stop_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:  # idle by now (settled, closed): joining its thread returns at once
            worker.shutdown(wait=True)
