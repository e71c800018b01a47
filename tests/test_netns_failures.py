"""Over emulated WAN links (network namespaces, tc tbf 100 Mbit/s): a peer killed in the middle
of the transfer makes the round fail on every survivor, within a bounded time, with their
tensors unchanged. Needs root and iproute2 (present in CI, which runs as root)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from .conftest import NEEDS_NETNS, PY, REPO, Wan

PREFIX = "swt"  # distinct from the benchmark's "swb" namespaces
N = 3
pytestmark = NEEDS_NETNS


@pytest.fixture
def wan():
    """N hosts 198.18.1.(i+1) behind a bridge, both directions of each link shaped to 100 Mbit/s."""
    w = Wan(PREFIX, N)
    try:
        yield w.hosts
    finally:
        w.close()


def run_workers(wan, numel: int, timeout: float, victim_dies_after: float | None):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "PYTHONPATH": str(REPO)}
    procs = []
    for i, ns in enumerate(wan):
        die = [str(victim_dies_after)] if victim_dies_after is not None and i == N - 1 else []
        args = ["ip", "netns", "exec", ns, PY, "-m", "tests.ns_worker", str(i), str(N), "198.18.1.1",
                f"198.18.1.{i + 1}", str(numel), str(timeout), *die]
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    results = []
    for i, (out, err) in enumerate(outs):
        lines = [l for l in out.splitlines() if l.startswith("{")]
        results.append(json.loads(lines[-1]) if lines else {"rc": procs[i].returncode, "stderr": err[-2000:]})
    return procs, results


@pytest.mark.timeout(180)
def test_healthy_round_over_shaped_links_completes(wan):
    procs, results = run_workers(wan, 2_500_000, 20.0, None)  # 10 MB
    assert all(r.get("status") == "complete" and r["mean_ok"] for r in results), results


@pytest.mark.timeout(180)
def test_peer_killed_mid_transfer_fails_round_on_all_survivors(wan):
    numel, timeout = 10_000_000, 20.0  # 40 MB: about 4.5 s at 100 Mbit/s for 3 peers
    procs, results = run_workers(wan, numel, timeout, victim_dies_after=1.5)
    assert procs[-1].returncode == -9  # the victim died mid-transfer
    for i, r in enumerate(results[:-1]):
        assert "status" in r, f"survivor {i} printed no result: {r}"
        assert r["status"] == "failed", r  # never a partial average reported as complete
        assert r["unchanged"], r
        assert r["elapsed"] < 2 * timeout + 5, r
