"""Fingerprints of the code and files a run depends on, so that a record made by other code is not reused.

`method_code(cls)`: SHA-256 of a method's code: the module of its class and of its base classes in the same
package or in `methods`, and every module of that package they import (found by parsing their imports), walked
transitively. A built-in method's files are methods/<name>.py and methods/base.py; a plug-in's are its own modules.
`bench_code(cls)`: the same for the harness code the run executes (the runner, diffusion, UNet, data, evaluation),
all of `bench` that `bench.experiment` and the method import except the presets, which records compare by value;
`attack_code()`: the same for the code an attack runs (its record's `provenance.bench_code`).
Files are named by module path (`methods/safemax.py`, `mypkg/loss.py`), so a fingerprint does not depend on where
the checkout or the user's package lives. A file is hashed without its comments, docstrings and blank lines
(`runnable`), so editing those alone changes no fingerprint. `preset_file(name)`: SHA-256 of the values the YAML
file a preset came from sets (its comments and layout aside).
A record keeps all three under `provenance`; `bench.orchestrate.stale_reason` compares them with the code now.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path

# How a file's SHA-256 is taken: "code", of what runs (`runnable`), the default; "bytes", of the whole file, as records
# made before the schemes were (a fingerprint without "scheme" is one of those, and is compared in its own scheme).
SCHEME = "code"
_parsed: dict[Path, tuple[tuple[int, int], dict[str, str], set[str]]] = {}  # file -> ((mtime, size), sha256s, imports)


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


def _statements(nodes: list):
    """Every statement in `nodes` and in the blocks nested in them (an import is a statement: expressions, most of a
    file's nodes, are not walked)."""
    for node in nodes:
        yield node
        for block in ("body", "orelse", "finalbody", "handlers", "cases"):
            yield from _statements(getattr(node, block, ()))


def _imports(name: str, path: Path, tree: ast.Module) -> set[str]:
    """The modules the file's `tree` imports. `from base import x` counts as base.x where that is a submodule; this is
    looked up only in the packages a fingerprint follows (the file's own, `bench`, `methods`): looking up
    scipy.linalg would import scipy."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    followed = {name.split(".")[0], "bench", "methods"}
    found = set()
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            try:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            except (ImportError, ValueError):
                continue
            if base.split(".")[0] not in followed:
                found.add(base)
                continue
            found.update(base if alias.name == "*" else _defining_module(base, alias.name) for alias in node.names)
    return found


def _span(lines: list[str], node: ast.AST) -> tuple[int, int, int, int]:
    """(first line, its column, last line, its column) of `node`, 0-based lines, columns in characters (ast's
    are UTF-8 bytes)."""
    def column(line: int, offset: int) -> int:
        return len(lines[line].encode()[:offset].decode(errors="ignore"))

    first, last = node.lineno - 1, node.end_lineno - 1
    return first, column(first, node.col_offset), last, column(last, node.end_col_offset)


def _comment_start(line: str, number: int, strings: list[tuple[int, int, int, int]]) -> int | None:
    """Where the comment on line `number` starts: its first `#` outside every string literal; None if it has none."""
    column = line.find("#")
    while column != -1:
        inside = any((first, start) <= (number, column) < (last, end) for first, start, last, end in strings)
        if not inside:
            return column
        column = line.find("#", column + 1)
    return None


def runnable(source: str, tree: ast.Module) -> str:
    """`source` (parsed as `tree`) without its comments, docstrings, blank lines and trailing spaces: what runs.
    Editing only those leaves a fingerprint as it was, so a comment fixed in bench/ does not make every record
    stale and every cached sample be drawn again. A `#` outside a string literal starts a comment (nothing else in
    Python has one); a comment between the parts of an implicitly joined string is kept, which errs towards stale."""
    lines = source.split("\n")
    strings, cuts = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes))):
            span = _span(lines, node)
            for number in range(span[0], span[2] + 1):
                strings.setdefault(number, []).append(span)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                cuts.append(_span(lines, first))
    for number, line in enumerate(lines):
        if "#" in line and (start := _comment_start(line, number, strings.get(number, []))) is not None:
            cuts.append((number, start, number, len(line)))
    for first, start, last, end in sorted(cuts, reverse=True):  # from the end: earlier columns stay valid
        lines[first:last + 1] = [lines[first][:start] + lines[last][end:]]
    return "\n".join(line.rstrip() for line in lines if line.strip())


def _read(name: str, path: Path, scheme: str) -> tuple[str, set[str]]:
    """(sha256 of the file in `scheme`, modules it imports), cached while its modification time and size stay
    the same. A file that is not Python is hashed whole in both schemes, and its imports are not followed."""
    stat = path.stat()
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _parsed.get(path)
    if cached is None or cached[0] != key:
        data = path.read_bytes()
        digests, imports = {"bytes": hashlib.sha256(data).hexdigest()}, set()
        try:
            source = data.decode()
            tree = ast.parse(source, str(path))
            imports = _imports(name, path, tree)
            digests["code"] = hashlib.sha256(runnable(source, tree).encode()).hexdigest()
        except (SyntaxError, UnicodeDecodeError, ValueError):
            digests["code"] = digests["bytes"]
        cached = _parsed[path] = (key, digests, imports)
    return cached[1][scheme], cached[2]


def _relative(name: str, path: Path) -> str:
    parts = name.split(".")
    return "/".join(parts + ["__init__.py"]) if path.name == "__init__.py" else "/".join(parts) + ".py"


def _walk(roots: list[str], follow, scheme: str = SCHEME) -> tuple[dict[str, str], set[str]]:
    """({module path: sha256} of the modules reached from `roots` through the imports `follow(importer, module)`
    accepts, every module those files import)."""
    todo, files, seen, imported = list(roots), {}, set(), set()
    while todo:
        name = todo.pop()
        if name in seen or name == "__main__":
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue
        digest, imports = _read(name, path, scheme)
        files[_relative(name, path)] = digest
        imported |= imports
        todo += [module for module in imports if follow(name, module)]
    return files, imported


def _fingerprint(files: dict[str, str], scheme: str = SCHEME) -> dict | None:
    if not files:
        return None
    files = dict(sorted(files.items()))
    digest = {"sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest(), "files": files}
    return digest if scheme == "bytes" else {"scheme": scheme, **digest}


def _same_package(importer: str, module: str) -> bool:
    return module.split(".")[0] == importer.split(".")[0]


def _method_files(cls: type, scheme: str = SCHEME) -> tuple[dict[str, str], set[str]]:
    top = cls.__module__.split(".")[0]
    return _walk([c.__module__ for c in cls.__mro__ if c.__module__.split(".")[0] in (top, "methods")], _same_package,
                 scheme)


def method_code(cls: type, scheme: str = SCHEME) -> dict | None:
    """{"scheme": SCHEME, "sha256": of all files, "files": {module path: sha256}} of the method class's code; None
    when none of it is a .py file (a class defined in `__main__` or in a compiled module)."""
    return _fingerprint(_method_files(cls, scheme)[0], scheme)


# bench.config holds every preset. What a run takes from it (hyperparameters, protocol, the base model's recipe) a
# record compares by value (bench.orchestrate.stale_reason), so an edit to another preset leaves records standing.
COMPARED_BY_VALUE = frozenset({"bench.config"})


def _engine(module: str) -> bool:
    return module.split(".")[0] == "bench" and module not in COMPARED_BY_VALUE


def bench_code(cls: type | None = None, scheme: str = SCHEME) -> dict | None:
    """`method_code`'s form for the modules of `bench` a run of `cls` executes: `bench.experiment` (the run, its
    training loop, sampler, backbone, data and evaluation) and what the method's own files import from `bench`,
    walked transitively, less `COMPARED_BY_VALUE`. A run's numbers come from this code as much as from the method's."""
    imported = _method_files(cls, scheme)[1] if cls is not None else set()
    roots = ["bench.experiment", *filter(_engine, imported)]
    return _fingerprint(_walk(roots, lambda _, module: _engine(module), scheme)[0], scheme)


def code_key(cls: type | None = None) -> str:
    """10 hex digits of the code that computes a derived cache file: `bench_code(cls)` and, for a method's
    preparation, `method_code(cls)`. It is part of the file's name, so edited code computes the file afresh: a stale
    record run again must not evaluate with samples, or unlearn with a preparation, that the old code made."""
    parts = [bench_code(cls), method_code(cls) if cls is not None else None]
    return hashlib.sha256("".join((part or {}).get("sha256", "") for part in parts).encode()).hexdigest()[:10]


def code_tag(cls: type | None = None) -> str:
    """`-code<code_key(cls)>`: how a derived cache file's name ends (`tagged_code` reads it back)."""
    return f"-code{code_key(cls)}"


