"""Which records count: copies count once, stale records (another base model, edited method code) are marked stale
by `bench status` and run again by `bench run`, and reports refuse to mix base models unless asked (issue 24 items
10 and 11, issue 26 item 1)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch

from bench import extensions, fingerprint, records
from bench.config import PRESETS
from bench.extensions import load_preset_file
from bench.orchestrate import code_changed, run_local
from bench.status import status
from bench.sweep import RunSpec
from methods import get_method
from reports.build import build_report
from reports.compare import compare_results
from reports.mixing import MixedModels


def _record(results: Path, forget_class: int, seed: int = 0, base: str = "tiny-base", ua: float = 90.0,
            cache: Path | None = None) -> Path:
    """A schema-valid record of original on tiny, written where `bench run` writes it; returns its path."""
    payload = records.make_record(
        preset="tiny", dataset="hand-made", protocol={"name": "paper", "fid_features": "classifier"},
        method="original", variant="default", forget_class=forget_class, forget_class_name=str(forget_class),
        seed=seed, hyperparameters={}, overrides={"method": {}, "protocol": {}}, scaled_from_paper={},
        metrics={"ua": ua, "entropy": 1.0, "fid": 5.0, "retain_accuracy": 95.0}, timings={
            "rte_s": 1.0, "prepare_total_s": 0.0, "eval_s": 1.0}, memory={"peak_process_mib": 100.0}, losses={},
        base_model={"path": str((cache or results / "cache") / "tiny" / "base.pt"), "id": base, "step": 10},
        classifier={"id": "tiny-classifier"}, fid={}, speed={}, provenance={"device": "cpu"})
    path = records.run_dir(results, "tiny", "paper", "original", "default", forget_class, seed) / records.RECORD_NAME
    records.write_json_atomic(path, payload)
    return path


# -- issue 24 item 10: a copied record counts once ------------------------------------------------------------------
def test_copies_of_records_are_skipped_and_named(tmp_path):
    results = tmp_path / "R"
    first, second = _record(results, 0), _record(results, 1, ua=80.0)
    shutil.copy(first, results / "record.json")
    (results / "a" / "b").mkdir(parents=True)
    shutil.copy(second, results / "a" / "b" / "record.json")
    shutil.copytree(results / "tiny", results / "old" / "tiny")  # a whole tree: same folder names, second records

    found, skipped = records.read_all(results)
    assert sorted(r["path"] for r in found) == sorted([str(first), str(second)])  # the ones in their run folders
    reasons = {str(path.relative_to(results)): why for path, why in skipped}
    assert reasons["record.json"].startswith("a copy") and reasons["a/b/record.json"].startswith("a copy")
    assert sum(why.startswith("a second record") for why in reasons.values()) == 2

    written = build_report(results, tmp_path / "out", figure1=False)
    assert len((tmp_path / "out" / "runs.csv").read_text().splitlines()) == 1 + 2  # was 1 + 6
    assert "a copy: not in the run folder" in written["report.html"].read_text()
    _record(tmp_path / "B", 0), _record(tmp_path / "B", 1)
    _, deltas = compare_results(results, tmp_path / "B")
    assert len(deltas) == 2  # was 7 rows for 4 runs


# -- issue 24 item 11: reports refuse to mix base models --------------------------------------------------------------
@pytest.mark.slow
def test_report_refuses_records_of_two_base_models_names_the_stale_ones_and_allow_mixed_says_so(tmp_path, bench_cli):
    results, cache = tmp_path / "R", tmp_path / "cache"
    _record(results, 0, base="tiny-old", cache=cache)
    _record(results, 0, seed=1, base="tiny-old", cache=cache)
    _record(results, 1, base="tiny-new", cache=cache)
    (cache / "tiny").mkdir(parents=True)
    torch.save({"id": "tiny-new"}, cache / "tiny" / "base.pt")
    torch.save({"id": "tiny-classifier"}, cache / "tiny" / "classifier.pt")

    refused = bench_cli("report", "--results", str(results), "--no-figure1")
    assert refused.returncode != 0 and not (results / "report" / "report.html").exists()
    message = refused.stderr
    assert "base model tiny-old, classifier tiny-classifier: 2 record(s)" in message
    assert "base model tiny-new, classifier tiny-classifier: 1 record(s)" in message
    assert (f"bench run --preset tiny --protocol paper --methods original --classes 0 --seeds 0 --results {results} "
            f"--cache {cache}") in message and "--allow-mixed" in message  # the stale ones, and the way round

    written = build_report(results, tmp_path / "out", figure1=False, allow_mixed=True)  # what --allow-mixed passes
    assert "(--allow-mixed)" in written["report.html"].read_text()


def test_compare_refuses_folders_of_different_base_models_unless_allow_mixed(tmp_path):
    a, b, mixed = tmp_path / "A", tmp_path / "B", tmp_path / "M"
    _record(a, 0, base="tiny-one"), _record(b, 0, base="tiny-two", ua=80.0)
    with pytest.raises(MixedModels, match="A .* base model tiny-one.*B .* base model tiny-two"):
        compare_results(a, b)
    text, deltas = compare_results(a, b, allow_mixed=True)
    assert len(deltas) == 1 and "NOTE (--allow-mixed)" in text
    _record(mixed, 0, base="tiny-one"), _record(mixed, 1, base="tiny-two")
    with pytest.raises(MixedModels, match="preset tiny .* 2 different base models"):  # within one folder: never
        compare_results(a, mixed, allow_mixed=True)


def test_status_marks_a_record_of_an_older_base_model_stale_and_run_redoes_only_it(tmp_path, tiny_cache):
    cache, results = tmp_path / "cache", tmp_path / "results"
    shutil.copytree(tiny_cache, cache)

    def spec(forget_class: int) -> RunSpec:
        return RunSpec("tiny", "original", forget_class, 0, str(results), str(cache), device="cpu", progress=False)

    run_local([spec(0)], show_progress=False)
    base = torch.load(cache / "tiny" / "base.pt", weights_only=True)
    old_id, base["id"] = base["id"], "tiny-pretrained-again"  # what `bench pretrain --force` leaves: a new id
    torch.save(base, cache / "tiny" / "base.pt")
    run_local([spec(1)], show_progress=False)

    rows = {row.forget_class: row for row in status(results, results / ".submitit", cache)}
    assert (rows[0].state, rows[1].state) == ("stale", "done")  # was: done, done
    assert f"made with base model {old_id}, now tiny-pretrained-again" in rows[0].detail
    # without --cache: the cache each record's base model is in (the default cache here has none)
    assert status(results, results / ".submitit") == list(rows.values())
    with pytest.raises(MixedModels):
        build_report(results, tmp_path / "out", figure1=False)
    outcomes = run_local([spec(0), spec(1)], show_progress=False)
    assert [o.status for o in outcomes] == ["done", "skipped"]
    assert {row.state for row in status(results, results / ".submitit", cache)} == {"done"}


def test_a_record_of_another_evaluation_protocol_is_stale_and_run_again(tmp_path, tiny_cache, monkeypatch):
    # A new version of a built-in preset that evaluates differently: its records keep their folder (the protocol's
    # name), so only their values can tell. Preset files were covered by their hash; built-in presets were not.
    cache, results = tmp_path / "cache", tmp_path / "results"
    shutil.copytree(tiny_cache, cache)
    spec = RunSpec("tiny", "original", 0, 0, str(results), str(cache), device="cpu", progress=False)
    run_local([spec], show_progress=False)
    tiny = PRESETS["tiny"]
    steps = tiny.protocols["paper"].sampler_steps
    fewer = dataclasses.replace(tiny.protocols["paper"], sampler_steps=steps - 1)
    monkeypatch.setitem(PRESETS, "tiny", dataclasses.replace(tiny, protocols={**tiny.protocols, "paper": fewer}))

    (row,) = status(results, results / ".submitit", cache)
    assert row.state == "stale", row  # was: done
    assert f"made with another evaluation protocol: sampler_steps {steps}, now {steps - 1}" in row.detail
    (outcome,) = run_local([spec], show_progress=False)
    assert outcome.status == "done" and outcome.record["protocol"]["sampler_steps"] == steps - 1


# -- issue 26 item 1: a record holds its method's code fingerprint --------------------------------------------------
def test_a_built_in_methods_fingerprint_names_its_files_by_module_path():
    code = fingerprint.method_code(get_method("safemax"))
    assert sorted(code["files"]) == ["methods/base.py", "methods/safemax.py"]  # module paths: any checkout
    assert code == fingerprint.method_code(get_method("safemax"))


SOURCE = '''"""Module docstring."""
import torch  # a comment


def scale(x):
    """Docstring."""
    # a whole-line comment
    return x * 2.0 + len("# not a comment") + len(f"{x}#also not")  # trailing
'''


def _digest(source: str) -> str:
    import ast

    return fingerprint.runnable(source, ast.parse(source))


def test_a_fingerprint_ignores_comments_docstrings_and_blank_lines_but_not_code_or_strings():
    same = SOURCE.replace("# a comment", "# another comment").replace("Docstring.", "Says more.\n\n    Much more.")
    same = same.replace("# trailing", "").replace("\n\n\ndef", "\n\ndef") + "\n# the end\n"
    assert _digest(same) == _digest(SOURCE)
    assert _digest(SOURCE) == ('import torch\ndef scale(x):\n    return x * 2.0 + len("# not a comment") + '
                               'len(f"{x}#also not")')
    for edit in (("2.0", "3.0"), ("# not a comment", "#not a comment"), ("#also not", "# also not")):
        assert _digest(SOURCE.replace(*edit)) != _digest(SOURCE), edit


def test_a_record_fingerprinted_by_bytes_before_schemes_is_compared_by_bytes():
    method = get_method("original")
    old = {"method_code": fingerprint.method_code(method, "bytes"), "bench_code": fingerprint.bench_code(method, "bytes")}
    assert "scheme" not in old["method_code"] and fingerprint.method_code(method)["scheme"] == "code"
    assert old["method_code"]["sha256"] != fingerprint.method_code(method)["sha256"]
    assert fingerprint.code_changed(old, method) is None  # the same files: it stands
    edited = {**old["bench_code"], "sha256": "0" * 64, "files": {**old["bench_code"]["files"], "bench/unet.py": "0"}}
    assert fingerprint.code_changed({**old, "bench_code": edited}, method) == "bench code changed (bench/unet.py)"
    newer = {**fingerprint.method_code(method), "scheme": "ast-v9"}
    unknown = fingerprint.code_changed({**old, "method_code": newer}, method)
    assert unknown == "method code fingerprinted in a scheme this version does not know ('ast-v9')"


def test_the_bench_code_a_run_executes_is_fingerprinted_but_not_the_presets_or_the_commands():
    files = set(fingerprint.bench_code(get_method("safemax"))["files"])
    assert {"bench/runner.py", "bench/diffusion.py", "bench/unet.py", "bench/data.py", "bench/evaluate.py",
            "bench/metrics.py", "bench/experiment.py"} <= files
    # Presets are compared by value (hyperparameters, protocol, base model); commands and reports make no numbers
    assert not files & {"bench/config.py", "bench/cli.py", "bench/cli_common.py", "bench/orchestrate.py",
                        "bench/workers.py", "bench/status.py"}


def test_a_record_of_other_bench_code_is_stale_and_one_made_before_bench_fingerprints_stands(tmp_path, tiny_cache):
    cache, results = tmp_path / "cache", tmp_path / "results"
    shutil.copytree(tiny_cache, cache)
    run_local([RunSpec("tiny", "original", 0, 0, str(results), str(cache), device="cpu", progress=False)],
              show_progress=False)
    (record,) = records.read_all(results)[0]
    assert record["provenance"]["bench_code"] == fingerprint.bench_code(get_method("original"))
    path = Path(record.pop("path"))

    def state_after(provenance: dict):
        records.write_json_atomic(path, {**record, "provenance": provenance})
        (row,) = status(results, results / ".submitit", cache)
        return row.state, row.detail

    made = record["provenance"]["bench_code"]
    edited = {**made, "sha256": "0" * 64, "files": {**made["files"], "bench/runner.py": "0" * 64}}
    state, detail = state_after({**record["provenance"], "bench_code": edited})  # the training loop was edited since
    assert state == "stale" and detail.startswith("bench code changed (bench/runner.py)")
    page = build_report(results, tmp_path / "out", figure1=False)["report.html"].read_text()  # shown, with a note
    assert "1 of 1 record(s) were made by code that has changed since (bench code changed (bench/runner.py): 1)" in page
    assert "bench run --preset tiny --protocol paper --methods original --classes 0 --seeds 0" in page
    text, _ = compare_results(results, results)
    assert "- NOTE: 1 record(s) of B were made by code that has changed since (bench code changed" in text
    state, detail = state_after({k: v for k, v in record["provenance"].items() if k != "bench_code"})
    assert state == "done" and detail.endswith("(made before bench code fingerprints: not checked)")


def test_a_record_without_a_fingerprint_stands_and_an_edited_preset_file_makes_one_stale(tmp_path):
    method = get_method("original")
    assert code_changed({"provenance": {}}, method, "tiny") is None  # made before fingerprints: not rerun for it
    preset_file = tmp_path / "mine.yaml"
    preset_file.write_text("name: tiny-mine\nbase: tiny\n")
    load_preset_file(preset_file)
    try:
        made = {"provenance": {"method_code": fingerprint.method_code(method),
                               "preset_file": fingerprint.preset_file("tiny-mine")}}
        assert code_changed(made, method, "tiny-mine") is None
        before = {"provenance": {"preset_file": fingerprint.preset_file("tiny-mine", "bytes")}}  # before schemes
        preset_file.write_text("# my preset\nname:   tiny-mine  # the name\n\nbase: tiny\n")  # what it sets is the same
        assert code_changed(made, method, "tiny-mine") is None
        assert code_changed(before, method, "tiny-mine") == "preset file changed (mine.yaml)"  # its bytes are not
        preset_file.write_text("name: tiny-mine\nbase: tiny\niteration_scale: 0.5\n")
        assert code_changed(made, method, "tiny-mine") == "preset file changed (mine.yaml)"
    finally:  # the rest of the session knows the built-in presets only
        for registry in (PRESETS, extensions._FROM_FILES, extensions._FILES):
            registry.pop("tiny-mine", None)


PLUGIN = '''
from dataclasses import dataclass

from bench.config import TrainConfig
from methods.base import UnlearningMethod, register
from toyplug.losses import forget_term, weight


@dataclass(frozen=True)
class ToyConfig(TrainConfig):
    iterations: int = 2


@register
class Toy(UnlearningMethod):
    name = "toy"
    Config = ToyConfig

    def cache_key(self):
        return "weight"

    def prepare(self):
        return {"weight": weight()}

    def loss(self, model, batch):
        return {"loss": forget_term(model, batch, self.ctx) * self.prepared["weight"]}
'''
LOSSES = '''
import torch

from bench.diffusion import noised


def forget_term(model, batch, ctx):
    (x_f, _) = batch["forget"]
    t, _, x_t = noised(ctx.schedule, x_f, ctx.noise_generator)
    return model(x_t, t, torch.full_like(t, ctx.forget_class)).square().mean()


def weight():
    return torch.tensor(WEIGHT)


WEIGHT = 1.0
'''


@pytest.mark.slow
def test_editing_a_plugin_methods_loss_makes_its_record_stale_and_the_rerun_redoes_it(tmp_path, tiny_cache, bench_cli):
    package = tmp_path / "plugins" / "toyplug"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "toy.py").write_text(PLUGIN)
    (package / "losses.py").write_text(LOSSES)
    cache, results = tmp_path / "cache", tmp_path / "results"
    shutil.copytree(tiny_cache, cache)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "plugins"), os.environ.get("PYTHONPATH", "")])}
    command = ("--method-module", "toyplug.toy:Toy", "run", "--preset", "tiny", "--methods", "toy", "--classes", "0",
               "--results", str(results), "--cache", str(cache), "--device", "cpu", "--no-progress")
    first = bench_cli(*command, env=env)
    assert first.returncode == 0, first.stderr
    (record,) = records.read_all(results)[0]
    assert sorted(record["provenance"]["method_code"]["files"]) == ["methods/base.py", "toyplug/losses.py",
                                                                    "toyplug/toy.py"]

    (package / "losses.py").write_text('"""The loss terms."""\n' + LOSSES.replace("WEIGHT = 1.0", "WEIGHT = 1.0  # why"))
    commented = bench_cli("--method-module", "toyplug.toy:Toy", "status", "--results", str(results), "--cache",
                          str(cache), env=env)
    assert commented.returncode == 0 and " done " in commented.stdout  # a docstring and a comment: nothing ran else
    (package / "losses.py").write_text(LOSSES.replace("WEIGHT = 1.0", "WEIGHT = 2.0"))  # the loss is edited
    shown = bench_cli("--method-module", "toyplug.toy:Toy", "status", "--results", str(results), "--cache",
                      str(cache), env=env)
    assert shown.returncode == 0, shown.stderr
    assert "stale" in shown.stdout and "method code changed (toyplug/losses.py)" in shown.stdout

    again = bench_cli(*command, env=env)
    assert again.returncode == 0, again.stderr
    assert "method code changed (toyplug/losses.py); running it again" in again.stderr  # was: skipping 1 finished
    (redone,) = records.read_all(results)[0]
    assert redone["provenance"]["method_code"]["sha256"] != record["provenance"]["method_code"]["sha256"]
    # The rerun unlearned with a preparation of the edited code, not the one cached by the first run
    prepared = sorted((cache / "tiny" / "prepared" / "toy").rglob("weight-code*.pt"), key=lambda p: p.stat().st_mtime)
    assert [torch.load(path)["tensors"]["weight"].item() for path in prepared] == [1.0, 2.0]  # was: one file, 1.0

    # `bench clean` removes the old code's preparation, judged only where the plug-in is named
    unnamed = bench_cli("clean", "--cache", str(cache), env=env)
    assert unnamed.returncode == 0 and "method 'toy' is not known here" in unnamed.stdout and prepared[0].exists()
    named = bench_cli("--method-module", "toyplug.toy:Toy", "clean", "--cache", str(cache), env=env)
    assert named.returncode == 0, named.stderr
    assert f"{prepared[0]}  (other code)" in named.stdout and not prepared[0].exists() and prepared[1].exists()
