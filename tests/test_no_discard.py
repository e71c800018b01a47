"""No computed work is thrown away: a peer left out of a round (here one of 3 whose first
period has a hiccup longer than the others' matchmaking window, so it reaches its sync
point after their group has closed) carries its local progress onto the swarm's newer
state, and its samples go into a later round's average. Before, the download overwrote its
parameters and zeroed its sample count: its work of that period was lost."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from averaging.dht import SwarmDHT
from peer import Peer, PeerConfig, SwarmConfig, SyncConfig

from .conftest import run_peers

ROUNDS = 4
STEP_S = 0.1  # every peer's emulated compute per step: a 10-step period takes 1 s
HICCUP_S = 1.5  # peer 2's one slow step in its first period: it arrives 1.5 s late, the window is 1 s


@pytest.mark.timeout(240)
def test_a_left_out_peers_samples_reach_a_later_average():
    boot = SwarmDHT.start("no-discard", host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        addr = boot.visible_maddrs()
        w_true = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
        init = nn.Linear(8, 1).state_dict()
        out: dict[int, dict] = {}
        started = threading.Barrier(3, timeout=60)

        def train(i: int) -> None:
            model = nn.Linear(8, 1)
            model.load_state_dict(init)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            cfg = PeerConfig(swarm=SwarmConfig(run_id="no-discard", initial_peers=addr, host="127.0.0.1"),
                             sync=SyncConfig(every_steps=10, matchmaking={"window": 1.0}, allreduce={"timeout": 20}))
            gen = torch.Generator().manual_seed(100 + i)
            with Peer(model, opt, cfg) as peer:
                started.wait()
                while peer.round < ROUNDS and peer.local_step < 400:
                    x = torch.randn(16, 8, generator=gen)
                    peer.step(nn.functional.mse_loss(model(x), x @ w_true), samples=len(x))
                    # Emulated compute (not a wait for an event): equal speeds, but one long step for peer 2.
                    time.sleep(STEP_S + (HICCUP_S if i == 2 and peer.local_step == 5 else 0.0))
            me = peer.peer_id
            ok_weights = [r.weights[r.members.index(me)] for r in peer.history if r.ok]
            out[i] = dict(total=peer.total_samples, averaged=peer.samples_averaged, discarded=peer.samples_discarded,
                          pending=peer.samples_since_sync, ok_weights=ok_weights, failed=peer.rounds_failed,
                          left_out=[r.ok for r in peer.history], digest=peer.digest, round=peer.round)

        run_peers(3, train)
    finally:
        boot.shutdown()
    # Peer 2 reached its first sync point after the others' window had closed: it was left out.
    assert out[2]["failed"] >= 1 and out[2]["left_out"][0] is False, out
    for o in out.values():
        # Every sample went into a completed round's average, or is still pending.
        assert o["discarded"] == 0 and o["averaged"] + o["pending"] == o["total"], o
    for o in (out[0], out[1]):  # never left out: each round's weight is exactly its samples
        assert sum(o["ok_weights"]) == o["averaged"], o
    # Peer 2's first completed round came after it was left out, with the 10 steps it carried
    # (160 samples, one round stale: weight halved) plus its first step on the new state (16):
    # more than the fresh step alone, less than everything undiscounted.
    assert any(not a and b for a, b in zip(out[2]["left_out"], out[2]["left_out"][1:])), out[2]
    assert 16 < out[2]["ok_weights"][0] < 160 + 16, out[2]
    assert len({(o["round"], o["digest"]) for o in out.values()}) == 1, "peers disagree at the end"
