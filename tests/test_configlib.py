"""Tests for peer.configlib: nested dataclass configs from TOML + CLI flags."""

import argparse
import dataclasses
import io
import sys
from contextlib import redirect_stdout
from typing import Literal, Optional

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from peer.configlib import (
    CLI_SOURCE,
    ConfigError,
    add_arguments,
    build,
    doc,
    dump_toml,
    load,
    load_toml,
    merge,
    overrides_from_namespace,
    to_dict,
)


@dataclasses.dataclass(kw_only=True)
class Sync:
    every_steps: int = doc(10, "outer steps between averaging rounds")
    every_seconds: float | None = doc(None, "also average after this many seconds")
    outer_lr: float = doc(0.7, "outer learning rate (100% = 1.0)")
    nesterov: bool = doc(True, "use Nesterov momentum in the outer optimizer")
    mode: Literal["a", "b"] = doc("a", "averaging mode")

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {self.every_steps}")


@dataclasses.dataclass(kw_only=True)
class Net:
    initial_peers: list[str] = doc([], "multiaddrs of peers to join")
    ports: list[int] = doc([4000, 4001], "ports to listen on")
    host: str = doc("0.0.0.0", "address to bind")
    timeout: float | None = doc(None, "RPC timeout in seconds")
    retries: Optional[int] = doc(3, "retries; none = unlimited")


@dataclasses.dataclass(kw_only=True)
class Root:
    run_name: str = doc("default", "name of this run")
    sync: Sync = doc(Sync, "averaging settings")
    net: Net = doc(Net, "networking settings")


@dataclasses.dataclass(kw_only=True)
class Required:
    name: str = doc(help="required name")
    level: "int" = doc(1, "string annotation")  # noqa: F821  (resolved via get_type_hints)


def one_line(exc_info: pytest.ExceptionInfo) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg == msg.strip() and msg
    return msg


def make_parser(cls=Root) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-test")
    parser.add_argument("--config")
    add_arguments(parser, cls)
    return parser


def cli(*argv: str, cls=Root) -> dict:
    return overrides_from_namespace(make_parser(cls).parse_args(list(argv)), cls)


def write(tmp_path, text: str, name: str = "cfg.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- basics


def test_defaults():
    cfg = build(Root, {})
    assert cfg == Root()
    assert cfg.sync.every_steps == 10 and cfg.sync.nesterov is True and cfg.sync.mode == "a"
    assert cfg.net.initial_peers == [] and cfg.net.timeout is None and cfg.net.ports == [4000, 4001]
    assert load(Root, path=None, cli_overrides={}) == Root()


def test_doc_list_default_is_not_shared_and_help_is_metadata():
    a, b = Net(), Net()
    a.ports.append(9)
    assert b.ports == [4000, 4001]
    f = {f.name: f for f in dataclasses.fields(Net)}
    assert f["ports"].metadata["help"] == "ports to listen on"
    assert Root().sync is not Root().sync


def test_load_toml_file(tmp_path):
    path = write(
        tmp_path,
        """
run_name = "exp1"
[sync]
every_steps = 25
outer_lr = 1          # int accepted for float
nesterov = false
mode = "b"
[net]
initial_peers = ["/ip4/1.2.3.4/tcp/31337/p2p/QmA", "/dns/x/tcp/1"]
timeout = 2.5
""",
    )
    assert load_toml(path)["sync"]["every_steps"] == 25
    cfg = load(Root, path=path, cli_overrides={})
    assert cfg.run_name == "exp1"
    assert cfg.sync == Sync(every_steps=25, outer_lr=1.0, nesterov=False, mode="b")
    assert isinstance(cfg.sync.outer_lr, float)
    assert cfg.net.initial_peers == ["/ip4/1.2.3.4/tcp/31337/p2p/QmA", "/dns/x/tcp/1"]
    assert cfg.net.timeout == 2.5 and cfg.net.host == "0.0.0.0"


def test_integral_float_accepted_for_int():
    assert build(Root, {"sync": {"every_steps": 3.0}}).sync.every_steps == 3


def test_cli_overrides_win_over_toml(tmp_path):
    path = write(tmp_path, '[sync]\nevery_steps = 25\nouter_lr = 0.5\n[net]\nhost = "10.0.0.1"\n')
    overrides = cli("--sync.every-steps", "7", "--net.timeout", "1.5", "--run-name", "cli")
    assert overrides == {"run_name": "cli", "sync": {"every_steps": "7"}, "net": {"timeout": "1.5"}}
    cfg = load(Root, path=path, cli_overrides=overrides)
    assert cfg.sync.every_steps == 7  # CLI beats file
    assert cfg.sync.outer_lr == 0.5  # file beats default
    assert cfg.net.host == "10.0.0.1"
    assert cfg.net.timeout == 1.5
    assert cfg.run_name == "cli"


def test_only_given_flags_reach_namespace():
    ns = make_parser().parse_args([])
    assert overrides_from_namespace(ns, Root) == {}
    assert not any(k.startswith(("sync.", "net.")) for k in vars(ns))


def test_add_arguments_with_prefix():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Sync, prefix="sync")
    ns = parser.parse_args(["--sync.every-steps", "4", "--sync.no-nesterov"])
    ov = overrides_from_namespace(ns, Sync, prefix="sync.")
    assert ov == {"every_steps": "4", "nesterov": False}
    assert build(Sync, ov) == Sync(every_steps=4, nesterov=False)


