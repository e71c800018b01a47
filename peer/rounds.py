"""One peer's round lifecycle: schedule → matchmaking → all-reduce → apply → reconcile.

A sync round (DiLoCo): Δ = θ_sync − θ_local is averaged over the group, weighted by
samples; the outer Nesterov step gives the new θ_sync, identical on every member, and
the model's parameters are reset to it. A failed round changes nothing: the peer keeps
training and retries. θ_sync and the outer momentum live on the CPU in fp32.

Agreement: the DHT record of every peer carries the sha256 of its θ_sync. Peers only
meet peers with the same model fingerprint, round and θ_sync digest, so a stale or
diverged peer can never pollute a group. When a peer finds it is behind (or disagrees
with the majority at its round), it downloads the swarm's state and continues from there,
carrying its own progress on top (the stale-contribution rule, `adopt`).

`RoundLoop` owns the round state (θ_sync, momentum, round, digest, schedule, counters,
history) and is driven from the training thread; each round's network part (waiting for
joiners, matchmaking, the all-reduce) runs as a task on the peer's event loop (loop.py).
State downloads (`reconcile`) block the training thread, which has nothing to train on
until they are done. `Peer` composes it with the network parts (DHT, averager, state
server, announcer, loop), which it attaches once they exist.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from averaging.allreduce import RoundResult
from averaging.codecs import partition
from averaging.averager import Averager
from averaging.dht import SwarmDHT, dht_time
from averaging.errors import StateError, StateMovedError
from averaging.flat import tensor_digest
from averaging.outer import OuterOptimizer

from .config import PeerConfig
from .loop import PeerLoop
from .membership import (RECENT_ROUNDS, Announcer, PeerRecord, RoundOutcome, aannounced_peers, announced_peers,
                         better_states, donors_for)
from .schedule import ComputeClock, SyncSchedule
from .state import CheckpointDir, SwarmState
from .stats import Counters, PeerStats, RoundCost
from .transfer import MAX_DONORS, StateServer, download_state

log = logging.getLogger("peer.api")  # the name users filter on (docs/python-api.md "Seeing the logs")

HISTORY_ROUNDS = 100  # sync attempts kept in RoundLoop.history (tensor-free)
NO_PEER = "no other peer at this round"
ALONE_REMIND_S = 300.0
# States whose donors may say "moved on" in one reconcile call before it gives up until the
# next: short rounds can move on under a joiner a few times; a liar's "moved" is believed once.
MAX_MOVED = 5  # a peer that stays alone says so again this often, not at every attempt


class _AloneNotice:
    """Says once that this peer is alone (a lone peer retries every few steps: one line per
    attempt would bury everything else), again every ALONE_REMIND_S, and again after company."""

    def __init__(self) -> None:
        self._said_at: float | None = None

    def due(self, now: float) -> bool:
        if self._said_at is not None and now - self._said_at < ALONE_REMIND_S:
            return False
        self._said_at = now
        return True

    def reset(self) -> None:
        self._said_at = None


class RoundLoop:
    """The round lifecycle of one peer. Lifecycle: construct (offline), `attach` the network
    parts, `tick`/`sync` from the training thread, `close`."""

    def __init__(self, params: list[torch.Tensor], config: PeerConfig, *, fingerprint: str,
                 ckpt: CheckpointDir | None, on_state: Callable[[bool], None]) -> None:
        """`params`: the model's trainable parameters (written in place after each round).
        `on_state(now)`: called whenever the announced state changes, so the Peer updates its
        record (and, with now=True, publishes it at once)."""
        self.params = params
        self.device = params[0].device
        self.config = config
        self.fingerprint = fingerprint
        # θ_sync, the outer momentum and the round buffer: host memory (pinned for a CUDA model),
        # allocated once, updated in place (averaging/outer.py).
        self.outer = OuterOptimizer.from_params(params, config.sync.outer, pin=self.device.type == "cuda")
        # Held while θ_sync and the momentum change (a round applied, a state adopted): the state
        # server streams them from another thread, chunk by chunk, under it.
        self.state_lock = threading.Lock()
        self._snap: torch.Tensor | None = None  # overlap mode: θ_local when the round in flight started
        self._local_s = 0.0  # this round's own work so far: Δ, the outer step, the parameters, the digest
        self._checkpoint_s = 0.0  # the last round's checkpoint save (not a round cost)
        # θ_sync's digest, computed off the training thread after a round (see set_state);
        # one thread, owned here, shut down by close().
        self._digests = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="swarmtrain-digest")
        self._digest_future: concurrent.futures.Future | None = None
        self._digest = ""
        self.last_download_s: float | None = None  # the last state download's duration
        self.schedule = SyncSchedule(config.sync.every_steps, config.sync.every_seconds)
        self.round = 0
        self.counters = Counters()
        self.clock = ComputeClock()
        self.last_loss: float | None = None
        self.last_val: tuple[int, float] | None = None  # (round, validation loss of θ_sync after it)
        self._loss_t: torch.Tensor | None = None
        self._rate_window: deque[tuple[float, int]] = deque()  # (time, total samples), last ~30 s
        # The last HISTORY_ROUNDS sync attempts, without their mean Δ: a long run must not keep
        # one parameter vector per round (100M parameters = 0.4 GB a round).
        self.history: deque[RoundResult] = deque(maxlen=HISTORY_ROUNDS)
        self.outcomes: deque[RoundOutcome] = deque(maxlen=RECENT_ROUNDS)  # published with the metrics
        self.costs: deque[RoundCost] = deque(maxlen=HISTORY_ROUNDS)  # completed rounds' time split
        self.catch_up: tuple[int, str] = (0, "")  # the state being downloaded, announced (see _announce_catch_up)
        # (round, the other members) of the round that produced this peer's state: they land on the
        # same state, maybe a little later (see _expected)
        self._landed_with: tuple[int, frozenset[str]] = (0, frozenset())
        self._alone = _AloneNotice()
        self._unbacked: set[tuple[str, int, str]] = set()  # (peer id, round, digest) claims no download backed
        self._weight_in_flight = 0
        # Weight taken off the pending samples for staleness (the stale-contribution rule, `adopt`):
        # the next round's weight is samples_since_sync − _stale_cut.
        self._stale_cut = 0.0
        # Overlap mode: the round running on the peer's event loop while training goes on.
        self._in_flight: tuple[Future, torch.Tensor, tuple[int, int]] | None = None
        self._loop: PeerLoop | None = None  # the peer's event loop: every round runs on it
        self.ckpt = ckpt
        self._on_state = on_state
        self.peer_id = ""
        self._dht: SwarmDHT | None = None
        self._averager: Averager | None = None
        self._server: StateServer | None = None
        self._announcer: Announcer | None = None
        self.set_state(SwarmState(0, fingerprint, self.outer.theta_sync, None))

    def attach(self, *, peer_id: str, dht: SwarmDHT, averager: Averager, server: StateServer | None,
               loop: PeerLoop) -> None:
        self.peer_id, self._dht, self._averager, self._server, self._loop = peer_id, dht, averager, server, loop

    def attach_announcer(self, announcer: Announcer | None) -> None:
        self._announcer = announcer

    def close(self) -> None:
        """Apply the round in flight (overlap mode), so its result is not lost; finish the digest."""
        if self._in_flight is not None:
            try:
                self._collect_in_flight()
            except Exception as e:  # a round that crashed (or was cancelled) must not prevent a clean shutdown
                log.warning("the round in flight failed while leaving: %s", e)
        self._digests.shutdown(wait=True)  # bounded: one hash of θ_sync
        self._server = self._announcer = None

    # ------------------------------------------------------------------ counters
    def stats(self) -> PeerStats:
        c = self.counters
        return PeerStats(round=self.round, local_step=c.local_step, total_samples=c.total_samples,
                         samples_since_sync=c.samples_since_sync, samples_averaged=c.samples_averaged,
                         samples_discarded=c.samples_discarded, rounds_ok=c.rounds_ok, rounds_failed=c.rounds_failed,
                         bytes_sent=c.bytes_sent, bytes_recv=c.bytes_recv, peers_seen=c.peers_seen,
                         sync_wait_s=self.clock.wait_s, compute_s=float(self.clock.compute_s()),
                         samples_per_s=self.samples_per_s, last_loss=self.last_loss)

    @property
    def samples_per_s(self) -> float:
        """Training throughput over the last ~30 s (samples per wall-clock second)."""
        if len(self._rate_window) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._rate_window[0], self._rate_window[-1]
        return max((n1 - n0) / (t1 - t0), 0.0) if t1 > t0 else 0.0

    def tick(self, samples: int, loss: torch.Tensor | None) -> bool:
        """Count one inner step of `samples`; True if a sync is due now."""
        if loss is not None:
            self._loss_t = loss
        c = self.counters
        c.local_step += 1
        c.samples_since_sync += samples
        c.total_samples += samples
        now = time.monotonic()
        self._rate_window.append((now, c.total_samples))
        while len(self._rate_window) > 2 and now - self._rate_window[0][0] > 30.0:
            self._rate_window.popleft()
        self.schedule.tick()
        return self.schedule.due()

    # ------------------------------------------------------------------ one round
    def sync(self) -> RoundResult | None:
        """Average with the peers at this round now. Never raises for network faults.

        The round (waiting for joiners, matchmaking, the all-reduce) runs on the peer's event
        loop; this thread waits for it. With `sync.overlap` it does not wait: training goes
        on, and the result is applied at the next sync point (one round late). Then the
        return value is the previous round's result (None the first time).
        """
        assert self._loop is not None
        self.clock.begin_wait()
        try:
            if self.config.sync.overlap:
                return self._sync_overlapped()
            # The training thread waits, so the parameters are θ_local for the whole round: Δ is
            # computed from them straight into the round buffer (again for a retry).
            fill = functools.partial(self.outer.pseudo_gradient_, self.params, self.outer.round_buffer())
            self._weight_in_flight = self.counters.samples_since_sync
            t0, self._local_s = time.monotonic(), 0.0
            result = self._loop.call(self._round(fill, self._weight(), self.round, self.meeting_key()),
                                     f"round {self.round + 1}")
            self._finish_round(result, None)
            if result.ok:  # matchmaking: the rest (waiting for joiners, DHT reads, meeting the group)
                wall = time.monotonic() - t0 - self._checkpoint_s
                self.costs.append(RoundCost(self.round, wall - result.transfer_s - self._local_s, result.transfer_s,
                                            self._local_s))
            self.schedule.done(result.ok)
            return dataclasses.replace(result, mean_delta=None)  # it was the round buffer: reused, and the step's scratch
        finally:
            self.clock.end_wait()

    async def _round(self, fill: Callable[[], torch.Tensor], weight: float, round_: int, key: str,
                     span: tuple[int, int] | None = None) -> RoundResult:
        """One round on the peer's loop: wait for joiners, then matchmaking + all-reduce of Δ,
        which `fill()` writes into the round buffer (and returns). The all-reduce works in that
        buffer: a complete round's mean_delta is it. Cancellable at any wait (the round is then
        simply not taken part in)."""
        assert self._averager is not None
        await self._wait_for_joiners(round_)
        if await self.expected_group_size_async() < self.config.sync.matchmaking.min_group_size:
            return RoundResult(round_, "failed", (self.peer_id,), (), 0.0, 0, NO_PEER)
        # Δ is written into the round buffer (off the loop) while we meet the group: matchmaking
        # is mostly waiting for the others, so this pass over the model costs the round nothing
        # unless the group forms first; only that exposed wait counts as this peer's local work.
        filling = asyncio.ensure_future(asyncio.to_thread(fill))

        async def ready() -> None:
            t0 = time.monotonic()
            await asyncio.shield(filling)  # (a cancelled round still lets the writer finish: below)
            self._local_s += time.monotonic() - t0

        lo, hi = span or (0, self.outer.numel)  # streaming: this round's fragment of the parameters
        try:
            result = await self._averager.average_async(round_, key, self.outer.round_buffer()[lo:hi], weight,
                                                        self.expected_group_size_async,
                                                        refill=functools.partial(self._timed, fill), ready=ready,
                                                        stream=self.fragment_of(round_)[0])
        finally:  # matchmaking failed or the round was cancelled before `ready`: the next round
            if not filling.done():  # reuses the buffer, so its writer must be done first
                await asyncio.wait([filling])
        filling.result()  # a fill that failed is an error even when matchmaking failed too
        return result

    def _timed(self, fill: Callable[[], torch.Tensor]) -> torch.Tensor:
        t0 = time.monotonic()
        try:
            return fill()
        finally:
            self._local_s += time.monotonic() - t0

    async def _wait_for_joiners(self, round_: int) -> None:
        """A peer downloading our state is about to join this state's next round: arrive at that
        round's matchmaking only when its download is done (bounded by 0.8 × the matchmaking
        window, so the others, waiting for us there, are still waiting). Without this, a joiner
        whose download takes longer than a round period lands a round behind, downloads again,
        and never takes part."""
        if self._server is None:
            return
        deadline = time.monotonic() + 0.8 * self.config.sync.matchmaking.window
        said = False
        while time.monotonic() < deadline:
            busy, fetched = self._server.downloads(max_age=self.config.sync.matchmaking.window)
            if fetched:  # done downloading: wait until it announces our state, then it is counted in
                here = {r.peer_id for r in await self.others_async() if (r.round, r.digest) == (round_, self.digest)}
                for pid in fetched & here:
                    self._server.forget(pid)
                fetched -= here
            if not busy and not fetched:
                return
            if not said:
                log.info("a peer is downloading this peer's state to join: waiting up to %.0fs for it before round %d",
                         deadline - time.monotonic(), round_ + 1)
                said = True
            await asyncio.sleep(0.2)

    def _finish_round(self, result: RoundResult, snap: torch.Tensor | None, span: tuple[int, int] | None = None) -> None:
        """Apply a round's result. `snap` (overlap mode) is θ_local when the round started: local
        progress made since then is kept on top of the new θ_sync. Without it, the parameters
        are θ_local (training waited) and become the new θ_sync. `span` (streaming): the
        fragment [lo, hi) of the flat parameters the round averaged; the rest is untouched."""
        c = self.counters
        if self._loss_t is not None:
            self.last_loss = float(self._loss_t)
        self.history.append(dataclasses.replace(result, mean_delta=None))
        self.outcomes.append(RoundOutcome(
            round=result.round + 1, status=result.status, duration_s=float(max(result.duration_s, 0.0)),
            bytes=int(result.bytes_sent), members=len(result.members), t=float(dht_time())))
        if not result.ok:
            self._weight_in_flight = 0  # those samples count towards the next attempt
            c.rounds_failed += 1
            if result.error != NO_PEER:
                log.info("round %d not completed (%s); continuing to train", self.round + 1, result.error)
            elif self._alone.due(time.monotonic()):
                if c.peers_seen == 0:
                    log.info("round %d not completed (%s): no other peer is in run %r now. Training alone and retrying "
                             "quietly; if other peers should be here, check the run id (--swarm.run-id)",
                             self.round + 1, NO_PEER, self.config.swarm.run_id)
                else:
                    log.info("round %d not completed (%s): %d other peer(s) in the run, none at this round with this "
                             "state. Training on and retrying quietly", self.round + 1, NO_PEER, c.peers_seen)
            self.reconcile()
            return
        self._alone.reset()
        assert result.mean_delta is not None
        t_local = time.monotonic()
        _ = self.digest  # (computed long ago: the round's meeting key needed it) θ_sync changes now
        lo, hi = span or (0, self.outer.numel)
        with self.state_lock:  # in place: Δ̄ (the round buffer) is the step's scratch
            # the outer steps this range has had: every member of the round is at the same round
            theta = self.outer.apply(result.mean_delta, start=lo, step=self.round // self.config.sync.fragments)
            # a new state object at once: a stream of the old one stops at its next chunk
            self.state = SwarmState(self.round + 1, self.fingerprint, theta, self.outer.momentum_buf,
                                    self.counters.total_samples)
        if snap is None:
            self._write_params(lambda s, e: theta[s:e])
        else:  # θ_local ← θ_sync + (θ_local − snap), evaluated as θ_local + (θ_sync − snap), one tensor at a time
            self._write_params(lambda s, e: theta[s:e] - snap[s:e], add=True, span=(lo, hi))
        self.round += 1
        self._landed_with = (self.round, frozenset(m for m in result.members if m != self.peer_id))
        c.rounds_ok += 1
        c.samples_averaged += min(self._weight_in_flight, c.samples_since_sync)
        c.samples_since_sync = max(0, c.samples_since_sync - self._weight_in_flight)
        self._weight_in_flight = 0
        self._stale_cut = 0.0  # the carried samples were in this round; what is pending now is fresh
        c.bytes_sent += result.bytes_sent
        c.bytes_recv += result.bytes_sent  # all-reduce traffic is symmetric: each member receives what it sends
        self.set_state(self.state, background=True)  # made under the lock above; digested and announced off this thread
        self._local_s += time.monotonic() - t_local
        self._checkpoint_s = 0.0
        if self.ckpt is not None and self.round % self.config.checkpoint.every_rounds == 0:
            t_ck = time.monotonic()
            self.save_checkpoint()
            self._checkpoint_s = time.monotonic() - t_ck
        log.info("round %d complete: %d peers, %.2fs", self.round, len(result.members), result.duration_s)

    def _weight(self) -> float:
        """This round's weight: the samples since the last completed round, those carried from
        stale progress discounted (see `adopt`); never below 1."""
        return max(float(self.counters.samples_since_sync) - self._stale_cut, 1.0)

    def _sync_overlapped(self) -> RoundResult | None:
        result = self._collect_in_flight()
        assert self._loop is not None
        # Training goes on during the round: Δ is taken from a copy of θ_local as it is now
        # (one more vector than the blocking mode: 16 B/param instead of 12, see docs).
        if self._snap is None:
            self._snap = torch.empty(self.outer.numel, dtype=torch.float32, pin_memory=self.outer.pin)
        snap = self._snap
        _, span = self.fragment_of(self.round)
        lo, hi = span
        self._read_params(snap, span=span)
        buf = self.outer.round_buffer()
        fill = functools.partial(self.outer.pseudo_gradient_range_, snap[lo:hi], buf[lo:hi], lo)
        self._weight_in_flight = max(self.counters.samples_since_sync, 1)
        self._in_flight = (self._loop.submit(self._round(fill, self._weight(), self.round, self.meeting_key(), span),
                                             f"round {self.round + 1}"), snap, span)
        self.schedule.done(True)  # the next sync point is a full period away
        return result

    def _collect_in_flight(self) -> RoundResult | None:
        """Wait for the round in flight (if any) and apply it."""
        if self._in_flight is None:
            return None
        future, snap, span = self._in_flight
        self._in_flight = None
        result = future.result()  # bounded: the averager's own timeouts
        self._finish_round(result, snap, span)
        return dataclasses.replace(result, mean_delta=None)

    # ------------------------------------------------------------------ parameters
    def fragment_of(self, round_: int) -> tuple[int, tuple[int, int]]:
        """Streaming (`sync.fragments` F): the fragment f = round mod F that round `round_`
        averages, and its range [lo, hi) of the flat parameters (F contiguous ranges whose
        sizes differ by at most one). Every peer at a round averages the same fragment, so a
        fragment is averaged every F rounds, and each round moves 1/F of the bytes."""
        f = round_ % self.config.sync.fragments
        return f, partition(self.outer.numel, self.config.sync.fragments)[f]

    def _pieces(self, span: tuple[int, int] | None):
        """(parameter, flat view of it, [a, b) in the flat vector) for each parameter's overlap with span."""
        lo, hi = span or (0, self.outer.numel)
        o = 0
        for p in self.params:
            a, b = max(o, lo), min(o + p.numel(), hi)
            if a < b:
                yield p, a - o, a, b
            o += p.numel()

    @torch.no_grad()
    def _write_params(self, values: Callable[[int, int], torch.Tensor], add: bool = False,
                      span: tuple[int, int] | None = None) -> None:
        """Each parameter p (flat range [s, e)) ← values(s, e) (fp32 on the host), or += with
        `add`: one parameter-sized temporary at a time, never a flat copy of the model.
        `span`: only the values in that flat range."""
        for p, off, a, b in self._pieces(span):
            flat = p.view(-1) if p.is_contiguous() else p.reshape(-1).clone()  # (a non-contiguous one: copied back)
            v = values(a, b).to(p.device)
            dst = flat[off : off + b - a]
            if add:  # in fp32 whatever p's dtype (for fp32 p, in place)
                dst.copy_(dst.to(torch.float32).add_(v))
            else:
                dst.copy_(v)
            if not p.is_contiguous():
                p.copy_(flat.view_as(p))

    @torch.no_grad()
    def _read_params(self, out: torch.Tensor, span: tuple[int, int] | None = None) -> None:
        """out [P] fp32 (host) ← the parameters (in `span` only, if given), one at a time."""
        for p, off, a, b in self._pieces(span):
            out[a:b].copy_(p.detach().reshape(-1)[off : off + b - a])

    # ------------------------------------------------------------------ state
    def set_state(self, state: SwarmState, *, background: bool = False) -> None:
        """Make `state` this peer's state, digest it and announce it.

        A SwarmState here holds the live θ_sync and momentum (updated in place under
        state_lock); a new SwarmState object per state, so the state server can tell, chunk by
        chunk under the lock, that what it streams is still the state it announced.
        `background`: hash θ_sync in the digest thread (0.23 s at 100M parameters, one core),
        while training goes on, and announce when done; `digest` waits for it if read before.
        The next round reads it (its meeting key), so θ_sync never changes under the hash."""
        _ = self.digest  # a digest still being computed belongs to the state being replaced
        self.state = state
        if background:
            fut = self._digests.submit(tensor_digest, state.theta_sync)
            self._digest_future = fut
            fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() else self._on_state(True))
            return
        self._digest = tensor_digest(state.theta_sync)
        self._on_state(True)

    @property
    def digest(self) -> str:
        """sha256 of this peer's θ_sync (waits for a digest being computed in the background)."""
        fut = self._digest_future
        if fut is not None:
            self._digest = fut.result()
            self._digest_future = None
        return self._digest

    def adopt(self, state: SwarmState, source: str, carry: bool = False) -> None:
        """Continue from `state` (a download or a checkpoint).

        `carry`: keep this peer's local progress. The stale-contribution rule: progress made
        since our last θ_sync, p = θ_local − θ_sync_old, over n samples, was computed at a
        θ_sync τ rounds older than the swarm's. If τ ≤ `sync.max_stale_rounds`, it is put on
        top of the swarm's θ_sync damped, θ_local := θ_sync_new + p / (1 + τ), and its samples
        stay pending with weight n / (1 + τ), so the next round averages Δ = −p / (1 + τ)
        through the normal outer step. Staleness-aware damping (as in Zhang et al. 2016): p
        partly repeats the way the swarm has already gone since θ_sync_old, and undamped it
        overshoots (measured: docs/benchmarks.md, "Every volunteer's work counts"). Older
        progress is dropped and its samples counted as discarded.
        """
        c = self.counters
        self.catch_up = (0, "")  # announced with the new state by set_state below
        self._landed_with = (0, frozenset())  # a downloaded state: no round of ours produced it
        back = None  # θ_sync_old − θ_local (the progress, negated), in the round buffer
        damp = 1
        stale = state.round - self.round
        if carry and c.samples_since_sync > 0:
            if stale <= self.config.sync.max_stale_rounds:
                damp = 1 + max(stale, 0)
                back = self.outer.pseudo_gradient_(self.params, self.outer.round_buffer())  # [P] fp32, on the host
            else:
                log.info("dropping %d samples of local progress: it is %d rounds older than the swarm's state "
                         "(--sync.max-stale-rounds %d)", c.samples_since_sync, stale, self.config.sync.max_stale_rounds)
        _ = self.digest  # a digest still being computed must not see θ_sync change under it
        with self.state_lock:
            self.outer.load_state_dict({"theta_sync": state.theta_sync, "momentum_buf": state.momentum_buf})
            self.state = SwarmState(state.round, self.fingerprint, self.outer.theta_sync, self.outer.momentum_buf,
                                    self.counters.total_samples)
        theta = self.outer.theta_sync
        if back is None:
            self._write_params(lambda s, e: theta[s:e])
        else:  # θ_local ← θ_sync_new + progress / (1 + τ)
            self._write_params(lambda s, e: theta[s:e] - back[s:e] / damp)
        progress = back
        self.round = state.round
        if progress is None:
            c.samples_discarded += c.samples_since_sync
            c.samples_since_sync = 0
            self._stale_cut = 0.0
        else:  # the carried samples' weight, already discounted once if carried before, divided by 1 + τ
            kept = (c.samples_since_sync - self._stale_cut) / damp
            self._stale_cut = c.samples_since_sync - kept
        if self._averager is not None:
            self._averager.reset_compression()
        self.set_state(self.state)  # made under the lock above
        log.info("continuing from round %d (%s)%s", self.round, source,
                 f", carrying {c.samples_since_sync} samples of local progress" if progress is not None else "")

    def save_checkpoint(self) -> Path:
        assert self.ckpt is not None
        return self.ckpt.save(self.state)

    def resume_from_checkpoint(self) -> None:
        assert self.ckpt is not None
        path = self.ckpt.latest()
        if path is None:
            log.info("no checkpoint in %s; starting fresh", self.ckpt.path)
            return
        state = CheckpointDir.load(path, fingerprint=self.fingerprint, numel=self.outer.theta_sync.numel())
        self.adopt(state, f"checkpoint {path}")

    # ------------------------------------------------------------------ the swarm, as this loop sees it
    def meeting_key(self) -> str:
        # Only peers with the same model, round and θ_sync can average meaningfully.
        # The codec is part of the key too: peers with different codecs cannot share a round.
        return f"{self.fingerprint}.{self.config.sync.codec.name}.{self.digest[:16]}"

    def others(self) -> list[PeerRecord]:
        """The other live peers' records (a blocking DHT read)."""
        assert self._dht is not None
        return self._seen(announced_peers(self._dht))

    async def others_async(self) -> list[PeerRecord]:
        """`others` for a coroutine on the peer's loop."""
        assert self._dht is not None
        return self._seen(await aannounced_peers(self._dht))

    def _seen(self, records: dict[str, PeerRecord]) -> list[PeerRecord]:
        others = [r for pid, r in records.items() if pid != self.peer_id and r.role != "left"]
        self.counters.peers_seen = len(others)
        return others

    def expected_group_size(self) -> int:
        """How many peers (self included) should meet at this round."""
        return self._expected(self.others())

    async def expected_group_size_async(self) -> int:
        """`expected_group_size` for a coroutine on the peer's loop."""
        return self._expected(await self.others_async())

    def _expected(self, others: list[PeerRecord]) -> int:
        banned = self._averager.banned if self._averager is not None else set()
        here = (self.round, self.digest)
        # The other members of the round that produced this state land on it too, but with
        # overlap or streaming each applies it at its own next sync point, and its record says
        # so only after that (and its digest): a leader that counted only the records already
        # at this state closed the group without them (6-11% of overlapped rounds had 3 of 4
        # peers over emulated links). So they are expected while their records, one round
        # behind, are fresh: a member that crashed stops refreshing and is dropped within
        # 2 announce periods.
        rnd, landing = self._landed_with
        landing = landing if rnd == self.round else frozenset()
        fresh_after = dht_time() - 2 * self.config.swarm.announce_period

        def expected(r: PeerRecord) -> bool:
            if r.role != "trainer" or r.fingerprint != self.fingerprint or r.peer_id in banned:
                return False
            # at this state, or downloading it to join this round (announced), or landing on it
            return (here in ((r.round, r.digest), (r.catch_up_round, r.catch_up_digest))
                    or (r.peer_id in landing and r.round == self.round - 1 and r.t >= fresh_after))

        return 1 + sum(map(expected, others))

    def reconcile(self, startup: bool = False, passes: int = 3) -> None:
        """If the swarm is ahead of us, or agrees on a different θ_sync at our round, download its state.

        The swarm's state is what most live peers announce (membership.better_states), not
        the highest round any one record claims. When a download fails, the records are read
        again: a supporter that has moved on was a stale view (nothing to hold against it);
        one that still announces the state no download could back is a liar, or broken: its
        claim is dropped for good and it gets a strike (repeat offenders are banned, as for
        rejected contributions). So one lying record cannot strand a joiner. Donors that moved
        on during the download (StateMovedError) are not blamed: the records are read again
        and the newer state fetched, without using up a pass (short rounds can move on under
        a joiner several times). Bounded: at most `passes` failed downloads and MAX_MOVED
        moved-on ones per call; the next failed round calls again.
        """
        moved: set[tuple[int, str]] = set()  # states whose donors said "moved on" once in this call
        failed = 0
        try:
            while failed < passes and len(moved) <= MAX_MOVED:
                outcome = self._catch_up_once(startup, moved)
                if outcome == "done":
                    return
                failed += outcome == "failed"
        finally:
            if self.catch_up != (0, ""):  # gave up (or moved on) without adopting: stop announcing it
                self._announce_catch_up(0, "")

    def _catch_up_once(self, startup: bool, moved: set[tuple[int, str]]) -> Literal["done", "failed", "moved"]:
        """One pass of `reconcile`: "done" when there is nothing more to do (caught up, or
        nothing better to fetch); "failed" or "moved" (its donors moved on to a newer state) to
        read the records again and retry. `moved`: the states whose donors already answered
        "moved on" in this call; a second time is not believed (a live liar could otherwise say
        it for ever and never be struck)."""
        peers = [r for r in self.others() if r.fingerprint == self.fingerprint
                 and (r.peer_id, r.round, r.digest) not in self._unbacked]
        if not peers or max(r.round for r in peers) < self.round:
            return "done"
        mine = PeerRecord(peer_id=self.peer_id, round=self.round, fingerprint=self.fingerprint, schema="",
                          digest=self.digest, host="", port=0)
        states = better_states([*peers, mine], self.round, self.digest)
        if not states:
            return "done"
        round_, digest, supporters = states[0]
        donors = donors_for(peers, round_, digest)
        self._announce_catch_up(round_, digest)
        t0 = time.monotonic()
        try:
            # timeout bounds each wait of the stream, not the download (a large state takes long)
            state = download_state(donors, fingerprint=self.fingerprint, numel=self.outer.theta_sync.numel(),
                                   timeout=self.config.sync.matchmaking.join_timeout * 4, requester=self.peer_id)
        except StateMovedError as e:  # a round ended meanwhile: read the records again, blame nobody
            if (round_, digest) not in moved:
                moved.add((round_, digest))
                log.info("round %d moved on during the download (%s); fetching the newer state", round_, e)
                return "moved"
            # The records still offered this state after its donors moved on: a peer that still
            # claims it now is not telling the truth (an honest record follows its state within a
            # moment, and _drop_unbacked reads the records again before it strikes anyone).
            log.warning("could not catch up with round %d: its donors moved on twice (%s)", round_, e)
            self._drop_unbacked(round_, digest)
            return "failed"
        except StateError as e:
            log.warning("could not catch up with round %d announced by %d peer(s): %s", round_, len(supporters), e)
            self._drop_unbacked(round_, digest)
            return "failed"
        self.last_download_s = time.monotonic() - t0
        mb = 4 * state.theta_sync.numel() * (1 if state.momentum_buf is None else 2) / 1e6
        self.adopt(state, f"downloaded {mb:.0f} MB in {self.last_download_s:.1f}s from "
                          f"{min(len(donors), MAX_DONORS)} of {len(donors)} peer(s)" + (" at startup" if startup else ""),
                   carry=not startup)
        del state  # its tensors were copied into θ_sync and the momentum
        self.schedule.after_next_step()  # the peers at this state are waiting for us in their next round
        return "done"

    def _drop_unbacked(self, round_: int, digest: str) -> None:
        """After a failed download of (round_, digest): strike and ignore the peers that still claim it."""
        still = [r.peer_id for r in self.others() if (r.round, r.digest) == (round_, digest)]
        if len(self._unbacked) > 10_000:  # bounded: forget old claims rather than grow for ever
            self._unbacked.clear()
        for pid in still:
            self._unbacked.add((pid, round_, digest))
            if self._averager is not None:
                self._averager.strike(pid, f"announced round {round_} that no download could back")

    def _announce_catch_up(self, round_: int, digest: str) -> None:
        """Tell the swarm (now, before a download that may take longer than a round) which state
        this peer is fetching, so the peers there wait for it; (0, "") when done or failed."""
        self.catch_up = (round_, digest)
        self._on_state(False)
        if self._announcer is not None:
            try:
                self._announcer.publish()
            except Exception as e:  # hivemind surfaces pipe/daemon errors with many types; the download goes on
                log.debug("could not announce the catch-up: %s", e)

    def hand_off(self, timeout: float = 20.0) -> None:
        """Before leaving, let peers that are behind fetch our newer state (bounded wait).

        Without this, the last trainers of a run could leave right after the final round,
        and an archivist, or a trainer that was just restarted and is one round behind,
        would have nobody left to download it from.
        """
        deadline = time.monotonic() + timeout
        announced = False
        while time.monotonic() < deadline:
            try:
                behind = [r for r in self.others() if r.fingerprint == self.fingerprint and r.round < self.round]
            except Exception as e:  # the DHT may already be failing while we leave; leave anyway
                log.warning("could not check for archivists while leaving: %s", e)
                return
            if not behind:
                return
            if not announced:
                log.info("leaving: waiting up to %.0fs for %d peer(s) behind to fetch round %d", timeout, len(behind), self.round)
                announced = True
            time.sleep(0.5)
        log.warning("leaving without handing round %d to every peer behind (timed out)", self.round)

    def metrics(self) -> dict[str, Any]:
        """The counters published in this peer's DHT record (read by the monitor and ledger)."""
        c = self.counters
        return dict(
            step=c.local_step, samples=c.total_samples, loss=self.last_loss,
            samples_per_s=float(self.samples_per_s), compute_s=float(self.clock.compute_s()),
            rounds_ok=c.rounds_ok, rounds_failed=c.rounds_failed, bytes_sent=c.bytes_sent, bytes_recv=c.bytes_recv,
            recent=tuple(self.outcomes),
        )
