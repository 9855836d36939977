"""Run records: one JSON file per (preset, protocol, method, variant, forget class, seed), and their schema.

Layout: <results>/<preset>/<protocol>/<method>/<variant>/class<k>/seed<s>/record.json, beside samples.png.
`run_dir` builds the path and `parse_run_dir` reads it back. A record is made by `make_record` (which checks it
against the schema, so a malformed one is never written), written last and atomically (temporary file +
os.replace), and checked again on read: types, not only keys. A crashed run leaves none; a reader never sees
half of one. Tables and figures are built from these files alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sysconfig
import time
import traceback
import uuid
from pathlib import Path

from bench.metrics import HIGHER_IS_BETTER

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # the schema versions this code reads; a record of any other is not taken as done
RECORD_NAME = "record.json"
FAILURE_NAME = "failure.json"
INTERRUPTED_NAME = "interrupted.json"
SAFE_PART = re.compile(r"^[A-Za-z0-9._=,+-]+$")

# Every record field and its JSON type. A record of schema 1 (before base and classifier ids) reads as well.
SCHEMA: dict[str, type | tuple[type, ...]] = {
    "schema": int, "preset": str, "dataset": str, "protocol": dict, "method": str, "variant": str,
    "forget_class": int, "forget_class_name": str, "seed": int, "hyperparameters": dict, "overrides": dict,
    "scaled_from_paper": dict, "metrics": dict, "higher_is_better": dict, "timings": dict, "memory": dict,
    "losses": dict, "base_model": dict, "classifier": dict, "fid": dict, "speed": dict, "provenance": dict,
    "artifacts": dict, "method_report": dict, "budget": dict,
}
NUMBER = (int, float)
# Fields inside `metrics` and `timings` that every table reads: finite numbers.
METRICS = ("ua", "entropy", "forget_prob", "fid", "retain_accuracy")
TIMINGS = ("rte_s", "prepare_total_s", "eval_s")


class CorruptRecord(ValueError):
    """A record file that is not valid JSON or does not follow the schema; the message says what is wrong."""


def changed_fields(made: dict | None, now) -> str:
    """`field made, now new` for each field of the dataclass `now` that a record's `made` holds otherwise (its
    hyperparameters, its protocol), "" when none: the reason a record made with other settings is stale."""
    now, made = json.loads(json.dumps(dataclasses.asdict(now))), made or {}
    return ", ".join(f"{k} {made.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(now) | set(made))
                     if now.get(k) != made.get(k))


def _safe(part: str) -> str:
    if not SAFE_PART.match(part) or part in (".", "..") or part.startswith("."):
        raise ValueError(f"unsafe path component {part!r}: use letters, digits and . _ = , + -")
    return part


def run_dir(results: str | Path, preset: str, protocol: str, method: str, variant: str, forget_class: int,
            seed: int) -> Path:
    parts = [preset, protocol, method, variant, f"class{int(forget_class)}", f"seed{int(seed)}"]
    return Path(results).joinpath(*(_safe(p) for p in parts))


def parse_run_dir(directory: str | Path) -> dict:
    """The inverse of `run_dir`: preset, protocol, method, variant, forget_class and seed of a run folder."""
    *_, preset, protocol, method, variant, forget_class, seed = Path(directory).parts
    if not (forget_class.startswith("class") and seed.startswith("seed")):
        raise ValueError(f"{directory} is not a run folder (<preset>/<protocol>/<method>/<variant>/class<k>/seed<s>)")
    return {"preset": preset, "protocol": protocol, "method": method, "variant": variant,
            "forget_class": int(forget_class.removeprefix("class")), "seed": int(seed.removeprefix("seed"))}


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=False, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when something above failed


def problems(record) -> list[str]:
    """What is wrong with `record` against the schema (empty when nothing is)."""
    if not isinstance(record, dict):
        return [f"a record is a JSON object, not {type(record).__name__}"]
    schema = record.get("schema")
    if isinstance(schema, int) and not isinstance(schema, bool) and schema not in READABLE_SCHEMAS:
        newer = "made by a newer version of unlearning-bench" if schema > SCHEMA_VERSION else "of an unknown schema"
        return [f"{newer} (schema {schema}; this one reads {READABLE_SCHEMAS[0]}-{READABLE_SCHEMAS[-1]}): "
                "rerun with --force or upgrade"]
    found = []
    for key, kind in SCHEMA.items():
        if key not in record:
            if key not in ("forget_class_name", "higher_is_better", "speed", "artifacts", "dataset", "method_report",
                           "budget"):
                found.append(f"no {key!r}")
        elif not isinstance(record[key], kind) or (kind is int and isinstance(record[key], bool)):
            found.append(f"{key!r} is {type(record[key]).__name__}, not {getattr(kind, '__name__', kind)}")
    for section, names in (("metrics", METRICS), ("timings", TIMINGS)):
        values = record.get(section)
        if not isinstance(values, dict):
            continue
        for name in names:
            value = values.get(name)
            if name in values and not (isinstance(value, NUMBER) and not isinstance(value, bool)
                                       and math.isfinite(value)):
                found.append(f"{section}.{name} is {value!r}, not a finite number")
        if section == "metrics" and not all(name in values for name in ("ua", "entropy", "fid")):
            found.append("metrics lacks ua, entropy or fid")
    return found


def make_record(**fields) -> dict:
    """A record in schema order, with `schema` and `higher_is_better` filled in; raises if it breaks the schema."""
    record = {"schema": SCHEMA_VERSION, **fields,
              "higher_is_better": {k: v for k, v in HIGHER_IS_BETTER.items() if k in fields.get("metrics", {})
                                   or k in fields.get("timings", {})}}
    record = {key: record[key] for key in SCHEMA if key in record} | {k: v for k, v in record.items()
                                                                        if k not in SCHEMA}
    wrong = problems(record)
    if wrong:
        raise ValueError(f"refusing to write a record that breaks the schema: {'; '.join(wrong)}")
    return record


def read_record(path: str | Path) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptRecord(f"{path}: unreadable record ({exc}); delete it or rerun with --force") from exc
    wrong = problems(record)
    if wrong:
        fix = "" if wrong[-1].endswith("upgrade") else "; delete it or rerun with --force"  # the schema's says its own
        raise CorruptRecord(f"{path}: {'; '.join(wrong)}{fix}")
    return record


def identity(record: dict) -> tuple:
    """(preset, protocol, method, variant, forget class, seed): the run a record stands for."""
    return (record["preset"], record["protocol"].get("name"), record["method"], record["variant"],
            record["forget_class"], record["seed"])


def _own_folder(record: dict, results: Path) -> Path | None:
    """`run_dir` of the record's identity under `results`, or None where its fields make no folder name."""
    try:
        return run_dir(results, *identity(record))
    except (TypeError, ValueError):
        return None


