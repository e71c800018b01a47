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


# A child that sends itself a real SIGINT at the moment MODULE starts loading: Ctrl+C at
# that exact point of start-up, without guessing it with a sleep.
_CTRL_C_AT_IMPORT = """
import importlib.abc, os, signal, sys, runpy
MODULE, ENTRY = sys.argv[1], sys.argv[2]
class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == MODULE:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlC())
sys.argv = [ENTRY, *sys.argv[3:]]
runpy.run_module(ENTRY, run_name="__main__")
"""


@pytest.mark.parametrize("entry, args, line", [
    ("peer", ["--swarm.host", "127.0.0.1", "--train.threads", "1"], "swarm-peer: interrupted while starting; nothing to save"),
    ("bootstrap", ["--host", "127.0.0.1", "--port", "0"], "swarm-bootstrap: interrupted while starting"),
])
def test_ctrl_c_while_loading_is_one_line(tmp_path, entry, args, line):
    """Ctrl+C while torch and hivemind load (the first seconds of a start): one line, no traceback."""
    p = subprocess.run([PY, "-c", _CTRL_C_AT_IMPORT, "torch", entry, *args, "--identity" if entry == "bootstrap" else
                        "--swarm.identity-path", str(tmp_path / "k.key")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 130, p.stdout + p.stderr
    assert p.stderr.strip().splitlines()[-1] == line and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "k.key").exists()  # it stopped before joining anything


@pytest.mark.parametrize("entry", ["peer.cli", "bootstrap.cli"])
def test_help_and_flag_errors_load_neither_torch_nor_hivemind(entry):
    """`--help` and a bad flag are answered from the config classes alone (swarm-peer --help took 3.3 s)."""
    code = (f"import sys\nfrom {entry} import main\nfor argv in (['--help'], ['--no-such-flag']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'hivemind', 'numpy') if m in sys.modules))")
    p = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout[-2000:] + p.stderr[-2000:]
    assert "usage:" in p.stdout and "error: unrecognized arguments: --no-such-flag" in p.stderr
