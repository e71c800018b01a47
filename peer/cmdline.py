"""Command-line plumbing shared by `swarm-peer`, its subcommands and `swarm-bootstrap`.

Imports nothing heavy (no torch, no hivemind) and nothing else of swarmtrain, so every command
checks its arguments and prints `--help` at once, and no command module imports another.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Callable


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


def interruptible(main: Callable[[list[str]], int], argv: list[str] | None, interrupted: str) -> int:
    """Run a console script's `main`; a Ctrl+C before its own signal handler is installed (while
    torch and hivemind load) prints the one line `interrupted` and exits 130, no traceback."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
