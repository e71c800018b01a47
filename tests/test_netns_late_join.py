"""A late joiner gets in however short the rounds: with a 3 s round period and a state download
of several seconds (a 3.7M-parameter model: 30 MB of θ_sync + momentum over a 100 Mbit/s link),
the joiner announces the state it is fetching, the swarm waits for it in its next round, and
it completes a round with the swarm within 2 round periods of its first download (before, each
download landed a round or two behind, and a joiner downloaded for ever without taking part)."""
from __future__ import annotations

import re

import pytest

from .conftest import FAST_PEER, NEEDS_NETNS, Wan, wait_for

pytestmark = NEEDS_NETNS

MODEL = ["--model.n-embd", "384", "--model.n-layer", "2", "--data.batch-size", "4",
         "--sync.every-steps", "0", "--sync.every-seconds", "3", "--sync.matchmaking.window", "10",
         "--sync.allreduce.timeout", "30"]


@pytest.mark.timeout(500)
def test_a_late_joiner_takes_part_in_the_round_after_its_download(procs):
    wan = Wan("swj", 4)
    try:
        maddrs = procs.tmp / "boot.maddrs"
        boot = procs.spawn("boot", ["-m", "bootstrap", "--identity", str(procs.tmp / "boot.key"), "--host", wan.addrs[0],
                                    "--port", "0", "--monitor-every", "5", "--maddrs-file", str(maddrs)], netns=wan.hosts[0])
        wait_for(lambda: maddrs.exists() and maddrs.read_text().strip(), 60, "the bootstrap node", boot)
        addr = maddrs.read_text().split()[0]

        def peer(i: int):
            return procs.spawn(f"p{i}", ["-m", "peer", "--join", addr, *FAST_PEER, "--swarm.host", wan.addrs[i], *MODEL],
                               netns=wan.hosts[i])

        a, b = peer(1), peer(2)
        for p in (a, b):
            wait_for(lambda p=p: "round 3 complete: 2 peers" in procs.log(p), 300, "3 rounds of the first two peers", p)
        late = peer(3)
        got = wait_for(lambda: re.search(r"continuing from round (\d+) \(downloaded", procs.log(late)), 200,
                       "the joiner's download", late)
        downloaded = int(got.group(1))
        first = wait_for(lambda: re.search(r"round (\d+) complete: (\d) peers", procs.log(late)), 60,
                         "the joiner's first round", late)
        assert int(first.group(1)) <= downloaded + 2, procs.log(late)[-3000:]  # within 2 round periods: no chase
        assert int(first.group(2)) == 3  # with both others
        # One download, and at most one more for the round that was under way during it; before,
        # a joiner downloaded once per round for minutes.
        assert len(re.findall(r"continuing from round", procs.log(late))) <= 2, procs.log(late)[-3000:]
    finally:
        procs.kill_all()
        wan.close()