def test_help_shows_text_and_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")  # force usage wrapping (argparse asserts on odd metavars)
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        make_parser().parse_args(["--help"])
    text = " ".join(out.getvalue().split())
    assert "--sync.every-steps INT" in text
    assert "outer steps between averaging rounds (default: 10)" in text
    assert "--sync.nesterov, --sync.no-nesterov" in text
    assert "(100% = 1.0)" in text
    assert "comma-separated" in text and "4000,4001" in text
    assert "'none' for none" in text
    assert "[sync]" in text and "averaging settings" in text


# ----------------------------------------------------------------------------- CLI types


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], True),
        (["--sync.nesterov"], True),
        (["--sync.no-nesterov"], False),
        (["--sync.no-nesterov", "--sync.nesterov"], True),  # last one wins
    ],
)
def test_bool_from_cli(argv, expected):
    ov = cli(*argv)
    if argv:
        assert ov["sync"]["nesterov"] is expected
    assert build(Root, ov).sync.nesterov is expected


@pytest.mark.parametrize("text, expected", [("true", True), ("No", False), ("1", True), ("off", False)])
def test_bool_from_string(text, expected):
    assert build(Root, {"sync": {"nesterov": text}}).sync.nesterov is expected


def test_list_from_cli():
    cfg = build(Root, cli("--net.initial-peers", "/ip4/1.1.1.1/tcp/1, /ip4/2.2.2.2/tcp/2", "--net.ports", "5,6"))
    assert cfg.net.initial_peers == ["/ip4/1.1.1.1/tcp/1", "/ip4/2.2.2.2/tcp/2"]
    assert cfg.net.ports == [5, 6]
    assert build(Root, cli("--net.ports", "")).net.ports == []
    # a repeated flag replaces the earlier value
    assert build(Root, cli("--net.ports", "1", "--net.ports", "2,3")).net.ports == [2, 3]


def test_optional_none_from_cli(tmp_path):
    path = write(tmp_path, "[net]\ntimeout = 3.0\nretries = 5\n")
    assert load(Root, path=path, cli_overrides={}).net.timeout == 3.0
    cfg = load(Root, path=path, cli_overrides=cli("--net.timeout", "none", "--net.retries", "None"))
    assert cfg.net.timeout is None and cfg.net.retries is None
    cfg = build(Root, cli("--net.timeout", "0.25", "--sync.every-seconds", "30"))
    assert cfg.net.timeout == 0.25 and cfg.sync.every_seconds == 30.0


def test_cli_error_names_command_line(tmp_path):
    path = write(tmp_path, "[sync]\nevery_steps = 25\n")
    with pytest.raises(ConfigError) as ei:
        load(Root, path=path, cli_overrides=cli("--sync.every-steps", "abc"))
    assert one_line(ei) == f"config key 'sync.every_steps' must be int, got str 'abc' (in {CLI_SOURCE})"


# ----------------------------------------------------------------------------- errors


