"""Run specs (bench.sweep) -> skip finished -> build prerequisites -> run here or submit through submitit.

Runs go through one job callable, `Job`, whether they run in this process (`run_sequential`) or through
submitit (`submit_runs` with `debug`, `local` or `slurm`). Each run is claimed with a lock file in its folder
while it runs (`records.try_claim`), so two orchestrators on one results folder never run or write it twice.
A submission leaves a manifest in the jobs folder, from which `status` tells done, running, failed and missing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import submitit
import torch

from bench import records
from bench.artifacts import Cache
from bench.cluster import make_executor, submit_all, wait_all
from bench.config import get_preset
from bench.experiment import (
    RunSpec,
    fid_references,
    prepare_prerequisites,
    prepare_shared,
    run_one,
    shared_preparation_ready,
)
from methods import get_method

log = logging.getLogger(__name__)


def check_writable(out: str | Path) -> None:
    """Fail before any work if the results folder cannot be created or written."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"cannot write to results folder {path}: {exc.strerror or exc}") from None


@dataclass
class Outcome:
    spec: RunSpec
    status: str  # done, skipped (had a record), busy (claimed by another live process), failed
    record: dict | None = None
    error: str | None = None
    log_path: str | None = None


def finished_record(spec: RunSpec) -> dict | None:
    """The run's valid record, or None; a corrupt record is reported by name and counts as unfinished."""
    path = spec.directory / records.RECORD_NAME
    if not path.exists():
        return None
    try:
        return records.read_record(path)
    except records.CorruptRecord as exc:
        log.warning("corrupt record, will re-run %s: %s", spec.describe(), exc)
        return None


def run_claimed(spec: RunSpec, force: bool = False, job_id: str | None = None) -> Outcome:
    """Run one spec while holding its claim; returns skipped (finished) or busy (claimed) without running.

    Exceptions of the run propagate, so that a job that fails is failed in the scheduler's accounting too.
    """
    if not force and (record := finished_record(spec)) is not None:
        return Outcome(spec, "skipped", record)
    claim = records.try_claim(spec.directory / records.CLAIM_NAME, job_id)
    if claim is None:
        held = records.read_claim(spec.directory / records.CLAIM_NAME)
        holder = records.describe_holder(held[1]) if held and held[1] else "another process"
        log.info("%s is being run by %s; leaving it to that process", spec.describe(), holder)
        return Outcome(spec, "busy", error=f"claimed by {holder}")
    try:
        if not force and (record := finished_record(spec)) is not None:  # finished before we got the claim
            return Outcome(spec, "skipped", record)
        return Outcome(spec, "done", run_one(spec))
    finally:
        claim.release()


@dataclass(frozen=True)
class Prerequisites:
    """What every run of a preset needs first: base model, classifier, shared preparation, FID reference statistics."""

    preset: str
    cache: str | None
    data_root: str | None = None
    device: str | None = None
    progress: bool = True
    # One run per (method, overrides) whose preparation all forget classes share (SA's priors and Fisher).
    shared: tuple[RunSpec, ...] = ()
    # One run per (protocol, forget class): the FID reference statistics of the real retained images.
    fid: tuple[RunSpec, ...] = ()

    @classmethod
    def of(cls, spec: RunSpec) -> Prerequisites:
        return cls(spec.preset, spec.cache, spec.data_root, spec.device, spec.progress)

    def cached(self) -> bool:
        """True when all are in the cache (and load: a corrupt file raises CheckpointError naming it)."""
        preset, cache = get_preset(self.preset), Cache(self.cache, self.data_root)
        if not (cache.base_path(preset).exists() and cache.classifier_path(preset).exists()):
            return False
        prepare_prerequisites(self.preset, self.cache, self.data_root, "cpu", progress=False)
        return all(shared_preparation_ready(spec) for spec in self.shared) and fid_references(list(self.fid), False)


def prerequisites_for(specs: list[RunSpec]) -> list[Prerequisites]:
    """One Prerequisites per preset and cache, with a representative run of each shared preparation."""
    groups: dict[Prerequisites, tuple[dict, dict]] = {}
    for spec in specs:
        shared, fid = groups.setdefault(Prerequisites.of(spec), ({}, {}))
        if get_method(spec.method).shares_preparation:
            shared.setdefault((spec.method, spec.method_overrides), spec)
        fid.setdefault((spec.protocol, spec.protocol_overrides, spec.forget_class), spec)
    return [dataclasses.replace(task, shared=tuple(shared.values()), fid=tuple(fid.values()))
            for task, (shared, fid) in groups.items()]


PREPARE_CLAIM = "prepare.claim.json"


