"""Peer records are signed and schema-checked by every DHT node (real hivemind DHTs on 127.0.0.1).

A forger can neither write under another peer's key (with or without our validators
installed) nor publish a malformed record under its own; readers never see either.
"""
from __future__ import annotations

import hivemind
import pytest

from averaging.dht import SwarmDHT, dht_time
from averaging.identity import peer_id_of
from peer.membership import PEERS_KEY, PeerRecord, live_peers, record_validator

RUN = "signed-test"
pytestmark = pytest.mark.timeout(120)


def _start(initial: list[str] = ()) -> SwarmDHT:
    return SwarmDHT.start(RUN, initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                          record_validators=[record_validator(RUN)])


def _record(samples: int, **kw) -> dict:
    return PeerRecord(round=2, fingerprint="f" * 16, schema="test", digest="d" * 64, host="127.0.0.1", port=1234,
                      samples=samples, loss=2.5, device="cpu", version="test", t=1.0, **kw).to_record()


@pytest.fixture
def swarm():
    """An honest peer, an honest storage node (like a bootstrap) and a forger, all on one DHT."""
    nodes: list = []
    try:
        storage = _start()
        nodes.append(storage)
        honest = _start(storage.visible_maddrs())
        nodes.append(honest)
        forger = _start(storage.visible_maddrs())
        nodes.append(forger)
        yield storage, honest, forger
    finally:
        for n in nodes:
            n.shutdown()


def test_owner_subkey_is_bound_to_the_libp2p_peer_id(swarm):
    _, honest, _ = swarm
    assert honest.identity is not None
    assert peer_id_of(honest.identity.owner_subkey) == honest.peer_id  # the signing key IS the peer's identity


def test_forged_record_under_another_peers_key_is_rejected(swarm):
    storage, honest, forger = swarm
    assert honest.put_signed(PEERS_KEY, _record(samples=100), ttl=60)
    seen = live_peers(storage)
    assert seen[honest.peer_id].samples == 100

    # 1. The forger, running swarmtrain's own validators, writes under the honest peer's subkey:
    #    it cannot sign for that key, so every node (its own included) refuses the write.
    assert not forger.put(PEERS_KEY, honest.identity.owner_subkey, _record(samples=10**9), ttl=120)

    # 2. A forger with a bare hivemind DHT (no validators at all) tries the same: the honest
    #    nodes' RSASignatureValidator rejects the unsigned value when it arrives.
    bare = hivemind.DHT(initial_peers=storage.visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    try:
        bare.store(storage.key(PEERS_KEY), _record(samples=10**9), expiration_time=dht_time() + 120,
                   subkey=honest.identity.owner_subkey)
    finally:
        bare.shutdown()

    for reader in (storage, honest):  # what honest readers see: the true record only
        recs = live_peers(reader)
        assert recs[honest.peer_id].samples == 100
        assert all(r.samples != 10**9 for r in recs.values())


@pytest.mark.parametrize("bad", [
    {"samples": -5},                    # a negative sample count
    {"samples": "many"},                # wrong type
    {"loss": float("nan")},             # non-finite
    {"round": 1.0},                     # would need a conversion (strict schema)
    {"role": "admin"},                  # unknown role
    {"extra_field": 1},                 # unknown field
])
def test_malformed_record_is_rejected_even_under_own_key(swarm, bad):
    storage, _, forger = swarm
    rec = {**_record(samples=50), **bad}
    assert not forger.put_signed(PEERS_KEY, rec, ttl=60)  # signed correctly, but fails the schema everywhere
    assert forger.peer_id not in live_peers(storage)
    # control: the same peer's well-formed record is accepted, so the rejection above is the schema's
    assert forger.put_signed(PEERS_KEY, _record(samples=50), ttl=60)
    assert live_peers(storage)[forger.peer_id].samples == 50


def test_record_without_owner_subkey_is_rejected(swarm):
    storage, _, forger = swarm
    assert not forger.put(PEERS_KEY, forger.peer_id, _record(samples=50), ttl=60)  # plain string subkey: unsigned
    assert live_peers(storage) == {}
