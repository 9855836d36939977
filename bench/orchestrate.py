"""Run specs (bench.sweep) -> prerequisites -> skip finished -> run here, in worker processes, or through submitit.

Every run goes through one job callable, `Job`: in this process (`run_local`, one worker), in local worker
processes (`run_local` with `workers` > 1: bench/workers.py), or through submitit (`submit_runs`: `debug`, `local`,
`slurm`). A run is claimed (`bench.claims`) while it runs, so two orchestrators on one results folder never run or
write it twice; a run that fails leaves `failure.json` where its record would be. A record is reused only if it was
made from the current base model and classifier with the same speed switches, hyperparameters and method code
(`bench.fingerprint`): a stale one is run again.
A submission leaves a manifest in the jobs folder, from which `bench status` tells done, running, failed and missing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path

import submitit
import torch

from bench import claims, fingerprint, quick_exit, records
from bench.allocator import describe
from bench.attacks import ATTACK_NAME, AttackSpec, attack_one, attack_specs, finished_attack
from bench.cache import Cache, checkpoint_id
from bench.cluster import Finished, Submitter, make_executor, own_parameters, resources, submit_all, wait_all
from bench.config import get_preset
from bench.device import choose_threads, gpus_to_share, least_busy, names_its_gpu, usable_cores, visible_gpus
from bench.eta import SweepEta
from bench.experiment import run_one
from bench.extensions import load_extensions
from bench.prerequisites import Prerequisites, build, missing, prerequisites_for
from bench.sweep import RunSpec, resolve_method_config, resolve_protocol

log = logging.getLogger(__name__)

INTERRUPTED = "stopped by Ctrl-C or SIGTERM before its record; the next command resumes it"
STOPPED = "not finished: the sweep was stopped"


def check_writable(results: str | Path) -> None:
    """Fail before any work if the results folder cannot be created or written."""
    path = Path(results)
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
    status: str  # done, skipped (had a record), busy (claimed by another live process), failed, interrupted
    record: dict | None = None
    error: str | None = None
    log_path: str | None = None
    attacks: list = dataclasses.field(default_factory=list)  # outcomes of the attacks run after this run (`--attacks`)


# -- which records are finished, and still valid ----------------------------------------------------------------
def current_ids(spec: RunSpec) -> tuple[str | None, str | None]:
    """The ids of the base model and classifier a run of `spec` would use now (None where there is none yet)."""
    preset, cache = get_preset(spec.preset), Cache(spec.cache, spec.data_root)
    base, classifier = (checkpoint_id(path) if path.exists() else None
                        for path in (cache.base_path(preset), cache.classifier_path(preset)))
    return base, classifier


def stale_reason(record: dict, spec: RunSpec, ids: tuple[str | None, str | None]) -> str | None:
    """Why a valid record cannot stand for `spec` now: another base model, classifier, speed switches,
    hyperparameters, evaluation protocol, method or bench code, or preset file; None when it stands."""
    base_id, classifier_id = ids
    if record["base_model"].get("id") != base_id:
        return f"made with base model {record['base_model'].get('id')}, now {base_id}"
    if classifier_id is not None and record["classifier"].get("id", classifier_id) != classifier_id:
        return f"evaluated with classifier {record['classifier'].get('id')}, now {classifier_id}"
    made = (record.get("speed") or {}).get("requested") or {}
    if made != dict(spec.speed):
        return f"made with speed switches {made or 'default'}, asked for {dict(spec.speed) or 'default'}"
    # The preset's defaults or the method's may have changed since (a new version): same folder, other run.
    preset = get_preset(spec.preset)
    method_class, config, _ = resolve_method_config(preset, spec.method, spec.method_overrides)
    if changed := records.changed_fields(record.get("hyperparameters"), config):
        return f"made with other hyperparameters: {changed}"
    if changed := records.changed_fields(record.get("protocol"), resolve_protocol(preset, spec)):
        return f"made with another evaluation protocol: {changed}"
    if reason := code_changed(record, method_class, spec.preset):
        return reason
    if spec.save_model and not (record.get("artifacts") or {}).get("model"):
        return "made without saving its model, which this sweep keeps (--save-model, --attacks)"
    return None


def code_changed(record: dict, method_class: type, preset: str) -> str | None:
    """Why the method's code, the harness code it ran or the preset file differs from the record's fingerprints
    (`bench.fingerprint`), or None. A record made before a fingerprint has none, and is not stale for that (existing
    results stand; `bench status` says what was not checked)."""
    made = record["provenance"]
    if reason := fingerprint.code_changed(made, method_class):
        return reason
    return fingerprint.preset_file_changed(made.get("preset_file"), preset)


def record_spec(record: dict, results: str | Path, cache: str | None = None) -> RunSpec:
    """The spec a record was made from, as far as the record says (with its own speed switches, without
    --save-model), for `stale_reason` in `bench status`, which raises ValueError for an unregistered preset or method."""
    overrides = record["overrides"]
    return RunSpec(record["preset"], record["method"], record["forget_class"], record["seed"], str(results), cache,
                   record["protocol"].get("name"), _pairs(overrides.get("method")), _pairs(overrides.get("protocol")),
                   speed=_pairs((record.get("speed") or {}).get("requested")))


def _pairs(values) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (values or {}).items()))


def finished_record(spec: RunSpec, ids: tuple[str | None, str | None] | None = None) -> dict | None:
    """The run's valid, current record, or None; a corrupt or stale record is reported and counts as unfinished."""
    path = spec.directory / records.RECORD_NAME
    if not path.exists():
        return None
    try:
        record = records.read_record(path)
    except records.CorruptRecord as exc:
        _warn_once("corrupt record, will re-run %s: %s", spec.describe(), exc)
        return None
    reason = stale_reason(record, spec, ids if ids is not None else current_ids(spec))
    if reason:
        _warn_once("stale record %s: %s; running it again", path, reason)
        return None
    return record


