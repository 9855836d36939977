"""`bench export` and the errors a user can cause around it (issue 24 items 9, 14, 15; issue 26 item 5).

Exports lose no data (never into a run folder, never over a file without --force, never a file outside the run),
carry the UNet configuration so that the file alone rebuilds the model, and are byte-for-byte reproducible. A
plug-in module that fails on import, a manifest without runs, a checkpoint whose step is not one integer, an
unwritable --csv and a record of a newer schema each get a message naming the file and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from bench import records
from bench.cache import Cache, CheckpointError
from bench.checkpoints import export_published_checkpoint, import_published_checkpoint, load_exported, read_published
from bench.cli import main
from bench.config import get_preset
from bench.experiment import save_model
from bench.orchestrate import run_local
from bench.status import status
from bench.sweep import Sweep, build_specs
from bench.unet import ConditionalUNet


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _predict(model: ConditionalUNet) -> torch.Tensor:
    config, generator = model.config, torch.Generator().manual_seed(0)
    x = torch.randn(4, config.in_channels, config.image_size, config.image_size, generator=generator)
    with torch.no_grad():
        return model.eval()(x, torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, -1]))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_cache) -> Path:
    """The folder of one tiny safemax run that kept its model (`--save-model`)."""
    out = tmp_path_factory.mktemp("export")
    spec = build_specs(get_preset("tiny"), ["safemax"], [0], [0], Sweep({}, {}), results=str(out), cache=tiny_cache,
                       device="cpu", progress=False, save_model=True)[0]
    assert run_local([spec])[0].status == "done"
    return Path(spec.directory)


def _copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of `run` in the same layout under `tmp_path`, to edit."""
    copy = tmp_path.joinpath("results", *run.parts[-6:])
    shutil.copytree(run, copy)
    return copy


# -- reproducible model files (issue 24 item 15) ---------------------------------------------------------------
def test_the_same_weights_give_the_same_model_file_and_hash(tmp_path):
    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = ConditionalUNet(preset.unet)
    spec = build_specs(preset, ["safemax"], [0], [0], Sweep({}, {}), results=str(tmp_path))[0]
    saved = []
    for name in ("a", "b"):  # two saves, as two identical runs make: the safetensors package ordered them at random
        (tmp_path / name).mkdir()
        saved.append(save_model(model, tmp_path / name, preset, spec, {"id": "base-1"}))
    assert saved[0]["sha256"] == saved[1]["sha256"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


# -- what an export holds (issue 26 item 5) ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt, name", [("safetensors", "model.safetensors"), ("published", "ckpt.pth")])
def test_an_export_rebuilds_the_unet_from_the_file_alone(saved_run, tmp_path, fmt, name):
    record = records.read_record(saved_run / "record.json")
    written = _invoke("export", saved_run, "--format", fmt, "--to", tmp_path / name)
    assert written.exit_code == 0, written.output

    rebuilt, metadata = load_exported(tmp_path / name)

    original = ConditionalUNet(get_preset("tiny").unet)
    original.load_state_dict(load_file(str(saved_run / "model.safetensors")))
    assert torch.equal(_predict(rebuilt), _predict(original))
    assert list(metadata) == ["format", "preset", "method", "variant", "forget_class", "seed", "base_id", "unet"]
    assert (metadata["preset"], metadata["method"], metadata["forget_class"], metadata["seed"]) == ("tiny", "safemax",
                                                                                                  "0", "0")
    again = _invoke("export", saved_run, "--format", fmt, "--to", tmp_path / f"again-{name}")
    assert again.exit_code == 0, again.output
    assert (tmp_path / name).read_bytes() == (tmp_path / f"again-{name}").read_bytes()
    if fmt == "published":  # still the 4-item list the published code loads
        states = read_published(tmp_path / name)
        assert len(states) == 4 and all(key.startswith("module.") for key in states[0])
        optimizer = torch.optim.Adam(original.parameters())
        optimizer.load_state_dict(states[1])  # the metadata rides along without breaking the optimizer's load
    else:  # the run's own file, so the hash in its record identifies the export too
        assert (tmp_path / name).read_bytes() == (saved_run / "model.safetensors").read_bytes()
        assert records.read_record(saved_run / "record.json")["artifacts"] == record["artifacts"]


# -- exports lose no data (issue 24 item 9) -----------------------------------------------------------------------
@pytest.mark.parametrize("target", ["record.json", "model.safetensors", "sub/ckpt.pth"])
def test_an_export_into_a_run_folder_is_refused(saved_run, target):
    before = {p.name: p.read_bytes() for p in saved_run.iterdir() if p.is_file()}
    result = _invoke("export", saved_run, "--format", "safetensors", "--to", saved_run / target)
    assert result.exit_code == 1 and "inside the run folder" in result.output
    assert {p.name: p.read_bytes() for p in saved_run.iterdir() if p.is_file()} == before
    assert records.read_record(saved_run / "record.json")  # the run is still done


def test_an_export_replaces_a_file_only_with_force(saved_run, tmp_path):
    target = tmp_path / "ckpt.pth"
    target.write_text("someone's file")
    refused = _invoke("export", saved_run, "--to", target)
    assert refused.exit_code == 1 and "already exists; pass --force" in refused.output
    assert target.read_text() == "someone's file"
    assert _invoke("export", saved_run, "--to", target, "--force").exit_code == 0
    assert len(read_published(target)) == 4


def test_a_folder_that_is_not_a_run_is_named(saved_run, tmp_path):
    result = _invoke("export", saved_run.parent, "--to", tmp_path / "ckpt.pth")
    assert result.exit_code == 1 and "is not a run folder" in result.output
    assert not (tmp_path / "ckpt.pth").exists()


@pytest.mark.parametrize("model, error", [
    ({"path": "../../../../../../../secret.safetensors", "sha256": "0"}, "points outside the run folder"),
    ({"path": "/etc/hostname", "sha256": "0"}, "points outside the run folder"),
    ("model.safetensors", "artifacts.model should be"),
    ({"path": 3, "sha256": "0"}, "artifacts.model should be"),
])
def test_an_export_reads_only_the_model_inside_the_run_folder(saved_run, tmp_path, model, error):
    run = _copy_run(saved_run, tmp_path)
    shutil.copyfile(saved_run / "model.safetensors", tmp_path / "secret.safetensors")
    record = json.loads((run / "record.json").read_text())
    record["artifacts"]["model"] = model
    (run / "record.json").write_text(json.dumps(record))
    result = _invoke("export", run, "--format", "safetensors", "--to", tmp_path / "out.safetensors")
    assert result.exit_code == 1 and error in result.output, result.output
    assert isinstance(result.exception, SystemExit)  # a message, no TypeError
    assert not (tmp_path / "out.safetensors").exists()


# -- named errors (issue 24 item 14) ------------------------------------------------------------------------------
@pytest.mark.parametrize("body, line, named", [
    ("import os\n\nraise RuntimeError('boom in the plug-in')\n", 3, "RuntimeError: boom in the plug-in"),
    ("def broken(:\n    pass\n", 1, "SyntaxError"),
    ("import sys\nsys.exit(3)\n", 2, "sys.exit(3)"),
])
@pytest.mark.slow
def test_a_plugin_module_that_fails_on_import_is_named(tmp_path, bench_cli, body, line, named):
    package = tmp_path / "brokenplugin"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "method.py").write_text(body)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = bench_cli("--method-module", "brokenplugin.method:Mine", "ls", env=env)
    assert result.returncode == 1, result.stderr
    assert "brokenplugin.method" in result.stderr and f"{package / 'method.py'}:{line}" in result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr


