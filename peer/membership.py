"""Who is in the swarm: each peer announces a short-lived record in the DHT.

Record (key <run>_peers, subkey = the peer's public key), refreshed every `period` seconds
and expiring after `ttl`: a crashed peer disappears from matchmaking and from the monitor
within `ttl`. The record carries the round the peer has completed and the sha256 digest of
its θ_sync at that round, so anyone can check that peers agree, and a newcomer can check a
download. It also carries the peer's metrics (samples, rate, compute time, bytes, recent
round outcomes), which the bootstrap's monitor turns into the dashboard and the ledger.

Trust: each record is signed by its author's key (the key behind its peer id), and every
DHT node checks the signature and the schema below before storing or accepting it. So no
peer can write or overwrite another's record, and malformed records never reach readers.
What a peer says about *itself* (samples, loss) is still its own claim: see docs/security.md.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import Counter, deque
from pathlib import Path
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, Literal, Optional

import pydantic.v1 as pd  # hivemind's SchemaValidator is built on pydantic's v1 API
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator

from averaging.dht import SwarmDHT, dht_time

from .fsutil import write_text_atomic
from .loop import PeerLoop, wait_event

log = logging.getLogger(__name__)

PEERS_KEY = "peers"
RECENT_ROUNDS = 5  # round outcomes each record carries (the monitor keeps the longer history)
MAX_MADDRS = 8  # multiaddrs a record carries (where to re-dial this peer's DHT node)

# ---------------------------------------------------------------- the record's schema
# Strict types throughout: SchemaValidator rejects a record that needs any conversion
# (3 for 3.0, True for 1), and every count is >= 0, every float finite.
_Count = pd.conint(ge=0, strict=True)
_Seconds = pd.confloat(ge=0, strict=True, allow_inf_nan=False)
_Finite = pd.confloat(strict=True, allow_inf_nan=False)
_Str = pd.constr(max_length=256, strict=True)


class _RoundSchema(pd.BaseModel):
    round: _Count
    status: Literal["complete", "failed"]
    duration_s: _Seconds
    bytes: _Count
    members: _Count
    t: _Finite


class _SettingsSchema(pd.BaseModel):
    params: _Count
    every_steps: _Count
    every_seconds: _Seconds
    outer_lr: _Finite
    outer_momentum: _Finite
    nesterov: pd.StrictBool
    compression: _Str
    aggregator: _Str
    fragments: _Count
    overlap: pd.StrictBool
    min_group_size: _Count
    max_group_size: _Count

    class Config:
        extra = pd.Extra.forbid


class _PeerSchema(pd.BaseModel):
    round: _Count
    fingerprint: _Str
    schema_: _Str = pd.Field(alias="schema")
    digest: _Str
    host: _Str
    port: pd.conint(ge=0, lt=65536, strict=True)
    step: _Count
    samples: _Count
    loss: Optional[_Finite]
    device: _Str
    version: _Str
    t: _Finite
    role: Literal["trainer", "archivist", "left"]
    samples_per_s: _Seconds
    compute_s: _Seconds
    rounds_ok: _Count
    rounds_failed: _Count
    bytes_sent: _Count
    bytes_recv: _Count
    flops_per_sample: _Seconds
    incarnation: _Str
    maddrs: pd.conlist(_Str, max_items=MAX_MADDRS)
    catch_up_round: _Count
    catch_up_digest: _Str
    val_loss: Optional[_Finite]
    val_round: _Count
    settings: _SettingsSchema
    recent: pd.conlist(_RoundSchema, max_items=RECENT_ROUNDS)

    class Config:
        extra = pd.Extra.forbid
        allow_population_by_field_name = True


class _RunSchema(pd.BaseModel):
    # <run>_peers: {b"[owner:ssh-rsa ...]": record}. The subkey must hold a public key, so
    # every record is signed by its author (RSASignatureValidator) and nobody else can write it.
    peers: Dict[BytesWithPublicKey, _PeerSchema]


def record_validator(run_id: str) -> SchemaValidator:
    """The DHT validator for this run's records; every node of the run installs it."""
    return SchemaValidator(_RunSchema, allow_extra_keys=True, prefix=run_id)