def test_unknown_nested_key_in_file(tmp_path):
    path = write(tmp_path, "[sync]\nevery_stepz = 3\n")
    with pytest.raises(ConfigError) as ei:
        load(Root, path=path, cli_overrides={})
    msg = one_line(ei)
    assert msg.startswith(f"unknown config key 'sync.every_stepz' in {path} (known keys: every_steps, every_seconds,")
    assert msg.endswith("did you mean 'every_steps'?")


def test_unknown_top_level_key_in_file(tmp_path):
    path = write(tmp_path, "[synk]\nevery_steps = 3\n")
    with pytest.raises(ConfigError) as ei:
        load(Root, path=path, cli_overrides={})
    msg = one_line(ei)
    assert "'synk'" in msg and str(path) in msg and "did you mean 'sync'?" in msg
    assert "known keys: run_name, sync, net" in msg


def test_unknown_key_dashed_and_no_suggestion():
    with pytest.raises(ConfigError) as ei:
        build(Root, {"net": {"initial-peers": []}}, source="x.toml")
    assert "did you mean 'initial_peers'?" in one_line(ei)
    with pytest.raises(ConfigError) as ei:
        build(Root, {"net": {"zzzzzz": 1}})
    msg = one_line(ei)
    assert "unknown config key 'net.zzzzzz' in config" in msg and "did you mean" not in msg


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"sync": {"every_steps": "abc"}}, "config key 'sync.every_steps' must be int, got str 'abc'"),
        ({"sync": {"every_steps": True}}, "config key 'sync.every_steps' must be int, got bool True"),
        ({"sync": {"every_steps": 1.5}}, "config key 'sync.every_steps' must be int, got float 1.5"),
        ({"sync": {"outer_lr": "fast"}}, "config key 'sync.outer_lr' must be float, got str 'fast'"),
        ({"sync": {"outer_lr": False}}, "config key 'sync.outer_lr' must be float, got bool False"),
        ({"sync": {"nesterov": "maybe"}}, "config key 'sync.nesterov' must be bool, got str 'maybe'"),
        ({"sync": {"nesterov": 1}}, "config key 'sync.nesterov' must be bool, got int 1"),
        ({"net": {"host": 5}}, "config key 'net.host' must be str, got int 5"),
        ({"net": {"initial_peers": "a"}}, None),  # a string is a comma-separated list: valid
        ({"net": {"initial_peers": 7}}, "config key 'net.initial_peers' must be list of str, got int 7"),
        ({"net": {"initial_peers": ["a", 1]}}, "config key 'net.initial_peers[1]' must be str, got int 1"),
        ({"net": {"ports": "1,x"}}, "config key 'net.ports[1]' must be int, got str 'x'"),
        ({"net": {"timeout": "soon"}}, "config key 'net.timeout' must be float or none, got str 'soon'"),
        ({"sync": 5}, "config key 'sync' must be a table, got int 5"),
        ({"run_name": {"a": 1}}, "config key 'run_name' must be str, got table {'a': 1}"),
    ],
)
def test_wrong_types(values, expected):
    if expected is None:
        build(Root, values)
        return
    with pytest.raises(ConfigError) as ei:
        build(Root, values, source="cfg.toml")
    assert one_line(ei) == f"{expected} (in cfg.toml)"


def test_wrong_type_in_file_names_file(tmp_path):
    path = write(tmp_path, '[sync]\nevery_steps = "abc"\n')
    with pytest.raises(ConfigError) as ei:
        load(Root, path=path, cli_overrides={})
    assert one_line(ei) == f"config key 'sync.every_steps' must be int, got str 'abc' (in {path})"


def test_literal_rejected(tmp_path):
    path = write(tmp_path, '[sync]\nmode = "c"\n')
    with pytest.raises(ConfigError) as ei:
        load(Root, path=path, cli_overrides={})
    assert one_line(ei) == f"config key 'sync.mode' must be one of 'a', 'b', got str 'c' (in {path})"
    with pytest.raises(ConfigError) as ei:
        build(Root, cli("--sync.mode", "A"))
    assert "must be one of 'a', 'b', got str 'A'" in one_line(ei)
    assert build(Root, cli("--sync.mode", "b")).sync.mode == "b"