def read_all(results: str | Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Every valid record under `results`, each run once (each with its `path`), and (path, why it was skipped)
    for each corrupt record and each copy.

    A copy is a record outside the run folder its own fields name (`R/record.json`, `R/a/b/record.json`), or a
    second record of one run (a run folder copied whole, `R/old/<preset>/...`): the one in its run folder under
    `results` is kept. Each skipped copy is logged, so that a report never counts a run twice.
    """
    results = Path(results)
    records, skipped, kept = [], [], {}
    for path in sorted(results.rglob(RECORD_NAME)):
        try:
            record = read_record(path)
        except CorruptRecord as exc:
            skipped.append((path, str(exc)))
            continue
        record["path"] = str(path)
        own = _own_folder(record, results)
        if own is None or path.parent.parts[-6:] != own.parts[-6:]:
            where = own.relative_to(results) if own is not None else "none (unsafe names)"
            skipped.append((path, f"a copy: not in the run folder its fields name ({where})"))
            continue
        first = kept.get(key := identity(record))
        if first is None:
            kept[key] = record
            records.append(record)
            continue
        if path.parent == own and Path(first["path"]).parent != own:  # this one is in its run folder: keep it
            records[records.index(first)] = kept[key] = record
            record, first = first, record
        skipped.append((Path(record["path"]), f"a second record of the run in {first['path']}"))
    for path, problem in skipped:
        if problem.startswith(("a copy", "a second record")):
            log.warning("record %s skipped: %s", path, problem)
    return records, skipped


def write_failure(directory: Path, error: str, log_path: str | None = None,
                  exc: BaseException | None = None) -> Path:
    """Leave `failure.json` where the record would be: what failed, where (the last frames of `exc`'s traceback:
    `where`, `traceback`, `traceback_text`) and where its log is; read by `bench status`. Replaces an interruption
    marker: the run's latest end is this failure."""
    path = directory / FAILURE_NAME
    frames, text = (failure_frames(exc), "".join(traceback.format_exception(exc))) if exc is not None else ([], None)
    write_json_atomic(path, {"error": error, "where": failure_where(exc) if exc is not None else None,
                             "traceback": frames, "traceback_text": text, "log": log_path,
                             "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    (directory / INTERRUPTED_NAME).unlink(missing_ok=True)
    return path


def write_interrupted(directory: Path, reason: str) -> Path:
    """Leave `interrupted.json` in the folder of a run or attack that was stopped (Ctrl-C, SIGTERM) before its
    record: not a failure, the next command resumes it. Replaces a failure marker of an earlier attempt."""
    path = directory / INTERRUPTED_NAME
    write_json_atomic(path, {"reason": reason, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    (directory / FAILURE_NAME).unlink(missing_ok=True)
    return path


def clear_markers(directory: Path) -> None:
    """Remove the failure and interruption markers of earlier attempts (the run or attack has its record now)."""
    for name in (FAILURE_NAME, INTERRUPTED_NAME):
        (directory / name).unlink(missing_ok=True)


def read_failure(directory: Path, name: str = FAILURE_NAME) -> dict | None:
    """The failure marker of a run or attack folder (`name`: or its interruption marker); None if none is readable."""
    try:
        payload = json.loads((directory / name).read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def describe_failure(failure: dict) -> str:
    """One line of a failure marker: the error, where it was raised, and its log."""
    where = f" at {failure['where']}" if failure.get("where") else ""
    log_path = f"; log {failure['log']}" if failure.get("log") else ""
    return f"{failure.get('error')}{where}{log_path}"


# -- where a failure was raised: the last frames of its traceback ------------------------------------------------
_ROOT = Path(__file__).resolve().parent.parent  # the project: its files are named relative to it
_PROJECT = tuple(str(_ROOT / package) + os.sep for package in ("bench", "methods", "reports"))
_LIBRARY = tuple(str(Path(p).resolve()) for p in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
                                                   sysconfig.get_paths()["platlib"]})


def _frame_text(frame: traceback.FrameSummary) -> str:
    path = Path(frame.filename)
    try:
        name = str(path.resolve().relative_to(_ROOT))
    except (ValueError, OSError):
        name = frame.filename
    return f"{name}:{frame.lineno} in {frame.name}"


def _in_library(frame: traceback.FrameSummary) -> bool:
    """Python's or an installed package's file (torch, numpy...), not the project's or a user's plug-in."""
    path = str(Path(frame.filename).resolve())
    return path.startswith(_LIBRARY) and not path.startswith(_PROJECT)


def failure_frames(exc: BaseException, keep: int = 5) -> list[str]:
    """The last `keep` frames of `exc`'s traceback, innermost last, as "file:line in function"."""
    return [_frame_text(frame) for frame in traceback.extract_tb(exc.__traceback__)[-keep:]]


def failure_where(exc: BaseException) -> str | None:
    """The innermost frame of `exc` in the project or a user's file (a method's loss, a plug-in), not in torch or
    Python; the innermost frame if all are."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [frame for frame in frames if not _in_library(frame)]
    return _frame_text((ours or frames)[-1]) if frames else None
