"""Generic configuration layer: nested dataclasses <- TOML file <- CLI flags.

A config is a tree of ``@dataclass(kw_only=True)`` classes.  A field whose type is
itself a dataclass is a *section* (a ``[section]`` table in TOML, a ``--section.``
flag prefix on the command line); every other field is a *leaf*.  Document leaves
with :func:`doc` (or ``dataclasses.field(metadata={"help": ...})``).

Precedence is dataclass defaults < TOML file < command-line flags.  Both sources go
through one validation path, :func:`build`, which coerces values according to the
annotations and reports problems as a one-line :class:`ConfigError`.

Supported leaf annotations: ``int`` (bools and non-integral floats rejected),
``float`` (ints accepted), ``str``, ``bool``, ``X | None`` / ``Optional[X]``,
``list[X]``, ``Literal[...]``, other unions, nested dataclasses, and plain classes
constructible from a string (e.g. ``Path``).  Strings are parsed for non-string
types (that is how CLI values arrive): ``"10"`` -> 10, ``"true"/"false"`` (also
yes/no, on/off, 1/0) -> bool, ``"a,b"`` -> ``["a", "b"]`` (comma-separated; ``""``
is the empty list), and ``"none"`` (any case) -> ``None`` for optional fields.

Typical use::

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_arguments(parser, Root)
    ns = parser.parse_args()
    cfg = load(Root, path=ns.config, cli_overrides=overrides_from_namespace(ns, Root))
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Literal, Union, get_args, get_origin

from averaging.errors import ConfigError  # (re-exported: the config layer's error)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "doc",
    "load_toml",
    "build",
    "merge",
    "add_arguments",
    "overrides_from_namespace",
    "to_dict",
    "dump_toml",
    "load",
    "CLI_SOURCE",
]

#: How errors name values that came from command-line flags.
CLI_SOURCE = "command-line flags"

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_NoneType = type(None)


def _one_line(text: object) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def doc(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with ``metadata={"help": help}``.

    Unhashable defaults (lists, dicts, dataclass instances, ...) are turned into a
    ``default_factory`` returning a deep copy; a dataclass *class* as default is used
    as the factory itself (``sync: Sync = doc(Sync, "averaging settings")``).
    Extra keyword arguments go to :func:`dataclasses.field`.
    """
    metadata = {**kw.pop("metadata", {}), "help": help}
    if "default_factory" in kw or default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, **kw)
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=metadata, **kw)
    if type(default).__hash__ is None:  # list, dict, set, mutable dataclass instance
        proto = copy.deepcopy(default)
        return dataclasses.field(default_factory=lambda: copy.deepcopy(proto), metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


# --------------------------------------------------------------------------- introspection

_HINTS: dict[type, dict[str, Any]] = {}


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved annotation) for every init field of dataclass ``cls``."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    hints = _HINTS.get(cls)
    if hints is None:
        try:
            hints = typing.get_type_hints(cls)
        except Exception as exc:  # e.g. string annotations naming function-local classes
            hints = {}
            for f in dataclasses.fields(cls):
                if isinstance(f.type, str):
                    raise TypeError(
                        f"cannot resolve annotation {f.type!r} of {cls.__qualname__}.{f.name}: {exc}"
                    ) from exc
                hints[f.name] = f.type
        _HINTS[cls] = hints
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _is_list(tp: Any) -> bool:
    return tp is list or get_origin(tp) is list


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any value"
    if _is_section(tp):
        return "a table"
    if _is_union(tp):
        args = get_args(tp)
        names = [_type_name(a) for a in args if a is not _NoneType]
        return " or ".join(names + (["none"] if _NoneType in args else []))
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(tp))
    if _is_list(tp):
        (elem,) = get_args(tp) or (Any,)
        return "list" if elem is Any else f"list of {_type_name(elem)}"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    kind = "table" if isinstance(value, Mapping) else type(value).__name__
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def _flag(dotted: str) -> str:
    """'sync.every_steps' -> '--sync.every-steps' (dashes only in the field part)."""
    head, _, name = dotted.rpartition(".")
    return "--" + (head + "." if head else "") + name.replace("_", "-")


# --------------------------------------------------------------------------- coercion


