"""Launch work through submitit: one module-level job function, the same path for `debug`, `local` and `slurm`.

`debug` runs each job in this process when its result is asked for, `local` runs jobs as subprocesses of this
machine, `slurm` submits them as job arrays. Cluster parameters come from `slurm/clusters/<name>.yaml`
(`load_cluster_config`), never from Python. A cluster file may give each method its own resources
(`methods: {retrain: {timeout_min: 1440}}`) and the prerequisites job its own (`prerequisites: {...}`);
`resources` resolves them, and a `Submitter` sends one job array per distinct set of resources. submitit's local
executor starts every job at once, so `wait_all` can hold some back and start them as others end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import typing
from pathlib import Path

import submitit
import yaml

from bench.allocator import allocator_library, preloading
from bench.device import progress_bar
from bench.eta import BAR_FORMAT

log = logging.getLogger(__name__)

KINDS = ("debug", "local", "slurm")
CLUSTERS_DIR = Path(__file__).resolve().parent.parent / "slurm" / "clusters"

# key -> (accepted types, what the key means); `setup` lines run in the job script before the job starts
CONFIG_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "partition": ((str,), "SLURM partition"),
    "account": ((str,), "SLURM account charged for the jobs"),
    "gpus_per_node": ((int,), "GPUs per job (0: none)"),
    "cpus_per_task": ((int,), "CPU cores per job"),
    "mem_gb": ((int, float), "memory per job in GB"),
    "timeout_min": ((int,), "time limit per job in minutes"),
    "array_parallelism": ((int,), "most array tasks running at once"),
    "setup": ((list,), "shell lines run before each job, e.g. module load, source venv"),
    "result_wait_s": ((int, float), "seconds an ended job's result file may take to appear before the job counts as "
                                    "failed (shared file systems show files late; submitit's default: 15)"),
}
# Mappings of the keys above (and `slurm_*` ones) that replace them for some jobs: per method, and for the one job
# that builds the base model, classifier and preparations.
GROUP_KEYS = {"methods": "per-method resources, {method: {timeout_min: ..., mem_gb: ...}}",
              "prerequisites": "resources of the job building the base model, classifier and preparations"}


RUNNING_STATES = ("RUNNING", "COMPLETING")  # submitit's job states (SLURM's; a local job's is RUNNING)


class Finished(typing.NamedTuple):
    """One finished job: what it was given, its return value or exception, and its stderr log."""

    item: typing.Any
    outcome: typing.Any
    log_path: Path | None

    @property
    def failed(self) -> bool:
        return isinstance(self.outcome, BaseException)


def cluster_dirs() -> list[Path]:
    """Where named cluster files are looked up, in order: $BENCH_CLUSTERS, ~/.config/unlearning-bench/clusters,
    this checkout's slurm/clusters, and the copy an installed package ships in <prefix>/share."""
    found = [Path(os.environ["BENCH_CLUSTERS"])] if os.environ.get("BENCH_CLUSTERS") else []
    found += [Path.home() / ".config" / "unlearning-bench" / "clusters", CLUSTERS_DIR,
              Path(sys.prefix) / "share" / "unlearning-bench" / "clusters"]
    return found


def cluster_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file as given, or a name looked up as `<dir>/<name>.yaml` in `cluster_dirs()`."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    for folder in cluster_dirs():
        if (folder / f"{name_or_path}.yaml").is_file():
            return folder / f"{name_or_path}.yaml"
    return CLUSTERS_DIR / f"{name_or_path}.yaml"


def load_cluster_config(path: str | Path) -> dict:
    """Read and check a cluster file; returns {key: value} with only the keys in CONFIG_KEYS."""
    path = cluster_config_path(path)
    if not path.is_file():
        known = ", ".join(sorted({p.stem for folder in cluster_dirs() for p in folder.glob("*.yaml")})) or "none"
        raise FileNotFoundError(f"cluster config {path} not found (known names: {known}; looked in "
                                f"{', '.join(map(str, cluster_dirs()))})")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"cluster config {path} is not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"cluster config {path} must be a mapping of key: value, not {type(config).__name__}")
    unknown = sorted(set(config) - set(CONFIG_KEYS) - set(GROUP_KEYS) - set(_passthrough(config)), key=str)
    if unknown:
        raise ValueError(f"cluster config {path}: unknown key(s) {', '.join(map(str, unknown))}; "
                         f"valid: {', '.join([*CONFIG_KEYS, *GROUP_KEYS])}, or any submitit `slurm_*` parameter "
                         "(slurm_qos, slurm_constraint, slurm_additional_parameters, ...)")
    _check_keys(path, "", config)
    methods = config.get("methods") or {}
    if not isinstance(methods, dict):
        raise ValueError(f"cluster config {path}: methods must map method names to resources, as in "
                         f"`methods: {{retrain: {{timeout_min: 1440}}}}`, not {methods!r}")
    _check_method_names(path, methods)
    for name, group in [("prerequisites", config.get("prerequisites") or {}),
                        *((f"methods.{method}", group or {}) for method, group in methods.items())]:
        if not isinstance(group, dict):
            raise ValueError(f"cluster config {path}: {name} must be a mapping of key: value, not {group!r}")
        wrong = sorted(set(group) - set(CONFIG_KEYS) - set(_passthrough(group)), key=str)
        if wrong:
            raise ValueError(f"cluster config {path}: {name}: unknown key(s) {', '.join(map(str, wrong))}; valid: "
                             f"{', '.join(CONFIG_KEYS)}, or a `slurm_*` parameter")
        _check_keys(path, f"{name}.", group)
    return {key: value for key, value in config.items() if value is not None}


