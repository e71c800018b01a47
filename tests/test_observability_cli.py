"""The CLI side of observability: log formats, `swarm-peer status`, and bad input to the
dashboard / ledger / trackers, each ending in one clear line without harming saved files."""
from __future__ import annotations

import importlib.util
import json
import socket

import pytest

from .conftest import FAST_PEER, free_port
from .test_bad_input import VALID_ID, error_line, run_cli

pytestmark = pytest.mark.timeout(180)


def test_json_log_format_makes_every_line_machine_readable(tmp_path):
    # A lone peer (nobody to sync with) trains 12 steps and leaves; every output line is JSON.
    p = run_cli("-m", "peer", *FAST_PEER, "--log-format", "json", "--train.max-steps", "12", "--log.every-steps", "4",
                "--sync.every-steps", "100", "--data.max-bytes", "200000", "--model.n-layer", "1", timeout=150)
    assert p.returncode == 0, p.stderr[-3000:]
    out = [line for line in p.stdout.splitlines() if line.strip()]
    assert out[-1].startswith("SUMMARY ")
    progress = [json.loads(line) for line in out[:-1]]
    assert {4, 8, 12} <= {e["step"] for e in progress if e["event"] == "progress"}
    assert all({"loss", "samples_per_s", "round", "peers_seen"} <= e.keys() for e in progress)
    logs = [json.loads(line) for line in p.stderr.splitlines() if line.strip()]  # raises if any line is not JSON
    assert any("joined run" in e["msg"] for e in logs)


def test_missing_tracker_package_is_one_line(tmp_path):
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    p = run_cli("-m", "peer", *FAST_PEER, "--log.tensorboard-dir", str(tmp_path / "tb"), timeout=60)
    assert p.returncode == 1
    assert "needs the tensorboard package: pip install tensorboard" in error_line(p, "swarm-peer")


def test_status_rejects_a_bad_address_and_fails_fast_on_an_unreachable_one():
    p = run_cli("-m", "peer", "status", "--join", "nonsense", timeout=30)
    assert p.returncode == 2 and "invalid multiaddr 'nonsense'" in error_line(p, "swarm-peer status")
    p = run_cli("-m", "peer", "status", "--join", f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{VALID_ID}", timeout=90)
    assert p.returncode == 1 and "could not join the swarm" in error_line(p, "swarm-peer status")
    p = run_cli("-m", "peer", "status", timeout=30)
    assert p.returncode == 2 and "--join" in p.stderr


@pytest.mark.parametrize("flag,value,msg", [
    ("--dashboard", "70000", "dashboard must be a port"),
    ("--dashboard", "-5", "dashboard must be a port"),
    ("--poll-every", "0", "poll_every must be > 0"),
])
def test_bootstrap_rejects_bad_dashboard_flags(flag, value, msg):
    p = run_cli("-m", "bootstrap", flag, value, timeout=60)
    assert p.returncode == 2 and msg in error_line(p, "swarm-bootstrap")


def test_dashboard_port_in_use_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        p = run_cli("-m", "bootstrap", "--identity", str(tmp_path / "k"), "--host", "127.0.0.1", "--port", "0",
                    "--dashboard", str(port), "--ledger", str(tmp_path / "l.json"), timeout=90)
    assert p.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in error_line(p, "swarm-bootstrap")
    # Nothing else alarming: the failed start is cleaned up quietly (it once logged a traceback).
    assert "ERROR" not in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_damaged_ledger_stops_the_bootstrap_and_is_kept(tmp_path):
    ledger = tmp_path / "ledger.json"
    ledger.write_text('{"format": "swarmtrain-ledger-v1", "peers": [')
    p = run_cli("-m", "bootstrap", "--identity", str(tmp_path / "k"), "--host", "127.0.0.1", "--port", "0",
                "--ledger", str(ledger), timeout=60)
    assert p.returncode == 1
    assert f"ledger {ledger} is unreadable" in error_line(p, "swarm-bootstrap")
    assert ledger.read_text() == '{"format": "swarmtrain-ledger-v1", "peers": ['


def test_exit_summary_for_a_terminal_is_readable_lines():
    """On a terminal the exit summary is a few lines a person reads, not a 1,100-character JSON line."""
    from peer.cli import format_summary

    s = {"peer_id": "QmPeerPeerPeer", "rounds": 8, "rounds_failed": 1, "steps": 212, "samples": 3392,
         "val_loss_start": 5.5512, "val_loss_final": 2.4071, "val_loss_by_round": [[0, 5.55], [8, 2.41]] * 40,
         "val_loss_by_samples": [[0, 5.55]] * 40, "digest": "ab" * 32, "bytes_sent": 3_500_000, "wall_s": 95.3,
         "sync_wait_s": 6.2, "compute_utilization": 0.9312, "interrupted": False}
    text = format_summary(s, "my-run")
    lines = text.splitlines()
    assert 3 <= len(lines) <= 6 and max(map(len, lines)) <= 120 and "{" not in text
    assert lines[0] == "swarm-peer: finished in run 'my-run' after 8 rounds (1 failed), 212 steps, 3,392 samples, 95 s"
    assert "5.5512 -> 2.4071" in text and "93.1 %" in text and "3.5 MB" in text and "QmPeerPeerPeer" in text