_WARNED: set[str] = set()


def _warn_once(message: str, *args) -> None:
    """A warning about a record, said once per process (the sweep, then the run under its claim, both look)."""
    text = message % args
    if text not in _WARNED:
        _WARNED.add(text)
        log.warning("%s", text)


def run_claimed(spec: RunSpec, force: bool = False, job_id: str | None = None) -> Outcome:
    """Run one spec while holding its claim; returns skipped (finished) or busy (claimed) without running.

    A failure leaves `failure.json` in the run folder and propagates, so that a job that fails is failed in the
    scheduler's accounting too.
    """
    if not force and (record := finished_record(spec)) is not None:
        return Outcome(spec, "skipped", record)
    claim = claims.try_claim(spec.directory / claims.CLAIM_NAME, job_id)
    if claim is None:
        held = claims.read_claim(spec.directory / claims.CLAIM_NAME)
        holder = claims.describe_holder(held[1]) if held and held[1] else "another process"
        log.info("%s is being run by %s; leaving it to that process", spec.describe(), holder)
        return Outcome(spec, "busy", error=f"claimed by {holder}")
    try:
        if not force and (record := finished_record(spec)) is not None:  # finished before we got the claim
            return Outcome(spec, "skipped", record)
        outcome = Outcome(spec, "done", run_one(spec))
        records.clear_markers(spec.directory)
        return outcome
    except Exception as exc:  # not an interruption (Ctrl-C, a preemption's exit): that run resumes, it did not fail
        records.write_failure(spec.directory, f"{type(exc).__name__}: {exc}", _log_path(), exc)
        raise
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (`bench.cli`): not finished, resumed by the next command
        if not (spec.directory / records.RECORD_NAME).exists() or force:
            records.write_interrupted(spec.directory, INTERRUPTED)
        raise
    finally:
        claim.release()


def _job_id() -> str | None:
    try:
        return submitit.JobEnvironment().job_id
    except RuntimeError:  # not inside a submitit job
        return None


def _log_path() -> str | None:
    try:
        return str(submitit.JobEnvironment().paths.stderr)
    except RuntimeError:
        return os.environ.get("BENCH_WORKER_LOG")