class _Mismatch(Exception):
    def __init__(self, key: str, expected: str, value: Any) -> None:
        super().__init__(key)
        self.key, self.expected, self.value = key, expected, value


SourceOf = Callable[[str], str]


def _coerce(value: Any, tp: Any, key: str, source_of: SourceOf) -> Any:
    if tp is Any:
        return value
    if _is_section(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, key + ".", source_of)
        raise _Mismatch(key, "a table", value)

    origin = get_origin(tp)
    if _is_union(tp):
        args = get_args(tp)
        nullable = _NoneType in args
        options = [a for a in args if a is not _NoneType]
        if nullable and (value is None or (isinstance(value, str) and value.strip().lower() == "none")):
            return None
        if len(options) == 1:
            try:
                return _coerce(value, options[0], key, source_of)
            except _Mismatch as m:
                if m.key == key:  # mention "or none"; keep element-level errors as they are
                    raise _Mismatch(key, _type_name(tp), value) from None
                raise
        for option in options:
            try:
                return _coerce(value, option, key, source_of)
            except _Mismatch:
                continue
        raise _Mismatch(key, _type_name(tp), value)

    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if type(value) is type(c) and value == c:
                return c
        if isinstance(value, str):
            for c in choices:
                if isinstance(c, str) or c is None:
                    continue
                try:
                    cv = _coerce(value, type(c), key, source_of)
                except _Mismatch:
                    continue
                if type(cv) is type(c) and cv == c:
                    return c
        raise _Mismatch(key, _type_name(tp), value)

    if _is_list(tp):
        (elem,) = get_args(tp) or (Any,)
        if isinstance(value, str):
            items: list[Any] = [s.strip() for s in value.split(",") if s.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise _Mismatch(key, _type_name(tp), value)
        return [_coerce(v, elem, f"{key}[{i}]", source_of) for i, v in enumerate(items)]

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            s = value.strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
        raise _Mismatch(key, "bool", value)

    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch(key, "int", value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    f = float(value.strip())
                except ValueError:
                    f = math.nan
                if f.is_integer():
                    return int(f)
        raise _Mismatch(key, "int", value)

    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch(key, "float", value)
        try:
            if isinstance(value, (int, float)):
                return float(value)  # OverflowError for an int beyond float range
            if isinstance(value, str):
                return float(value.strip())
        except (ValueError, OverflowError):
            pass
        raise _Mismatch(key, "float", value)

    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(key, "str", value)

    check = origin if isinstance(origin, type) else tp
    if isinstance(check, type):
        if isinstance(value, check):
            return value
        if isinstance(value, str) and origin is None:
            try:
                return tp(value)
            except (TypeError, ValueError) as e:  # e.g. Path("\0") or a class that rejects the text
                raise _Mismatch(key, _type_name(tp), value) from e
        raise _Mismatch(key, _type_name(tp), value)
    return value  # some other typing construct: not checked


def _build(cls: type, values: Any, prefix: str, source_of: SourceOf) -> Any:
    fields = _fields(cls)
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        key = prefix[:-1] or "<root>"
        raise ConfigError(f"config key '{key}' must be a table, got {_describe(values)} (in {source_of(key)})")

    known = [f.name for f, _ in fields]
    for key in values:
        if key not in known:
            dotted = f"{prefix}{key}"
            msg = f"unknown config key '{dotted}' in {source_of(dotted)} (known keys: {', '.join(known) or 'none'})"
            guess = str(key).replace("-", "_")
            match = [guess] if guess in known else difflib.get_close_matches(str(key), known, n=1)
            if match:
                msg += f"; did you mean '{match[0]}'?"
            raise ConfigError(msg)

    kwargs: dict[str, Any] = {}
    for f, tp in fields:
        dotted = prefix + f.name
        if f.name in values:
            try:
                kwargs[f.name] = _coerce(values[f.name], tp, dotted, source_of)
            except _Mismatch as m:
                where = source_of(m.key.split("[", 1)[0])
                raise ConfigError(
                    f"config key '{m.key}' must be {m.expected}, got {_describe(m.value)} (in {where})"
                ) from None
        elif _has_default(f):
            continue
        elif _is_section(tp):
            kwargs[f.name] = _build(tp, {}, dotted + ".", source_of)
        else:
            raise ConfigError(
                f"missing required config key '{dotted}' (set it in the config file or with {_flag(dotted)})"
            )

    try:
        return cls(**kwargs)
    except ValueError as exc:
        where = f"{prefix[:-1]}: " if prefix else ""
        raise ConfigError(f"invalid config: {where}{exc}") from exc


def build(cls: type, values: Mapping[str, Any], *, source: str = "config") -> Any:
    """Build and validate the dataclass tree ``cls`` from a nested dict.

    ``source`` names where the values came from in error messages (e.g. a path).
    """
    return _build(cls, values, "", lambda _key: source)


# --------------------------------------------------------------------------- TOML


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
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in {p}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"invalid TOML in {p}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:  # tomllib: a number beyond int limits, absurd nesting; a NUL in the path
        raise ConfigError(f"invalid TOML in {p}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two nested dicts (``overrides`` wins); neither input is modified."""
    out = {k: copy.deepcopy(v) for k, v in base.items()}
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def to_dict(instance: Any) -> dict[str, Any]:
    """The nested dict of an instance's init fields (sections become dicts)."""
    out: dict[str, Any] = {}
    for f, _ in _fields(type(instance)):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = to_dict(value)
        else:
            out[f.name] = copy.deepcopy(value)
    return out


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, os.PathLike):
        return _toml_str(os.fspath(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, f"{key}[{i}]") for i, v in enumerate(value)) + "]"
    raise ConfigError(f"cannot write config key '{key}' as TOML: unsupported value {_describe(value)}")


def _dump(obj: Any, prefix: str, lines: list[str]) -> None:
    sections = []
    for f, _ in _fields(type(obj)):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            sections.append((f, value))
            continue
        if value is None:
            if _field_default(f) is None:
                continue  # omitted: the default restores it
            value = "none"  # parsed back to None by build() for optional fields
        help_text = _one_line(f.metadata.get("help", ""))
        if help_text:
            lines.append(f"# {help_text}")
        lines.append(f"{f.name} = {_toml_value(value, prefix + f.name)}")
    for f, value in sections:
        lines.append("")
        help_text = _one_line(f.metadata.get("help", ""))
        if help_text:
            lines.append(f"# {help_text}")
        lines.append(f"[{prefix}{f.name}]")
        _dump(value, f"{prefix}{f.name}.", lines)


def dump_toml(instance: Any) -> str:
    """Serialize a config instance as TOML, with field help as comments.

    ``None`` values are omitted when the field's default is ``None`` (and written as
    ``"none"`` otherwise), so ``build(cls, tomllib.loads(dump_toml(x))) == x``.
    """
    lines: list[str] = []
    _dump(instance, "", lines)
    return "\n".join(lines).strip("\n") + "\n"


def load(cls: type, *, path: str | os.PathLike[str] | None, cli_overrides: Mapping[str, Any]) -> Any:
    """``build(cls, merge(load_toml(path) if path else {}, cli_overrides))``.

    Errors name the file for keys that came from it and ``command-line flags`` for
    keys that came from ``cli_overrides``.
    """
    file_values = load_toml(path) if path else {}
    file_label = str(path) if path else "config"
    cli_leaves: set[str] = set()
    cli_paths: set[str] = set()
    file_paths: set[str] = set()
    _collect_paths(cli_overrides, "", cli_paths, cli_leaves)
    _collect_paths(file_values, "", file_paths, set())

    def source_of(dotted: str) -> str:
        if dotted in cli_leaves:
            return CLI_SOURCE
        if dotted in file_paths:
            return file_label
        return CLI_SOURCE if dotted in cli_paths else file_label

    return _build(cls, merge(file_values, cli_overrides), "", source_of)


def _collect_paths(d: Mapping[str, Any], prefix: str, paths: set[str], leaves: set[str]) -> None:
    for key, value in d.items():
        dotted = f"{prefix}{key}"
        paths.add(dotted)
        if isinstance(value, Mapping):
            _collect_paths(value, dotted + ".", paths, leaves)
        else:
            leaves.add(dotted)


# --------------------------------------------------------------------------- argparse


class _BoolFlag(argparse.BooleanOptionalAction):
    """``--sec.flag`` / ``--sec.no-flag`` (BooleanOptionalAction would make ``--no-sec.flag``)."""

    def __init__(self, option_strings: list[str], dest: str, default: Any = None, help: str | None = None,
                 **kw: Any) -> None:
        names: list[str] = []
        self._negatives: set[str] = set()
        for opt in option_strings:
            names.append(opt)
            if opt.startswith("--"):
                head, dot, name = opt[2:].rpartition(".")
                neg = f"--{head}{dot}no-{name}"
                names.append(neg)
                self._negatives.add(neg)
        argparse.Action.__init__(self, option_strings=names, dest=dest, nargs=0, default=default, help=help, **kw)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, option_string not in self._negatives)


def _cli_text(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(_cli_text(v) for v in value) if value else '""'
    if isinstance(value, str) and value == "":
        return '""'
    return str(value)


def _metavar(tp: Any) -> str:
    if _is_union(tp):
        args = get_args(tp)
        names = [_metavar(a) for a in args if a is not _NoneType]
        return "|".join(names + (["none"] if _NoneType in args else []))
    if get_origin(tp) is Literal:
        return "{" + ",".join(str(c) for c in get_args(tp)) + "}"
    if _is_list(tp):
        (elem,) = get_args(tp) or (Any,)
        return f"{_metavar(elem) if elem is not Any else 'VALUE'},..."
    if tp is bool:
        return "BOOL"
    if isinstance(tp, type):
        return tp.__name__.upper()
    return "VALUE"


def _normalize_prefix(prefix: str) -> str:
    return prefix + "." if prefix and not prefix.endswith(".") else prefix


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "") -> None:
    """Add one ``--section.field-name`` flag per leaf field of ``cls``.

    Flags default to ``argparse.SUPPRESS`` (only flags actually given reach the
    namespace) and keep their values as strings for :func:`build` to validate.
    ``bool`` fields get ``--x.flag`` / ``--x.no-flag``; list fields take one
    comma-separated value (a repeated flag replaces the earlier one); ``none``
    sets an optional field to None.  ``prefix`` (e.g. ``"sync."``) is prepended to
    every flag and dest.
    """
    _add_arguments(parser, parser, cls, _normalize_prefix(prefix))


def _add_arguments(parser: argparse.ArgumentParser, target: Any, cls: type, prefix: str) -> None:
    for f, tp in _fields(cls):
        dotted = prefix + f.name
        if _is_section(tp):
            group = parser.add_argument_group(f"[{dotted}]", _one_line(f.metadata.get("help", "")) or None)
            _add_arguments(parser, group, tp, dotted + ".")
            continue
        help_text = _one_line(f.metadata.get("help", ""))
        extra = []
        if _is_list(tp) or (_is_union(tp) and any(_is_list(a) for a in get_args(tp))):
            extra.append("comma-separated")
        if _is_union(tp) and _NoneType in get_args(tp):
            extra.append("'none' for none")
        extra.append(f"default: {_cli_text(_field_default(f))}")
        full_help = (f"{help_text} " if help_text else "") + f"({'; '.join(extra)})"
        full_help = full_help.replace("%", "%%")
        if tp is bool:
            target.add_argument(_flag(dotted), dest=dotted, action=_BoolFlag, default=argparse.SUPPRESS,
                                help=full_help)
        else:
            target.add_argument(_flag(dotted), dest=dotted, metavar=_metavar(tp), default=argparse.SUPPRESS,
                                help=full_help)


def overrides_from_namespace(ns: argparse.Namespace, cls: type, *, prefix: str = "") -> dict[str, Any]:
    """The flags actually given on the command line, as a nested dict shaped like the TOML."""
    prefix = _normalize_prefix(prefix)
    out: dict[str, Any] = {}
    for f, tp in _fields(cls):
        dotted = prefix + f.name
        if _is_section(tp):
            sub = overrides_from_namespace(ns, tp, prefix=dotted + ".")
            if sub:
                out[f.name] = sub
        elif hasattr(ns, dotted):
            out[f.name] = getattr(ns, dotted)
    return out
