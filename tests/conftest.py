"""Shared helpers: start real swarm processes on 127.0.0.1 and always clean them up."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]

# Small, fast settings shared by process tests: 1 torch thread per process (2-core CI),
# a 2 MB slice of the stdlib corpus, and short timeouts so failures surface quickly.
FAST_PEER = [
    "--swarm.host", "127.0.0.1", "--train.threads", "1", "--data.max-bytes", "2000000",
    "--train.eval-batches", "4", "--sync.matchmaking-window", "20", "--sync.allreduce-timeout", "30",
]


class Procs:
    """Owns every process a test starts; kills leftovers at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[subprocess.Popen] = []

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = open(self.tmp / f"{name}.log", "wb")
        p = subprocess.Popen([PY, *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                             start_new_session=True)
        p.name, p.logfile = name, self.tmp / f"{name}.log"  # type: ignore[attr-defined]
        self.started.append(p)
        return p

    def bootstrap(self, name: str = "bootstrap", *extra: str, identity: Path | None = None) -> tuple[subprocess.Popen, str]:
        maddrs = self.tmp / f"{name}.maddrs"
        maddrs.unlink(missing_ok=True)
        p = self.spawn(name, ["-m", "bootstrap", "--identity", str(identity or self.tmp / f"{name}.key"), "--host", "127.0.0.1",
                              "--port", "0", "--monitor-every", "2", "--maddrs-file", str(maddrs),
                              "--ledger", str(self.tmp / f"{name}.ledger.json"), *extra])
        wait_for(lambda: maddrs.exists() and maddrs.read_text().strip(), 60, f"{name} to start", p)
        return p, maddrs.read_text().split()[0]

    def peer(self, name: str, join: str, *extra: str) -> subprocess.Popen:
        summary = self.tmp / f"{name}.json"
        return self.spawn(name, ["-m", "peer", "--join", join, *FAST_PEER, "--train.summary-file", str(summary), *extra])

    def log(self, p: subprocess.Popen) -> str:
        return p.logfile.read_text(errors="replace")  # type: ignore[attr-defined]

    def kill_all(self) -> None:
        for p in self.started:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Poll `cond` until truthy; fail with a clear message on timeout or if `proc` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}:\n"
                                 + proc.logfile.read_text(errors="replace")[-3000:])  # type: ignore[attr-defined]
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_exit(procs: Procs, p: subprocess.Popen, timeout: float) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{p.name} did not exit within {timeout}s:\n{procs.log(p)[-3000:]}")  # type: ignore[attr-defined]


def summary(procs: Procs, name: str) -> dict:
    return json.loads((procs.tmp / f"{name}.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def procs(tmp_path: Path):
    ps = Procs(tmp_path)
    try:
        yield ps
    finally:
        ps.kill_all()
