"""Preset files: every field checked before any work, names that stay in their folders, models fit to evaluate
with, and base models and classifiers shared by what determines them (issue 24 items 7-8, issue 26 item 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bench.cli import main


def _bench(*args: str):
    return CliRunner().invoke(main, list(args))


def _tiny_copy(tiny_cache: str, root: Path) -> Path:
    """A cache holding a copy of the session's tiny base model and classifier (the tests write next to them)."""
    (root / "tiny").mkdir(parents=True)
    for name in ("base.pt", "classifier.pt"):
        shutil.copy(Path(tiny_cache) / "tiny" / name, root / "tiny" / name)
    return root


def _run(tmp_path: Path, text: str, name: str, cache: Path, methods: str = "original"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nbase: tiny\n{text}\n")
    return _bench("--preset-file", str(path), "run", "--preset", name, "--methods", methods, "--classes", "0",
                  "--cache", str(cache), "--results", str(tmp_path / "results"), "--device", "cpu", "--no-progress")


def _records(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "results").rglob("record.json"))]


@pytest.mark.parametrize(("text", "message"), [
    ("classifier: {epochs: 0}", "classifier.epochs must be >= 1, got 0"),
    ("classifier: {epochs: -1}", "classifier.epochs must be >= 1, got -1"),
    ("pretrain: {iterations: 0}", "pretrain.iterations must be >= 1, got 0"),
    ("diffusion: {beta_end: 5}", "diffusion.beta_end must be <= 0.999, got 5"),
    ("diffusion: {beta_start: 0.05}", "diffusion.beta_start (0.05) must be <= diffusion.beta_end (0.02)"),
    ("unet: {ch: 100000000}", "unet.ch must be <= 1024"),
    ("unet: {ch: 1024, ch_mult: [16, 16, 16]}", "more than 1,000,000,000; make unet.ch"),
    ("unet: {num_classes: 5}", "unet.num_classes must be 10 for the digits data set"),
    ("pretrain: {batch_size: 1000000000}", "pretrain.batch_size must be <= 100000"),
    ("iteration_scale: -1", "iteration_scale must be > 0, got -1"),
    ("checkpoint_every: 0", "checkpoint_every must be >= 1, got 0"),
    ("unlearn_batch_size: 2.5", "unlearn_batch_size must be an integer"),
    ("protocols: {paper: {sampler_steps: 0}}", "protocols.paper.sampler_steps must be >= 1"),
    ("diffusion: {timesteps: 1}", "protocols.paper.sampler_steps (2) must be <= diffusion.timesteps (1)"),
    ("min_classifier_accuracy: 2", "min_classifier_accuracy must be <= 1"),
])
def test_a_bad_field_is_named_before_any_work(tmp_path, text, message):
    result = _run(tmp_path, text, "bad", tmp_path / "cache")
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("name", ["x/../tiny", "../escaped", "/tmp/absolute", "a b", ""])
def test_a_preset_name_is_an_identifier(tmp_path, tiny_cache, name):
    cache = _tiny_copy(tiny_cache, tmp_path / "cache")
    before = (cache / "tiny" / "base.pt").read_bytes()
    path = tmp_path / "a.yaml"
    path.write_text(f"name: {json.dumps(name)}\nbase: tiny\n")
    result = _bench("--preset-file", str(path), "pretrain", "--preset", name, "--iterations", "2", "--cache",
                    str(cache), "--device", "cpu")
    assert result.exit_code == 1 and "must be an identifier: letters, digits, _ and - only" in result.output
    assert (cache / "tiny" / "base.pt").read_bytes() == before
    assert sorted(p.name for p in cache.iterdir()) == ["tiny"] and not (tmp_path / "escaped").exists()


def test_a_preset_that_changes_only_the_protocol_reuses_the_base_model(tmp_path, tiny_cache):
    cache = _tiny_copy(tiny_cache, tmp_path / "cache")
    tiny_id = torch.load(cache / "tiny" / "base.pt", weights_only=True)["id"]
    result = _run(tmp_path, "protocols: {paper: {sampler_steps: 3}}", "tinyfast", cache)
    assert result.exit_code == 0, result.output
    [record] = _records(tmp_path)
    assert record["preset"] == "tinyfast" and record["protocol"]["sampler_steps"] == 3
    assert record["base_model"]["id"] == tiny_id and record["base_model"]["step"] == 30
    # nothing pretrained, no folder of its own (datasets/ holds the decoded data every preset shares)
    assert sorted(p.name for p in cache.iterdir()) == ["datasets", "tiny"]
    assert not (cache / "tiny" / "base.partial.pt").exists()


