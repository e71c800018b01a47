"""One sync round from the averaging layer's point of view: matchmaking, then all-reduce.

This layer knows nothing about models or training: it averages a flat vector, weighted,
with whoever is at the same round, and says honestly whether it worked.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable

import torch

from .allreduce import Compression, RoundResult, weighted_allreduce
from .dht import SwarmDHT
from .errors import MatchmakingError
from .faults import Tamper
from .config import AveragerConfig, MatchmakingConfig  # noqa: F401  (re-exported)
from .matchmaking import Matchmaker
from .relay import client_round, collect_clients, publish_to_clients
from .robust import AggregatorConfig  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


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
        """One strike per round against each peer whose contribution this peer rejected."""
        for pid in {pid for pid, _ in result.rejected if pid != self.dht.peer_id}:
            self.strike(pid, "; ".join(sorted({why for p, why in result.rejected if p == pid})))

    def strike(self, pid: str, why: str) -> None:
        """Count one offence by `pid` (a rejected contribution, a state claim no download backed);
        `ban_after` strikes and it is banned: never grouped with again in this run."""
        self.strikes[pid] += 1
        if self.strikes[pid] >= self.cfg.ban_after and pid not in self.banned:
            self.banned.add(pid)
            log.warning("banned peer %s for the rest of the run: %d strikes (last: %s)", pid[-8:], self.strikes[pid], why)

    def reset_compression(self) -> None:
        """Forget error-feedback residuals (after adopting a downloaded state they are stale)."""
        self.compression = Compression.named(self.cfg.codec)

    def close(self) -> None:
        self.matchmaker.close()