@dataclass(frozen=True, kw_only=True)
class RoundOutcome:
    """One sync attempt as its peer saw it. `round` is the round it would produce."""

    round: int
    status: str  # "complete" | "failed"
    duration_s: float
    bytes: int
    members: int
    t: float


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """What a run organizer wants to see of a peer's setup (the dashboard's run configuration).
    All zero: not known (an archivist, or a record built only to compare states)."""

    params: int = 0
    every_steps: int = 0  # H
    every_seconds: float = 0.0  # T
    outer_lr: float = 0.0
    outer_momentum: float = 0.0
    nesterov: bool = False
    compression: str = ""
    aggregator: str = ""
    fragments: int = 0
    overlap: bool = False
    min_group_size: int = 0
    max_group_size: int = 0

    @classmethod
    def of(cls, sync: Any, params: int) -> "RunSettings":
        """From a peer's SyncConfig (its outer values resolved) and its parameter count."""
        return cls(params=int(params), every_steps=int(sync.every_steps), every_seconds=float(sync.every_seconds),
                   outer_lr=float(sync.outer.lr), outer_momentum=float(sync.outer.momentum),
                   nesterov=bool(sync.outer.nesterov), compression=str(sync.codec.name),
                   aggregator=str(sync.aggregator.name), fragments=int(sync.fragments), overlap=bool(sync.overlap),
                   min_group_size=int(sync.matchmaking.min_group_size),
                   max_group_size=int(sync.matchmaking.max_group_size))


