"""The whole pipeline on the `tiny` preset: specs -> runs -> records, skipping, --force and failed runs."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from bench import records
from bench.config import get_preset
from bench.orchestrate import run_local
from bench.sweep import Sweep, build_specs
from methods.safemax import SafeMax

REPO = Path(__file__).resolve().parent.parent
METHODS = ["original", "safemax"]


def _specs(out, cache: str, methods=METHODS):
    return build_specs(get_preset("tiny"), list(methods), [0], [0], Sweep({}, {}), results=str(out), cache=cache,
                       device="cpu", progress=False)


def _record_path(out, method: str) -> Path:
    # The documented layout: <out>/<preset>/<protocol>/<method>/<variant>/class<k>/seed<s>/record.json
    return Path(out) / "tiny" / "paper" / method / "default" / "class0" / "seed0" / "record.json"


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def _leftovers(directory: Path) -> list[str]:
    """Records and temporary files a failed run must not leave behind."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name == records.RECORD_NAME or ".tmp" in p.name)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_cache):
    out = tmp_path_factory.mktemp("e2e-results")
    specs = _specs(out, tiny_cache)
    return out, specs, run_local(specs)


def test_runs_write_records_at_the_fixed_path_beside_samples(first_run):
    out, specs, outcomes = first_run
    assert [(o.spec.method, o.status, o.error) for o in outcomes] == [(m, "done", None) for m in METHODS]
    for spec in specs:
        path = _record_path(out, spec.method)
        assert path.is_file(), path
        assert (path.parent / "samples.png").is_file()
        assert spec.directory == path.parent
        assert _leftovers(path.parent) == [records.RECORD_NAME]


@pytest.mark.parametrize("method", METHODS)
def test_record_holds_metrics_timings_memory_provenance_and_config(first_run, method):
    out, _, _ = first_run
    record = records.read_record(_record_path(out, method))
    assert (record["preset"], record["method"], record["forget_class"], record["seed"]) == ("tiny", method, 0, 0)
    metrics = record["metrics"]
    assert 0.0 <= metrics["ua"] <= 100.0
    assert 0.0 <= metrics["entropy"] <= math.log(10) + 1e-6
    assert math.isfinite(metrics["fid"]) and metrics["fid"] > -1e-6
    assert record["timings"]["rte_s"] >= 0.0
    assert record["memory"]["peak_process_mib"] > 0
    provenance = record["provenance"]
    assert provenance["versions"]["torch"] and provenance["versions"]["numpy"]
    assert provenance["device"].startswith("cpu")
    if (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", provenance["git_commit"] or ""), provenance["git_commit"]
    else:
        assert "git_commit" in provenance
    assert record["hyperparameters"]["batch_size"] == get_preset("tiny").unlearn_batch_size
    assert isinstance(record["scaled_from_paper"], dict)
    # On the CPU every speed switch that needs CUDA is off: the plain fp32 path, and the record says so.
    assert record["speed"]["switches"]["amp"] is False and record["speed"]["switches"]["cuda_graphs"] is False
    # FID against every retained training image (the tiny preset keeps the paper's reference set).
    from bench.data import load_digits

    assert record["fid"]["reference_images"] == len(load_digits("train").retain(0))


def test_safemax_record_says_what_was_scaled_from_the_paper(first_run):
    out, _, _ = first_run
    record = records.read_record(_record_path(out, "safemax"))
    assert record["hyperparameters"]["lam"] == 1.0 and record["hyperparameters"]["target"] == "chain"
    assert record["hyperparameters"]["iterations"] == 3  # 1,000 x 0.003
    assert record["scaled_from_paper"]["iterations"] == {"paper": 1000, "preset": 3}
    assert record["scaled_from_paper"]["batch_size"] == {"paper": 128, "preset": 16}
    assert record["timings"]["rte_s"] > 0 and record["timings"]["iterations"] == 3
    assert record["timings"]["rte_s"] <= record["timings"]["total_s"]
    # Which rule set the budget: tiny names no study, so the paper's count times its iteration_scale.
    assert record["budget"] == {"iterations": 3, "paper_iterations": 1000, "chosen_by": "iteration_scale",
                                "how": "the paper's 1000 iterations x the preset's iteration_scale 0.003"}


def test_rerun_skips_finished_runs_without_rewriting_them(first_run):
    out, specs, _ = first_run
    before = {m: _stamp(_record_path(out, m)) for m in METHODS}
    outcomes = run_local(specs)
    assert [o.status for o in outcomes] == ["skipped", "skipped"]
    assert [o.record["method"] for o in outcomes] == METHODS
    assert {m: _stamp(_record_path(out, m)) for m in METHODS} == before


def test_force_reruns_finished_runs(first_run):
    out, specs, _ = first_run
    before = {m: _stamp(_record_path(out, m)) for m in METHODS}
    outcomes = run_local(specs, force=True)
    assert [o.status for o in outcomes] == ["done", "done"]
    for method in METHODS:
        assert _stamp(_record_path(out, method)) != before[method]
        records.read_record(_record_path(out, method))


def test_failed_run_leaves_no_record_and_the_others_finish(tmp_path, tiny_cache, monkeypatch):
    def broken_loss(self, model, batch):
        raise RuntimeError("loss exploded on purpose")

    monkeypatch.setattr(SafeMax, "loss", broken_loss)
    outcomes = run_local(_specs(tmp_path, tiny_cache, ["safemax", "original"]))
    assert [o.status for o in outcomes] == ["failed", "done"]
    assert "loss exploded on purpose" in outcomes[0].error
    assert _leftovers(_record_path(tmp_path, "safemax").parent) == []
    records.read_record(_record_path(tmp_path, "original"))


def test_failure_while_writing_the_record_leaves_no_partial_or_temporary_file(tmp_path, tiny_cache, monkeypatch):
    def dump_half_then_fail(payload, handle, **kwargs):
        handle.write(json.dumps(payload)[:20])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records.json, "dump", dump_half_then_fail)
    outcomes = run_local(_specs(tmp_path, tiny_cache, ["original"]))
    assert [o.status for o in outcomes] == ["failed"]
    assert "No space left" in outcomes[0].error
    directory = _record_path(tmp_path, "original").parent
    assert _leftovers(directory) == [], os.listdir(directory)
