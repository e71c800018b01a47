"""Tests for peer.settings: config dataclasses from defaults < TOML < SWARMTRAIN_* variables < flags."""

import argparse
import io
import sys
from contextlib import redirect_stdout
from typing import Literal

import pytest
from pydantic import Field
from pydantic.dataclasses import dataclass

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from averaging.config import SETTINGS
from peer import settings
from peer.settings import CLI_SOURCE, ConfigError, Flags, dump_toml, load, load_toml, to_dict, validate


@dataclass(kw_only=True, config=SETTINGS)
class Sync:
    every_steps: int = Field(10, description="outer steps between averaging rounds")
    every_seconds: float | None = Field(None, description="also average after this many seconds")
    rate: float = Field(0.7, description="learning rate (100% = 1.0)")
    momentum: bool = Field(True, description="use momentum in the optimizer")
    mode: Literal["a", "b"] = Field("a", description="averaging mode")

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {self.every_steps}")


@dataclass(kw_only=True, config=SETTINGS)
class Net:
    initial_peers: list[str] = Field(default_factory=list, description="multiaddrs of peers to join")
    ports: list[int] = Field(default_factory=lambda: [4000, 4001], description="ports to listen on")
    host: str = Field("0.0.0.0", description="address to bind")
    timeout: float | None = Field(None, description="RPC timeout in seconds")


@dataclass(kw_only=True, config=SETTINGS)
class Root:
    run_name: str = Field("default", description="name of this run")
    sync: Sync = Field(default_factory=Sync, description="averaging settings")
    net: Net = Field(default_factory=Net, description="networking settings")


def one_line(exc_info: pytest.ExceptionInfo) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg == msg.strip() and msg
    return msg


def flags(*argv: str, cls=Root, notes=None) -> dict:
    parser = argparse.ArgumentParser(prog="swarm-test", allow_abbrev=False)
    parser.add_argument("--config")
    f = Flags(parser, cls)
    return f.values(f.parse(list(argv), note=(notes.append if notes is not None else None)))