def prepare_once(task: Prerequisites, job_id: str | None = None, poll_s: float = 5.0) -> dict:
    """Build (or load) the prerequisites; a second process waits for the first instead of training them again."""
    path = Cache(task.cache, task.data_root).path(get_preset(task.preset), PREPARE_CLAIM)
    while (claim := records.try_claim(path, job_id)) is None:
        log.info("waiting for another process building the %s prerequisites (%s)", task.preset, path)
        time.sleep(poll_s)
    try:
        built = prepare_prerequisites(task.preset, task.cache, task.data_root, task.device, task.progress)
        built["shared"] = {spec.describe(): prepare_shared(spec) for spec in task.shared}
        built["fid_reference"] = fid_references(list(task.fid), build=True)
        return built
    finally:
        claim.release()


def _job_id() -> str | None:
    try:
        return submitit.JobEnvironment().job_id
    except RuntimeError:  # not inside a submitit job
        return None


def _job_setup() -> None:
    """Logging for the job's log file, and as many torch threads as SLURM gave CPUs (not the node's count)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(int(cpus))


class Job(submitit.helpers.Checkpointable):
    """The one job callable of every executor: a RunSpec -> Outcome, or Prerequisites -> where they are.

    When SLURM preempts a job or its time runs out, submitit calls `checkpoint`, which resubmits the same
    argument: the requeued job resumes from the run's `partial.pt` (pretraining from `base.partial.pt`) and
    reaches the same final step count. A job killed outright is resumed the same way by the next `bench run`.
    """

    def __init__(self, force: bool = False):
        self.force = force

    def __call__(self, task: RunSpec | Prerequisites):
        _job_setup()
        if isinstance(task, Prerequisites):
            return prepare_once(task, _job_id())
        return run_claimed(task, self.force, _job_id())

    def checkpoint(self, task: RunSpec | Prerequisites) -> submitit.helpers.DelayedSubmission:
        log.warning("checkpoint: requeueing %s; it resumes from its last partial checkpoint", task)
        return submitit.helpers.DelayedSubmission(self, task)


def split_finished(specs: list[RunSpec], force: bool = False) -> tuple[list[Outcome], list[RunSpec]]:
    """(outcomes of runs already finished or claimed by a live process, the specs still to run)."""
    known, todo = [], []
    for spec in specs:
        record = None if force else finished_record(spec)
        claim_path = spec.directory / records.CLAIM_NAME
        held = records.read_claim(claim_path)
        if record is not None:
            known.append(Outcome(spec, "skipped", record))
        elif held is not None and not records.claim_is_stale(claim_path, held[1]):
            holder = records.describe_holder(held[1]) if held[1] else "another process"
            known.append(Outcome(spec, "busy", error=f"claimed by {holder}"))
        else:
            todo.append(spec)
    skipped = sum(o.status == "skipped" for o in known)
    if skipped:
        log.info("skipping %d finished run(s) (use --force to redo them)", skipped)
    for outcome in known:
        if outcome.status == "busy":
            log.info("not submitting %s: %s", outcome.spec.describe(), outcome.error)
    return known, todo


def run_sequential(specs: list[RunSpec], force: bool = False, workers: int = 1) -> list[Outcome]:
    """Run every spec on this machine; finished runs are skipped unless `force`; failures do not stop the rest.

    With `workers` > 1 the runs go to that many worker processes, the CPU threads split between them: small
    models use a multi-core CPU better as parallel runs than as threads of one run.
    """
    outcomes, todo = split_finished(specs, force)
    if todo:
        for task in prerequisites_for(todo):
            prepare_once(task)
    if workers > 1 and len(todo) > 1:
        return in_spec_order(outcomes + _run_in_workers(todo, force, workers), specs)
    job = Job(force)
    for index, spec in enumerate(todo, 1):
        log.info("[%d/%d] %s", index, len(todo), spec.describe())
        outcomes.append(_run_guarded(job, spec))
    return in_spec_order(outcomes, specs)


def _run_guarded(job: Job, spec: RunSpec) -> Outcome:
    try:
        return job(spec)
    except Exception as exc:  # one failed run must not stop the sweep
        log.error("run failed: %s: %s\n%s", spec.describe(), exc, traceback.format_exc())
        return Outcome(spec, "failed", error=f"{type(exc).__name__}: {exc}")


def _worker_init(threads: int, parent: int) -> None:
    import torch

    _die_with_parent(parent)
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def _die_with_parent(parent: int) -> None:
    """Have Linux send this worker SIGTERM when the orchestrator dies, however it dies (a kill, a lost session):
    a worker left behind would go on taking CPU and writing records for a sweep nobody waits for."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request was made
        os._exit(1)


def _worker_run(spec: RunSpec, force: bool) -> Outcome:
    return _run_guarded(Job(force), spec)


