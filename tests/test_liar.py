"""A lying record does not strand a late joiner: three records (sybils of one liar, each signed
with its own key) claim round 1023 with a digest nobody can serve. The joiner tries that claim
(it has the most supporters), no download backs it, so the claim is dropped and its claimants
struck; the joiner catches up from the honest peers and completes rounds with them.
Two kinds of liar: records whose address is dead, and records whose address answers with a
manifest for a still newer round ("moved on", which is believed once, not twice)."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.distributed import TCPStore

from averaging.dht import SwarmDHT, dht_time
from peer import Peer, PeerConfig, SwarmConfig, SyncConfig
from peer.loop import PeerLoop
from peer.membership import PEERS_KEY, PeerRecord, record_validator
from peer.state import SwarmState
from peer.transfer import StateServer

from .conftest import free_port

RUN = "liar"


def _peer(addrs: list[str]) -> Peer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    cfg = PeerConfig(swarm=SwarmConfig(run_id=RUN, initial_peers=addrs, host="127.0.0.1"),
                     sync=SyncConfig(every_steps=10, matchmaking={"window": 8}, allreduce={"timeout": 20}))
    return Peer(model, torch.optim.SGD(model.parameters(), lr=0.01), cfg)


def _train(peer: Peer, until) -> None:
    while not until():
        x = torch.randn(8, 8)
        peer.step(peer.model(x).square().mean(), samples=8)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("liar_address", ["dead", "says_moved_on"])
def test_a_claim_no_download_backs_is_dropped_and_struck(liar_address):
    boot = SwarmDHT.start(RUN, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[record_validator(RUN)])
    addrs = boot.visible_maddrs()
    stop, ready, errors = threading.Event(), threading.Barrier(3), []
    honest: list[Peer] = []

    def honest_peer() -> None:
        try:
            with _peer(addrs) as p:
                honest.append(p)
                _train(p, lambda: p.round >= 3)
                ready.wait(120)
                _train(p, stop.is_set)
        except BaseException as e:  # surface thread failures in the test
            errors.append(e)
            ready.abort()

    threads = [threading.Thread(target=honest_peer) for _ in range(2)]
    liars: list[SwarmDHT] = []
    loop, server = PeerLoop("liar").start(), None
    try:
        for t in threads:
            t.start()
        ready.wait(150)
        fingerprint = honest[0].fingerprint
        port = free_port()
        if liar_address == "says_moved_on":  # a live store whose state is always "one round newer"
            store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
            fake = SwarmState(1024, fingerprint, torch.zeros(honest[0].state.theta_sync.numel()), None)
            server = StateServer(store, lambda: fake)
            server.start(loop)
            port = store.port
        for _ in range(3):
            liar = SwarmDHT.start(RUN, initial_peers=addrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                  record_validators=[record_validator(RUN)])
            liars.append(liar)
            claim = PeerRecord(round=1023, fingerprint=fingerprint, schema="lie", digest="f" * 64, host="127.0.0.1",
                               port=port, t=dht_time(), incarnation="liar")
            assert liar.put_signed(PEERS_KEY, claim.to_record(), ttl=300)
        with _peer(addrs) as joiner:
            caught_up = joiner.round
            assert caught_up >= 3, "the joiner did not catch up from the honest peers"
            assert {liar.peer_id for liar in liars} <= set(joiner.strikes), joiner.strikes
            _train(joiner, lambda: joiner.round >= caught_up + 2 or joiner.local_step >= 400)
            assert joiner.round >= caught_up + 2, "the joiner completed no rounds with the swarm"
            assert any(r.ok and len(r.members) >= 2 for r in joiner.history)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        for liar in liars:
            liar.shutdown()
        if server is not None:
            server.close()
        loop.close()
        boot.shutdown()
    assert not errors, errors
