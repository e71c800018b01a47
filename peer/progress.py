"""Training progress for the peer: a live terminal display, plain log lines, metric loggers.

The trainer builds a :class:`ProgressSnapshot` after every local step and hands it to the
:class:`Progress` that :func:`make_progress` returns. ``[log] format`` picks the display:

``rich``
    A live status block at the bottom of the terminal (``rich.live.Live``, ~4 refreshes/s):
    step, loss, samples/s, sync round, peers seen and the last all-reduce (status, duration,
    bytes sent, group size). While it is active, log records that would go to the terminal
    are routed through a ``rich.logging.RichHandler`` on the same console, so they print
    *above* the live block; the previous handlers come back on :meth:`Progress.close`.
    The block follows every update; ``every_steps`` only throttles the other sinks.
``text``
    One plain ``logging`` line (logger ``"swarmtrain"``) every ``every_steps`` steps, e.g.
    ``step 120  loss 2.3412  31.0 samples/s  round 4  peers 3  last sync complete 0.41s 3.5 MB``.
``json``
    One JSON object per line (``{"event": "progress", ..., "t": <unix time>}``) on stdout, and
    :func:`configure_logging` renders every log record as one-line JSON on stderr
    (:class:`JsonLogFormatter`), so all output is machine-parseable. Non-finite floats
    (a diverged loss) are written as ``null``.
``auto`` (default)
    ``rich`` when stderr is a terminal (and rich is installed), else ``text``.

On top of the display, ``tensorboard_dir`` adds a :class:`TensorBoardSink` and
``wandb_project`` a :class:`WandbSink`. Both packages are optional and imported only when
asked for; a missing one is a one-line :class:`MissingDependencyError` at start-up.

Lines and scalar points are emitted when ``step % every_steps == 0``, when a new all-reduce
result arrives (``last_round`` changed), and for ``update(snap, force=True)`` (use it for the
final snapshot), unless that exact snapshot was the last one emitted.

Sinks never crash training: :class:`ProgressGroup` catches an ``Exception`` raised by a sink's
own ``update``/``close`` (not ``BaseException``, so Ctrl+C still propagates), logs ONE warning,
closes that sink and stops calling it; the other sinks keep working.

Typical use::

    configure_logging(cfg.log.format)          # as early as possible
    with make_progress(cfg.log) as progress:   # after heavy imports, before training
        for ...:
            progress.update(ProgressSnapshot(step=..., loss=..., ...))
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TextIO

import pydantic.dataclasses
from pydantic import Field

from averaging.config import SETTINGS
from averaging.errors import ConfigError

__all__ = [
    "LogConfig",
    "RoundInfo",
    "ProgressSnapshot",
    "MissingDependencyError",
    "Progress",
    "ProgressGroup",
    "RichProgress",
    "TextProgress",
    "JsonProgress",
    "TensorBoardSink",
    "WandbSink",
    "JsonLogFormatter",
    "make_progress",
    "configure_logging",
    "adopt_hivemind_logging",
    "resolve_format",
    "fmt_bytes",
    "fmt_rate",
    "TEXT_LOG_FORMAT",
    "TEXT_DATE_FORMAT",
]

log = logging.getLogger("swarmtrain")

#: The plain-text log record format (what `swarm-peer` has always printed).
TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
TEXT_DATE_FORMAT = "%H:%M:%S"
#: Loggers that are too chatty at INFO for a training terminal.
NOISY_LOGGERS = ("hivemind", "torch.distributed")

_FORMATS = ("auto", "rich", "text", "json")


# --------------------------------------------------------------------------- config


@pydantic.dataclasses.dataclass(kw_only=True, config=SETTINGS)
class LogConfig:
    format: Literal["auto", "rich", "text", "json"] = Field(
        "auto", description="progress display: rich (live terminal), text (log lines), json (one object per line), auto = rich on a terminal, else text")
    every_steps: int = Field(10, description="emit a progress log line / metric point every N local steps (the rich display follows every step)")
    tensorboard_dir: str = Field("", description="also write scalars for TensorBoard to this directory ('' = off; needs the tensorboard package)")
    wandb_project: str = Field("", description="also log to this Weights & Biases project ('' = off; needs the wandb package)")
    wandb_run_name: str = Field("", description="W&B run name ('' = let W&B choose)")

    def __post_init__(self) -> None:
        # (pydantic has checked the types: format is one of the four, every_steps an int)
        if self.every_steps < 1:
            raise ValueError(f"every_steps must be an integer >= 1, got {self.every_steps!r}")
        if self.wandb_run_name and not self.wandb_project:
            raise ValueError("wandb_run_name is set but wandb_project is empty (set wandb_project to enable W&B)")


# --------------------------------------------------------------------------- snapshots


@dataclass(frozen=True, kw_only=True)
class RoundInfo:
    """Outcome of one all-reduce round, as shown under "last all-reduce"."""

    round: int
    status: str  # "complete" or "failed"
    duration_s: float
    bytes_sent: int
    members: int
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class ProgressSnapshot:
    """What the peer reports after a local step. ``round`` is the current sync round."""

    step: int
    loss: float | None
    samples_per_s: float
    round: int
    peers_seen: int
    last_round: RoundInfo | None
    val_loss: float | None = None
    samples: int = 0


# --------------------------------------------------------------------------- formatting


def fmt_bytes(n: float) -> str:
    """Human-readable byte count with decimal units: ``3.5 MB``, ``812 B``, ``1.2 GB``."""
    n = float(n)
    if not math.isfinite(n):
        return f"{n} B"
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 1000:
        return f"{sign}{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 999.95 or unit == "TB":
            return f"{sign}{n:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def fmt_rate(per_s: float, unit: str = "samples") -> str:
    """Human-readable rate: ``31.0 samples/s``, ``12.3k samples/s``, ``0.25 samples/s``."""
    if not math.isfinite(per_s):
        return f"- {unit}/s"
    if abs(per_s) >= 1e6:
        return f"{per_s / 1e6:.1f}M {unit}/s"
    if abs(per_s) >= 1e4:
        return f"{per_s / 1e3:.1f}k {unit}/s"
    if 0 < abs(per_s) < 1:
        return f"{per_s:.2f} {unit}/s"
    return f"{per_s:.1f} {unit}/s"


def _fmt_loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _describe_round(r: RoundInfo | None) -> str:
    """``complete in 0.42 s, 3.5 MB, 3 peers`` / ``failed after 30.00 s: timeout, 0 B``."""
    if r is None:
        return "none yet"
    peers = f"{r.members} peer{'' if r.members == 1 else 's'}"
    if r.status == "complete":
        return f"complete in {r.duration_s:.2f} s, {fmt_bytes(r.bytes_sent)}, {peers}"
    err = f": {r.error}" if r.error else ""
    return f"{r.status} after {r.duration_s:.2f} s{err}, {fmt_bytes(r.bytes_sent)}, {peers}"


def format_line(snap: ProgressSnapshot) -> str:
    """The one-line text form of a snapshot (used by :class:`TextProgress`)."""
    parts = [f"step {snap.step}", f"loss {_fmt_loss(snap.loss)}"]
    if snap.val_loss is not None:
        parts.append(f"val {_fmt_loss(snap.val_loss)}")
    parts += [fmt_rate(snap.samples_per_s), f"round {snap.round}", f"peers {snap.peers_seen}"]
    r = snap.last_round
    if r is not None:
        sync = f"last sync {r.status} {r.duration_s:.2f}s {fmt_bytes(r.bytes_sent)}"
        if r.status != "complete" and r.error:
            sync += f" ({r.error})"
        parts.append(sync)
    return "  ".join(parts)


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    return x


# --------------------------------------------------------------------------- sinks


class MissingDependencyError(ConfigError, ImportError):
    """An optional package the config asks for is not installed; the message is one line."""


class Progress:
    """A progress sink: :meth:`update` with each snapshot, :meth:`close` once at the end.

    Also a context manager (``with make_progress(cfg) as p: ...`` closes on exit).
    Subclasses override :meth:`update` and, when they hold resources, :meth:`close`.
    """

    #: Sinks that want every snapshot (a live display) rather than the throttled ones.
    every_update: bool = False
    name: str = "progress"

    def update(self, snap: ProgressSnapshot, *, force: bool = False) -> None:
        """Report a snapshot."""

    def close(self) -> None:
        """Release resources; further updates are ignored. Idempotent."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class ProgressGroup(Progress):
    """Fans snapshots out to several sinks, throttles them, and isolates their failures.

    Sinks with ``every_update`` (the rich display) get every snapshot; the others get one when
    ``step % every_steps == 0``, when ``last_round`` changed, or when ``force=True`` — and never
    the same snapshot twice. A sink whose ``update`` raises an ``Exception`` is closed, dropped
    and reported with a single warning.
    """

    name = "group"

    def __init__(self, sinks: list[Progress], *, every_steps: int = 1) -> None:
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self.sinks = list(sinks)
        self.every_steps = every_steps
        self._last: ProgressSnapshot | None = None
        self._closed = False

    def update(self, snap: ProgressSnapshot, *, force: bool = False) -> None:
        if self._closed:
            return
        last = self._last
        due = force or last is None or snap.step % self.every_steps == 0 or snap.last_round != last.last_round
        if due and snap == last:  # never the same line twice, not even for the final (forced) update
            due = False
        if due:
            self._last = snap
        for sink in list(self.sinks):
            if due or sink.every_update:
                try:
                    sink.update(snap, force=force)
                except Exception as e:  # a broken sink must not stop training: drop it, warn once
                    self._drop(sink, e)

    def _drop(self, sink: Progress, error: Exception) -> None:
        self.sinks.remove(sink)
        try:
            sink.close()  # e.g. a rich display gives the terminal's log handlers back first
        except Exception as close_error:  # already failing: the warning below reports the first error
            log.debug("closing %s after its failure also failed: %s", sink.name, close_error)
        log.warning("progress output %s failed and is now disabled: %s: %s", sink.name, type(error).__name__, error)
        log.debug("%s failure", sink.name, exc_info=error)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # still close the others
                log.warning("progress output %s failed to close: %s: %s", sink.name, type(e).__name__, e)