def _check_keys(path: Path, where: str, config: dict) -> None:
    """The values of CONFIG_KEYS, and that each `slurm_*` key is a parameter submitit knows."""
    for key, value in config.items():
        if key in CONFIG_KEYS:
            _check_value(path, key, value, where)
    valid = submitit.SlurmExecutor._valid_parameters()
    wrong = [where + key for key in _passthrough(config) if key.removeprefix("slurm_") not in valid]
    if wrong:
        raise ValueError(f"cluster config {path}: submitit has no SLURM parameter {', '.join(wrong)}; valid: "
                         f"{', '.join('slurm_' + name for name in sorted(valid))}")


def _check_method_names(path: Path, methods: dict) -> None:
    """A misspelt method would silently get the default resources: every name must be a registered method."""
    from methods import METHODS, load_plugins

    load_plugins()
    unknown = [str(name) for name in methods if name not in METHODS]
    if unknown:
        raise ValueError(f"cluster config {path}: methods: {', '.join(unknown)} is not a registered method; choose "
                         f"from {', '.join(METHODS)} (a plug-in method needs its --method-module or entry point)")


def resources(config: dict, method: str | None = None) -> dict:
    """The parameters of one job: the file's top-level keys, replaced by `methods.<method>`'s (or, with
    `method=None`, by `prerequisites`'s, for the job that builds the prerequisites)."""
    base = {key: value for key, value in config.items() if key not in GROUP_KEYS}
    own = (config.get("methods") or {}).get(method) if method else config.get("prerequisites")
    return {**base, **{key: value for key, value in (own or {}).items() if value is not None}}


def describe_resources(config: dict) -> str:
    """One short line of a job's resources, e.g. `time 24:00:00, 32 GB, 1 GPU, 8 CPUs, partition gpu`."""
    parts = []
    if config.get("timeout_min"):
        hours, minutes = divmod(int(config["timeout_min"]), 60)
        parts.append(f"time {hours}:{minutes:02d}:00")
    if config.get("mem_gb"):
        parts.append(f"{config['mem_gb']:g} GB")
    if config.get("gpus_per_node") is not None:
        parts.append(f"{config['gpus_per_node']} GPU" + ("s" if config["gpus_per_node"] != 1 else ""))
    if config.get("cpus_per_task"):
        parts.append(f"{config['cpus_per_task']} CPU" + ("s" if config["cpus_per_task"] != 1 else ""))
    parts += [f"{key} {config[key]}" for key in ("partition", "account") if config.get(key)]
    parts += [f"{key.removeprefix('slurm_')} {config[key]}" for key in _passthrough(config)]
    return ", ".join(parts) or "the executor's defaults"


def _passthrough(config: dict) -> list[str]:
    """Keys handed to submitit as they are: its own `slurm_*` parameters (checked by submitit)."""
    return [key for key in config if isinstance(key, str) and key.startswith("slurm_")]


def _check_value(path: Path, key: str, value, where: str = "") -> None:
    types, meaning = CONFIG_KEYS[key]
    if value is None:
        return
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in types)
        raise ValueError(f"cluster config {path}: {where}{key} ({meaning}) must be {names}, not {value!r}")
    if key == "setup" and not all(isinstance(line, str) for line in value):
        raise ValueError(f"cluster config {path}: {where}setup must be a list of shell lines (strings), not {value!r}")
    if isinstance(value, (int, float)) and (value < 0 or (value == 0 and key not in ("gpus_per_node", "result_wait_s"))):
        raise ValueError(f"cluster config {path}: {where}{key} ({meaning}) must be positive, not {value!r}")


