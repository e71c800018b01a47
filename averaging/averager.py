"""One sync round from the averaging layer's point of view: matchmaking, then all-reduce.

This layer knows nothing about models or training: it averages a flat vector, weighted,
with whoever is at the same round, and says honestly whether it worked.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from .allreduce import Compression, RoundResult, weighted_allreduce
from .codecs import get_codec
from .dht import SwarmDHT
from .errors import MatchmakingError
from .access import Credential
from .faults import Tamper
from .matchmaking import MatchmakingConfig, Matchmaker
from .relay import client_round, collect_clients, publish_to_clients
from .robust import AggregatorConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AveragerConfig:
    """Network settings of the averager."""

    # Address the TCPStore listens on (0.0.0.0 = all interfaces).
    listen_host: str = "0.0.0.0"
    # Address other peers use to reach this one (for the store and for gloo).
    announce_host: str = "127.0.0.1"
    # Rendezvous and transfer timeout, in seconds; a dead peer fails the round within it.
    allreduce_timeout: float = 60.0
    # Wire codec: fp32 (exact), fp16, bf16, or int8 (blockwise absmax, with error feedback).
    codec: str = "fp32"
    # Behind NAT: never listen; average through the group leader (see relay.py).
    client_mode: bool = False
    matchmaking: MatchmakingConfig = MatchmakingConfig()
    # How each part is reduced: mean (weighted), trimmed_mean or centered_clip (robust.py).
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    # All peers trusted (a private run): fp32 + mean may use gloo's ring SUM, which is faster
    # but cannot drop a bad contribution (one NaN then fails the round instead).
    trusted: bool = False
    # Ban a peer for the rest of the run after this many rounds with a rejected contribution.
    ban_after: int = 3
    # A private run's shared secret (None = open run): see access.py.
    secret: Credential | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.allreduce_timeout > 0:
            raise ValueError(f"allreduce_timeout must be > 0, got {self.allreduce_timeout}")
        get_codec(self.codec)  # raises ValueError naming the choices
        if self.ban_after < 1:
            raise ValueError(f"ban_after must be >= 1, got {self.ban_after}")


class Averager:
    """Averages flat tensors with the swarm. Lifecycle: construct, `average()` per round, `close()`."""

    def __init__(self, dht: SwarmDHT, cfg: AveragerConfig, *, tamper: Tamper | None = None) -> None:
        """`tamper`: fault injection for the hostile-peer tests only (see faults.py)."""
        self.dht = dht
        self.cfg = cfg
        self.tamper = tamper
        self.compression = Compression.named(cfg.codec)  # error-feedback state lives across rounds
        self.strikes: Counter[str] = Counter()  # rounds in which a peer's contribution was rejected
        self.banned: set[str] = set()  # shared with the matchmaker: never grouped with again
        self.matchmaker = Matchmaker(
            dht, listen_host=cfg.listen_host, announce_host=cfg.announce_host, cfg=cfg.matchmaking,
            client_mode=cfg.client_mode, banned=self.banned, secret=cfg.secret,
        )

    def average(
        self, round_: int, fingerprint: str, delta: torch.Tensor, weight: float, expected_size: Callable[[], int]
    ) -> RoundResult:
        """Meet the peers at `round_` and average `delta` with them.

        Failure behaviour: never raises for network faults; returns a `failed` RoundResult
        within about window + join_timeout + 2·allreduce_timeout seconds. `delta` is never
        modified.
        """
        t0 = time.monotonic()
        try:
            group = self.matchmaker.form_group(round_, fingerprint, expected_size)
        except MatchmakingError as e:
            return RoundResult(round_, "failed", (self.dht.peer_id,), (), time.monotonic() - t0, 0, str(e))
        timeout = self.cfg.allreduce_timeout
        if group.is_client:
            result = client_round(group, self.dht.peer_id, delta, weight, timeout_s=2 * timeout + self.cfg.matchmaking.join_timeout)
        elif group.clients:  # we lead and relay for peers behind NAT
            uploads = collect_clients(group, delta.numel(), timeout_s=self.cfg.matchmaking.join_timeout)
            total = weight + sum(w for _, w, _ in uploads)
            combined = (delta.detach().reshape(-1).cpu().float() * weight + sum(x for _, _, x in uploads)) / total
            result = self._allreduce(group, combined, total)
            included = [pid for pid, _, _ in uploads]
            # Report the clients whose contributions went in as members of the round.
            result = RoundResult(result.round, result.status, result.members + tuple(included), result.weights,
                                 result.duration_s, result.bytes_sent, result.error,
                                 None if result.mean_delta is None else result.mean_delta.to(delta.device),
                                 result.rejected)
            publish_to_clients(group, result, included)
        else:
            result = self._allreduce(group, delta, weight)
        self._strike(result)
        # Report the whole round's duration, matchmaking included.
        return RoundResult(
            result.round, result.status, result.members, result.weights,
            time.monotonic() - t0, result.bytes_sent, result.error, result.mean_delta, result.rejected,
        )

    def _allreduce(self, group, delta: torch.Tensor, weight: float) -> RoundResult:
        return weighted_allreduce(group, delta, weight, host=self.cfg.announce_host, timeout_s=self.cfg.allreduce_timeout,
                                  codec=self.compression, aggregator=self.cfg.aggregator, trusted=self.cfg.trusted,
                                  tamper=self.tamper, secret=self.cfg.secret)

    def _strike(self, result: RoundResult) -> None:
        """One strike per round against each peer whose contribution this peer rejected;
        `ban_after` strikes and it is banned: never grouped with again in this run."""
        for pid in {pid for pid, _ in result.rejected if pid != self.dht.peer_id}:
            self.strikes[pid] += 1
            if self.strikes[pid] >= self.cfg.ban_after and pid not in self.banned:
                self.banned.add(pid)
                log.warning("banned peer %s for the rest of the run: %d rounds with rejected contributions (%s)",
                            pid[-8:], self.strikes[pid], "; ".join(sorted({why for p, why in result.rejected if p == pid})))

    def reset_compression(self) -> None:
        """Forget error-feedback residuals (after adopting a downloaded state they are stale)."""
        self.compression = Compression.named(self.cfg.codec)

    def close(self) -> None:
        self.matchmaker.close()
