"""Launch work through submitit: one module-level job function, the same path for `debug`, `local` and `slurm`.

`debug` runs each job in this process when its result is asked for, `local` runs jobs as subprocesses of this
machine, `slurm` submits them as one job array. Cluster parameters come from `slurm/clusters/<name>.yaml`
(`load_cluster_config`), never from Python.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import typing
from pathlib import Path

import submitit
import yaml
from tqdm.auto import tqdm

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
}


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
    unknown = sorted(set(config) - set(CONFIG_KEYS) - set(_passthrough(config)))
    if unknown:
        raise ValueError(f"cluster config {path}: unknown key(s) {', '.join(map(str, unknown))}; "
                         f"valid: {', '.join(CONFIG_KEYS)}, or any submitit `slurm_*` parameter (slurm_qos, "
                         "slurm_constraint, slurm_additional_parameters, ...)")
    for key, value in config.items():
        if key in CONFIG_KEYS:
            _check_value(path, key, value)
    valid = submitit.SlurmExecutor._valid_parameters()
    wrong = [key for key in _passthrough(config) if key.removeprefix("slurm_") not in valid]
    if wrong:
        raise ValueError(f"cluster config {path}: submitit has no SLURM parameter {', '.join(wrong)}; valid: "
                         f"{', '.join('slurm_' + name for name in sorted(valid))}")
    return {key: value for key, value in config.items() if value is not None}


def _passthrough(config: dict) -> list[str]:
    """Keys handed to submitit as they are: its own `slurm_*` parameters (checked by submitit)."""
    return [key for key in config if isinstance(key, str) and key.startswith("slurm_")]


def _check_value(path: Path, key: str, value) -> None:
    types, meaning = CONFIG_KEYS[key]
    if value is None:
        return
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in types)
        raise ValueError(f"cluster config {path}: {key} ({meaning}) must be {names}, not {value!r}")
    if key == "setup" and not all(isinstance(line, str) for line in value):
        raise ValueError(f"cluster config {path}: setup must be a list of shell lines (strings), not {value!r}")
    if isinstance(value, (int, float)) and (value < 0 or (value == 0 and key != "gpus_per_node")):
        raise ValueError(f"cluster config {path}: {key} ({meaning}) must be positive, not {value!r}")


def make_executor(kind: str, folder: str | Path, config: dict | None = None, job_name: str = "bench"):
    """A submitit executor writing its pickles and logs under `folder` (shared storage for `slurm`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown cluster kind {kind!r}; choose from {', '.join(KINDS)}")
    config = dict(config or {})
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
    return executor


def submit_all(executor, fn: typing.Callable, items: typing.Iterable) -> list:
    """Submit `fn(item)` for every item; on SLURM the list goes out as one job array. Returns the jobs in order."""
    items = list(items)
    if not items:
        return []
    with _submission_env(executor), executor.batch():
        jobs = [executor.submit(fn, item) for item in items]
    if executor.cluster == "slurm":
        log.info("submitted %d job(s) as array %s", len(jobs), jobs[0].job_id.split("_")[0])
    return jobs


@contextlib.contextmanager
def _submission_env(executor):
    """Hide the SLURM variables of an enclosing job (they would leak into the new jobs), but keep SLURM_CONF."""
    if executor.cluster != "slurm":
        yield
        return
    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if conf is not None:
            os.environ["SLURM_CONF"] = conf
        yield


def wait_all(jobs: list, items: list | None = None, progress: bool = True, poll_s: float = 2.0,
             refresh_s: float = 30.0, timeout_s: float | None = None) -> list[Finished]:
    """Wait for every job; returns Finished(item, result or exception, stderr log path) in job order.

    `items` defaults to each job's submitted argument. The scheduler is asked at least every `refresh_s`
    (one sacct call covers all jobs), so a killed job is noticed; `timeout_s` raises TimeoutError when passed.
    """
    if items is None:
        items = [_first_argument(job) for job in jobs]
    if len(items) != len(jobs):
        raise ValueError(f"{len(items)} items for {len(jobs)} jobs")
    finished: list[Finished | None] = [None] * len(jobs)
    pending = list(range(len(jobs)))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last_refresh = time.monotonic()
    with tqdm(total=len(jobs), desc="finished runs", unit="run", disable=not progress) as bar:
        while pending:
            refresh = time.monotonic() - last_refresh >= refresh_s
            if refresh:
                last_refresh = time.monotonic()
            still = []
            for position, index in enumerate(pending):
                job = jobs[index]
                if _is_debug(job) or job.done(force_check=refresh and position == 0):
                    finished[index] = _collect(job, items[index])
                    bar.update(1)
                else:
                    still.append(index)
            pending = still
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
