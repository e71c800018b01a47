#!/usr/bin/env python3
"""ENTRYPOINT of the swarmtrain peer images: add the container plumbing, then exec swarm-peer.

    peer_entrypoint.py [swarm-peer arguments...]

With none of the variables below set it is exactly `swarm-peer ARGS` (it execs, so swarm-peer
is the process that receives SIGTERM from `docker stop` and leaves the swarm cleanly). Each
variable adds flags *before* ARGS, so a flag given in ARGS still wins (argparse: the last
one counts; --join adds to the list):

SWARM_JOIN_FILE      wait until this file (a bootstrap node's --maddrs-file, on a shared volume)
                     holds the node's addresses, then add `--join ADDR` for each of them that is
                     not a loopback address (those lead back into this container). Gives up
                     with exit 1 after SWARM_JOIN_TIMEOUT seconds (default 300).
SWARM_ANNOUNCE_HOST  `auto`: add `--swarm.announce-host IP` with this container's address on the
                     route to the first join address (a UDP socket's connect(): no packet is
                     sent); an IP address: announce that one; unset or empty: swarm-peer detects it.
SWARM_SLOTS_DIR      claim the first free slot directory SLOTS_DIR/slot-N (an exclusive lock on
                     SLOTS_DIR/slot-N.lock, held until the peer exits) and keep this peer's state
                     there: `--swarm.identity-path .../identity.key` (a stable peer id),
                     `--checkpoint.dir .../checkpoints` and `--train.summary-file .../summary.json`.
                     Replicas of one compose service share a volume; each gets its own slot, and a
                     restarted replica takes a free one back with its identity and checkpoints.

`swarm-peer status ...`, `--help` and `--print-config` run at once, with nothing added.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import sys
import time
from pathlib import Path

PEER = "swarm-peer"
MAX_SLOTS = 1024
# The swarm-peer flags this script adds (tests/test_docker.py checks them against the real parser).
ADDED_FLAGS = ("--join", "--swarm.announce-host", "--swarm.identity-path", "--checkpoint.dir", "--train.summary-file")


class EntrypointError(Exception):
    pass


def log(msg: str) -> None:
    print(f"peer-entrypoint: {msg}", file=sys.stderr, flush=True)


def _ip_of(maddr: str) -> str | None:
    parts = maddr.split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else None


def is_loopback(maddr: str) -> bool:
    ip = _ip_of(maddr)
    try:
        return ip is not None and ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def parse_maddrs(text: str) -> list[str]:
    """The usable join addresses in a --maddrs-file: full peer addresses, loopback ones dropped
    unless there are no others (a node on the host network, say)."""
    addrs = [a.strip() for a in text.splitlines()]
    addrs = [a for a in addrs if a.startswith("/") and "/p2p/" in a]
    remote = [a for a in addrs if not is_loopback(a)]
    return remote or addrs


def wait_for_join_file(path: str, timeout: float, *, poll: float = 1.0) -> list[str]:
    deadline = time.monotonic() + timeout
    said = False
    while True:
        try:
            addrs = parse_maddrs(Path(path).read_text())
        except OSError:
            addrs = []
        if addrs:
            return addrs
        if time.monotonic() >= deadline:
            raise EntrypointError(f"no bootstrap address in {path} after {timeout:.0f} s "
                                  f"(is the bootstrap node running with --maddrs-file {path}?)")
        if not said:
            log(f"waiting for the bootstrap node's addresses in {path}")
            said = True
        time.sleep(poll)


def route_source_ip(maddr: str) -> str | None:
    """This machine's address on the route to `maddr`'s IP (connect() on a UDP socket sends nothing)."""
    ip = _ip_of(maddr)
    if ip is None:
        return None
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def claim_slot(slots_dir: str, *, max_slots: int = MAX_SLOTS) -> tuple[int, int]:
    """(slot number, fd holding its lock): the first slot no other live process holds."""
    os.makedirs(slots_dir, exist_ok=True)
    for i in range(max_slots):
        fd = os.open(os.path.join(slots_dir, f"slot-{i}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        os.set_inheritable(fd, True)  # survives exec: the lock lives as long as swarm-peer
        return i, fd
    raise EntrypointError(f"all {max_slots} slots in {slots_dir} are taken")


def passthrough(args: list[str]) -> bool:
    return args[:1] == ["status"] or any(a in ("-h", "--help", "--print-config") for a in args)


def build_argv(args: list[str], env: dict[str, str], *, join_addrs: list[str] = (), slot_dir: str = "",
               route=route_source_ip) -> list[str]:
    """The swarm-peer command line: [swarm-peer, added flags..., args...]."""
    added: list[str] = []
    for a in join_addrs:
        added += ["--join", a]
    announce = env.get("SWARM_ANNOUNCE_HOST", "").strip()
    if announce == "auto":
        ip = route(join_addrs[0]) if join_addrs else None
        if ip:
            added += ["--swarm.announce-host", ip]
    elif announce:
        added += ["--swarm.announce-host", announce]
    if slot_dir:
        added += ["--swarm.identity-path", os.path.join(slot_dir, "identity.key"),
                  "--checkpoint.dir", os.path.join(slot_dir, "checkpoints"),
                  "--train.summary-file", os.path.join(slot_dir, "summary.json")]
    return [PEER, *added, *args]


def prepare(args: list[str], env: dict[str, str]) -> list[str]:
    if passthrough(args):
        return [PEER, *args]
    join_addrs: list[str] = []
    if env.get("SWARM_JOIN_FILE"):
        join_addrs = wait_for_join_file(env["SWARM_JOIN_FILE"], float(env.get("SWARM_JOIN_TIMEOUT") or 300))
        log(f"joining through {', '.join(join_addrs)}")
    slot_dir = ""
    if env.get("SWARM_SLOTS_DIR"):
        n, _fd = claim_slot(env["SWARM_SLOTS_DIR"])
        slot_dir = os.path.join(env["SWARM_SLOTS_DIR"], f"slot-{n}")
        os.makedirs(slot_dir, exist_ok=True)
        log(f"using slot {n}: identity, checkpoints and summary in {slot_dir}")
    return build_argv(args, env, join_addrs=join_addrs, slot_dir=slot_dir)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        cmd = prepare(args, dict(os.environ))
    except (EntrypointError, OSError, ValueError) as e:
        print(f"peer-entrypoint: error: {e}", file=sys.stderr)
        return 1
    os.execvp(cmd[0], cmd)  # never returns


if __name__ == "__main__":
    sys.exit(main())
