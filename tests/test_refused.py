"""A peer the run refuses is told so: a private run's nodes reject an outsider's records, and
the outsider ends within a bounded time with one line naming the likely cause and the flag,
instead of "joining", seeing nobody and training alone for ever."""
from __future__ import annotations

import pytest

from .conftest import FAST_PEER
from .test_bad_input import error_line, run_cli

pytestmark = pytest.mark.timeout(240)


def _outsider(join: str, *flags: str):
    return run_cli("-m", "peer", "--join", join, *FAST_PEER, "--data.max-bytes", "200000", "--train.max-steps", "400",
                   "--sync.every-steps", "10", *flags, timeout=150)


def test_a_wrong_or_missing_secret_ends_the_peer_with_one_line(procs, tmp_path):
    good, wrong = tmp_path / "run.secret", tmp_path / "other.secret"
    good.write_text("ab" * 32 + "\n")
    wrong.write_text("cd" * 32 + "\n")
    _, addr = procs.bootstrap("boot", "--secret-file", str(good))
    p = _outsider(addr, "--swarm.secret-file", str(wrong))
    assert p.returncode == 1, p.stderr[-3000:]
    line = error_line(p, "swarm-peer")
    assert "refused this peer's records" in line and f"--swarm.secret-file {wrong}" in line
    p = _outsider(addr)
    assert p.returncode == 1, p.stderr[-3000:]
    line = error_line(p, "swarm-peer")
    assert "private run and this peer has no credential" in line and "--swarm.secret-file" in line


def test_a_key_that_is_not_on_the_runs_allowlist_ends_the_peer_with_one_line(procs, tmp_path):
    # The run lists one member; the outsider has its own key and a list naming only itself.
    ids = {}
    for name in ("member", "outsider"):
        p = run_cli("-m", "bootstrap", "keygen", "--identity", str(tmp_path / f"{name}.key"), timeout=60)
        assert p.returncode == 0, p.stderr
        ids[name] = p.stdout.strip()
    (tmp_path / "run.allow").write_text(ids["member"] + "\n")
    (tmp_path / "mine.allow").write_text(ids["outsider"] + "\n")
    _, addr = procs.bootstrap("boot", "--allowlist-file", str(tmp_path / "run.allow"))
    p = _outsider(addr, "--swarm.identity-path", str(tmp_path / "outsider.key"),
                  "--swarm.allowlist-file", str(tmp_path / "mine.allow"))
    assert p.returncode == 1, p.stderr[-3000:]
    line = error_line(p, "swarm-peer")
    assert "refused this peer's records" in line and ids["outsider"] in line and "allowlist" in line
