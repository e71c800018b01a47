"""Tests for peer.progress: rich/text/json progress output, log routing, optional sinks."""
from __future__ import annotations

import io
import json
import logging
import re
import sys
import types

import pytest

from peer.settings import ConfigError, validate
from peer.progress import (
    JsonLogFormatter,
    JsonProgress,
    LogConfig,
    MissingDependencyError,
    Progress,
    ProgressGroup,
    ProgressSnapshot,
    RichProgress,
    RoundInfo,
    TensorBoardSink,
    TextProgress,
    WandbSink,
    configure_logging,
    fmt_bytes,
    fmt_rate,
    make_progress,
    resolve_format,
)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")

ROUND = RoundInfo(round=3, status="complete", duration_s=0.4172, bytes_sent=3_500_000, members=3, error=None)
FAILED = RoundInfo(round=4, status="failed", duration_s=30.0, bytes_sent=0, members=2, error="allreduce timeout")


def snap(step: int = 120, **kw) -> ProgressSnapshot:
    base = dict(step=step, loss=2.34123, samples_per_s=31.0, round=4, peers_seen=3, last_round=ROUND, samples=3840)
    return ProgressSnapshot(**{**base, **kw})


@pytest.fixture(autouse=True)
def restore_logging():
    """Every test leaves the root logger as it found it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


def rich_console():
    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=True, width=120)


def plain(console) -> str:
    return ANSI.sub("", console.file.getvalue())


# --------------------------------------------------------------------------- formatting


def test_fmt_bytes_and_rate():
    assert fmt_bytes(0) == "0 B"
    assert fmt_bytes(812) == "812 B"
    assert fmt_bytes(3_500_000) == "3.5 MB"
    assert fmt_bytes(1_234) == "1.2 kB"
    assert fmt_bytes(999_999) == "1.0 MB"
    assert fmt_bytes(2.5e9) == "2.5 GB"
    assert fmt_rate(31.0) == "31.0 samples/s"
    assert fmt_rate(12_345.0) == "12.3k samples/s"
    assert fmt_rate(0.25, "steps") == "0.25 steps/s"


# --------------------------------------------------------------------------- config


def test_log_config_defaults_and_validation():
    cfg = LogConfig()
    assert (cfg.format, cfg.every_steps, cfg.tensorboard_dir, cfg.wandb_project) == ("auto", 10, "", "")
    with pytest.raises(ValueError, match="format"):
        LogConfig(format="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_steps"):
        LogConfig(every_steps=0)
    with pytest.raises(ValueError, match="every_steps"):
        LogConfig(every_steps="often")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="wandb_project"):
        LogConfig(wandb_run_name="r1")


def test_log_config_through_the_loader():
    cfg = validate(LogConfig, {"format": "json", "every_steps": "5"})
    assert cfg.format == "json" and cfg.every_steps == 5
    with pytest.raises(ConfigError, match="every_steps"):
        validate(LogConfig, {"every_steps": "-1"})


def test_auto_picks_text_without_a_tty_and_rich_with_one():
    assert resolve_format("auto", isatty=False) == "text"
    assert resolve_format("auto", isatty=True) == "rich"
    assert resolve_format("json", isatty=True) == "json"
    p = make_progress(LogConfig(format="auto"), isatty=False)
    try:
        assert isinstance(p, ProgressGroup) and isinstance(p.sinks[0], TextProgress)
    finally:
        p.close()


# --------------------------------------------------------------------------- text


def test_text_mode_line(caplog):
    caplog.set_level(logging.INFO, logger="swarmtrain")
    with make_progress(LogConfig(format="text", every_steps=10), isatty=False) as p:
        p.update(snap(120))
    (rec,) = [r for r in caplog.records if r.name == "swarmtrain"]
    line = rec.getMessage()
    assert line == "step 120  loss 2.3412  31.0 samples/s  round 4  peers 3  last sync complete 0.42s 3.5 MB"


def test_text_mode_failed_round_and_missing_loss(caplog):
    caplog.set_level(logging.INFO, logger="swarmtrain")
    TextProgress().update(snap(7, loss=None, val_loss=2.0, last_round=FAILED))
    line = caplog.records[-1].getMessage()
    assert line.startswith("step 7  loss -  val 2.0000  ")
    assert "last sync failed 30.00s 0 B (allreduce timeout)" in line


def test_throttling_every_steps_round_change_and_force(caplog):
    caplog.set_level(logging.INFO, logger="swarmtrain")
    p = make_progress(LogConfig(format="text", every_steps=10), isatty=False)
    p.update(snap(1, last_round=None))  # first one always
    for step in range(2, 25):
        p.update(snap(step, last_round=None))  # 10, 20
    p.update(snap(25, last_round=ROUND))  # a new all-reduce result
    p.update(snap(26, last_round=ROUND))  # nothing new
    p.update(snap(27, last_round=ROUND), force=True)  # final line
    p.close()
    p.update(snap(30))  # ignored after close
    steps = [int(r.getMessage().split()[1]) for r in caplog.records if r.name == "swarmtrain"]
    assert steps == [1, 10, 20, 25, 27]


# --------------------------------------------------------------------------- json


def test_json_mode_lines_parse_with_all_fields():
    out = io.StringIO()
    with make_progress(LogConfig(format="json", every_steps=1), stream=out) as p:
        p.update(snap(1, val_loss=2.1))
        p.update(snap(2, loss=float("nan"), last_round=None))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "progress" and isinstance(first["t"], float)
    assert {"step", "loss", "samples_per_s", "round", "peers_seen", "last_round", "val_loss", "samples"} <= first.keys()
    assert first["step"] == 1 and first["val_loss"] == 2.1 and first["samples"] == 3840
    assert first["last_round"] == {"round": 3, "status": "complete", "duration_s": 0.4172,
                                   "bytes_sent": 3_500_000, "members": 3, "error": None}
    assert second["loss"] is None and second["last_round"] is None  # NaN -> null: strict JSON


def test_json_progress_defaults_to_current_stdout(capsys):
    JsonProgress().update(snap(5))
    assert json.loads(capsys.readouterr().out)["step"] == 5


def test_json_log_formatter():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = logging.getLogger("swarmtrain").makeRecord(
            "swarmtrain", logging.WARNING, __file__, 1, "round %d: %s", (4, 'a "quoted"\nmsg'), sys.exc_info())
    line = JsonLogFormatter().format(rec)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "WARNING" and obj["logger"] == "swarmtrain"
    assert obj["msg"] == 'round 4: a "quoted"\nmsg' and isinstance(obj["t"], float)
    assert "RuntimeError: boom" in obj["exc"]


def test_configure_logging_json_makes_every_record_json():
    err = io.StringIO()
    configure_logging("json", stream=err)
    logging.getLogger("swarmtrain").info("hello %s", "world")
    logging.getLogger("hivemind.dht").info("chatty")  # quieted to WARNING
    logging.getLogger("hivemind.dht").warning("important")
    lines = [json.loads(line) for line in err.getvalue().splitlines()]
    assert [(x["logger"], x["msg"]) for x in lines] == [("swarmtrain", "hello world"), ("hivemind.dht", "important")]
    configure_logging("text", stream=err)  # replaces, does not stack
    ours = [h for h in logging.getLogger().handlers if getattr(h, "stream", None) is err]
    assert len(ours) == 1 and not isinstance(ours[0].formatter, JsonLogFormatter)


# --------------------------------------------------------------------------- rich


def test_rich_mode_renders_status():
    console = rich_console()
    p = make_progress(LogConfig(format="rich"), console=console)
    assert isinstance(p, ProgressGroup) and isinstance(p.sinks[0], RichProgress)
    p.update(snap(120, val_loss=2.2))
    p.close()
    text = plain(console)
    for part in ("step 120", "loss 2.3412", "val 2.2000", "31.0 samples/s", "round 4", "peers seen 3",
                 "last all-reduce: round 3 complete in 0.42 s, 3.5 MB, 3 peers"):
        assert part in text, (part, text)


def test_rich_mode_gets_every_step_and_shows_failures():
    console = rich_console()
    with make_progress(LogConfig(format="rich", every_steps=100), console=console) as p:
        p.update(snap(1))
        p.update(snap(2, last_round=FAILED))
        p.update(snap(3, last_round=FAILED))
    text = plain(console)
    assert "step 3" in text and "round 4 failed after 30.00 s: allreduce timeout" in text


def test_logs_visible_while_rich_is_active_and_handlers_restored():
    root = logging.getLogger()
    term = logging.StreamHandler(sys.stderr)  # what configure_logging/basicConfig installs
    keep = logging.StreamHandler(io.StringIO())  # not a terminal: left alone
    root.addHandler(term)
    root.addHandler(keep)
    root.setLevel(logging.INFO)
    before = list(root.handlers)
    console = rich_console()
    p = RichProgress(console)
    try:
        assert term not in root.handlers and keep in root.handlers
        p.update(snap(5))
        logging.getLogger("swarmtrain").info("joined the swarm with %d peers", 3)
    finally:
        p.close()
    assert sorted(map(id, root.handlers)) == sorted(map(id, before))
    text = plain(console)
    assert "joined the swarm with 3 peers" in text
    assert text.index("joined the swarm") < text.rindex("step 5")  # above the final status block
    assert "joined the swarm with 3 peers" in keep.stream.getvalue()
    p.close()  # idempotent


# --------------------------------------------------------------------------- optional sinks


def test_missing_tensorboard_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MissingDependencyError) as e:
        make_progress(LogConfig(format="text", tensorboard_dir=str(tmp_path)), isatty=False)
    assert str(e.value) == "--log.tensorboard-dir needs the tensorboard package: pip install tensorboard"
    assert isinstance(e.value, ValueError) and isinstance(e.value, ImportError)


def test_missing_wandb_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError) as e:
        make_progress(LogConfig(format="text", wandb_project="proj"), isatty=False)
    assert str(e.value) == "--log.wandb-project needs the wandb package: pip install wandb"


class FakeWriter:
    instances: list[FakeWriter] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, value, global_step))

    def close(self) -> None:
        self.closed = True


def test_tensorboard_sink_writes_scalars(monkeypatch, tmp_path):
    import torch.utils  # noqa: F401  (the real parent package)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    FakeWriter.instances.clear()
    sink = TensorBoardSink(str(tmp_path))
    sink.update(snap(10, val_loss=2.5))
    sink.update(snap(20))  # same last round: not repeated
    sink.close()
    (w,) = FakeWriter.instances
    assert w.log_dir == str(tmp_path) and w.closed
    at10 = {tag: v for tag, v, step in w.scalars if step == 10}
    at20 = {tag: v for tag, v, step in w.scalars if step == 20}
    assert at10["train/loss"] == pytest.approx(2.34123) and at10["val/loss"] == 2.5
    assert at10["train/samples_per_s"] == 31.0 and at10["swarm/round"] == 4 and at10["swarm/peers_seen"] == 3
    assert at10["sync/duration_s"] == pytest.approx(0.4172) and at10["sync/bytes_sent"] == 3_500_000
    assert "sync/bytes_sent" not in at20 and "train/loss" in at20


def test_wandb_sink_logs_and_finishes(monkeypatch):
    calls: dict = {"log": []}

    class Run:
        def log(self, metrics, step):
            calls["log"].append((step, metrics))

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    p = make_progress(LogConfig(format="text", wandb_project="proj", wandb_run_name="r1"), isatty=False,
                      run_config={"sync": {"every_steps": 50}})
    p.update(snap(10))
    p.close()
    assert calls["init"] == {"project": "proj", "name": "r1", "config": {"sync": {"every_steps": 50}}}
    assert calls["log"][0][0] == 10 and calls["log"][0][1]["train/loss"] == pytest.approx(2.34123)
    assert calls["finished"]


def test_wandb_init_failure_is_one_line(monkeypatch):
    def init(**kw):
        raise RuntimeError("no API key\nrun `wandb login`")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with pytest.raises(ValueError, match="^--log.wandb-project: could not start a W&B run: RuntimeError: no API key run `wandb login`$"):
        WandbSink("proj")


# --------------------------------------------------------------------------- failure isolation


class Boom(Progress):
    name = "boom"

    def __init__(self) -> None:
        self.calls = 0
        self.closed = False

    def update(self, snap, *, force=False):
        self.calls += 1
        raise OSError("disk full")

    def close(self):
        self.closed = True


def test_failing_sink_is_disabled_once_and_others_keep_working(caplog):
    caplog.set_level(logging.INFO, logger="swarmtrain")
    out = io.StringIO()
    boom = Boom()
    group = ProgressGroup([boom, JsonProgress(out)], every_steps=1)
    for step in (1, 2, 3):
        group.update(snap(step))
    group.close()
    assert boom.calls == 1 and boom.closed and boom not in group.sinks
    assert [json.loads(line)["step"] for line in out.getvalue().splitlines()] == [1, 2, 3]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "boom" in warnings[0].getMessage() and "disk full" in warnings[0].getMessage()


def test_keyboard_interrupt_in_a_sink_is_not_swallowed():
    class Interrupt(Progress):
        def update(self, snap, *, force=False):
            raise KeyboardInterrupt

    group = ProgressGroup([Interrupt()])
    with pytest.raises(KeyboardInterrupt):
        group.update(snap(1))


def test_failing_rich_display_gives_log_handlers_back(monkeypatch):
    root = logging.getLogger()
    term = logging.StreamHandler(sys.stderr)
    root.addHandler(term)
    p = make_progress(LogConfig(format="rich"), console=rich_console())
    rich_sink = p.sinks[0]
    assert term not in root.handlers
    monkeypatch.setattr(rich_sink, "_render", lambda: 1 / 0)
    p.update(snap(1))
    assert p.sinks == [] and term in root.handlers and rich_sink._handler not in root.handlers
    p.close()


def test_optional_sink_closed_if_display_fails(monkeypatch, tmp_path):
    import peer.progress as progress

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    FakeWriter.instances.clear()

    def broken(*a, **kw):
        raise MissingDependencyError("--log.format rich needs the rich package: pip install rich")

    monkeypatch.setattr(progress, "RichProgress", broken)
    with pytest.raises(MissingDependencyError):
        make_progress(LogConfig(format="rich", tensorboard_dir=str(tmp_path)))
    assert FakeWriter.instances[0].closed


def test_the_final_forced_update_does_not_repeat_the_last_line(caplog):
    """Text mode printed the last step line twice: once at its step, once as the forced final update."""
    caplog.set_level(logging.INFO, logger="swarmtrain")
    p = ProgressGroup([TextProgress()], every_steps=10)
    p.update(snap(20, last_round=ROUND))
    p.update(snap(20, last_round=ROUND), force=True)
    p.update(snap(21, last_round=ROUND), force=True)  # a new snapshot is still forced out
    assert [m.split("  ")[0] for m in caplog.messages] == ["step 20", "step 21"]


def test_on_a_terminal_the_lines_before_the_live_display_look_like_those_during_it(monkeypatch):
    """configure_logging on a terminal (auto) installs the same rich handler the live display
    uses, so the first lines (joining, the model) are not in another format; the display swaps
    it for its own while it runs and puts it back."""
    from rich.logging import RichHandler

    from peer import progress

    monkeypatch.setattr(progress, "_isatty", lambda stream: True)
    root = logging.getLogger()
    saved = root.handlers[:]
    try:
        h = progress.configure_logging("auto")
        assert isinstance(h, RichHandler) and h in root.handlers
        display = progress.RichProgress(rich_console())
        assert h not in root.handlers and sum(isinstance(x, RichHandler) for x in root.handlers) == 1
        display.close()
        assert h in root.handlers
    finally:
        root.handlers = saved
