#!/usr/bin/env python3
"""HEALTHCHECK of the swarmtrain images: is the swarm-bootstrap or swarm-peer in this container healthy?

    python /opt/swarmtrain/healthcheck.py       # what both images' HEALTHCHECK runs

It finds the swarm-bootstrap or swarm-peer process in the container's /proc, reads the flags
that process was started with (and its --config TOML, flags winning, as the CLIs resolve
them), and checks:

bootstrap  * the process is alive (not a zombie);
           * with --dashboard PORT: GET http://127.0.0.1:PORT/api/status answers 200 with the
             run's status, and the monitor's last successful read of the peers' records
             ("updated") is at most --max-age seconds old (default 120): a node whose DHT
             stopped answering turns unhealthy even though its web server still runs;
           * with --maddrs-file FILE: FILE exists and was written by THIS process (its mtime is
             not older than the process), so a peer never joins through a stale address left
             by an earlier run of the node;
           * without a dashboard: its DHT daemon (p2pd) accepts a TCP connection on its port.
peer       * the process is alive (not a zombie) and its DHT daemon (p2pd) is running;
           * unless --swarm.client-mode: p2pd accepts a TCP connection on its listening port
             (found in /proc, so --swarm.port 0 works too). This is what other peers need from
             it. It does not prove that the training loop is making progress: swarm-peer
             writes no heartbeat while it trains (only --train.summary-file, at exit).

Cheap: a few /proc reads, at most one local HTTP request or TCP connect, stdlib only (no
torch or hivemind import). Never touches any address but 127.0.0.1 / ::1 or the address the
process itself listens on. Exit 0 = healthy, 1 = unhealthy (Docker's contract); one line on
stdout says why (`docker inspect --format '{{json .State.Health}}' CONTAINER` shows it).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

# The CLI flags read from the process's command line (tests/test_docker.py checks that each
# one exists in the real CLI parsers, and that the values resolved here match theirs).
BOOTSTRAP_FLAGS = ("--config", "--host", "--port", "--dashboard", "--dashboard-host", "--maddrs-file")
PEER_FLAGS = ("--config", "--swarm.client-mode", "--swarm.no-client-mode")
# ... and the TOML keys: the bootstrap's are top level, the peer's are in [swarm].
BOOTSTRAP_KEYS = ("host", "port", "dashboard", "dashboard_host", "maddrs_file")
PEER_SWARM_KEYS = ("client_mode",)

DEFAULT_MAX_AGE_S = 120.0
TIMEOUT_S = 5.0
_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp


class Unhealthy(Exception):
    """One line: why the container is unhealthy."""


@dataclass(frozen=True)
class Proc:
    pid: int
    role: str          # "bootstrap" or "peer"
    args: list[str]    # the CLI arguments (after the swarm-peer / swarm-bootstrap script)
    cwd: str           # for relative --config / --maddrs-file paths


# --------------------------------------------------------------------------- /proc


def _cmdline(proc: Path, pid: int) -> list[str]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]] if raw else []


def classify(argv: list[str]) -> tuple[str, list[str]] | None:
    """('peer'|'bootstrap', cli args) if argv runs swarm-peer / swarm-bootstrap (a run, not a subcommand)."""
    for i, a in enumerate(argv):
        name = os.path.basename(a)
        if name in ("swarm-peer", "swarm-bootstrap"):
            role, args = ("peer" if name == "swarm-peer" else "bootstrap"), argv[i + 1:]
            break
        if a == "-m" and i + 1 < len(argv) and argv[i + 1] in ("peer", "bootstrap", "peer.cli", "bootstrap.cli"):
            role, args = argv[i + 1].split(".")[0], argv[i + 2:]
            break
    else:
        return None
    if args[:1] in (["status"], ["keygen"]):  # `swarm-peer status`, `swarm-bootstrap keygen`: not a node
        return None
    return role, args


def _ppid(proc: Path, pid: int) -> int:
    try:
        return int(_stat(proc, pid)[1])
    except (OSError, ValueError, IndexError):
        return 0


def find_node(proc: Path = Path("/proc")) -> Proc:
    """The swarm-bootstrap or swarm-peer process of this container.

    hivemind's DHT runs in a forked child with the same command line: the node is the match
    whose parent is not a match itself (the lowest pid if there are several such).
    """
    me = os.getpid()
    found = {}
    for pid in sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit()):
        if pid != me:
            c = classify(_cmdline(proc, pid))
            if c is not None:
                found[pid] = c
    roots = [pid for pid in found if _ppid(proc, pid) not in found] or sorted(found)
    if not roots:
        raise Unhealthy("no swarm-peer or swarm-bootstrap process is running")
    pid = roots[0]
    try:
        cwd = os.readlink(proc / str(pid) / "cwd")
    except OSError:
        cwd = "/"
    return Proc(pid, found[pid][0], found[pid][1], cwd)


def _stat(proc: Path, pid: int) -> list[str]:
    """Fields of /proc/PID/stat from the state on (field 3), so a ')' in the name is harmless."""
    raw = (proc / str(pid) / "stat").read_text()
    return raw[raw.rindex(")") + 2:].split()


def check_alive(proc: Path, pid: int) -> None:
    try:
        state = _stat(proc, pid)[0]
    except (OSError, ValueError, IndexError):
        raise Unhealthy(f"process {pid} is gone") from None
    if state in ("Z", "X"):
        raise Unhealthy(f"process {pid} has exited (state {state})")


def start_time(proc: Path, pid: int) -> float:
    """When the process started, in seconds since the epoch (from its starttime and the boot time)."""
    ticks = int(_stat(proc, pid)[19])  # field 22: starttime, in clock ticks since boot
    btime = next(int(line.split()[1]) for line in (proc / "stat").read_text().splitlines() if line.startswith("btime "))
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def p2pd_pids(proc: Path) -> list[int]:
    out = []
    for p in proc.iterdir():
        if p.name.isdigit():
            try:
                if (p / "comm").read_text().strip() == "p2pd":
                    out.append(int(p.name))
            except OSError:
                continue
    return sorted(out)


def _socket_inodes(proc: Path, pid: int) -> set[str]:
    inodes = set()
    try:
        fds = list((proc / str(pid) / "fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _decode_addr(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)
    # /proc/net/tcp{,6} prints the address as 32-bit words in host (little-endian) order.
    fixed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, fixed)


def listening_addrs(proc: Path, pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of `pids` holds."""
    inodes = set().union(*(_socket_inodes(proc, pid) for pid in pids)) if pids else set()
    out = []
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == _LISTEN and f[9] in inodes:
                addr, port = f[1].split(":")
                out.append((_decode_addr(addr), int(port, 16)))
    return sorted(set(out))