def write(tmp_path, text: str, name: str = "cfg.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run(tmp_path=None, text=None, argv=(), env=None, **kw):
    path = write(tmp_path, text) if text is not None else None
    return load(Root, path=path, flags=flags(*argv), environ=env or {}, **kw)


# ----------------------------------------------------------------------------- sources


def test_defaults():
    cfg = run()
    assert cfg == Root()
    assert cfg.sync.every_steps == 10 and cfg.sync.momentum is True and cfg.sync.mode == "a"
    assert cfg.net.initial_peers == [] and cfg.net.timeout is None and cfg.net.ports == [4000, 4001]
    assert Root().net.ports is not Root().net.ports  # a list default is not shared


def test_precedence_defaults_file_env_flags(tmp_path):
    text = "run_name = 'file'\n[sync]\nevery_steps = 25\nrate = 0.5\nmode = 'b'\n"
    env = {"SWARMTRAIN_SYNC__RATE": "0.25", "SWARMTRAIN_SYNC__EVERY_STEPS": "7", "OTHER": "x"}
    cfg = run(tmp_path, text, ["--sync.every-steps", "3"], env)
    assert (cfg.run_name, cfg.sync.every_steps, cfg.sync.rate, cfg.sync.mode) == ("file", 3, 0.25, "b")
    assert cfg.net == Net()  # untouched sections keep their defaults
    # the variables' names are case-insensitive; a list or table in a variable is JSON
    cfg = run(env={"swarmtrain_net__initial_peers": '["/ip4/1.1.1.1/tcp/1"]', "SWARMTRAIN_NET": '{"host": "::"}'})
    assert cfg.net.initial_peers == ["/ip4/1.1.1.1/tcp/1"] and cfg.net.host == "::"
    # no prefix: the environment is not read
    assert load(Root, env_prefix=None) == Root()


def test_os_environ_is_read(monkeypatch):
    monkeypatch.setenv("SWARMTRAIN_SYNC__EVERY_SECONDS", "30")
    assert load(Root).sync.every_seconds == 30.0


def test_only_given_flags_are_values():
    assert flags() == {}
    assert flags("--sync.every-steps", "4", "--no-sync.momentum") == {"sync": {"every_steps": "4", "momentum": False}}


@pytest.mark.parametrize("argv, expected", [
    ([], True), (["--sync.momentum"], True), (["--no-sync.momentum"], False),
    (["--no-sync.momentum", "--sync.momentum"], True),  # the last one wins
])
def test_bool_flags(argv, expected):
    assert run(argv=argv).sync.momentum is expected


def test_the_old_negative_flag_works_with_a_note():
    notes = []
    assert flags("--sync.no-momentum", notes=notes) == {"sync": {"momentum": False}}
    assert notes == ["--sync.no-momentum is now --no-sync.momentum"]


@pytest.mark.parametrize("text, expected", [("true", True), ("No", False), ("1", True), ("off", False)])
def test_bool_from_string(text, expected):
    assert validate(Root, {"sync": {"momentum": text}}).sync.momentum is expected


def test_lists_from_flags():
    cfg = run(argv=["--net.initial-peers", "/ip4/1.1.1.1/tcp/1,/ip4/2.2.2.2/tcp/2", "--net.ports", "5,6"])
    assert cfg.net.initial_peers == ["/ip4/1.1.1.1/tcp/1", "/ip4/2.2.2.2/tcp/2"]
    assert cfg.net.ports == [5, 6]
    assert run(argv=["--net.ports", "[]"]).net.ports == []
    # a repeated flag adds to the list
    assert run(argv=["--net.ports", "1", "--net.ports", "2,3"]).net.ports == [1, 2, 3]


def test_none_from_flags(tmp_path):
    text = "[net]\ntimeout = 3.0\n"
    assert run(tmp_path, text).net.timeout == 3.0
    assert run(tmp_path, text, ["--net.timeout", "none"]).net.timeout is None
    cfg = run(argv=["--net.timeout", "0.25", "--sync.every-seconds", "30"])
    assert cfg.net.timeout == 0.25 and cfg.sync.every_seconds == 30.0


def test_integral_float_accepted_for_int():
    assert validate(Root, {"sync": {"every_steps": 4.0}}).sync.every_steps == 4


def test_help_shows_text_and_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    parser = argparse.ArgumentParser(prog="swarm-test")
    Flags(parser, Root)
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(out.getvalue().split())
    assert "--sync.every-steps int outer steps between averaging rounds (default: 10)" in text
    assert "--sync.momentum, --no-sync.momentum" in text
    assert "(100% = 1.0)" in text
    assert "sync options: averaging settings" in text


def test_renamed_keys_work_everywhere_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(settings.RENAMED, "sync.wait", "net.timeout")  # a key that moved to another section
    notes = []
    assert flags("--sync.wait", "2", notes=notes) == {"net": {"timeout": "2"}}
    assert flags("--sync.wait=4") == {"net": {"timeout": "4"}}
    assert notes == ["--sync.wait is now --net.timeout"]
    notes.clear()
    cfg = load(Root, path=write(tmp_path, "[sync]\nwait = 3.0\n"), environ={"SWARMTRAIN_SYNC__WAIT": "5"},
               note=notes.append)
    assert cfg.net.timeout == 5.0  # the variable wins over the file, as the new name would
    assert notes == [f"'sync.wait' in {tmp_path / 'cfg.toml'} is now 'net.timeout'",
                     "'sync.wait' in the environment is now 'net.timeout'"]


def test_the_flat_sync_keys_of_earlier_versions_still_work(tmp_path):
    """[sync] was flat before its components got sections: old flags, file keys and variables
    load the same config as the new names, each with a note."""
    from peer.cli import parse
    from peer.config import RunConfig

    notes = []
    path = write(tmp_path, "[sync]\ncompression = 'int8'\naggregator = 'trimmed_mean'\nmin_group_size = 5\n")
    old = load(RunConfig, path=path, environ={"SWARMTRAIN_SYNC__MATCHMAKING_WINDOW": "30"}, note=notes.append,
               flags={"sync": {"outer": {"lr": "0.5"}}})
    new = load(RunConfig, path=write(tmp_path, "[sync.codec]\nname = 'int8'\n[sync.aggregator]\nname = 'trimmed_mean'\n"
                                               "[sync.matchmaking]\nmin_group_size = 5\nwindow = 30\n[sync.outer]\nlr = 0.5\n"),
               environ={})
    assert old == new and new.sync.codec.name == "int8" and new.sync.matchmaking.window == 30
    assert len(notes) == 4 and "'sync.matchmaking_window' in the environment is now 'sync.matchmaking.window'" in notes
    argv = ["--sync.compression", "sparse", "--sync.no-nesterov", "--sync.aggregator=centered_clip",
            "--sync.min-group-size", "3", "--sync.matchmaking-window", "20", "--sync.allreduce-timeout", "9"]
    cfg = parse(argv)
    assert (cfg.sync.codec.name, cfg.sync.outer.nesterov, cfg.sync.aggregator.name) == ("sparse", False, "centered_clip")
    assert (cfg.sync.matchmaking.min_group_size, cfg.sync.matchmaking.window, cfg.sync.allreduce.timeout) == (3, 20, 9)
    assert cfg == parse(["--sync.codec.name", "sparse", "--no-sync.outer.nesterov", "--sync.aggregator.name",
                         "centered_clip", "--sync.matchmaking.min-group-size", "3", "--sync.matchmaking.window", "20",
                         "--sync.allreduce.timeout", "9"])


# ----------------------------------------------------------------------------- errors: one line, naming key and source


def test_a_bad_flag_names_the_key_and_the_flags(tmp_path):
    with pytest.raises(ConfigError) as ei:
        run(tmp_path, "[sync]\nevery_steps = 25\n", ["--sync.every-steps", "abc"])
    assert one_line(ei) == ("config key 'sync.every_steps': input should be a valid integer, unable to parse string "
                            f"as an integer, got 'abc' (in {CLI_SOURCE})")


def test_a_bad_variable_names_the_variable():
    with pytest.raises(ConfigError) as ei:
        run(env={"SWARMTRAIN_SYNC__MODE": "c"})
    assert one_line(ei) == ("config key 'sync.mode': input should be 'a' or 'b', got 'c' "
                            "(in environment variable SWARMTRAIN_SYNC__MODE)")
    with pytest.raises(ConfigError) as ei:
        run(env={"SWARMTRAIN_NET__PORTS": "1,2"})  # not JSON
    assert "written as JSON" in one_line(ei)


def test_unknown_keys_in_a_file(tmp_path):
    path = write(tmp_path, "[sync]\nevery_stepz = 3\n")
    with pytest.raises(ConfigError) as ei:
        load(Root, path=path, environ={})
    msg = one_line(ei)
    assert msg.startswith(f"unknown config key 'sync.every_stepz' (in {path}) (known keys: every_steps, every_seconds,")
    assert msg.endswith("did you mean 'every_steps'?")
    with pytest.raises(ConfigError) as ei:
        load(Root, path=write(tmp_path, "[synk]\na = 1\n"), environ={})
    assert one_line(ei).endswith("(known keys: run_name, sync, net); did you mean 'sync'?")
    with pytest.raises(ConfigError) as ei:
        validate(Root, {"sync": {"every-steps": 3}})
    assert one_line(ei).endswith("did you mean 'every_steps'?")
    with pytest.raises(ConfigError) as ei:
        validate(Root, {"net": {"zzz": 3}})
    assert "did you mean" not in one_line(ei)


def test_an_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as ei:
        flags("--sync.every-stepz", "3")
    assert ei.value.code == 2
    assert "--sync.every-stepz" in capsys.readouterr().err


@pytest.mark.parametrize("values, expected", [
    ({"sync": {"every_steps": True}}, None),  # pydantic: a bool is an int (1)
    ({"sync": {"every_steps": 1.5}}, "config key 'sync.every_steps': input should be a valid integer, got a number"),
    ({"sync": {"momentum": "maybe"}}, "config key 'sync.momentum': input should be a valid boolean"),
    ({"sync": {"rate": "fast"}}, "config key 'sync.rate': input should be a valid number"),
    ({"net": {"initial_peers": "a,b"}}, "config key 'net.initial_peers': input should be a valid list"),
    ({"net": {"ports": [1, "x"]}}, "config key 'net.ports[1]': input should be a valid integer"),
    ({"net": {"host": 5}}, "config key 'net.host': input should be a valid string, got 5"),
    ({"sync": 3}, "config key 'sync': input should be a dictionary or an instance of Sync"),
    ({"run_name": {"a": 1}}, "config key 'run_name': input should be a valid string"),
])
def test_wrong_types(values, expected):
    if expected is None:
        assert validate(Root, values).sync.every_steps == 1
        return
    with pytest.raises(ConfigError) as ei:
        validate(Root, values)
    assert one_line(ei).startswith(expected)


def test_a_wrong_type_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path, "[net]\ntimeout = 'soon'\n")
    with pytest.raises(ConfigError) as ei:
        load(Root, path=path, environ={})
    assert one_line(ei).endswith(f"got 'soon' (in {path})")


