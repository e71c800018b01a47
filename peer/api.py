"""`Peer`: bring any torch.nn.Module into a swarm.

    model = MyModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Peer(model, opt, PeerConfig(swarm=SwarmConfig(initial_peers=[ADDR]))) as peer:
        for x, y in loader:
            loss = loss_fn(model(x.to(peer.device)), y.to(peer.device))
            peer.step(loss, samples=len(x))   # backward, inner step, and a sync when due

A sync round (DiLoCo): Δ = θ_sync − θ_local is averaged over the group, weighted by
samples; the outer Nesterov step gives the new θ_sync, identical on every member, and
the model's parameters are reset to it. A failed round changes nothing: the peer keeps
training and retries. θ_sync and the outer momentum live on the CPU in fp32.

Agreement: the DHT record of every peer carries the sha256 of its θ_sync. Peers only
meet peers with the same model fingerprint, round and θ_sync digest, so a stale or
diverged peer can never pollute a group. When a peer finds it is behind (or disagrees
with the majority at its round), it downloads the swarm's state and continues from there.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import socket
import time
import zlib
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from averaging.allreduce import RoundResult
from averaging.averager import Averager
from averaging.dht import SwarmDHT, dht_time
from averaging.access import Allowlist, load_credential
from averaging.errors import AccessError, ModelMismatchError, StateError
from averaging.identity import ensure_identity, load_identity
from averaging.faults import Tamper
from averaging.flat import describe_schema, flatten_params, parameter_schema, schema_fingerprint, tensor_digest, write_flat_
from averaging.outer import OuterOptimizer

from .config import PeerConfig
from .membership import (MAX_MADDRS, RECENT_ROUNDS, Announcer, PeerRecord, Rediscovery, RoundOutcome, better_states,
                         donors_for, live_peers, record_validator)
from .schedule import ComputeClock, SyncSchedule
from .state import CheckpointDir, SwarmState
from .transfer import StateServer, download_state

log = logging.getLogger(__name__)

VERSION = "0.1.0"
HISTORY_ROUNDS = 100  # sync attempts kept in Peer.history (tensor-free)
NO_PEER = "no other peer at this round"
ALONE_REMIND_S = 300.0  # a peer that stays alone says so again this often, not at every attempt


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


class Peer:
    """A training node in a swarm. Construct to join; `close()` (or `with`) to leave.

    Failure behaviour of the constructor: raises NetworkError if the swarm cannot be
    reached, ModelMismatchError if live peers train a different architecture, and
    StateError if a checkpoint to resume from is unusable. Nothing is left running then.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, config: PeerConfig | None = None,
                 *, flops_per_sample: float | None = None, tamper: Tamper | None = None) -> None:
        """`flops_per_sample`: training FLOPs of one sample, the unit of this peer's credit in the
        swarm's ledger (default 6 × parameters: one forward + backward per input position).
        `tamper`: fault injection for the hostile-peer tests only (averaging/faults.py)."""
        self.config = config or PeerConfig()
        self._tamper = tamper
        self.model = model
        self.optimizer = optimizer
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self._params = [p for _, p in named]
        self.schema = parameter_schema(named)
        self.fingerprint = schema_fingerprint(self.schema)
        self.device = self._params[0].device
        self.outer = OuterOptimizer(flatten_params(self._params).cpu(), self.config.sync.outer())
        self.schedule = SyncSchedule(self.config.sync.every_steps, self.config.sync.every_seconds)
        self.round = 0
        self.local_step = 0
        self.samples_since_sync = 0
        self.total_samples = 0
        # Where computed samples went: into a completed round's average, or thrown away (progress
        # too stale to carry onto the swarm's state, see _reconcile). The rest are pending.
        self.samples_averaged = 0
        self.samples_discarded = 0
        self.rounds_failed = 0
        self.rounds_ok = 0  # rounds this peer completed an all-reduce in
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.peers_seen = 0  # other live peers in the last look at the DHT
        self.flops_per_sample = float(flops_per_sample if flops_per_sample is not None else 6 * sum(p.numel() for p in self._params))
        self._clock = ComputeClock()
        self.incarnation = secrets.token_hex(8)  # this process's run of the peer (the ledger tells restarts by it)
        self._rate_window: deque[tuple[float, int]] = deque()  # (time, total samples), last ~30 s
        self._outcomes: deque[RoundOutcome] = deque(maxlen=RECENT_ROUNDS)  # published with the metrics
        self._alone = _AloneNotice()
        self._unbacked: set[tuple[str, int, str]] = set()  # (peer id, round, digest) claims no download backed
        # The last HISTORY_ROUNDS sync attempts, without their mean Δ: a long run must not keep
        # one parameter vector per round (100M parameters = 0.4 GB a round).
        self.history: deque[RoundResult] = deque(maxlen=HISTORY_ROUNDS)
        self._weight_in_flight = 0
        self._in_flight: tuple[Future, torch.Tensor] | None = None
        # Overlap mode: one worker thread owned by this Peer runs rounds in the background.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="swarmtrain-sync") if self.config.sync.overlap else None
        self.last_loss: float | None = None
        self._loss_t: torch.Tensor | None = None
        self._closed = False
        self._dht: SwarmDHT | None = None
        self._averager: Averager | None = None
        self._announcer: Announcer | None = None
        self._rediscovery: Rediscovery | None = None
        self._maddrs: tuple[str, ...] = ()
        self._catch_up: tuple[int, str] = (0, "")  # the state being downloaded, announced (see _announce_catch_up)
        self._server: StateServer | None = None
        self._ckpt = CheckpointDir(self.config.checkpoint.dir, self.config.checkpoint.keep_last) if self.config.checkpoint.dir else None
        self._set_state(SwarmState(0, self.fingerprint, self.outer.theta_sync, None))
        try:
            self._start()
        except BaseException:
            self.close(save=False)
            raise

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        sw = self.config.swarm
        identity = None
        if sw.allowlist_file:  # an allowlisted run signs with the persistent key the list names
            ensure_identity(sw.identity_path)
            identity = load_identity(sw.identity_path)
        secret = load_credential(secret_file=sw.secret_file, allowlist_file=sw.allowlist_file, identity=identity)
        if isinstance(secret, Allowlist) and identity is not None and not secret.allows(identity.peer_id):
            raise StateError(f"this peer ({identity.peer_id}) is not on the run's allowlist {sw.allowlist_file}; "
                             "send this id to the run's operator")
        self._dht = SwarmDHT.start(
            sw.run_id,
            initial_peers=sw.initial_peers,
            host_maddrs=[f"/ip4/{sw.host}/tcp/{sw.port}"],
            client_mode=sw.client_mode,
            identity_path=sw.identity_path or None,
            record_validators=[record_validator(sw.run_id)],
            secret=secret,
            startup_timeout=sw.startup_timeout,
        )
        self.peer_id = self._dht.peer_id
        self.announce_host = sw.announce_host or _detect_announce_host(sw.host, self._dht.visible_maddrs())
        self._averager = Averager(self._dht, self.config.sync.averager(
            listen_host=sw.host, announce_host=self.announce_host, client_mode=sw.client_mode, secret=secret),
            tamper=self._tamper)
        self._check_compatible()
        if self.config.checkpoint.resume:
            self._resume_from_checkpoint()
        if self._averager.matchmaker.store is not None:  # client-mode peers cannot serve state
            self._server = StateServer(self._averager.matchmaker.store, lambda: self._state)
            self._server.start()
        self._maddrs = () if sw.client_mode else tuple(self._dht.visible_maddrs())[:MAX_MADDRS]
        self._announcer = Announcer(self._dht, period=sw.announce_period, ttl=sw.peer_ttl, metrics=self.metrics)
        self._announcer.update(self._record())
        self._first_announce(secret)
        self._announcer.start()
        self._rediscovery = Rediscovery(self._dht, initial=list(sw.initial_peers))
        self._rediscovery.start()
        self._reconcile(startup=True)
        log.info("peer %s joined run %r: %s, round %d", self.peer_id[-8:], sw.run_id, describe_schema(self.schema), self.round)
        if not sw.client_mode:
            log.info("others can join through this peer: %s", " ".join(self._dht.visible_maddrs()))

    def _first_announce(self, credential: object, attempts: int = 3) -> None:
        """Publish this peer's record; raise AccessError if the run's nodes keep refusing it.

        A private run's nodes reject every record without the run's proof, so an outsider
        would otherwise "join", see nobody, and train alone forever. Bounded: `attempts`
        tries, `announce_period` apart. A node that joined through nobody stores its own
        record, so a first peer is never refused.
        """
        assert self._announcer is not None
        sw = self.config.swarm
        for attempt in range(attempts):
            if self._announcer.publish() or not sw.initial_peers:
                return
            if attempt + 1 < attempts:
                time.sleep(sw.announce_period)
        if isinstance(credential, Allowlist):
            why = (f"this peer's id {self.peer_id} is not on the run's allowlist, or the run uses another list "
                   f"(--swarm.allowlist-file {sw.allowlist_file}); send the id to the run's operator")
        elif credential is not None:
            why = f"the run does not accept this secret: check --swarm.secret-file {sw.secret_file}"
        else:
            why = ("it is a private run and this peer has no credential: pass the run's secret with "
                   "--swarm.secret-file, or its allowlist with --swarm.allowlist-file and your key with --swarm.identity-path")
        raise AccessError(f"the run {sw.run_id!r} refused this peer's records: {why} (or the run's nodes run "
                          f"another swarmtrain version than this one, {VERSION})")

    def close(self, save: bool = True) -> None:
        """Leave the swarm: stop background threads and the DHT, save a final checkpoint. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._in_flight is not None:  # finish the round in flight so its result is not lost
            try:
                self._collect_in_flight()
            except Exception as e:  # a crashed worker must not prevent a clean shutdown
                log.warning("the round in flight failed while leaving: %s", e)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if save and self._server is not None and self._dht is not None:
            self._hand_off()
        for part in (self._rediscovery, self._announcer, self._server, self._averager):
            if part is not None:
                part.close()
        # Drop the parts: the matchmaker's TCPStore listens until its last reference is gone,
        # and a Peer that lives on (history, summary) must not keep the port open.
        self._announcer = self._server = self._rediscovery = None
        if self._dht is not None:
            self._dht.shutdown()
        if save and self._ckpt is not None and self.round > 0:
            self._save_checkpoint()

    def _hand_off(self, timeout: float = 20.0) -> None:
        """Before leaving, let peers that are behind fetch our newer state (bounded wait).

        Without this, the last trainers of a run could leave right after the final round,
        and an archivist, or a trainer that was just restarted and is one round behind,
        would have nobody left to download it from.
        """
        deadline = time.monotonic() + timeout
        announced = False
        while time.monotonic() < deadline:
            try:
                behind = [r for r in self._others() if r.fingerprint == self.fingerprint and r.round < self.round]
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

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ training
    @property
    def seed(self) -> int:
        """A per-peer seed (from the peer id), so that each peer draws different data."""
        return zlib.crc32(self.peer_id.encode())

    def step(self, loss: torch.Tensor | None = None, *, samples: int = 1) -> RoundResult | None:
        """Count one inner step; sync with the swarm when the schedule says so.

        With `loss`: runs backward, the inner optimizer step and zero_grad. Without it the
        caller has already stepped (e.g. to clip gradients first).
        Returns the RoundResult if a sync was attempted, else None.
        """
        if self._closed:
            raise RuntimeError("peer is closed")
        if loss is not None:
            if self.optimizer is None:
                raise ValueError("step(loss) needs an optimizer; pass one to Peer or step it yourself")
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._loss_t = loss.detach()
        self.local_step += 1
        self.samples_since_sync += samples
        self.total_samples += samples
        now = time.monotonic()
        self._rate_window.append((now, self.total_samples))
        while len(self._rate_window) > 2 and now - self._rate_window[0][0] > 30.0:
            self._rate_window.popleft()
        self.schedule.tick()
        if self.schedule.due():
            return self.sync()
        return None

    @property
    def addrs(self) -> list[str]:
        """Multiaddrs other peers can join through (`SwarmConfig(initial_peers=peer.addrs)`),
        e.g. `/ip4/127.0.0.1/tcp/41234/p2p/Qm…`. Empty for a client-mode peer (it does not
        listen) and after `close()`."""
        if self._dht is None or self._closed:
            return []
        return self._dht.visible_maddrs()

    def wait_for_peers(self, n: int, timeout: float = 60.0, *, poll: float = 0.5) -> int:
        """Block until the run has at least `n` trainers with this model, this peer included
        (so every worker of a 3-worker experiment calls `wait_for_peers(3)`). Returns how many
        there are. Raises TimeoutError (one line: how many were seen, and the run id to
        check) after `timeout` seconds; DHT errors are retried until then."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if self._closed:
            raise RuntimeError("peer is closed")
        deadline = time.monotonic() + timeout
        while True:
            try:
                have = 1 + sum(r.role == "trainer" and r.fingerprint == self.fingerprint for r in self._others())
            except Exception as e:  # hivemind surfaces pipe/daemon errors with many types; retry until the deadline
                log.debug("reading the run's peers failed: %s", e)
                have = 0
            if have >= n:
                return have
            if time.monotonic() >= deadline:
                raise TimeoutError(f"waited {timeout:g}s for {n} peers in run {self.config.swarm.run_id!r}, saw {have} "
                                   "(this one included); check the other peers' run id and --join address")
            time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))

    @property
    def banned(self) -> frozenset[str]:
        """Peers this one refuses to average with for the rest of the run (repeatedly rejected contributions)."""
        return frozenset(self._averager.banned) if self._averager is not None else frozenset()

    @property
    def strikes(self) -> dict[str, int]:
        """Rounds in which this peer rejected another's contribution, per sender (see ban_after)."""
        return dict(self._averager.strikes) if self._averager is not None else {}

    @property
    def sync_wait_s(self) -> float:
        """Seconds step() spent blocked in sync so far (for compute utilization)."""
        return self._clock.wait_s

    @property
    def samples_per_s(self) -> float:
        """Training throughput over the last ~30 s (samples per wall-clock second)."""
        if len(self._rate_window) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._rate_window[0], self._rate_window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def metrics(self) -> dict[str, Any]:
        """This peer's counters, as published in its DHT record (read by the monitor and ledger).

        Safe to call from another thread: it only reads counters. `compute_s` is the wall
        time since joining minus the time step() spent blocked in sync; it never goes down
        (the ledger credits its increments).
        """
        recent = tuple(self._outcomes)
        return dict(
            step=self.local_step, samples=self.total_samples, loss=self.last_loss,
            samples_per_s=float(max(self.samples_per_s, 0.0)),
            compute_s=float(self._clock.compute_s()),
            rounds_ok=self.rounds_ok, rounds_failed=self.rounds_failed,
            bytes_sent=self.bytes_sent, bytes_recv=self.bytes_recv,
            flops_per_sample=self.flops_per_sample, recent=recent,
        )

    def report_loss(self, loss: float) -> None:
        """Tell the swarm the current training loss (shown by monitors at the next announce)."""
        self.last_loss = float(loss)
        if self._announcer is not None:
            self._announcer.update(self._record())

    def sync(self) -> RoundResult | None:
        """Average with the peers at this round now. Never raises for network faults.

        With `sync.overlap`, the all-reduce runs in a background thread while training
        goes on; its result is applied at the next sync point (one round late). Then the
        return value is the previous round's result (None the first time).
        """
        assert self._averager is not None
        self._clock.begin_wait()
        try:
            self._wait_for_joiners()
            if self.config.sync.overlap:
                return self._sync_overlapped()
            snap = flatten_params(self._params).cpu()
            self._weight_in_flight = self.samples_since_sync
            result = self._run_round(snap, float(max(self.samples_since_sync, 1)))
            self._finish_round(result, snap)
            self.schedule.done(result.ok)
            return result
        finally:
            self._clock.end_wait()

    def _wait_for_joiners(self) -> None:
        """A peer downloading our state is about to join this state's next round: arrive at that
        round's matchmaking only when its download is done (bounded by 0.8 × the matchmaking
        window, so the others, waiting for us there, are still waiting). Without this, a joiner
        whose download takes longer than a round period lands a round behind, downloads again,
        and never takes part."""
        if self._server is None:
            return
        deadline = time.monotonic() + 0.8 * self.config.sync.matchmaking_window
        said = False
        while time.monotonic() < deadline:
            busy, fetched = self._server.downloads(max_age=self.config.sync.matchmaking_window)
            if fetched:  # done downloading: wait until it announces our state, then it is counted in
                here = {r.peer_id for r in self._others() if (r.round, r.digest) == (self.round, self.digest)}
                for pid in fetched & here:
                    self._server.forget(pid)
                fetched -= here
            if not busy and not fetched:
                return
            if not said:
                log.info("a peer is downloading this peer's state to join: waiting up to %.0fs for it before round %d",
                         deadline - time.monotonic(), self.round + 1)
                said = True
            time.sleep(0.2)

    def _run_round(self, snap: torch.Tensor, weight: float) -> RoundResult:
        """Matchmaking + all-reduce of Δ = θ_sync − snap. Safe to run in a worker thread."""
        assert self._averager is not None
        delta = self.outer.pseudo_gradient(snap)
        if self._expected_group_size() < self.config.sync.min_group_size:
            return RoundResult(self.round, "failed", (self.peer_id,), (), 0.0, 0, NO_PEER)
        return self._averager.average(self.round, self._meeting_key(), delta, weight, self._expected_group_size)

    def _finish_round(self, result: RoundResult, snap: torch.Tensor) -> None:
        """Apply a round's result. `snap` is θ_local when the round started: local progress made
        since then (overlap mode) is kept on top of the new θ_sync."""
        if self._loss_t is not None:
            self.last_loss = float(self._loss_t)
        self.history.append(dataclasses.replace(result, mean_delta=None))
        self._outcomes.append(RoundOutcome(
            round=result.round + 1, status=result.status, duration_s=float(max(result.duration_s, 0.0)),
            bytes=int(result.bytes_sent), members=len(result.members), t=float(dht_time())))
        if not result.ok:
            self._weight_in_flight = 0  # those samples count towards the next attempt
            self.rounds_failed += 1
            if result.error != NO_PEER:
                log.info("round %d not completed (%s); continuing to train", self.round + 1, result.error)
            elif self._alone.due(time.monotonic()):
                if self.peers_seen == 0:
                    log.info("round %d not completed (%s): no other peer is in run %r now. Training alone and retrying "
                             "quietly; if other peers should be here, check the run id (--swarm.run-id)",
                             self.round + 1, NO_PEER, self.config.swarm.run_id)
                else:
                    log.info("round %d not completed (%s): %d other peer(s) in the run, none at this round with this "
                             "state. Training on and retrying quietly", self.round + 1, NO_PEER, self.peers_seen)
            self._reconcile()
            return
        self._alone.reset()
        assert result.mean_delta is not None
        theta = self.outer.apply(result.mean_delta)
        local = flatten_params(self._params).cpu()
        write_flat_(self._params, (theta + (local - snap)).to(self.device))
        self.round += 1
        self.rounds_ok += 1
        self.samples_averaged += min(self._weight_in_flight, self.samples_since_sync)
        self.samples_since_sync = max(0, self.samples_since_sync - self._weight_in_flight)
        self._weight_in_flight = 0
        self.bytes_sent += result.bytes_sent
        self.bytes_recv += result.bytes_sent  # all-reduce traffic is symmetric: each member receives what it sends
        self._set_state(SwarmState(self.round, self.fingerprint, theta, self.outer.momentum_buf, self.total_samples))
        if self._ckpt is not None and self.round % self.config.checkpoint.every_rounds == 0:
            self._save_checkpoint()
        log.info("round %d complete: %d peers, %.2fs", self.round, len(result.members), result.duration_s)

    def _sync_overlapped(self) -> RoundResult | None:
        result = self._collect_in_flight()
        assert self._pool is not None
        snap = flatten_params(self._params).cpu()
        self._weight_in_flight = max(self.samples_since_sync, 1)
        self._in_flight = (self._pool.submit(self._run_round, snap, float(self._weight_in_flight)), snap)
        self.schedule.done(True)  # the next sync point is a full period away
        return result

    def _collect_in_flight(self) -> RoundResult | None:
        """Wait for the round in flight (if any) and apply it."""
        if self._in_flight is None:
            return None
        future, snap = self._in_flight
        self._in_flight = None
        result = future.result()  # bounded: the averager's own timeouts
        self._finish_round(result, snap)
        return result

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> SwarmState:
        return self._state

    def _set_state(self, state: SwarmState) -> None:
        # SwarmState is immutable and θ_sync is replaced (never mutated) by the outer step,
        # so the state server can serialize this reference from its own thread.
        self._state = state
        self.digest = tensor_digest(state.theta_sync)
        if getattr(self, "_announcer", None) is not None:
            self._announcer.update(self._record(), now=True)

    def _adopt(self, state: SwarmState, source: str, carry: bool = False) -> None:
        """Continue from `state` (a download or a checkpoint).

        `carry`: keep this peer's local progress. The stale-contribution rule: progress made
        since our last θ_sync, p = θ_local − θ_sync_old, is put on top of the swarm's newer
        θ_sync (θ_local := θ_sync_new + p, as overlap mode does with a round in flight) when
        θ_sync_old is at most `sync.max_stale_rounds` rounds older; its samples stay pending,
        so the next round averages Δ = θ_sync − θ_local = −p with them as its weight, through
        the normal outer step (no separate delayed momentum). Older progress is dropped and
        its samples counted as discarded. Measured effect on loss: docs/benchmarks.md.
        """
        self._catch_up = (0, "")  # announced with the new state by _set_state below
        progress = None
        stale = state.round - self.round
        if carry and self.samples_since_sync > 0:
            if stale <= self.config.sync.max_stale_rounds:
                progress = flatten_params(self._params).cpu() - self.outer.theta_sync  # [P] fp32, on the host
            else:
                log.info("dropping %d samples of local progress: it is %d rounds older than the swarm's state "
                         "(--sync.max-stale-rounds %d)", self.samples_since_sync, stale, self.config.sync.max_stale_rounds)
        self.outer.load_state_dict({"theta_sync": state.theta_sync, "momentum_buf": state.momentum_buf})
        theta = self.outer.theta_sync if progress is None else self.outer.theta_sync + progress
        write_flat_(self._params, theta.to(self.device))
        self.round = state.round
        if progress is None:
            self.samples_discarded += self.samples_since_sync
            self.samples_since_sync = 0
        if self._averager is not None:
            self._averager.reset_compression()
        self._set_state(SwarmState(state.round, self.fingerprint, self.outer.theta_sync, self.outer.momentum_buf, self.total_samples))
        log.info("continuing from round %d (%s)%s", self.round, source,
                 f", carrying {self.samples_since_sync} samples of local progress" if progress is not None else "")

    def _save_checkpoint(self) -> Path:
        assert self._ckpt is not None
        return self._ckpt.save(self._state)

    def _resume_from_checkpoint(self) -> None:
        assert self._ckpt is not None
        path = self._ckpt.latest()
        if path is None:
            log.info("no checkpoint in %s; starting fresh", self._ckpt.path)
            return
        state = CheckpointDir.load(path, fingerprint=self.fingerprint, numel=self.outer.theta_sync.numel())
        self._adopt(state, f"checkpoint {path}")

    def _record(self) -> PeerRecord:
        return PeerRecord(
            round=self.round, fingerprint=self.fingerprint, schema=describe_schema(self.schema), digest=self.digest,
            host=self.announce_host, port=self._averager.matchmaker.port if self._averager else 0,
            step=self.local_step, samples=self.total_samples, loss=self.last_loss,
            device=self.device.type, version=VERSION, incarnation=self.incarnation, maddrs=self._maddrs,
            catch_up_round=self._catch_up[0], catch_up_digest=self._catch_up[1],
        )

    def _meeting_key(self) -> str:
        # Only peers with the same model, round and θ_sync can average meaningfully.
        # The codec is part of the key too: peers with different codecs cannot share a round.
        return f"{self.fingerprint}.{self.config.sync.compression}.{self.digest[:16]}"

    def _others(self) -> list[PeerRecord]:
        assert self._dht is not None
        others = [r for pid, r in live_peers(self._dht).items() if pid != self.peer_id]
        self.peers_seen = len(others)
        return others

    def _expected_group_size(self) -> int:
        banned = self._averager.banned if self._averager is not None else set()
        here = (self.round, self.digest)
        # Peers at this state, and peers downloading it to join this round (they announce it).
        same = [r for r in self._others() if r.role == "trainer" and r.fingerprint == self.fingerprint
                and here in ((r.round, r.digest), (r.catch_up_round, r.catch_up_digest)) and r.peer_id not in banned]
        return 1 + len(same)

    def _check_compatible(self) -> None:
        others = self._others()
        if others and not any(r.fingerprint == self.fingerprint for r in others):
            theirs = Counter((r.fingerprint, r.schema) for r in others).most_common(1)[0][0]
            raise ModelMismatchError(
                f"model does not match the swarm's: this peer has {describe_schema(self.schema)} "
                f"(fingerprint {self.fingerprint}), the swarm has {theirs[1]} (fingerprint {theirs[0]})"
            )

    def _reconcile(self, startup: bool = False, passes: int = 3) -> None:
        """If the swarm is ahead of us, or agrees on a different θ_sync at our round, download its state.

        The swarm's state is what most live peers announce (membership.better_states), not
        the highest round any one record claims. When a download fails, the records are read
        again: a supporter that has moved on was a stale view (nothing to hold against it);
        one that still announces the state no download could back is a liar, or broken: its
        claim is dropped for good and it gets a strike (repeat offenders are banned, as for
        rejected contributions). So one lying record cannot strand a joiner. Bounded: at
        most `passes` downloads per call; the next failed round calls again.
        """
        for _ in range(passes):
            peers = [r for r in self._others() if r.fingerprint == self.fingerprint
                     and (r.peer_id, r.round, r.digest) not in self._unbacked]
            if not peers or max(r.round for r in peers) < self.round:
                return
            states = better_states([*peers, self._record()], self.round, self.digest)
            if not states:
                return
            round_, digest, supporters = states[0]
            donors = donors_for(peers, round_, digest)
            self._announce_catch_up(round_, digest)
            try:
                state = download_state(donors, fingerprint=self.fingerprint, numel=self.outer.theta_sync.numel(),
                                       timeout=self.config.sync.join_timeout * 4, requester=self.peer_id)
            except StateError as e:
                self._announce_catch_up(0, "")
                log.warning("could not catch up with round %d announced by %d peer(s): %s", round_, len(supporters), e)
                self._drop_unbacked(round_, digest)
                continue
            self._adopt(state, f"downloaded from peer {donors[0].peer_id[-8:]}" + (" at startup" if startup else ""),
                        carry=not startup)
            self.schedule.after_next_step()  # the peers at this state are waiting for us in their next round
            return

    def _drop_unbacked(self, round_: int, digest: str) -> None:
        """After a failed download of (round_, digest): strike and ignore the peers that still claim it."""
        still = [r.peer_id for r in self._others() if (r.round, r.digest) == (round_, digest)]
        if len(self._unbacked) > 10_000:  # bounded: forget old claims rather than grow for ever
            self._unbacked.clear()
        for pid in still:
            self._unbacked.add((pid, round_, digest))
            if self._averager is not None:
                self._averager.strike(pid, f"announced round {round_} that no download could back")

    def _announce_catch_up(self, round_: int, digest: str) -> None:
        """Tell the swarm (now, before a download that may take longer than a round) which state
        this peer is fetching, so the peers there wait for it; (0, "") when done or failed."""
        self._catch_up = (round_, digest)
        if self._announcer is not None:
            self._announcer.update(self._record())
            try:
                self._announcer.publish()
            except Exception as e:  # hivemind surfaces pipe/daemon errors with many types; the download goes on
                log.debug("could not announce the catch-up: %s", e)


def _detect_announce_host(listen_host: str, maddrs: list[str]) -> str:
    """The address peers should use to reach us: the listen host if specific, else a visible IPv4."""
    if listen_host not in ("0.0.0.0", ""):
        return listen_host
    for m in maddrs:
        parts = m.split("/")
        if len(parts) > 2 and parts[1] == "ip4" and parts[2] not in ("0.0.0.0", "127.0.0.1"):
            return parts[2]
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
    return "127.0.0.1" if addr.startswith("127.") else addr  # Debian maps the hostname to 127.0.1.1