def _job_setup(threads: int | None, task) -> None:
    """Logging for the job's log file, and the job's torch threads: as many as SLURM gave the job CPUs (not the
    node's count), else `threads` (the share the orchestrator gave each of the local jobs it started at once), else
    the process's own; said in the log, with what the job runs."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    executor, why = os.environ.get("SUBMITIT_EXECUTOR"), "this process's"
    # SLURM sets SLURM_CPUS_PER_TASK only where --cpus-per-task was given; SLURM_CPUS_ON_NODE, always: the CPUs the
    # job holds, which a node without core binding (TaskPlugin=task/none) does not show in the affinity mask. Only a
    # SLURM job of ours reads them: runs in a process inside an allocation (workers, local jobs) have their share.
    slurm = next((name for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE") if os.environ.get(name, "").isdigit()),
                 None)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        why = "OMP_NUM_THREADS"
    elif executor == "slurm" and slurm:
        torch.set_num_threads(int(os.environ[slurm]))
        why = slurm
    elif threads:
        torch.set_num_threads(threads)
        why = "the orchestrator's share for each local job"
    if executor in ("local", "slurm"):  # a job of its own (its log), not this process
        what = task.describe() if isinstance(task, (RunSpec, AttackSpec)) else f"the {task.preset} prerequisites"
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        log.info("%s: %d CPU thread(s) (%s)%s", what, torch.get_num_threads(), why,
                 "" if gpus is None else f", CUDA_VISIBLE_DEVICES={gpus or '(none)'}")


class LocalGpus(typing.NamedTuple):
    """What `--cluster local` gives its jobs: `gpus` (CUDA_VISIBLE_DEVICES indices) shared out `each` to a job (or
    a method's own `gpus_per_node`), the least busy first, or all of them to every job (`all`)."""

    gpus: tuple[int, ...] = ()
    all: bool = False
    each: int = 1

    def need(self, resources: dict) -> int:
        """The GPUs of its own that a job with `resources` (the cluster file's for its method) takes: its
        gpus_per_node, else `each`, at most all of them; 0 where every job sees all of them or its executor hides
        them (gpus_per_node 0)."""
        if self.all or not self.gpus:
            return 0
        each = resources.get("gpus_per_node", self.each)
        return min(each, len(self.gpus)) if each else 0

    def slots(self, needs: typing.Iterable[int] = ()) -> int:
        """How many jobs the GPUs hold at once, at most (those that take the fewest of them, where jobs take different
        numbers: `needs`); 0: they set no limit (none, or every job sees all of them)."""
        least = min((need for need in needs if need), default=self.each)
        return 0 if self.all or not self.gpus or not least else len(self.gpus) // least

    def first_job(self) -> dict:
        """submitit's parameters for a job that takes the first share (the prerequisites job); {} without GPUs."""
        return gpu_parameters(self.gpus if self.all else self.gpus[:self.each]) if self.gpus else {}

    def describe(self, needs: dict[str, int] | None = None) -> str:
        """` on GPUs 3, 4, 6, 7, 2 each`; with `needs` (method -> GPUs a job of it takes) that differ, what each
        method's jobs take."""
        if not self.gpus:
            return ""
        counts, share = set((needs or {}).values()) or {self.each}, ""
        if counts == {0}:  # no job takes one
            return ""

        def each(count: int) -> str:
            return f"{count} each" if count else "none"

        if self.all:
            pass
        elif len(counts) > 1:
            share = "; ".join(f"{each(count)} to {' and '.join(m for m, need in needs.items() if need == count)}"
                              for count in sorted(counts))
        elif counts != {1}:
            share = each(counts.pop())
        return f" on GPUs {', '.join(map(str, self.gpus))}" + (f", {share}" if share else "")


def local_gpus(kind: str, config: dict, devices: typing.Iterable[str | None]) -> LocalGpus:
    """The GPUs that local jobs share out, `gpus_per_node` of the cluster file to a job (else one), or all of them
    to each job where a run asked for `cuda:N`: those this process sees, as submitit's local executor names them
    (CUDA_VISIBLE_DEVICES's indices, else 0..n-1). Without them submitit hides every GPU from its local jobs (its
    gpus_per_node default of 0 sets CUDA_VISIBLE_DEVICES=''), and a machine's GPUs went unused; with the cluster
    file's gpus_per_node alone it gives every job the first n. None for other kinds, for a cluster file's
    `gpus_per_node: 0` where no method under `methods:` asks for GPUs of its own (its jobs see no GPU), and where
    every run is on the CPU."""
    each = config.get("gpus_per_node")
    own = [group.get("gpus_per_node") for group in (config.get("methods") or {}).values() if isinstance(group, dict)]
    if kind != "local" or (each == 0 and not any(own)):
        return LocalGpus()
    devices = set(devices)
    named = any(map(names_its_gpu, devices))  # submitit hides what a job is not given: give it all
    names = visible_gpus() if named else gpus_to_share(devices)
    if not all(name.isdigit() for name in names):  # UUIDs or MIG instances: submitit's local executor takes indices
        log.warning("CUDA_VISIBLE_DEVICES=%s names GPUs other than by index, which --cluster local cannot hand its "
                    "jobs: they run on the CPU (give indices, or run without --cluster)", ",".join(names))
        return LocalGpus()
    gpus = tuple(int(name) for name in names)
    if gpus and not named and (each or 1) > len(gpus):
        log.warning("the cluster file gives each job %d GPUs (gpus_per_node) and bench run sees %d: each local job "
                    "gets all %d, one job at a time", each, len(gpus), len(gpus))
    return LocalGpus(gpus, named, min(1 if each is None else each, len(gpus)) if gpus else 1)


def local_slots(kind: str, config: dict, jobs: int, wait: bool = True, gpus: int = 0) -> int:
    """How many of `jobs` jobs run at once. SLURM's queue and debug jobs (one at a time, here) take all of them.
    submitit's local executor queues nothing: it starts a process per job at once, each with its own memory, so the
    orchestrator holds the others back and starts them as jobs end (`wait_all`), at most the cluster file's
    `array_parallelism` (as on SLURM), else as many as the GPUs hold (`gpus`: `LocalGpus.slots()`), else one per usable
    core. With --no-wait (`wait=False`) nothing stays to start them later: all of them start."""
    if kind != "local" or not wait:
        return jobs
    return min(jobs, int(config.get("array_parallelism") or gpus or usable_cores()))


def local_threads(kind: str, jobs: int, slots: int | None = None) -> int | None:
    """Torch threads for each of `jobs` local jobs, `slots` of which run at once (None: all of them, --no-wait): the
    cores split between those (`choose_threads`), so that their OpenMP threads do not spin against each other. None
    for SLURM (a job takes its CPUs) and debug (this process)."""
    if kind != "local" or jobs < 1:
        return None
    at_once = min(jobs, slots or jobs)
    (threads, why), cores = choose_threads(at_once), usable_cores()
    held = " start at once" if at_once == jobs else f", at most {at_once} at a time"
    log.info("%d local job(s)%s, %d CPU thread(s) each (%s)", jobs, held, threads, why)
    if at_once > cores:
        log.warning("--cluster local runs %d jobs at once on %d core(s), each with its own memory%s", at_once, cores,
                    " (--no-wait: nothing stays to start the others later; without it they run one per core at a time,"
                    " or the cluster file's array_parallelism)" if slots is None else "")
    return threads


class Job(submitit.helpers.Checkpointable):
    """The one job callable of every executor: a RunSpec (then the attacks it names) or an AttackSpec -> Outcome,
    or Prerequisites -> where they are.

    When SLURM preempts a job or its time runs out, submitit calls `checkpoint`, which resubmits the same
    argument: the requeued job resumes exactly from the run's `partial.pt` (pretraining from `base.partial.pt`).
    A job killed outright is resumed the same way by the next `bench run`.
    """

    def __init__(self, force: bool = False, threads: int | None = None):
        self.force, self.threads = force, threads  # threads: `local_threads`, for submitit's local jobs

    def __call__(self, task: RunSpec | Prerequisites):
        quick_exit.register()  # a local or SLURM job is a process of its own
        _job_setup(self.threads, task)
        load_extensions(task.extensions if isinstance(task, (RunSpec, AttackSpec)) else task.specs[0].extensions
                        if task.specs else ())
        if isinstance(task, Prerequisites):
            return build(task, _job_id())
        if isinstance(task, AttackSpec):
            return attack_claimed(task, self.force, _job_id())
        outcome = run_claimed(task, self.force, _job_id())
        if task.attacks and outcome.status in ("done", "skipped"):
            outcome.attacks = run_attacks(task, self.force, _job_id())
        return outcome

    def checkpoint(self, task: RunSpec | Prerequisites) -> submitit.helpers.DelayedSubmission:
        log.warning("checkpoint: requeueing %s; it resumes from its last partial checkpoint", task)
        return submitit.helpers.DelayedSubmission(self, task)


def split_finished(specs: list[RunSpec], force: bool = False) -> tuple[list[Outcome], list[RunSpec]]:
    """(outcomes of runs already finished or claimed by a live process, the specs still to run)."""
    known, todo, ids = [], [], {}
    for spec in specs:
        key = (spec.preset, spec.cache, spec.data_root)
        if key not in ids and not force:
            ids[key] = current_ids(spec)
        record = None if force else finished_record(spec, ids[key])
        claim_path = spec.directory / claims.CLAIM_NAME
        held = claims.read_claim(claim_path)
        attacks = None if record is None else finished_attacks(spec, record)
        if attacks is not None:  # else the job skips the run, attacks it
            known.append(Outcome(spec, "skipped", record, attacks=attacks))
        elif held is not None and not claims.claim_is_stale(claim_path, held[1]):
            holder = claims.describe_holder(held[1]) if held[1] else "another process"
            known.append(Outcome(spec, "busy", error=f"claimed by {holder}"))
        else:
            todo.append(spec)
    skipped = sum(o.status == "skipped" for o in known)
    if skipped:
        log.info("skipping %d finished run(s) (use --force to redo them)", skipped)
    for outcome in known:
        if outcome.status == "busy":
            log.info("not running %s: %s", outcome.spec.describe(), outcome.error)
    return known, todo


def in_spec_order(outcomes: list[Outcome], specs: list[RunSpec]) -> list[Outcome]:
    position = {spec: index for index, spec in enumerate(specs)}
    return sorted(outcomes, key=lambda outcome: position.get(outcome.spec, len(specs)))


# -- on this machine: in this process, or in worker processes -----------------------------------------------------
def run_local(specs: list[RunSpec], force: bool = False, workers: int = 1, progress=None,
              show_progress: bool = True) -> list[Outcome]:
    """Build the prerequisites, then run every unfinished spec here; failures do not stop the rest.

    With `workers` > 1 the runs go to that many worker processes, the CPU threads split between them (small models
    use a multi-core CPU better as parallel runs than as threads of one run), under one sweep-level progress bar.
    A worker that dies fails its run only; Ctrl-C stops the workers and returns what finished.
    `progress(outcome)` is called after each run; `show_progress` draws the prerequisites' and the sweep's bars.
    """
    for task in prerequisites_for(specs):
        build(dataclasses.replace(task, progress=show_progress))
    outcomes, todo = split_finished(specs, force)
    if workers > 1 and len(todo) > 1:
        from bench.workers import WorkerPool  # it imports this module

        pool = WorkerPool(workers, force, show_progress)
        return in_spec_order(outcomes + pool.run(todo, progress), specs)
    if todo:
        log.info("running %d run(s) in this process, malloc: %s", len(todo), describe("self"))
    job, clock = Job(force), SweepEta(todo)
    try:
        for index, spec in enumerate(todo):
            log.info("[%d/%d] %s%s", index + 1, len(todo), spec.describe(), clock.text())
            clock.begun(index)
            outcomes.append(run_guarded(job, spec))
            clock.ended(index, outcomes[-1])
            if progress:
                progress(outcomes[-1])
    except KeyboardInterrupt:
        outcomes += stopped(todo, outcomes)
    return in_spec_order(outcomes, specs)


def stopped(todo: list, outcomes: list[Outcome]) -> list[Outcome]:
    """The outcomes of the runs or attacks of `todo` without one in `outcomes` when the sweep was stopped."""
    have = {o.spec for o in outcomes}
    added = [ended(spec, "interrupted", STOPPED) for spec in todo if spec not in have]
    log.warning("interrupted: %d of %d finished", len(todo) - sum(o.status == "interrupted" for o in added),
                len(todo))
    return added


def ended(spec: RunSpec | AttackSpec, state: str, error: str, mark: bool = False) -> Outcome:
    """The outcome of a run or attack whose process ended without reporting it (a dead worker: failed; a stopped
    sweep: interrupted). Done if its record was written after all (the process died after writing it); else
    `state`, with its marker (`failure.json`, `interrupted.json`) where `mark` or its process had claimed it."""
    if isinstance(spec, AttackSpec):
        if (record := finished_attack(spec)) is not None:
            return Outcome(spec, "done", record)
    elif (record := finished_record(spec)) is not None:
        return Outcome(spec, "done", record, attacks=[ended(attack, state, error) for name in spec.attacks
                                                      for attack in attack_specs(spec, name)])
    claim_path = spec.directory / claims.CLAIM_NAME
    held = claims.read_claim(claim_path)
    if mark or (held is not None and claims.claim_is_stale(claim_path, held[1])):
        if state == "failed":
            records.write_failure(spec.directory, error)
        elif not records.read_failure(spec.directory, records.INTERRUPTED_NAME):  # a run's own, from `run_claimed`
            records.write_interrupted(spec.directory, INTERRUPTED)
    return Outcome(spec, state, error=error)


def run_guarded(job: Job, spec: RunSpec) -> Outcome:
    try:
        return job(spec)
    except Exception as exc:  # one failed run must not stop the sweep
        log.error("run failed: %s: %s\n%s", spec.describe(), exc, traceback.format_exc())
        return Outcome(spec, "failed", error=error_text(exc))


def error_text(exc: BaseException) -> str:
    """`Type: message at file:line in function` (the innermost frame in the project or a plug-in)."""
    where = records.failure_where(exc)
    return f"{type(exc).__name__}: {exc}" + (f" at {where}" if where else "")


# -- submitit: prerequisites job, then one job array; a manifest for `status` ------------------------------------
class PrerequisitesFailed(RuntimeError):
    """The job building the base model, classifier or preparations failed; no run was submitted."""


@dataclass
class Submission:
    """What `submit_runs` did: outcomes known without a job, and one job per spec still to run."""

    kind: str
    folder: Path
    known: list[Outcome]
    todo: list[RunSpec]
    jobs: list  # None: a local job held back until others end (`local_slots`); `wait_runs` starts it
    prerequisites_jobs: list[str] = dataclasses.field(default_factory=list)
    resources: list[dict] = dataclasses.field(default_factory=list)  # per job: what its executor submitted with
    submitter: Submitter | None = None
    slots: int = 0  # jobs running at once
    gpus: LocalGpus = LocalGpus()  # what local jobs share out (`local_gpus`)
    manifest: Path | None = None
    submitted: str = dataclasses.field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    gpu_of: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # a local job's GPUs
    needs: list[int] = dataclasses.field(default_factory=list)  # GPUs each local job takes (`LocalGpus.need`)

    @property
    def queued(self) -> int:
        return sum(job is None for job in self.jobs)

    def submit(self, indices: typing.Iterable[int]) -> None:
        """Submit the jobs of `todo[indices]` (one array per method resources on SLURM); a local job gets its GPUs
        (`needs`), those the fewest unfinished jobs hold (or all of them); a manifest written before is brought up
        to date."""
        indices, submitter = list(indices), typing.cast(Submitter, self.submitter)
        if self.gpus.gpus:  # one at a time: a job's GPUs depend on those given before it
            for index in indices:
                self.jobs[index] = submitter.submit([index], **self._gpu_parameters(index))[0]
                self.resources[index] = submitter.parameters(index)
        else:
            for index, job in zip(indices, submitter.submit(indices)):
                self.jobs[index], self.resources[index] = job, submitter.parameters(index)
        if self.manifest:
            write_manifest(self)

    def start(self, count: int, share: bool = False) -> None:
        """Submit the first `count` jobs, or those of them, in order, whose GPUs are free (`fits`); `share`: all
        `count` of them, sharing the GPUs (--no-wait: nothing stays to start the others later)."""
        if share or not self.needs:
            self.submit(range(count))
            return
        for index in range(count):
            if not self.fits(index):
                break
            self.submit([index])

    def fits(self, index: int) -> bool:
        """Whether as many GPUs as job `index` takes are held by no unfinished job (always, for jobs without)."""
        need = self.needs[index] if self.needs else 0
        return not need or len(self.gpus.gpus) - len(set(self._held())) >= need

    def _held(self) -> typing.Iterator[int]:
        return (gpu for other, gpus in self.gpu_of.items()
                if self.jobs[other] is not None and not self.jobs[other].done() for gpu in gpus)

    def _gpu_parameters(self, index: int) -> dict:
        if self.gpus.all:
            return gpu_parameters(self.gpus.gpus)
        need = self.needs[index] if self.needs else self.gpus.each
        if not need:  # a method's gpus_per_node 0 (the cluster file's `methods:`): its executor hides all
            return {}
        self.gpu_of[index] = least_busy(self.gpus.gpus, self._held(), need)
        return gpu_parameters(self.gpu_of[index])


def gpu_parameters(gpus: tuple[int, ...]) -> dict:
    """submitit's local parameters that make `gpus` (CUDA_VISIBLE_DEVICES indices) a job's GPUs."""
    return {"gpus_per_node": len(gpus), "visible_gpus": gpus}


def submit_runs(specs: list[RunSpec], kind: str, config: dict, folder: str | Path, force: bool = False,
                wait_prerequisites: bool = True) -> Submission:
    """Submit every unfinished spec, one job array per method resources (`bench.cluster.resources`), after a job
    building missing prerequisites.

    With `wait_prerequisites=False` (--no-wait) on SLURM the arrays wait for that job in the queue (afterok), so
    nothing here blocks; elsewhere this waits for it. Raises PrerequisitesFailed if it fails. Local jobs start
    `local_slots` at a time: the others are None in `jobs` until `wait_runs` starts them (with --no-wait all start).
    """
    folder = Path(folder)
    wait = wait_prerequisites or kind != "slurm"
    gpus = local_gpus(kind, config, [spec.device for spec in specs])
    prerequisites = _prerequisites(make_executor(kind, folder, resources(config, None)), specs, wait,
                                   gpus.first_job())
    known, todo = split_finished(specs, force)
    after = prerequisites if not wait_prerequisites else []
    submission = _submit(kind, folder, config, known, todo, force, lambda spec: resources(config, spec.method),
                         gpus, wait_prerequisites, after, prerequisites)
    if todo:
        submission.manifest = write_manifest(submission)
    return submission


def _submit(kind: str, folder: Path, config: dict, known: list[Outcome], todo: list, force: bool,
            resources_of: typing.Callable, gpus: LocalGpus, wait: bool = True,
            after: list[str] = (), prerequisites: list[str] = ()) -> Submission:
    """One job per task of `todo` through `Submitter`, local ones `local_slots` at a time with `gpus`
    (`local_gpus`); those the slots leave are held back for `wait_runs` to start."""
    needs = [gpus.need(resources_of(task)) for task in todo]
    slots = local_slots(kind, config, len(todo), wait, gpus.slots(needs))
    submitter = Submitter(kind, folder, Job(force, local_threads(kind, len(todo), slots if wait else None)), todo,
                          resources_of, after)
    submission = Submission(kind, folder, known, todo, [None] * len(todo), list(prerequisites),
                            [submitter.parameters(index) for index in range(len(todo))], submitter, slots, gpus,
                            needs=needs if gpus.gpus else [])
    submission.start(slots, share=not wait)
    return submission


def _prerequisites(executor, specs: list[RunSpec], wait: bool, gpus: dict) -> list[str]:
    """Submit one job per preset whose prerequisites are incomplete (and wait for it); their job ids. `gpus`: the
    local job's (`gpu_parameters`)."""
    tasks = [task for task in prerequisites_for(specs) if missing(task)]
    if not tasks:
        return []
    own_parameters(executor, **gpus)
    jobs = submit_all(executor, Job(threads=local_threads(executor.cluster, len(tasks), len(tasks))), tasks)
    for task, job in zip(tasks, jobs):
        log.info("building the %s prerequisites first (%s): job %s (log %s)", task.preset, ", ".join(missing(task)),
                 job.job_id, job.paths.stderr)
    if wait:
        for finished in wait_all(jobs, tasks, progress=False, poll_s=2.0, refresh_s=10.0):
            if finished.failed:
                raise PrerequisitesFailed(f"building the {finished.item.preset} prerequisites failed: "
                                          f"{short_error(finished.outcome)} (log: {finished.log_path})")
    return [job.job_id for job in jobs]


def wait_runs(submission: Submission, progress: bool = True) -> list[Outcome]:
    """Wait for every job (progress bar over finished runs); returns all outcomes, failed ones with their log.

    Each finished job gets a log line with the sweep's weighted ETA (`SweepEta`), its runs handed out to as many
    slots as jobs have been seen running at once (all of them for local jobs; on SLURM what the queue allowed)."""
    todo, ended, clock = submission.todo, {}, SweepEta(submission.todo, 1)

    def started(index: int) -> None:
        clock.begun(index)
        clock.workers = max(clock.workers, len(clock.running))

    def finished(index: int, job: Finished) -> str:
        if job.failed:
            ended[index] = Outcome(job.item, "failed", error=job_error(job.item, job.outcome),
                                   log_path=str(job.log_path))
        else:
            ended[index] = dataclasses.replace(job.outcome, log_path=str(job.log_path))
        left = log_ended(clock, index, ended[index], len(ended), len(todo))
        return f"failed={sum(o.status == 'failed' for o in ended.values())}" + (f", ETA {left}" if left else "")

    def start(index: int):  # a held-back local job, once another has ended
        submission.submit([index])
        return submission.jobs[index]

    # A local job's end is a poll() of its process: asked often, a held-back job takes its slot at once.
    wait_all(submission.jobs, todo, progress=progress, poll_s=0.2 if submission.kind == "local" else 2.0,
             refresh_s=10.0, on_start=started,
             on_finish=finished, start=start, slots=submission.slots, fits=submission.fits)
    outcomes = list(submission.known) + [ended[index] for index in range(len(todo))]
    return in_spec_order(outcomes, [o.spec for o in submission.known] + todo)


def log_ended(clock: SweepEta, index: int, outcome: Outcome, count: int, total: int) -> str:
    """Count run `index`'s outcome into the sweep's ETA and log its line, `[3/90] safemax class 2 seed 0: done
    (elapsed 1m 20s, ETA 4m 00s)`; returns the ETA, for the bar."""
    clock.ended(index, outcome)
    left = clock.left_text()
    log.info("[%d/%d] %s: %s%s", count, total, outcome.spec.describe(), outcome.status, clock.text(left))
    return left


def job_error(spec: RunSpec | AttackSpec, error: BaseException | str) -> str:
    """`short_error`, or the job's `failure.json` (type, message and where it was raised) when it tells of this very
    error (a debug job's error is the exception itself: its message alone)."""
    text, failure = short_error(error), records.read_failure(spec.directory) or {}
    if failure.get("where") and failure.get("error") in (text, f"{type(error).__name__}: {text}"):
        return f"{failure['error']} at {failure['where']}"
    return text


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
    given = submission.resources or [{}] * len(submission.jobs)
    runs = [{"preset": s.preset, "protocol": s.protocol_name, "method": s.method, "variant": s.variant,
             "forget_class": s.forget_class, "seed": s.seed, "directory": str(Path(s.directory).resolve()),
             "job_id": None if job is None else job.job_id, "resources": parameters}  # None: held back, queued
            for s, job, parameters in zip(submission.todo, submission.jobs, given)]
    payload = {"cluster": submission.kind, "submitted": submission.submitted,
               "host": socket.gethostname(), "pid": os.getpid(), "pid_start": claims.process_start(os.getpid()),
               "prerequisites_jobs": submission.prerequisites_jobs, "runs": runs}
    # Unique even for two submissions of one process within a second (the suffix), ordered by time in `ls`; a
    # submission's later jobs (held-back local ones) rewrite its own file.
    path = submission.manifest or (submission.folder / f"submission-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-"
                                                       f"{os.urandom(3).hex()}.json")
    records.write_json_atomic(path, payload)
    return path


# -- attacks on finished runs (bench.attacks): the same job path, claims and skipping as runs ------------------------
def attack_claimed(spec: AttackSpec, force: bool = False, job_id: str | None = None) -> Outcome:
    """Run one attack while holding its claim, as `run_claimed` runs a run; skipped when its record is current."""
    if not force and (record := finished_attack(spec)) is not None:
        return Outcome(spec, "skipped", record)
    claim = claims.try_claim(spec.directory / claims.CLAIM_NAME, job_id)
    if claim is None:
        return Outcome(spec, "busy", error="claimed by another process")
    try:
        if not force and (record := finished_attack(spec)) is not None:
            return Outcome(spec, "skipped", record)
        outcome = Outcome(spec, "done", attack_one(spec, fresh=force))
        records.clear_markers(spec.directory)
        return outcome
    except Exception as exc:  # not an interruption (Ctrl-C, a preemption's exit): that run resumes, it did not fail
        records.write_failure(spec.directory, f"{type(exc).__name__}: {exc}", _log_path(), exc)
        raise
    except KeyboardInterrupt:  # as in `run_claimed`
        if not (spec.directory / ATTACK_NAME).exists() or force:
            records.write_interrupted(spec.directory, INTERRUPTED)
        raise
    finally:
        claim.release()


def run_attacks(spec: RunSpec, force: bool = False, job_id: str | None = None) -> list[Outcome]:
    """The attacks `spec.attacks` names (default settings) on the run's saved model; a failed one fails alone."""
    outcomes = []
    for attack in (a for name in spec.attacks for a in attack_specs(spec, name)):
        try:
            outcomes.append(attack_claimed(attack, force, job_id))
        except Exception as exc:
            log.error("attack failed: %s: %s\n%s", attack.describe(), exc, traceback.format_exc())
            outcomes.append(Outcome(attack, "failed", error=error_text(exc)))
    return outcomes


def finished_attacks(spec: RunSpec, run_record: dict) -> list[Outcome] | None:
    """The attacks `spec.attacks` names on a finished run, each skipped with its current record, so that a rerun's
    summary shows them beside the run's row as the first run's did; None while one has none (the run's job makes
    it)."""
    found = [Outcome(attack, "skipped", finished_attack(attack, run_record)) for name in spec.attacks
             for attack in attack_specs(spec, name)]
    return None if any(outcome.record is None for outcome in found) else found


def split_attacks(specs: list[AttackSpec], force: bool = False) -> tuple[list[Outcome], list[AttackSpec]]:
    """(outcomes of attacks with a current record, the attacks still to run)."""
    known = [] if force else [Outcome(s, "skipped", r) for s in specs if (r := finished_attack(s)) is not None]
    done = {o.spec for o in known}
    if known:
        log.info("skipping %d finished attack(s) (use --force to redo them)", len(known))
    return known, [spec for spec in specs if spec not in done]


def run_attacks_local(specs: list[AttackSpec], force: bool = False, workers: int = 1) -> list[Outcome]:
    """Run every unfinished attack here, in this process or in `workers` worker processes."""
    outcomes, todo = split_attacks(specs, force)
    if workers > 1 and len(todo) > 1:
        from bench.workers import WorkerPool  # it imports this module

        return in_spec_order(outcomes + WorkerPool(workers, force).run(todo), specs)
    job = Job(force)
    try:
        for index, spec in enumerate(todo, 1):
            log.info("[%d/%d] %s", index, len(todo), spec.describe())
            outcomes.append(run_guarded(job, spec))
    except KeyboardInterrupt:
        outcomes += stopped(todo, outcomes)
    return in_spec_order(outcomes, specs)


def submit_attacks(specs: list[AttackSpec], kind: str, config: dict, folder: str | Path,
                   force: bool = False) -> Submission:
    """Submit every unfinished attack as one job array (their runs must have finished); wait with `wait_runs`."""
    known, todo = split_attacks(specs, force)
    return _submit(kind, Path(folder), config, known, todo, force, lambda spec: config,
                   local_gpus(kind, config, [spec.run.device for spec in todo]))
