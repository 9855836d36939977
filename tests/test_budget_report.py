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
    # The preset's own budget (the study's choice: SAFEMax 0.1x, EraseDiff 1.0x) is its default run; the other
    # fractions are read from the preset as it was before the choice (iteration_scale 0.1, no budgets).
    assert study.budget_overrides("digits", "safemax", 0.1) == {}
    assert study.budget_overrides("digits", "erasediff", 1.0) == {}
    assert study.budget_overrides("digits", "erasediff", 0.1) == {"iterations": 32, "outer_steps": 4,
                                                                  "ema_decay": 0.913517}
    assert study.budget_overrides("digits", "sa", 0.1) == {"iterations": 2000, "ema_decay": 0.999}
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        study.budget_overrides("digits", "safemax", 1.5)
    points = study.plan("digits", ["neggrad_plus"], (0.03, 1.0), CLASSES, SEEDS, "/tmp/nowhere")
    assert [p.method for p in points][:1] == ["original"] and len(points) == 1 + 2 * 4
    variants = {p.specs[0].variant for p in points}
    assert {"iterations=30", "gamma=1.0,iterations=1000"} <= variants


# --- the report: real records of a tiny sweep -------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep_results(tmp_path_factory, tiny_cache, bench_cli):
    """SAFEMax on the tiny preset at iterations 1, 2, 4 (a sweep) and at its default (3), classes 0 and 1."""
    results = tmp_path_factory.mktemp("budget-sweep")
    common = ("--preset", "tiny", "--methods", "safemax", "--classes", "0,1", "--device", "cpu", "--no-progress",
              "--cache", tiny_cache, "--results", str(results))
    for extra in (("--set", "safemax.iterations=1,2,4"), ()):
        done = bench_cli("run", *common, *extra)
        assert done.returncode == 0, done.stderr[-2000:]
    return results


@pytest.mark.slow
def test_bench_report_draws_budget_curves_and_the_matched_compute_table_from_a_sweep(sweep_results, tmp_path,
                                                                                     bench_cli):
    out = tmp_path / "report"
    done = bench_cli("report", "--results", str(sweep_results), "--report-dir", str(out), "--no-figure1")
    assert done.returncode == 0, done.stderr[-2000:]
    folder = out / "tiny" / "paper"
    assert (folder / "figures" / "budget_curves.png").stat().st_size > 0
    matched = (folder / "tables" / "matched_compute.md").read_text()
    # SAFEMax's own curve passes through its default run (3 iterations): the point nearest its FLOPs, ratio 1.
    row = next(line for line in matched.splitlines() if line.startswith("| SAFEMax"))
    assert row.split("|")[2].strip() == "3" and row.split("|")[4].strip() == "1×", row
    assert "Budget curves" in (out / "report.html").read_text()
    table2 = (folder / "tables" / "table2.md").read_text()
    assert "train TFLOPs" in table2 and "eval TFLOPs" in table2
    assert {"flops.train", "flops.evaluate"} <= set((out / "runs.csv").read_text().splitlines()[0].split(","))
    # which rule chose each run's budget: the sweep's values are the user's --set, the default run the preset's
    import pandas as pd

    runs = pd.read_csv(out / "runs.csv")
    chosen = dict(zip(runs["variant"], runs["budget.chosen_by"]))
    assert chosen["default"] == "iteration_scale" and chosen["iterations=1"] == "override", chosen


def test_runs_without_a_sweep_give_no_budget_curves(sweep_results):
    from bench.records import read_all
    from reports.budget import find_curves
    from reports.frame import runs_frame

    records = read_all(sweep_results)[0]
    assert find_curves(runs_frame([r for r in records if r["variant"] == "default"])) == []
    curves = find_curves(runs_frame(records))
    assert [(c.method, c.axis, sorted(c.runs["_x"].unique())) for c in curves] == [("safemax", "iterations", [1, 2, 3, 4])]


def test_table2_shows_flops_and_their_ratio_and_old_records_read_as_na(sweep_results):
    import copy

    from bench.records import read_all
    from reports.frame import runs_frame
    from reports.tables import build_tables, make_grid

    records = [r for r in read_all(sweep_results)[0] if r["variant"] == "default"]
    assert records[0]["timings"]["flops"]["train"] > 0
    other = copy.deepcopy(records)
    for record in other:  # a second method at twice the FLOPs
        record["method"], record["timings"]["flops"]["train"] = "salun", 2 * record["timings"]["flops"]["train"]
    old = copy.deepcopy(records)
    for record in old:  # a record made before FLOPs and loads were recorded
        record["method"] = "ga"
        del record["timings"]["flops"], record["timings"]["load_average"]
    df = runs_frame(records + other + old)
    table2 = build_tables(df, make_grid(df, "tiny", "paper", "R"))[1]
    columns = [metric for _, _, metric in table2.columns]
    ga_flops = [cells[i].text for _, cells in table2.rows[:1] for i, m in enumerate(columns) if m == "train_tflops"]
    assert ga_flops[1] == "n/a"  # method order: salun, ga, safemax
    ratios = next(note for note in table2.notes if note.startswith("Cost relative to SAFEMax"))
    assert "SalUn" in ratios and "2× in FLOPs" in ratios and "GA" in ratios and "n/a in FLOPs" in ratios


