"""Run records: one JSON file per (preset, protocol, method, variant, forget class, seed).

Layout: <out>/<preset>/<protocol>/<method>/<variant>/class<k>/seed<s>/record.json, beside samples.png.
A record is written last and atomically (temporary file + os.replace), so a crashed run leaves none and a
reader never sees half of one. Tables and figures are built from these files alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

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


# -- claims: which process is running a run (or building a preset's prerequisites) right now ----------------------
CLAIM_NAME = "claim.json"
HEARTBEAT_S = 30.0
# A claim from another host counts as abandoned when its heartbeat (the file's mtime) is this old.
STALE_AFTER_S = 300.0


def process_start(pid: int) -> str | None:
    """The start time of `pid` from /proc (tells a live process from a later one reusing its pid); None if dead."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie is dead; fields[19] is starttime


def _holder(job_id: str | None) -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": process_start(pid), "job_id": job_id,
            "token": uuid.uuid4().hex, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe_holder(holder: dict) -> str:
    job = f"job {holder['job_id']}, " if holder.get("job_id") else ""
    return f"{job}pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


def read_claim(path: Path) -> tuple[str, dict | None] | None:
    """(raw text, parsed holder or None if unreadable) of a claim file; None when there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = None
    return text, holder if isinstance(holder, dict) else None


def claim_is_stale(path: Path, holder: dict | None, job_id: str | None = None) -> bool:
    """A claim is abandoned when its process is dead (same host), it is this job's own earlier incarnation
    (requeued), or, from another host, its heartbeat stopped STALE_AFTER_S ago."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    if holder is None:  # unreadable: written by something else; give a writer time, then take it
        return age > STALE_AFTER_S
    if job_id is not None and holder.get("job_id") == job_id:
        return True
    if holder.get("host") == socket.gethostname():
        start = process_start(int(holder.get("pid", -1)))
        return start is None or start != holder.get("pid_start")
    return age > STALE_AFTER_S


class Claim:
    """This process's claim on a run folder; keeps its heartbeat going until `release()`."""

    def __init__(self, path: Path, token: str):
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name=f"claim {path}", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the claim if it is still ours, and the markers of earlier takeovers."""
        self._stop.set()
        current = read_claim(self.path)
        if current is not None and current[1] is not None and current[1].get("token") == self.token:
            self.path.unlink(missing_ok=True)
        for marker in self.path.parent.glob(f".{self.path.name}.takeover-*"):
            marker.unlink(missing_ok=True)


def _link_or_create(tmp: Path, path: Path) -> None:
    """Hard-link `tmp` to `path`, failing with FileExistsError if `path` exists."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: exclusive create (briefly empty to readers)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as handle:
            handle.write(tmp.read_text())


def try_claim(path: str | Path, job_id: str | None = None) -> Claim | None:
    """Claim `path` atomically for this process; None while another live process holds it.

    The claim file appears complete or not at all (written aside, then hard-linked, which fails if it exists,
    also on NFS). An abandoned claim is taken over by exactly one claimant: the one that creates the takeover
    marker named after the abandoned claim's content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = _holder(job_id)
    tmp = path.with_name(f".{path.name}.{holder['token']}.tmp")
    tmp.write_text(json.dumps(holder))
    try:
        for _ in range(5):
            try:
                _link_or_create(tmp, path)
                return Claim(path, holder["token"])
            except FileExistsError:
                pass
            current = read_claim(path)
            if current is None:
                continue  # released just now: try again
            text, held = current
            if not claim_is_stale(path, held, job_id):
                return None
            marker = path.with_name(f".{path.name}.takeover-{hashlib.sha256(text.encode()).hexdigest()[:16]}")
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                return None  # another claimant is taking this one over
            if read_claim(path) != current:
                continue  # changed under us: judge the new one
            log.warning("taking over abandoned claim %s (%s)", path, describe_holder(held or {}))
            os.replace(tmp, path)
            return Claim(path, holder["token"])
        return None
    finally:
        tmp.unlink(missing_ok=True)