def make_executor(kind: str, folder: str | Path, config: dict | None = None, job_name: str = "bench"):
    """A submitit executor writing its pickles and logs under `folder` (shared storage for `slurm`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown cluster kind {kind!r}; choose from {', '.join(KINDS)}")
    config = {key: value for key, value in (config or {}).items() if key not in GROUP_KEYS}  # see `resources`
    unknown = sorted(set(config) - set(CONFIG_KEYS) - set(_passthrough(config)))
    if unknown:
        raise ValueError(f"unknown cluster setting(s) {', '.join(unknown)}; valid: {', '.join(CONFIG_KEYS)}")
    executor = submitit.AutoExecutor(folder=Path(folder), cluster=kind)
    parameters = {
        "name": job_name,
        "timeout_min": config.get("timeout_min"),
        "mem_gb": config.get("mem_gb"),
        "cpus_per_task": config.get("cpus_per_task"),
        "gpus_per_node": config.get("gpus_per_node") or None,  # 0 would ask SLURM for a GPU GRES of size 0
        "slurm_partition": config.get("partition"),
        "slurm_account": config.get("account"),
        "slurm_array_parallelism": config.get("array_parallelism"),
        "slurm_setup": config.get("setup"),
    }
    parameters.update({key: config[key] for key in _passthrough(config)} if kind == "slurm" else {})
    executor.update_parameters(**{key: value for key, value in parameters.items() if value is not None})
    executor.bench_result_wait_s = config.get("result_wait_s")  # not submitit's parameter: `submit_all` sets it
    return executor


def submit_all(executor, fn: typing.Callable, items: typing.Iterable) -> list:
    """Submit `fn(item)` for every item; on SLURM the list goes out as one job array. Returns the jobs in order."""
    items = list(items)
    if not items:
        return []
    with _submission_env(executor), executor.batch():
        jobs = [executor.submit(fn, item) for item in items]
    wait = getattr(executor, "bench_result_wait_s", None)
    for job in jobs if wait is not None else ():
        job._results_timeout_s = wait  # how long submitit waits for an ended job's result file (a class default)
    if executor.cluster == "slurm":
        log.info("submitted %d job(s) as array %s", len(jobs), jobs[0].job_id.split("_")[0])
    return jobs


class Submitter:
    """Submits `fn(items[i])` through the executor of the item's resources (`resources_of(item)`, a cluster file's
    mapping): one executor, so one job array on SLURM, per distinct set, so that each method's jobs get its time,
    memory and GPUs; `after` are job ids every job waits for (afterok, on SLURM)."""

    def __init__(self, kind: str, folder: str | Path, fn: typing.Callable, items: list,
                 resources_of: typing.Callable[[typing.Any], dict], after: typing.Sequence[str] = ()):
        self.fn, self.items, self.executors, self.keys = fn, items, {}, []
        for item in items:
            key = json.dumps(resources_of(item), sort_keys=True)
            if key not in self.executors:
                self.executors[key] = executor = make_executor(kind, folder, json.loads(key))
                if after and kind == "slurm":  # added to the file's own additional parameters (a reservation, ...)
                    extra = {**executor_parameters(executor).get("additional_parameters", {}),
                             "dependency": "afterok:" + ":".join(after), "kill-on-invalid-dep": "yes"}
                    executor.update_parameters(slurm_additional_parameters=extra)
            self.keys.append(key)

    def submit(self, indices: typing.Iterable[int], **parameters) -> list:
        """Submit the items at `indices` (one array per executor on SLURM), with `parameters` added to their
        executors' (a local job's GPUs); their jobs, in the order given."""
        indices, jobs = list(indices), {}
        for key, executor in self.executors.items():
            mine = [index for index in indices if self.keys[index] == key]
            if mine and parameters:
                own_parameters(executor, **parameters)
            jobs.update(zip(mine, submit_all(executor, self.fn, [self.items[index] for index in mine])))
        return [jobs[index] for index in indices]

    def parameters(self, index: int) -> dict:
        """What item `index`'s job is (or will be) submitted with."""
        return executor_parameters(self.executors[self.keys[index]])


def own_parameters(executor, **parameters) -> None:
    """Set parameters of the cluster's own executor, under its own names: submitit's AutoExecutor passes on only
    some of them (of the local executor's, only `setup`; its `visible_gpus` not)."""
    getattr(executor, "_executor", executor).update_parameters(**parameters)


def executor_parameters(executor) -> dict:
    """The parameters an executor will submit with (submitit's own names: `time`, `mem`, ... on SLURM)."""
    inner = getattr(executor, "_executor", executor)  # an AutoExecutor wraps the cluster's own executor
    return json.loads(json.dumps(inner.parameters, default=str))


