"""A real SLURM cluster (with accounting) runs sbatch jobs, submitit job arrays and `bench run --cluster slurm`.

The cluster is started once per session and stopped at the end; if it cannot start, these tests fail. The bench
tests run the tiny sweep as a job array and through `sbatch slurm/bench.sbatch`, and check the faults a cluster
user meets: a SIGKILLed run (rerun resumes it, no partial record ever visible), a run that raises (named with
its log, exit code 1), and a preempted long run (requeued by submitit, resumes from its checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from click.testing import CliRunner

from bench import claims, records
from bench.allocator import malloc_of
from bench.cli import main
from bench.cluster import load_cluster_config, make_executor, submit_all, wait_all

try:
    from slurm_cluster import ClusterStartError, LocalSlurmCluster, process_alive
except ImportError:  # tests/ imported as a package
    from tests.slurm_cluster import ClusterStartError, LocalSlurmCluster, process_alive

# job functions defined here travel by value: the job's Python cannot import this test module
cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT_S = 90
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running single-node cluster; os.environ points SLURM clients (and submitit) at it."""
    cluster, problem = LocalSlurmCluster(tmp_path_factory.mktemp("slurm")), None
    try:
        cluster.start()
    except ClusterStartError as exc:
        problem = str(exc)
    if problem:
        pytest.fail(f"could not start the local SLURM cluster (a SLURM test never skips): {problem}", pytrace=False)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**cluster.env, "OMP_NUM_THREADS": "1"}.items():  # jobs inherit this environment
            patch.setenv(key, value)
        try:
            yield cluster
        finally:
            cluster.stop()
    still_running = {name: pid for name, pid in cluster.pids.items() if process_alive(pid)}
    assert not still_running, f"daemons left running after stop(): {still_running}"


def square(value: int) -> int:
    return value * value


def fail_loudly(value: int) -> None:
    raise ValueError(f"boom {value}")