class TextProgress(Progress):
    """One plain log line per update through ``logging`` (logger ``"swarmtrain"``, INFO)."""

    name = "text"

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or log
        self._closed = False

    def update(self, snap: ProgressSnapshot, *, force: bool = False) -> None:
        if not self._closed:
            self.logger.info("%s", format_line(snap))

    def close(self) -> None:
        self._closed = True


class JsonProgress(Progress):
    """One JSON object per update, one per line, flushed: ``{"event": "progress", ..., "t": ...}``.

    Writes to ``stream`` (default: whatever ``sys.stdout`` is at write time). Non-finite
    floats become ``null``.
    """

    name = "json"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._closed = False

    def update(self, snap: ProgressSnapshot, *, force: bool = False) -> None:
        if self._closed:
            return
        record = {"event": "progress", **_finite_or_none(dataclasses.asdict(snap)), "t": round(time.time(), 3)}
        stream = self._stream if self._stream is not None else sys.stdout
        stream.write(json.dumps(record, allow_nan=False) + "\n")
        stream.flush()

    def close(self) -> None:
        self._closed = True


class RichProgress(Progress):
    """A live status block (``rich.live.Live``) with log records printed above it.

    Starts on construction. Root-logger handlers that write to the terminal (stream handlers
    on stdout/stderr or on the console's file) are replaced by a ``RichHandler`` bound to the
    same console until :meth:`close`, which stops the display and puts them back. File
    handlers and other handlers are left alone.
    """

    every_update = True
    name = "rich"

    def __init__(self, console: Any = None, *, refresh_per_second: float = 4.0) -> None:
        try:
            from rich.console import Console
            from rich.live import Live
        except ImportError:
            raise MissingDependencyError("--log.format rich needs the rich package: pip install rich") from None
        self.console = console if console is not None else Console(stderr=True)
        self._snap: ProgressSnapshot | None = None
        self._closed = False
        self._handler = _rich_handler(self.console)
        root = logging.getLogger()
        # configure_logging's own handler goes too (in rich mode a RichHandler of its own console)
        self._removed = [h for h in root.handlers
                         if _writes_to_terminal(h, self.console.file) or getattr(h, _OUR_HANDLER, False)]
        for h in self._removed:
            root.removeHandler(h)
        root.addHandler(self._handler)
        stdout_tty = _isatty(sys.stdout)  # never reroute a piped stdout (SUMMARY, JSON) into the console
        self._live = Live(self._render(), console=self.console, refresh_per_second=refresh_per_second,
                          transient=False, redirect_stdout=stdout_tty, redirect_stderr=True)
        try:
            self._live.start()
        except BaseException:
            self._restore_handlers()
            raise

    def _render(self) -> Any:
        from rich.text import Text

        s = self._snap
        if s is None:
            return Text("swarmtrain: waiting for the first step…", style="dim")
        line = Text()
        line.append("step ", style="dim").append(str(s.step), style="bold")
        line.append("  loss ", style="dim").append(_fmt_loss(s.loss), style="bold cyan")
        if s.val_loss is not None:
            line.append("  val ", style="dim").append(_fmt_loss(s.val_loss), style="bold cyan")
        line.append("  ").append(fmt_rate(s.samples_per_s))
        line.append("  round ", style="dim").append(str(s.round), style="bold")
        line.append("  peers seen ", style="dim").append(str(s.peers_seen), style="bold")
        r = s.last_round
        style = "dim" if r is None else ("green" if r.status == "complete" else "red")
        sync = Text("last all-reduce: ", style="dim")
        sync.append(_describe_round(r) if r is None else f"round {r.round} {_describe_round(r)}", style=style)
        return Text("\n").join([line, sync])

    def update(self, snap: ProgressSnapshot, *, force: bool = False) -> None:
        if self._closed:
            return
        self._snap = snap
        self._live.update(self._render(), refresh=force)

    def _restore_handlers(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self._handler)
        for h in self._removed:
            if h not in root.handlers:
                root.addHandler(h)
        self._removed = []

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._live.stop()  # final render stays on screen (transient=False)
        finally:
            self._restore_handlers()


