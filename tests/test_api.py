"""The Python API: a custom torch.nn.Module trained by two in-process peers."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from averaging.dht import SwarmDHT
from peer import Peer, PeerConfig, SwarmConfig, SyncConfig


class TinyRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 8] -> [B, 1]
        return self.net(x)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("compression", ["fp32", "int8"])
def test_two_api_peers_train_a_custom_model(compression):
    boot = SwarmDHT.start("api-test", host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        addr = boot.visible_maddrs()
        w_true = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
        results: dict[int, dict] = {}
        errors: list[BaseException] = []

        def train(i: int) -> None:
            try:
                torch.manual_seed(i)  # different init per peer: the swarm must reconcile them
                model = TinyRegressor()
                opt = torch.optim.Adam(model.parameters(), lr=3e-2)
                cfg = PeerConfig(
                    swarm=SwarmConfig(run_id="api-test", initial_peers=addr, host="127.0.0.1"),
                    sync=SyncConfig(every_steps=20, matchmaking_window=20, allreduce_timeout=30, compression=compression),
                )
                gen = torch.Generator().manual_seed(100 + i)  # each peer its own data
                x_val = torch.randn(256, 8, generator=torch.Generator().manual_seed(7))
                y_val = x_val @ w_true
                with Peer(model, opt, cfg) as peer:
                    loss0 = nn.functional.mse_loss(model(x_val), y_val).item()
                    while peer.round < 6 and peer.local_step < 600:
                        x = torch.randn(32, 8, generator=gen)
                        loss = nn.functional.mse_loss(model(x), x @ w_true)
                        peer.step(loss, samples=len(x))
                    results[i] = {
                        "round": peer.round, "digest": peer.digest, "loss0": loss0,
                        "loss": nn.functional.mse_loss(model(x_val), y_val).item(),
                        "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
                    }
            except BaseException as e:  # surface thread failures in the test
                errors.append(e)

        threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=150)
        assert not errors, errors
        assert all(not t.is_alive() for t in threads)
        a, b = results[0], results[1]
        assert a["round"] >= 3 and b["round"] >= 3
        if a["round"] == b["round"]:
            assert a["digest"] == b["digest"]
            assert (a["params"] - b["params"]).abs().max().item() <= 1e-6
        for r in (a, b):
            assert r["loss"] < 0.5 * r["loss0"], r
    finally:
        boot.shutdown()


@pytest.mark.timeout(180)
def test_overlap_mode_trains_and_agrees():
    """With sync.overlap, rounds run in the background; peers still agree and the loss drops."""
    boot = SwarmDHT.start("overlap-test", host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        addr = boot.visible_maddrs()
        w_true = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
        out: dict[int, dict] = {}
        errors: list[BaseException] = []

        def train(i: int) -> None:
            try:
                torch.manual_seed(0)
                model = TinyRegressor()
                opt = torch.optim.Adam(model.parameters(), lr=3e-2)
                cfg = PeerConfig(swarm=SwarmConfig(run_id="overlap-test", initial_peers=addr, host="127.0.0.1"),
                                 sync=SyncConfig(every_steps=20, matchmaking_window=20, allreduce_timeout=30,
                                                 overlap=True, outer_lr=1.0, outer_momentum=0.0))
                gen = torch.Generator().manual_seed(100 + i)
                x_val = torch.randn(256, 8, generator=torch.Generator().manual_seed(7))
                with Peer(model, opt, cfg) as peer:
                    loss0 = nn.functional.mse_loss(model(x_val), x_val @ w_true).item()
                    while peer.round < 5 and peer.local_step < 800:
                        x = torch.randn(32, 8, generator=gen)
                        peer.step(nn.functional.mse_loss(model(x), x @ w_true), samples=len(x))
                    out[i] = {"round": peer.round, "digest": peer.digest, "loss0": loss0,
                              "loss": nn.functional.mse_loss(model(x_val), x_val @ w_true).item(),
                              "theta": peer.state.theta_sync.clone()}
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=150)
        assert not errors, errors
        a, b = out[0], out[1]
        assert min(a["round"], b["round"]) >= 4
        if a["round"] == b["round"]:  # θ_sync after the same round is bit-identical
            assert a["digest"] == b["digest"] and torch.equal(a["theta"], b["theta"])
        assert a["loss"] < 0.5 * a["loss0"] and b["loss"] < 0.5 * b["loss0"]
    finally:
        boot.shutdown()