@contextlib.contextmanager
def _submission_env(executor):
    """Local jobs start with bench's malloc (`bench.allocator`: tcmalloc where installed; a SLURM job's is its
    cluster file's `setup`). SLURM jobs: hide the SLURM variables of an enclosing job (they would leak into the new
    jobs), but keep SLURM_CONF."""
    if executor.cluster == "local":
        with preloading(allocator_library()):  # submitit starts each local job's process as it is submitted
            yield
        return
    if executor.cluster != "slurm":
        yield
        return
    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if conf is not None:
            os.environ["SLURM_CONF"] = conf
        yield


def wait_all(jobs: list, items: list | None = None, progress: bool = True, poll_s: float = 2.0,
             refresh_s: float = 30.0, timeout_s: float | None = None,
             on_start: typing.Callable[[int], None] | None = None,
             on_finish: typing.Callable[[int, Finished], str] | None = None,
             start: typing.Callable[[int], typing.Any] | None = None, slots: int | None = None,
             fits: typing.Callable[[int], bool] | None = None) -> list[Finished]:
    """Wait for every job; returns Finished(item, result or exception, stderr log path) in job order.

    `items` defaults to each job's submitted argument. The scheduler is asked at least every `refresh_s`
    (one sacct call covers all jobs), so a killed job is noticed; `timeout_s` raises TimeoutError when passed.
    `on_start(i)` is called once job i is seen running (at the first poll for local jobs, at a refresh on SLURM,
    from the state that refresh fetched), `on_finish(i, finished)` when it has ended; what it returns is shown
    beside the bar, in place of tqdm's own remaining time, which counts jobs. A job given as None is queued:
    `start(i)` submits it, in order, whenever fewer than `slots` submitted jobs are unfinished and `fits(i)` (its GPUs
    are free, where jobs take different numbers of them).
    """
    if items is None:
        items = [_first_argument(job) for job in jobs]
    if len(items) != len(jobs):
        raise ValueError(f"{len(items)} items for {len(jobs)} jobs")
    queued = [index for index, job in enumerate(jobs) if job is None]
    if queued and (start is None or not slots):
        raise ValueError(f"{len(queued)} queued job(s) need `start` and `slots`")
    finished: list[Finished | None] = [None] * len(jobs)
    pending, started, first = list(range(len(jobs))), set(), True  # started: jobs seen running (on_start)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last_refresh = time.monotonic()
    with progress_bar(total=len(jobs), desc="finished runs", unit="run", disable=not progress,
              bar_format=BAR_FORMAT if on_finish else None) as bar:
        while pending:
            while (queued and sum(jobs[index] is not None for index in pending) < slots
                   and (fits is None or fits(queued[0]))):
                index = queued.pop(0)
                jobs[index], first = start(index), True  # first: asked whether it runs at this poll
            refresh = time.monotonic() - last_refresh >= refresh_s
            if refresh:
                last_refresh = time.monotonic()
            still = []
            for position, index in enumerate(pending):
                job = jobs[index]
                if job is None:
                    still.append(index)
                    continue
                debug = _is_debug(job)
                if debug or job.done(force_check=refresh and position == 0):
                    if debug and on_start:  # it runs now, in _collect
                        on_start(index)
                    finished[index] = _collect(job, items[index])
                    if on_finish:
                        bar.set_postfix_str(on_finish(index, finished[index]), refresh=False)
                    bar.update(1)
                else:
                    still.append(index)
            if on_start and (refresh or first):  # on SLURM the state the refresh above fetched (no sacct call)
                for index in still:
                    if index not in started and jobs[index] is not None and jobs[index].state in RUNNING_STATES:
                        started.add(index)
                        on_start(index)
            pending, first = still, False
            if pending:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{len(pending)} job(s) unfinished after {timeout_s:.0f} s: "
                                       f"{', '.join(str(jobs[i].job_id) for i in pending[:10])}")
                time.sleep(poll_s)
    return typing.cast(list[Finished], finished)


def _is_debug(job) -> bool:
    # a debug job runs when asked for its outcome; its done() would open pdb on an exception
    return isinstance(job, submitit.DebugJob)


def _first_argument(job):
    submission = job.submission()
    return submission.args[0] if submission.args else None


def _collect(job, item) -> Finished:
    error = job.exception()  # exception() before result(): a debug job's result() opens pdb on failure
    if error is None:
        return Finished(item, job.result(), Path(job.paths.stderr))
    log.warning("job %s failed (%s); log: %s", job.job_id, type(error).__name__, job.paths.stderr)
    return Finished(item, error, Path(job.paths.stderr))
