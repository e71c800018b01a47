"""Memory a Peer retains must not grow with the number of rounds.

Two in-process peers run many sync rounds of a small model. After round FIRST and again
after round LAST, we walk everything reachable from one Peer object (attributes, containers,
bound methods; not modules, classes or functions, which are shared by the whole process)
and add up the tensors found, by storage. A peer that kept one parameter vector per round
(the fp32 mean Δ of every RoundResult, 0.4 GB a round at 100M parameters) fails here.
"""
from __future__ import annotations

import gc
import threading
import types

import pytest
import torch
from torch import nn

from averaging.dht import SwarmDHT
from peer import Peer, PeerConfig, SwarmConfig, SyncConfig

FIRST, LAST = 4, 24
_OPAQUE = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.CodeType, types.FrameType)


def retained_tensors(root: object) -> tuple[int, int]:
    """(tensor count, bytes of their distinct storages) reachable from `root`."""
    seen: set[int] = {id(root)}
    todo = [root]
    count, storages = 0, {}
    while todo:
        obj = todo.pop()
        if isinstance(obj, torch.Tensor):
            count += 1
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
            continue
        for ref in gc.get_referents(obj):
            if id(ref) not in seen and not isinstance(ref, _OPAQUE):
                seen.add(id(ref))
                todo.append(ref)
    return count, sum(storages.values())


@pytest.mark.timeout(240)
def test_retained_memory_does_not_grow_with_rounds():
    boot = SwarmDHT.start("memory", host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    sizes: dict[int, tuple[int, int]] = {}
    where: dict[int, tuple[int, int, int]] = {}
    errors: list[BaseException] = []
    init = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 1)).state_dict()

    def train(i: int) -> None:
        try:
            model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 1))
            model.load_state_dict(init)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            cfg = PeerConfig(swarm=SwarmConfig(run_id="memory", initial_peers=boot.visible_maddrs(), host="127.0.0.1"),
                             sync=SyncConfig(every_steps=5, matchmaking={"window": 10}, allreduce={"timeout": 30}))
            gen = torch.Generator().manual_seed(i)
            with Peer(model, opt, cfg) as peer:
                while peer.round < LAST and peer.local_step < 40 * LAST:
                    x = torch.randn(16, 64, generator=gen)
                    result = peer.step(nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)), samples=16)
                    if i == 0 and result is not None and result.ok and peer.round in (FIRST, LAST):
                        del result  # what the caller holds is its own; measure what the Peer keeps
                        sizes[peer.round] = retained_tensors(peer)
                        # θ_sync, the momentum and the round buffer: allocated once, updated in place
                        where[peer.round] = (peer.outer.theta_sync.data_ptr(), peer.outer.momentum_buf.data_ptr(),
                                             peer.outer.round_buffer().data_ptr())
        except BaseException as e:  # surface thread failures in the test
            errors.append(e)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=200)
    finally:
        boot.shutdown()
    assert not errors, errors
    assert set(sizes) == {FIRST, LAST}, sizes
    params = sum(p.numel() for p in nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 1)).parameters())
    (n_first, b_first), (n_last, b_last) = sizes[FIRST], sizes[LAST]
    assert b_first >= 4 * params  # the walk does find the model (sanity of the measure itself)
    assert n_last == n_first and b_last == b_first, (sizes, f"{(b_last - b_first) / (LAST - FIRST):.0f} bytes per round")
    assert where[FIRST] == where[LAST], where  # the same three vectors, never reallocated


def test_the_state_digest_hashes_in_place():
    """Every round hashes θ_sync (its digest is announced and checked by everyone). That must
    not copy the vector: `.tobytes()` did, 4 B/param, 400 MB at 100M parameters. The digest
    is unchanged: the sha256 of the same bytes."""
    import hashlib
    import tracemalloc

    from averaging.flat import tensor_digest

    theta = torch.randn(1_000_000)  # 4 MB
    tracemalloc.start()
    try:
        got = tensor_digest(theta)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == hashlib.sha256(theta.numpy().tobytes()).hexdigest()
    assert peak < 1_000_000, f"hashing a 4 MB vector allocated {peak / 1e6:.1f} MB"
