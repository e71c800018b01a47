"""The Python API: a custom torch.nn.Module trained by two in-process peers."""
from __future__ import annotations

import threading
import time

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


def _train_two(run_id: str, sync: SyncConfig, *, rounds: int, max_steps: int, same_init: bool,
               n: int = 2, step_delay: tuple[float, ...] = ()) -> dict[int, dict]:
    """`n` in-process peers train TinyRegressor on y = x·w (each its own data) until `rounds`;
    peer i sleeps step_delay[i] seconds after each step (a slower machine)."""
    boot = SwarmDHT.start(run_id, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        addr = boot.visible_maddrs()
        w_true = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
        x_val = torch.randn(256, 8, generator=torch.Generator().manual_seed(7))
        y_val = x_val @ w_true
        inits = [TinyRegressor().state_dict() for _ in range(n)]  # built here: torch's global RNG is not per thread
        results: dict[int, dict] = {}
        errors: list[BaseException] = []

        def train(i: int) -> None:
            try:
                model = TinyRegressor()
                model.load_state_dict(inits[0 if same_init else i])  # different inits: the swarm must reconcile them
                opt = torch.optim.Adam(model.parameters(), lr=3e-2)
                cfg = PeerConfig(swarm=SwarmConfig(run_id=run_id, initial_peers=addr, host="127.0.0.1"), sync=sync)
                gen = torch.Generator().manual_seed(100 + i)  # each peer its own data
                with Peer(model, opt, cfg) as peer:
                    peer.wait_for_peers(n, timeout=60)  # a first round without a late starter is not under test
                    theta0 = peer.state.theta_sync.clone()
                    loss0 = nn.functional.mse_loss(model(x_val), y_val).item()
                    while peer.round < rounds and peer.local_step < max_steps:
                        x = torch.randn(32, 8, generator=gen)
                        peer.step(nn.functional.mse_loss(model(x), x @ w_true), samples=len(x))
                        if i < len(step_delay):
                            time.sleep(step_delay[i])
                # read after close(): a round still in flight (overlap mode) has been applied by then
                results[i] = {
                    "round": peer.round, "digest": peer.digest, "loss0": loss0,
                    "loss": nn.functional.mse_loss(model(x_val), y_val).item(),
                    "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
                    "theta": peer.state.theta_sync.clone(), "theta0": theta0,
                    "groups": [len(r.members) for r in peer.history if r.ok],
                }
            except BaseException as e:  # surface thread failures in the test
                errors.append(e)

        threads = [threading.Thread(target=train, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=150)
        assert not errors, errors
        assert all(not t.is_alive() for t in threads)
        return results
    finally:
        boot.shutdown()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("compression", ["fp32", "int8"])
def test_two_api_peers_train_a_custom_model(compression):
    sync = SyncConfig(every_steps=20, matchmaking={"window": 20}, allreduce={"timeout": 30}, codec={"name": compression})
    a, b = _train_two("api-test", sync, rounds=6, max_steps=600, same_init=False).values()
    assert a["round"] == b["round"] >= 3  # both left after the same (last) round
    assert a["digest"] == b["digest"]
    assert (a["params"] - b["params"]).abs().max().item() <= 1e-6
    for r in (a, b):
        assert r["loss"] < 0.5 * r["loss0"], r


@pytest.mark.timeout(180)
def test_overlap_mode_trains_and_agrees():
    """With sync.overlap, rounds run in the background; peers still agree and the loss drops."""
    sync = SyncConfig(every_steps=20, overlap=True, matchmaking={"window": 20}, allreduce={"timeout": 30}, outer={"lr": 1.0, "momentum": 0.0})
    a, b = _train_two("overlap-test", sync, rounds=5, max_steps=800, same_init=True).values()
    assert a["round"] == b["round"] >= 4  # close() applied the round in flight on both
    assert a["digest"] == b["digest"] and torch.equal(a["theta"], b["theta"])  # bit-identical θ_sync
    assert a["loss"] < 0.5 * a["loss0"] and b["loss"] < 0.5 * b["loss0"]


@pytest.mark.timeout(180)
def test_overlapped_rounds_wait_for_a_slower_member_of_the_last_round():
    """With overlap, each peer applies a round at its own next sync point, so a slower peer's
    record shows the new state later than the others reach it. The leader expects the last
    round's members (while their records are fresh) instead of closing without the slow one:
    every round has all 3 peers. (Before, the two fast peers averaged alone from round 2 on.)"""
    sync = SyncConfig(every_steps=10, overlap=True, matchmaking={"window": 20}, allreduce={"timeout": 30}, outer={"lr": 1.0, "momentum": 0.0})
    res = _train_two("overlap-slow", sync, rounds=5, max_steps=800, same_init=True, n=3, step_delay=(0, 0, 0.1))
    assert len({r["digest"] for r in res.values()}) == 1
    for r in res.values():
        assert r["round"] >= 4 and r["groups"] and all(g == 3 for g in r["groups"]), r["groups"]


@pytest.mark.timeout(180)
def test_streaming_fragments_stay_in_agreement_and_each_round_moves_only_its_fragment():
    """sync.fragments 3: each round averages one third of the parameters (round r: fragment
    r mod 3) while training goes on; both peers end at the same θ_sync, every fragment was
    averaged, and the loss drops."""
    from averaging.codecs import partition
    sync = SyncConfig(every_steps=10, fragments=3, matchmaking={"window": 20}, allreduce={"timeout": 30}, outer={"lr": 1.0, "momentum": 0.0}, codec={"name": "sparse"})
    assert sync.overlap  # implied
    a, b = _train_two("stream-test", sync, rounds=7, max_steps=800, same_init=True).values()
    assert a["round"] == b["round"] >= 6
    assert a["digest"] == b["digest"] and torch.equal(a["theta"], b["theta"])  # bit-identical θ_sync
    assert a["loss"] < 0.5 * a["loss0"] and b["loss"] < 0.5 * b["loss0"]
    for lo, hi in partition(a["theta"].numel(), 3):  # every fragment moved away from the shared start
        assert not torch.equal(a["theta"][lo:hi], a["theta0"][lo:hi]), (lo, hi)


def test_a_fragment_round_changes_only_its_fragment():
    """The outer step of one fragment is the fragment's part of the whole-vector step, and
    leaves the rest of θ_sync and the momentum as they were."""
    from averaging.config import OuterConfig
    from averaging.outer import OuterOptimizer
    g = torch.Generator().manual_seed(3)
    theta, delta = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    whole = OuterOptimizer(theta, OuterConfig())
    whole.apply(delta.clone())
    frag = OuterOptimizer(theta, OuterConfig())
    for lo, hi in ((0, 300), (300, 1000)):
        before = frag.theta_sync.clone()
        frag.apply(delta[lo:hi].clone(), start=lo)
        outside = torch.ones(1000, dtype=torch.bool)
        outside[lo:hi] = False
        assert torch.equal(frag.theta_sync[outside], before[outside])
    assert torch.equal(frag.theta_sync, whole.theta_sync) and torch.equal(frag.momentum_buf, whole.momentum_buf)


def _own_listeners() -> set[str]:
    """Local addresses of the TCP sockets this process is listening on (from /proc)."""
    import os
    import re
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            m = re.match(r"socket:\[(\d+)\]", os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed while listing
            continue
        if m:
            inodes.add(m.group(1))
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # state LISTEN, owned by us
                    out.add(cols[1])
    return out


@pytest.mark.timeout(120)
def test_closed_peer_releases_its_listening_port():
    """An in-process Peer's store (matchmaking + state serving) stops listening at close(),
    not whenever the garbage collector runs: a program that creates Peers in a loop must not
    pile up open ports."""
    import gc
    gc.collect()
    before = _own_listeners()
    model = nn.Linear(4, 1)
    cfg = PeerConfig(swarm=SwarmConfig(run_id="release", host="127.0.0.1"),
                     sync=SyncConfig(every_steps=5, matchmaking={"window": 1}))
    gc.disable()  # prove it does not depend on a collection
    try:
        peer = Peer(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg)
        for _ in range(6):  # one (lone, failed) sync attempt uses the store
            x = torch.randn(8, 4)
            peer.step(nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)), samples=8)
        assert _own_listeners() - before, "the peer should be listening while it runs"
        peer.close()
        assert not _own_listeners() - before, "close() left a listening socket behind"
        assert peer.local_step == 6  # the closed Peer object is still usable for reading
    finally:
        gc.enable()


@pytest.mark.timeout(180)
def test_a_leaving_peer_is_not_waited_for_and_a_lone_peer_says_so_once(caplog):
    """B leaves cleanly: its record is withdrawn, so A's next attempt fails at once for lack of
    company (no matchmaking window spent waiting for B), and A, now alone for many attempts,
    says so in one line, naming the run id to check."""
    import logging

    from peer.api import NO_PEER
    from peer.membership import announced_peers, live_peers

    caplog.set_level(logging.INFO, logger="peer.api")
    boot = SwarmDHT.start("leaving", host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    b_left = threading.Event()
    after: list = []
    errors: list[BaseException] = []
    ids: dict = {}

    def train(name: str) -> None:
        try:
            model = TinyRegressor()
            cfg = PeerConfig(swarm=SwarmConfig(run_id="leaving", initial_peers=boot.visible_maddrs(), host="127.0.0.1"),
                             sync=SyncConfig(every_steps=5, matchmaking={"window": 15}, allreduce={"timeout": 30}))
            with Peer(model, torch.optim.SGD(model.parameters(), lr=0.01), cfg) as peer:
                ids[name] = peer.peer_id
                while peer.round < 2 and peer.local_step < 200:
                    x = torch.randn(8, 8)
                    peer.step(model(x).square().mean(), samples=8)
                if name == "A":
                    assert b_left.wait(60)
                    ids["logged"] = len(caplog.records)
                    while len(after) < 12:
                        x = torch.randn(8, 8)
                        r = peer.step(model(x).square().mean(), samples=8)
                        if r is not None:
                            after.append(r)
            if name == "B":
                b_left.set()
        except BaseException as e:  # surface thread failures in the test
            errors.append(e)
            b_left.set()

    threads = [threading.Thread(target=train, args=(n,)) for n in ("A", "B")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=150)
        assert not errors, errors
        records = announced_peers(boot)
        assert records[ids["B"]].role == "left" and ids["B"] not in live_peers(boot)
    finally:
        boot.shutdown()
    assert [r.error for r in after] == [NO_PEER] * 12 and all(r.members == (ids["A"],) for r in after)
    alone = [r.getMessage() for r in caplog.records[ids["logged"]:] if NO_PEER in r.getMessage()]
    assert len(alone) == 1, alone
    assert "no other peer is in run 'leaving' now" in alone[0] and "--swarm.run-id" in alone[0]


@pytest.mark.timeout(120)
def test_peer_addrs_let_another_peer_join_and_wait_for_peers_counts_them():
    """No bootstrap node: B joins through A's public `addrs`; both see each other with
    wait_for_peers; waiting for a third that never comes fails in one line after the timeout."""
    def make(initial: list[str]) -> Peer:
        model = TinyRegressor()
        cfg = PeerConfig(swarm=SwarmConfig(run_id="addrs", initial_peers=initial, host="127.0.0.1"),
                         sync=SyncConfig(every_steps=5))
        return Peer(model, torch.optim.SGD(model.parameters(), lr=0.01), cfg)

    with make([]) as a:
        assert a.addrs and all(m.startswith("/ip4/127.0.0.1/tcp/") and m.endswith("/p2p/" + a.peer_id) for m in a.addrs)
        with make(a.addrs) as b:
            assert b.wait_for_peers(2, timeout=30) == 2 and a.wait_for_peers(2, timeout=30) == 2
            with pytest.raises(TimeoutError, match=r"waited 1s for 3 peers in run 'addrs', saw 2"):
                a.wait_for_peers(3, timeout=1)
    assert a.addrs == []  # closed
