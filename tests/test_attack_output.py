"""What attacks print and record (issue 24 items 6, 13, 14) on the `tiny` preset, through the real CLI and files.

The preset's scaled attack settings are printed once and recorded as `scaled_from_paper`; a relearn curve that never
reached the threshold says "not relearned within N steps"; a malformed or NaN attack record is named and made again,
and `attack_one` never writes one; `original` runs on a cache whose samples folder cannot be written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import attacks, records
from bench.cli import main
from bench.config import get_preset
from bench.orchestrate import run_local
from bench.sweep import Sweep, build_specs
from reports import robustness

TINY = ("--preset", "tiny", "--device", "cpu", "--no-progress")


def _invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def _clean_exit(result) -> bool:
    return result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_cache):
    """A safemax run on tiny with its saved model, relearn-attacked once with the preset's settings."""
    out = tmp_path_factory.mktemp("attack-output")
    (spec,) = build_specs(get_preset("tiny"), ["safemax"], [0], [0], Sweep({}, {}), results=str(out),
                          cache=tiny_cache, device="cpu", progress=False, save_model=True)
    assert run_local([spec])[0].status == "done"
    result = _invoke("attack", "relearn", *TINY, "--methods", "safemax", "--classes", "0", "--cache", tiny_cache,
                     "--results", out)
    assert result.exit_code == 0, result.output
    return spec, result.output


def _relearn_path(spec) -> Path:
    return attacks.attack_specs(spec, "relearn")[0].directory / attacks.ATTACK_NAME


def _grid(spec):
    return ("attack", "relearn", *TINY, "--methods", "safemax", "--classes", "0", "--cache", spec.cache,
            "--results", spec.results)


def test_the_scaled_attack_settings_are_printed_once_and_recorded(saved_run):
    spec, output = saved_run
    line = ("tiny preset: relearn settings scaled from the paper's: --k 5,50 -> 3; --schedule 0,10,50,100,200 -> "
            "0,2,4; --samples 20 -> 8; --checkpoint-every 50 -> 2")
    assert output.count(line) == 1, output
    scaled = attacks.read_attack(_relearn_path(spec))["scaled_from_paper"]
    assert scaled["k"] == {"paper": [5, 50], "preset": [3]}
    assert scaled["samples"] == {"paper": 20, "preset": 8}  # the paper's None: the protocol's 20 forget samples


def test_settings_given_for_an_attack_are_not_recorded_as_scaled(saved_run):
    spec, _ = saved_run
    given = attacks.AttackSpec(dataclasses.replace(spec, attacks=()), "relearn",
                               (("k", 2), ("samples", 4), ("schedule", (0, 1))))
    record = attacks.attack_one(given)
    assert record["options"]["samples"] == 4
    assert record["scaled_from_paper"] == {"checkpoint_every": {"paper": 50, "preset": 2}}


def test_a_curve_that_never_reached_the_threshold_says_within_how_many_steps(saved_run):
    spec, _ = saved_run
    record = attacks.read_attack(_relearn_path(spec))
    never = attacks.summary({**record, "steps_to_relearn": None})
    assert "not relearned (>= 50%) within 4 steps" in never and "None" not in never
    assert "forget-class accuracy (%)" in never
    assert "relearned (>= 50%) at step 2" in attacks.summary({**record, "steps_to_relearn": 2})


@pytest.mark.parametrize("damage", ["curve of numbers", "NaN auc", "infinite point"])
def test_a_malformed_or_nan_attack_record_is_named_and_made_again(saved_run, tmp_path, caplog, damage):
    spec, _ = saved_run
    results = tmp_path / "results"
    shutil.copytree(spec.results, results)
    copy = dataclasses.replace(spec, results=str(results))
    path = _relearn_path(copy)
    record = json.loads(path.read_text())
    if damage == "curve of numbers":
        record["curve"] = [0, 12.5]
    elif damage == "NaN auc":
        record["auc"] = math.nan
    else:
        record["curve"][1]["forget_accuracy"] = math.inf
    path.write_text(json.dumps(record))
    assert robustness.read_attacks(results)[1][0][0] == path  # the report lists it as unreadable, not as a "-"
    with caplog.at_level("WARNING"):
        result = _invoke(*_grid(copy))
    assert result.exit_code == 0 and _clean_exit(result), result.output
    assert "1 done, 0 skipped" in result.output, result.output
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"{path}: malformed attack record" in warnings[0], warnings
    rerun = attacks.read_attack(path)
    assert all(math.isfinite(p["forget_accuracy"]) for p in rerun["curve"]) and math.isfinite(rerun["auc"])


def test_attack_one_refuses_to_write_a_nan_result(saved_run, tmp_path, monkeypatch):
    spec, _ = saved_run
    kind = attacks.ATTACKS["relearn"]

    def diverged(target, config):
        return {**kind.run(target, config), "auc": math.nan}

    monkeypatch.setitem(attacks.ATTACKS, "relearn", dataclasses.replace(kind, run=diverged))
    attack = attacks.AttackSpec(dataclasses.replace(spec, attacks=()), "relearn", (("k", 2), ("schedule", (0,))))
    with pytest.raises(ValueError, match=r"not writing .*attack\.json, its results are invalid \('auc' is nan"):
        attacks.attack_one(attack)
    assert not (attack.directory / attacks.ATTACK_NAME).exists()
    assert not (attack.directory / "progress.json").exists()  # a rerun measures afresh


def test_original_runs_on_a_cache_whose_samples_cannot_be_written(tiny_cache, tmp_path, caplog):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache, ignore=shutil.ignore_patterns("samples"))
    # As on a read-only mount: root writes through permission bits, but not through a file where a folder must go.
    (cache / "tiny" / "samples").write_text("")
    out = tmp_path / "results"
    with caplog.at_level("WARNING"):
        result = _invoke("run", *TINY, "--methods", "original", "--classes", "0,1", "--cache", cache, "--out", out)
    assert result.exit_code == 0 and _clean_exit(result), result.output
    assert "2 run(s) done" in result.output, result.output
    assert [(r["method"], 0 <= r["metrics"]["ua"] <= 100) for r in records.read_all(out)[0]] == [("original", True)] * 2
    notes = [r.getMessage() for r in caplog.records if "samples are not cached" in r.getMessage()]
    assert len(notes) == 1 and str(cache / "tiny" / "samples") in notes[0], notes


def test_an_attack_reads_the_model_only_from_inside_the_run_folder(saved_run, tmp_path):
    """A record edited to point its model outside the run folder is refused, as `bench export` refuses it."""
    spec, _ = saved_run
    record = records.read_record(spec.directory / records.RECORD_NAME)
    outside = tmp_path / "model.safetensors"
    shutil.copy(spec.directory / "model.safetensors", outside)
    edited = {**record, "artifacts": {**record["artifacts"], "model": {**record["artifacts"]["model"],
                                                                        "path": str(outside)}}}
    with pytest.raises(attacks.CheckpointError, match="points outside the run folder"):
        attacks.load_attacked_weights(spec, edited)
    assert attacks.load_attacked_weights(spec, record)  # the run's own model still loads
