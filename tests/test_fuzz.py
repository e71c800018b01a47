"""Fuzz tests (hypothesis): every parser of untrusted input fails only in its documented way.

Targets and their contracts (each test's docstring restates its own):

* config: ``settings.load`` (TOML file + flag dict), ``peer.cli.parse``,
  ``bootstrap.cli.parse``, ``data.parse_shard``: a config, or ``ConfigError`` (the CLIs:
  ``ConfigError``/``ValueError``, or ``SystemExit`` from argparse);
* peer messages: ``PeerRecord.parse`` and ``Candidate.from_record`` (DHT records),
  ``identity.peer_id_of`` (DHT subkeys): a value or None, never an exception;
  ``Codec.decode`` (all-reduce payloads): ``CodecError``; ``SwarmState.from_bytes`` and
  ``transfer.fetch_state`` (state downloads): ``StateError``; ``relay.client_round`` /
  ``relay.collect_clients`` (NAT relay) never raise; ``Matchmaker._follow`` / ``_lead``
  (the leader's reply, a follower's slot): a Group or the matchmaking exceptions;
* files: ``bootstrap.ledger.Ledger(path)``: ``StateError``.

Crashes this file found (huge ints, non-str keys, sparse tensors, Infinity in manifests,
malformed relay replies, deep nesting) were fixed; each is pinned by a minimal regression
test (``test_regression_*``). The strategies still steer around those exact triggers
(``fixed:`` comments) so the random budget goes to the rest of each input space.

Runs derandomized (reproducible in CI) and without an example database (nothing is
written to the repo). ``SWARMTRAIN_FUZZ_SCALE=10`` multiplies every example budget.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import math
import os
import sys
import time
import typing
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import bootstrap.cli as bootstrap_cli
import peer.cli as peer_cli
from averaging import codecs, identity, matchmaking, relay
from averaging.allreduce import RoundResult
from averaging.codecs import CodecError
from averaging.errors import MatchmakingError, StateError
from averaging.matchmaking import Candidate, Group, Matchmaker, MatchmakingConfig
from bootstrap.ledger import FORMAT as LEDGER_FORMAT
from bootstrap.ledger import Ledger, LedgerEntry
from bootstrap.node import BootstrapConfig
from peer import settings as config_settings
from peer import transfer
from peer.config import RunConfig
from averaging.errors import ConfigError
from peer.data import parse_shard
from peer.membership import PeerRecord
from peer.state import FORMAT as STATE_FORMAT
from peer.state import SwarmState

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10, as in peer/settings.py
    import tomli as tomllib

pytestmark = pytest.mark.timeout(180)

_SCALE = float(os.environ.get("SWARMTRAIN_FUZZ_SCALE", "1"))


def fuzz(n: int) -> settings:
    return settings(
        max_examples=max(1, int(n * _SCALE)), deadline=None, database=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.large_base_example, HealthCheck.function_scoped_fixture],
    )


# ---------------------------------------------------------------------------- value strategies

INT64 = st.integers(-(2**63), 2**64 - 1)  # what msgpack (the DHT's wire format) can carry
# fixed: (test_regression_huge_int_*): ints beyond float range crash several parsers; stay inside it.
BIG_INT = st.integers(-(2**1000), 2**1000)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
TEXT = st.text(max_size=24)
KEY_TEXT = st.text(max_size=12)


def _scalars(ints: st.SearchStrategy = INT64, floats: st.SearchStrategy = ANY_FLOAT) -> st.SearchStrategy:
    return st.one_of(st.none(), st.booleans(), ints, floats, TEXT, st.binary(max_size=24))


def msgpack_values(*, str_keys_only: bool = False) -> st.SearchStrategy:
    """Nested values as the DHT's msgpack decoder can produce them (any hashable map key)."""
    keys = KEY_TEXT if str_keys_only else st.one_of(KEY_TEXT, st.binary(max_size=8), INT64, st.booleans())
    return st.recursive(
        _scalars(),
        lambda kids: st.lists(kids, max_size=4) | st.tuples(kids, kids) | st.dictionaries(keys, kids, max_size=4),
        max_leaves=16,
    )


def json_values(*, ints: st.SearchStrategy = BIG_INT, floats: st.SearchStrategy = ANY_FLOAT) -> st.SearchStrategy:
    """What json.loads can return (Python's json accepts NaN/Infinity). Shallow: deep nesting has its
    own tests (test_deep_json_from_peer, test_regression_ledger_load)."""
    scal = st.one_of(st.none(), st.booleans(), ints, floats, TEXT)
    return st.recursive(scal, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(KEY_TEXT, kids, max_size=4),
                        max_leaves=10)


def json_bytes(values: st.SearchStrategy) -> st.SearchStrategy:
    """Bytes a peer could put in a store key: JSON text of `values`, or arbitrary garbage."""
    return st.one_of(values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64),
                     st.text(max_size=32).map(lambda s: s.encode("utf-8", "surrogatepass")))


# Built once: constructing a recursive strategy inside every draw costs more than the test.
JSON = json_values()
JSON_NO_INF = json_values(floats=st.floats(allow_infinity=False))  # fixed: (test_regression_manifest_infinity)
JSON_BYTES = json_bytes(JSON)


def _one_line(e: BaseException) -> None:
    assert "\n" not in str(e), f"{type(e).__name__} message is not one line: {str(e)!r}"


# ---------------------------------------------------------------------------- a fake torch Store


