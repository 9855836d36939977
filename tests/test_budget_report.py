"""The budget study (issue 25): the declared selection rule on synthetic rows, the study's plan, and the report's
budget curves, matched-compute table and cost columns on real records of a tiny sweep."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _study():
    spec = importlib.util.spec_from_file_location("budget_study", REPO / "scripts" / "budget_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["budget_study"] = module
    spec.loader.exec_module(module)
    return module


study = _study()
CLASSES, SEEDS = (1, 5), (0, 1)


def rows(curve: dict, value=None) -> list[dict]:
    """{iterations: (ua, retain_accuracy, fid)} -> one row per calibration (class, seed), all alike."""
    return [{"method": "m", "fraction": iterations / 1000, "iterations": iterations, "value": value, "class": c,
             "seed": s, "ua": ua, "retain_accuracy": ra, "fid": fd}
            for iterations, (ua, ra, fd) in curve.items() for c in CLASSES for s in SEEDS]


def choose(found: list[dict], original=100.0, default=None, capped=False):
    return study.choose("m", study.configurations(found, CLASSES, SEEDS), original, default, capped)


def test_a_forgetting_method_gets_the_fewest_iterations_within_five_points_of_its_best_admissible_ua():
    choice = choose(rows({30: (40.0, 100, 6.0), 100: (93.0, 99, 6.1), 300: (97.0, 98, 6.3), 1000: (99.0, 95, 7.0)}))
    assert choice.status == "forgets" and choice.best_ua == 99.0
    assert choice.chosen.iterations == 300  # 93 is 6 points below the best: not a candidate


def test_a_budget_that_breaks_retention_is_not_admissible_even_when_it_forgets_most():
    # 1,000 iterations reach UA 100 but retained accuracy 80 < 100 - 10: the best admissible UA is 90.
    choice = choose(rows({100: (60.0, 99, 6.0), 300: (90.0, 95, 6.5), 1000: (100.0, 80, 50.0)}))
    assert choice.best_ua == 90.0 and choice.chosen.iterations == 300
    assert [c.admissible for c in choice.configurations] == [True, True, False]


def test_ties_at_the_chosen_budget_go_to_the_lowest_fd_then_to_the_value_nearest_the_default():
    found = rows({100: (98.0, 99, 9.0)}, value=1.0) + rows({100: (97.0, 99, 6.0)}, value=0.01) + \
        rows({100: (96.0, 99, 6.0)}, value=0.3) + rows({30: (10.0, 100, 5.0)}, value=0.1)
    choice = choose(found, default=0.1)
    assert choice.chosen.iterations == 100 and choice.chosen.value == 0.3  # FD 6.0 twice: 0.3 is nearer 0.1


def test_a_method_that_never_forgets_keeps_its_largest_admissible_budget_and_says_so():
    choice = choose(rows({30: (0.0, 100, 6.0), 100: (1.0, 100, 6.0), 300: (3.0, 99, 6.1)}), capped=True)
    assert choice.status == "never-forgets" and choice.chosen.iterations == 300
    assert "does not forget at any budget tried" in choice.text and "CPU cap" in choice.text


def test_a_method_that_breaks_retention_everywhere_gets_its_least_damaging_configuration():
    choice = choose(rows({30: (99.0, 40, 100.0), 100: (100.0, 13, 209.0)}))
    assert choice.status == "no-retention" and choice.chosen.iterations == 30


def test_incomplete_configurations_are_not_on_the_curve_and_no_original_means_no_choice():
    found = rows({100: (95.0, 99, 6.0)}) + rows({30: (99.0, 99, 6.0)})[:3]  # 30 iterations: 3 of 4 runs
    choice = choose(found)
    assert choice.chosen.iterations == 100 and not choice.configurations[0].complete
    assert choose(found, original=None).status == "no-data"


def test_the_plan_sets_what_the_preset_would_run_at_each_fraction_and_never_above_the_paper():
    assert study.budget_overrides("digits", "safemax", 0.1) == {}  # the preset's own fraction: its default run
    assert study.budget_overrides("digits", "erasediff", 1.0) == {"iterations": 288, "outer_steps": 36,
                                                                  "ema_decay": 0.99}
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        study.budget_overrides("digits", "safemax", 1.5)
    points = study.plan("digits", ["neggrad_plus"], (0.03, 1.0), CLASSES, SEEDS, "/tmp/nowhere")
    assert [p.method for p in points][:1] == ["original"] and len(points) == 1 + 2 * 4
    variants = {p.specs[0].variant for p in points}
    assert {"iterations=30", "gamma=1.0,iterations=1000"} <= variants
