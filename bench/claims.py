"""Claims: which process is running a run, or building a shared file, right now. The one lock of this tool.

A claim is a small JSON file (host, pid and its start time, SLURM job id, a token) created atomically (written
aside, then hard-linked, which fails if the claim exists, also on NFS) and kept fresh by a heartbeat. A claim whose
process is dead (same host), whose job is this job's own earlier incarnation (requeued), or whose heartbeat stopped
(another host) is abandoned, and exactly one claimant takes it over. Runs (`claim.json` in the run folder),
the prerequisites of a preset and each method preparation are claimed the same way: `try_claim` for work that
someone else may do instead, `hold` to wait for one's turn.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

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
        return process_gone(holder)
    return age > STALE_AFTER_S


def process_gone(holder: dict) -> bool:
    """Whether the process that `holder` (its `pid` and `pid_start`, on this host) names has ended, its pid maybe
    taken by another."""
    start = process_start(int(holder.get("pid") or -1))
    return start is None or start != holder.get("pid_start")


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
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                marked = read_claim(marker)  # another claimant is taking it over, unless that one died doing so
                if marked is not None and claim_is_stale(marker, marked[1], job_id):
                    marker.unlink(missing_ok=True)
                    continue
                return None
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(holder))
            if read_claim(path) != current:
                continue  # changed under us: judge the new one
            log.warning("taking over abandoned claim %s (%s)", path, describe_holder(held or {}))
            os.replace(tmp, path)
            return Claim(path, holder["token"])
        return None
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(path: str | Path, what: str, job_id: str | None = None, poll_s: float = 2.0) -> Iterator[None]:
    """Claim `path`, waiting while another live process holds it; release it afterwards."""
    path = Path(path)
    waited = False
    while (claim := try_claim(path, job_id)) is None:
        if not waited:
            held = read_claim(path)
            holder = describe_holder(held[1]) if held and held[1] else "another process"
            log.info("waiting for %s, which %s is building (%s)", what, holder, path)
            waited = True
        time.sleep(poll_s)
    try:
        yield
    finally:
        claim.release()