class FakeStore:
    """The torch.distributed.Store calls the parsers make, served from a dict (a peer's replies).

    Like TCPStore: get/wait of a missing key raise RuntimeError (DistStoreError is one).
    """

    def __init__(self, data: dict[str, bytes] | None = None, counters: dict[str, int] | None = None) -> None:
        self.data = dict(data or {})
        self.counters = dict(counters or {})

    def set(self, key: str, value: str | bytes) -> None:
        self.data[key] = value.encode() if isinstance(value, str) else bytes(value)

    def get(self, key: str) -> bytes:
        if key not in self.data:
            raise RuntimeError(f"timeout waiting for key {key}")
        return self.data[key]

    def wait(self, keys: list[str], timeout: object = None) -> None:
        for k in keys:
            if k not in self.data:
                raise RuntimeError(f"timeout waiting for key {k}")

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)

    def add(self, key: str, n: int) -> int:
        self.counters[key] = self.counters.get(key, 0) + n
        return self.counters[key]

    def delete_key(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    def set_timeout(self, timeout: object) -> None:
        pass


@contextmanager
def connects_to(module: object, store: FakeStore):
    """Make `module.TCPStore(...)` (a client connection) return `store`."""
    with mock.patch.object(module, "TCPStore", lambda *a, **k: store):
        yield


# ============================================================================ config loader

_SECTIONS: dict[type, dict[str, dict[str, typing.Any]]] = {}


def _leaves(cls: type) -> dict[str, dict[str, typing.Any]]:
    """{section: {field: annotation}} of a config root ("" = root-level leaves)."""
    if cls not in _SECTIONS:
        out: dict[str, dict[str, typing.Any]] = {"": {}}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                out[f.name] = dict(typing.get_type_hints(tp))
            else:
                out[""][f.name] = tp
        _SECTIONS[cls] = out
    return _SECTIONS[cls]


def _flags(cls: type, *, switches: bool | None = None) -> list[str]:
    """The documented flag spelling: --section.field-name, plus --no-section.flag for bools
    (switches=True: only those value-less bool flags; False: only flags that take a value)."""
    out = []
    for section, fields in _leaves(cls).items():
        head = f"{section}." if section else ""
        for name, tp in fields.items():
            if switches is None or switches == (tp is bool):
                out.append(f"--{head}{name.replace('_', '-')}")
            if tp is bool and switches is not False:
                out.append(f"--no-{head}{name.replace('_', '-')}")
    return out


# Strings that exercise the coercions: numbers, bools, none, lists, codecs, multiaddrs, shards.
_TRICKY = [
    "", " ", "0", "-1", "1", "2", "3.5", "1e400", "-1e400", "nan", "inf", "-inf", "1_000", "0x10", "9" * 40,
    "true", "false", "yes", "off", "TRUE", "none", "None", "a,b", ",", ",,x,", "fp32", "fp16", "bf16", "int8",
    "adamw", "sgd", "auto", "cpu", "rich", "json", "stdlib", "text", "tokens", "uint16", "0/1", "1/4", "4/4",
    "/ip4/127.0.0.1/tcp/31337/p2p/QmWH2338V6q5FLN3NsMADqYNozuKPRhJvZSiHCtxj3NZkt",
    "/ip4/127.0.0.1/tcp/31337", "/dns/x/udp/1/quic/p2p/QmWH2338V6q5FLN3NsMADqYNozuKPRhJvZSiHCtxj3NZkt",
    "/p2p/QmWH2338V6q5FLN3NsMADqYNozuKPRhJvZSiHCtxj3NZkt", "/ip4/999.1.1.1/tcp/1/p2p/x", "run-1", "run id",
]
TRICKY = st.sampled_from(_TRICKY)

# Leaf values a TOML file or an override dict can hold.
CONFIG_SCALARS = st.one_of(st.booleans(), BIG_INT, st.integers(-3, 70000), ANY_FLOAT, TEXT, TRICKY)
CONFIG_VALUES = st.one_of(CONFIG_SCALARS, st.lists(CONFIG_SCALARS, max_size=3),
                          st.dictionaries(KEY_TEXT, CONFIG_SCALARS, max_size=2))


@st.composite
def config_trees(draw: st.DrawFn, cls: type, *, extra_values: st.SearchStrategy | None = None) -> dict:
    """A nested dict shaped mostly like `cls`'s sections, with random (mostly wrong) leaves."""
    values = CONFIG_VALUES if extra_values is None else st.one_of(CONFIG_VALUES, extra_values)
    sections = _leaves(cls)
    tree: dict = {}
    for _ in range(draw(st.integers(0, 5))):
        section = draw(st.sampled_from(sorted(sections)) | KEY_TEXT)
        fields = sections.get(section, {})
        name = draw(st.sampled_from(sorted(fields)) | KEY_TEXT) if fields else draw(KEY_TEXT)
        value = draw(values)
        if section and section not in sections and draw(st.booleans()):
            tree[section] = value  # an unknown key, or a section given as a scalar
        elif section:
            sub = tree.setdefault(section, {})
            if isinstance(sub, dict):
                sub[name] = value
            else:
                tree[section] = {name: value}
        else:
            tree[name] = value
    return tree


def _toml_scalar(v: typing.Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_scalar(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_scalar(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(tree: dict) -> str:
    """TOML text for a nested dict: root scalars first, then one [table] per dict."""
    lines = [f"{json.dumps(str(k))} = {_toml_scalar(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    for k, v in tree.items():
        if isinstance(v, dict):
            lines.append(f"[{json.dumps(str(k))}]")
            lines += [f"{json.dumps(str(kk))} = {_toml_scalar(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def _check_load(cls: type, path: object, overrides: dict, environ: dict | None = None) -> None:
    try:
        cfg = config_settings.load(cls, path=path, flags=overrides, environ=environ or {})
    except ConfigError as e:
        _one_line(e)
        event("ConfigError")
        return
    event("loaded")
    assert isinstance(cfg, cls)
    # A config that loads can be written and read back (compared as text: NaN != NaN).
    text = config_settings.dump_toml(cfg)
    assert config_settings.dump_toml(config_settings.validate(cls, tomllib.loads(text))) == text


@pytest.mark.parametrize("cls", [RunConfig, BootstrapConfig], ids=["RunConfig", "BootstrapConfig"])
@fuzz(100)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200),
                      st.lists(st.sampled_from(["[train]", "[sync]", "[swarm]", "lr = 1", "port = 99999", "x = [",
                                                "seed = 1.5", "a.b.c = 1", "[[data]]", "ledger = 'x'", "'\\u0000'",
                                                "dashboard = -2", 'run_id = "ok"', "k = 1979-05-27T07:32:00Z"]),
                               max_size=6).map("\n".join)))
def test_config_load_random_toml_text(tmp_path, cls, text):
    """config_settings.load(cls, path=<file with arbitrary bytes/text>): the config, or ConfigError (one line)."""
    p = tmp_path / "fuzz.toml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    _check_load(cls, str(p), {})


@pytest.mark.parametrize("cls", [RunConfig, BootstrapConfig], ids=["RunConfig", "BootstrapConfig"])
@fuzz(100)
@given(data=st.data())
def test_config_load_structured(tmp_path, cls, data):
    """config_settings.load(cls, path=TOML of a random config-shaped tree, flags=another tree):
    the config, or ConfigError (one line). Override dicts may also hold non-TOML values
    (None, bytes, tuples, non-str keys): same contract."""
    file_tree = data.draw(config_trees(cls), label="file")
    overrides = data.draw(config_trees(cls, extra_values=st.one_of(st.none(), st.binary(max_size=8),
                                                                   st.tuples(TEXT), st.dictionaries(INT64, TEXT, max_size=2))),
                          label="overrides")
    path = None
    if data.draw(st.booleans(), label="with file"):
        path = tmp_path / "fuzz.toml"
        path.write_text(to_toml(file_tree), encoding="utf-8")
    _check_load(cls, path, overrides)


@pytest.mark.parametrize("cls, prefix", [(RunConfig, "SWARMTRAIN_"), (BootstrapConfig, "SWARMTRAIN_BOOTSTRAP_")],
                         ids=["RunConfig", "BootstrapConfig"])
@fuzz(100)
@given(data=st.data())
def test_config_load_random_environment(cls, prefix, data):
    """settings.load(cls, environ=<variables named after real and made-up keys, with tricky
    values, lists and tables as (broken) JSON>): the config, or ConfigError (one line)."""
    names = [f"{prefix}{'__'.join(k.split('.')).upper()}" for k in _dotted(cls)]
    name = st.sampled_from(names) | KEY_TEXT.map(lambda k: prefix + k.upper())
    value = TRICKY | TEXT | st.sampled_from(['["a"]', "[1, 2]", '{"every_steps": 5}', "{", "[", "null", '{"x": 1}'])
    environ = data.draw(st.dictionaries(name, value, max_size=4), label="environ")
    _check_load(cls, None, {}, environ=environ)


def _dotted(cls: type) -> list[str]:
    """Every leaf key of `cls`, dotted (sync.matchmaking.window)."""
    return [k for k, _ in _flat(config_settings.to_dict(cls()))]


def _flat(tree: dict, prefix: str = "") -> list:
    return [kv for k, v in tree.items() for kv in (_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)])]


@fuzz(100)
@given(data=st.data())
def test_config_load_one_leaf_mutated(tmp_path, data):
    """A valid RunConfig file (dump_toml of a default) with one leaf replaced or removed, or one
    key added: the config, or ConfigError (one line)."""
    tree = config_settings.to_dict(RunConfig())
    section = data.draw(st.sampled_from(sorted(k for k, v in tree.items() if isinstance(v, dict))))
    name = data.draw(st.sampled_from(sorted(tree[section])) | KEY_TEXT)
    action = data.draw(st.sampled_from(["replace", "delete", "table"]))
    if action == "delete":
        tree[section].pop(name, None)
    elif action == "table":
        tree[section] = data.draw(CONFIG_SCALARS)  # a section replaced by a scalar
    else:
        tree[section][name] = data.draw(CONFIG_VALUES)
    for sec in tree.values():  # None is not TOML: dump_toml omits it too
        if isinstance(sec, dict):
            for k in [k for k, v in sec.items() if v is None or (isinstance(v, list) and any(x is None for x in v))]:
                del sec[k]
    p = tmp_path / "fuzz.toml"
    p.write_text(to_toml(tree), encoding="utf-8")
    _check_load(RunConfig, str(p), {})


@pytest.fixture
def cli_dir(tmp_path, monkeypatch):
    """An empty-ish working directory: the only files `--config` can name (see _safe_argv)."""
    (tmp_path / "good.toml").write_text(config_settings.dump_toml(RunConfig()))
    (tmp_path / "boot.toml").write_text(config_settings.dump_toml(BootstrapConfig()))
    (tmp_path / "bad.toml").write_text("[[[\n")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "dir.toml").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


