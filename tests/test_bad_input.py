"""Bad input ends in a clear one-line error, in bounded time, and harms no one."""
from __future__ import annotations

import signal
import subprocess
import time

import pytest

from .conftest import FAST_PEER, PY, REPO, free_port, wait_exit, wait_for

VALID_ID = "QmWH2338V6q5FLN3NsMADqYNozuKPRhJvZSiHCtxj3NZkt"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess, prog: str) -> str:
    lines = [l for l in proc.stderr.splitlines() if l.startswith(f"{prog}: error:")]
    assert len(lines) == 1, f"expected exactly one error line, stderr was:\n{proc.stderr}"
    return lines[0]


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[sync]\nevery_stepz = 10\n")
    p = run_cli("-m", "peer", "--config", str(cfg))
    assert p.returncode == 2
    line = error_line(p, "swarm-peer")
    assert "unknown config key 'sync.every_stepz'" in line and str(cfg) in line and "every_steps" in line


@pytest.mark.parametrize("flag, value", [("--train.eval-every-rounds", "0"), ("--train.eval-batches", "0")])
def test_evaluation_settings_must_be_positive(flag, value):
    p = run_cli("-m", "peer", flag, value)
    assert p.returncode == 2
    assert f"{flag.split('.')[1].replace('-', '_')} must be >= 1, got 0" in error_line(p, "swarm-peer")


def test_invalid_value_in_config(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[sync]\nouter_momentum = 1.5\n")
    p = run_cli("-m", "peer", "--config", str(cfg))
    assert p.returncode == 2
    assert "outer momentum must be in [0, 1)" in error_line(p, "swarm-peer")


@pytest.mark.parametrize("addr", ["not-a-multiaddr", "/ip4/127.0.0.1/tcp/31337", "/ip4/300.1.1.1/tcp/1/p2p/" + VALID_ID])
def test_invalid_multiaddr(addr):
    p = run_cli("-m", "peer", "--join", addr)
    assert p.returncode == 2
    assert f"invalid multiaddr '{addr}'" in error_line(p, "swarm-peer")


def test_unknown_flag():
    p = run_cli("-m", "peer", "--sync.bogus", "1")
    assert p.returncode == 2
    assert "unrecognized arguments: --sync.bogus" in error_line(p, "swarm-peer")


@pytest.mark.timeout(120)
def test_unreachable_bootstrap_fails_fast():
    addr = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{VALID_ID}"  # nothing listens there
    t0 = time.monotonic()
    p = run_cli("-m", "peer", "--join", addr, *FAST_PEER, "--swarm.startup-timeout", "20", timeout=90)
    assert p.returncode == 1
    assert "could not join the swarm through" in error_line(p, "swarm-peer")
    assert time.monotonic() - t0 < 90


@pytest.mark.timeout(300)
def test_model_mismatch_is_refused(procs):
    boot, addr = procs.bootstrap()
    good = procs.peer("good", addr, "--sync.every-steps", "5", "--checkpoint.dir", str(procs.tmp / "good"))
    wait_for(lambda: "joined run" in procs.log(good), 120, "the first peer to join", good)
    # A peer with a different architecture (n_embd 64 instead of 128) must be refused up front.
    bad = subprocess.run([PY, "-m", "peer", "--join", addr, *FAST_PEER, "--model.n-embd", "64"],
                         cwd=REPO, capture_output=True, text=True, timeout=180)
    assert bad.returncode == 1
    line = error_line(bad, "swarm-peer")
    assert "model does not match the swarm's" in line and "fingerprint" in line
    # The running peer is unharmed and leaves cleanly on SIGTERM.
    assert good.poll() is None
    good.send_signal(signal.SIGTERM)
    assert wait_exit(procs, good, 90) == 0, procs.log(good)[-2000:]
    assert "SUMMARY" in procs.log(good)
    boot.send_signal(signal.SIGTERM)
    assert wait_exit(procs, boot, 30) == 0


def test_bad_data_path(tmp_path):
    missing = tmp_path / "nope.txt"
    p = run_cli("-m", "peer", "--data.source", "text", "--data.paths", str(missing), "--swarm.host", "127.0.0.1")
    assert p.returncode != 0
    assert str(missing) in error_line(p, "swarm-peer")
