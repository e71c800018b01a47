"""`swarm-peer`: join a run and train. Thin: parse, build, run, close."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from averaging.errors import SwarmError

from . import configlib
from .config import RunConfig
from .data import DataError
from .progress import configure_logging


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is one --help away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse(argv: list[str] | None) -> RunConfig:
    p = OneLineParser(prog="swarm-peer", description="Join a swarmtrain run and train. "
                      "(`swarm-peer status --join ADDR` shows a running swarm instead.)", allow_abbrev=False,
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:  # `swarm-peer status --join ADDR`: show the swarm, train nothing
        from .status import main as status_main
        return status_main(argv[1:])
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

    from .train import run, write_json_atomic  # heavy imports after argument errors are reported

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
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
