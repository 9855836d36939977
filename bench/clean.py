"""`bench clean`: remove the derived cache files that nothing will read again.

A derived file (a method's preparation, the base model's cached samples, FID reference statistics) is named by what
made it: the code (`fingerprint.code_key`), the base model's id, the classifier's weights (bench/cache.py). So an
edit to the code, or a base model or classifier trained again, leaves the old files behind, unread: on CIFAR-10
that is hundreds of MB per version (SA's Fisher alone is about 155 MB). In each base model's folder this finds:
  prepared/<method>/<id>/     of another base model than base.pt's, or (a file) of other code than the method's
  samples/<id>-ema|-raw/      of another base model, or (a key folder) of other bench code
  fid-reference/*.npz         of other bench code, or of a classifier no longer in the cache
  .<name>.<pid>.<hex>.tmp     a write that never finished (untouched for an hour: a writer on another node of a
                              shared cache may still be at work on a newer one)
and at the cache's root:
  datasets/digits-*.npz       the digits split of another scikit-learn version than the installed one
  datasets/cifar10-*.npz      a decoded CIFAR-10 image folder that is gone, or whose images changed since (its name
                              no longer matches the folder's files: another copy is decoded and kept beside it)
It keeps base models, classifiers, the decoded data sets a run may read, and the preparations of a method it cannot
import (a plug-in not named with --method-module), and says so. Everything it removes is rebuilt when a run needs it
again.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from bench import fingerprint
from bench.cache import CheckpointError, checkpoint_id, load_file

log = logging.getLogger(__name__)

TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")
DIGITS = re.compile(r"^digits-.+-scikit-learn-(?P<version>.+)\.npz$")  # bench.data.load_digits's names
CIFAR10 = re.compile(r"^cifar10-.+-(?P<key>[0-9a-f]{16})\.npz$")  # bench.data._load_cifar_image_folder's
UNFINISHED_AFTER_S = 3600


@dataclass(frozen=True)
class Removal:
    path: Path
    size: int  # bytes, the whole folder for a folder
    why: str


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _other_code(name: str, now: str) -> str | None:
    made = fingerprint.tagged_code(name)  # None: a name of the layout before code keys
    if made == now:
        return None
    return "other code" if made else "older cache layout (no code key)"


def classifier_fingerprints(root: Path) -> set[str]:
    """The weight hashes (`evaluate.fingerprint`) of every classifier in the cache: what a classifier-feature FID
    reference is named by."""
    from bench.evaluate import fingerprint as weights_hash

    found = set()
    for path in root.glob("*/classifier.pt"):
        try:
            payload = load_file(path, "", mmap=True)
        except (CheckpointError, OSError):
            continue
        if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
            found.add(weights_hash(payload["model"]))
    return found


def _method_code(name: str, memo: dict) -> str | None:
    """The code key of method `name`'s preparation now; None when the method cannot be imported here."""
    from methods import get_method

    if name not in memo:
        try:
            memo[name] = fingerprint.code_key(get_method(name))
        except ValueError:
            memo[name] = None
    return memo[name]


def _other_base(base_id: str | None) -> str:
    return "another base model's" if base_id else "no base model in this folder now"


def _prepared(folder: Path, base_id: str | None, memo: dict, kept: list[str]) -> list[Removal]:
    found = []
    for method_dir in sorted(p for p in (folder / "prepared").glob("*") if p.is_dir()):
        for by_base in sorted(p for p in method_dir.glob("*") if p.is_dir()):
            if by_base.name != base_id:
                found.append(Removal(by_base, size_of(by_base), _other_base(base_id)))
                continue
            now = _method_code(method_dir.name, memo)
            if now is None:
                kept.append(f"{method_dir}: method {method_dir.name!r} is not known here (a plug-in? name it with "
                            "--method-module)")
                continue
            found += [Removal(p, size_of(p), why) for p in sorted(by_base.glob("*.pt"))
                      if (why := _other_code(p.stem, now))]
    return found


def _samples(folder: Path, base_id: str | None, now: str) -> list[Removal]:
    found = []
    for by_weights in sorted(p for p in (folder / "samples").glob("*") if p.is_dir()):
        if by_weights.name.rsplit("-", 1)[0] != base_id:
            found.append(Removal(by_weights, size_of(by_weights), _other_base(base_id)))
            continue
        found += [Removal(p, size_of(p), why) for p in sorted(by_weights.glob("*"))
                  if p.is_dir() and (why := _other_code(p.name, now))]
    return found


