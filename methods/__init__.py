"""The registry of unlearning methods: the built-in ones, and any installed package's through entry points.

A package adds a method with one class decorated by `@register` (or listed under the entry-point group
`unlearning_bench.methods` in its pyproject.toml, `name = "pkg.module:Class"`); `bench ls` and `bench run` then
know it like a built-in one. `load_method("pkg.module:Class")` registers a class by its import path.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from methods.base import METHODS, Context, UnlearningMethod, register

# isort: off
# The built-in methods register themselves on import, in the order `--methods all` runs them.
from methods import original, safemax, sa, salun, retrain, gradient_ascent, erasediff, sfron  # noqa: E402, F401
# isort: on

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "unlearning_bench.methods"
_plugins_loaded = False


def load_plugins() -> None:
    """Register the methods installed packages declare under `unlearning_bench.methods` (once per process)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register(entry.load())
        except Exception as exc:  # a broken plugin must not take the built-in methods down with it
            log.warning("method plugin %s (%s) could not be loaded: %s", entry.name, entry.value, exc)


def load_method(path: str) -> type[UnlearningMethod]:
    """Import `pkg.module:Class` and register the class; errors name what is missing."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--method-module {path!r}: use package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--method-module {path!r}: cannot import {module_name} ({exc})") from None
    cls = getattr(module, attribute, None)
    if cls is None:
        raise ValueError(f"--method-module {path!r}: {module_name} has no {attribute}")
    return register(cls)


def get_method(name: str) -> type[UnlearningMethod]:
    load_plugins()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def parse_methods(spec: str) -> list[str]:
    """'all' or a comma-separated list of method names, each checked against the registry (duplicates once)."""
    load_plugins()
    names = list(METHODS) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no method given; choose from all, {', '.join(METHODS)}")
    for name in names:
        get_method(name)
    return list(dict.fromkeys(names))


__all__ = ["METHODS", "Context", "UnlearningMethod", "get_method", "load_method", "load_plugins", "parse_methods",
           "register"]
