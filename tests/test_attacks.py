"""Attacks on saved unlearned models (bench.attacks) on the `tiny` preset: records, skipping, exact resume, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import attacks, fingerprint, records, runner
from bench.cli import main
from bench.config import get_preset
from bench.orchestrate import run_attacks_local, run_local
from bench.sweep import Sweep, build_specs

RUN_FIELDS = ("schema", "kind", "attack", "variant", "preset", "protocol", "method", "run_variant", "forget_class",
              "seed", "run_record", "base_model", "classifier", "options", "scaled_from_paper", "timings", "memory",
              "provenance")
CURVE_FIELDS = ("step", "ua", "entropy", "forget_prob", "forget_accuracy")


def _run_spec(out, cache: str, method: str = "safemax", save_model: bool = True):
    return build_specs(get_preset("tiny"), [method], [0], [0], Sweep({}, {}), results=str(out), cache=cache,
                       device="cpu", progress=False, save_model=save_model)[0]


def _run(out, cache: str, method: str = "safemax", save_model: bool = True):
    spec = _run_spec(out, cache, method, save_model)
    assert run_local([spec])[0].status == "done"
    return spec


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def attacked(tmp_path_factory, tiny_cache):
    """A saved safemax run on tiny, attacked once by relearning and once by the embedding search."""
    out = tmp_path_factory.mktemp("attacks")
    run = _run(out, tiny_cache)
    specs = attacks.attack_specs(run, "relearn") + attacks.attack_specs(run, "embedding", {"target": ["embedding"]})
    outcomes = run_attacks_local(specs)
    assert [(o.status, o.error) for o in outcomes] == [("done", None)] * 2
    return out, run, specs


def test_both_attacks_write_a_valid_attack_record_beside_the_run(attacked):
    out, run, specs = attacked
    relearn, embedding = (json.loads((s.directory / "attack.json").read_text()) for s in specs)
    assert specs[0].directory == run.directory / "attacks" / "relearn" / "k=3"
    for record, name in ((relearn, "relearn"), (embedding, "embedding")):
        assert all(field in record for field in RUN_FIELDS), sorted(set(RUN_FIELDS) - set(record))
        assert (record["kind"], record["attack"], record["method"], record["forget_class"]) == ("attack", name,
                                                                                                "safemax", 0)
        assert record["run_record"] == str(run.directory / "record.json")
        assert record["base_model"]["id"] and record["timings"]["attack_s"] > 0
        assert record["memory"]["peak_process_mib"] > 0 and record["provenance"]["versions"]["torch"]
    assert [point["step"] for point in relearn["curve"]] == [0, 2, 4]
    assert all(set(CURVE_FIELDS) <= set(point) for point in relearn["curve"])
    assert 0 <= relearn["auc"] <= 100 and relearn["steps_to_relearn"] in (None, 0, 2, 4)
    assert relearn["scaled_from_paper"]["schedule"] == {"paper": [0, 10, 50, 100, 200], "preset": [0, 2, 4]}
    assert 0 <= embedding["success_rate_before"] <= 100 and 0 <= embedding["success_rate"] <= 100
    assert embedding["budget"]["samples_total"] == 4 * 4
    # only the record and the found vector stay: no partial checkpoint, snapshots or progress
    assert sorted(p.name for p in specs[0].directory.iterdir()) == ["attack.json"]
    assert sorted(p.name for p in specs[1].directory.iterdir()) == ["attack.json", "found.pt"]
    assert len(attacks.read_attacks(out)) == 2
    assert [r["method"] for r in records.read_all(out)[0]] == ["safemax"]  # attack records are not run records


def test_rerun_skips_a_current_attack_and_redoes_a_stale_one(attacked):
    _, _, specs = attacked
    path = specs[0].directory / "attack.json"
    before = path.stat().st_mtime_ns
    assert [o.status for o in run_attacks_local(specs)] == ["skipped", "skipped"]
    assert path.stat().st_mtime_ns == before
    record = json.loads(path.read_text())
    record["base_model"]["id"] = "another-base-model"
    path.write_text(json.dumps(record))
    assert [o.status for o in run_attacks_local(specs[:1])] == ["done"]
    assert json.loads(path.read_text())["base_model"]["id"] != "another-base-model"


def test_an_attack_record_of_other_bench_code_or_another_protocol_is_made_again(attacked, caplog):
    # The run's weights, which the record names by hash, stay the same when only the attack's code or the
    # evaluation changed: the record carries both
    _, _, specs = attacked
    path = specs[0].directory / "attack.json"
    record = json.loads(path.read_text())
    code = record["provenance"]["bench_code"]
    assert code == fingerprint.attack_code() and "bench/attack_algorithms.py" in code["files"]
    settings = record["protocol_settings"]
    edited = {**code, "sha256": "0" * 64, "files": {**code["files"], "bench/attack_algorithms.py": "0" * 64}}
    for changed, why in (({**record, "provenance": {**record["provenance"], "bench_code": edited}},
                          "(bench code changed (bench/attack_algorithms.py)): making it again"),
                         ({**record, "protocol_settings": {**settings, "guidance": settings["guidance"] + 1}},
                          "(made with another evaluation protocol: guidance")):
        path.write_text(json.dumps(changed))
        with caplog.at_level("WARNING"):
            assert [o.status for o in run_attacks_local(specs[:1])] == ["done"]
        assert why in caplog.text
        assert json.loads(path.read_text())["provenance"]["bench_code"] == code


def test_relearn_step_zero_repeats_the_runs_own_evaluation(attacked):
    _, run, _ = attacked
    spec = attacks.AttackSpec(run, "relearn", (("k", 3), ("samples", 20), ("schedule", (0,))))  # tiny: 20 samples
    record = attacks.attack_one(spec)
    run_ua = records.read_record(run.directory / "record.json")["metrics"]["ua"]
    assert record["curve"][0]["ua"] == run_ua and record["auc"] == 100 - run_ua


class Killed(Exception):
    pass


def test_interrupted_relearn_resumes_to_the_same_curve(attacked, tmp_path, monkeypatch):
    _, run, specs = attacked
    whole = attacks.read_attack(specs[0].directory / "attack.json")  # tiny: steps 0, 2, 4, a checkpoint every 2
    copy = tmp_path / "copy"  # the same saved run in another results folder
    shutil.copytree(run.directory, copy / run.directory.relative_to(run.results),
                    ignore=shutil.ignore_patterns("attacks"))
    spec = attacks.attack_specs(_run_spec(copy, run.cache), "relearn")[0]
    save = runner._save_checkpoint

    def save_then_die(*args):
        save(*args)
        raise Killed

    monkeypatch.setattr(runner, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        attacks.attack_one(spec)
    assert (spec.directory / "partial.pt").exists() and not (spec.directory / "attack.json").exists()
    monkeypatch.setattr(runner, "_save_checkpoint", save)
    resumed = attacks.attack_one(spec)
    assert resumed["timings"]["resumed_from_step"] == 2
    assert resumed["curve"] == [{**point, "seconds": resumed_point["seconds"]}
                                for point, resumed_point in zip(whole["curve"], resumed["curve"])]


def test_bench_run_with_attacks_attacks_each_run_after_it(tiny_cache, tmp_path):
    result = _invoke("run", "--preset", "tiny", "--methods", "original", "--classes", "0", "--cache", tiny_cache,
                     "--out", str(tmp_path), "--no-progress", "--attacks", "relearn")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "tiny" / "paper" / "original" / "default" / "class0" / "seed0"
    assert records.read_record(run_dir / "record.json")["artifacts"]["model"]["path"] == "model.safetensors"
    assert attacks.read_attack(run_dir / "attacks" / "relearn" / "k=3" / "attack.json")["method"] == "original"
    assert "done     relearn [k=3] original class 0 seed 0" in result.output
    # A rerun skips the run and its attack, and still shows the attack's result (it showed none)
    again = _invoke("run", "--preset", "tiny", "--methods", "original", "--classes", "0", "--cache", tiny_cache,
                    "--out", str(tmp_path), "--no-progress", "--attacks", "relearn")
    assert again.exit_code == 0, again.output
    line = result.output.split("done     relearn [k=3] ")[1].splitlines()[0]
    assert f"skipped  relearn [k=3] {line}" in again.output and "attacks: 0 done, 1 skipped" in again.output


def test_attack_command_runs_through_the_job_path_then_skips(attacked):
    out, _, _ = attacked
    grid = ("--preset", "tiny", "--methods", "safemax", "--classes", "0", "--cache", attacked[1].cache, "--out", str(out),
            "--no-progress")
    first = _invoke("attack", "embedding", *grid, "--targets", "embedding+guidance", "--cluster", "debug")
    assert first.exit_code == 0, first.output
    assert "done     embedding [target=embedding+guidance]" in first.output
    again = _invoke("attack", "embedding", *grid, "--targets", "embedding+guidance", "--json")
    assert again.exit_code == 0, again.output
    assert [row["status"] for row in json.loads(again.stdout)["attacks"]] == ["skipped"]


def test_a_run_without_saved_model_names_save_model(tiny_cache, tmp_path):
    _run(tmp_path, tiny_cache, method="original", save_model=False)
    result = _invoke("attack", "relearn", "--preset", "tiny", "--methods", "original", "--classes", "0", "--cache",
                     tiny_cache, "--out", str(tmp_path))
    assert result.exit_code != 0
    assert "has no saved model" in result.output and "--save-model" in result.output
    assert not list(Path(tmp_path).rglob("attacks"))


@pytest.mark.parametrize("args, named", [
    (("attack", "relearn", "--k", "0"), "--k"),
    (("attack", "relearn", "--k", "99"), "--k 99"),  # tiny's test split holds 36 images of class 0
    (("attack", "relearn", "--schedule", "50,10"), "--schedule"),
    (("attack", "embedding", "--targets", "everything"), "--targets"),
    (("attack", "embedding", "--sampler-steps", "0"), "--sampler-steps"),
    (("run", "--attacks", "relearn,forget"), "--attacks"),
])
def test_bad_attack_options_fail_before_any_work(tmp_path, args, named):
    result = _invoke(*args, "--preset", "tiny", "--classes", "0", "--methods", "safemax", "--out", str(tmp_path),
                     "--cache", str(tmp_path / "no-cache"))
    assert result.exit_code != 0
    assert named in result.output, result.output
    assert not (tmp_path / "no-cache").exists() and not (tmp_path / "tiny").exists()
