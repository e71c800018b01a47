"""The hostile-peer harness: a small in-process swarm (real DHTs, real gloo groups on
127.0.0.1) in which one peer corrupts what it sends through the `tamper` seam.

    honest, hostile = run_swarm(honest=4, hostiles=[Tamper(mode="scale", factor=100)], aggregator="trimmed_mean")

Task: noisy linear regression y = x·w + ε (ε ~ N(0, 0.5²)), so the validation loss has a
floor (0.25) and "within 5% of the honest run" is a meaningful comparison. All peers start
from the same weights; DiLoCo with plain averaging (outer lr 1, momentum 0) every 10 steps.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from averaging.config import AggregatorConfig
from averaging.dht import SwarmDHT
from averaging.faults import Tamper
from peer import Peer, PeerConfig, SwarmConfig, SyncConfig

DIM = 16
NOISE = 0.5


@dataclass
class PeerOutcome:
    round: int
    digest: str
    val_loss: float
    finite: bool
    banned: frozenset[str]
    peer_id: str
    strikes: dict[str, int]


def _val_loss(model: nn.Module, w_true: torch.Tensor) -> float:
    g = torch.Generator().manual_seed(12345)
    x = torch.randn(2048, DIM, generator=g)
    y = x @ w_true + NOISE * torch.randn(2048, 1, generator=g)
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def run_swarm(*, honest: int, hostiles: list[Tamper], aggregator: str, trim: float = 0.2, rounds: int = 8,
              run_id: str = "hostile", timeout: float = 240.0) -> tuple[list[PeerOutcome], list[PeerOutcome]]:
    """Train `honest` + len(hostiles) peers until `rounds` rounds; return (honest outcomes, hostile outcomes).

    Groups are as small as the aggregator allows (AggregatorConfig.min_members: 2 for mean,
    3 for centered_clip, 5 for trimmed_mean at trim 0.2, 3 at trim 0.34)."""
    min_group = max(2, AggregatorConfig(name=aggregator, trim=trim).min_members)  # type: ignore[arg-type]
    w_true = torch.randn(DIM, 1, generator=torch.Generator().manual_seed(0))
    init = nn.Linear(DIM, 1).state_dict()  # one initialisation shared by every peer
    boot = SwarmDHT.start(run_id, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    n = honest + len(hostiles)
    out: dict[int, PeerOutcome] = {}
    errors: list[BaseException] = []
    started = threading.Barrier(n, timeout=60)

    def train(i: int) -> None:
        try:
            model = nn.Linear(DIM, 1)
            model.load_state_dict(init)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            cfg = PeerConfig(
                swarm=SwarmConfig(run_id=run_id, initial_peers=boot.visible_maddrs(), host="127.0.0.1"),
                sync=SyncConfig(every_steps=10, matchmaking={"window": 15, "min_group_size": min_group}, allreduce={"timeout": 20}, outer={"lr": 1.0, "momentum": 0.0}, aggregator={"name": aggregator, "trim": trim}),
            )
            gen = torch.Generator().manual_seed(100 + i)
            tamper = hostiles[i - honest] if i >= honest else None
            with Peer(model, opt, cfg, tamper=tamper) as peer:
                started.wait()  # everyone is in the DHT before the first sync, so round 1 has all n
                while peer.round < rounds and peer.local_step < rounds * 40:
                    x = torch.randn(32, DIM, generator=gen)
                    y = x @ w_true + NOISE * torch.randn(32, 1, generator=gen)
                    peer.step(nn.functional.mse_loss(model(x), y), samples=len(x))
                theta = peer.state.theta_sync
                out[i] = PeerOutcome(peer.round, peer.digest, _val_loss(model, w_true),
                                     bool(torch.isfinite(theta).all()), peer.banned, peer.peer_id, peer.strikes)
        except BaseException as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=train, args=(i,), name=f"peer{i}") for i in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=timeout)
        assert not any(t.is_alive() for t in threads), "a peer thread did not finish"
        assert not errors, errors
    finally:
        boot.shutdown()
    return [out[i] for i in range(honest)], [out[i] for i in range(honest, n)]