@dataclass(frozen=True, kw_only=True)
class PeerRecord:
    """A peer's public status and metrics. Parsed from untrusted DHT values by `parse`."""

    peer_id: str = field(default="", compare=False)
    round: int
    fingerprint: str
    schema: str  # human summary of the model, for error messages
    digest: str  # sha256 of θ_sync after `round`
    host: str  # where this peer's store serves state downloads
    port: int  # 0: cannot serve (client mode, behind NAT)
    step: int = 0
    samples: int = 0  # samples this peer has trained on since it started
    loss: float | None = None
    device: str = ""
    version: str = ""
    t: float = 0.0
    # "trainer" takes part in rounds; "archivist" (a bootstrap node keeping checkpoints) only
    # serves state, so it is a download donor but is never waited for in matchmaking.
    # "left": the peer's last word when it leaves cleanly. A DHT record cannot be deleted, but a
    # newer one replaces it, so peers stop waiting for it at once instead of after `ttl`.
    role: str = "trainer"
    samples_per_s: float = 0.0
    compute_s: float = 0.0  # wall seconds spent training, not waiting for the swarm
    rounds_ok: int = 0  # rounds this peer completed an all-reduce in
    rounds_failed: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    flops_per_sample: float = 0.0  # training FLOPs of one sample (forward + backward)
    # A random token drawn when the peer process (the Peer object) starts: the counters above
    # run from zero within one incarnation, so a new token, not a smaller number, is a restart.
    incarnation: str = ""
    # The peer's DHT multiaddrs (/ip4/…/tcp/…/p2p/<id>; none for a client): where anyone who
    # saw this record can re-dial it after a link cut or a restart (Rediscovery).
    maddrs: tuple[str, ...] = ()
    # Set while this peer downloads the state (catch_up_round, catch_up_digest): peers at that
    # state count it in for their next round and wait for it (up to their matchmaking window),
    # so a joiner whose download is longer than a round period still gets in, instead of
    # landing one round behind at every download. 0 / "" otherwise.
    catch_up_round: int = 0
    catch_up_digest: str = ""
    # The validation loss of θ_sync after round `val_round` (peers at one round evaluate the same
    # parameters on the same held-out data), when the peer's trainer reports one.
    val_loss: float | None = None
    val_round: int = 0
    settings: RunSettings = RunSettings()
    recent: tuple[RoundOutcome, ...] = ()

    def to_record(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("peer_id")
        d["recent"] = [asdict(o) for o in self.recent]
        d["maddrs"] = list(self.maddrs)
        return d

    @classmethod
    def parse(cls, peer_id: str, rec: Any) -> "PeerRecord | None":
        """Validate an untrusted record against the same schema the DHT nodes use; None if off."""
        if not isinstance(rec, dict) or not all(isinstance(k, str) for k in rec):
            return None
        try:
            parsed = _PeerSchema.parse_obj(rec)
        except (pd.ValidationError, TypeError):
            return None
        d = parsed.dict(by_alias=True)
        if d != rec:  # pydantic converted something (e.g. 3 -> 3.0): not a valid record
            return None
        d["recent"] = tuple(RoundOutcome(**o) for o in d["recent"])
        d["settings"] = RunSettings(**d["settings"])
        d["maddrs"] = tuple(d["maddrs"])
        return cls(peer_id=peer_id, **d)


def _parse_records(signed: dict[str, Any]) -> dict[str, PeerRecord]:
    out = {}
    for pid, rec in signed.items():
        parsed = PeerRecord.parse(pid, rec)
        if parsed is not None:
            out[pid] = parsed
    return out


def announced_peers(dht: SwarmDHT) -> dict[str, PeerRecord]:
    """All unexpired, well-formed, signed peer records of the run, by peer id, those of
    peers that have left included (their last counters still count in the ledger)."""
    return _parse_records(dht.get_signed(PEERS_KEY))


async def aannounced_peers(dht: SwarmDHT) -> dict[str, PeerRecord]:
    """`announced_peers` for a coroutine."""
    return _parse_records(await dht.aget_signed(PEERS_KEY))


def live_peers(dht: SwarmDHT) -> dict[str, PeerRecord]:
    """The run's peers that are still in it: announced and not left."""
    return {pid: r for pid, r in announced_peers(dht).items() if r.role != "left"}


def consensus(records: list[PeerRecord]) -> tuple[int, str] | None:
    """The swarm's current state: (newest round, majority θ_sync digest at that round).

    Ties go to the smallest digest, so every peer that sees the same records picks the
    same state. None if there are no records.
    """
    if not records:
        return None
    top = max(r.round for r in records)
    votes = Counter(r.digest for r in records if r.round == top)
    return top, min(votes, key=lambda d: (-votes[d], d))


def better_states(records: list[PeerRecord], round_: int, digest: str) -> list[tuple[int, str, tuple[str, ...]]]:
    """States a node at (round_, digest) should move to, best first: (round, digest, supporters).

    The swarm's state is what most peers say, not the highest round anyone claims: one
    peer's record can claim round 1023 with a digest nobody can serve, and a joiner that
    believed it would be stranded. So states are ranked by how many peers announce them,
    then by round (newer first), then by digest (smallest first, so every node that sees the
    same records ranks them the same way). Only states ahead of `round_`, or at `round_`
    and ranked above `digest`, are returned; the caller tries them in order and drops a
    claim no download can back. `records` may include the caller's own.
    """
    support: dict[tuple[int, str], list[str]] = {}
    for r in records:
        support.setdefault((r.round, r.digest), []).append(r.peer_id)
    rank = sorted(support, key=lambda k: (-len(support[k]), -k[0], k[1]))
    mine = rank.index((round_, digest)) if (round_, digest) in rank else len(rank)
    return [(rd, dg, tuple(support[(rd, dg)])) for i, (rd, dg) in enumerate(rank)
            if rd > round_ or (rd == round_ and dg != digest and i < mine)]


def donors_for(records: list[PeerRecord], round_: int, digest: str) -> list[PeerRecord]:
    """Peers that can serve the state (round_, digest): they announced it and they listen."""
    return [r for r in records if r.round == round_ and r.digest == digest and r.port > 0 and r.peer_id]


class Announcer:
    """Keeps this peer's signed record alive in the DHT: a task on the peer's event loop.

    Owned by the Peer: `start(loop)` after the first `update()`, `close()` on shutdown.
    `update()` sets the record's state fields (round, digest, ...) at consistent points of
    the training thread; `metrics()` (if given) is read at each publish for fresh counters.
    Failure behaviour: a failed DHT store is logged and retried next period; the task
    never dies from it. If it cannot store for `ttl`, others stop seeing this peer.
    `close()` cancels the task and withdraws the record (role "left"): peers stop waiting
    for this one at once. A crashed peer cannot do that; its record expires after `ttl`.
    """

    def __init__(self, dht: SwarmDHT, *, period: float, ttl: float,
                 metrics: Callable[[], dict[str, Any]] | None = None) -> None:
        self.dht = dht
        self.period = period
        self.ttl = ttl
        self._metrics = metrics
        self._record: PeerRecord | None = None
        self._lock = threading.Lock()
        self._loop: PeerLoop | None = None
        self._wake: asyncio.Event | None = None  # created on the loop, set from any thread
        self._task: concurrent.futures.Future | None = None

    def update(self, record: PeerRecord, *, now: bool = False) -> None:
        with self._lock:
            self._record = record
        if now and self._task is not None and self._loop is not None and self._wake is not None:
            # RuntimeError: the loop has just closed (the owner is leaving), so there is nothing to wake.
            with contextlib.suppress(RuntimeError):
                self._loop.loop.call_soon_threadsafe(self._wake.set)

    def _prepared(self, override: dict[str, Any]) -> PeerRecord | None:
        with self._lock:
            rec = self._record
        if rec is None:
            return None
        fresh = self._metrics() if self._metrics is not None else {}
        return replace(rec, **override, **fresh, t=dht_time())

    def publish(self, **override: Any) -> bool:
        """Store the current record now, in the caller's thread (`override`: fields to replace).
        Returns whether any DHT node accepted it (a private run's nodes refuse an outsider's)."""
        rec = self._prepared(override)
        if rec is None:
            return False
        if not self.dht.put_signed(PEERS_KEY, rec.to_record(), ttl=self.ttl):
            log.debug("no DHT node accepted this peer's record (will retry)")
            return False
        return True

    def start(self, loop: PeerLoop) -> None:
        self._loop = loop
        self._task = loop.spawn(self.run(), "announcer")

    async def run(self) -> None:
        """Publish every `period` seconds, or at once after `update(now=True)`. Runs until cancelled."""
        self._wake = asyncio.Event()
        while True:
            try:
                rec = self._prepared({})
                if rec is not None and not await self.dht.aput_signed(PEERS_KEY, rec.to_record(), ttl=self.ttl):
                    log.debug("no DHT node accepted this peer's record (will retry)")
            except Exception as e:  # hivemind surfaces pipe/daemon errors with many types; keep announcing
                log.warning("could not announce this peer in the DHT: %s", e)
            await wait_event(self._wake, self.period)
            self._wake.clear()

    def close(self) -> None:
        """Stop announcing and withdraw the record. Failure: a DHT error while withdrawing is
        logged (the record then expires after `ttl`, as a crashed peer's would)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        # A publish still in flight cannot overwrite this one: the withdrawal is stamped later.
        try:
            self.publish(role="left")
        except Exception as e:  # hivemind surfaces pipe/daemon errors with many types; leaving goes on
            log.warning("could not withdraw this peer's record from the DHT (it expires by itself): %s", e)


class Rediscovery:
    """Keeps this node in the swarm after link cuts and restarts: a task on the node's event loop.

    It remembers every address it learns (the initial peers, and the `maddrs` of every
    record it reads; optionally saved to `contacts_file` so a restarted bootstrap node
    knows whom to call back) and re-dials them through `SwarmDHT.redial`:

      - the addresses of peers it saw recently but does not see now, whenever it sees fewer
        live peers than it did within `window` seconds, or none;
      - the initial peers every `initial_every` seconds, whatever it sees (a bootstrap node
        restarted with the same address is then found again).

    hivemind's DHT has no such loop: a node that failed to reach another drops it from its
    routing table and never looks for it again. Bound: after a link or a node comes back,
    the next check (every `period` seconds) re-dials it. Failure behaviour: DHT errors are
    logged at DEBUG and retried at the next check; the task never dies of them.
    Owned by a Peer or a BootstrapNode: `start(loop)`, `close()`.
    """

    MAX_CONTACTS = 256

    def __init__(self, dht: SwarmDHT, *, initial: list[str], period: float = 5.0, window: float = 120.0,
                 initial_every: float = 30.0, contacts_file: str | None = None) -> None:
        self.dht = dht
        self.period, self.window, self.initial_every = period, window, initial_every
        self._initial = list(initial)
        self._contacts: dict[str, tuple[float, tuple[str, ...]]] = {}  # peer id -> (last seen, maddrs)
        self._counts: deque[tuple[float, int]] = deque()  # (time, live peers) over the last `window`
        self._file = Path(contacts_file) if contacts_file else None
        self._saved: set[str] = set()
        self._last_initial = 0.0
        self.redials = 0  # addresses dialed so far (for logs and tests)
        self._task: concurrent.futures.Future | None = None
        for addr in self._load():
            self._initial.append(addr)

    def start(self, loop: PeerLoop) -> None:
        self._task = loop.spawn(self.run(), "rediscovery")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def run(self) -> None:
        """A check every `period` seconds, until cancelled."""
        while True:
            await asyncio.sleep(self.period)
            try:
                await self.acheck()
            except Exception as e:  # hivemind surfaces pipe/daemon errors with many types; check again later
                log.debug("rediscovery check failed: %s", e)

    def check(self, now: float | None = None) -> int:
        """One look at the run's records, and the re-dials it calls for (blocking). Returns how many answered."""
        targets = self._plan(announced_peers(self.dht), now)
        return self._dialed(targets, self.dht.redial(targets)) if targets else 0

    async def acheck(self, now: float | None = None) -> int:
        """`check` for a coroutine."""
        targets = self._plan(await aannounced_peers(self.dht), now)
        return self._dialed(targets, await self.dht.aredial(targets)) if targets else 0

    def _dialed(self, targets: list[str], answered: int) -> int:
        self.redials += len(targets)
        log.debug("re-dialed %d address(es), %d answered", len(targets), answered)
        return answered

    def _plan(self, records: dict[str, PeerRecord], now: float | None) -> list[str]:
        """Remember what `records` teach; the addresses to re-dial now (deduplicated, in order)."""
        now = time.monotonic() if now is None else now
        me = self.dht.peer_id
        live = {pid for pid, r in records.items() if r.role != "left" and pid != me}
        for pid, r in records.items():
            if pid == me:
                continue
            if r.role == "left" or not r.maddrs:
                self._contacts.pop(pid, None)  # gone for good, or not reachable (client mode)
            else:
                self._contacts[pid] = (now, r.maddrs)
        if len(self._contacts) > self.MAX_CONTACTS:
            for pid, _ in sorted(self._contacts.items(), key=lambda kv: kv[1][0])[: len(self._contacts) - self.MAX_CONTACTS]:
                del self._contacts[pid]
        self._counts.append((now, len(live)))
        while self._counts and now - self._counts[0][0] > self.window:
            self._counts.popleft()
        targets: list[str] = []
        if not live or len(live) < max(n for _, n in self._counts):
            targets += [a for pid, (seen, maddrs) in self._contacts.items()
                        if pid not in live and now - seen <= self.window for a in maddrs]
        if not live or now - self._last_initial >= self.initial_every:
            self._last_initial = now
            targets += self._initial
        self._save()
        return list(dict.fromkeys(targets))

    def _load(self) -> list[str]:
        if self._file is None or not self._file.exists():
            return []
        try:
            addrs = [a.strip() for a in self._file.read_text().splitlines() if a.strip().startswith("/")]
        except OSError as e:
            log.warning("could not read the saved contacts %s: %s", self._file, e)
            return []
        return addrs[: self.MAX_CONTACTS]

    def _save(self) -> None:
        """Keep the contacts' addresses on disk (atomic), so that a restarted node can call them back."""
        if self._file is None:
            return
        addrs = {a for _, maddrs in self._contacts.values() for a in maddrs}
        if not addrs or addrs == self._saved:
            return
        try:
            write_text_atomic(self._file, "\n".join(sorted(addrs)) + "\n")
            self._saved = addrs
        except OSError as e:
            log.warning("could not save the contacts to %s: %s", self._file, e)
