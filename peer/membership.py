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

import logging
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, Literal, Optional

import pydantic.v1 as pd  # hivemind's SchemaValidator is built on pydantic's v1 API
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator

from averaging.dht import SwarmDHT, dht_time

log = logging.getLogger(__name__)

PEERS_KEY = "peers"
RECENT_ROUNDS = 5  # round outcomes each record carries (the monitor keeps the longer history)

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
    recent: tuple[RoundOutcome, ...] = ()

    def to_record(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("peer_id")
        d["recent"] = [asdict(o) for o in self.recent]
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
        return cls(peer_id=peer_id, **d)


def announced_peers(dht: SwarmDHT) -> dict[str, PeerRecord]:
    """All unexpired, well-formed, signed peer records of the run, by peer id, those of
    peers that have left included (their last counters still count in the ledger)."""
    out = {}
    for pid, rec in dht.get_signed(PEERS_KEY).items():
        parsed = PeerRecord.parse(pid, rec)
        if parsed is not None:
            out[pid] = parsed
    return out


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


def donors_for(records: list[PeerRecord], round_: int, digest: str) -> list[PeerRecord]:
    """Peers that can serve the state (round_, digest): they announced it and they listen."""
    return [r for r in records if r.round == round_ and r.digest == digest and r.port > 0 and r.peer_id]


class Announcer:
    """Background thread that keeps this peer's signed record alive in the DHT.

    Owned by the Peer: `start()` after the first `update()`, `close()` on shutdown.
    `update()` sets the record's state fields (round, digest, ...) at consistent points of
    the training thread; `metrics()` (if given) is read at each publish for fresh counters.
    Failure behaviour: a failed DHT store is logged and retried next period; the thread
    never dies from it. If it cannot store for `ttl`, others stop seeing this peer.
    `close()` withdraws the record (role "left"): peers stop waiting for this one at once.
    A crashed peer cannot do that; its record expires after `ttl`.
    """

    def __init__(self, dht: SwarmDHT, *, period: float, ttl: float,
                 metrics: Callable[[], dict[str, Any]] | None = None) -> None:
        self.dht = dht
        self.period = period
        self.ttl = ttl
        self._metrics = metrics
        self._record: PeerRecord | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swarmtrain-announcer", daemon=True)

    def update(self, record: PeerRecord, *, now: bool = False) -> None:
        with self._lock:
            self._record = record
        if now:
            self._wake.set()

    def publish(self, **override: Any) -> None:
        """Store the current record now, in the caller's thread (`override`: fields to replace)."""
        with self._lock:
            rec = self._record
        if rec is not None:
            rec = replace(rec, **override)
            fresh = self._metrics() if self._metrics is not None else {}
            rec = replace(rec, **fresh, t=dht_time())
            if not self.dht.put_signed(PEERS_KEY, rec.to_record(), ttl=self.ttl):
                log.debug("no DHT node accepted this peer's record (will retry)")

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.publish()
            except Exception as e:  # hivemind surfaces pipe/daemon errors with many types; keep announcing
                log.warning("could not announce this peer in the DHT: %s", e)
            self._wake.wait(self.period)
            self._wake.clear()

    def close(self) -> None:
        """Stop announcing and withdraw the record. Failure: a DHT error while withdrawing is
        logged (the record then expires after `ttl`, as a crashed peer's would)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            self.publish(role="left")
        except Exception as e:  # hivemind surfaces pipe/daemon errors with many types; leaving goes on
            log.warning("could not withdraw this peer's record from the DHT (it expires by itself): %s", e)
