"""A real SLURM cluster (with accounting) runs sbatch jobs and submitit job arrays; failures surface, kills end.

The cluster is started once per session and stopped at the end; if it cannot start, these tests fail.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

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
        for key, value in cluster.env.items():
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
def test_submitit_surfaces_job_exception(slurm_cluster, tmp_path):
    (job,) = submit_all(slurm_executor(tmp_path / "submitit"), fail_loudly, [7])
    (finished,) = wait_all([job], progress=False, poll_s=0.5, refresh_s=2, timeout_s=WAIT_S)
    assert isinstance(finished.outcome, submitit.core.utils.FailedJobError)
    assert "ValueError: boom 7" in str(finished.outcome)
    assert finished.log_path.exists() and "boom 7" in finished.log_path.read_text()
    with pytest.raises(submitit.core.utils.FailedJobError, match="boom 7"):
        job.result()
    assert slurm_cluster.sacct_state(job.job_id) == "FAILED"


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


@pytest.mark.slow
def test_bench_sbatch_runs_the_orchestrator_as_a_job(slurm_cluster, tiny_cache, tmp_path):
    out, log = tmp_path / "results", tmp_path / "bench.out"
    job_id = slurm_cluster.run("sbatch", "--parsable", f"--output={log}", "slurm/bench.sbatch", "--preset", "tiny",
                               "--methods", "original", "--classes", "0", "--out", str(out), "--cache",
                               tiny_cache, "--no-progress", cwd=REPO).stdout.strip()
    state = wait_for(lambda: slurm_cluster.sacct_state(job_id) not in ("", "PENDING", "RUNNING")
                     and slurm_cluster.sacct_state(job_id), 600, f"bench job {job_id} finishing")
    assert state == "COMPLETED", log.read_text()[-3000:]
    assert f"records go to {out}" in log.read_text()
    assert [p.relative_to(out).parts[:3] for p in out.rglob("record.json")] == [("tiny", "paper", "original")]


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