def test_runs_timed_under_clearly_different_loads_are_named(sweep_results):
    """Records without a CPU share (GPU runs, older records) are judged by the load average at their start."""
    import copy

    from bench.records import read_all
    from reports.frame import runs_frame
    from reports.tables import load_note

    records = copy.deepcopy(read_all(sweep_results)[0])
    for index, record in enumerate(records):
        del record["timings"]["train_cpu_s"]  # as recorded before CPU seconds were
        record["timings"]["load_average"] = {"start": [0.5 if index else 6.0, 0, 0], "end": [0.5, 0, 0]}
    note = load_note(runs_frame(records))
    assert "different loads" in note and "0.50 to 6.00" in note
    for record in records:
        record["timings"]["load_average"]["start"][0] = 1.1
        record["provenance"]["cores"] = 2
    assert load_note(runs_frame(records)) == ""
    for record in records:  # alike, but more runnable processes than cores: every RTE is inflated
        record["timings"]["load_average"]["start"][0] = 3.0
    note = load_note(runs_frame(records))
    assert note.startswith("Timed on a busy machine:") and f"{len(records)} of {len(records)} runs" in note


def test_a_cpu_run_is_called_slowed_by_the_cpu_time_its_loop_got_not_by_the_load_of_the_sweeps_own_workers(
        sweep_results):
    """`make run` keeps a 2-core machine's load at 2.0-2.2 with its own two one-thread workers, each of which gets
    its core: no note. A run whose loop got half its thread's time was slowed, whatever the load said."""
    import copy

    import torch

    from bench.device import device_name
    from bench.records import read_all
    from reports.frame import runs_frame
    from reports.tables import load_note

    records = copy.deepcopy(read_all(sweep_results)[0])
    assert records and all(r["provenance"]["device"].startswith("cpu (") for r in records)
    for record in records:
        timings = record["timings"]
        timings["load_average"] = {"start": [2.07, 2.0, 2.0], "end": [2.0, 2.0, 2.0]}
        timings["train_cpu_s"] = 0.98 * timings["rte_s"]
        record["provenance"].update(cores=2, device="cpu (AMD EPYC, 1 thread)")
    frame = runs_frame(records)
    assert frame["cpu_share"].round(6).eq(0.98).all()
    assert load_note(frame) == ""
    records[0]["timings"]["train_cpu_s"] = 0.45 * records[0]["timings"]["rte_s"]
    note = load_note(runs_frame(records))
    assert note.startswith("Timed on a busy machine:") and f"1 of {len(records)} timed runs" in note
    assert "as little as 45%" in note and "runnable processes" not in note
    # Two threads: the share is of both threads' time
    records[0]["provenance"]["device"] = "cpu (AMD EPYC, 2 threads)"
    records[0]["timings"]["train_cpu_s"] = 1.9 * records[0]["timings"]["rte_s"]
    assert runs_frame(records)["cpu_share"][0] == pytest.approx(0.95) and load_note(runs_frame(records)) == ""
    # The share is read from what `bench.device` writes, and not for a GPU or a resumed loop
    assert runs_frame([{**records[1], "provenance": {**records[1]["provenance"],
                                                     "device": device_name(torch.device("cpu"))}}])[
        "cpu_share"].notna().all()
    for change in ({"provenance": {**records[1]["provenance"], "device": "NVIDIA H100 80GB HBM3"}},
                   {"timings": {**records[1]["timings"], "resumed_from_step": 2}}):
        assert runs_frame([{**records[1], **change}])["cpu_share"].isna().all()


def test_the_tradeoff_axis_goes_logarithmic_and_names_an_outlier_fd(sweep_results):
    import copy

    from bench.records import read_all
    from reports.figures import tradeoff_figure
    from reports.frame import runs_frame
    from reports.tables import make_grid

    base = [r for r in read_all(sweep_results)[0] if r["variant"] == "default"]
    records = []
    for method, fd in (("safemax", 6.0), ("salun", 16.0), ("sa", 9.0), ("ga", 209.0)):
        for record in copy.deepcopy(base):
            record["method"], record["metrics"]["fid"] = method, fd + record["forget_class"] * 0.1
            records.append(record)
    df = runs_frame(records)
    figure = tradeoff_figure(df, make_grid(df, "tiny", "paper", "R"))
    assert figure.figure.axes[0].get_xscale() == "log"
    assert "logarithmic because GA 209" in figure.caption


