"""Fingerprints of the code and files a run depends on, so that a record made by other code is not reused.

`method_code(cls)`: SHA-256 of a method's source: the module of its class and of its base classes in the same
package or in `methods`, and every module of that package they import (found by parsing their imports), walked
transitively. A built-in method's files are methods/<name>.py and methods/base.py; a plug-in's are its own modules.
Files are named by module path (`methods/safemax.py`, `mypkg/loss.py`), so a fingerprint does not depend on where
the checkout or the user's package lives. `preset_file(name)`: SHA-256 of the YAML file a preset came from.
A record keeps both under `provenance`; `bench.orchestrate.stale_reason` compares them with the code now.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

_parsed: dict[Path, tuple[tuple[int, int], str, set[str]]] = {}  # file -> ((mtime, size), sha256, imports)


def _module_file(name: str) -> Path | None:
    """The .py file of module `name` (imported or not), or None for a built-in, compiled or missing module."""
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None) if module is not None else None
    if module is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a parent that is not a package, or a name that is not a module
            return None
        origin = spec.origin if spec is not None else None
    return Path(origin) if origin and str(origin).endswith(".py") else None


def _defining_module(base: str, name: str) -> str:
    """The module that `from base import name` uses: the submodule base.name, else where the object is defined."""
    full = f"{base}.{name}"
    if _module_file(full) is not None:
        return full
    value = getattr(sys.modules.get(base), name, None)
    defined = getattr(value, "__module__", None)
    return defined if isinstance(defined, str) else base


def _imports(name: str, path: Path, source: str) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            try:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            except (ImportError, ValueError):
                continue
            found.update(base if alias.name == "*" else _defining_module(base, alias.name) for alias in node.names)
    return found


def _read(name: str, path: Path) -> tuple[str, set[str]]:
    """(sha256 of the file, modules it imports), cached while its modification time and size stay the same."""
    stat = path.stat()
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _parsed.get(path)
    if cached is None or cached[0] != key:
        data = path.read_bytes()
        try:
            imports = _imports(name, path, data.decode())
        except (SyntaxError, UnicodeDecodeError):  # hashed all the same; its imports cannot be followed
            imports = set()
        cached = _parsed[path] = (key, hashlib.sha256(data).hexdigest(), imports)
    return cached[1], cached[2]


def _relative(name: str, path: Path) -> str:
    parts = name.split(".")
    return "/".join(parts + ["__init__.py"]) if path.name == "__init__.py" else "/".join(parts) + ".py"


def method_code(cls: type) -> dict | None:
    """{"sha256": of all files, "files": {module path: sha256}} of the method class's code; None when none of it
    is a .py file (a class defined in `__main__` or in a compiled module)."""
    top = cls.__module__.split(".")[0]
    todo = [c.__module__ for c in cls.__mro__ if c.__module__.split(".")[0] in (top, "methods")]
    files, seen = {}, set()
    while todo:
        name = todo.pop()
        if name in seen or name == "__main__":
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue
        digest, imports = _read(name, path)
        files[_relative(name, path)] = digest
        package = name.split(".")[0]
        todo += [module for module in imports if module.split(".")[0] == package]
    if not files:
        return None
    files = dict(sorted(files.items()))
    return {"sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest(), "files": files}


def changed_files(made: dict, now: dict) -> list[str]:
    """The module paths whose source differs between two `method_code` fingerprints (added or removed too)."""
    old, new = made.get("files"), now.get("files")
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    return sorted(path for path in set(old) | set(new) if old.get(path) != new.get(path))


def preset_file(name: str) -> dict | None:
    """{"file": its name, "sha256": of its bytes} for a preset registered from a file (`--preset-file`); else None."""
    from bench.extensions import preset_path

    path = preset_path(name)
    if path is None or not path.is_file():
        return None
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
