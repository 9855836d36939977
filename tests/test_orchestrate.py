"""The orchestrator off SLURM: the same job path for `debug` and `local`, claims that keep concurrent sweeps from
running or writing a run twice, corrupt records re-run, `--no-wait` + `bench status`, prerequisites first, resume.

The real SLURM cluster tests are in test_slurm_cluster.py.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit
import torch
from click.testing import CliRunner

from bench import claims, experiment, records, runner
from bench.cache import Cache
from bench.cli import main
from bench.config import get_preset
from bench.orchestrate import Job, run_local
from bench.prerequisites import Prerequisites, build, load_base, make_context, missing, preparation_path, prerequisites_for
from bench.status import status
from bench.sweep import Sweep, build_specs, resolve_method_config

WAIT_S = 180


def _specs(out, cache: str, method: str = "original", classes=(0,), overrides=()):
    sweep = Sweep({method: {k: [v] for k, v in overrides}} if overrides else {}, {})
    return build_specs(get_preset("tiny"), [method], list(classes), [0], sweep, results=str(out), cache=cache,
                       device="cpu", progress=False)


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _write_claim(path: Path, age_s: float = 0.0, **holder) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "pid_start": "1", "job_id": None,
                                "token": "someone-else", "since": "earlier", **holder}))
    then = time.time() - age_s
    os.utime(path, (then, then))


def _leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.name.endswith(".tmp") or "claim" in p.name or p.name == experiment.PARTIAL_NAME)


# -- one job path -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_local_jobs_give_the_same_records_as_debug_jobs(debug_sweep, tiny_cache, tiny_sweep, tmp_path, bench_cli,
                                                        sweep_records):
    # As a user starts it: no OMP_NUM_THREADS, here on two cores. submitit's local executor starts every job it is
    # given at once, so the orchestrator gives it two at a time (one per core; `bench run --methods all --classes
    # 0-9 --cluster local` started 90 processes), and each job must take a share of the cores (one thread), not
    # torch's default of every core: jobs of two spinning threads each on two cores made a digits retrain run 4x
    # slower (402 s against 95 s). The orchestrator sees GPUs 5 and 7 (there are none: the jobs run on the CPU);
    # submitit hid every GPU from local jobs (CUDA_VISIBLE_DEVICES=''), and now each running job has its own.
    out, cores = tmp_path / "results", sorted(os.sched_getaffinity(0))[:2]
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    env["CUDA_VISIBLE_DEVICES"] = "5,7"
    result = subprocess.run([sys.executable, "-m", "bench.cli", "run", *tiny_sweep, "--cache", tiny_cache, "--out",
                             str(out), "--cluster", "local"], capture_output=True, text=True, env=env, timeout=WAIT_S,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores))
    assert result.returncode == 0, result.stdout + result.stderr
    reference = sweep_records(debug_sweep)
    assert sorted(reference) == [(m, "default", c, 0) for m in ("original", "safemax") for c in (0, 1)]
    assert sweep_records(out) == reference  # same runs, and the same numbers: seeded, one thread
    assert "4 run(s) done, 0 skipped" in result.stdout
    assert "4 local job(s), at most 2 at a time, 1 CPU thread(s) each" in result.stderr
    assert "submitted 2 run(s) to local" in result.stdout and "(2 more start as these end, 2 at a time)" in result.stdout
    done = re.findall(r"\[(\d)/4\] (?:original|safemax) class \d seed 0: done \(elapsed \d+m \d+s", result.stderr)
    assert sorted(done) == ["1", "2", "3", "4"], result.stderr  # a line per finished run, with the weighted ETA
    # Never more than two jobs alive: each held-back job started after a job had written its result.
    [manifest] = (out / ".submitit").glob("submission-*.json")
    ids = [run["job_id"] for run in json.loads(manifest.read_text())["runs"]]
    assert len(set(ids)) == 4 and all(ids), ids  # the held-back jobs' ids were written in as they started
    paths = [submitit.core.utils.JobPaths(out / ".submitit", job_id) for job_id in ids]
    ends = sorted(path.result_pickle.stat().st_mtime for path in paths)
    starts = [path.submitted_pickle.stat().st_mtime for path in paths]
    assert sorted(starts)[2] >= ends[0] and sorted(starts)[3] >= ends[1], (starts, ends)
    logs = [path.stderr.read_text() for path in paths]
    gpus = [re.findall(r"CPU thread\(s\) \(the orchestrator's share for each local job\), "
                       r"CUDA_VISIBLE_DEVICES=(\d+)", log) for log in logs]
    assert gpus[:2] == [["5"], ["7"]] and all(len(gpu) == 1 for gpu in gpus), logs
    lives = [(start, path.result_pickle.stat().st_mtime) for start, path in zip(starts, paths)]
    for a in range(4):  # jobs that ran at the same time had GPUs of their own
        for b in range(a + 1, 4):
            if lives[a][0] < lives[b][1] and lives[b][0] < lives[a][1]:
                assert gpus[a] != gpus[b], (a, b, lives, gpus)
    found, _ = records.read_all(out)
    assert {r["provenance"]["device"].split(", ")[-1] for r in found} == {"1 thread)"}
    assert _leftovers(out) == []


def test_status_tells_a_held_back_local_job_from_one_whose_orchestrator_ended(tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    for name, pid in (("live", os.getpid()), ("dead", dead.pid)):
        run = {"directory": str(tmp_path / "out" / name), "method": name, "variant": "default", "forget_class": 0,
               "seed": 0, "job_id": None}  # what `bench run --cluster local` writes for a job it holds back
        payload = {"cluster": "local", "host": socket.gethostname(), "pid": pid, "runs": [run],
                   "pid_start": claims.process_start(os.getpid()) if name == "live" else "12345"}
        (jobs / f"submission-{name}.json").write_text(json.dumps(payload))
    rows = {row.method: row for row in status(tmp_path / "out", jobs)}
    assert rows["live"].state == rows["dead"].state == "missing"
    assert rows["live"].detail == f"queued: its `bench run` (pid {os.getpid()}) starts it when one of its local jobs ends"
    assert rows["dead"].detail == f"not started: its `bench run` (pid {dead.pid}) ended first; `bench run` runs it"


def test_job_checkpoint_resubmits_the_same_spec(tmp_path):
    (spec,) = _specs(tmp_path, str(tmp_path / "cache"), "retrain")
    job = Job(force=True)
    delayed = job.checkpoint(spec)
    assert delayed.function is job and delayed.args == (spec,) and not delayed.kwargs


# -- claims ---------------------------------------------------------------------------------------------------------
def test_a_held_claim_is_refused_until_released(tmp_path):
    path = tmp_path / "run" / claims.CLAIM_NAME
    claim = claims.try_claim(path, job_id="7")
    assert claim is not None and json.loads(path.read_text())["job_id"] == "7"
    assert claims.try_claim(path) is None
    claim.release()
    assert not path.exists()
    again = claims.try_claim(path)
    assert again is not None
    again.release()


def test_claim_of_a_dead_process_is_taken_over(tmp_path):
    path = tmp_path / "run" / claims.CLAIM_NAME
    _write_claim(path)
    claim = claims.try_claim(path)
    assert claim is not None and json.loads(path.read_text())["pid"] == os.getpid()
    claim.release()


def test_claim_from_another_host_is_stale_only_when_its_heartbeat_stopped(tmp_path):
    path = tmp_path / "run" / claims.CLAIM_NAME
    _write_claim(path, host="another-node", pid=1)
    assert claims.try_claim(path) is None
    _write_claim(path, age_s=claims.STALE_AFTER_S + 5, host="another-node", pid=1)
    claim = claims.try_claim(path)
    assert claim is not None
    claim.release()


def test_requeued_job_takes_over_its_own_claim(tmp_path):
    path = tmp_path / "run" / claims.CLAIM_NAME
    _write_claim(path, host="another-node", pid=1, job_id="42_3")
    assert claims.try_claim(path, job_id="42_4") is None
    claim = claims.try_claim(path, job_id="42_3")
    assert claim is not None
    claim.release()


def _race_for_claim(path: str, barrier, winners) -> None:
    if claims.try_claim(path) is not None:
        winners.put(os.getpid())
    barrier.wait(30)  # hold any claim until everyone has tried


def test_an_abandoned_claim_is_taken_over_by_exactly_one_process(tmp_path):
    path = tmp_path / "run" / claims.CLAIM_NAME
    _write_claim(path)
    context = multiprocessing.get_context("fork")
    barrier, winners = context.Barrier(4), context.Queue()
    procs = [context.Process(target=_race_for_claim, args=(str(path), barrier, winners)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    won = [winners.get(timeout=5) for _ in range(winners.qsize())]
    assert len(won) == 1, won
    assert json.loads(path.read_text())["pid"] == won[0]


@pytest.mark.slow
def test_two_orchestrators_on_one_folder_run_each_run_exactly_once(tmp_path, tiny_cache):
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "bench.cli", "run", "--preset", "tiny", "--methods", "safemax", "--classes",
            "0-3", "--set", "safemax.iterations=40", "--cache", tiny_cache, "--out", str(out), "--no-progress",
            "--cluster", "debug"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=WAIT_S) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    done = [int(re.search(r"(\d+) run\(s\) done", stdout).group(1)) for stdout, _ in outputs]
    assert sum(done) == 4, outputs  # a run done by both would count twice
    found, corrupt = records.read_all(out)
    assert not corrupt and sorted(r["forget_class"] for r in found) == [0, 1, 2, 3]
    assert _leftovers(out) == []


# -- corrupt records, status --------------------------------------------------------------------------------------
def test_corrupt_record_is_named_by_status_and_rerun(tmp_path, tiny_cache, caplog):
    out = tmp_path / "results"
    common = ("run", "--preset", "tiny", "--methods", "original", "--classes", "0", "--cache", tiny_cache,
              "--out", str(out), "--device", "cpu", "--no-progress")
    assert _invoke(*common).exit_code == 0
    (path,) = out.rglob(records.RECORD_NAME)
    path.write_text('{"schema": 1, "metr')
    shown = _invoke("status", "--out", str(out))
    assert shown.exit_code == 0 and f"failed   {path}: unreadable record" in shown.output
    assert "0 done, 0 stale, 0 running, 1 failed, 0 missing" in shown.output
    with caplog.at_level("WARNING", logger="bench.orchestrate"):
        rerun = _invoke(*common, "--cluster", "debug")
    assert rerun.exit_code == 0, rerun.output
    assert any(str(path) in message and "corrupt" in message for message in caplog.messages), caplog.messages
    assert "1 run(s) done, 0 skipped" in rerun.output
    assert records.read_record(path)["method"] == "original"


@pytest.mark.slow
def test_no_wait_submits_and_status_follows_to_done_and_failed(tmp_path, tiny_cache, bench_cli):
    out = tmp_path / "results"
    result = bench_cli("run", "--preset", "tiny", "--methods", "original,safemax", "--classes", "0", "--set",
                       "safemax.lr=1e30", "--cache", tiny_cache, "--out", str(out), "--cluster", "local",
                       "--no-wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"check progress with: bench status --results {out}" in result.stdout
    first = status(out, out / ".submitit")
    assert [(r.method, r.state in ("running", "done", "failed")) for r in first] == [("original", True),
                                                                                      ("safemax", True)]
    deadline = time.monotonic() + WAIT_S
    while any(r.state == "running" for r in status(out, out / ".submitit")) and time.monotonic() < deadline:
        time.sleep(1)
    shown = _invoke("status", "--out", str(out))
    assert "1 done, 0 stale, 0 running, 1 failed, 0 missing" in shown.output, shown.output
    (failed,) = [line for line in shown.output.splitlines() if line.startswith("safemax")]
    assert "NonFiniteLoss" in failed
    log_path = Path(failed.rsplit("log ", 1)[1])
    assert log_path.is_file() and "NonFiniteLoss" in log_path.read_text()


def test_cluster_options_are_checked_before_any_work(tmp_path):
    common = ("run", "--preset", "tiny", "--methods", "original", "--classes", "0", "--out",
              str(tmp_path / "results"), "--cache", str(tmp_path / "cache"))
    no_config = _invoke(*common, "--cluster", "slurm")
    assert no_config.exit_code != 0 and "--cluster-config" in no_config.output and "example" in no_config.output
    unknown = _invoke(*common, "--cluster", "slurm", "--cluster-config", "nosuchcluster")
    assert unknown.exit_code != 0 and "nosuchcluster" in unknown.output and "local" in unknown.output
    assert _invoke(*common, "--no-wait").exit_code != 0
    debug = _invoke(*common, "--cluster", "debug", "--no-wait")
    assert debug.exit_code != 0 and "debug" in debug.output
    assert not (tmp_path / "cache").exists()


# -- prerequisites, resume ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_prerequisites_are_built_by_one_job_first_and_not_again(tmp_path):
    out, cache = tmp_path / "results", tmp_path / "cache"
    common = ("run", "--preset", "tiny", "--methods", "original", "--out", str(out), "--cache", str(cache),
              "--device", "cpu", "--no-progress", "--cluster", "debug")
    assert _invoke(*common, "--classes", "0,1").exit_code == 0
    assert _invoke(*common, "--classes", "0,1", "--force").exit_code == 0
    assert _invoke(*common, "--classes", "2").exit_code == 0
    manifests = sorted((out / ".submitit").glob("submission-*.json"), key=lambda p: p.stat().st_mtime)
    first, again, new_class = (json.loads(p.read_text()) for p in manifests)
    assert first["prerequisites_jobs"] and len(first["runs"]) == 2
    assert again["prerequisites_jobs"] == [] and len(again["runs"]) == 2  # all cached: no job
    assert new_class["prerequisites_jobs"]  # class 2's FID reference statistics are not cached yet
    assert (cache / "tiny" / "base.pt").is_file() and (cache / "tiny" / "classifier.pt").is_file()


def test_prerequisites_wait_while_another_process_builds_them(tmp_path, tiny_cache):
    cache = tmp_path / "cache"
    (cache / "tiny").mkdir(parents=True)
    for name in ("base.pt", "classifier.pt"):  # the FID statistics are missing: the step has work to do
        shutil.copy(Path(tiny_cache) / "tiny" / name, cache / "tiny" / name)
    task = Prerequisites("tiny", str(cache), device="cpu", progress=False,
                         specs=tuple(_specs(tmp_path / "out", str(cache))))
    holder = subprocess.Popen(["sleep", "60"])
    claim_path = cache / "tiny" / "prepare.claim.json"
    try:
        claim_path.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                          "pid_start": claims.process_start(holder.pid), "token": "builder"}))
        result = {}
        waiter = threading.Thread(target=lambda: result.update(build(task)))
        waiter.start()
        time.sleep(1.5)
        assert waiter.is_alive() and not result  # waits while the builder lives
    finally:
        holder.kill()
        holder.wait()
    waiter.join(60)
    assert result["base"] == str(cache / "tiny" / "base.pt") and result["built"] == ["FID reference statistics"]
    assert not claim_path.exists() and missing(task) == []


def test_a_complete_read_only_cache_is_used_without_writing(tmp_path, tiny_cache):
    cache = tmp_path / "cache"
    shutil.copytree(Path(tiny_cache), cache)
    specs = _specs(tmp_path / "out", str(cache))
    (task,) = prerequisites_for(specs)
    build(task)  # complete it: FID statistics of class 0
    for path in [cache, *cache.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        assert build(task)["built"] == []  # no claim file written, nothing built
        (outcome,) = run_local(specs)
        assert outcome.status == "done"
    finally:
        for path in [cache, *cache.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_interrupted_run_resumes_to_the_requested_step_count(tmp_path, tiny_cache, monkeypatch):
    (spec,) = _specs(tmp_path, tiny_cache, "retrain", overrides=[("iterations", 30)])
    saves = []
    real_save = runner.atomic_save

    def save_then_die(payload, path):
        real_save(payload, path)
        saves.append(payload["step"])
        raise KeyboardInterrupt("killed after the first checkpoint")

    monkeypatch.setattr(runner, "atomic_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Job()(spec)
    assert saves == [10] and (spec.directory / experiment.PARTIAL_NAME).exists()
    assert not (spec.directory / records.RECORD_NAME).exists()
    monkeypatch.setattr(runner, "atomic_save", real_save)
    (outcome,) = run_local([spec])
    timings = outcome.record["timings"]
    assert (outcome.status, timings["iterations"], timings["resumed_from_step"]) == ("done", 30, 10)
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_shared_preparation_is_built_once_before_the_runs(tmp_path, tiny_cache):
    """SA's priors and Fisher are built by the prerequisites step, once for all forget classes and variants alike;
    the FID reference statistics once per forget class, for every method alike."""
    from bench.sweep import parse_sets

    cache = tmp_path / "cache"
    (cache / "tiny").mkdir(parents=True)
    for name in ("base.pt", "classifier.pt"):  # only these: other tests add preparations to the shared cache
        shutil.copy(Path(tiny_cache) / "tiny" / name, cache / "tiny" / name)
    sweep = parse_sets(["sa.lam=1,2"], ["sa", "safemax"])
    specs = build_specs(get_preset("tiny"), ["sa", "safemax"], [0, 1, 2], [0], sweep, results=str(tmp_path / "out"),
                        cache=str(cache), device="cpu", progress=False)
    (task,) = prerequisites_for(specs)
    assert missing(task) == ["sa preparation"]  # one preparation whatever the class or the EWC weight
    build(task)
    assert missing(task) == []
    references = sorted((cache / "tiny" / "fid-reference").glob("*.npz"))
    assert [path.name.split("-retain")[1][0] for path in references] == ["0", "1", "2"]
    reference_stamps = [path.stat().st_mtime_ns for path in references]
    (prepared,) = (cache / "tiny" / "prepared" / "sa").rglob("*.pt")
    preset, base = get_preset("tiny"), load_base(get_preset("tiny"), Cache(str(cache)))
    cls, config, _ = resolve_method_config(preset, "sa")
    method = cls(config, make_context(preset, Cache(str(cache)), base, 2, 0, torch.device("cpu"), False))
    assert preparation_path(Cache(str(cache)), method, base["id"]) == prepared
    stamp = prepared.stat().st_mtime_ns
    outcomes = run_local([s for s in specs if s.method == "sa"][:2])
    assert all(o.status == "done" for o in outcomes)
    assert prepared.stat().st_mtime_ns == stamp  # the runs reused it
    assert [path.stat().st_mtime_ns for path in references] == reference_stamps
    assert sorted((cache / "tiny" / "fid-reference").glob("*.npz")) == references  # and made none of their own
