"""Report statistics, exports, comparison and robustness, from small records and attack files written by hand."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from bench.cli import main
from bench.records import RECORD_NAME, make_record, run_dir, write_json_atomic
from reports import render, stats, tables
from reports.build import build_report
from reports.figures import yerr
from reports.latents import cached_figure1


def record(results, method: str, forget_class: int, seed: int, *, ua: float = 90.0, entropy: float = 1.0,
           fid: float = 5.0, rte_s: float = 60.0, variant: str = "default", features: str = "classifier",
           preset: str = "tiny", hyperparameters: dict | None = None) -> dict:
    """A schema-valid record of one run, written where `bench run` would write it."""
    payload = make_record(
        preset=preset, dataset="hand-made", protocol={"name": "paper", "fid_features": features, "sampler_steps": 20},
        method=method, variant=variant, forget_class=forget_class, forget_class_name=str(forget_class), seed=seed,
        hyperparameters=hyperparameters or {"iterations": 10, "lr": 1e-4}, overrides={"method": {}, "protocol": {}},
        scaled_from_paper={}, metrics={"ua": ua, "entropy": entropy, "forget_prob": 0.1, "fid": fid,
                                       "retain_accuracy": 95.0, "forget_histogram": [1, 2]},
        timings={"rte_s": rte_s, "prepare_s": {"fim": 30.0} if method == "sa" else {}, "prepare_total_s": 0.0,
                 "eval_s": 1.0},
        memory={"peak_process_mib": 900.0}, losses={}, base_model={"path": f"{results}/cache/{preset}/base.pt",
                                                                    "id": f"{preset}-base", "step": 10},
        classifier={"id": f"{preset}-classifier"}, fid={}, speed={}, provenance={"git_commit": "abc", "device": "cpu"},
        artifacts={"samples": "samples.png"})
    write_json_atomic(run_dir(results, preset, "paper", method, variant, forget_class, seed) / RECORD_NAME, payload)
    return payload


def attack(results, method: str, forget_class: int, seed: int, kind: str, **numbers) -> None:
    """An attack.json in the attack code's format, beside the run's record."""
    folder = run_dir(results, "tiny", "paper", method, "default", forget_class, seed) / "attacks" / kind / "default"
    payload = {"schema": 1, "kind": "attack", "attack": kind, "variant": "default", "preset": "tiny",
               "protocol": "paper", "method": method, "run_variant": "default", "forget_class": forget_class,
               "seed": seed, "run_record": "../../../record.json", "base_model": {"id": "tiny-base"},
               "classifier": {"id": "tiny-classifier"}, "options": {}, "timings": {"attack_s": 12.0}, "memory": {},
               "provenance": {}, **numbers}
    write_json_atomic(folder / "attack.json", payload)


def curve(levels: list[float]) -> list[dict]:
    return [{"step": 10 * i, "ua": 100 - level, "entropy": 1.0, "forget_prob": level / 100,
             "forget_accuracy": level} for i, level in enumerate(levels)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """original, sa and safemax on classes 0-1 with seeds 0-2 (sa class 1: seed 0 only), and attacks on them."""
    root = tmp_path_factory.mktemp("stats") / "results"
    uas = {"safemax": [100.0, 98.0, 99.0], "sa": [90.0, 80.0, 70.0], "original": [0.0, 1.0, 2.0]}
    for method, forget_class, seed in itertools.product(uas, (0, 1), (0, 1, 2)):
        if method == "sa" and forget_class == 1 and seed > 0:
            continue
        record(root, method, forget_class, seed, ua=uas[method][seed] - forget_class, fid=4.0 + seed,
               rte_s={"safemax": 60.0, "sa": 180.0, "original": 0.0}[method] + seed)
    for method, forget_class, seed in itertools.product(("original", "sa", "safemax"), (0, 1), (0, 1)):
        top = {"original": 100.0, "sa": 60.0, "safemax": 20.0}[method]
        attack(root, method, forget_class, seed, "relearn", curve=curve([0.0, top / 2 + seed, top]), auc=top,
               steps_to_relearn=20 if method != "safemax" else None)
        attack(root, method, forget_class, seed, "embedding", success_rate=top / 2, success_rate_before=1.0,
               budget={"optimisation_steps": 10, "samples_per_step": 10, "samples_total": 100})
    broken = run_dir(root, "tiny", "paper", "sa", "default", 0, 0) / "attacks" / "relearn" / "broken" / "attack.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    return root


@pytest.fixture(scope="module")
def report(results):
    out = results.parent / "report"
    return {"out": out, "written": build_report(results, out, figure1=False)}


def test_bootstrap_ci_of_seeds_matches_the_exact_bootstrap():
    values = np.array([1.0, 2.0, 4.0, 8.0])
    # Every one of the 4^4 equally likely resamples, enumerated: the exact bootstrap distribution of the mean.
    means = np.sort([np.mean(values[list(i)]) for i in itertools.product(range(4), repeat=4)])
    summary = stats.summarize(values)
    assert summary.n == 4 and summary.mean == pytest.approx(3.75)
    assert summary.std == pytest.approx(np.sqrt(((values - 3.75) ** 2).sum() / 3))
    assert summary.low == pytest.approx(np.quantile(means, 0.025), abs=0.1)
    assert summary.high == pytest.approx(np.quantile(means, 0.975), abs=0.1)
    assert stats.summarize(values) == summary  # seeded


def test_the_interval_holds_the_mean_of_equal_values_and_figures_draw_it():
    # Nine equal values (one metric of nine runs of the unchanged model) have a computed mean one rounding above them;
    # an interval of the values alone left the mean outside it, and matplotlib refused the negative error bar
    # ("'xerr' must not contain negative values"), which ended `bench report`.
    summary = stats.summarize([0.91794931712] * 9)
    assert summary.low <= summary.mean <= summary.high
    assert (yerr([summary]) >= 0).all()


def test_a_single_seed_has_no_interval_and_says_n1():
    single = stats.summarize([97.5])
    assert single.n == 1 and np.isnan(single.low) and np.isnan(single.std)
    cell = tables.summary_cell("ua", single)
    assert render.plain_text(cell, 3) == "97.50 (n=1)"


@pytest.mark.slow
def test_table_cells_show_mean_sd_ci_and_n(report):
    markdown = (report["out"] / "tiny/paper/tables/table1.md").read_text()
    row0 = next(line for line in markdown.splitlines() if line.startswith("| 0 |"))
    expected = stats.summarize([100.0, 98.0, 99.0])
    assert f"**{expected.mean:.2f}** ± {expected.std:.2f} [{expected.low:.2f}, {expected.high:.2f}]" in row0
    row1 = next(line for line in markdown.splitlines() if line.startswith("| 1 |"))
    assert "89.00 (n=1)" in row1  # SA class 1 has seed 0 only
    assert "n = 3 seeds per cell" in markdown
    frame = pd.read_csv(report["out"] / "tiny/paper/tables/table1.csv")
    assert frame.loc[0, "SAFEMax UA (%) ↑ CI low"] == pytest.approx(expected.low)
    assert frame.loc[0, "SAFEMax UA (%) ↑ n"] == 3


def test_paired_differences_share_class_and_seed(results):
    df = tables.records_frame([json.loads(p.read_text()) for p in results.rglob(RECORD_NAME)])
    diffs = stats.paired_differences(df, ["ua", "rte_min"])
    sa0 = diffs[(diffs["method"] == "sa") & (diffs["class"] == 0) & (diffs["metric"] == "ua")].iloc[0]
    by_seed = np.array([90.0, 80.0, 70.0]) - np.array([100.0, 98.0, 99.0])
    assert sa0["n"] == 3 and sa0["mean"] == pytest.approx(by_seed.mean())
    assert (sa0["low"], sa0["high"]) == pytest.approx(stats.bootstrap_ci(by_seed))
    sa_all = diffs[(diffs["method"] == "sa") & (diffs["class"] == "all") & (diffs["metric"] == "ua")].iloc[0]
    assert sa_all["n"] == 2 and sa_all["mean"] == pytest.approx((by_seed.mean() + (89.0 - 99.0)) / 2)


def test_paired_table_is_written(report):
    markdown = (report["out"] / "tiny/paper/tables/paired.md").read_text()
    assert "| SA: all classes |" in markdown and "| SA: class 1 |" in markdown
    assert "Δ FD (classifier features)" in markdown


def test_runs_csv_has_one_row_per_record_and_hp_columns(report, results):
    frame = pd.read_csv(report["out"] / "runs.csv")
    assert len(frame) == len(list(results.rglob(RECORD_NAME))) == 16
    assert {"hp.iterations", "hp.lr", "ua", "fid", "fid_features", "rte_s", "peak_process_mib", "base_model_id",
            "classifier_id", "prepare.fim_s"} <= set(frame.columns)
    lines = (report["out"] / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 16 and json.loads(lines[0])["hp.iterations"] == 10


def test_labels_say_fd_for_classifier_features(report):
    table2 = (report["out"] / "tiny/paper/tables/table2.md").read_text()
    assert "FD (classifier features) ↓" in table2 and "FID" not in table2.replace("not an FID", "")
    page = (report["out"] / "report.html").read_text()
    assert "<th>FD (classifier features)</th>" in page  # the runs table's column


def test_inception_features_are_called_fid(tmp_path):
    record(tmp_path / "r", "safemax", 0, 0, features="inception")
    build_report(tmp_path / "r", tmp_path / "out", figure1=False)
    assert "| SAFEMax FID ↓ |" in (tmp_path / "out/tiny/paper/tables/table2.md").read_text().replace(" | ", " | ")


def test_robustness_section_appears_when_attack_files_exist(report):
    written = report["written"]
    for name in ("robustness_relearn", "robustness_embedding"):
        assert f"tiny/paper/tables/{name}.md" in written and f"tiny/paper/tables/{name}.tex" in written
    for name in ("relearn_curves", "attack_success"):
        assert written[f"tiny/paper/figures/{name}.png"].stat().st_size > 0
    relearn = (report["out"] / "tiny/paper/tables/robustness_relearn.md").read_text()
    assert re.search(r"\| SAFEMax \| [^|]* \| 20\.00 ± 0\.00 \[20\.00, 20\.00\] \|", relearn)  # last step, 2 classes
    assert "| 0/4 |" in relearn and "| 4/4 |" in relearn
    embedding = (report["out"] / "tiny/paper/tables/robustness_embedding.md").read_text()
    assert re.search(r"\| SAFEMax \| [^\n]*\| 100 ± 0 \[100, 100\] \| 2 × 2 \|", embedding)  # budget: samples
    page = (report["out"] / "report.html").read_text()
    assert "id='tiny-paper-robustness'" in page and "Attack file skipped" in page and "broken" in page


def test_no_attack_files_no_robustness_section(tmp_path):
    record(tmp_path / "r", "safemax", 0, 0)
    written = build_report(tmp_path / "r", tmp_path / "out", figure1=False)
    assert not any("robustness" in key for key in written)
    assert "Robustness" not in written["report.html"].read_text()


def test_methods_and_classes_filter_the_report(results, tmp_path):
    result = CliRunner().invoke(main, ["report", "--results", str(results), "--out", str(tmp_path / "out"),
                                       "--methods", "sa,safemax", "--classes", "0", "--no-figure1"])
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "out/tiny/paper/tables/table1.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| Class |"))
    assert header == "| Class | SA H ↑ | SA UA (%) ↑ | SAFEMax H ↑ | SAFEMax UA (%) ↑ |"
    assert [line.split("|")[1].strip() for line in markdown.splitlines() if re.match(r"\| \d", line)] == ["0"]
    assert len(pd.read_csv(tmp_path / "out/runs.csv")) == 6


def test_latex_table_has_caption_label_and_footnotes(report):
    text = (report["out"] / "tiny/paper/tables/table2.tex").read_text()
    assert r"\caption{" in text and r"\label{tab:tiny-paper-table2}" in text and r"\footnotesize" in text
    assert text.rstrip().endswith(r"\end{table}")


def test_compare_prints_deltas(results, tmp_path):
    after = tmp_path / "after"
    record(after, "safemax", 0, 0, ua=95.0, rte_s=30.0)
    record(after, "safemax", 1, 5, ua=50.0)  # no shared seed for class 1: compared by seed means
    csv = tmp_path / "deltas.csv"
    result = CliRunner().invoke(main, ["compare", str(results), str(after), "--csv", str(csv)])
    assert result.exit_code == 0, result.output
    assert "| SAFEMax / default / 0 / 0 | 100.00 | 95.00 | -5.00 |" in result.output
    assert "| SAFEMax / default / 1 / mean | 98.00 | 50.00 | -48.00 |" in result.output
    assert "Summary per method" in result.output and "| 0.74× | 2 |" in result.output
    deltas = pd.read_csv(csv)
    assert len(deltas) == 2 and deltas["ua_delta"].tolist() == [-5.0, -48.0]


def test_compare_without_common_runs_fails(results, tmp_path):
    record(tmp_path / "other", "salun", 0, 0)
    result = CliRunner().invoke(main, ["compare", str(results), str(tmp_path / "other")])
    assert result.exit_code != 0 and "No run in common" in result.output


def test_figure1_latents_are_read_back_by_a_second_report(tmp_path):
    from bench.config import get_preset

    preset = get_preset("tiny")
    _, first, hit = cached_figure1(preset, None, tmp_path, per_class=20, components=8, points=4)
    _, second, hit_again = cached_figure1(preset, None, tmp_path, per_class=20, components=8, points=4)
    assert (hit, hit_again) == (False, True)
    pd.testing.assert_frame_equal(first, second, check_exact=False)
    _, _, other = cached_figure1(preset, None, tmp_path, per_class=20, components=8, points=5)
    assert other is False