def test_a_manifest_without_runs_is_skipped_with_a_warning(saved_run, tmp_path, caplog):
    results = saved_run.parents[5]
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "submission-1.json").write_text(json.dumps({"cluster": "local"}))
    with caplog.at_level(logging.WARNING):
        rows = status(results, jobs)
    assert [row.state for row in rows] == ["done"]
    assert "submission-1.json" in caplog.text and "no `runs` list" in caplog.text


def test_a_published_checkpoint_whose_step_is_not_one_integer_names_the_file(tmp_path):
    preset = get_preset("tiny")
    weights = ConditionalUNet(preset.unet).state_dict()
    src = export_published_checkpoint({"format": "unlearning-bench/1", "kind": "diffusion", "model": weights,
                                       "ema": weights, "step": 5}, tmp_path / "ckpt.pth")
    states = torch.load(src, weights_only=True)
    states[2] = torch.tensor([4, 4])
    torch.save(states, src)
    with pytest.raises(CheckpointError) as error:
        import_published_checkpoint(src, preset, Cache(tmp_path / "cache"))
    assert str(src) in str(error.value) and "shape (2,)" in str(error.value) and "int(step)" in str(error.value)
    states[2] = torch.tensor(4)  # one element is a step
    torch.save(states, src)
    assert torch.load(import_published_checkpoint(src, preset, Cache(tmp_path / "cache")),
                      weights_only=True)["step"] == 5


def test_compare_csv_to_an_unwritable_path_is_a_clear_error(saved_run, tmp_path):
    results = saved_run.parents[5]
    (tmp_path / "a-file").write_text("")
    result = _invoke("compare", results, results, "--csv", tmp_path / "a-file" / "deltas.csv")
    assert result.exit_code == 1 and "cannot write --csv" in result.output
    assert isinstance(result.exception, SystemExit)


def test_a_record_of_a_newer_schema_is_not_taken_as_done(saved_run, tmp_path):
    run = _copy_run(saved_run, tmp_path)
    record = json.loads((run / "record.json").read_text())
    record["schema"] = 99
    (run / "record.json").write_text(json.dumps(record))
    with pytest.raises(records.CorruptRecord) as error:
        records.read_record(run / "record.json")
    assert str(error.value).endswith("made by a newer version of unlearning-bench (schema 99; this one reads 1-2): "
                                     "rerun with --force or upgrade")
    assert [row.state for row in status(tmp_path / "results", tmp_path / "jobs")] == ["failed"]