class TensorBoardSink(Progress):
    """Scalars for TensorBoard via ``torch.utils.tensorboard.SummaryWriter``; x-axis = local step."""

    name = "tensorboard"

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingDependencyError(
                "--log.tensorboard-dir needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=log_dir)
        self._last_round: RoundInfo | None = None
        self._closed = False

    def update(self, snap: ProgressSnapshot, *, force: bool = False) -> None:
        if self._closed:
            return
        for tag, value in _scalars(snap, include_round=snap.last_round != self._last_round).items():
            self.writer.add_scalar(tag, value, global_step=snap.step)
        self._last_round = snap.last_round

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.writer.close()


class WandbSink(Progress):
    """Logs the same scalars to a Weights & Biases run (``wandb.init`` at construction)."""

    name = "wandb"

    def __init__(self, project: str, run_name: str = "", *, config: Mapping[str, Any] | None = None) -> None:
        try:
            import wandb
        except ImportError:
            raise MissingDependencyError("--log.wandb-project needs the wandb package: pip install wandb") from None
        try:
            self.run = wandb.init(project=project, name=run_name or None, config=dict(config or {}))
        except Exception as e:  # wandb raises many types (auth, network, usage); report as one config-level line
            msg = " ".join(str(e).split())
            raise ValueError(f"--log.wandb-project: could not start a W&B run: {type(e).__name__}: {msg}") from None
        self._last_round: RoundInfo | None = None
        self._closed = False

    def update(self, snap: ProgressSnapshot, *, force: bool = False) -> None:
        if self._closed:
            return
        self.run.log(_scalars(snap, include_round=snap.last_round != self._last_round), step=snap.step)
        self._last_round = snap.last_round

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.run.finish()


def _scalars(snap: ProgressSnapshot, *, include_round: bool) -> dict[str, float]:
    """Metric name -> value for TensorBoard / W&B; last-round metrics only when they are new."""
    out: dict[str, float] = {
        "train/samples_per_s": float(snap.samples_per_s),
        "train/samples": float(snap.samples),
        "swarm/round": float(snap.round),
        "swarm/peers_seen": float(snap.peers_seen),
    }
    if snap.loss is not None:
        out["train/loss"] = float(snap.loss)
    if snap.val_loss is not None:
        out["val/loss"] = float(snap.val_loss)
    r = snap.last_round
    if include_round and r is not None:
        out["sync/duration_s"] = float(r.duration_s)
        out["sync/bytes_sent"] = float(r.bytes_sent)
        out["sync/members"] = float(r.members)
        out["sync/failed"] = 0.0 if r.status == "complete" else 1.0
    return out


# --------------------------------------------------------------------------- logging setup


_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARNING",
                logging.ERROR: "ERROR", logging.CRITICAL: "CRITICAL"}


