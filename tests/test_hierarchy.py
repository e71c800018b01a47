"""More peers than one group holds: a round of n > max_group_size members reduces in subgroups
and still ends with one θ_sync. Pure gloo (threads on 127.0.0.1) for the maths; real Peers
for "everyone at the round averages, nobody is left out for lack of room"."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from averaging.allreduce import weighted_allreduce
from averaging.dht import SwarmDHT
from averaging.hierarchy import hierarchical_allreduce, subgroups
from averaging.matchmaking import Group
from peer import Peer, PeerConfig, SwarmConfig, SyncConfig

from .conftest import run_peers
from .test_codecs import _run_group


def test_subgroups_cover_every_rank_in_near_equal_groups_of_at_most_cap():
    for n in range(2, 40):
        for cap in range(2, 9):
            spans = subgroups(n, cap)
            sizes = [e - s for s, e in spans]
            assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(sizes) <= cap and max(sizes) - min(sizes) <= 1, (n, cap, spans)
    with pytest.raises(ValueError):
        subgroups(4, 1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n,cap,codec", [(7, 3, "fp32"), (5, 2, "int8")])
def test_subgroups_combine_into_the_exact_weighted_mean_everyone_agrees_on(n, cap, codec):
    P = 5_000
    xs = [torch.randn(P, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    ws = [float(i + 1) for i in range(n)]
    truth = sum(w * x for w, x in zip(ws, xs)) / sum(ws)
    before = [x.clone() for x in xs]

    def fn(store, rank):
        g = Group(0, tuple(f"p{i}" for i in range(n)), rank, "h/0/", store)
        return hierarchical_allreduce(g, xs[rank], ws[rank], cap=cap, host="127.0.0.1", timeout_s=30, codec=codec)

    res = _run_group(n, fn)
    assert all(r.ok for r in res), [r.error for r in res]
    for r in res:
        assert torch.equal(r.mean_delta, res[0].mean_delta), "members disagree"
        assert r.weights == tuple(ws) and len(r.members) == n
    tol = 1e-6 if codec == "fp32" else 3e-2
    assert (res[0].mean_delta - truth).abs().max().item() <= tol
    assert all(torch.equal(a, b) for a, b in zip(xs, before)), "the caller's tensors were modified"
    if codec == "fp32":  # the same answer as one flat group, to fp32 rounding
        flat = _run_group(n, lambda store, rank: weighted_allreduce(
            Group(0, tuple(f"p{i}" for i in range(n)), rank, "f/0/", store), xs[rank], ws[rank], host="127.0.0.1",
            timeout_s=30))
        assert torch.allclose(flat[0].mean_delta, res[0].mean_delta, atol=1e-6)


@pytest.mark.timeout(120)
def test_a_failed_subgroup_fails_the_round_for_everyone():
    """Honest: one subgroup's failure (here a member whose weight is invalid is dropped, so that
    member's own round fails, and a member that never arrives fails its subgroup) means no
    member of any subgroup reports `complete` with a partial combination."""
    n, cap, P = 5, 2, 1000
    xs = [torch.randn(P) for _ in range(n)]

    def fn(store, rank):
        if rank == 4:  # the last subgroup is {3, 4}: rank 4 never shows up
            return None
        g = Group(0, tuple(f"p{i}" for i in range(n)), rank, "x/0/", store)
        return hierarchical_allreduce(g, xs[rank], 1.0, cap=cap, host="127.0.0.1", timeout_s=1.5)

    res = _run_group(n, fn)
    assert all(r is not None and not r.ok and r.mean_delta is None for r in res[:4]), [r and r.error for r in res]


@pytest.mark.timeout(240)
def test_more_peers_than_the_cap_all_average_in_one_round_and_agree():
    n, rounds = 5, 3
    boot = SwarmDHT.start("hier", host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        addr = boot.visible_maddrs()
        init = nn.Linear(4, 1).state_dict()
        out: dict[int, tuple] = {}
        started = threading.Barrier(n, timeout=90)

        def train(i: int) -> None:
            model = nn.Linear(4, 1)
            model.load_state_dict(init)
            cfg = PeerConfig(swarm=SwarmConfig(run_id="hier", initial_peers=addr, host="127.0.0.1"),
                             sync=SyncConfig(every_steps=5, matchmaking={"max_group_size": 2, "window": 20}, allreduce={"timeout": 20}))
            gen = torch.Generator().manual_seed(i)
            with Peer(model, torch.optim.SGD(model.parameters(), lr=0.05), cfg) as peer:
                started.wait()
                while peer.round < rounds and peer.local_step < 200:
                    x = torch.randn(8, 4, generator=gen)
                    peer.step(nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)), samples=len(x))
            out[i] = (peer.round, peer.digest, [len(r.members) for r in peer.history if r.ok], peer.samples_discarded)

        run_peers(n, train)
    finally:
        boot.shutdown()
    assert len({(r, d) for r, d, _, _ in out.values()}) == 1, out
    # Every completed round had all 5 (3 subgroups of at most 2): nobody was left out for lack of room.
    assert all(sizes and all(s == n for s in sizes) for _, _, sizes, _ in out.values()), out
    assert all(discarded == 0 for *_, discarded in out.values())
