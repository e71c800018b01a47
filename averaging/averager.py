"""One sync round from the averaging layer's point of view: matchmaking, then all-reduce.

This layer knows nothing about models or training: it averages a flat vector, weighted,
with whoever is at the same round, and says honestly whether it worked.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .allreduce import Compression, RoundResult, weighted_allreduce
from .codecs import get_codec
from .dht import SwarmDHT
from .errors import MatchmakingError
from .matchmaking import MatchmakingConfig, Matchmaker
from .relay import client_round, collect_clients, publish_to_clients


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

    def __post_init__(self) -> None:
        if not self.allreduce_timeout > 0:
            raise ValueError(f"allreduce_timeout must be > 0, got {self.allreduce_timeout}")
        get_codec(self.codec)  # raises ValueError naming the choices


class Averager:
    """Averages flat tensors with the swarm. Lifecycle: construct, `average()` per round, `close()`."""

    def __init__(self, dht: SwarmDHT, cfg: AveragerConfig) -> None:
        self.dht = dht
        self.cfg = cfg
        self.compression = Compression.named(cfg.codec)  # error-feedback state lives across rounds
        self.matchmaker = Matchmaker(
            dht, listen_host=cfg.listen_host, announce_host=cfg.announce_host, cfg=cfg.matchmaking,
            client_mode=cfg.client_mode,
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
            result = weighted_allreduce(group, combined, total, host=self.cfg.announce_host, timeout_s=timeout,
                                        codec=self.compression)
            included = [pid for pid, _, _ in uploads]
            # Report the clients whose contributions went in as members of the round.
            result = RoundResult(result.round, result.status, result.members + tuple(included), result.weights,
                                 result.duration_s, result.bytes_sent, result.error,
                                 None if result.mean_delta is None else result.mean_delta.to(delta.device))
            publish_to_clients(group, result, included)
        else:
            result = weighted_allreduce(group, delta, weight, host=self.cfg.announce_host, timeout_s=timeout,
                                        codec=self.compression)
        # Report the whole round's duration, matchmaking included.
        return RoundResult(
            result.round, result.status, result.members, result.weights,
            time.monotonic() - t0, result.bytes_sent, result.error, result.mean_delta,
        )

    def reset_compression(self) -> None:
        """Forget error-feedback residuals (after adopting a downloaded state they are stale)."""
        self.compression = Compression.named(self.cfg.codec)

    def close(self) -> None:
        self.matchmaker.close()