def test_post_init_error_gets_section_prefix(tmp_path):
    with pytest.raises(ConfigError) as ei:
        build(Root, {"sync": {"every_steps": 0}})
    assert one_line(ei) == "invalid config: sync: every_steps must be >= 1, got 0"
    with pytest.raises(ConfigError) as ei:
        load(Root, path=None, cli_overrides=cli("--sync.every-steps", "-3"))
    assert one_line(ei) == "invalid config: sync: every_steps must be >= 1, got -3"


def test_multiline_post_init_message_is_flattened():
    @dataclasses.dataclass(kw_only=True)
    class Picky:
        x: int = 0

        def __post_init__(self):
            raise ValueError("first line\n  second line\n")

    with pytest.raises(ConfigError) as ei:
        build(Picky, {})
    assert one_line(ei) == "invalid config: first line second line"


def test_missing_required_and_string_annotations():
    with pytest.raises(ConfigError) as ei:
        build(Required, {})
    assert one_line(ei) == "missing required config key 'name' (set it in the config file or with --name)"
    assert build(Required, {"name": "x", "level": "4"}) == Required(name="x", level=4)


def test_invalid_toml_syntax(tmp_path):
    path = write(tmp_path, "[sync]\nevery_steps = = 3\n")
    with pytest.raises(ConfigError) as ei:
        load(Root, path=path, cli_overrides={})
    msg = one_line(ei)
    assert msg.startswith(f"invalid TOML in {path}: ") and "line 2" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as ei:
        load(Root, path=path, cli_overrides={})
    assert one_line(ei) == f"config file not found: {path}"
    with pytest.raises(ConfigError) as ei:
        load_toml(str(path))
    assert one_line(ei) == f"config file not found: {path}"


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)
    assert str(ConfigError("a\nb")) == "a b"


# ----------------------------------------------------------------------------- merge / dump


def test_merge_is_deep_and_pure():
    base = {"sync": {"every_steps": 1, "mode": "a"}, "net": {"initial_peers": ["x"]}}
    over = {"sync": {"every_steps": 2}, "run_name": "r", "net": {"initial_peers": ["y"]}}
    out = merge(base, over)
    assert out == {"sync": {"every_steps": 2, "mode": "a"}, "net": {"initial_peers": ["y"]}, "run_name": "r"}
    assert base == {"sync": {"every_steps": 1, "mode": "a"}, "net": {"initial_peers": ["x"]}}
    assert over == {"sync": {"every_steps": 2}, "run_name": "r", "net": {"initial_peers": ["y"]}}
    out["net"]["initial_peers"].append("z")
    assert over["net"]["initial_peers"] == ["y"]


def test_to_dict():
    d = to_dict(Root())
    assert d["sync"] == {"every_steps": 10, "every_seconds": None, "outer_lr": 0.7, "nesterov": True, "mode": "a"}
    assert d["net"]["ports"] == [4000, 4001] and d["run_name"] == "default"
    assert build(Root, d) == Root()


@pytest.mark.parametrize(
    "cfg",
    [
        Root(),
        Root(
            run_name='we"ird \\ name\n\ttab \x01 ünïcødé 🚀',
            sync=Sync(every_steps=1, every_seconds=12.5, outer_lr=1e-05, nesterov=False, mode="b"),
            net=Net(initial_peers=["/ip4/1.2.3.4/tcp/1", "a,b", ""], ports=[], host="", timeout=0.0, retries=None),
        ),
        Root(sync=Sync(outer_lr=float("inf")), net=Net(ports=[-1, 2**40], timeout=1e300)),
    ],
)
def test_dump_toml_round_trip(cfg):
    text = dump_toml(cfg)
    assert build(Root, tomllib.loads(text)) == cfg


def test_dump_toml_shape():
    text = dump_toml(Root(net=Net(retries=None)))
    data = tomllib.loads(text)
    assert "timeout" not in data["net"]  # None with a None default: omitted
    assert data["net"]["retries"] == "none"  # None with a non-None default: explicit
    assert "every_seconds" not in data["sync"]
    assert text.index("run_name =") < text.index("[sync]") < text.index("[net]")
    assert "# outer steps between averaging rounds\nevery_steps = 10\n" in text
