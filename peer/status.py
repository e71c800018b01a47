"""The swarm at a glance, from the peers' signed DHT records: what the dashboard and
`swarm-peer status` show.

Pure functions over PeerRecord lists (no network), shared by the bootstrap's monitor
(which adds history and the persistent ledger) and by `swarm-peer status --join ADDR`
(peer/cli.py: it joins the DHT as a client, reads the records once, prints them and leaves).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from averaging.identity import short_id  # noqa: F401  (re-exported)

from .membership import PeerRecord, RunSettings
from .progress import fmt_bytes, fmt_rate


@dataclass(frozen=True)
class RunStatus:
    """Live trainers of a run, sorted by peer id."""

    peers: tuple[PeerRecord, ...]

    @property
    def round(self) -> int:
        return max((p.round for p in self.peers), default=0)

    @property
    def agree(self) -> bool:
        """True if all peers at the newest round hold the same θ_sync digest."""
        return len({p.digest for p in self.peers if p.round == self.round}) <= 1

    @property
    def mean_loss(self) -> float | None:
        losses = [p.loss for p in self.peers if p.loss is not None]
        return sum(losses) / len(losses) if losses else None

    @property
    def throughput(self) -> float:
        """Samples per second of the whole swarm (sum over live trainers)."""
        return sum(p.samples_per_s for p in self.peers)

    @property
    def flops_per_sample(self) -> float:
        """The run's FLOPs per sample: the median of what the peers report, so that one peer
        inflating its own figure cannot inflate everyone's credit unit."""
        vals = sorted(p.flops_per_sample for p in self.peers if p.flops_per_sample > 0)
        return vals[len(vals) // 2] if vals else 0.0

    @property
    def val_loss(self) -> tuple[int, float] | None:
        """(round, mean validation loss) at the newest round any trainer has evaluated."""
        reported = [p for p in self.peers if p.val_loss is not None]
        if not reported:
            return None
        r = max(p.val_round for p in reported)
        vals = [p.val_loss for p in reported if p.val_round == r]
        return r, sum(vals) / len(vals)

    @property
    def settings(self) -> tuple[RunSettings | None, int]:
        """The run's configuration as most trainers report it, and how many trainers report another."""
        counts = Counter(p.settings for p in self.peers if p.settings.params)
        if not counts:
            return None, 0
        common, n = counts.most_common(1)[0]
        return common, sum(counts.values()) - n

    def line(self) -> str:
        if not self.peers:
            return "no live peers"
        rounds = Counter(p.round for p in self.peers)
        loss = f"{self.mean_loss:.4f}" if self.mean_loss is not None else "n/a"
        return (f"{len(self.peers)} live peer(s), round {self.round} "
                f"(at round: {dict(sorted(rounds.items()))}), peers at newest round agree: "
                f"{'yes' if self.agree else 'NO'}, mean train loss {loss}, {fmt_rate(self.throughput)}, "
                f"samples {sum(p.samples for p in self.peers):,}")


def trainers_of(records: dict[str, PeerRecord]) -> RunStatus:
    return RunStatus(tuple(sorted((p for p in records.values() if p.role == "trainer"), key=lambda p: p.peer_id)))


def peer_row(r: PeerRecord, now: float, credit: float) -> dict[str, Any]:
    """One row of the peers table (the dashboard's /api/peers)."""
    return {
        "peer_id": r.peer_id, "short_id": short_id(r.peer_id), "role": r.role, "device": r.device, "round": r.round,
        "step": r.step, "samples": r.samples, "samples_per_s": r.samples_per_s, "loss": r.loss, "compute_s": r.compute_s,
        "rounds_ok": r.rounds_ok, "rounds_failed": r.rounds_failed, "bytes_sent": r.bytes_sent, "bytes_recv": r.bytes_recv,
        "version": r.version, "last_seen": r.t, "age_s": max(0.0, now - r.t), "credit": credit,
    }


def round_outcomes(records: list[PeerRecord], known: dict[int, dict[str, Any]] | None = None) -> dict[int, dict[str, Any]]:
    """Merge the peers' recent round outcomes into one entry per round.

    `known` (round → peer id → outcome) accumulates across calls, since each record only
    carries its peer's last few rounds. Per peer, the newest attempt at a round counts.
    Returns round → {"round", "status" (complete | failed | partial), "peers", "complete",
    "failed", "duration_s" (slowest member), "bytes" (all members), "t"}.
    """
    per_round: dict[int, dict[str, Any]] = known if known is not None else {}
    for r in records:
        for o in r.recent:
            mine = per_round.setdefault(o.round, {})
            if r.peer_id not in mine or mine[r.peer_id].t <= o.t:
                mine[r.peer_id] = o
    out = {}
    for rnd, by_peer in per_round.items():
        outs = list(by_peer.values())
        ok = sum(o.status == "complete" for o in outs)
        status = "complete" if ok == len(outs) else "failed" if ok == 0 else "partial"
        out[rnd] = {"round": rnd, "status": status, "peers": len(outs), "complete": ok, "failed": len(outs) - ok,
                    "duration_s": max(o.duration_s for o in outs), "bytes": sum(o.bytes for o in outs),
                    "t": max(o.t for o in outs)}
    return out


def render(status: RunStatus, run_id: str, now: float) -> str:
    """The terminal summary printed by `swarm-peer status`."""
    fps = status.flops_per_sample
    lines = [f"run {run_id!r}: {status.line()}"]
    if status.peers:
        lines.append(f"{'peer':<10}{'device':<8}{'round':>6}{'samples/s':>11}{'loss':>9}{'samples':>11}"
                     f"{'credit':>12}{'sent':>11}{'seen':>7}")
        for p in status.peers:
            loss = f"{p.loss:.4f}" if p.loss is not None else "-"
            lines.append(f"{short_id(p.peer_id):<10}{p.device[:7]:<8}{p.round:>6}{p.samples_per_s:>11.1f}{loss:>9}"
                         f"{p.samples:>11,}{fmt_flops(p.samples * fps):>12}{fmt_bytes(p.bytes_sent):>11}"
                         f"{max(0.0, now - p.t):>6.0f}s")
        outcomes = sorted(round_outcomes(list(status.peers)).values(), key=lambda o: o["round"])[-5:]
        if outcomes:
            lines.append("recent rounds: " + ", ".join(
                f"{o['round']} {o['status']} ({o['peers']} peers, {o['duration_s']:.2f}s)" for o in outcomes))
    return "\n".join(lines)


def fmt_flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} FLOP"