def test_a_preset_that_changes_pretraining_builds_its_own_base_model(tmp_path, tiny_cache):
    cache = _tiny_copy(tiny_cache, tmp_path / "cache")
    tiny = torch.load(cache / "tiny" / "base.pt", weights_only=True)
    tiny_classifier = torch.load(cache / "tiny" / "classifier.pt", weights_only=True)["id"]
    result = _run(tmp_path, "pretrain: {iterations: 4}", "tinyshort", cache)
    assert result.exit_code == 0, result.output
    [record] = _records(tmp_path)
    [own] = [p for p in cache.iterdir() if p.name not in ("tiny", "datasets")]
    assert own.name.startswith("digits-") and record["base_model"]["path"] == str(own / "base.pt")
    assert record["base_model"]["id"].startswith(own.name) and record["base_model"]["step"] == 4
    assert record["classifier"]["id"] == tiny_classifier  # the classifier does not depend on pretraining
    assert torch.load(cache / "tiny" / "base.pt", weights_only=True)["id"] == tiny["id"]


def test_base_model_names_the_base_model_a_preset_reuses(tmp_path):
    fine = tmp_path / "fine.yaml"
    fine.write_text("name: reuser\nbase: tiny\nbase_model: tiny\nprotocols: {paper: {guidance: 1.0}}\n")
    assert _bench("--preset-file", str(fine), "ls").exit_code == 0
    changed = tmp_path / "changed.yaml"
    changed.write_text("name: changer\nbase: tiny\nbase_model: tiny\npretrain: {iterations: 40}\nunet: {dropout: 0}\n")
    result = _bench("--preset-file", str(changed), "ls")
    assert result.exit_code == 1
    assert "base_model 'tiny', but this preset changes unet.dropout, pretrain.iterations" in result.output


def test_no_run_evaluates_with_a_classifier_below_the_floor(tmp_path, tiny_cache):
    cache = _tiny_copy(tiny_cache, tmp_path / "cache")
    # A classifier that learned nothing: 1e-9 is a valid learning rate, so it trains (its own, in its own folder).
    result = _run(tmp_path, "classifier: {lr: 1.0e-9}", "deaf", cache)
    assert result.exit_code == 1 and "test accuracy, below min_classifier_accuracy 55.00% of preset deaf" in \
        result.output, result.output
    assert "classifier.lr, now 1e-09" in result.output and not _records(tmp_path)
    # The floor is a preset field: tiny's own classifier is refused by a preset asking for more.
    strict = _run(tmp_path, "min_classifier_accuracy: 0.99", "strict", cache)
    assert strict.exit_code == 1 and "below min_classifier_accuracy 99.00% of preset strict" in strict.output
    assert not _records(tmp_path)


def test_no_run_starts_from_an_untrained_base_model(tmp_path, tiny_cache):
    cache = _tiny_copy(tiny_cache, tmp_path / "cache")
    payload = torch.load(cache / "tiny" / "base.pt", weights_only=True)
    torch.save({**payload, "step": 0}, cache / "tiny" / "base.pt")
    result = _bench("run", "--preset", "tiny", "--methods", "original", "--classes", "0", "--cache", str(cache),
                    "--results", str(tmp_path / "results"), "--device", "cpu", "--no-progress")
    assert result.exit_code == 1 and "was trained for 0 steps: no base model to unlearn from" in result.output
    assert not _records(tmp_path)


def test_a_new_protocol_starts_from_the_base_presets_default_protocol(tmp_path):
    """`protocols: {fast: {sampler_steps: 3}}` on tiny keeps tiny's sample counts (not the paper's CIFAR-10 ones)."""
    from bench.config import get_preset
    from bench.extensions import load_preset_file

    path = tmp_path / "twop.yaml"
    path.write_text("name: twoprotocols\nbase: tiny\nprotocols:\n  fast: {sampler_steps: 3}\n")
    preset, tiny = load_preset_file(path), get_preset("tiny")
    fast, paper = preset.protocol("fast"), tiny.protocol(None)
    assert fast.name == "fast" and fast.sampler_steps == 3
    assert (fast.forget_samples, fast.retain_samples_per_class) == (paper.forget_samples, paper.retain_samples_per_class)
    assert preset.protocol("paper") == paper