def test_a_rule_of_post_init_names_its_section(tmp_path):
    with pytest.raises(ConfigError) as ei:
        run(tmp_path, "[sync]\nevery_steps = 0\n")
    assert one_line(ei) == f"invalid config: sync: every_steps must be >= 1, got 0 (in {tmp_path / 'cfg.toml'})"


@pytest.mark.parametrize("text, expected", [
    ("[sync\n", "invalid TOML in"),
    (b"\xff\xfe", "not valid UTF-8"),
    ("x = " + "9" * 5000, "invalid TOML in"),
])
def test_invalid_toml(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as ei:
        load_toml(path)
    assert expected in one_line(ei)


def test_missing_file_directory_and_nul(tmp_path):
    for path, expected in [(tmp_path / "nope.toml", "config file not found"), (tmp_path, "is a directory"),
                           ("a\x00b", "invalid TOML in")]:
        with pytest.raises(ConfigError) as ei:
            load(Root, path=path, environ={})
        assert expected in one_line(ei)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    assert str(ConfigError("a\n  b")) == "a b"


# ----------------------------------------------------------------------------- --print-config


def test_to_dict():
    d = to_dict(Root())
    assert d["sync"]["every_steps"] == 10 and d["net"]["ports"] == [4000, 4001]
    assert validate(Root, d) == Root()


@pytest.mark.parametrize("cfg", [
    Root(),
    Root(run_name='we"ird \\ name\n\ttab \x01 ünïcødé 🚀',
         sync=Sync(every_steps=1, every_seconds=12.5, rate=1e-05, momentum=False, mode="b"),
         net=Net(initial_peers=["/ip4/1.2.3.4/tcp/1", "a,b", ""], ports=[], host="", timeout=0.0)),
    Root(sync=Sync(rate=float("inf")), net=Net(ports=[-1, 2**40], timeout=1e300)),
])
def test_dump_toml_round_trip(cfg):
    assert validate(Root, tomllib.loads(dump_toml(cfg))) == cfg


def test_dump_toml_shape():
    text = dump_toml(Root())
    data = tomllib.loads(text)
    assert "timeout" not in data["net"] and "every_seconds" not in data["sync"]  # None: left out
    assert text.index("run_name =") < text.index("[sync]") < text.index("[net]")
    assert "# outer steps between averaging rounds\nevery_steps = 10\n" in text
    assert "# averaging settings\n[sync]\n" in text


def test_the_real_configs_round_trip(tmp_path):
    from bootstrap.config import BootstrapConfig
    from peer.config import RunConfig

    for cfg in (RunConfig(), BootstrapConfig(), load(RunConfig, flags={"sync": {"codec": {"name": "sparse"}}}, environ={})):
        path = write(tmp_path, dump_toml(cfg))
        assert load(type(cfg), path=path, environ={}) == cfg
