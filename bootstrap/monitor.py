"""Watches a run through the DHT: who is live, which round, whether peers agree, the loss."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from averaging.dht import SwarmDHT
from peer.membership import PeerRecord, live_peers


@dataclass(frozen=True)
class RunStatus:
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

    def line(self) -> str:
        if not self.peers:
            return "no live peers"
        rounds = Counter(p.round for p in self.peers)
        loss = f"{self.mean_loss:.4f}" if self.mean_loss is not None else "n/a"
        return (f"{len(self.peers)} live peer(s), round {self.round} "
                f"(at round: {dict(sorted(rounds.items()))}), peers at newest round agree: "
                f"{'yes' if self.agree else 'NO'}, mean train loss {loss}, samples {sum(p.samples for p in self.peers):,}")


def run_status(dht: SwarmDHT) -> RunStatus:
    trainers = [p for p in live_peers(dht).values() if p.role == "trainer"]
    return RunStatus(tuple(sorted(trainers, key=lambda p: p.peer_id)))
