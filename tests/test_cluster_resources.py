"""Per-method resources from a cluster file reach each job's executor, and `bench run --dry-run` lists the jobs with
them and writes nothing (issue 26 item 6).

The runs go through `--cluster debug`, the same submission path as SLURM (one executor per set of resources);
the manifest each submission leaves holds the parameters every job's executor was given.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import pytest

from bench.cluster import Submitter, executor_parameters, load_cluster_config, make_executor, resources, submit_all, wait_all
from bench.orchestrate import Submission, local_gpus

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the local jobs below run a function of this file

CLUSTER = """
timeout_min: 30
mem_gb: 2
cpus_per_task: 1
methods:
  safemax: {timeout_min: 11, mem_gb: 3}
  retrain: {timeout_min: 90, gpus_per_node: 1}
prerequisites: {timeout_min: 45}
"""


@pytest.fixture
def cluster_file(tmp_path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER)
    return path


def snapshot(*folders: Path) -> dict:
    """Every path under `folders` with its size and modification time (nothing at all for a missing folder)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for folder in folders if folder.exists()
            for p in [folder, *folder.rglob("*")]}


def test_a_methods_entry_replaces_the_top_level_values_for_that_method_only(cluster_file):
    config = load_cluster_config(cluster_file)
    assert resources(config, "safemax") == {"timeout_min": 11, "mem_gb": 3, "cpus_per_task": 1}
    assert resources(config, "retrain") == {"timeout_min": 90, "mem_gb": 2, "cpus_per_task": 1, "gpus_per_node": 1}
    assert resources(config, "sa") == {"timeout_min": 30, "mem_gb": 2, "cpus_per_task": 1}
    assert resources(config, None)["timeout_min"] == 45  # the prerequisites job


@pytest.mark.parametrize("text, message", [
    ("methods: {retrian: {timeout_min: 5}}", "retrian is not a registered method"),
    ("methods: {retrain: {timeout_min: -5}}", "methods.retrain.timeout_min"),
    ("methods: {retrain: {time: 5}}", "methods.retrain: unknown key(s) time"),
    ("methods: {retrain: {slurm_nonsense: 1}}", "submitit has no SLURM parameter methods.retrain.slurm_nonsense"),
    ("methods: [retrain]", "methods must map method names to resources"),
    ("prerequisites: {mem_gb: lots}", "prerequisites.mem_gb"),
    ("result_wait_s: -1", "result_wait_s (seconds an ended job's result file may take to appear"),
    ("result_wait_s: soon", "result_wait_s"),
])
def test_a_wrong_methods_entry_is_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ValueError) as error:
        load_cluster_config(path)
    assert message in str(error.value)


def killed_by_sigkill(_) -> None:
    os.kill(os.getpid(), 9)


def test_a_killed_job_is_reported_after_the_files_result_wait(tmp_path):
    """`result_wait_s`: how long an ended job's result file may take to appear (submitit waits 15 s, for shared file
    systems); the file's value reaches the job, so a killed job is reported that much sooner."""
    assert load_cluster_config("local")["result_wait_s"] == 1  # the one-machine SLURM cluster's own disk
    (tmp_path / "wait.yaml").write_text("result_wait_s: 0\n")
    executor = make_executor("local", tmp_path / "jobs", load_cluster_config(tmp_path / "wait.yaml"))
    started = time.monotonic()
    jobs = submit_all(executor, killed_by_sigkill, [0])
    (finished,) = wait_all(jobs, progress=False, poll_s=0.1, timeout_s=60)
    assert finished.failed and "has not produced any output" in str(finished.outcome)
    assert time.monotonic() - started < 10, "waited submitit's 15 s for the result file"


def test_a_slurm_executor_gets_the_methods_time_memory_and_gpus(cluster_file, tmp_path):
    config = load_cluster_config(cluster_file)
    given = executor_parameters(make_executor("slurm", tmp_path, resources(config, "retrain")))
    assert (given["time"], given["mem"], given["gpus_per_node"], given["cpus_per_task"]) == (90, "2GB", 1, 1)
    assert executor_parameters(make_executor("slurm", tmp_path, resources(config, "safemax")))["time"] == 11


