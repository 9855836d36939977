"""bench.api on a tiny run saved with --save-model: the model loads, its samples are the ones its record was measured
on, and the classifier on those samples (as a tensor or as a folder of PNGs) gives the record's numbers."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from bench import api
from bench.cache import CheckpointError


@pytest.fixture(scope="module")
def saved_run(tiny_cache, tmp_path_factory, bench_cli):
    out = tmp_path_factory.mktemp("api-run")
    result = bench_cli("run", "--preset", "tiny", "--methods", "safemax", "--classes", "2", "--seeds", "1", "--cache",
                       tiny_cache, "--results", str(out), "--save-model", "--device", "cpu", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    return out / "tiny" / "paper" / "safemax" / "default" / "class2" / "seed1"


def test_load_run_gives_the_saved_model_and_its_record(saved_run):
    model, record = api.load_run(saved_run / "record.json")
    assert record["method"] == "safemax" and record["forget_class"] == 2
    assert not model.training and next(model.parameters()).device.type == "cpu"


def test_the_runs_seed_draws_the_samples_its_metrics_came_from(saved_run, tiny_cache):
    record = json.loads((saved_run / "record.json").read_text())
    count = record["protocol"]["forget_samples"]
    images = api.sample(saved_run, label=2, n=count, seed=record["seed"])
    assert images.dtype == torch.uint8 and images.shape == (count, 1, 8, 8)
    found = api.evaluate_images(images, "tiny", label=2, cache=tiny_cache)
    for key in ("ua", "entropy", "forget_prob", "forget_histogram"):
        assert found[key] == record["metrics"][key], key
    assert found["accuracy"] == 100.0 - record["metrics"]["ua"]


def test_a_folder_of_pngs_is_evaluated_like_the_tensor(saved_run, tiny_cache, tmp_path):
    model, _ = api.load_run(saved_run)
    images = api.sample(model, label=5, n=12, seed=3)
    for index, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(tmp_path / f"{index:03d}.png")
    from_files = api.evaluate_images(tmp_path, "tiny", label=5, cache=tiny_cache)
    assert from_files == api.evaluate_images(images, "tiny", label=5, cache=tiny_cache)
    assert from_files["forget_samples"] == 12
    Image.new("L", (16, 16)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="big.png is 16x16; preset tiny evaluates 8x8 images"):
        api.evaluate_images(tmp_path, "tiny", label=5, cache=tiny_cache)


def test_a_model_without_its_run_needs_the_preset(saved_run):
    model, _ = api.load_run(saved_run)
    del model.run_record
    with pytest.raises(ValueError, match="needs preset=NAME"):
        api.sample(model, label=0, n=2)
    assert api.sample(model, label=0, n=2, preset="tiny").shape == (2, 1, 8, 8)


def test_a_run_without_a_saved_model_says_how_to_get_one(debug_sweep):
    folder = debug_sweep / "tiny" / "paper" / "safemax" / "default" / "class0" / "seed0"
    with pytest.raises(CheckpointError, match="--save-model --force"):
        api.load_run(folder)
    with pytest.raises(FileNotFoundError, match="holds no record.json"):
        api.load_run(debug_sweep)