def _references(folder: Path, now: str, classifiers) -> list[Removal]:
    """`classifiers()`: the weight hashes of the cache's classifiers, asked for only where a file names one."""
    found = []
    for path in sorted((folder / "fid-reference").glob("*.npz")):
        why = _other_code(path.stem, now)
        weights = re.search(r"-classifier-([0-9a-f]{16})-", path.name)
        if why is None and weights and weights.group(1) not in classifiers():
            why = "a classifier no longer in the cache"
        if why:
            found.append(Removal(path, size_of(path), why))
    return found


def _datasets(root: Path, kept: list[str]) -> list[Removal]:
    """Decoded data sets in `root/datasets` that no run reads again (see the module's docstring)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("scikit-learn")
    except PackageNotFoundError:
        installed = None
    found = []
    for path in sorted((root / "datasets").glob("*.npz")):
        why = None
        if (digits := DIGITS.match(path.name)) and installed and digits.group("version") != installed:
            why = f"scikit-learn {digits.group('version')}'s split; {installed} is installed"
        elif cifar := CIFAR10.match(path.name):
            why = _unread_cifar_copy(path, cifar.group("key"), kept)
        if why:
            found.append(Removal(path, size_of(path), why))
    return found


def _unread_cifar_copy(path: Path, key: str, kept: list[str]) -> str | None:
    """Why no run reads the decoded CIFAR-10 copy at `path` (named by `key`) again; None if one may."""
    from bench.data import decoded_folder, folder_key

    try:
        folder = decoded_folder(path)
    except Exception as exc:  # numpy raises zipfile, OS, key and value errors alike; a run would replace it
        return f"does not load ({type(exc).__name__}): a run decodes its folder again"
    if folder is None:
        kept.append(f"{path}: decoded before copies named their folder; remove it by hand if no run reads that "
                    "folder now")
        return None
    if not folder.is_dir():
        return f"its image folder {folder} is gone"
    try:
        current = folder_key(folder)
    except ValueError as exc:
        return f"its image folder {folder} is no CIFAR-10 folder now ({exc})"
    if current != key:
        return f"the images in {folder} changed since (a run decodes them again, as ...-{current}.npz)"
    return None


def _unfinished(root: Path, now_s: float) -> list[Removal]:
    return [Removal(p, size_of(p), "an unfinished write") for p in sorted(root.rglob(".*.tmp"))
            if p.is_file() and TEMPORARY.match(p.name) and now_s - p.stat().st_mtime > UNFINISHED_AFTER_S]


def find(root: Path) -> tuple[list[Removal], list[str]]:
    """(what to remove, what is kept that might look removable and why) in the cache at `root`. Methods are looked
    up in the registry, so plug-ins registered in this process (--method-module) are judged too."""
    now, memo, kept = fingerprint.code_key(), {}, []
    classifiers = functools.cache(lambda: classifier_fingerprints(root))  # hashing weights: only where needed
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if not any((folder / part).is_dir() for part in ("prepared", "samples", "fid-reference")):
            continue
        try:
            base_id = checkpoint_id(folder / "base.pt") if (folder / "base.pt").exists() else None
        except CheckpointError as exc:  # a damaged base model: leave its derived files to whoever repairs it
            kept.append(f"{folder}: prepared/ and samples/ kept, base.pt does not load ({exc})")
        else:
            found += _prepared(folder, base_id, memo, kept) + _samples(folder, base_id, now)
        found += _references(folder, now, classifiers)
    return found + _datasets(root, kept) + _unfinished(root, time.time()), kept


def remove(removal: Removal) -> None:
    if removal.path.is_dir():
        shutil.rmtree(removal.path)
    else:
        removal.path.unlink(missing_ok=True)
    log.debug("removed %s (%s)", removal.path, removal.why)


def readable(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


def total(removals: list[Removal]) -> str:
    """`N file(s) or folder(s), <size>`."""
    return f"{len(removals)} file(s) or folder(s), {readable(sum(r.size for r in removals))}"