# --------------------------------------------------------------------------- flags and config


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of the last `flag VALUE` / `flag=VALUE` in args (argparse: the last one wins)."""
    val = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            val = args[i + 1]
        elif a.startswith(flag + "="):
            val = a[len(flag) + 1:]
    return val


def flag_bool(args: list[str], flag: str, negative: str) -> bool | None:
    val = None
    for a in args:
        if a == flag:
            val = True
        elif a == negative:
            val = False
    return val


def _abs(path: str, cwd: str) -> str:
    return path if os.path.isabs(path) else os.path.join(cwd, path)


def read_config(node: Proc) -> dict[str, Any]:
    path = flag_value(node.args, "--config")
    if not path or tomllib is None:
        return {}
    try:
        with open(_abs(path, node.cwd), "rb") as f:
            return tomllib.load(f)
    except (OSError, ValueError):
        return {}  # the node itself validated it at start; a later edit must not fail the check


@dataclass(frozen=True)
class BootstrapView:
    host: str
    port: int
    dashboard: int
    dashboard_host: str
    maddrs_file: str


def bootstrap_view(node: Proc) -> BootstrapView:
    """The bootstrap's settings the check needs, resolved like swarm-bootstrap does: defaults < TOML < flags."""
    cfg = read_config(node)

    def get(flag: str, key: str, default: Any) -> Any:
        v = flag_value(node.args, flag)
        return v if v is not None else cfg.get(key, default)

    return BootstrapView(host=str(get("--host", "host", "0.0.0.0")), port=int(get("--port", "port", 31337)),
                         dashboard=int(get("--dashboard", "dashboard", -1)),
                         dashboard_host=str(get("--dashboard-host", "dashboard_host", "")),
                         maddrs_file=str(get("--maddrs-file", "maddrs_file", "")))


