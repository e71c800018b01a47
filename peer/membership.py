"""Who is in the swarm: each peer announces a short-lived record in the DHT.

Record (key <run>.peers, subkey = peer id), refreshed every `period` seconds and expiring
after `ttl`: a crashed peer disappears from matchmaking and from the monitor within `ttl`.
The record carries the round the peer has completed and the sha256 digest of its θ_sync
at that round, so anyone can check that peers agree, and a newcomer can check a download.
"""
from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from averaging.dht import SwarmDHT, dht_time

log = logging.getLogger(__name__)

PEERS_KEY = "peers"
_MAX_STR = 256


@dataclass(frozen=True, kw_only=True)
class PeerRecord:
    """A peer's public status. Parsed from untrusted DHT values by `parse`."""

    peer_id: str = field(default="", compare=False)
    round: int
    fingerprint: str
    schema: str  # human summary of the model, for error messages
    digest: str  # sha256 of θ_sync after `round`
    host: str  # where this peer's store serves state downloads
    port: int  # 0: cannot serve (client mode, behind NAT)
    step: int = 0
    samples: int = 0
    loss: float | None = None
    device: str = ""
    version: str = ""
    t: float = 0.0
    # "trainer" takes part in rounds; "archivist" (a bootstrap node keeping checkpoints) only
    # serves state, so it is a download donor but is never waited for in matchmaking.
    role: str = "trainer"

    def to_record(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("peer_id")
        return d

    @classmethod
    def parse(cls, peer_id: str, rec: Any) -> "PeerRecord | None":
        """Validate an untrusted record; None if anything is off."""
        if not isinstance(rec, dict):
            return None
        try:
            r = cls(
                peer_id=peer_id,
                round=rec["round"], fingerprint=rec["fingerprint"], schema=rec["schema"], digest=rec["digest"],
                host=rec["host"], port=rec["port"], step=rec.get("step", 0), samples=rec.get("samples", 0),
                loss=rec.get("loss"), device=rec.get("device", ""), version=rec.get("version", ""), t=rec.get("t", 0.0),
                role=rec.get("role", "trainer"),
            )
        except (KeyError, TypeError):
            return None
        ints_ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (r.round, r.step, r.samples))
        strs_ok = all(isinstance(v, str) and len(v) <= _MAX_STR for v in (r.fingerprint, r.schema, r.digest, r.host, r.device, r.version))
        port_ok = isinstance(r.port, int) and not isinstance(r.port, bool) and 0 <= r.port < 65536
        loss_ok = r.loss is None or _finite_number(r.loss)
        role_ok = r.role in ("trainer", "archivist")
        return r if ints_ok and strs_ok and port_ok and loss_ok and role_ok and _finite_number(r.t) else None


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def live_peers(dht: SwarmDHT) -> dict[str, PeerRecord]:
    """All unexpired, well-formed peer records of the run."""
    out = {}
    for pid, rec in dht.get_all(PEERS_KEY).items():
        parsed = PeerRecord.parse(pid, rec)
        if parsed is not None:
            out[pid] = parsed
    return out


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
    """Background thread that keeps this peer's record alive in the DHT.

    Owned by the Peer: `start()` after the first `update()`, `close()` on shutdown.
    Failure behaviour: a failed DHT store is logged and retried next period; the thread
    never dies from it. If it cannot store for `ttl`, others stop seeing this peer.
    """

    def __init__(self, dht: SwarmDHT, *, period: float, ttl: float) -> None:
        self.dht = dht
        self.period = period
        self.ttl = ttl
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

    def publish(self) -> None:
        """Store the current record now, in the caller's thread."""
        with self._lock:
            rec = self._record
        if rec is not None:
            rec = PeerRecord(**{**asdict(rec), "t": dht_time()})
            self.dht.put(PEERS_KEY, self.dht.peer_id, rec.to_record(), ttl=self.ttl)

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
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
