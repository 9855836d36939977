"""`bench status`: done / stale / running / failed / missing per run, from the records, the run claims and the jobs
folder.

The results folder says what every run did, wherever it ran: a record (done; stale, with the reason, when `bench run`
would run it again: another base model, classifier, hyperparameters or method code), a live claim (running), a failure
marker with its reason, where it was raised and its log (failed), an interruption marker or a dead claim
(interrupted: the next command resumes it). Attacks on a run (<run>/attacks/<attack>/<variant>) are rows alike, after
their run; a valid record wins over a marker an earlier attempt left. The submission manifests (`submission-*.json`,
written by bench.orchestrate) add runs that were submitted but have not started; submitit's result pickles and the
scheduler (`sacct`/`squeue` on SLURM) say why a job without a record failed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import submitit

from bench import claims, fingerprint, records
from bench.attacks import ATTACK_NAME, read_attack
from bench.cache import Cache, CheckpointError
from bench.config import get_preset
from bench.orchestrate import current_ids, last_line, record_spec, stale_reason

log = logging.getLogger(__name__)

STATES = ("done", "stale", "running", "failed", "missing", "interrupted")
MANIFEST_RUN = {"directory", "method", "variant", "forget_class", "seed"}  # what each run of a manifest must say
SCHEDULER_RUNNING = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
                     "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "READY"}
SCHEDULER_FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                    "DEADLINE"}


@dataclass
class RunStatus:
    method: str
    variant: str
    forget_class: int
    seed: int
    state: str  # one of STATES
    detail: str = ""
    attack: str = ""  # an attack on the run ("relearn [k=3]"); empty for the run itself


def status(out: str | Path, folder: str | Path, cache: str | Path | None = None) -> list[RunStatus]:
    """The state of every run that was submitted (manifests in `folder`) or has a record under `out`; a record
    that `bench run` would run again (`bench.orchestrate.stale_reason` against the models in `cache`) is stale."""
    folder, entries = Path(folder), {}
    for manifest in sorted(folder.glob("submission-*.json"), key=lambda p: p.stat().st_mtime):
        try:
            payload = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("skipping unreadable manifest %s: %s", manifest, exc)
            continue
        runs = payload.get("runs") if isinstance(payload, dict) else None
        if not isinstance(runs, list) or not all(isinstance(run, dict) and MANIFEST_RUN <= set(run) for run in runs):
            log.warning("skipping manifest %s: it has no `runs` list whose runs have %s (not written by "
                        "`bench run --cluster`, or damaged)", manifest, ", ".join(sorted(MANIFEST_RUN)))
            continue
        for run in runs:
            entries[run["directory"]] = {**run, "cluster": payload.get("cluster"), "host": payload.get("host"),
                                         "pid": payload.get("pid"), "pid_start": payload.get("pid_start")}
    for name in (records.RECORD_NAME, ATTACK_NAME, claims.CLAIM_NAME, records.FAILURE_NAME, records.INTERRUPTED_NAME):
        for path in Path(out).rglob(name):
            try:
                entries.setdefault(str(path.parent.resolve()), _entry_from_path(path.parent))
            except ValueError:  # a claim or file outside the run layout (a preset's prerequisites)
                continue
    slurm_ids = [e["job_id"] for e in entries.values() if e.get("cluster") == "slurm"]
    scheduler = _scheduler_states(folder, slurm_ids)
    check = _staleness(out, None if cache is None else str(cache))
    rows = [_run_status(entry, folder, scheduler, check) for entry in entries.values()]
    return sorted(rows, key=lambda r: (r.method, r.variant, r.forget_class, r.seed, r.attack))


def _entry_from_path(directory: Path) -> dict:
    """A run folder, or an attack's (<run>/attacks/<attack>/<variant>), as a status entry."""
    if directory.parent.parent.name == "attacks":
        return {**records.parse_run_dir(directory.parent.parent.parent), "directory": str(directory.resolve()),
                "attack": f"{directory.parent.name} [{directory.name}]"}
    return {**records.parse_run_dir(directory), "directory": str(directory.resolve())}


def _scheduler_states(folder: Path, job_ids: list[str]) -> dict[str, str]:
    """SLURM state per job id, from one sacct call; empty where sacct is not available."""
    jobs = {job_id: submitit.SlurmJob(folder, job_id) for job_id in job_ids}
    if not jobs:
        return {}
    try:
        next(iter(jobs.values())).get_info(mode="force")  # one call updates every registered job
        return {job_id: job.state for job_id, job in jobs.items()}
    except Exception as exc:  # sacct missing or failing: say so, and judge from files alone
        log.warning("cannot ask SLURM for job states (%s); judging from files only", exc)
        return {}


def _staleness(out: str | Path, cache: str | None):
    """record -> why `bench run` (with this cache) would run it again, or None; the same `stale_reason` as the
    orchestrator's, with the record's own speed switches (which only the run command chooses). Without a cache, each
    record is judged against the cache its own base model came from (`_cache_of`)."""
    ids: dict[tuple, tuple] = {}

    def reason(record: dict) -> str | None:
        spec = record_spec(record, out, cache if cache is not None else _cache_of(record))
        key = (spec.preset, spec.cache)
        if key not in ids:
            ids[key] = current_ids(spec)
        if ids[key][0] is None:
            raise ValueError(f"no {spec.preset} base model in the cache {Cache(spec.cache).root}; pass the run's "
                             "--cache")
        return stale_reason(record, spec, ids[key])

    return reason


