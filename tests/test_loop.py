"""The event loop a peer owns: its background work runs as named tasks on it, and closing it
cancels every task, even one in the middle of a matchmaking wait, and leaves no thread."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
import torch.nn as nn

from averaging.averager import Averager, AveragerConfig
from averaging.dht import SwarmDHT
from averaging.matchmaking import MatchmakingConfig
from peer import Peer
from peer.config import PeerConfig, SwarmConfig, SyncConfig
from peer.loop import PeerLoop


def _wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.timeout(30)
def test_close_cancels_every_task_and_stops_the_thread():
    loop = PeerLoop("t").start()
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()  # nothing ever sets it
        finally:
            ended.append(name)

    loop.spawn(forever("a"), "a")
    running = loop.submit(forever("b"), "b")
    assert loop.call(asyncio.sleep(0, result=7), "quick") == 7  # a plain call still works meanwhile
    loop.close()
    assert sorted(ended) == ["a", "b"], "a task was not cancelled (its finally did not run)"
    assert running.cancelled()
    assert not any(t.name == "swarmtrain-t-loop" for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="closed"):
        loop.submit(asyncio.sleep(0), "late")


@pytest.mark.timeout(30)
def test_call_from_the_loops_own_thread_is_refused_not_deadlocked():
    loop = PeerLoop("t").start()
    try:
        async def nested() -> None:
            loop.call(asyncio.sleep(0), "inner")

        with pytest.raises(RuntimeError, match="deadlock"):
            loop.call(nested(), "outer")
    finally:
        loop.close()


@pytest.mark.timeout(60)
def test_a_matchmaking_wait_is_cancelled_at_once():
    """A round waiting for peers that never come (window 120 s) ends as soon as its task is
    cancelled; with threads it could only be waited out."""
    dht = SwarmDHT.start("loop-cancel", host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    av = Averager(dht, AveragerConfig(listen_host="127.0.0.1", announce_host="127.0.0.1",
                                      matchmaking=MatchmakingConfig(window=120, min_group_size=2)))
    loop = PeerLoop("t").start()
    outcome: list[str] = []

    async def round_() -> None:
        try:
            await av.average_async(0, "fp", torch.zeros(10), 1.0, expected_size=lambda: 3)
            outcome.append("returned")
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    try:
        fut = loop.submit(round_(), "round 1")
        # Waiting for peers: its declaration is in the DHT.
        _wait_until(lambda: dht.get_signed("mm.fp.0"), 20, "the matchmaking declaration")
        fut.cancel()
        loop.close()  # returns once the task has ended (bounded): no matchmaking window to wait out
        assert outcome == ["cancelled"]
    finally:
        loop.close()
        av.close()
        dht.shutdown()


@pytest.mark.timeout(120)
def test_a_peers_background_work_runs_as_tasks_on_its_own_loop():
    before = {t.name for t in threading.enumerate()}
    model = nn.Linear(4, 1)
    cfg = PeerConfig(swarm=SwarmConfig(run_id="loop-tasks", host="127.0.0.1"),
                     sync=SyncConfig(every_steps=2, matchmaking={"window": 1}))
    with Peer(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg) as peer:
        for _ in range(2):
            x = torch.randn(8, 4)
            peer.step(nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)), samples=8)
        loop = peer._loop
        assert loop is not None
        tasks = loop.call(_task_names(), "list")
        assert {"announcer", "rediscovery", "state server"} <= tasks, tasks
        names = {t.name for t in threading.enumerate()} - before
        # No thread of its own for any background part: they are tasks on the loop's one thread.
        assert f"swarmtrain-{loop.name}-loop" in names
        # Blocking calls ran in the loop's executor (named after it); no other thread was started.
        assert all(n.startswith(f"swarmtrain-{loop.name}-") for n in names), names
        assert peer.stats().rounds_failed == 1  # the round ran (alone: "no other peer") on the loop
    assert not any(t.name == f"swarmtrain-{loop.name}-loop" for t in threading.enumerate())


async def _task_names() -> set[str]:
    return {t.get_name() for t in asyncio.all_tasks()}


@pytest.mark.timeout(120)
def test_delta_written_during_matchmaking_is_read_only_once_it_is_ready():
    """A peer computes Δ while it meets its group (issue 15: the pass over the model hides
    behind matchmaking). The all-reduce must not read the buffer before `ready` says it is
    written: here the buffer holds NaN until `ready` runs, so an early read would make the
    round fail (a non-finite contribution) or average garbage. And a peer that meets nobody
    never waits for it."""
    run = "ready-test"
    boot = SwarmDHT.start(run, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [SwarmDHT.start(run, initial_peers=boot.visible_maddrs()[:1], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            for _ in range(2)]
    cfg = AveragerConfig(listen_host="127.0.0.1", announce_host="127.0.0.1", matchmaking=MatchmakingConfig(window=30))
    avs = [Averager(d, cfg) for d in dhts]
    values = [torch.randn(50_000, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    bufs = [torch.full((50_000,), float("nan")) for _ in range(2)]
    readied: list[int] = []
    results = {}

    def go(i: int) -> None:
        async def ready() -> None:
            await asyncio.sleep(0)
            bufs[i].copy_(values[i])
            readied.append(i)

        results[i] = avs[i].average(0, "fp", bufs[i], float(i + 1), expected_size=lambda: 2,
                                    refill=lambda: bufs[i].copy_(values[i]), ready=ready)

    try:
        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert sorted(readied) == [0, 1]
        expected = (values[0] * 1 + values[1] * 2) / 3
        for i in range(2):
            assert results[i].status == "complete", results[i]
            assert torch.allclose(results[i].mean_delta, expected, atol=1e-6)
        assert torch.equal(results[0].mean_delta, results[1].mean_delta)

        # Alone: matchmaking fails, and `ready` is never awaited (the caller owns the writer).
        alone_cfg = AveragerConfig(listen_host="127.0.0.1", announce_host="127.0.0.1",
                                   matchmaking=MatchmakingConfig(window=1, min_group_size=2))
        alone = Averager(dhts[0], alone_cfg)
        called: list[bool] = []

        async def never() -> None:
            called.append(True)

        try:
            r = alone.average(1, "fp-alone", torch.zeros(10), 1.0, expected_size=lambda: 2, ready=never)
        finally:
            alone.close()
        assert r.status == "failed" and called == [], (r, called)
    finally:
        for a in avs:
            a.close()
        for d in [*dhts, boot]:
            d.shutdown()