def tagged_code(name: str) -> str | None:
    """The code key at the end of a derived file's or folder's name (suffix removed); None where it has none."""
    found = re.search(r"-code([0-9a-f]{10})$", name)
    return found.group(1) if found else None


def attack_code(scheme: str = SCHEME) -> dict | None:
    """The same for an attack: `bench.attacks` and the `bench` modules it imports (its algorithms, the runner, the
    sampler, the evaluation), less `COMPARED_BY_VALUE`."""
    return _fingerprint(_walk(["bench.attacks"], lambda _, module: _engine(module), scheme)[0], scheme)


# The code fingerprints of a run record: provenance key, what `bench status` and the reasons call it, how it is made
RUN_CODE = (("method_code", "method", method_code), ("bench_code", "bench", bench_code))


def differs(made, now_of, what: str) -> str | None:
    """`<what> code changed (<files>)` when the fingerprint `made` (from a record) is not `now_of(scheme)`'s in the
    scheme `made` was taken in, else None. A record made before the fingerprint has none, and is not stale for that
    (existing results stand); one in a scheme this version does not know cannot be checked, and is stale."""
    if not isinstance(made, dict):
        return None
    if (scheme := made.get("scheme", "bytes")) not in ("bytes", "code"):
        return f"{what} code fingerprinted in a scheme this version does not know ({scheme!r})"
    if (now := now_of(scheme)) is not None and made.get("sha256") != now["sha256"]:
        changed = changed_files(made, now)
        return f"{what} code changed ({', '.join(changed)})" if changed else f"{what} code changed"
    return None


