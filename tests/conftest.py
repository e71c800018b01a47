"""Shared helpers: start real swarm processes on 127.0.0.1 and always clean them up."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]

# Small, fast settings shared by process tests: 1 torch thread per process (2-core CI),
# a 2 MB slice of the stdlib corpus, and short timeouts so failures surface quickly.
FAST_PEER = [
    "--swarm.host", "127.0.0.1", "--train.threads", "1", "--data.max-bytes", "2000000",
    "--train.eval-batches", "4", "--sync.matchmaking.window", "20", "--sync.allreduce.timeout", "30",
]


class Procs:
    """Owns every process a test starts; kills leftovers at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[subprocess.Popen] = []

    def spawn(self, name: str, args: list[str], *, netns: str | None = None) -> subprocess.Popen:
        """`python ARGS` in its own process group (in network namespace `netns` if given)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [PY, *args]
        if netns is not None:  # gloo must use the namespace's link, not its loopback
            cmd, env = ["ip", "netns", "exec", netns, *cmd], {**env, "GLOO_SOCKET_IFNAME": "eth0"}
        log = open(self.tmp / f"{name}.log", "wb")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        p.name, p.logfile = name, self.tmp / f"{name}.log"  # type: ignore[attr-defined]
        self.started.append(p)
        return p

    def bootstrap(self, name: str = "bootstrap", *extra: str, identity: Path | None = None, host: str = "127.0.0.1",
                  netns: str | None = None) -> tuple[subprocess.Popen, str]:
        maddrs = self.tmp / f"{name}.maddrs"
        maddrs.unlink(missing_ok=True)
        p = self.spawn(name, ["-m", "bootstrap", "--identity", str(identity or self.tmp / f"{name}.key"), "--host", host,
                              "--port", "0", "--monitor-every", "2", "--maddrs-file", str(maddrs),
                              "--ledger", str(self.tmp / f"{name}.ledger.json"), *extra], netns=netns)
        wait_for(lambda: maddrs.exists() and maddrs.read_text().strip(), 60, f"{name} to start", p)
        return p, maddrs.read_text().split()[0]

    def peer(self, name: str, join: str, *extra: str, host: str = "127.0.0.1", netns: str | None = None) -> subprocess.Popen:
        summary = self.tmp / f"{name}.json"
        return self.spawn(name, ["-m", "peer", "--join", join, *FAST_PEER, "--swarm.host", host,
                                 "--train.summary-file", str(summary), *extra], netns=netns)

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
    tail = "" if proc is None else ":\n" + proc.logfile.read_text(errors="replace")[-3000:]  # type: ignore[attr-defined]
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{tail}")


def run_peers(n: int, train, timeout: float = 200.0) -> None:
    """Run train(i) for i in range(n), each in its own thread (in-process peers); re-raise
    the first failure, and fail if any is still running after `timeout` seconds."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            train(i)
        except BaseException as e:  # surfaced in the test's thread below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,), name=f"peer{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    if errors:
        raise errors[0]
    assert all(not t.is_alive() for t in threads), f"a peer thread did not finish within {timeout}s"


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


NEEDS_NETNS = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
                                 reason="needs root, ip and tc (network namespaces)")


class Wan:
    """`n` emulated hosts in network namespaces <prefix>0.. behind one bridge (namespace
    <prefix>sw), host i at 198.18.1.(i+1)/24 on its eth0, both directions of every link
    shaped with tc tbf (this kernel has no netem: no delay). Only 198.18.0.0/15 (RFC 2544)
    is used, and nothing is created in the caller's namespace. `cut(i)` / `restore(i)` take
    host i's link down and up; `close()` deletes every namespace of the prefix."""

    def __init__(self, prefix: str, n: int, rate: str = "100mbit") -> None:
        self.prefix, self.n = prefix, n
        self.hosts = [f"{prefix}{i}" for i in range(n)]
        self.addrs = [f"198.18.1.{i + 1}" for i in range(n)]
        self.close()
        sw = f"{prefix}sw"
        try:
            _sh("ip", "netns", "add", sw)
            _sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", sw, "link", "set", "br0", "up")
            for i, ns in enumerate(self.hosts):
                _sh("ip", "netns", "add", ns)
                _sh("ip", "-n", sw, "link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                _sh("ip", "-n", sw, "link", "set", f"h{i}", "master", "br0", "up")
                _sh("ip", "-n", ns, "addr", "add", f"{self.addrs[i]}/24", "dev", "eth0")
                _sh("ip", "-n", ns, "link", "set", "eth0", "up")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
                for where, dev in ((ns, "eth0"), (sw, f"h{i}")):
                    _sh("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                        "rate", rate, "burst", "256kb", "latency", "400ms")
        except BaseException:
            self.close()
            raise

    def cut(self, i: int) -> None:
        _sh("ip", "-n", f"{self.prefix}sw", "link", "set", f"h{i}", "down")

    def restore(self, i: int) -> None:
        _sh("ip", "-n", f"{self.prefix}sw", "link", "set", f"h{i}", "up")

    def close(self) -> None:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            name = line.split()[0] if line.strip() else ""
            if name.startswith(self.prefix) and (name[len(self.prefix):].isdigit() or name == f"{self.prefix}sw"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def procs(tmp_path: Path):
    ps = Procs(tmp_path)
    try:
        yield ps
    finally:
        ps.kill_all()
