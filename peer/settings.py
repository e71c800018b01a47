"""Loading a config tree: defaults < TOML file < SWARMTRAIN_* environment variables < flags.

The configs are pydantic dataclasses, one per component, nested by section (peer/config.py,
averaging/config.py, bootstrap/config.py): pydantic checks each value against its annotation,
each class's ``__post_init__`` the rules between fields. pydantic-settings builds the
``--section.field-name`` flags (with ``--help`` grouped by section) and reads the environment
(``SWARMTRAIN_SYNC__EVERY_SECONDS=30``). What is ours, below: one error line that names the
key and where its value came from, the hints for renamed keys, and ``--print-config``'s
commented TOML.

    parser = OneLineParser(prog="swarm-peer")
    parser.add_argument("--config")
    flags = Flags(parser, RunConfig)
    ns = flags.parse(argv)
    cfg = load(RunConfig, path=ns.config, flags=flags.values(ns))
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import Field, TypeAdapter, ValidationError, create_model
from pydantic.dataclasses import is_pydantic_dataclass
from pydantic_settings import BaseSettings, CliSettingsSource, EnvSettingsSource, SettingsConfigDict, SettingsError

from averaging.errors import ConfigError  # (re-exported: the config layer's error)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

__all__ = ["ConfigError", "Flags", "load", "load_toml", "validate", "dump_toml", "to_dict", "CLI_SOURCE", "ENV_PREFIX"]

#: How errors name values that came from command-line flags.
CLI_SOURCE = "command-line flags"
#: `SWARMTRAIN_SYNC__EVERY_SECONDS=30` is `--sync.every-seconds 30` (swarm-bootstrap: SWARMTRAIN_BOOTSTRAP_PORT).
ENV_PREFIX = "SWARMTRAIN_"

# Keys that moved, old dotted name -> new one: a file, flag or variable that uses an old name
# still works, with a one-line note naming the new one. (`[sync]` was flat until the averaging
# components got their own sections.)
RENAMED: dict[str, str] = {
    "sync.outer_lr": "sync.outer.lr", "sync.outer_momentum": "sync.outer.momentum",
    "sync.nesterov": "sync.outer.nesterov", "sync.outer_warmup": "sync.outer.warmup",
    "sync.min_group_size": "sync.matchmaking.min_group_size", "sync.max_group_size": "sync.matchmaking.max_group_size",
    "sync.matchmaking_window": "sync.matchmaking.window", "sync.join_timeout": "sync.matchmaking.join_timeout",
    "sync.allreduce_timeout": "sync.allreduce.timeout", "sync.trusted": "sync.allreduce.trusted",
    "sync.ban_after": "sync.allreduce.ban_after",
    "sync.compression": "sync.codec.name", "sync.error_feedback_decay": "sync.codec.error_feedback_decay",
    "sync.aggregator": "sync.aggregator.name", "sync.trim": "sync.aggregator.trim",
    "sync.clip_tau": "sync.aggregator.clip_tau", "sync.clip_iters": "sync.aggregator.clip_iters",
}


class _Settings(BaseSettings):
    # Only ever used to build flags and read the environment; values are validated by the config
    # dataclasses themselves (validate()). `none` is None on the command line, as in the TOML.
    model_config = SettingsConfigDict(cli_kebab_case=True, cli_implicit_flags=True, cli_parse_none_str="none",
                                      cli_avoid_json=True, case_sensitive=False, env_nested_delimiter="__")


def _settings_class(cls: type, prefix: str) -> type[BaseSettings]:
    """A BaseSettings with `cls`'s fields (or, with a prefix, one field `prefix` of type `cls`)."""
    if prefix:
        fields = {prefix: (cls, Field(default_factory=cls))}
    else:
        fields = {name: (info.annotation, copy.copy(info)) for name, info in cls.__pydantic_fields__.items()}
    return create_model(f"{cls.__name__}Settings", __base__=_Settings, **fields)