@pytest.mark.slow
def test_the_study_runs_its_grid_through_bench_run_stops_at_the_cpu_cap_resumes_and_selects(tiny_cache, tmp_path):
    import subprocess

    results = str(tmp_path / "study")
    common = ["--preset", "tiny", "--methods", "safemax", "--fractions", "0.001,0.002", "--classes", "0", "--seeds",
              "0", "--results", results]

    def script(*args):
        return subprocess.run([sys.executable, str(REPO / "scripts" / "budget_study.py"), *args], capture_output=True,
                              text=True, timeout=300, cwd=REPO, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})

    done = script("run", *common, "--cache", tiny_cache, "--device", "cpu", "--max-run-seconds", "1e-9")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "safemax: curve stops below fraction 0.002 (2 iterations)" in done.stdout
    ran = sorted(p.parent.parent.parent.name for p in Path(results).rglob("record.json"))
    assert ran == ["default", "iterations=1"]  # original, and SAFEMax at fraction 0.001; 0.002 over the cap
    again = script("run", *common, "--cache", tiny_cache, "--device", "cpu", "--max-run-seconds", "1e-9")
    assert again.returncode == 0 and "run(s)" not in again.stdout.split("curve stops")[0]  # nothing left to run
    chosen = script("select", *common)
    assert chosen.returncode == 0, chosen.stderr[-2000:]
    summary = json.loads((Path(results) / "budget-selection.json").read_text())["methods"]["safemax"]
    assert summary["chosen"]["iterations"] == 1 and "CPU cap" in summary["text"]
    assert summary["method_defaults"] == {"iterations": 1}


def test_every_budget_names_the_rule_that_chose_it():
    """A record says why it ran so many iterations: a named study, the user's --set, the preset's scaling, the
    pretraining recipe (retrain) or nothing to run (original); the digits preset's study entries are checked."""
    import dataclasses

    from bench.config import get_preset
    from bench.sweep import budget_choice, resolve_method_config

    tiny = get_preset("tiny")
    study = dataclasses.replace(tiny, method_defaults={**tiny.method_defaults, "salun": {"iterations": 7}},
                                budget_sources={"salun": "study X, rule Y"})
    cases = {("salun", ()): ("study", "study X, rule Y", 7),
             ("salun", (("iterations", 5),)): ("override", "--set salun.iterations=5", 5),
             ("safemax", ()): ("iteration_scale", "the paper's 1000 iterations x the preset's iteration_scale 0.003", 3),
             ("retrain", ()): ("pretraining", "the preset's pretraining recipe (30 iterations)", 30),
             ("original", ()): ("none", "no unlearning iterations", 0),
             ("sa", ()): ("preset", "the preset's method_defaults (3 iterations)", 3)}
    for (method, overrides), (chosen_by, how, iterations) in cases.items():
        _, config, _ = resolve_method_config(study, method, overrides)
        assert budget_choice(study, method, config, overrides) == {
            "iterations": iterations, "paper_iterations": type(config)().iterations, "chosen_by": chosen_by,
            "how": how}, (method, overrides)
    with pytest.raises(ValueError, match="budget_sources.sa names a source, but method_defaults.sa sets no"):
        dataclasses.replace(tiny, method_defaults={}, budget_sources={"sa": "a study"})
    digits = get_preset("digits")
    for method, source in digits.budget_sources.items():
        assert "docs/budget-study" in source, (method, source)
        _, config, _ = resolve_method_config(digits, method)
        assert config.iterations == digits.method_defaults[method]["iterations"]


def test_the_plan_finds_a_configurations_records_by_their_hyperparameters(sweep_results, tmp_path):
    """After a preset adopts a budget its run is the `default` variant, while the study's records stay in the
    folders they were made in: a configuration's records are found by hyperparameters, never by folder name."""
    import shutil

    results = tmp_path / "results"
    shutil.copytree(sweep_results, results)
    method = results / "tiny" / "paper" / "safemax"
    (method / "iterations=1").rename(method / "made-elsewhere")
    one, three = (study.plan("tiny", ["safemax"], (fraction,), (0, 1), (0,), str(results))[1]
                  for fraction in (0.001, 0.003))
    assert one.iterations == 1 and one.overrides == {"iterations": 1}
    assert sorted((r["forget_class"], r["hyperparameters"]["iterations"]) for r in one.done) == [(0, 1), (1, 1)]
    assert three.iterations == 3 and [r["hyperparameters"]["iterations"] for r in three.done] == [3, 3]
    shutil.rmtree(method / "default")  # the records of 3 iterations are gone: nothing else stands in for them
    assert three.done == []


def test_no_two_budget_curves_look_alike():
    """Thirteen curves (seven methods, GA and NegGrad+ at four values each): one colour per method, and a method's
    curves differ by line and marker, so the legend names every line."""
    import pandas as pd

    from reports.budget import Curve, curve_styles

    labels = [("sa", "SA"), ("salun", "SalUn"), ("erasediff", "EraseDiff"), ("sfron", "SFR-on"), ("safemax", "SAFEMax")]
    labels += [("ga", f"GA (alpha={a})") for a in (0.001, 0.01, 0.1, 1.0)]
    labels += [("neggrad_plus", f"NegGrad+ (gamma={g})") for g in (0.03, 0.1, 0.3, 1.0)]
    styles = curve_styles([Curve(method, "iterations", label, pd.DataFrame()) for method, label in labels])
    assert len(set(styles.values())) == len(labels)
    assert len({styles[label][0] for _, label in labels}) == 7  # one colour per method