class JsonLogFormatter(logging.Formatter):
    """Renders a log record as one line of JSON: ``{"t", "level", "logger", "msg"[, "exc"]}``.

    ``level`` uses the standard names (hivemind renames WARNING to "WARN" globally).
    """

    def format(self, record: logging.LogRecord) -> str:
        level = _LEVEL_NAMES.get(record.levelno, record.levelname)
        out: dict[str, Any] = {"t": round(record.created, 3), "level": level,
                               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def resolve_format(fmt: str, isatty: bool | None = None) -> Literal["rich", "text", "json"]:
    """Turn ``auto`` into ``rich`` (terminal on stderr and rich installed) or ``text``."""
    if fmt not in _FORMATS:
        raise ValueError(f"log format must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return fmt  # type: ignore[return-value]
    if isatty is None:
        isatty = _isatty(sys.stderr)
    if not isatty:
        return "text"
    try:
        import rich  # noqa: F401
    except ImportError:
        return "text"
    return "rich"


_OUR_HANDLER = "_swarmtrain_handler"


def configure_logging(fmt: str = "auto", *, level: int = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """Set up root logging for ``fmt``: one-line JSON records for ``json``, else plain text.

    Replaces earlier terminal handlers on the root logger (ours, or ``basicConfig``'s) with one
    handler on ``stream`` (default stderr), sets the root level, quiets hivemind and
    torch.distributed to WARNING and, if hivemind is loaded, routes its records through the root
    logger (:func:`adopt_hivemind_logging`). When ``fmt`` resolves to rich (a terminal, no
    ``stream``), the handler is already the rich one the live display uses, so the lines
    printed before the display starts look like those after. Returns the handler.
    """
    resolved = resolve_format(fmt, isatty=None if stream is None else False)  # validates
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _OUR_HANDLER, False) or _writes_to_terminal(h, stream):
            root.removeHandler(h)
    handler: logging.Handler
    if resolved == "rich":
        from rich.console import Console

        handler = _rich_handler(Console(stderr=True))
    else:
        handler = logging.StreamHandler(stream)  # None -> sys.stderr
        if fmt == "json":
            handler.setFormatter(JsonLogFormatter())
        else:
            handler.setFormatter(logging.Formatter(TEXT_LOG_FORMAT, datefmt=TEXT_DATE_FORMAT))
    setattr(handler, _OUR_HANDLER, True)
    root.addHandler(handler)
    root.setLevel(level)
    adopt_hivemind_logging()
    return handler


def adopt_hivemind_logging() -> None:
    """Make hivemind log through the root logger (so json/rich modes apply) at WARNING.

    hivemind installs its own colored stderr handler and stops propagation when it is first
    imported; this undoes that. A no-op until hivemind has been imported (never imports it).
    Call again after importing hivemind if logging was configured before.
    """
    hm = sys.modules.get("hivemind.utils.logging")
    if hm is not None and hasattr(hm, "use_hivemind_log_handler"):
        hm.use_hivemind_log_handler("nowhere")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- factory


def make_progress(cfg: LogConfig, *, stream: TextIO | None = None, isatty: bool | None = None,
                  console: Any = None, run_config: Mapping[str, Any] | None = None) -> Progress:
    """Build the display ``cfg.format`` asks for plus the optional TensorBoard / W&B sinks.

    ``stream``: where JSON lines go (default stdout) or the rich display draws (default
    stderr); text lines go through logging. ``isatty`` overrides terminal detection for
    ``auto``; ``console`` is a ready ``rich.console.Console`` for the rich display;
    ``run_config`` is recorded as the W&B run's config. Raises :class:`MissingDependencyError`
    (a ValueError) if an asked-for package is missing — call it before joining the swarm.
    """
    adopt_hivemind_logging()
    extra: list[Progress] = []
    try:
        if cfg.tensorboard_dir:
            extra.append(TensorBoardSink(cfg.tensorboard_dir))
        if cfg.wandb_project:
            extra.append(WandbSink(cfg.wandb_project, cfg.wandb_run_name, config=run_config))
        fmt = resolve_format(cfg.format, isatty=isatty)
        display: Progress
        if fmt == "rich":
            if console is None and stream is not None:
                from rich.console import Console

                console = Console(file=stream)
            display = RichProgress(console)
        elif fmt == "json":
            display = JsonProgress(stream)
        else:
            display = TextProgress()
    except BaseException:
        for sink in extra:
            try:
                sink.close()
            except Exception as e:  # already failing: report the first error, not the cleanup's
                logging.getLogger("swarmtrain").debug("closing %s after a failed start: %s", type(sink).__name__, e)
        raise
    return ProgressGroup([display, *extra], every_steps=cfg.every_steps)


# --------------------------------------------------------------------------- helpers


def _rich_handler(console: Any) -> logging.Handler:
    """The terminal log handler of rich mode (before and while the live display runs)."""
    from rich.logging import RichHandler

    return RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False, log_time_format="[%X]")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _writes_to_terminal(handler: logging.Handler, extra_stream: Any = None) -> bool:
    """A stream handler printing to stdout/stderr (or `extra_stream`), not a file handler."""
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    stream = getattr(handler, "stream", None)
    targets = [sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__]
    if extra_stream is not None:
        targets.append(extra_stream)
    return any(stream is t for t in targets if t is not None)
