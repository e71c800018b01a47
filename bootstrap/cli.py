"""`swarm-bootstrap`: run an entry node for a swarm. Thin: parse, build, run, close."""
from __future__ import annotations

import logging
import signal
import sys
import threading

from peer import settings
from peer.cmdline import OneLineParser, interruptible

from .config import BootstrapConfig

#: SWARMTRAIN_BOOTSTRAP_PORT=31337 is --port 31337.
ENV_PREFIX = settings.ENV_PREFIX + "BOOTSTRAP_"


def parse(argv: list[str] | None) -> BootstrapConfig:
    """The node's config from --config's TOML < SWARMTRAIN_BOOTSTRAP_* variables < flags."""
    p = OneLineParser(prog="swarm-bootstrap", allow_abbrev=False, description="Run a swarmtrain bootstrap node. "
                      "Every flag can also be set in the --config file or as SWARMTRAIN_BOOTSTRAP_KEY.")
    p.add_argument("--config", help="TOML file with these same keys (variables and flags override it)")
    flags = settings.Flags(p, BootstrapConfig)
    ns = flags.parse(sys.argv[1:] if argv is None else argv)
    return settings.load(BootstrapConfig, path=ns.config, flags=flags.values(ns), env_prefix=ENV_PREFIX,
                         note=flags.note)


def keygen(argv: list[str]) -> int:
    """`swarm-bootstrap keygen --out FILE | --identity FILE`: a private run's credentials.

    --out: a new shared secret. --identity: a node's key (created if missing, never
    overwritten); prints its peer id, the line an allowlisted run's operator adds."""
    p = OneLineParser(prog="swarm-bootstrap keygen", allow_abbrev=False,
                      description="Create a private run's shared secret, or a node key whose peer id goes on a run's allowlist.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="shared secret file to create (mode 0600; never overwritten)")
    what.add_argument("--identity", help="identity key file (created if missing); prints its peer id")
    ns = p.parse_args(argv)
    from averaging.access import generate_secret_file
    from averaging.errors import StateError
    from averaging.identity import ensure_identity

    try:
        if ns.identity:
            peer_id, created = ensure_identity(ns.identity)
        else:
            generate_secret_file(ns.out)
    except (StateError, OSError) as e:
        print(f"swarm-bootstrap keygen: error: {e}", file=sys.stderr)
        return 1
    if ns.identity:
        print(peer_id, flush=True)  # alone on stdout, so `>> allowlist.txt` works
        print(f"{'created' if created else 'read'} {ns.identity}; add the peer id above to the run's allowlist and start "
              f"with --swarm.identity-path {ns.identity}", file=sys.stderr)
        return 0
    print(f"wrote a new run secret to {ns.out}; start every node of the run with --secret-file / --swarm.secret-file {ns.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return interruptible(_main, argv, "swarm-bootstrap: interrupted while starting")


def _main(argv: list[str]) -> int:
    if argv[:1] == ["keygen"]:
        return keygen(argv[1:])
    if argv[:1] == ["export"]:  # `swarm-bootstrap export --checkpoint DIR --out FOLDER`: a Hugging Face folder
        from .export import main as export_main
        return export_main(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    try:
        cfg = parse(argv)
    except ValueError as e:  # ConfigError, one line
        print(f"swarm-bootstrap: error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    from averaging.errors import (
        SwarmError,  # the heavy imports (hivemind, torch) only now
    )

    from .node import BootstrapNode

    if stop.is_set():  # Ctrl+C while loading: nothing has started yet
        print("swarm-bootstrap: interrupted while starting", file=sys.stderr)
        return 130
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