_CONFIG_FILES = ["good.toml", "boot.toml", "bad.toml", "binary.toml", "dir.toml", "missing.toml", ".", ""]


def _safe_argv(argv: list[str]) -> list[str]:
    """Point every --config value at one of the prepared files: fuzzing must not read /dev/zero."""
    out = list(argv)
    for i, tok in enumerate(out):
        if tok == "--config" and i + 1 < len(out):
            out[i + 1] = _CONFIG_FILES[len(out[i + 1]) % len(_CONFIG_FILES)]
        elif tok.startswith("--config="):
            out[i] = "--config=" + _CONFIG_FILES[len(tok) % len(_CONFIG_FILES)]
    return out


@st.composite
def argvs(draw: st.DrawFn, flags: list[str]) -> list[str]:
    """argv lists: `--flag value` pairs (so that a fair share parses), then, in half the cases,
    stray tokens (flags, values, `--flag=value`, junk) inserted anywhere."""
    switches = [f for f in flags if f in _SWITCHES and f not in ("-h", "--help", "--print-config", "--")]
    item = st.tuples(st.sampled_from([f for f in flags if f not in _SWITCHES]), TRICKY | TEXT)
    if switches:
        item = item | st.sampled_from(switches).map(lambda f: (f,))
    argv = [t for it in draw(st.lists(item, max_size=5)) for t in it]
    if draw(st.booleans()):
        token = st.one_of(st.sampled_from(flags), TRICKY, st.text(max_size=12),
                          st.tuples(st.sampled_from(flags), TRICKY | TEXT).map("=".join))
        for t in draw(st.lists(token, min_size=1, max_size=4)):
            argv.insert(draw(st.integers(0, len(argv))), t)
    return _safe_argv(argv)


def _check_cli(parse: typing.Callable[[list[str]], object], cls: type, argv: list[str], capsys) -> None:
    try:
        cfg = parse(argv)
    except SystemExit as e:
        # 0: --help / --print-config did their job; 2: an argparse usage error (one line).
        event(f"SystemExit({e.code})")
        assert e.code in (0, 2), (argv, e.code)
        if e.code == 0:
            assert any(t.startswith(("-h", "--help", "--print-config")) for t in argv), argv
        else:
            err = capsys.readouterr().err
            assert ": error: " in err and err.endswith("(see --help)\n"), err
        return
    except ValueError as e:  # ConfigError is a ValueError; main() prints either as one line
        _one_line(e)
        event(type(e).__name__)
        return
    finally:
        capsys.readouterr()
    event("parsed")
    assert isinstance(cfg, cls)


# Flags that take no value: bool fields (--x.flag / --no-x.flag) and the CLIs' own switches.
_SWITCHES = set(_flags(RunConfig, switches=True) + _flags(BootstrapConfig, switches=True)) | {
    "--resume", "--print-config", "-h", "--help", "--"}
_PEER_FLAGS = _flags(RunConfig) + ["--config", "--join", "--resume", "--print-config", "--log-format", "-h", "--help", "--"]
_BOOT_FLAGS = _flags(BootstrapConfig) + ["--config", "-h", "--help", "--"]


@fuzz(150)
@given(argv=argvs(_PEER_FLAGS))
def test_peer_cli_parse(cli_dir, capsys, argv):
    """peer.cli.parse(argv): a RunConfig; or ConfigError/ValueError (one line); or SystemExit(2)
    for a usage error (one line on stderr); SystemExit(0) only for --help / --print-config."""
    _check_cli(peer_cli.parse, RunConfig, argv, capsys)


@fuzz(100)
@given(argv=argvs(_BOOT_FLAGS))
def test_bootstrap_cli_parse(cli_dir, capsys, argv):
    """bootstrap.cli.parse(argv): a BootstrapConfig; or ConfigError/ValueError (one line); or
    SystemExit(2) for a usage error; SystemExit(0) only for --help."""
    _check_cli(bootstrap_cli.parse, BootstrapConfig, argv, capsys)


@fuzz(200)
@given(spec=st.one_of(TRICKY, st.text(max_size=16), st.from_regex(r"\s*\d{1,30}/\d{1,30}\s*", fullmatch=True),
                      st.integers(), st.none()))
def test_parse_shard(spec):
    """data.parse_shard(spec): None ("auto"), (i, n) with 0 <= i < n, or ValueError."""
    try:
        r = parse_shard(spec)  # type: ignore[arg-type]
    except ValueError as e:
        _one_line(e)
        return
    assert r is None or (isinstance(r, tuple) and 0 <= r[0] < r[1])


# ============================================================================ DHT records

_COUNT = st.integers(0, 2**63 - 1)
_SECONDS = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
_FINITE = st.floats(allow_nan=False, allow_infinity=False)
_STR = st.text(max_size=40)

ROUND_OUTCOMES = st.fixed_dictionaries({
    "round": _COUNT, "status": st.sampled_from(["complete", "failed"]), "duration_s": _SECONDS,
    "bytes": _COUNT, "members": _COUNT, "t": _FINITE,
})
SETTINGS = st.fixed_dictionaries({
    "params": _COUNT, "every_steps": _COUNT, "every_seconds": _SECONDS, "outer_lr": _FINITE, "outer_momentum": _FINITE,
    "nesterov": st.booleans(), "compression": _STR, "aggregator": _STR, "fragments": _COUNT, "overlap": st.booleans(),
    "min_group_size": _COUNT, "max_group_size": _COUNT,
})
VALID_PEER_RECORDS = st.fixed_dictionaries({
    "round": _COUNT, "fingerprint": _STR, "schema": _STR, "digest": _STR, "host": _STR,
    "port": st.integers(0, 65535), "step": _COUNT, "samples": _COUNT, "loss": st.none() | _FINITE,
    "device": _STR, "version": _STR, "t": _FINITE, "role": st.sampled_from(["trainer", "archivist"]),
    "samples_per_s": _SECONDS, "compute_s": _SECONDS, "rounds_ok": _COUNT, "rounds_failed": _COUNT,
    "bytes_sent": _COUNT, "bytes_recv": _COUNT, "flops_per_sample": _SECONDS, "incarnation": _STR,
    "maddrs": st.lists(_STR, max_size=8), "catch_up_round": _COUNT, "catch_up_digest": _STR,
    "val_loss": st.none() | _FINITE, "val_round": _COUNT, "settings": SETTINGS,
    "recent": st.lists(ROUND_OUTCOMES, max_size=5),
})
# Values a field can be mutated to: anything msgpack carries, plus near-misses of the schema.
NEAR_MISS = st.one_of(msgpack_values(), st.sampled_from([
    -1, 0, 1, 3.0, True, False, None, 65536, 2**63, math.nan, math.inf, -0.0, "", "x" * 257, "complete", "trainer",
    "archivist", "failed", [], [{}], {}, b"", b"x",
]))


