"""The asyncio API: `async with AsyncPeer(...) as peer: await peer.step(loss, samples=n)`.
Two AsyncPeers share one event loop and train to agreement; cancelling a peer's task leaves
no thread, process or listening port behind."""
from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from averaging.dht import SwarmDHT
from peer import AsyncPeer, PeerConfig, SwarmConfig, SyncConfig

from .test_api import TinyRegressor, _own_listeners


def _children() -> set[int]:
    """Live (non-zombie) child processes of this process, from /proc."""
    me, out = str(os.getpid()), set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me and fields[0] != "Z":
                out.add(int(d.name))
    return out


async def _train(cfg: PeerConfig, seed: int, rounds: int, init: dict) -> dict:
    model = TinyRegressor()
    model.load_state_dict(init)
    w_true = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    async with AsyncPeer(model, torch.optim.Adam(model.parameters(), lr=3e-2), cfg) as peer:
        await peer.wait_for_peers(2, timeout=60)
        while peer.round < rounds and peer.stats().local_step < 600:
            x = torch.randn(32, 8, generator=gen)
            await peer.step(nn.functional.mse_loss(model(x), x @ w_true), samples=len(x))
        return {"round": peer.round, "digest": peer.digest, "stats": peer.stats()}


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_two_async_peers_train_to_agreement_on_one_event_loop():
    boot = SwarmDHT.start("aio", host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        cfg = PeerConfig(swarm=SwarmConfig(run_id="aio", initial_peers=boot.visible_maddrs(), host="127.0.0.1"),
                         sync=SyncConfig(every_steps=10, matchmaking={"window": 15}, allreduce={"timeout": 30}))
        init = TinyRegressor().state_dict()
        ticks = 0

        async def heartbeat() -> None:  # proves the loop stays free while peers are in matchmaking/all-reduce
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        hb = asyncio.create_task(heartbeat())
        a, b = await asyncio.gather(_train(cfg, 1, 3, init), _train(cfg, 2, 3, init))
        hb.cancel()
    finally:
        boot.shutdown()
    assert a["round"] == b["round"] >= 3 and a["digest"] == b["digest"], (a, b)
    assert a["stats"].rounds_ok >= 3 and a["stats"].samples_discarded == 0
    assert ticks > 20, "the event loop was blocked"


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_cancelling_a_peers_task_leaves_no_thread_process_or_port():
    cfg = PeerConfig(swarm=SwarmConfig(run_id="aio-cancel", host="127.0.0.1"),
                     sync=SyncConfig(every_steps=3, matchmaking={"window": 2}, allreduce={"timeout": 10}))
    syncing = asyncio.Event()

    async def forever() -> None:
        model = nn.Linear(4, 1)
        async with AsyncPeer(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg) as peer:
            while True:
                x = torch.randn(8, 4)
                if await peer.step(nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)), samples=8) is not None:
                    syncing.set()

    async def one_cycle() -> None:
        syncing.clear()
        task = asyncio.create_task(forever())
        await asyncio.wait_for(syncing.wait(), 60)  # it is up, listening, and has synced (alone)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    await one_cycle()  # warm-up: module-level helpers (gloo reaper, hivemind's pipe readers) start once
    threads, children, ports = set(threading.enumerate()), _children(), _own_listeners()
    await one_cycle()
    leftover = [t.name for t in set(threading.enumerate()) - threads]
    assert not leftover, f"threads left behind: {leftover}"
    assert _children() <= children, "a child process (the DHT) was left behind"
    assert not _own_listeners() - ports, "a listening port was left behind"


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_the_documented_async_example(capsys):
    """docs/python-api.md's AsyncPeer example, as written (host="127.0.0.1" added), twice on one loop."""
    from .test_docs import _python_blocks

    script = next(t for t in _python_blocks("docs/python-api.md") if "AsyncPeer(" in t)
    old = "SwarmConfig(initial_peers=[addr])"
    assert old in script
    ns: dict = {}
    exec(compile(script.replace(old, 'SwarmConfig(initial_peers=[addr], host="127.0.0.1")'), "python-api.md", "exec"), ns)
    boot = SwarmDHT.start("swarmtrain-demo", host_maddrs=["/ip4/127.0.0.1/tcp/0"])  # the default run id
    try:
        addr = boot.visible_maddrs()[0]
        await asyncio.gather(ns["main"](addr), ns["main"](addr))
    finally:
        boot.shutdown()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("PeerStats(")]
    assert len(printed) == 2 and all("round=5," in line and "samples_discarded=0," in line for line in printed), printed
