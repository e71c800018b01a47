"""Chaos over emulated links: random SIGKILLs with --resume restarts, a SIGKILLed and restarted
bootstrap node, and one peer's link cut for 20 s. No NaN, every live peer agrees at the end,
the cut peer averages with the others again, the loss stays close to the undisturbed run, no hang.

Every host is a network namespace (tests/conftest.py `Wan`): a link cut needs one."""
from __future__ import annotations

import random
import re
import signal
import time

import pytest
import torch

from peer.state import CheckpointDir
from .conftest import NEEDS_NETNS, Wan, summary, wait_exit, wait_for

pytestmark = NEEDS_NETNS

PEERS, ROUNDS, H = 4, 14, 20
KILL_AT_ROUNDS = (2, 8, 11)  # the driver SIGKILLs one random peer when the swarm reaches each of these
CUT_AT = 4  # ... cuts another peer's link for CUT_S seconds here
CUT_S = 20
BOOT_RESTART_AT = 9  # ... and SIGKILLs the bootstrap node (archivist), restarting it with the same identity and port
BOOT_PORT = 41000  # the host is a fresh namespace: any port is free there


def rounds_of(procs, names) -> list[int]:
    return [int(r) for n in names for r in re.findall(r"round (\d+) complete", procs.log(procs.by_name[n]))]


def run_swarm(procs, wan: Wan, tag: str, chaos: bool) -> dict:
    # The bootstrap node archives the swarm's state: a peer restarted after the others have
    # finished can still catch up from it.
    boot_args = ["--checkpoint-dir", str(procs.tmp / f"{tag}-archive"), "--archive-every", "1", "--port", str(BOOT_PORT)]
    boot_key = procs.tmp / f"{tag}-boot.key"
    boot, addr = procs.bootstrap(f"{tag}-boot", *boot_args, identity=boot_key, host=wan.addrs[0], netns=wan.hosts[0])
    procs.by_name = getattr(procs, "by_name", {})
    args = ["--sync.every-steps", str(H), "--train.max-rounds", str(ROUNDS), "--train.seed", "0",
            "--train.max-steps", "2000", "--sync.matchmaking.window", "10", "--sync.allreduce.timeout", "10"]

    def start(i: int, resume: bool = False, k: int = 0) -> str:
        name = f"{tag}{i}" + (f"-r{k}" if k else "")
        procs.by_name[name] = procs.peer(name, addr, *args, "--checkpoint.dir", str(procs.tmp / f"{tag}{i}-ckpt"),
                                         *(["--resume"] if resume else []), host=wan.addrs[1 + i], netns=wan.hosts[1 + i])
        return name

    current = {i: start(i) for i in range(PEERS)}
    events, cut = [], None
    if chaos:
        rng = random.Random(1234)
        for at in sorted({*KILL_AT_ROUNDS, CUT_AT, BOOT_RESTART_AT}):
            wait_for(lambda: max(rounds_of(procs, current.values()), default=0) >= at, 240, f"round {at}")
            if at == CUT_AT:
                j = rng.randrange(PEERS)
                wan.cut(1 + j)
                time.sleep(CUT_S)  # the fault itself: the link is down for CUT_S seconds
                wan.restore(1 + j)
                cut = (current[j], len(procs.log(procs.by_name[current[j]])))
                events.append((at, f"link cut {current[j]}"))
            if at == BOOT_RESTART_AT:  # the entry point crashes and comes back at the same address
                boot.send_signal(signal.SIGKILL)
                boot.wait(timeout=30)
                boot, addr2 = procs.bootstrap(f"{tag}-boot-r", *boot_args, identity=boot_key, host=wan.addrs[0],
                                              netns=wan.hosts[0])
                assert addr2 == addr
                events.append((at, f"SIGKILL {tag}-boot"))
            if at in KILL_AT_ROUNDS:  # never the cut peer: its own recovery is what the cut tests
                i = rng.choice([k for k in range(PEERS) if cut is None or current[k] != cut[0]])
                victim = procs.by_name[current[i]]
                victim.send_signal(signal.SIGKILL)
                victim.wait(timeout=30)
                events.append((at, f"SIGKILL {current[i]}"))
                time.sleep(1.0)
                current[i] = start(i, resume=True, k=len(events))
    for name in current.values():
        p = procs.by_name[name]
        assert wait_exit(procs, p, 300) == 0, procs.log(p)[-3000:]
    boot.send_signal(signal.SIGTERM)
    wait_exit(procs, boot, 30)
    sums = {n: summary(procs, n) for n in current.values()}
    return {"sums": sums, "events": events, "cut": cut, "ckpt": [procs.tmp / f"{tag}{i}-ckpt" for i in range(PEERS)]}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_kills_bootstrap_restart_and_link_cut(procs, capsys):
    wan = Wan("chs", 1 + PEERS)
    try:
        calm = run_swarm(procs, wan, "calm", chaos=False)
        wild = run_swarm(procs, wan, "wild", chaos=True)
    finally:
        procs.kill_all()
        wan.close()
    assert len(wild["events"]) == len(KILL_AT_ROUNDS) + 2  # + the bootstrap node + the link cut
    for run in (calm, wild):
        sums = run["sums"]
        assert all(s["rounds"] == ROUNDS for s in sums.values()), sums
        assert len({s["digest"] for s in sums.values()}) == 1, "live peers disagree after the last round"
        for d in run["ckpt"]:
            for f in d.glob("ckpt-r*.safetensors"):
                assert torch.isfinite(CheckpointDir.load(f, fingerprint=None, numel=None).theta_sync).all(), f
    # The cut peer averaged with others again after its link came back (unless it was killed
    # later, in which case its successor did, which the rounds/digest checks above cover).
    name, offset = wild["cut"]
    after = [int(n) for n in re.findall(r"round \d+ complete: (\d+) peers", procs.log(procs.by_name[name])[offset:])]
    assert any(n >= 2 for n in after), f"{name} never averaged with another peer after its link came back"
    calm_loss = next(iter(calm["sums"].values()))["val_loss_final"]
    wild_loss = next(iter(wild["sums"].values()))["val_loss_final"]
    with capsys.disabled():
        print(f"\nchaos: undisturbed final val loss {calm_loss:.4f}, disturbed {wild_loss:.4f} "
              f"({(wild_loss / calm_loss - 1) * 100:+.1f}%); events: {wild['events']}")
    assert wild_loss <= calm_loss * 1.10
