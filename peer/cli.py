"""`swarm-peer`: join a run and train. Thin: parse, build, run, close."""
from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
from typing import Callable

from . import configlib
from .config import RunConfig
from .progress import configure_logging


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is one --help away), and an
    unknown flag that exists under another name (`--run-id` for `--swarm.run-id`, or the
    other way round) is answered with that name."""

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = ""
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m:
            flag = m.group(1).split("=", 1)[0]
            tail = flag.rsplit(".", 1)[-1].lstrip("-")
            known = [o for a in self._actions for o in a.option_strings]
            near = [o for o in known if o != flag and o.lstrip("-").rsplit(".", 1)[-1] == tail]
            if near:
                hint = f"; did you mean {' or '.join(near)}?"
        self.exit(2, f"{self.prog}: error: {message}{hint} (see --help)\n")


def parse(argv: list[str] | None) -> RunConfig:
    p = OneLineParser(prog="swarm-peer", description="Join a swarmtrain run and train. "
                      "(`swarm-peer status --join ADDR` shows a running swarm instead; "
                      "`swarm-peer prepare TEXT --out DIR` writes token shards.)", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="TOML run config (flags override it)")
    p.add_argument("--join", action="append", default=[], metavar="MULTIADDR",
                   help="address of any live peer or bootstrap node (repeatable); same as --swarm.initial-peers")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint.dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--log-format", choices=["auto", "rich", "text", "json"], help="same as --log.format")
    configlib.add_arguments(p, RunConfig)
    ns = p.parse_args(argv)
    overrides = configlib.overrides_from_namespace(ns, RunConfig)
    if ns.join:
        overrides.setdefault("swarm", {})["initial_peers"] = ",".join(ns.join)
    if ns.resume:
        overrides.setdefault("checkpoint", {})["resume"] = True
    if ns.log_format:
        overrides.setdefault("log", {})["format"] = ns.log_format
    cfg = configlib.load(RunConfig, path=ns.config, cli_overrides=overrides)
    if ns.print_config:
        print(configlib.dump_toml(cfg))
        sys.exit(0)
    return cfg


def interruptible(main: Callable[[list[str]], int], argv: list[str] | None, interrupted: str) -> int:
    """Run a console script's `main`; a Ctrl+C before its own signal handler is installed (while
    torch and hivemind load) prints the one line `interrupted` and exits 130, no traceback."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return interruptible(_main, argv, "swarm-peer: interrupted while starting; nothing to save")


def _main(argv: list[str]) -> int:
    if argv[:1] == ["status"]:  # `swarm-peer status --join ADDR`: show the swarm, train nothing
        from .status import main as status_main
        return status_main(argv[1:])
    if argv[:1] == ["prepare"]:  # `swarm-peer prepare TEXT --out DIR`: token shards for --data.source shards
        from .prepare import main as prepare_main
        return prepare_main(argv[1:])
    try:
        cfg = parse(argv)
    except (configlib.ConfigError, ValueError) as e:
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


if __name__ == "__main__":
    sys.exit(main())
