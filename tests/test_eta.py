"""A sweep's ETA weighs each run by the iterations it will train, read off the records of the runs that finished."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench import eta
from bench.attacks import AttackSpec
from bench.orchestrate import Outcome
from bench.sweep import RunSpec


@pytest.fixture
def clock(monkeypatch):
    now = SimpleNamespace(t=0.0)
    monkeypatch.setattr(eta, "time", SimpleNamespace(perf_counter=lambda: now.t))
    return now


def spec(method: str, forget_class: int = 0, **sets) -> RunSpec:
    return RunSpec("tiny", method, forget_class, 0, "results", method_overrides=tuple(sets.items()))


def done(run: RunSpec, total_s: float, rte_s: float, iterations: int, resumed_from_step: int = 0) -> Outcome:
    return Outcome(run, "done", {"timings": {"total_s": total_s, "rte_s": rte_s, "iterations": iterations,
                                             "resumed_from_step": resumed_from_step}})


def test_planned_iterations_follow_the_preset_and_the_overrides():
    assert eta.planned_iterations(spec("original")) == 0
    assert eta.planned_iterations(spec("safemax", iterations=40)) == 40
    assert eta.planned_iterations(spec("no-such-method")) is None  # the run itself reports that, not the ETA


def test_runs_are_weighed_by_their_iterations_not_counted(clock):
    # make run's order: the cheap original runs first, then the methods that train
    todo = [spec("original", 0), spec("original", 1), spec("safemax", 0, iterations=100),
            spec("safemax", 1, iterations=100), spec("sa", 0, iterations=600)]
    sweep = eta.SweepEta(todo, workers=1)
    assert sweep.text() == ""
    sweep.begun(0)
    clock.t = 5.0
    sweep.ended(0, done(todo[0], total_s=5.0, rte_s=0.0, iterations=0))
    # one original took 5 s; the runs that train have no weight yet, so the four left (5 s each for the evaluation
    # alone) give a lower bound
    assert sweep.left_text() == "> 0m 20s"
    sweep.begun(2)
    clock.t = 30.0
    sweep.ended(2, done(todo[2], total_s=25.0, rte_s=12.0, iterations=100))
    # original 5 s; safemax 13 + 100 x 0.12 = 25 s; sa 13 + 600 x 0.12 (the slowest rate seen) = 85 s
    assert sweep.left_text() == "1m 55s"
    assert sweep.text() == " (elapsed 0m 30s, ETA 1m 55s)"
    # counting runs would have said 30 s / 2 x 3 = 45 s


def test_two_workers_share_the_work_and_a_run_in_progress_counts_what_it_has_left(clock):
    todo = [spec("safemax", c, iterations=100) for c in range(4)]
    sweep = eta.SweepEta(todo, workers=2)
    sweep.begun(0), sweep.begun(1)
    clock.t = 20.0
    sweep.ended(0, done(todo[0], total_s=20.0, rte_s=10.0, iterations=100))  # 10 s outside + 0.1 s per iteration
    sweep.begun(2)
    # run 1 has run for 20 of its 20 s, so its worker takes run 3 (20 s) while run 2 (begun now) takes 20 s
    assert sweep.left_text() == "0m 20s"
    clock.t = 30.0  # run 2 has 10 s left; run 1 overran and still holds its worker: run 3 starts when it ends
    assert sweep.left_text() == "0m 20s"
    sweep.ended(2, done(todo[2], total_s=10.0, rte_s=5.0, iterations=100))  # run 2 was quicker than thought
    # the estimates are medians now (7.5 s outside, 0.075 s per iteration: 15 s a run); runs 1 and 3 are left, one
    # running for 30 s already, and the last one starts on the free worker: it ends last, 15 s from now
    assert sweep.left_text() == "0m 15s"


def test_the_last_long_runs_are_not_shared_between_workers(clock):
    todo = [spec("safemax", 0, iterations=100), spec("safemax", 1, iterations=100), spec("retrain", 0)]
    sweep = eta.SweepEta(todo, workers=2)
    assert sweep.planned[2] == eta.planned_iterations(todo[2]) > 0
    sweep.begun(0), sweep.begun(1)
    clock.t = 20.0
    sweep.ended(0, done(todo[0], total_s=20.0, rte_s=10.0, iterations=100))
    sweep.ended(1, done(todo[1], total_s=20.0, rte_s=10.0, iterations=100))
    # retrain runs alone on one worker: its whole time (10 s outside + its iterations at 0.1 s), not half of it
    assert sweep.left_text() == eta.duration(10.0 + sweep.planned[2] * 0.1)


def test_a_resumed_run_teaches_the_rate_of_the_iterations_it_trained(clock):
    todo = [spec("safemax", 0, iterations=100), spec("safemax", 1, iterations=100)]
    sweep = eta.SweepEta(todo)
    sweep.begun(0)
    sweep.ended(0, done(todo[0], total_s=15.0, rte_s=5.0, iterations=100, resumed_from_step=50))
    assert sweep.left_text() == "0m 20s"  # 10 s outside + 100 x (5 s / 50)


def test_without_any_record_it_counts_runs(clock):
    todo = [spec("safemax", c) for c in range(3)]
    sweep = eta.SweepEta(todo)
    sweep.begun(0)
    clock.t = 12.0
    sweep.ended(0, Outcome(todo[0], "failed", error="boom"))
    assert sweep.text() == " (elapsed 0m 12s, ETA 0m 24s)"


def test_attacks_in_a_worker_pool_are_counted(clock):
    """`bench attack --workers N` hands the pool attacks, which have no method or iterations of their own."""
    todo = [AttackSpec(spec("original", c), "relearn") for c in range(3)]
    sweep = eta.SweepEta(todo, workers=2)
    assert sweep.planned == [None] * 3
    sweep.begun(0), sweep.begun(1)
    clock.t = 10.0
    sweep.ended(0, Outcome(todo[0], "done", {"attack": "relearn"}))
    assert sweep.text() == " (elapsed 0m 10s, ETA 0m 20s)"