def _cache_of(record: dict) -> str | None:
    """The cache root holding the base model the record was made from (its `base_model.path`, <root>/<preset's
    folder>/base.pt), where that file is still there; else None, the default cache."""
    path = Path(str((record.get("base_model") or {}).get("path") or ""))
    if path.name != "base.pt" or not path.is_file():
        return None
    try:
        root = path.parent.parent
        return str(root) if Cache(root).base_path(get_preset(record["preset"])) == path else None
    except (KeyError, ValueError):  # an unregistered preset: the default cache, and `reason` says so
        return None


def _done(row: RunStatus, record: dict, path: Path, check) -> RunStatus:
    try:
        reason = check(record)
    except (ValueError, CheckpointError, OSError) as exc:  # an unregistered preset or method, another cache
        return dataclasses.replace(row, state="done", detail=f"{path} (not checked for staleness: {exc})")
    if reason:
        return dataclasses.replace(row, state="stale", detail=f"{reason}: `bench run` runs it again")
    unchecked = " and ".join(what for key, what, _ in fingerprint.RUN_CODE if not record["provenance"].get(key))
    note = f" (made before {unchecked} code fingerprints: not checked)" if unchecked else ""
    return dataclasses.replace(row, state="done", detail=f"{path}{note}")


def _run_status(entry: dict, folder: Path, scheduler: dict[str, str], check) -> RunStatus:
    row = RunStatus(entry["method"], entry["variant"], entry["forget_class"], entry["seed"], "missing",
                    attack=entry.get("attack", ""))
    directory = Path(entry["directory"])
    record_path, claim_path = directory / records.RECORD_NAME, directory / claims.CLAIM_NAME
    if row.attack and (directory / ATTACK_NAME).exists():
        try:
            read_attack(directory / ATTACK_NAME)
            return dataclasses.replace(row, state="done", detail=str(directory / ATTACK_NAME))
        except records.CorruptRecord as exc:
            return dataclasses.replace(row, state="failed", detail=str(exc))
    if record_path.exists():
        try:
            record = records.read_record(record_path)
        except records.CorruptRecord as exc:
            return dataclasses.replace(row, state="failed", detail=str(exc))
        return _done(row, record, record_path, check)
    held = claims.read_claim(claim_path)
    if held is not None and not claims.claim_is_stale(claim_path, held[1]):
        return dataclasses.replace(row, state="running", detail=claims.describe_holder(held[1] or {}))
    failure = records.read_failure(directory)
    if failure is not None:
        return dataclasses.replace(row, state="failed", detail=records.describe_failure(failure))
    stopped = records.read_failure(directory, records.INTERRUPTED_NAME)
    if stopped is not None:
        return dataclasses.replace(row, state="interrupted", detail=f"{stopped.get('reason')} ({stopped.get('when')})")
    job_id = entry.get("job_id")
    if not job_id:
        if held is not None:
            return dataclasses.replace(row, state="interrupted", detail=f"its process is gone "
                                       f"({claims.describe_holder(held[1] or {})}); the next command resumes it")
        if "job_id" in entry and entry.get("cluster") == "local":  # held back until another local job ended
            return dataclasses.replace(row, detail=_held_back(entry))
        return row
    paths = submitit.core.utils.JobPaths(folder, job_id, 0)
    if paths.result_pickle.exists():
        kind, value = submitit.core.utils.pickle_load(paths.result_pickle)
        if kind == "error":
            return dataclasses.replace(row, state="failed", detail=f"job {job_id}: {last_line(str(value))}; "
                                                                   f"log {paths.stderr}")
        return dataclasses.replace(row, detail=f"job {job_id} ended without a record ({value.status}); "
                                               f"log {paths.stderr}")
    state = scheduler.get(job_id, "")
    if state in SCHEDULER_RUNNING or (entry.get("cluster") == "local" and _local_job_alive(job_id)):
        return dataclasses.replace(row, state="running", detail=f"job {job_id} {state.lower() or 'running'}")
    if state.split(" ")[0] in SCHEDULER_FAILED:
        return dataclasses.replace(row, state="failed", detail=f"job {job_id} {state}; log {paths.stderr}")
    return dataclasses.replace(row, detail=f"job {job_id} ended without a record; log {paths.stderr}")


def _held_back(entry: dict) -> str:
    """Where a local job that `bench run` held back (`bench.orchestrate.local_slots`) stands."""
    pid = entry.get("pid")
    if isinstance(pid, int) and entry.get("host") == socket.gethostname() and claims.process_gone(entry):
        return f"not started: its `bench run` (pid {pid}) ended first; `bench run` runs it"
    return f"queued: its `bench run` (pid {pid}) starts it when one of its local jobs ends"


def _local_job_alive(job_id: str) -> bool:
    return job_id.isdigit() and claims.process_start(int(job_id)) is not None
