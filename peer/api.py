"""`Peer`: bring any torch.nn.Module into a swarm.

    model = MyModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Peer(model, opt, PeerConfig(swarm=SwarmConfig(initial_peers=[ADDR]))) as peer:
        for x, y in loader:
            loss = loss_fn(model(x.to(peer.device)), y.to(peer.device))
            peer.step(loss, samples=len(x))   # backward, inner step, and a sync when due

`Peer` is a facade. It composes the network parts (the DHT, the averager, the state
server, the announcer, re-discovery) with the round lifecycle (peer/rounds.py: what a sync
round does, how a peer catches up, and the rule for work done while it was left out) and
owns their lifecycle: built and started in the constructor, stopped by `close()`.
"""
from __future__ import annotations

import logging
import math
import secrets
import socket
import time
import zlib
from collections import Counter
from typing import Any

import torch

from averaging.access import Allowlist, load_credential
from averaging.allreduce import RoundResult
from averaging.averager import Averager
from averaging.dht import SwarmDHT
from averaging.errors import AccessError, ModelMismatchError, StateError
from averaging.faults import Tamper
from averaging.flat import describe_schema, parameter_schema, schema_fingerprint, schema_numel
from averaging.identity import ensure_identity, load_identity, short_id
from averaging.memory import steady_malloc

from .config import PeerConfig
from .hf import describe_model
from .loop import PeerLoop
from .membership import MAX_MADDRS, Announcer, PeerRecord, Rediscovery, RunSettings, record_validator
from .rounds import HISTORY_ROUNDS, NO_PEER, RoundLoop  # noqa: F401  (re-exported: tests and tools use them)
from .state import CheckpointDir, SwarmState
from .stats import PeerStats, RoundCost
from .transfer import StateServer

log = logging.getLogger(__name__)

VERSION = "0.1.0"


