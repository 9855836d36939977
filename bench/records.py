"""Run records: one JSON file per (preset, protocol, method, variant, forget class, seed).

Layout: <out>/<preset>/<protocol>/<method>/<variant>/class<k>/seed<s>/record.json, beside samples.png.
A record is written last and atomically (temporary file + os.replace), so a crashed run leaves none and a
reader never sees half of one. Tables and figures are built from these files alone.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

SCHEMA_VERSION = 1
RECORD_NAME = "record.json"
SAFE_PART = re.compile(r"^[A-Za-z0-9._=,+-]+$")


class CorruptRecord(ValueError):
    """A record file that is not valid JSON or lacks the fields every record has."""


def _safe(part: str) -> str:
    if not SAFE_PART.match(part) or part in (".", "..") or part.startswith("."):
        raise ValueError(f"unsafe path component {part!r}: use letters, digits and . _ = , + -")
    return part


def run_dir(out: str | Path, preset: str, protocol: str, method: str, variant: str, forget_class: int,
            seed: int) -> Path:
    parts = [preset, protocol, method, variant, f"class{int(forget_class)}", f"seed{int(seed)}"]
    return Path(out).joinpath(*(_safe(p) for p in parts))


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=False, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when something above failed


REQUIRED = ("schema", "preset", "method", "forget_class", "seed", "metrics", "timings")


def read_record(path: str | Path) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CorruptRecord(f"{path}: unreadable record ({exc}); delete it or rerun with --force") from exc
    missing = [key for key in REQUIRED if key not in record] if isinstance(record, dict) else list(REQUIRED)
    if missing:
        raise CorruptRecord(f"{path}: record lacks {missing}; delete it or rerun with --force")
    return record


def is_done(directory: Path) -> bool:
    """True when a valid record exists in `directory`."""
    try:
        read_record(directory / RECORD_NAME)
    except (CorruptRecord, FileNotFoundError):
        return False
    return True


def read_all(out: str | Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Every valid record under `out` (each with its `path`), and (path, problem) for each corrupt one."""
    records, corrupt = [], []
    for path in sorted(Path(out).rglob(RECORD_NAME)):
        try:
            record = read_record(path)
        except CorruptRecord as exc:
            corrupt.append((path, str(exc)))
            continue
        record["path"] = str(path)
        records.append(record)
    return records, corrupt