@pytest.mark.slow
def test_each_methods_jobs_get_its_resources(cluster_file, tiny_cache, bench_cli, tmp_path):
    out = tmp_path / "results"
    result = bench_cli("run", "--preset", "tiny", "--methods", "original,safemax", "--classes", "0", "--cache",
                       tiny_cache, "--results", str(out), "--cluster", "debug", "--cluster-config", str(cluster_file),
                       "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    (manifest,) = [json.loads(p.read_text()) for p in (out / ".submitit").glob("submission-*.json")]
    given = {run["method"]: run["resources"] for run in manifest["runs"]}  # the executors' own parameters
    keys = ("timeout_min", "mem_gb", "cpus_per_task", "gpus_per_node")
    assert {key: given["safemax"].get(key) for key in keys} == {"timeout_min": 11, "mem_gb": 3, "cpus_per_task": 1,
                                                                  "gpus_per_node": None}
    assert {key: given["original"].get(key) for key in keys} == {"timeout_min": 30, "mem_gb": 2, "cpus_per_task": 1,
                                                                   "gpus_per_node": None}


def test_dry_run_lists_every_job_with_its_resources_and_writes_nothing(cluster_file, tmp_path, bench_cli):
    out, cache = tmp_path / "results", tmp_path / "cache"
    result = bench_cli("run", "--preset", "tiny", "--methods", "safemax,retrain", "--classes", "0,1", "--seeds", "0-1",
                       "--cache", str(cache), "--results", str(out), "--cluster", "slurm", "--cluster-config",
                       str(cluster_file), "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("first: build the tiny base model and classifier") and "time 0:45:00" in lines[0]
    jobs = [line for line in lines if line.startswith(("safemax", "retrain"))]
    assert len(jobs) == 8
    assert all("time 0:11:00, 3 GB" in line for line in jobs if line.startswith("safemax"))
    assert all("time 1:30:00, 2 GB, 1 GPU" in line for line in jobs if line.startswith("retrain"))
    assert str(out / "tiny" / "paper" / "retrain" / "default" / "class1" / "seed1") in result.stdout
    assert "dry run: 8 run(s) to start (--cluster slurm), 0 skipped" in lines[-1]
    assert not out.exists() and not cache.exists()  # nothing built, nothing submitted, no folder made


def test_dry_run_says_how_many_local_jobs_run_at_once_and_on_which_gpus(tmp_path, bench_cli):
    common = ("run", "--preset", "tiny", "--methods", "original,safemax", "--classes", "0-3", "--cache",
              str(tmp_path / "cache"), "--results", str(tmp_path / "results"), "--cluster", "local", "--dry-run")
    env = {"CUDA_VISIBLE_DEVICES": "3,4,6"}  # GPUs bench run sees (none is there; a dry run starts nothing)
    on_gpus = bench_cli(*common, env=env).stdout.splitlines()[-1]
    assert "dry run: 8 run(s) to start (--cluster local, 3 at a time on GPUs 3, 4, 6), 0 skipped" in on_gpus
    on_cpu = bench_cli(*common, "--device", "cpu", env=env).stdout.splitlines()[-1]
    assert f"(--cluster local, {min(8, len(os.sched_getaffinity(0)))} at a time), 0 skipped" in on_cpu
    # A cluster file's gpus_per_node: that many GPUs to a job (submitit gave every job the first two)
    (tmp_path / "two.yaml").write_text("gpus_per_node: 2\n")
    pairs = bench_cli(*common, "--cluster-config", str(tmp_path / "two.yaml"), env={"CUDA_VISIBLE_DEVICES": "3,4,6,7"})
    assert "(--cluster local, 2 at a time on GPUs 3, 4, 6, 7, 2 each), 0 skipped" in pairs.stdout.splitlines()[-1]
    # A method's own gpus_per_node: its jobs take that many, the others the file's
    (tmp_path / "mixed.yaml").write_text("gpus_per_node: 1\nmethods: {safemax: {gpus_per_node: 2}}\n")
    mixed = bench_cli(*common, "--cluster-config", str(tmp_path / "mixed.yaml"), env={"CUDA_VISIBLE_DEVICES": "3,4,6,7"})
    assert ("(--cluster local, up to 4 at a time on GPUs 3, 4, 6, 7, 1 each to original; 2 each to safemax), "
            "0 skipped") in mixed.stdout.splitlines()[-1], mixed.stdout
    # No GPU to a job but to one method's: those jobs take theirs, the others see none (the method's were ignored)
    (tmp_path / "one.yaml").write_text("gpus_per_node: 0\nmethods: {safemax: {gpus_per_node: 2}}\n")
    one = bench_cli(*common, "--cluster-config", str(tmp_path / "one.yaml"), env={"CUDA_VISIBLE_DEVICES": "3,4,6,7"})
    assert ("(--cluster local, up to 2 at a time on GPUs 3, 4, 6, 7, none to original; 2 each to safemax), "
            "0 skipped") in one.stdout.splitlines()[-1], one.stdout
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


def test_dry_run_skips_finished_runs_as_a_real_run_would(debug_sweep, tiny_cache, tiny_sweep, bench_cli):
    before = snapshot(Path(debug_sweep), Path(tiny_cache))
    result = bench_cli("run", *tiny_sweep, "--methods", "original,safemax,sa", "--cache", tiny_cache, "--results",
                       str(debug_sweep), "--dry-run", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    shown = json.loads(result.stdout)
    assert [(run["method"], run["forget_class"]) for run in shown["runs"]] == [("sa", 0), ("sa", 1)]
    assert shown["skipped"] == 4 and shown["prerequisites"] == []
    assert snapshot(Path(debug_sweep), Path(tiny_cache)) == before


def gpus_seen(step: tuple[str, str]) -> str:
    """A local job's CUDA_VISIBLE_DEVICES; ("wait", path) returns once `path` exists, ("mark", path) creates it."""
    what, path = step
    if what == "mark":
        Path(path).touch()
    deadline = time.monotonic() + 60
    while what == "wait" and not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.environ["CUDA_VISIBLE_DEVICES"]


def test_local_jobs_get_gpus_per_node_gpus_of_their_own_the_least_busy_first(tmp_path, monkeypatch):
    # Four GPUs (by name only: the jobs read their CUDA_VISIBLE_DEVICES and use none), two to a job: two jobs at once.
    # The third, held back, starts when the short one ends and takes the pair it freed, not the one the first job
    # still holds (that job waits for the third's mark).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    marker = str(tmp_path / "third-started")
    config, items = {"gpus_per_node": 2}, [("wait", marker), ("short", marker), ("mark", marker)]
    gpus = local_gpus("local", config, [None])
    assert (gpus.gpus, gpus.each, gpus.slots()) == ((4, 5, 6, 7), 2, 2)
    submitter = Submitter("local", tmp_path, gpus_seen, items, lambda item: config)
    submission = Submission("local", tmp_path, [], items, [None] * 3, submitter=submitter, slots=gpus.slots(),
                            gpus=gpus, resources=[{}] * 3)
    submission.submit(range(gpus.slots()))

    def start(index: int):
        submission.submit([index])
        return submission.jobs[index]

    finished = wait_all(submission.jobs, items, progress=False, poll_s=0.2, timeout_s=120, start=start, slots=2)
    assert [job.outcome for job in finished] == ["4,5", "6,7", "6,7"], [job.outcome for job in finished]


def test_a_job_that_takes_more_gpus_waits_until_they_are_free_and_shares_none(tmp_path, monkeypatch):
    # Three GPUs, one to a job, two to the third job (its method's own gpus_per_node). The third waits until the short
    # second job has ended and then takes the two GPUs nobody holds, not the first job's (which holds its GPU until
    # the third's mark). Started with the two others at once, it got 6 and 4: GPU 4 shared with the first job.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    marker = str(tmp_path / "third-started")
    items = [("wait", marker), ("short", marker), ("mark", marker)]
    own = {"mark": {"gpus_per_node": 2}}
    gpus = local_gpus("local", {}, [None])
    needs = [gpus.need(own.get(item[0], {})) for item in items]
    assert needs == [1, 1, 2] and gpus.slots(needs) == 3
    submitter = Submitter("local", tmp_path, gpus_seen, items, lambda item: own.get(item[0], {}))
    submission = Submission("local", tmp_path, [], items, [None] * 3, submitter=submitter, slots=3, gpus=gpus,
                            resources=[{}] * 3, needs=needs)
    submission.start(3)
    assert submission.queued == 1  # the third does not fit beside the first two

    def start(index: int):
        submission.submit([index])
        return submission.jobs[index]

    finished = wait_all(submission.jobs, items, progress=False, poll_s=0.2, timeout_s=120, start=start, slots=3,
                        fits=submission.fits)
    assert [job.outcome for job in finished] == ["4", "5", "5,6"], [job.outcome for job in finished]
