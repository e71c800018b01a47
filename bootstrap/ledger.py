"""The contribution ledger: credit for every volunteer, kept on disk across restarts.

Each peer's signed record carries running counters (samples trained, compute seconds,
rounds completed) since that peer process started, and the random `incarnation` token that
process drew. The ledger adds up *increments*: it remembers the last counters and token it
saw per peer id and adds the difference. A new token is a restart of that peer with the same
identity (its counters are all new work); within one incarnation a smaller number is a stale
or reordered record and adds nothing (the counters only grow). Because the last-seen
counters are saved with the totals, a restarted bootstrap neither loses credit nor counts it
twice.

Unit of credit: training FLOPs = samples × FLOPs per sample, where FLOPs per sample is the
median of what the run's peers report (6 × parameters × positions per sample: one forward
and backward pass). See docs/dashboard.md.

Saved as JSON (atomic replace) with a CSV export next to it. A damaged ledger file is
reported in one line and left untouched (StateError); it is never overwritten.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from averaging.errors import StateError
from averaging.identity import short_id
from peer.fsutil import write_text_atomic
from peer.membership import PeerRecord

FORMAT = "swarmtrain-ledger-v1"
CSV_COLUMNS = ("rank", "peer_id", "device", "samples", "compute_s", "rounds", "credit", "first_seen", "last_seen")


@dataclass
class LedgerEntry:
    peer_id: str
    first_seen: float
    last_seen: float
    device: str = ""
    samples: int = 0
    compute_s: float = 0.0
    rounds: int = 0
    credit: float = 0.0  # FLOPs
    # The peer's counters when last seen: the ledger adds only what is new since then.
    seen_samples: int = 0
    seen_compute_s: float = 0.0
    seen_rounds: int = 0
    seen_incarnation: str = ""  # '' in ledgers written before incarnations existed

    @classmethod
    def from_dict(cls, d: Any) -> "LedgerEntry":
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or not all(isinstance(k, str) for k in d) or set(d) - names \
                or not {"peer_id", "first_seen", "last_seen"} <= set(d):
            raise ValueError("bad entry")
        e = cls(**d)
        numbers = (e.first_seen, e.last_seen, e.samples, e.compute_s, e.rounds, e.credit,
                   e.seen_samples, e.seen_compute_s, e.seen_rounds)
        if not isinstance(e.peer_id, str) or not isinstance(e.seen_incarnation, str) \
                or not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in numbers):
            raise ValueError(f"bad values for {e.peer_id!r}")
        return e


class Ledger:
    """Lifecycle: `Ledger(path)` loads (or starts empty), `observe()` per monitor poll, `save()`.

    Not thread-safe by itself: the RunMonitor serializes access with its lock.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, LedgerEntry] = {}
        if self.path is not None and self.path.exists():
            self.entries = self._load(self.path)

    @staticmethod
    def _load(path: Path) -> dict[str, LedgerEntry]:
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("peers"), list):
                raise ValueError(f"not a {FORMAT} file")
            entries = [LedgerEntry.from_dict(d) for d in doc["peers"]]
        except (OSError, ValueError, TypeError, OverflowError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise StateError(f"ledger {path} is unreadable ({e}); fix or move it away (it was not modified)") from e
        return {e.peer_id: e for e in entries}

    def observe(self, records: Iterable[PeerRecord], *, flops_per_sample: float, now: float) -> None:
        """Credit the work each trainer record (or a trainer's last, "left") shows since the last
        observation of that peer."""
        for r in records:
            if r.role not in ("trainer", "left") or not r.peer_id or (r.role == "left" and r.peer_id not in self.entries):
                continue  # archivists train nothing; a "left" record counts only for a known trainer
            e = self.entries.get(r.peer_id)
            if e is None:
                e = self.entries[r.peer_id] = LedgerEntry(peer_id=r.peer_id, first_seen=now, last_seen=now)
            seen = (e.seen_samples, e.seen_compute_s, e.seen_rounds)
            counters = (r.samples, r.compute_s, r.rounds_ok)
            restarted = r.incarnation != e.seen_incarnation
            if restarted and e.seen_incarnation == "" and all(n >= s for n, s in zip(counters, seen)):
                restarted = False  # an entry saved before incarnations existed: nothing went down, same process
            if restarted:
                seen = (0, 0.0, 0)  # a new process of this peer: everything it reports is new work
            # Within one incarnation the counters only grow: a smaller value is an older record.
            d_samples, d_compute, d_rounds = (max(n - s, 0) for n, s in zip(counters, seen))
            e.samples += d_samples
            e.compute_s += d_compute
            e.rounds += d_rounds
            e.credit += d_samples * flops_per_sample
            e.seen_samples, e.seen_compute_s, e.seen_rounds = (max(n, s) for n, s in zip(counters, seen))
            e.seen_incarnation = r.incarnation
            e.last_seen = max(e.last_seen, now)
            e.device = r.device or e.device

    def rows(self) -> list[dict[str, Any]]:
        """Leaderboard rows, best first (credit, then samples, then peer id)."""
        ranked = sorted(self.entries.values(), key=lambda e: (-e.credit, -e.samples, e.peer_id))
        return [{"rank": i + 1, "peer_id": e.peer_id, "short_id": short_id(e.peer_id), "device": e.device,
                 "samples": e.samples, "compute_s": round(e.compute_s, 3), "rounds": e.rounds, "credit": e.credit,
                 "first_seen": e.first_seen, "last_seen": e.last_seen} for i, e in enumerate(ranked)]

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows())
        return buf.getvalue()

    def save(self) -> None:
        """Write the ledger (JSON) and its CSV export atomically. No-op without a path.

        Failure: OSError propagates (the caller logs it and retries at the next save); the
        previous file stays intact because the new one is renamed over it only when complete.
        """
        if self.path is None:
            return
        doc = {"format": FORMAT, "peers": [asdict(e) for e in self.entries.values()]}
        write_text_atomic(self.path, json.dumps(doc, indent=1))
        write_text_atomic(self.path.with_suffix(".csv"), self.to_csv())
