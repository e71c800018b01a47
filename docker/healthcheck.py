#!/usr/bin/env python3
"""HEALTHCHECK of the swarmtrain images: is the node in this container making progress?

    python /opt/swarmtrain/healthcheck.py [--file PATH]

swarm-peer and swarm-bootstrap write a heartbeat file when SWARMTRAIN_HEARTBEAT names one (the
images set it; peer/heartbeat.py writes it from the node's own loop). Healthy when that file

* exists and is a heartbeat (JSON: pid, role, time, stale_after, ok, detail);
* was written by a running process (/proc/PID exists and is not a zombie), so the file of a node
  that crashed is not taken for health;
* is fresh: written at most `stale_after` seconds ago, the writer's own bound (a peer's grows
  with its step time and its sync timeouts), so a training loop that hangs turns unhealthy;
* says ok (a bootstrap node whose DHT stopped answering says not, and why).

A bootstrap node writes its first beat after its addresses file (--maddrs-file), so "healthy"
also means that file is this run's (compose starts the peers after that). Stdlib only, no
network. Exit 0 = healthy, 1 = unhealthy (Docker's contract); one line on stdout says why.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ENV = "SWARMTRAIN_HEARTBEAT"  # the same name as peer/heartbeat.py's
DEFAULT = "/tmp/swarmtrain-heartbeat.json"


class Unhealthy(Exception):
    """One line: why the container is unhealthy."""


def check(path: Path, *, now: float | None = None, proc: Path = Path("/proc")) -> str:
    """The heartbeat's detail if healthy; raises Unhealthy otherwise."""
    try:
        beat = json.loads(path.read_text())
    except FileNotFoundError:
        raise Unhealthy(f"no heartbeat at {path}: the node is starting, stopped, or runs without {ENV}") from None
    except (OSError, ValueError) as e:
        raise Unhealthy(f"{path} is not a heartbeat: {e}") from None
    fields = {"pid": int, "role": str, "time": (int, float), "stale_after": (int, float), "ok": bool, "detail": str}
    if not isinstance(beat, dict) or any(not isinstance(beat.get(k), t) for k, t in fields.items()):
        raise Unhealthy(f"{path} is not a heartbeat (fields {', '.join(fields)})")
    try:
        state = (proc / str(beat["pid"]) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        state = "gone"
    if state in ("gone", "Z", "X"):
        raise Unhealthy(f"{beat['role']} (pid {beat['pid']}) is not running; its last heartbeat said: {beat['detail']}")
    age = (time.time() if now is None else now) - beat["time"]
    if age > beat["stale_after"]:
        raise Unhealthy(f"{beat['role']}: no heartbeat for {age:.0f} s (expected within {beat['stale_after']:.0f} s); "
                        f"the last said: {beat['detail']}")
    if not beat["ok"]:
        raise Unhealthy(f"{beat['role']}: {beat['detail']}")
    return f"{beat['role']}: {beat['detail']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Exit 0 if this container's swarmtrain node is healthy (its heartbeat).")
    p.add_argument("--file", default=os.environ.get(ENV) or DEFAULT, help=f"the heartbeat file (default: ${ENV})")
    ns = p.parse_args(argv)
    try:
        print(f"healthy: {check(Path(ns.file))}")
        return 0
    except Unhealthy as e:
        print(f"unhealthy: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
