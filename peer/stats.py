"""A peer's counters: one mutable record owned by its round loop, read as frozen snapshots."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Counters:
    """Written only by the training thread (through `RoundLoop`); others read `PeerStats`."""

    local_step: int = 0
    total_samples: int = 0
    samples_since_sync: int = 0  # trained since the last completed round: the next round's weight
    samples_averaged: int = 0  # went into a completed round's average
    samples_discarded: int = 0  # progress too stale to carry onto the swarm's state (sync.max_stale_rounds)
    rounds_ok: int = 0  # rounds this peer completed an all-reduce in
    rounds_failed: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    peers_seen: int = 0  # other live peers in the last look at the DHT


@dataclass(frozen=True, kw_only=True)
class PeerStats:
    """What `Peer.stats()` returns: a consistent, immutable snapshot, safe to keep and to pass
    between threads. Every sample is in exactly one of samples_averaged, samples_discarded
    and samples_since_sync (pending)."""

    round: int
    local_step: int
    total_samples: int
    samples_since_sync: int
    samples_averaged: int
    samples_discarded: int
    rounds_ok: int
    rounds_failed: int
    bytes_sent: int
    bytes_recv: int
    peers_seen: int
    sync_wait_s: float  # seconds step() spent blocked in sync
    compute_s: float  # wall seconds since joining, minus sync_wait_s
    samples_per_s: float  # over the last ~30 s
    last_loss: float | None


@dataclass(frozen=True, slots=True)
class RoundCost:
    """Where one completed round's wall time went (`Peer.round_costs`), for profiling.

    matchmaking_s  meeting the group (waiting for the others included)
    transfer_s     the all-reduce: encoding, the wire, reducing this peer's part
    local_s        everything else this peer did: Δ into the round buffer, the outer step,
                   writing the parameters, the digest, announcing (checkpoints not included)
    """

    round: int
    matchmaking_s: float
    transfer_s: float
    local_s: float
