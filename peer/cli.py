"""`swarm-peer`: join a run and train. Thin: parse, build, run, close."""
from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time

from . import settings
from .cmdline import OneLineParser, interruptible  # noqa: F401  (re-exported: bootstrap's CLI uses them)
from .config import RunConfig
from .progress import configure_logging


def parse(argv: list[str] | None) -> RunConfig:
    """The run config from --config's TOML < SWARMTRAIN_* variables < flags (peer/settings.py)."""
    p = OneLineParser(prog="swarm-peer", description="Join a swarmtrain run and train. "
                      "(`swarm-peer status --join ADDR` shows a running swarm instead; "
                      "`swarm-peer prepare TEXT --out DIR` writes token shards.) Every --section.key flag can "
                      "also be set in the --config file or as SWARMTRAIN_SECTION__KEY.", allow_abbrev=False)
    p.add_argument("--config", help="TOML run config (variables and flags override it)")
    p.add_argument("--join", action="append", default=[], metavar="MULTIADDR",
                   help="address of any live peer or bootstrap node (repeatable); same as --swarm.initial-peers")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint.dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--log-format", choices=["auto", "rich", "text", "json"], help="same as --log.format")
    flags = settings.Flags(p, RunConfig)
    ns = flags.parse(sys.argv[1:] if argv is None else argv)
    given = flags.values(ns)
    if ns.join:
        given.setdefault("swarm", {})["initial_peers"] = ns.join
    if ns.resume:
        given.setdefault("checkpoint", {})["resume"] = True
    if ns.log_format:
        given.setdefault("log", {})["format"] = ns.log_format
    cfg = settings.load(RunConfig, path=ns.config, flags=given, note=flags.note)
    if ns.print_config:
        print(settings.dump_toml(cfg))
        sys.exit(0)
    return cfg


def main(argv: list[str] | None = None) -> int:
    return interruptible(_main, argv, "swarm-peer: interrupted while starting; nothing to save")


def _main(argv: list[str]) -> int:
    if argv[:1] == ["status"]:  # `swarm-peer status --join ADDR`: show the swarm, train nothing
        return status(argv[1:])
    if argv[:1] == ["prepare"]:  # `swarm-peer prepare TEXT --out DIR`: token shards for --data.source shards
        from .prepare import main as prepare_main
        return prepare_main(argv[1:])
    try:
        cfg = parse(argv)
    except ValueError as e:  # ConfigError, one line
        print(f"swarm-peer: error: {e}", file=sys.stderr)
        return 2
    configure_logging(cfg.log.format)

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():  # second Ctrl+C: leave now
            raise KeyboardInterrupt
        logging.getLogger("swarmtrain").info("%s: finishing the current step, then leaving", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    # The heavy imports (torch, hivemind) come only now: argument errors and --help are instant.
    from averaging.errors import SwarmError

    from .data import DataError
    from .train import run, write_json_atomic

    if stop.is_set():  # Ctrl+C while loading: nothing has started yet
        print("swarm-peer: interrupted while starting; nothing to save", file=sys.stderr)
        return 130
    try:
        summary = run(cfg, stop)
    except (SwarmError, DataError, ValueError) as e:  # ValueError: e.g. --train.device cuda without CUDA
        print(f"swarm-peer: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("swarm-peer: interrupted twice; left without finishing the round or saving", file=sys.stderr)
        return 130
    if cfg.train.summary_file:
        write_json_atomic(cfg.train.summary_file, summary)
    if cfg.log.format != "json" and sys.stdout.isatty():
        print(format_summary(summary, cfg.swarm.run_id), flush=True)
    else:  # a pipe, a file or --log-format json: one machine-readable line
        print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


def format_summary(s: dict, run_id: str) -> str:
    """The exit summary for a person at a terminal (the SUMMARY JSON line carries every field)."""
    from .progress import fmt_bytes

    failed = f" ({s['rounds_failed']} failed)" if s["rounds_failed"] else ""
    return "\n".join([
        f"swarm-peer: {'stopped' if s['interrupted'] else 'finished'} in run {run_id!r} after {s['rounds']} rounds{failed}, "
        f"{s['steps']:,} steps, {s['samples']:,} samples, {s['wall_s']:.0f} s",
        f"  validation loss    {s['val_loss_start']:.4f} -> {s['val_loss_final']:.4f}",
        f"  compute            {100 * s['compute_utilization']:.1f} % of the time (waited {s['sync_wait_s']:.1f} s in sync), "
        f"sent {fmt_bytes(s['bytes_sent'])}",
        f"  peer {s['peer_id']}, parameters digest {s['digest'][:16]}",
        "  (every field as JSON: --log-format json, or --train.summary-file FILE)",
    ])



# ---------------------------------------------------------------- `swarm-peer status`
def status(argv: list[str]) -> int:
    """`swarm-peer status --join ADDR [--run-id RUN] [--json]`: print the swarm's state, then leave."""
    p = OneLineParser(prog="swarm-peer status", allow_abbrev=False,
                      description="Print a running swarm's status (joins the DHT as a client; trains nothing).")
    p.add_argument("--join", action="append", required=True, metavar="MULTIADDR", help="any live peer or bootstrap node")
    # The same flags swarm-peer takes (--swarm.*) work here too, so a command can be copied over.
    p.add_argument("--run-id", "--swarm.run-id", dest="run_id", default="swarmtrain-demo", help="the run to show")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    # A fresh client DHT node on a loaded machine can need several seconds to find the records.
    p.add_argument("--wait", type=float, default=15.0, help="seconds to wait for the first peer records")
    p.add_argument("--secret-file", "--swarm.secret-file", dest="secret_file", default="", help="a private run's shared secret (needed to read its records)")
    p.add_argument("--allowlist-file", "--swarm.allowlist-file", dest="allowlist_file", default="", help="a private run's allowlist (needed to read its records)")
    ns = p.parse_args(argv)
    from averaging.access import load_credential
    from averaging.errors import SwarmError

    from .config import validate_multiaddr

    try:
        for a in ns.join:
            validate_multiaddr(a)
        secret = load_credential(secret_file=ns.secret_file, allowlist_file=ns.allowlist_file)
    except (ValueError, SwarmError) as e:
        print(f"swarm-peer status: error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("hivemind").setLevel(logging.ERROR)
    from averaging.dht import SwarmDHT

    from .membership import live_peers, record_validator
    from .status import peer_row, render, trainers_of

    try:
        dht = SwarmDHT.start(ns.run_id, initial_peers=ns.join, client_mode=True,
                             record_validators=[record_validator(ns.run_id)], secret=secret, startup_timeout=15)
    except SwarmError as e:
        print(f"swarm-peer status: error: {e}", file=sys.stderr)
        return 1
    try:
        deadline = time.monotonic() + ns.wait
        run = trainers_of(live_peers(dht))
        while not run.peers and time.monotonic() < deadline:  # records may need a moment to be found
            time.sleep(0.5)
            run = trainers_of(live_peers(dht))
    finally:
        dht.shutdown()
    now = time.time()
    if ns.json:
        fps = run.flops_per_sample
        print(json.dumps({"run_id": ns.run_id, "round": run.round, "agree": run.agree,
                          "peers_live": len(run.peers), "throughput_samples_per_s": run.throughput,
                          "mean_loss": run.mean_loss,
                          "peers": [peer_row(r, now, r.samples * fps) for r in run.peers]}))
    else:
        print(render(run, ns.run_id, now))
    return 0


if __name__ == "__main__":
    sys.exit(main())