def peer_client_mode(node: Proc) -> bool:
    v = flag_bool(node.args, "--swarm.client-mode", "--swarm.no-client-mode")
    if v is None:
        v = bool(read_config(node).get("swarm", {}).get("client_mode", False))
    return v


def local_target(host: str) -> str:
    """Where to connect to reach a server bound to `host` from inside its own container."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


# --------------------------------------------------------------------------- checks


def tcp_connect(host: str, port: int) -> None:
    try:
        with socket.create_connection((local_target(host), port), timeout=TIMEOUT_S):
            pass
    except OSError as e:
        raise Unhealthy(f"nothing accepts connections on {host}:{port}: {e}") from None


def check_dht(proc: Path, *, client_mode: bool = False) -> str:
    pids = p2pd_pids(proc)
    if not pids:
        raise Unhealthy("the DHT daemon (p2pd) is not running")
    if client_mode:
        return "DHT daemon running (client mode: no listening port by design)"
    addrs = listening_addrs(proc, pids)
    if not addrs:
        raise Unhealthy("the DHT daemon (p2pd) listens on no TCP port")
    host, port = addrs[0]
    tcp_connect(host, port)
    return f"DHT daemon accepts connections on port {port}"


def fetch_status(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        raise Unhealthy(f"{url} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise Unhealthy(f"{url} did not answer: {getattr(e, 'reason', e)}") from None
    try:
        status = json.loads(body)
    except ValueError:
        raise Unhealthy(f"{url} did not answer JSON") from None
    if not isinstance(status, dict) or "run_id" not in status:
        raise Unhealthy(f"{url} answered JSON without a run_id")
    return status


def check_status(status: dict[str, Any], *, now: float, max_age: float) -> str:
    updated = status.get("updated")
    if not isinstance(updated, (int, float)) or updated <= 0:
        raise Unhealthy("the node has not read the run's records yet")
    age = now - float(updated)
    if age > max_age:
        raise Unhealthy(f"the node's last successful read of the run's records was {age:.0f} s ago (limit {max_age:.0f} s)")
    return f"run {status['run_id']!r}: {status.get('peers_live', 0)} live peer(s), records read {max(age, 0):.0f} s ago"


def check_maddrs_file(path: str, started: float) -> None:
    try:
        st = os.stat(path)
    except OSError:
        raise Unhealthy(f"the node has not written its addresses to {path} yet") from None
    if st.st_size == 0:
        raise Unhealthy(f"{path} is empty")
    if st.st_mtime < started - 2.0:  # 2 s: /proc's boot time has 1 s resolution
        raise Unhealthy(f"{path} is older than the running node: stale addresses from an earlier run")


def check_bootstrap(node: Proc, proc: Path, *, max_age: float) -> str:
    view = bootstrap_view(node)
    if view.maddrs_file:
        check_maddrs_file(_abs(view.maddrs_file, node.cwd), start_time(proc, node.pid))
    if view.dashboard > 0:
        host = local_target(view.dashboard_host or view.host)
        if ":" in host:
            host = f"[{host}]"
        return check_status(fetch_status(f"http://{host}:{view.dashboard}/api/status"), now=time.time(), max_age=max_age)
    return check_dht(proc)  # no dashboard (or on a random port): the DHT port is what peers need


def check(proc: Path = Path("/proc"), *, max_age: float = DEFAULT_MAX_AGE_S) -> str:
    """Return one line if the node in this container is healthy; raise Unhealthy otherwise."""
    node = find_node(proc)
    check_alive(proc, node.pid)
    if node.role == "bootstrap":
        return "bootstrap: " + check_bootstrap(node, proc, max_age=max_age)
    return "peer: " + check_dht(proc, client_mode=peer_client_mode(node))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Healthcheck of a swarmtrain container (exit 0 healthy, 1 unhealthy).")
    p.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE_S,
                   help="bootstrap: most seconds since the node last read the peers' records")
    ns = p.parse_args(argv)
    try:
        print("healthy: " + check(max_age=ns.max_age))
    except Unhealthy as e:
        print(f"unhealthy: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
