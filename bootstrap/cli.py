"""`swarm-bootstrap`: run an entry node for a swarm. Thin: parse, build, run, close."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from averaging.access import generate_secret_file
from averaging.errors import StateError, SwarmError
from peer import configlib
from peer.cli import OneLineParser

from .node import BootstrapConfig, BootstrapNode


def parse(argv: list[str] | None) -> BootstrapConfig:
    p = OneLineParser(prog="swarm-bootstrap", description="Run a swarmtrain bootstrap node.", allow_abbrev=False,
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="TOML file with these same keys (flags override it)")
    configlib.add_arguments(p, BootstrapConfig)
    ns = p.parse_args(argv)
    return configlib.load(BootstrapConfig, path=ns.config, cli_overrides=configlib.overrides_from_namespace(ns, BootstrapConfig))


def keygen(argv: list[str]) -> int:
    """`swarm-bootstrap keygen --out FILE`: create a private run's shared secret."""
    p = OneLineParser(prog="swarm-bootstrap keygen", allow_abbrev=False,
                      description="Create a new shared secret for a private run (give it to every member).")
    p.add_argument("--out", required=True, help="file to create (mode 0600; never overwritten)")
    ns = p.parse_args(argv)
    try:
        generate_secret_file(ns.out)
    except (StateError, OSError) as e:
        print(f"swarm-bootstrap keygen: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote a new run secret to {ns.out}; start every node of the run with --secret-file / --swarm.secret-file {ns.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keygen"]:
        return keygen(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    try:
        cfg = parse(argv)
    except (configlib.ConfigError, ValueError) as e:
        print(f"swarm-bootstrap: error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    node = BootstrapNode(cfg)
    try:
        maddrs = node.start()
        print("Bootstrap node is up. Its addresses:", *(f"  {m}" for m in maddrs), sep="\n")
        print(f"Join the run with:\n  {node.join_command(maddrs)}", flush=True)
        if node.dashboard is not None:
            print(f"Dashboard: {node.dashboard.url}  (JSON: /api/status /api/peers /api/ledger, Prometheus: /metrics)", flush=True)
        node.serve(stop)
    except SwarmError as e:
        print(f"swarm-bootstrap: error: {e}", file=sys.stderr)
        return 1
    finally:
        node.close()
    print("bootstrap node stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
