"""Package attributes that load on first use (PEP 562).

A package's `__init__` that imports its heavy modules eagerly makes every light submodule
(a config, the errors) cost torch and hivemind: the console scripts could not answer
`--help` or a bad flag without loading them.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, where: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for `package`, whose public `name` lives in submodule `where[name]`."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{where[name]}", package), name)

    def __dir__() -> list[str]:
        return sorted({*where, *vars(importlib.import_module(package))})

    return __getattr__, __dir__
