"""Watches a run through the DHT and keeps what the dashboard shows.

`RunMonitor.poll()` (called by the bootstrap's serve loop) reads the peers' signed records
once, then updates: the swarm loss history, the merged round outcomes, and the contribution
ledger (saved to disk). The dashboard's threads read snapshots through `status()`, `peers()`,
`ledger()` and `ledger_csv()`; one lock makes poll and reads consistent.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from typing import Any

from averaging.dht import SwarmDHT
from peer.membership import PeerRecord, announced_peers
from peer.status import RunStatus, peer_row, round_outcomes, trainers_of

from .ledger import Ledger

log = logging.getLogger("swarmtrain.monitor")

MAX_LOSS_POINTS = 500  # older points are thinned (every other one dropped), so the whole run stays visible
MAX_ROUNDS = 50
MAX_EVENTS = 100  # peers joining and leaving, newest kept
# Rounds have stopped completing when none has for this long, or for 3 typical gaps between
# complete rounds if that is longer, while trainers are live: a swarm split by a link, or a
# lone peer failing round after round, is no longer shown as healthy.
STALL_MIN_S = 120.0


def _thin(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep at most MAX_LOSS_POINTS: past that, every other point of the older half is dropped."""
    if len(points) <= MAX_LOSS_POINTS:
        return points
    return points[: -MAX_LOSS_POINTS // 2 : 2] + points[-MAX_LOSS_POINTS // 2 :]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("swarmtrain")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


class RunMonitor:
    def __init__(self, dht: SwarmDHT | None, run_id: str, ledger: Ledger) -> None:
        self.dht = dht
        self.run_id = run_id
        self._ledger = ledger
        self._lock = threading.Lock()
        self._status = RunStatus(())
        self._all: dict[str, PeerRecord] = {}
        self._loss: list[dict[str, Any]] = []  # {"t", "round", "loss", "samples", "throughput", "peers"} per poll
        self._val: list[dict[str, Any]] = []  # {"t", "round", "val_loss", "samples"} per evaluated round
        self._outcomes: dict[int, dict[str, Any]] = {}  # round -> peer id -> RoundOutcome
        self._rounds: dict[int, dict[str, Any]] = {}
        self._settled = 0  # rounds below this one are final and counted in _rounds_total
        self._rounds_total = {"complete": 0, "failed": 0, "partial": 0}
        self._updated = 0.0
        self._started = time.time()
        self._last_complete: tuple[int, float] | None = None  # (round, when this monitor first saw it complete)
        self._gaps: list[float] = []  # seconds between the last few newly complete rounds
        self._version = _version()
        self._events: list[dict[str, Any]] = []  # {"t", "event": "joined" | "left", "peer_id", "role", "device"}

    def poll(self) -> RunStatus:
        """Read the run's records once and fold them in. Failure: DHT errors propagate (the caller logs them)."""
        assert self.dht is not None
        return self.observe(announced_peers(self.dht), now=time.time())

    def observe(self, records: dict[str, PeerRecord], *, now: float) -> RunStatus:
        """Fold one set of records in (the network-free half of poll, used by tests).

        Records of peers that left count in the ledger (their final counters) and nowhere else."""
        live = {pid: r for pid, r in records.items() if r.role != "left"}
        status = trainers_of(live)
        with self._lock:
            if self._updated:  # the first poll finds the swarm as it is: nobody "joined" then
                for pid in live.keys() - self._all.keys():
                    self._event(now, "joined", live[pid])
                for pid in self._all.keys() - live.keys():
                    self._event(now, "left", self._all[pid])
            self._status, self._all, self._updated = status, live, now
            self._ledger.observe([r for r in records.values() if r.role in ("trainer", "left")],
                                 flops_per_sample=status.flops_per_sample, now=now)
            total = sum(e.samples for e in self._ledger.entries.values())
            if status.mean_loss is not None and (not self._loss or self._loss[-1]["samples"] != total):
                self._loss = _thin(self._loss + [{"t": now, "round": status.round, "loss": status.mean_loss,
                                                  "samples": total, "throughput": status.throughput,
                                                  "peers": len(status.peers)}])
            val = status.val_loss
            if val is not None and (not self._val or val[0] > self._val[-1]["round"]):
                self._val = _thin(self._val + [{"t": now, "round": val[0], "val_loss": val[1], "samples": total}])
            elif val is not None and val[0] == self._val[-1]["round"]:  # more peers reported the same round
                self._val[-1]["val_loss"] = val[1]
            self._rounds = round_outcomes(list(status.peers), self._outcomes)
            done = max((r for r, o in self._rounds.items() if o["status"] == "complete"), default=None)
            if done is not None and (self._last_complete is None or done > self._last_complete[0]):
                if self._last_complete is not None:
                    self._gaps = (self._gaps + [now - self._last_complete[1]])[-8:]
                self._last_complete = (done, now)
            # A round is settled once a newer one has been reported: count it then, exactly once.
            newest = max(self._rounds, default=0)
            for r in sorted(self._rounds):
                if self._settled <= r < newest:
                    self._rounds_total[self._rounds[r]["status"]] += 1
            self._settled = max(self._settled, newest)
            for old in sorted(self._outcomes)[:-MAX_ROUNDS]:
                del self._outcomes[old]
        return status

    def save(self) -> None:
        """Persist the ledger. Failure: OSError propagates; the previous file stays intact."""
        with self._lock:
            self._ledger.save()

    # ------------------------------------------------------------------ dashboard reads
    def status(self) -> dict[str, Any]:
        with self._lock:
            s = self._status
            return {
                "run_id": self.run_id, "round": s.round, "agree": s.agree, "peers_live": len(s.peers),
                "throughput_samples_per_s": s.throughput,
                "total_samples": sum(e.samples for e in self._ledger.entries.values()),
                "mean_loss": s.mean_loss, "updated": self._updated, "loss_history": list(self._loss),
                "val_history": [dict(v) for v in self._val], **self._settings(s),
                "rounds": [self._rounds[r] for r in sorted(self._rounds)[-MAX_ROUNDS:]],
                "rounds_total": dict(self._rounds_total),
                **self._progress(time.time()), "version": self._version, "events": list(self._events),
            }

    @staticmethod
    def _settings(s: RunStatus) -> dict[str, Any]:
        """The run's configuration as most trainers report it (model size, H/T, outer step, codec)."""
        common, others = s.settings
        return {"run_config": asdict(common) if common else None, "config_others": others}

    def _event(self, now: float, what: str, r: PeerRecord) -> None:
        self._events = (self._events + [{"t": now, "event": what, "peer_id": r.peer_id, "role": r.role,
                                         "device": r.device}])[-MAX_EVENTS:]

    def _progress(self, now: float) -> dict[str, Any]:
        """When a round last completed, and whether rounds have stopped completing (caller holds the lock)."""
        last = self._last_complete
        gaps = sorted(self._gaps)
        limit = max(STALL_MIN_S, 3 * gaps[len(gaps) // 2]) if gaps else STALL_MIN_S
        since = now - (last[1] if last else self._started)
        trainers = len(self._status.peers)
        failed = sum(1 for r, o in self._rounds.items() if o["status"] != "complete" and (last is None or r > last[0]))
        return {"last_complete_round": last[0] if last else None, "last_complete_age_s": since if last else None,
                "stalled": bool(trainers and since > limit), "stall_after_s": limit, "failed_since_complete": failed}

    def peers(self) -> list[dict[str, Any]]:
        """Every live node (trainers and archivists), with its credit from the ledger."""
        with self._lock:
            now = time.time()
            credit = {e.peer_id: e.credit for e in self._ledger.entries.values()}
            return [peer_row(r, now, credit.get(pid, 0.0)) for pid, r in sorted(self._all.items())]

    def ledger(self) -> list[dict[str, Any]]:
        """Leaderboard rows, best first."""
        with self._lock:
            return self._ledger.rows()

    def ledger_csv(self) -> str:
        with self._lock:
            return self._ledger.to_csv()