def _check_peer_record(rec: object) -> PeerRecord | None:
    out = PeerRecord.parse("QmPeer", rec)
    event("None" if out is None else "PeerRecord")
    assert out is None or (isinstance(out, PeerRecord) and out.peer_id == "QmPeer")
    if out is not None:
        assert out.to_record() == rec  # nothing was converted on the way in
    return out


@fuzz(200)
@given(rec=st.one_of(msgpack_values(str_keys_only=True), st.dictionaries(KEY_TEXT, NEAR_MISS, max_size=6)))
def test_peer_record_parse_arbitrary(rec):
    """PeerRecord.parse(peer_id, <any msgpack value>): a PeerRecord or None; never raises.
    fixed: (test_regression_peer_record_non_str_keys): top-level map keys are kept to str here."""
    _check_peer_record(rec)


@fuzz(200)
@given(rec=VALID_PEER_RECORDS, data=st.data())
def test_peer_record_parse_one_field_mutated(rec, data):
    """A valid record parses to an equal PeerRecord; with one field replaced, removed or added
    (also inside `recent` and `settings`) it parses to a PeerRecord or None; never raises."""
    assert _check_peer_record(rec) is not None
    rec = dict(rec, recent=[dict(o) for o in rec["recent"]], settings=dict(rec["settings"]))
    action = data.draw(st.sampled_from(["replace", "delete", "add", "recent", "settings"]))
    if action == "replace":
        rec[data.draw(st.sampled_from(sorted(rec)))] = data.draw(NEAR_MISS)
    elif action == "delete":
        del rec[data.draw(st.sampled_from(sorted(rec)))]
    elif action == "add":
        rec[data.draw(KEY_TEXT)] = data.draw(NEAR_MISS)
    elif action == "settings":
        rec["settings"][data.draw(st.sampled_from(sorted(rec["settings"])) | KEY_TEXT)] = data.draw(NEAR_MISS)
    elif rec["recent"]:
        entry = data.draw(st.sampled_from(rec["recent"]))
        entry[data.draw(st.sampled_from(sorted(entry)) | KEY_TEXT)] = data.draw(NEAR_MISS)
    else:
        rec["recent"] = data.draw(NEAR_MISS)
    _check_peer_record(rec)


VALID_CANDIDATES = st.fixed_dictionaries({
    "t": _FINITE | INT64, "host": st.text(min_size=1, max_size=255), "port": st.integers(1, 65535),
    "nonce": st.text(min_size=1, max_size=64),
})


def _check_candidate(rec: object) -> Candidate | None:
    c = Candidate.from_record("QmPeer", rec)
    event("None" if c is None else "Candidate")
    if c is not None:
        assert isinstance(c.t, float) and math.isfinite(c.t) and 0 < c.port < 65536
        assert c.peer_id == "QmPeer" and 0 < len(c.host) <= 255 and 0 < len(c.nonce) <= 64
    return c


@fuzz(200)
@given(rec=st.one_of(msgpack_values(), st.dictionaries(st.sampled_from(["t", "host", "port", "nonce"]) | KEY_TEXT,
                                                       NEAR_MISS, max_size=5)))
def test_candidate_from_record_arbitrary(rec):
    """Candidate.from_record(peer_id, <any msgpack value>): a Candidate or None; never raises.
    (Ints are msgpack's int64/uint64 here. fixed: test_regression_huge_int_candidate: bigger ones, which
    a JSON redirect can carry, raise OverflowError.)"""
    _check_candidate(rec)


@fuzz(200)
@given(rec=VALID_CANDIDATES, data=st.data())
def test_candidate_from_record_one_field_mutated(rec, data):
    """A valid declaration parses to a Candidate; with one field replaced, removed or added it
    parses to a Candidate or None; never raises."""
    assert _check_candidate(rec) is not None
    rec = dict(rec)
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        rec[data.draw(st.sampled_from(sorted(rec)))] = data.draw(NEAR_MISS)
    elif action == "delete":
        del rec[data.draw(st.sampled_from(sorted(rec)))]
    else:
        rec[data.draw(KEY_TEXT)] = data.draw(NEAR_MISS)
    _check_candidate(rec)


_OWNER_KEY: list[bytes] = []


def owner_subkey() -> bytes:
    """A real b"[owner:ssh-rsa ...]" subkey (one RSA key per session)."""
    if not _OWNER_KEY:
        from hivemind.dht.crypto import RSASignatureValidator
        from hivemind.utils.crypto import RSAPrivateKey
        _OWNER_KEY.append(RSASignatureValidator(RSAPrivateKey()).local_public_key)
    return _OWNER_KEY[0]


