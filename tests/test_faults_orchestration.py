"""The orchestrator's end of a fault: no leaked-semaphore warning after a worker sweep, a record that wins over the
failure marker of a worker that died after writing it, a failure that says where it was raised (a plug-in's own
file and line), and one rule for interruptions: exit 130, a summary of what finished, `interrupted` in
`bench status` for runs and attacks alike (issue 24 items 3, 4, 5, 12)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import claims, orchestrate, records, workers
from bench.cli import main
from bench.config import get_preset
from bench.sweep import build_specs, parse_sets
from tests.conftest import start_bench

TINY = ("--preset", "tiny", "--device", "cpu", "--no-progress")
WAIT_S = 240


def _invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def _spec(out: Path, cache: str, method: str = "original", forget_class: int = 0, save_model: bool = False,
          sets: tuple[str, ...] = ()):
    (spec,) = build_specs(get_preset("tiny"), [method], [forget_class], [0], parse_sets(sets, [method]),
                          results=str(out), cache=cache, device="cpu", progress=False, save_model=save_model)
    return spec


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory, tiny_cache) -> Path:
    """`original` on forget classes 0 and 1 of tiny, models saved (what attacks need); its results folder."""
    out = tmp_path_factory.mktemp("saved-runs")
    result = _invoke("run", *TINY, "--methods", "original", "--classes", "0,1", "--save-model", "--cache", tiny_cache,
                     "--out", out)
    assert result.exit_code == 0, result.output
    return out


def _copy(saved_runs: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved_runs, tmp_path / "results")
    return tmp_path / "results"


# -- item 3: a worker sweep ends without a resource-tracker warning ----------------------------------------------------
@pytest.mark.slow
def test_a_worker_sweep_ends_without_a_leaked_semaphore_warning(tiny_cache, tmp_path, bench_cli):
    result = bench_cli("run", *TINY, "--methods", "original,safemax", "--classes", "0", "--workers", "2",
                       "--cache", tiny_cache, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "in 2 worker processes" in result.stderr
    assert "leaked semaphore" not in result.stderr and "resource_tracker" not in result.stderr, result.stderr


# -- item 4: a record wins over a failure marker ------------------------------------------------------------------------
def test_a_worker_that_died_after_writing_its_record_leaves_the_run_done(saved_runs, tiny_cache, tmp_path):
    out = _copy(saved_runs, tmp_path)
    spec = _spec(out, tiny_cache, save_model=True)
    dead = multiprocessing.get_context("spawn").Process(target=os._exit, args=(9,))  # a worker that died
    dead.start()
    outcome = workers.WorkerPool._died(spec, dead)
    assert outcome.status == "done" and outcome.record["forget_class"] == 0
    assert not (spec.directory / records.FAILURE_NAME).exists()  # was: failure.json beside the good record
    # a marker an earlier attempt left beside a valid record: status says done, not failed
    records.write_failure(spec.directory, "RuntimeError: an earlier attempt")
    shown = _invoke("status", "--results", out).output
    assert "2 done, 0 stale, 0 running, 0 failed" in shown, shown


def test_a_finished_run_removes_the_markers_of_earlier_attempts(tiny_cache, tmp_path):
    spec = _spec(tmp_path, tiny_cache)
    records.write_failure(spec.directory, "RuntimeError: an earlier attempt")
    (outcome,) = orchestrate.run_local([spec], show_progress=False)
    assert outcome.status == "done"
    assert not (spec.directory / records.FAILURE_NAME).exists()
    records.write_interrupted(spec.directory, "stopped")  # an interruption after the record: the record wins
    assert records.read_failure(spec.directory) is None
    assert "1 done" in _invoke("status", "--results", tmp_path).output


# -- item 5: where a failure was raised --------------------------------------------------------------------------------
BROKEN = '''
"""A plug-in method whose loss raises: its file and line must reach failure.json and `bench status`."""
from methods.gradient_ascent import GradientAscent


class Broken(GradientAscent):
    name = "broken"
    description = "raises in its loss"

    def loss(self, model, batch):
        raise ValueError("the loss of a broken method")  # line 11
'''


@pytest.mark.slow
def test_a_plugin_methods_failure_names_its_own_file_and_line(tiny_cache, tmp_path, bench_cli):
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "brokenmethod.py").write_text(BROKEN)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "plug"), os.environ.get("PYTHONPATH", "")])}
    where = f"{tmp_path / 'plug' / 'brokenmethod.py'}:11 in loss"
    for out, how in ((tmp_path / "here", ("--classes", "0")), (tmp_path / "workers", ("--classes", "0,1", "--workers",
                      "2")), (tmp_path / "jobs", ("--classes", "0", "--cluster", "debug"))):  # here, workers, jobs
        result = bench_cli("--method-module", "brokenmethod:Broken", "run", *TINY, "--methods", "broken", *how,
                           "--cache", tiny_cache, "--out", str(out), env=env)
        assert result.returncode == 1, result.stdout + result.stderr
        failed = [line for line in result.stderr.splitlines() if line.startswith("FAILED")]
        assert failed and all(where in line for line in failed), result.stderr
        failure = json.loads(next(out.rglob(records.FAILURE_NAME)).read_text())
        assert failure["where"] == where and failure["traceback"][-1] == where
        assert len(failure["traceback"]) <= 5 and "the loss of a broken method" in failure["traceback_text"]
        shown = _invoke("status", "--results", out).output
        assert f"ValueError: the loss of a broken method at {where}" in shown, shown


# -- item 12: interrupted is exit 130, a summary, and a state of its own -----------------------------------------------
def _wait_for_claims(folders: list[Path], deadline: float) -> None:
    """Until each folder (a run's, or the attack's folder of a run) holds a claim at any depth."""
    while time.monotonic() < deadline:
        if all(next(folder.rglob(claims.CLAIM_NAME), None) for folder in folders):
            time.sleep(1.0)  # into the loop
            return
        time.sleep(0.2)
    raise AssertionError(f"no claim appeared in {folders}")


def _stop(process: subprocess.Popen, folders: list[Path], how: signal.Signals) -> tuple[str, str]:
    try:
        _wait_for_claims(folders, time.monotonic() + WAIT_S)
        os.killpg(process.pid, how)
        return process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


@pytest.mark.slow
@pytest.mark.parametrize(("attack", "options", "classes", "workers"), [
    ("relearn", ("--schedule", "0,100000"), "0,1", "2"),
    ("embedding", ("--steps", "100000", "--targets", "embedding"), "0", "1"),
], ids=["relearn-workers", "embedding-here"])
@pytest.mark.slow
def test_ctrl_c_of_an_attack_exits_130_and_status_shows_it_interrupted(saved_runs, tiny_cache, tmp_path, attack,
                                                                       options, classes, workers):
    out = _copy(saved_runs, tmp_path)
    process = start_bench("attack", attack, *TINY, "--methods", "original", "--classes", classes, *options,
                     "--workers", workers, "--cache", tiny_cache, "--out", out)
    folders = [_spec(out, tiny_cache, forget_class=int(c)).directory / "attacks" / attack for c in classes.split(",")]
    stdout, stderr = _stop(process, folders, signal.SIGINT)  # was: exit 0 (workers), 1 with "Aborted!" (here)
    assert process.returncode == 130, stdout + stderr
    count = len(folders)
    assert f"attacks: 0 done, 0 skipped, 0 busy, 0 failed, {count} interrupted" in stdout, stdout + stderr
    assert len([line for line in stderr.splitlines() if line.startswith("interrupted")]) == count, stderr
    assert "leaked semaphore" not in stderr  # nor from the workers it stopped
    shown = _invoke("status", "--results", out).output
    assert f"attacks: 0 done, 0 stale, 0 running, 0 failed, 0 missing, {count} interrupted" in shown, shown
    assert not list(out.rglob(records.FAILURE_NAME))  # stopped, not failed


@pytest.mark.slow
def test_sigterm_of_a_run_exits_130_and_status_shows_it_interrupted(tiny_cache, tmp_path):
    process = start_bench("run", *TINY, "--methods", "safemax", "--classes", "0", "--set", "safemax.iterations=100000",
                     "--cache", tiny_cache, "--out", tmp_path)
    folder = _spec(tmp_path, tiny_cache, "safemax", sets=("safemax.iterations=100000",)).directory
    stdout, stderr = _stop(process, [folder], signal.SIGTERM)  # was: killed outright, nothing said
    assert process.returncode == 130, stdout + stderr
    assert "0 run(s) done" in stdout and "1 not finished (stopped)" in stdout, stdout
    assert "running 1 run(s) in this process, malloc: tcmalloc" in stderr  # the bench script's restart (bench.allocator)
    shown = _invoke("status", "--results", tmp_path).output
    assert re.search(r"interrupted +stopped by Ctrl-C or SIGTERM", shown), shown
    assert "0 failed, 0 missing, 1 interrupted" in shown, shown


def test_an_interrupted_attack_of_bench_run_attacks_exits_130_with_the_run_done(tiny_cache, tmp_path, monkeypatch):
    def interrupted(spec, fresh=False):
        raise KeyboardInterrupt  # Ctrl-C in the attack, after the run's record

    monkeypatch.setattr(orchestrate, "attack_one", interrupted)
    result = _invoke("run", *TINY, "--methods", "original", "--classes", "0", "--attacks", "relearn", "--cache",
                     tiny_cache, "--out", tmp_path)
    assert result.exit_code == 130, result.output  # was: the run counted as not finished
    assert "1 run(s) done" in result.output and "0 failed, 1 interrupted" in result.output, result.output
    (marker,) = tmp_path.rglob(records.INTERRUPTED_NAME)
    assert marker.parent.parent.name == "relearn"