class Peer:
    """A training node in a swarm. Construct to join; `close()` (or `with`) to leave.

    Failure behaviour of the constructor: raises NetworkError if the swarm cannot be
    reached, ModelMismatchError if live peers train a different architecture, AccessError
    if a private run refuses it, and StateError if a checkpoint to resume from is unusable.
    Nothing is left running then.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, config: PeerConfig | None = None,
                 *, flops_per_sample: float | None = None, tamper: Tamper | None = None) -> None:
        """`flops_per_sample`: training FLOPs of one sample, the unit of this peer's credit in the
        swarm's ledger (default 6 × parameters: one forward + backward per input position).
        `tamper`: fault injection for the hostile-peer tests only (averaging/faults.py)."""
        self.config = config or PeerConfig()
        self.model = model
        self.optimizer = optimizer
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        params = [p for _, p in named]
        self.schema = parameter_schema(named)
        self.fingerprint = schema_fingerprint(self.schema)
        self.device = params[0].device
        self.flops_per_sample = float(flops_per_sample if flops_per_sample is not None else 6 * sum(p.numel() for p in params))
        self.incarnation = secrets.token_hex(8)  # this process's run of the peer (the ledger tells restarts by it)
        self.peer_id = ""
        self._tamper = tamper
        self._closed = False
        # The parts, each with its own lifecycle; `close()` stops them in reverse order.
        self._dht: SwarmDHT | None = None
        self._averager: Averager | None = None
        self._server: StateServer | None = None
        self._announcer: Announcer | None = None
        self._rediscovery: Rediscovery | None = None
        self._loop: PeerLoop | None = None  # the event loop the background work and the rounds run on
        self._maddrs: tuple[str, ...] = ()
        self.announce_host = ""
        ckpt = None
        if self.config.checkpoint.dir:  # each checkpoint says which model it is, for `swarm-bootstrap export`
            ckpt = CheckpointDir(self.config.checkpoint.dir, self.config.checkpoint.keep_last, model=describe_model(model))
        self._rounds = RoundLoop(params, self.config, fingerprint=self.fingerprint, ckpt=ckpt, on_state=self._announce)
        try:
            self._start()
        except BaseException:
            self.close(save=False)
            raise

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        steady_malloc()  # RSS flat across rounds (averaging/memory.py)
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
        self._loop = PeerLoop(f"peer-{short_id(self.peer_id)}").start()
        self.announce_host = sw.announce_host or _detect_announce_host(sw.host, self._dht.visible_maddrs())
        self._averager = Averager(self._dht, self.config.sync.averager(
            listen_host=sw.host, announce_host=self.announce_host, client_mode=sw.client_mode, secret=secret),
            tamper=self._tamper)
        if self._averager.matchmaker.store is not None:  # client-mode peers cannot serve state
            clock = self._rounds.clock
            self._server = StateServer(self._averager.matchmaker.store, lambda: self._rounds.state, self._rounds.state_lock,
                                       rate_mb_s=self.config.sync.serve_rate_mb_s or None,
                                       training=lambda: not clock.waiting)
        self._rounds.attach(peer_id=self.peer_id, dht=self._dht, averager=self._averager, server=self._server,
                            loop=self._loop)
        self._check_compatible()
        if self.config.checkpoint.resume:
            self._rounds.resume_from_checkpoint()
        if self._server is not None:
            self._server.start(self._loop)
        self._maddrs = () if sw.client_mode else tuple(self._dht.visible_maddrs())[:MAX_MADDRS]
        self._announcer = Announcer(self._dht, period=sw.announce_period, ttl=sw.peer_ttl, metrics=self.metrics)
        self._announcer.update(self._record())
        self._first_announce(secret)
        self._announcer.start(self._loop)
        self._rounds.attach_announcer(self._announcer)
        self._rediscovery = Rediscovery(self._dht, initial=list(sw.initial_peers))
        self._rediscovery.start(self._loop)
        self._rounds.reconcile(startup=True)
        log.info("peer %s joined run %r: %s, round %d", short_id(self.peer_id), sw.run_id, describe_schema(self.schema), self.round)
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
        """Leave the swarm: cancel the background tasks, stop the event loop and the DHT, save a final checkpoint. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._rounds.close()  # applies a round still in flight (overlap mode)
        if save and self._server is not None and self._dht is not None:
            self._rounds.hand_off()
        for part in (self._rediscovery, self._announcer, self._server):
            if part is not None:
                part.close()
        if self._loop is not None:  # cancels what is left on it and waits for it (bounded)
            self._loop.close()
        if self._averager is not None:
            self._averager.close()
        # Drop the parts: the matchmaker's TCPStore listens until its last reference is gone,
        # and a Peer that lives on (history, summary) must not keep the port open.
        self._announcer = self._server = self._rediscovery = None
        self._rounds.attach_announcer(None)
        if self._dht is not None:
            self._dht.shutdown()
        if save and self._rounds.ckpt is not None and self.round > 0:
            self._rounds.save_checkpoint()

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
        if self._rounds.tick(samples, None if loss is None else loss.detach()):
            return self.sync()
        return None

    def sync(self) -> RoundResult | None:
        """Average with the peers at this round now (see RoundLoop.sync). Never raises for network faults."""
        return self._rounds.sync()

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
                have = 1 + sum(r.role == "trainer" and r.fingerprint == self.fingerprint for r in self._rounds.others())
            except Exception as e:  # hivemind surfaces pipe/daemon errors with many types; retry until the deadline
                log.debug("reading the run's peers failed: %s", e)
                have = 0
            if have >= n:
                return have
            if time.monotonic() >= deadline:
                raise TimeoutError(f"waited {timeout:g}s for {n} peers in run {self.config.swarm.run_id!r}, saw {have} "
                                   "(this one included); check the other peers' run id and --join address")
            time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))

    def report_loss(self, loss: float) -> None:
        """Tell the swarm the current training loss (shown by monitors at the next announce)."""
        self._rounds.last_loss = float(loss)
        self._announce(False)

    def report_val_loss(self, loss: float) -> None:
        """Tell the swarm the validation loss of the current round's parameters (θ_sync, before
        any local step): the dashboard plots it per round. Published at once (it changes rarely)."""
        if math.isfinite(loss):  # a diverged evaluation is not published (the record takes finite numbers)
            self._rounds.last_val = (self.round, float(loss))
            self._announce(True)

    # ------------------------------------------------------------------ what it knows
    def stats(self) -> PeerStats:
        """A frozen snapshot of this peer's counters (safe to keep and to read from any thread)."""
        return self._rounds.stats()

    def metrics(self) -> dict[str, Any]:
        """This peer's counters, as published in its DHT record (read by the monitor and ledger).

        Safe to call from another thread: it only reads counters. `compute_s` is the wall
        time since joining minus the time step() spent blocked in sync; it never goes down
        (the ledger credits its increments).
        """
        return {**self._rounds.metrics(), "flops_per_sample": self.flops_per_sample}

    @property
    def state(self) -> SwarmState:
        return self._rounds.state

    @property
    def round(self) -> int:
        return self._rounds.round

    @property
    def digest(self) -> str:
        return self._rounds.digest

    @property
    def history(self):  # -> deque[RoundResult]: the last HISTORY_ROUNDS sync attempts, tensor-free
        return self._rounds.history

    @property
    def round_costs(self) -> tuple[RoundCost, ...]:
        """The last completed rounds' time split (matchmaking, transfer, local), oldest first
        (blocking sync; overlap mode does not record it)."""
        return tuple(self._rounds.costs)

    @property
    def outer(self):  # -> OuterOptimizer: θ_sync, the outer momentum and the round buffer (host, fp32)
        return self._rounds.outer

    @property
    def schedule(self):  # -> SyncSchedule
        return self._rounds.schedule

    @property
    def last_loss(self) -> float | None:
        return self._rounds.last_loss

    @property
    def sync_wait_s(self) -> float:
        """Seconds step() spent blocked in sync so far (for compute utilization)."""
        return self._rounds.clock.wait_s

    @property
    def samples_per_s(self) -> float:
        """Training throughput over the last ~30 s (samples per wall-clock second)."""
        return self._rounds.samples_per_s

    @property
    def banned(self) -> frozenset[str]:
        """Peers this one refuses to average with for the rest of the run (repeatedly rejected contributions)."""
        return frozenset(self._averager.banned) if self._averager is not None else frozenset()

    @property
    def strikes(self) -> dict[str, int]:
        """Rounds in which this peer rejected another's contribution, per sender (see ban_after)."""
        return dict(self._averager.strikes) if self._averager is not None else {}

    # ------------------------------------------------------------------ the record others see
    def _announce(self, now: bool) -> None:
        """The round loop's state changed: refresh this peer's record (publish it now if `now`)."""
        if self._announcer is not None:
            self._announcer.update(self._record(), now=now)

    def _record(self) -> PeerRecord:
        r, c = self._rounds, self._rounds.counters
        return PeerRecord(
            round=r.round, fingerprint=self.fingerprint, schema=describe_schema(self.schema), digest=r.digest,
            host=self.announce_host, port=self._averager.matchmaker.port if self._averager else 0,
            step=c.local_step, samples=c.total_samples, loss=r.last_loss,
            device=self.device.type, version=VERSION, incarnation=self.incarnation, maddrs=self._maddrs,
            catch_up_round=r.catch_up[0], catch_up_digest=r.catch_up[1],
            val_round=r.last_val[0] if r.last_val else 0, val_loss=r.last_val[1] if r.last_val else None,
            settings=RunSettings.of(self.config.sync, params=schema_numel(self.schema)),
        )

    def _check_compatible(self) -> None:
        others = self._rounds.others()
        if others and not any(r.fingerprint == self.fingerprint for r in others):
            theirs = Counter((r.fingerprint, r.schema) for r in others).most_common(1)[0][0]
            raise ModelMismatchError(
                f"model does not match the swarm's: this peer has {describe_schema(self.schema)} "
                f"(fingerprint {self.fingerprint}), the swarm has {theirs[1]} (fingerprint {theirs[0]})"
            )


def _counter(name: str, doc: str) -> property:
    return property(lambda self: getattr(self._rounds.counters, name), doc=doc)


# Counters read as attributes (the blocking API as it always was); `stats()` gives them all at once.
for _name, _doc in (("local_step", "inner steps so far"), ("total_samples", "samples trained on since joining"),
                    ("samples_since_sync", "samples trained on since the last completed round (pending)"),
                    ("samples_averaged", "samples that went into a completed round's average"),
                    ("samples_discarded", "samples whose progress was too stale to carry (sync.max_stale_rounds)"),
                    ("rounds_ok", "rounds this peer completed an all-reduce in"), ("rounds_failed", "failed sync attempts"),
                    ("bytes_sent", "all-reduce bytes sent"), ("bytes_recv", "all-reduce bytes received"),
                    ("peers_seen", "other live peers in the last look at the DHT")):
    setattr(Peer, _name, _counter(_name, _doc))


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
