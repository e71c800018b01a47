"""SIGTERM or SIGINT to a node's whole process group (what `timeout`, `kill -TERM -PGID`, a
terminal's Ctrl+C and systemd's default KillMode=control-group send) stops it within
seconds, and nothing of it is left running."""
from __future__ import annotations

import os
import signal

import psutil
import pytest

from .conftest import wait_exit, wait_for


@pytest.mark.timeout(240)
def test_sigterm_to_the_process_group_stops_bootstrap_and_peer(procs):
    """SIGTERM, as `timeout`, `kill -TERM -PGID` and systemd send it (a terminal's Ctrl+C, SIGINT to
    the group, is tested in test_bootstrap.py and test_bad_input.py)."""
    sig = signal.SIGTERM
    boot, addr = procs.bootstrap()
    peer = procs.peer("peer", addr, "--sync.every-steps", "10")
    wait_for(lambda: "joined run" in procs.log(peer), 120, "the peer to join", peer)
    for p in (peer, boot):  # the peer first: it hands off and leaves through the bootstrap node
        family = psutil.Process(p.pid).children(recursive=True)
        os.killpg(p.pid, sig)
        assert wait_exit(procs, p, 10) == 0, procs.log(p)[-3000:]
        _, alive = psutil.wait_procs(family, timeout=5)
        assert not alive, alive