def mark_and_sleep(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    time.sleep(300)


def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen within {timeout_s} s")


def slurm_executor(folder: Path):
    return make_executor("slurm", folder, load_cluster_config("local"))


@pytest.mark.slow
def test_sbatch_job_completes_in_accounting(slurm_cluster, tmp_path):
    output = tmp_path / "hello.out"
    job_id = slurm_cluster.run("sbatch", "--parsable", f"--output={output}", "--wrap",
                               "echo hello from $SLURM_JOB_ID").stdout.strip()
    state = wait_for(lambda: slurm_cluster.sacct_state(job_id) not in ("", "PENDING", "RUNNING")
                     and slurm_cluster.sacct_state(job_id), WAIT_S, f"job {job_id} finishing in sacct")
    assert state == "COMPLETED"
    assert output.read_text().strip() == f"hello from {job_id}"


@pytest.mark.slow
def test_submitit_batch_runs_one_job_array(slurm_cluster, tmp_path):
    jobs = submit_all(slurm_executor(tmp_path / "submitit"), square, [1, 2, 3])
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1 and all("_" in job.job_id for job in jobs), [job.job_id for job in jobs]
    finished = wait_all(jobs, progress=False, poll_s=0.5, refresh_s=2, timeout_s=WAIT_S)
    assert [(item, outcome) for item, outcome, _ in finished] == [(1, 1), (2, 4), (3, 9)]


@pytest.mark.slow
def test_a_cluster_files_setup_lines_run_before_each_job(slurm_cluster, tmp_path):
    """`setup` reaches the jobs: slurm/README's way to give SLURM jobs tcmalloc, since SLURM, not the `bench`
    script (which restarts itself with it), starts their processes."""
    config = {**load_cluster_config("local"), "setup": ["export LD_PRELOAD=libtcmalloc_minimal.so.4"]}
    jobs = submit_all(make_executor("slurm", tmp_path / "setup", config), malloc_of, ["self"])  # the job's own
    jobs += submit_all(slurm_executor(tmp_path / "plain"), malloc_of, ["self"])
    finished = wait_all(jobs, progress=False, poll_s=0.5, refresh_s=2, timeout_s=WAIT_S)
    assert [outcome for _, outcome, _ in finished] == ["tcmalloc", "system"]


@pytest.mark.slow
def test_submitit_surfaces_job_exception(slurm_cluster, tmp_path):
    (job,) = submit_all(slurm_executor(tmp_path / "submitit"), fail_loudly, [7])
    (finished,) = wait_all([job], progress=False, poll_s=0.5, refresh_s=2, timeout_s=WAIT_S)
    assert isinstance(finished.outcome, submitit.core.utils.FailedJobError)
    assert "ValueError: boom 7" in str(finished.outcome)
    assert finished.log_path.exists() and "boom 7" in finished.log_path.read_text()
    with pytest.raises(submitit.core.utils.FailedJobError, match="boom 7"):
        job.result()
    assert finished_state(slurm_cluster, job.job_id) == "FAILED"  # accounting may lag the result file


@pytest.mark.slow
def test_sigkilled_job_is_reported_not_hung(slurm_cluster, tmp_path):
    marker = tmp_path / "started"
    (job,) = submit_all(slurm_executor(tmp_path / "submitit"), mark_and_sleep, [str(marker)])
    wait_for(marker.exists, WAIT_S, "the job starting")
    worker = int(marker.read_text())
    slurm_cluster.run("scancel", "--signal=KILL", job.job_id)
    (finished,) = wait_all([job], progress=False, poll_s=0.5, refresh_s=1, timeout_s=WAIT_S)
    assert isinstance(finished.outcome, submitit.core.utils.UncompletedJobError)
    assert slurm_cluster.sacct_state(job.job_id) in ("FAILED", "CANCELLED")
    wait_for(lambda: not process_alive(worker), 30, "the killed worker process gone")


def test_cluster_config_rejects_unknown_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("partition: gpu\ngpus: 1\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) gpus; valid: partition, account, gpus_per_node"):
        load_cluster_config(path)


def test_cluster_config_rejects_wrong_type(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("mem_gb: lots\n")
    with pytest.raises(ValueError, match="mem_gb .* must be int or float, not 'lots'"):
        load_cluster_config(path)


def test_shipped_cluster_configs_load():
    assert load_cluster_config("example")["gpus_per_node"] == 1
    assert load_cluster_config("local")["partition"] == "debug"


@pytest.mark.parametrize("kind", ["debug", "local"])
def test_same_job_path_without_slurm(kind, tmp_path):
    jobs = submit_all(make_executor(kind, tmp_path / "submitit", {"timeout_min": 5}), square, [2, 3])
    jobs += submit_all(make_executor(kind, tmp_path / "submitit", {"timeout_min": 5}), fail_loudly, [4])
    finished = wait_all(jobs, progress=False, poll_s=0.2, timeout_s=WAIT_S)
    assert [f.outcome for f in finished[:2]] == [4, 9]
    assert finished[2].failed and "boom 4" in str(finished[2].outcome)


# -- bench run on the cluster -------------------------------------------------------------------------------------
SLURM = ("--cluster", "slurm", "--cluster-config", "local")
# A run long enough that a signal sent at its first checkpoint (step 10) lands before its end: ~2x the steps a
# tiny retrain takes to write its first checkpoint, start up and be signalled through SLURM, on a loaded 2-core CPU.
LONG = 300
RETRAIN = ("--preset", "tiny", "--methods", "retrain", "--classes", "0", "--set", f"retrain.iterations={LONG}",
           "--no-progress")


def manifests(out: Path) -> list[dict]:
    paths = sorted((out / ".submitit").glob("submission-*.json"), key=lambda p: p.stat().st_mtime)
    return [json.loads(p.read_text()) for p in paths]


def job_log(out: Path, job_id: str) -> Path:
    return submitit.core.utils.JobPaths(out / ".submitit", job_id, 0).stderr


def finished_state(cluster: LocalSlurmCluster, job_id: str, timeout_s: float = WAIT_S) -> str:
    return wait_for(lambda: cluster.sacct_state(job_id) not in ("", "PENDING", "RUNNING", "REQUEUED")
                    and cluster.sacct_state(job_id), timeout_s, f"job {job_id} finishing")


class RecordWatcher:
    """Reads a record path every few ms while a run goes on: notes each time it was absent, whole or broken."""

    def __init__(self, path: Path):
        self.path, self.seen, self._stop = path, [], threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            if not self.path.exists():
                state = "absent"
            else:
                try:
                    records.read_record(self.path)
                    state = "whole"
                except records.CorruptRecord:
                    state = "broken" if self.path.exists() else "absent"
            if not self.seen or self.seen[-1] != state:
                self.seen.append(state)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(5)
        return self.seen


@pytest.fixture(scope="module")
def slurm_sweep(slurm_cluster, tiny_cache, tiny_sweep, bench_cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm-sweep")
    return out, bench_cli("run", *tiny_sweep, "--cache", tiny_cache, "--out", str(out), *SLURM)


@pytest.mark.slow
def test_bench_run_fans_the_sweep_out_as_one_job_array(slurm_cluster, slurm_sweep, debug_sweep, sweep_records):
    out, result = slurm_sweep
    assert result.returncode == 0, result.stdout + result.stderr
    assert sweep_records(out) == sweep_records(debug_sweep)  # same runs and numbers as in-process jobs
    (manifest,) = manifests(out)
    job_ids = [run["job_id"] for run in manifest["runs"]]
    assert len({job_id.split("_")[0] for job_id in job_ids}) == 1 and all("_" in j for j in job_ids), job_ids
    assert manifest["prerequisites_jobs"] == []  # tiny_cache has them
    assert {finished_state(slurm_cluster, job_id) for job_id in job_ids} == {"COMPLETED"}
    assert "original default      0     0" in result.stdout and "4 run(s) done, 0 skipped" in result.stdout
    # a line per finished run, as a local sweep's, with the weighted ETA; each job's log names its run and threads
    done = re.findall(r"\[(\d)/4\] (?:original|safemax) class \d seed 0: done \(elapsed \d+m \d+s", result.stderr)
    assert sorted(done) == ["1", "2", "3", "4"], result.stderr
    logs = "".join(path.read_text() for path in (out / ".submitit").glob("*_log.err"))
    assert len(re.findall(r"(?:original|safemax) class \d seed 0: 1 CPU thread\(s\)", logs)) == 4, logs


@pytest.mark.slow
def test_rerun_submits_nothing_and_status_shows_all_done(slurm_sweep, tiny_cache, tiny_sweep):
    out, _ = slurm_sweep
    rerun = CliRunner().invoke(main, ["run", *tiny_sweep, "--cache", tiny_cache, "--out", str(out), *SLURM])
    assert rerun.exit_code == 0, rerun.output
    assert "0 run(s) done, 4 skipped" in rerun.output and "submitted" not in rerun.output
    assert len(manifests(out)) == 1
    shown = CliRunner().invoke(main, ["status", "--out", str(out)])
    assert "4 done, 0 stale, 0 running, 0 failed, 0 missing" in shown.output, shown.output


@pytest.mark.slow
def test_bench_sbatch_runs_the_orchestrator_that_fans_out(slurm_cluster, tiny_cache, tiny_sweep, debug_sweep,
                                                          sweep_records, tmp_path):
    out, log = tmp_path / "results", tmp_path / "bench.out"
    job_id = slurm_cluster.run("sbatch", "--parsable", f"--output={log}", "slurm/bench.sbatch", *tiny_sweep,
                               "--out", str(out), "--cache", tiny_cache, *SLURM, cwd=REPO).stdout.strip()
    state = finished_state(slurm_cluster, job_id, 300)
    assert state == "COMPLETED", log.read_text()[-3000:]
    assert f"records go to {out}" in log.read_text()
    assert sweep_records(out) == sweep_records(debug_sweep)
    (manifest,) = manifests(out)
    assert {run["job_id"].split("_")[0] for run in manifest["runs"]} != {job_id}  # runs were jobs of their own


@pytest.mark.slow
def test_sigkilled_run_leaves_no_record_and_the_rerun_resumes_it(slurm_cluster, tiny_cache, bench_cli, tmp_path):
    out = tmp_path / "results"
    args = ("run", *RETRAIN, "--cache", tiny_cache, "--out", str(out), *SLURM)
    run_dir = out / "tiny" / "paper" / "retrain" / f"iterations={LONG}" / "class0" / "seed0"
    watcher = RecordWatcher(run_dir / records.RECORD_NAME)
    first = subprocess.Popen([sys.executable, "-m", "bench.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO)
    wait_for((run_dir / "partial.pt").exists, WAIT_S, "the run's first checkpoint")
    (killed,) = [run["job_id"] for run in manifests(out)[0]["runs"]]
    slurm_cluster.run("scancel", "--signal=KILL", killed)
    _, stderr = first.communicate(timeout=WAIT_S)
    assert first.returncode == 1 and f"FAILED retrain [iterations={LONG}] class 0 seed 0" in stderr, stderr
    assert not (run_dir / records.RECORD_NAME).exists()
    # SLURM may say the job ended while its process is still going away; until then the run's claim is live and a
    # rerun leaves the run to it (`busy`)
    claim = run_dir / claims.CLAIM_NAME
    wait_for(lambda: claims.claim_is_stale(claim, (claims.read_claim(claim) or ("", None))[1]), 30,
             "the killed job's process gone")

    second = bench_cli(*args)
    seen = watcher.stop()
    assert second.returncode == 0, second.stdout + second.stderr
    assert seen == ["absent", "whole"]  # never half a record, and none before the run completed
    timings = records.read_record(run_dir / records.RECORD_NAME)["timings"]
    assert timings["iterations"] == LONG and timings["resumed_from_step"] >= 10, timings
    (resumed,) = [run["job_id"] for run in manifests(out)[1]["runs"]]
    text = job_log(out, resumed).read_text()
    assert "taking over abandoned claim" in text and f"resuming retrain [iterations={LONG}] class 0 seed 0" in text
    assert not (run_dir / "partial.pt").exists() and not (run_dir / claims.CLAIM_NAME).exists()


@pytest.mark.slow
def test_a_job_that_raises_is_named_with_its_log_and_the_others_finish(slurm_cluster, tiny_cache, bench_cli,
                                                                       tmp_path):
    out = tmp_path / "results"
    result = bench_cli("run", "--preset", "tiny", "--methods", "original,safemax", "--classes", "0", "--set",
                       "safemax.lr=1e30", "--cache", tiny_cache, "--out", str(out), "--no-progress", *SLURM)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED safemax [lr=1e+30] class 0 seed 0: bench.runner.NonFiniteLoss: non-finite loss" in result.stderr
    (failed_job,) = [r["job_id"] for r in manifests(out)[0]["runs"] if r["method"] == "safemax"]
    log_path = job_log(out, failed_job)
    assert f"log: {log_path}" in result.stderr and "NonFiniteLoss" in log_path.read_text()
    assert finished_state(slurm_cluster, failed_job) == "FAILED"
    assert "original default      0     0" in result.stdout and "1 run(s) done" in result.stdout
    assert [r["method"] for r in records.read_all(out)[0]] == ["original"]


@pytest.mark.slow
def test_preempted_long_run_is_requeued_and_resumes_from_its_checkpoint(slurm_cluster, tiny_cache, bench_cli,
                                                                        tmp_path):
    out = tmp_path / "results"
    submitted = bench_cli("run", *RETRAIN, "--cache", tiny_cache, "--out", str(out), *SLURM, "--no-wait")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert f"bench status --results {out}" in submitted.stdout
    (job_id,) = [run["job_id"] for run in manifests(out)[0]["runs"]]
    run_dir = out / "tiny" / "paper" / "retrain" / f"iterations={LONG}" / "class0" / "seed0"
    wait_for((run_dir / "partial.pt").exists, WAIT_S, "the run's first checkpoint")
    running = CliRunner().invoke(main, ["status", "--out", str(out)])
    assert "0 done, 0 stale, 1 running" in running.output, running.output

    slurm_cluster.run("scancel", "--signal=USR2", job_id)  # what SLURM sends before preemption or the time limit
    wait_for(lambda: slurm_cluster.run("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip() == "PENDING",
             WAIT_S, "the job requeued")
    # SLURM holds a requeued job back for cred_expire (5 s on this cluster, the least munge takes; 120 s by default):
    # the first attempt's credential is revoked until then, and forcing an earlier start (StartTime=now) got "Job
    # credential revoked". The scheduling loop that then starts it runs every second here (sched_interval=1).
    assert finished_state(slurm_cluster, job_id) == "COMPLETED"
    timings = records.read_record(run_dir / records.RECORD_NAME)["timings"]
    assert timings["iterations"] == LONG and timings["resumed_from_step"] >= 10, timings
    text = job_log(out, job_id).read_text()
    assert "checkpoint: requeueing" in text and f"resuming retrain [iterations={LONG}] class 0 seed 0" in text
    done = CliRunner().invoke(main, ["status", "--out", str(out)])
    assert "1 done, 0 stale, 0 running, 0 failed, 0 missing" in done.output, done.output


@pytest.mark.slow
def test_missing_prerequisites_are_built_by_one_job_the_array_waits_for(slurm_cluster, bench_cli, tmp_path):
    out, cache = tmp_path / "results", tmp_path / "empty-cache"
    submitted = bench_cli("run", "--preset", "tiny", "--methods", "original", "--classes", "0,1", "--out", str(out),
                          "--cache", str(cache), "--no-progress", *SLURM, "--no-wait")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    (manifest,) = manifests(out)
    (prerequisites,), runs = manifest["prerequisites_jobs"], [run["job_id"] for run in manifest["runs"]]
    assert f"the runs wait for job {prerequisites}" in submitted.stdout
    assert [finished_state(slurm_cluster, job_id) for job_id in [prerequisites, *runs]] == ["COMPLETED"] * 3

    def times(job_id: str) -> tuple[str, str]:
        start, end = slurm_cluster.run("sacct", "-n", "-X", "-P", "-o", "Start,End", "-j", job_id).stdout.split("|")
        return start.strip(), end.strip()

    assert all(times(job_id)[0] >= times(prerequisites)[1] for job_id in runs)  # ISO times sort as text
    assert len(records.read_all(out)[0]) == 2
    assert (cache / "tiny" / "base.pt").is_file()


@pytest.mark.slow
def test_each_methods_array_gets_its_own_time_limit(slurm_cluster, tiny_cache, bench_cli, tmp_path):
    config, out = tmp_path / "per-method.yaml", tmp_path / "results"
    config.write_text((REPO / "slurm" / "clusters" / "local.yaml").read_text() + "methods: {safemax: {timeout_min: 7}}\n")
    submitted = bench_cli("run", "--preset", "tiny", "--methods", "original,safemax", "--classes", "0", "--out", str(out),
                          "--cache", tiny_cache, "--no-progress", "--cluster", "slurm", "--cluster-config", str(config),
                          "--no-wait")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    (manifest,) = manifests(out)
    jobs = {run["method"]: run["job_id"] for run in manifest["runs"]}
    try:
        limits = {method: wait_for(lambda job_id=job_id: slurm_cluster.run(
            "sacct", "-n", "-X", "-P", "-o", "Timelimit", "-j", job_id, check=False).stdout.strip(), WAIT_S,
            f"job {job_id} in sacct") for method, job_id in jobs.items()}
    finally:
        slurm_cluster.run("scancel", *{job_id.split("_")[0] for job_id in jobs.values()}, check=False)
    assert limits == {"original": "00:10:00", "safemax": "00:07:00"}
    assert jobs["original"].split("_")[0] != jobs["safemax"].split("_")[0]  # two arrays