def _upgrade_argv(argv: list[str], known: set[str], note: Callable[[str], None]) -> list[str]:
    """Old spellings of flags -> today's, each with a note: a renamed key (RENAMED), and the
    negative form `--sec.no-flag` (pydantic-settings writes `--no-sec.flag`)."""
    out = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        # `--sync.aggregator trimmed_mean` is the old key; `--sync.aggregator '{"name": ...}'` the section's JSON
        old_key = flag[2:].replace("-", "_") in RENAMED and not value.lstrip().startswith("{")
        if not flag.startswith("--") or (flag in known and not old_key):
            out.append(arg)
            continue
        body, negative = flag[2:], False
        head, dot, name = body.rpartition(".")
        if body.startswith("no-"):
            body, negative = body[3:], True
        elif name.startswith("no-"):
            body, negative = head + dot + name[3:], True
        dotted = body.replace("-", "_")
        for key in (RENAMED.get(dotted), dotted):
            new = f"--{'no-' if negative else ''}{key}".replace("_", "-") if key else ""
            if new in known and new != flag:
                note(f"{flag} is now {new}")
                flag = new
                break
        out.append(flag + ("=" + arg.partition("=")[2] if eq else ""))
    return out


class Flags:
    """The `--section.field-name` flags of config class `cls`, added to `parser` by
    pydantic-settings; `prefix` puts them under one more section (`--model.n-layer` for
    ModelConfig with prefix "model")."""

    def __init__(self, parser: argparse.ArgumentParser, cls: type, *, prefix: str = "") -> None:
        self.parser = parser
        self._source = CliSettingsSource(_settings_class(cls, prefix), root_parser=parser)
        self._known = {o for a in parser._actions for o in a.option_strings}

    def note(self, msg: str) -> None:
        """A renamed key's note, as this command prints it (`load(..., note=flags.note)`)."""
        print(f"{self.parser.prog}: note: {msg}", file=sys.stderr)

    def parse(self, argv: list[str], *, note: Callable[[str], None] | None = None) -> argparse.Namespace:
        """Parse argv (exit 2 with one line on an unknown flag), renamed flags accepted with a note."""
        return self.parser.parse_args(_upgrade_argv(list(argv), self._known, note or self.note))

    def values(self, ns: argparse.Namespace) -> dict[str, Any]:
        """The flags actually given, as a nested dict shaped like the TOML (values as strings)."""
        self._source(parsed_args={k: v for k, v in vars(ns).items() if v is not None})
        return self._source()


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML file; every failure is a one-line :class:`ConfigError`."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a file: {p}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"invalid TOML in {p}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError; a number beyond int limits; a NUL in the path
        raise ConfigError(f"invalid TOML in {p}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None


def _env(cls: type, prefix: str, environ: Mapping[str, str] | None) -> dict[str, Any]:
    settings = _settings_class(cls, "")
    source = EnvSettingsSource(settings, env_prefix=prefix, env_nested_delimiter="__", case_sensitive=False)
    if environ is not None:
        source.env_vars = {k.lower(): v for k, v in environ.items()}
    try:
        return source()
    except SettingsError as e:  # a list or table that is not JSON
        raise ConfigError(f"environment: {e} (a list or table is written as JSON)") from None


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
    return out


def _upgrade_keys(values: Mapping[str, Any], where: str, note: Callable[[str], None]) -> dict[str, Any]:
    """Move renamed keys of a nested dict to their new place, with a note."""
    out = copy.deepcopy(dict(values))
    for old, new in RENAMED.items():
        *head, last = old.split(".")
        node = out
        for part in head:
            node = node.get(part) if isinstance(node, dict) else None
        # (an old key whose name is now a section, `sync.aggregator`, moves only as a plain value)
        if isinstance(node, dict) and last in node and not isinstance(node[last], Mapping):
            value = node.pop(last)
            *nhead, nlast = new.split(".")
            target = out
            for part in nhead:
                target = target.setdefault(part, {})
            target.setdefault(nlast, value)
            note(f"'{old}' in {where} is now '{new}'")
    return out


_ABSENT = object()


def _find(values: Mapping[str, Any], path: tuple) -> Any:
    """The value at `path` in a nested dict, or _ABSENT."""
    for part in path:
        if not isinstance(values, Mapping) or part not in values:
            return _ABSENT
        values = values[part]
    return values


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate(cls: type, values: Mapping[str, Any], *, sources: Sequence[tuple[str | Callable[[tuple], str], Mapping[str, Any]]] = ()) -> Any:
    """Build `cls` from a nested dict; the first problem is a one-line ConfigError naming the key
    and the source (of `sources`, highest precedence first) its value came from."""
    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as e:
        err = e.errors()[0]
    loc = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
    key = ".".join(loc)
    where = next((label(loc) if callable(label) else label for label, vals in sources if vals and _find(vals, loc) is not _ABSENT), None)
    where = f" (in {where})" if where else ""
    if err["type"] == "unexpected_keyword_argument":
        section = _resolve(cls, loc[:-1])
        known = list(section.__pydantic_fields__) if section else []
        msg = f"unknown config key '{key}'{where} (known keys: {', '.join(known) or 'none'})"
        guess = loc[-1].replace("-", "_")
        match = [guess] if guess in known else difflib.get_close_matches(loc[-1], known, n=1)
        raise ConfigError(msg + (f"; did you mean '{match[0]}'?" if match else ""))
    if err["type"] == "value_error":  # a rule of __post_init__: its own message names the field
        reason = str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
        raise ConfigError(f"invalid config: {key + ': ' if key else ''}{reason}{where}")
    index = "".join(f"[{p}]" for p in err["loc"] if isinstance(p, int))
    msg = err["msg"][0].lower() + err["msg"][1:]
    raise ConfigError(f"config key '{key}{index}': {msg}, got {_describe(err['input'])}{where}")


def _resolve(cls: type, path: tuple) -> type | None:
    for part in path:
        info = getattr(cls, "__pydantic_fields__", {}).get(part)
        cls = info.annotation if info is not None else None
        if cls is None or not is_pydantic_dataclass(cls):
            return None
    return cls


def load(cls: type, *, path: str | os.PathLike[str] | None = None, flags: Mapping[str, Any] | None = None,
         env_prefix: str | None = ENV_PREFIX, environ: Mapping[str, str] | None = None,
         note: Callable[[str], None] | None = None) -> Any:
    """`cls` from its defaults < the TOML file at `path` < `env_prefix` variables (None: not
    read; `environ`: instead of os.environ) < `flags` (Flags.values)."""
    note = note or (lambda msg: print(f"note: {msg}", file=sys.stderr))
    file_values = _upgrade_keys(load_toml(path), str(path), note) if path else {}
    env_values = _upgrade_keys(_env(cls, env_prefix, environ), "the environment", note) if env_prefix else {}
    flag_values = dict(flags or {})

    def env_var(loc: tuple) -> str:  # the variable of a leaf; for a rule of a section, the prefix
        leaf = loc and not isinstance(_find(env_values, loc), Mapping)
        return f"environment variable {env_prefix}{'__'.join(loc).upper()}" if leaf else f"environment variables {env_prefix}*"

    sources = [(CLI_SOURCE, flag_values), (env_var, env_values), (str(path), file_values)]
    return validate(cls, _merge(_merge(file_values, env_values), flag_values), sources=sources)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The nested dict of a config (sections become dicts)."""
    return dataclasses.asdict(cfg)


def dump_toml(cfg: Any) -> str:
    """`cfg` as TOML, each key under its description as a comment; `load` reads it back equal.
    A None is left out (every optional key defaults to None)."""
    lines: list[str] = []

    def section(obj: Any, prefix: str) -> None:
        tables = []
        for name, info in type(obj).__pydantic_fields__.items():
            value = getattr(obj, name)
            if is_pydantic_dataclass(type(value)):
                tables.append((name, info, value))
            elif value is not None:
                lines.extend(_comment(info.description))
                lines.append(tomli_w.dumps({name: value}).strip())
        for name, info, value in tables:
            lines.extend(["", *_comment(info.description), f"[{prefix}{name}]"])
            section(value, f"{prefix}{name}.")

    section(cfg, "")
    return "\n".join(lines).strip("\n") + "\n"


def _comment(text: str | None) -> list[str]:
    text = " ".join(part.strip() for part in (text or "").splitlines() if part.strip())
    return [f"# {text}"] if text else []