def code_changed(provenance: dict, cls: type) -> str | None:
    """Why the method's code or the bench code differs from a run record's fingerprints (`provenance`), or None."""
    for key, what, make in RUN_CODE:
        if reason := differs(provenance.get(key), functools.partial(make, cls), what):
            return reason
    return None


def changed_files(made: dict, now: dict) -> list[str]:
    """The module paths whose source differs between two fingerprints of code (added or removed too)."""
    old, new = made.get("files"), now.get("files")
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    return sorted(path for path in set(old) | set(new) if old.get(path) != new.get(path))


def preset_file(name: str, scheme: str = "values") -> dict | None:
    """{"file": its name, "scheme": "values", "sha256": of the values it sets} for a preset registered from a YAML
    file (`--preset-file`), so that a comment or the layout of the file is no change; else None. In scheme "bytes"
    (a fingerprint without "scheme", made before), the SHA-256 of the file's bytes."""
    import yaml

    from bench.extensions import preset_path

    path = preset_path(name)
    if path is None or not path.is_file():
        return None
    data = path.read_bytes()
    if scheme == "bytes":
        return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest()}
    try:
        values = json.dumps(yaml.safe_load(data), sort_keys=True, default=str)
    except yaml.YAMLError:  # no longer YAML: what it sets is unknown, and no fingerprint matches it
        values = data.hex()
    return {"file": path.name, "scheme": "values", "sha256": hashlib.sha256(values.encode()).hexdigest()}


def preset_file_changed(made, name: str) -> str | None:
    """`preset file changed (<file>)` when the fingerprint `made` (from a record) is not the file's now, in the scheme
    it was taken in; None when it is the same or the record has none."""
    if not isinstance(made, dict):
        return None
    now = preset_file(name, made.get("scheme", "bytes")) or {}
    return None if made.get("sha256") == now.get("sha256") else f"preset file changed ({made.get('file')})"