@st.composite
def mutated_owner_subkeys(draw: st.DrawFn) -> bytes:
    key = bytearray(owner_subkey())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, len(key) - 1))
        if kind == "flip":
            key[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del key[pos : pos + draw(st.integers(1, 40))]
        else:
            key[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        if not key:
            break
    return bytes(key)


@fuzz(200)
@given(subkey=st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(lambda b: b"[owner:" + b + b"]"),
    st.binary(max_size=96).map(lambda b: b"[owner:ssh-rsa " + base64.b64encode(b) + b"]"),
    mutated_owner_subkeys(),
    st.one_of(st.none(), st.integers(), TEXT, st.tuples(st.binary(max_size=4))),  # hashable non-bytes
))
def test_peer_id_of(subkey):
    """identity.peer_id_of(subkey): a base58 peer id (str) or None; never raises. (Callers pass
    only bytes; an unhashable argument trips its lru_cache: TypeError, outside the contract.)"""
    pid = identity.peer_id_of(subkey)
    event("None" if pid is None else "peer id")
    assert pid is None or (isinstance(pid, str) and pid)


_ALLOWLIST: list = []


def _allowlist():
    """An allowlist naming one real key, with that key to sign (built once per session)."""
    if not _ALLOWLIST:
        import tempfile

        from averaging.access import load_allowlist
        d = tempfile.mkdtemp(prefix="swarmtrain-fuzz-")
        pid, _ = identity.ensure_identity(os.path.join(d, "k"))
        with open(os.path.join(d, "allow.txt"), "w") as f:
            f.write(pid + "\n")
        _ALLOWLIST.append((load_allowlist(os.path.join(d, "allow.txt"), identity.load_identity(os.path.join(d, "k"))), pid))
    return _ALLOWLIST[0]


@st.composite
def mutated_proofs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(a real allowlist proof, the same with 1-3 bytes changed)."""
    allow, pid = _allowlist()
    original = allow.sign("join", "p/", pid)
    proof = bytearray(original)
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(proof) - 1))
        proof[pos] ^= draw(st.integers(1, 255))
    return original, bytes(proof)


def _meaning(proof: bytes) -> tuple[bytes, bytes] | None:
    """(public key, decoded signature): base64 ignores some bit flips, which change nothing."""
    public, _, sig = proof.rstrip(b"\0").partition(b"\n")
    try:
        return public, base64.b64decode(sig)
    except ValueError:
        return None


@fuzz(200)
@given(pair=st.one_of(st.binary(max_size=1100).map(lambda b: (None, b)), mutated_proofs(),
                      st.binary(max_size=96).map(lambda b: (None, owner_subkey()[7:-1] + b"\n" + b))),
       as_hex=st.booleans())
def test_allowlist_proof(pair, as_hex):
    """Allowlist.verify / verify_hex on a peer's proof: a bool, never an exception, and True
    only for a proof that still says exactly what the real signature says."""
    allow, pid = _allowlist()
    original, proof = pair
    ok = allow.verify_hex(proof.hex(), pid, "join", "p/", pid) if as_hex else allow.verify(proof, pid, "join", "p/", pid)
    event("accepted" if ok else "rejected")
    assert isinstance(ok, bool)
    assert not ok or (original is not None and _meaning(proof) == _meaning(original))


def test_allowlist_proof_unmutated_is_accepted():
    allow, pid = _allowlist()
    assert allow.verify(allow.sign("join", "p/", pid), pid, "join", "p/", pid)


def test_peer_id_of_real_key_is_stable():
    """The unmutated subkey gives a peer id (so the mutations above start from a valid input)."""
    pid = identity.peer_id_of(owner_subkey())
    assert isinstance(pid, str) and pid.startswith("Qm")


# ============================================================================ codecs


@st.composite
def codec_inputs(draw: st.DrawFn) -> tuple[codecs.Codec, torch.Tensor, int]:
    codec = codecs.get_codec(draw(st.sampled_from(["fp32", "fp16", "bf16", "int8"])))
    n = draw(st.one_of(st.integers(-3, 40), st.integers(0, 3000), st.sampled_from([1023, 1024, 1025, 2048, 2**40])))
    size = max(0, min(codec.wire_bytes(n), 20000) + draw(st.sampled_from([0, 0, 0, 0, -1, 1, 3, -4, 4, 1024])))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    raw = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen)
    if codec.name == "int8" and size >= 4 and draw(st.booleans()):
        # Plant chosen scales (negative, NaN, inf, subnormal, huge) where the decoder reads them.
        scales = draw(st.lists(st.floats(width=32), min_size=1, max_size=min(size // 4, 4)))
        raw[: 4 * len(scales)] = torch.tensor(scales, dtype=torch.float32).view(torch.uint8)
    layout = draw(st.sampled_from(["flat", "flat", "offset", "strided", "2d", "int8", "float32"]))
    if layout == "offset":  # a misaligned byte slice of a larger buffer
        k = draw(st.integers(1, 3))
        raw = torch.cat([torch.zeros(k, dtype=torch.uint8), raw])[k:]
    elif layout == "strided" and size:  # non-contiguous. fixed: (test_regression_codec_empty_strided): not when empty
        raw = torch.stack([raw, raw], dim=1).reshape(-1)[::2]
    elif layout == "2d":
        raw = raw.view(1, -1)
    elif layout == "int8":
        raw = raw.view(torch.int8)
    elif layout == "float32" and size % 4 == 0:
        raw = raw.view(torch.float32)
    return codec, raw, n


@fuzz(300)
@given(inp=codec_inputs())
def test_codec_decode(inp):
    """Codec.decode(data, n) for every codec, with random bytes of random (mostly right) length,
    dtype, layout and alignment: an fp32 tensor of n values, or CodecError."""
    codec, data, n = inp
    try:
        out = codec.decode(data, n)
    except CodecError:
        event("CodecError")
        return
    event("decoded")
    assert out.dtype == torch.float32 and out.dim() == 1 and out.numel() == n
    if codec.name == "fp32":  # exact: the same bits come back
        assert torch.equal(out.view(torch.uint8), data.reshape(-1).contiguous())


# ============================================================================ state bytes

_THETA = torch.randn(16, generator=torch.Generator().manual_seed(0))
VALID_STATE = SwarmState(7, "fp-1", _THETA, _THETA * 0.5, 123).to_bytes()


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


# Dense tensors only. fixed: (test_regression_state_sparse_tensor): a sparse one raises NotImplementedError.
TENSORS = st.builds(
    lambda dtype, shape, fill: torch.full(shape, fill).to(dtype),
    st.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool]),
    st.sampled_from([(16,), (16,), (4, 4), (15,), (0,), (), (1, 16)]),
    st.sampled_from([0.0, 1.5, -2.0, math.nan, math.inf]),
)
PICKLE_SAFE = st.one_of(st.none(), st.booleans(), st.integers(), _FINITE, ANY_FLOAT, TEXT, st.binary(max_size=8),
                        TENSORS, st.lists(st.integers() | TEXT, max_size=3), st.dictionaries(TEXT, st.integers(), max_size=2))


@st.composite
def state_objects(draw: st.DrawFn) -> object:
    """What torch.save could have written: mostly a state-shaped dict with random fields."""
    obj = {"format": STATE_FORMAT, "round": 7, "fingerprint": "fp-1", "theta_sync": _THETA.clone(),
           "momentum_buf": None, "samples": 0}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(obj)) | TEXT)
        if draw(st.integers(0, 4)) == 0:
            obj.pop(key, None)
        else:
            obj[key] = draw(PICKLE_SAFE)
    return draw(st.one_of(st.just(obj), PICKLE_SAFE))


def _save(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


STATE_BYTES = st.one_of(st.binary(max_size=512), mutated(VALID_STATE), state_objects().map(_save),
                        st.just(VALID_STATE))


def _check_state(data: bytes, fingerprint: str | None, numel: int | None) -> SwarmState | None:
    try:
        s = SwarmState.from_bytes(data, source="fuzz", fingerprint=fingerprint, numel=numel)
    except StateError as e:  # ModelMismatchError is one
        _one_line(e)
        event(type(e).__name__)
        return None
    event("SwarmState")
    assert isinstance(s.round, int) and s.round >= 0 and isinstance(s.samples, int) and s.samples >= 0
    assert s.theta_sync.dtype == torch.float32 and s.theta_sync.dim() == 1 and bool(torch.isfinite(s.theta_sync).all())
    assert numel is None or s.theta_sync.numel() == numel
    assert fingerprint is None or s.fingerprint == fingerprint
    if s.momentum_buf is not None:
        assert s.momentum_buf.shape == s.theta_sync.shape and bool(torch.isfinite(s.momentum_buf).all())
    return s


def test_valid_state_parses():
    s = SwarmState.from_bytes(VALID_STATE, source="fuzz", fingerprint="fp-1", numel=16)
    assert s.round == 7 and s.samples == 123 and torch.equal(s.theta_sync, _THETA)


@fuzz(200)
@given(data=STATE_BYTES, fingerprint=st.sampled_from(["fp-1", "other", None]), numel=st.sampled_from([16, 15, None]))
def test_state_from_bytes(data, fingerprint, numel):
    """SwarmState.from_bytes(<random, mutated-valid, or torch.save'd odd objects>): a validated
    SwarmState (finite fp32 θ of the expected size, matching fingerprint), or StateError."""
    _check_state(data, fingerprint, numel)


# ---------------------------------------------------------------------------- state download

DONOR = PeerRecord(peer_id="QmDonorDonorDonor", round=7, fingerprint="fp-1", schema="s", digest="d",
                   host="127.0.0.1", port=29999)
MANIFEST_KEYS = st.sampled_from(["format", "round", "fingerprint", "samples", "numel", "momentum", "chunk", "chunks",
                                 "serving"])
_VEC = st.sampled_from([_THETA, _THETA * 0.5, torch.full((16,), math.nan), torch.zeros(15)])


@st.composite
def state_responses(draw: st.DrawFn) -> dict[str, bytes]:
    """What a donor's store holds for request 1 (chunks of 64 bytes): a manifest and chunks,
    honest-looking or not."""
    vecs = [draw(_VEC)] + ([draw(_VEC)] if draw(st.booleans()) else [])
    chunks = [v.numpy().tobytes() for v in vecs]
    meta: object = {"format": transfer.FORMAT, "round": 7, "fingerprint": "fp-1", "samples": 3, "numel": 16,
                    "momentum": len(vecs) == 2, "chunk": 64, "chunks": len(chunks), "serving": list(range(len(chunks)))}
    how = draw(st.sampled_from(["honest", "honest", "field", "random-json", "garbage"]))
    if how == "field":  # fixed: (test_regression_manifest_infinity): no ±inf in the manifest
        meta[draw(MANIFEST_KEYS | KEY_TEXT)] = draw(JSON_NO_INF)  # type: ignore[index]
    elif how == "random-json":
        meta = draw(JSON_NO_INF)
    out = {f"state/resp/1/{i}": c for i, c in enumerate(chunks)}
    for _ in range(draw(st.integers(0, 2))):  # lose, empty ("moved on") or replace a chunk
        k = f"state/resp/1/{draw(st.integers(0, len(chunks)))}"
        if draw(st.booleans()):
            out.pop(k, None)
        else:
            out[k] = draw(st.sampled_from([b"", b"x" * 64]) | st.binary(max_size=80))
    if how != "garbage":
        out["state/resp/1/meta"] = json.dumps(meta).encode()
    elif draw(st.booleans()):
        out["state/resp/1/meta"] = draw(st.binary(max_size=64))
    return out


@fuzz(150)
@given(resp=state_responses(), fingerprint=st.sampled_from(["fp-1", None]), numel=st.sampled_from([16, None]))
def test_fetch_state(resp, fingerprint, numel):
    """transfer.fetch_state(donor) against a donor store holding arbitrary manifests and chunks:
    a validated SwarmState (finite fp32 θ of the expected size, matching fingerprint), or StateError."""
    store = FakeStore(resp)
    with connects_to(transfer, store), mock.patch.object(transfer, "CHUNK", 64):
        try:
            s = transfer.fetch_state(DONOR, fingerprint=fingerprint, numel=numel, timeout=0.1, connect_timeout=0.1)
        except StateError as e:
            _one_line(e)
            event(type(e).__name__)
            return
    event("SwarmState")
    assert isinstance(s, SwarmState) and s.round == DONOR.round and s.samples >= 0
    assert s.theta_sync.dtype == torch.float32 and s.theta_sync.numel() == 16 and bool(torch.isfinite(s.theta_sync).all())
    assert fingerprint is None or s.fingerprint == fingerprint
    assert s.momentum_buf is None or (s.momentum_buf.shape == s.theta_sync.shape and bool(torch.isfinite(s.momentum_buf).all()))


# ============================================================================ NAT relay

RELAY_GROUP = dict(round=5, members=("QmLeaderLeader",), prefix="5/nonce/", leader="QmLeaderLeader")
_OTHER_RESULT = json_bytes(JSON.filter(lambda v: not (isinstance(v, dict) and {"included", "weights", "members"} & set(v))))


# fixed: (test_regression_client_round_malformed_meta): "included" must support `in`, "weights" must be
# numbers and "members" iterable; anything else there crashes client_round.
_META_FIELDS = {
    "status": st.sampled_from(["complete", "failed"]) | JSON,
    "error": JSON,
    "included": st.one_of(st.lists(st.sampled_from(["QmClient", "QmOther"]) | TEXT, max_size=3), TEXT,
                          st.dictionaries(TEXT, JSON, max_size=2)),
    "weights": st.lists(st.floats() | BIG_INT | st.booleans(), max_size=3),
    "members": st.lists(JSON, max_size=3) | TEXT | st.dictionaries(TEXT, JSON, max_size=2),
}


def _f32_bytes(n: int, floats: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(floats, min_size=n, max_size=n).map(lambda xs: torch.tensor(xs, dtype=torch.float32).numpy().tobytes())


@st.composite
def relay_results(draw: st.DrawFn, numel: int) -> dict[str, bytes]:
    """What a (possibly broken) leader posts for a client: result meta and the mean."""
    meta = {"status": "complete", "error": None, "included": ["QmClient"],
            "members": ["QmLeaderLeader", "QmClient"], "weights": [1.0, 1.0]}
    for k in draw(st.lists(st.sampled_from(sorted(meta)), max_size=3, unique=True)):  # tweak some fields
        if draw(st.booleans()):
            del meta[k]
        else:
            meta[k] = draw(_META_FIELDS[k])
    out = {"5/nonce/client/result": draw(st.one_of(st.just(json.dumps(meta).encode()), _OTHER_RESULT))}
    mean = draw(st.one_of(_f32_bytes(numel, st.floats(width=32, allow_nan=False, allow_infinity=False)),
                          _f32_bytes(numel, st.floats(width=32)), _f32_bytes(numel + 1, st.floats(width=32)),
                          st.binary(max_size=4 * numel + 8), st.none()))
    if mean is not None:
        out["5/nonce/client/mean"] = mean
    return out


@fuzz(100)
@given(data=st.data(), numel=st.integers(0, 6))
def test_client_round(data, numel):
    """relay.client_round (client side) against whatever the leader posted: a RoundResult, never
    an exception; a complete one carries a finite mean of the right size."""
    resp = data.draw(st.one_of(relay_results(numel), st.just({})), label="leader store")
    store = FakeStore(resp)
    group = Group(rank=-1, store=store, clients=("QmClient",), **RELAY_GROUP)
    r = relay.client_round(group, "QmClient", torch.ones(numel), 1.0, timeout_s=0.05)
    assert isinstance(r, RoundResult) and r.status in ("complete", "failed")
    event(r.status)
    if r.status == "complete":
        assert r.mean_delta is not None and r.mean_delta.numel() == numel and bool(torch.isfinite(r.mean_delta).all())


@fuzz(150)
@given(data=st.data(), numel=st.integers(0, 6), clients=st.lists(st.sampled_from(["QmA", "QmB", "QmC"]), max_size=3, unique=True))
def test_collect_clients(data, numel, clients):
    """relay.collect_clients (leader side) with arbitrary client uploads: only valid (peer, w > 0
    finite, finite w·Δ of the right size) entries come back; never raises."""
    store = FakeStore()
    for pid in clients:
        upload = data.draw(st.one_of(
            st.none(), st.binary(max_size=4 * numel + 12),
            st.lists(st.floats(width=32), min_size=numel + 1, max_size=numel + 1).map(
                lambda xs: torch.tensor(xs, dtype=torch.float32).numpy().tobytes())), label=pid)
        if upload is not None:
            store.data[f"5/nonce/client/{pid}"] = upload
    group = Group(rank=0, store=store, clients=tuple(clients), **RELAY_GROUP)
    out = relay.collect_clients(group, numel, timeout_s=0.05)
    event(f"{len(out)} of {len(clients)} uploads accepted")
    for pid, w, x in out:
        assert pid in clients and w > 0 and math.isfinite(w)
        assert x.numel() == numel and bool(torch.isfinite(x).all())


# ============================================================================ matchmaking replies

MM_CFG = MatchmakingConfig(min_group_size=1, max_group_size=4, window=0.5, join_timeout=0.05)


def _matchmaker(cfg: MatchmakingConfig = MM_CFG) -> Matchmaker:
    return Matchmaker(None, listen_host="127.0.0.1", announce_host="127.0.0.1", cfg=cfg, client_mode=True)  # type: ignore[arg-type]


LEADER = Candidate(1000.0, "QmLeader", "127.0.0.1", 29500, "lnonce")
ME = Candidate(1001.0, "QmMe", "127.0.0.1", 29501, "mnonce")


_NAMES = st.sampled_from(["QmMe", "QmLeader", "QmX"]) | TEXT
_REDIRECT_TARGETS = st.fixed_dictionaries(
    {"peer_id": _NAMES | JSON, "t": st.sampled_from([0.0, 999.0, 1000.0, 2000.0]) | JSON,
     "host": TEXT | JSON, "port": st.integers(-1, 70000) | JSON, "nonce": TEXT | JSON})


@st.composite
def leader_replies(draw: st.DrawFn) -> bytes | None:
    """The member list a leader posts (or a redirect), honest-looking, half-broken or garbage."""
    kind = draw(st.sampled_from(["members", "redirect", "closed", "random"]))
    if kind == "members":
        reply: object = {"members": draw(st.lists(_NAMES, max_size=4) | JSON)}
        if draw(st.booleans()):
            reply["clients"] = draw(st.lists(_NAMES, max_size=3) | JSON)  # type: ignore[index]
    elif kind == "redirect":
        # fixed: (test_regression_huge_int_candidate): `t` stays inside float range.
        target = draw(_REDIRECT_TARGETS)
        for k in draw(st.lists(st.sampled_from(sorted(target)), max_size=2, unique=True)):
            del target[k]
        reply = {"redirect": draw(st.just(target) | JSON)}
    elif kind == "closed":
        reply = {"closed": draw(JSON)}
    else:
        return draw(JSON_BYTES | st.none())
    return json.dumps(reply).encode()


@fuzz(150)
@given(reply=leader_replies())
def test_follow_leader_reply(reply):
    """Matchmaker._follow against whatever the leader posts as its member list: a Group with this
    peer in it, or _Redirect (to an earlier, valid candidate), _Unreachable or MatchmakingError."""
    store = FakeStore({} if reply is None else {f"3/{LEADER.nonce}/members": reply})
    with connects_to(matchmaking, store):
        try:
            g = asyncio.run(_matchmaker()._follow(3, LEADER, ME, time.monotonic() + 1))
        except matchmaking._Redirect as r:
            assert isinstance(r.target, Candidate) and r.target < LEADER
            event("_Redirect")
            return
        except (matchmaking._Unreachable, MatchmakingError) as e:
            event(type(e).__name__)
            return
    event("Group")
    assert isinstance(g, Group) and all(isinstance(m, str) for m in g.members + g.clients)
    assert (g.rank == -1 and "QmMe" in g.clients) or g.members[g.rank] == "QmMe"


_SLOT_RECORDS = st.one_of(st.none(), JSON_BYTES, st.fixed_dictionaries(
    {"peer_id": st.sampled_from(["QmMe", "QmA", "QmB"]) | JSON, "client": st.booleans() | JSON}
).map(lambda d: json.dumps(d).encode()))


@fuzz(150)
@given(data=st.data(), slots=st.integers(0, 5), min_size=st.integers(1, 3))
def test_lead_slot_records(data, slots, min_size):
    """Matchmaker._lead with arbitrary joiners' slot records: a Group led by this peer whose
    members/clients are distinct str peer ids (one per slot at most: a round admits more than
    max_group_size, which only sizes its subgroups), or MatchmakingError."""
    me = Candidate(1000.0, "QmMe", "127.0.0.1", 29500, "lnonce")
    prefix = f"3/{me.nonce}/"
    store = FakeStore(counters={prefix + "n": slots})
    for i in range(1, slots + 1):
        rec = data.draw(_SLOT_RECORDS, label=f"slot {i}")
        if rec is not None:
            store.data[f"{prefix}slot/{i}"] = rec
    cfg = MatchmakingConfig(min_group_size=min_size, max_group_size=4, window=0.5, join_timeout=0.05)
    mm = _matchmaker(cfg)
    mm._server = store  # type: ignore[assignment]
    try:
        g = asyncio.run(mm._lead(3, "k", me, lambda: 1, time.monotonic() - 1, set()))
    except MatchmakingError as e:
        _one_line(e)
        event("MatchmakingError")
        return
    event(f"Group of {len(g.members)}+{len(g.clients)}")
    everyone = g.members + g.clients
    assert g.members[0] == "QmMe" and g.rank == 0 and len(everyone) == len(set(everyone)) <= 1 + slots
    assert all(isinstance(p, str) for p in everyone) and len(everyone) >= min_size


# ============================================================================ ledger file

_NUM = st.one_of(st.integers(0, 2**60), st.floats(min_value=0.0, max_value=1e300))
VALID_ENTRIES = st.fixed_dictionaries(
    {"peer_id": _STR, "first_seen": _NUM, "last_seen": _NUM},
    optional={k: _NUM for k in ("samples", "compute_s", "rounds", "credit", "seen_samples", "seen_compute_s", "seen_rounds")}
    | {"device": _STR, "seen_incarnation": _STR},
)


@st.composite
def ledger_texts(draw: st.DrawFn) -> tuple[str, bytes]:
    """(kind, file contents): a valid ledger, one with a field mutated, any JSON, or any bytes."""
    kind = draw(st.sampled_from(["valid", "mutated", "json", "bytes"]))
    if kind == "bytes":
        return kind, draw(st.binary(max_size=256))
    if kind == "json":
        return kind, json.dumps(draw(JSON)).encode()
    doc = {"format": LEDGER_FORMAT, "peers": draw(st.lists(VALID_ENTRIES, max_size=4))}
    if kind == "mutated":
        target = draw(st.sampled_from(["doc", "entry"])) if doc["peers"] else "doc"
        obj = doc if target == "doc" else draw(st.sampled_from(doc["peers"]))
        key = draw(st.sampled_from(sorted(obj)) | KEY_TEXT)
        if draw(st.booleans()):
            obj.pop(key, None)
        else:
            obj[key] = draw(JSON)
    return kind, json.dumps(doc).encode()


@fuzz(150)
@given(doc=ledger_texts())
def test_ledger_load(tmp_path, doc):
    """Ledger(path) on arbitrary file contents: a Ledger of well-formed entries (always, for a
    valid file), or StateError (one line); the file is never modified."""
    kind, text = doc
    p = tmp_path / "ledger.json"
    p.write_bytes(text)
    try:
        ledger = Ledger(p)
    except StateError as e:
        assert kind != "valid", e
        _one_line(e)
        event("StateError")
    else:
        event(f"Ledger of {len(ledger.entries)}")
        for pid, e in ledger.entries.items():
            assert isinstance(e, LedgerEntry) and e.peer_id == pid and isinstance(pid, str)
        ledger.rows()
        ledger.to_csv()
    assert p.read_bytes() == text


# ============================================================================ regressions
# Each one is the smallest input the fuzzer found for a crash outside the documented contract
# (all fixed; they pin the fixes). The strategies above still avoid these exact triggers.

@pytest.mark.parametrize("via", ["toml", "overrides"])
def test_regression_huge_int_config_float_field(tmp_path, via):
    """a float field given an int beyond float range (configlib once raised OverflowError).
    e.g. TOML `[train]\\nlr = 1000…0` (400 digits); same for BootstrapConfig `poll_every`."""
    path, overrides = None, {}
    if via == "toml":
        path = tmp_path / "c.toml"
        path.write_text("[train]\nlr = 1" + "0" * 400 + "\n")
    else:
        overrides = {"train": {"lr": 10**400}}
    with pytest.raises(ConfigError):
        config_settings.load(RunConfig, path=path, flags=overrides, environ={})


@pytest.mark.parametrize("text", ["x = " + "9" * 5000, "x = " + "[" * 600 + "]" * 600], ids=["5000-digit-int", "deep-array"])
def test_regression_load_toml_escapes(tmp_path, text):
    """config_settings.load_toml: tomllib raises a plain ValueError for an int over 4300 digits and
    RecursionError for ~500 nested arrays; neither becomes ConfigError."""
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError):
        config_settings.load(RunConfig, path=p, flags={}, environ={})


def test_regression_load_toml_nul_in_path():
    """config_settings.load_toml('a\\x00b'): open() raises ValueError('embedded null byte'), not ConfigError."""
    with pytest.raises(ConfigError):
        config_settings.load(RunConfig, path="a\x00b", flags={}, environ={})


@pytest.mark.parametrize("rec", [{b"round": 1}, {1: 1}], ids=["bytes-key", "int-key"])
def test_regression_peer_record_non_str_keys(rec):
    """PeerRecord.parse: pydantic's parse_obj does cls(**rec) -> TypeError 'keywords must be strings'."""
    assert PeerRecord.parse("QmPeer", rec) is None


def test_regression_huge_int_candidate():
    """Candidate.from_record: math.isfinite(10**400) raises OverflowError. Reachable from a
    leader's JSON redirect in Matchmaker._follow (json ints are unbounded), and it escapes
    form_group / Averager.average, which promise not to raise for network faults."""
    assert Candidate.from_record("QmPeer", {"t": 10**400, "host": "h", "port": 1, "nonce": "n"}) is None


def test_regression_huge_int_follow_redirect():
    """The same through the wire: a leader's reply {"redirect": {"t": 10**400, ...}}."""
    reply = json.dumps({"redirect": {"peer_id": "QmX", "t": 10**400, "host": "h", "port": 1, "nonce": "n"}}).encode()
    with connects_to(matchmaking, FakeStore({f"3/{LEADER.nonce}/members": reply})):
        with pytest.raises((matchmaking._Unreachable, MatchmakingError)):
            asyncio.run(_matchmaker()._follow(3, LEADER, ME, time.monotonic() + 1))


@pytest.mark.parametrize("text", [
    '{"format": "swarmtrain-ledger-v1", "peers": [{"peer_id": "a", "first_seen": 0, "last_seen": 1' + "0" * 400 + "}]}",
    "[" * 100_000,
], ids=["huge-int", "deep-json"])
def test_regression_ledger_load(tmp_path, text):
    """Ledger._load: math.isfinite(huge int) raises OverflowError; json.loads of deep nesting
    raises RecursionError; neither is caught into StateError."""
    p = tmp_path / "ledger.json"
    p.write_text(text)
    with pytest.raises(StateError):
        Ledger(p)


@pytest.mark.parametrize("field", ["theta_sync", "momentum_buf"])
def test_regression_state_sparse_tensor(field):
    """SwarmState.from_bytes: a float32 *sparse* tensor passes the dtype/shape checks and
    torch.isfinite() then raises NotImplementedError (no sparse kernel). A donor can send this
    (the sha256 is its own); download_state only catches StateError."""
    obj = {"format": STATE_FORMAT, "round": 1, "fingerprint": "fp-1", "theta_sync": torch.zeros(3),
           "momentum_buf": None, "samples": 0}
    obj[field] = torch.zeros(3).to_sparse()
    with pytest.raises(StateError):
        SwarmState.from_bytes(_save(obj), source="fuzz", fingerprint="fp-1", numel=3)


@pytest.mark.parametrize("meta", [b'{"chunks": Infinity, "size": 1}', b'{"chunks": 1, "size": -Infinity}'])
def test_regression_manifest_infinity(meta):
    """transfer.fetch_state: int(meta["chunks"]) on Infinity (valid for Python's json) raises
    OverflowError, which the (RuntimeError, ValueError, KeyError, TypeError) handler misses."""
    with connects_to(transfer, FakeStore({"state/resp/1/meta": meta})):
        with pytest.raises(StateError):
            transfer.fetch_state(DONOR, fingerprint="fp-1", numel=16, timeout=0.1)


@pytest.mark.parametrize("meta", [
    {"status": "complete", "included": 5},
    {"status": "complete", "included": ["QmClient"], "weights": ["x"]},
    {"status": "complete", "included": ["QmClient"], "weights": [None]},
    {"status": "complete", "included": ["QmClient"], "members": 5},
], ids=["included-int", "weights-str", "weights-null", "members-int"])
def test_regression_client_round_malformed_meta(meta):
    """relay.client_round promises never to raise for network faults, but a leader's result
    meta with a non-container "included", non-numeric "weights" or non-iterable "members"
    raises TypeError/ValueError (only RuntimeError/ValueError/AttributeError are caught, and
    the weights/members conversion sits outside the try)."""
    store = FakeStore({"5/nonce/client/result": json.dumps(meta).encode(),
                       "5/nonce/client/mean": torch.zeros(2).numpy().tobytes()})
    group = Group(rank=-1, store=store, clients=("QmClient",), **RELAY_GROUP)
    r = relay.client_round(group, "QmClient", torch.ones(2), 1.0, timeout_s=0.05)
    assert isinstance(r, RoundResult)


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16", "int8"])
def test_regression_codec_empty_strided(name):
    """Codec.decode(data, 0) where `data` is empty with stride != 1 (e.g. `buf[::2][:0]`): an
    empty tensor counts as contiguous, so it is not cloned, and .view(float) raises RuntimeError
    'self.stride(-1) must be 1'. (Not reachable from the network: allreduce slices stride-1 buffers.)"""
    data = torch.empty_strided((0,), (2,), dtype=torch.uint8)
    assert codecs.get_codec(name).decode(data, 0).numel() == 0


_DEEP = b"[" * 100_000


@pytest.mark.parametrize("where", ["fetch_state", "client_round", "follow", "lead"])
def test_deep_json_from_peer(where):
    """json.loads of a peer's deeply nested value (100k '[') raises RecursionError, a RuntimeError,
    which every store handler catches: the documented outcome follows. (Not a bug; kept because
    the fuzz strategies above never nest that deep. Contrast test_regression_ledger_load.)"""
    if where == "fetch_state":
        with connects_to(transfer, FakeStore({"state/resp/1/meta": _DEEP})):
            with pytest.raises(StateError):
                transfer.fetch_state(DONOR, fingerprint="fp-1", numel=16, timeout=0.1)
    elif where == "client_round":
        group = Group(rank=-1, store=FakeStore({"5/nonce/client/result": _DEEP}), clients=("QmClient",), **RELAY_GROUP)
        assert isinstance(relay.client_round(group, "QmClient", torch.ones(2), 1.0, timeout_s=0.05), RoundResult)
    elif where == "follow":
        with connects_to(matchmaking, FakeStore({f"3/{LEADER.nonce}/members": _DEEP})):
            with pytest.raises((matchmaking._Unreachable, MatchmakingError)):
                asyncio.run(_matchmaker()._follow(3, LEADER, ME, time.monotonic() + 1))
    else:
        me = Candidate(1000.0, "QmMe", "127.0.0.1", 29500, "lnonce")
        mm = _matchmaker(MatchmakingConfig(min_group_size=2, max_group_size=4, window=0.5, join_timeout=0.05))
        mm._server = FakeStore({f"3/{me.nonce}/slot/1": _DEEP}, {f"3/{me.nonce}/n": 1})  # type: ignore[assignment]
        with pytest.raises(MatchmakingError):
            asyncio.run(mm._lead(3, "k", me, lambda: 1, time.monotonic() - 1, set()))