def _run_in_workers(todo: list[RunSpec], force: bool, workers: int) -> list[Outcome]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // workers)
    log.info("running %d run(s) in %d worker processes, %d thread(s) each", len(todo), workers, threads)
    context = multiprocessing.get_context("spawn")  # no fork of a process that already runs OpenMP threads
    outcomes = []
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                             initargs=(threads, os.getpid())) as pool:
        futures = {pool.submit(_worker_run, spec, force): spec for spec in todo}
        for index, future in enumerate(as_completed(futures), 1):
            outcome = future.result()
            log.info("[%d/%d] %s: %s", index, len(todo), outcome.spec.describe(), outcome.status)
            outcomes.append(outcome)
    return outcomes


def in_spec_order(outcomes: list[Outcome], specs: list[RunSpec]) -> list[Outcome]:
    position = {spec: index for index, spec in enumerate(specs)}
    return sorted(outcomes, key=lambda outcome: position.get(outcome.spec, len(specs)))


# -- submitit: prerequisites job, then one job array; a manifest for `status` ------------------------------------
class PrerequisitesFailed(RuntimeError):
    """The job building the base model or classifier failed; no run was submitted."""


@dataclass
class Submission:
    """What `submit_runs` did: outcomes known without a job, and one job per spec still to run."""

    kind: str
    folder: Path
    known: list[Outcome]
    todo: list[RunSpec]
    jobs: list
    prerequisites_jobs: list[str] = dataclasses.field(default_factory=list)


def submit_runs(specs: list[RunSpec], kind: str, config: dict, folder: str | Path, force: bool = False,
                wait_prerequisites: bool = True) -> Submission:
    """Submit every unfinished spec as one job array, after a job building missing prerequisites.

    With `wait_prerequisites=False` on SLURM the array waits for that job in the queue (afterok), so nothing
    here blocks; elsewhere this waits for it. Raises PrerequisitesFailed if it fails.
    """
    folder = Path(folder)
    known, todo = split_finished(specs, force)
    executor = make_executor(kind, folder, config)
    prerequisites = _prerequisites(executor, todo, wait_prerequisites or kind != "slurm") if todo else []
    if prerequisites and kind == "slurm" and not wait_prerequisites:
        executor.update_parameters(slurm_additional_parameters={
            "dependency": "afterok:" + ":".join(prerequisites), "kill-on-invalid-dep": "yes"})
    jobs = submit_all(executor, Job(force), todo)
    submission = Submission(kind, folder, known, todo, jobs, prerequisites)
    if jobs:
        write_manifest(submission)
    return submission


def _prerequisites(executor, todo: list[RunSpec], wait: bool) -> list[str]:
    """Submit one job per preset whose base model or classifier is missing (and wait for it); their job ids."""
    tasks = [t for t in prerequisites_for(todo) if not t.cached()]
    if not tasks:
        return []
    jobs = submit_all(executor, Job(), tasks)
    for task, job in zip(tasks, jobs):
        log.info("building the %s base model, classifier, shared preparation and FID references first: job %s (log %s)",
                 task.preset, job.job_id, job.paths.stderr)
    if wait:
        for finished in wait_all(jobs, tasks, progress=False, poll_s=2.0, refresh_s=10.0):
            if finished.failed:
                raise PrerequisitesFailed(f"building the {finished.item.preset} prerequisites failed: "
                                          f"{short_error(finished.outcome)} (log: {finished.log_path})")
    return [job.job_id for job in jobs]


def wait_runs(submission: Submission, progress: bool = True) -> list[Outcome]:
    """Wait for every job (progress bar over finished runs); returns all outcomes, failed ones with their log."""
    outcomes = list(submission.known)
    for finished in wait_all(submission.jobs, submission.todo, progress=progress, poll_s=2.0, refresh_s=10.0):
        if finished.failed:
            outcomes.append(Outcome(finished.item, "failed", error=short_error(finished.outcome),
                                    log_path=str(finished.log_path)))
        else:
            outcomes.append(dataclasses.replace(finished.outcome, log_path=str(finished.log_path)))
    return in_spec_order(outcomes, [o.spec for o in submission.known] + submission.todo)


def short_error(error: BaseException | str) -> str:
    """The last line of a job's traceback (`Type: message`), or the first line of a scheduler error."""
    text = str(error)
    if "failed during processing with trace" in text:
        return last_line(text.split("----------------------")[1])
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text


def write_manifest(submission: Submission) -> Path:
    """Record what was submitted (spec identity + job id) in the jobs folder, one file per submission."""
    runs = [{"preset": s.preset, "protocol": s.protocol_name, "method": s.method, "variant": s.variant,
             "forget_class": s.forget_class, "seed": s.seed, "directory": str(Path(s.directory).resolve()),
             "job_id": job.job_id} for s, job in zip(submission.todo, submission.jobs)]
    payload = {"cluster": submission.kind, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "host": socket.gethostname(), "pid": os.getpid(),
               "prerequisites_jobs": submission.prerequisites_jobs, "runs": runs}
    # Unique even for two submissions of one process within a second (the suffix), ordered by time in `ls`.
    path = submission.folder / f"submission-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}.json"
    records.write_json_atomic(path, payload)
    return path
