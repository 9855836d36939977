"""The paper's setting: the cifar10 preset's protocol numbers, the ResNet34 classifier, FID wired into runs, and
one `bench run --preset cifar10` end to end on the CPU (mechanics only: every count overridden to a handful)."""

from __future__ import annotations

import dataclasses
import json
import os
import urllib.error
from pathlib import Path

import pytest
import torch

from bench.cache import Cache
from bench.classifier import ResNetClassifier, build_classifier, initialize, load_classifier
from bench.config import ClassifierConfig, get_preset
from bench.evaluate import fid_scorer, reference_images
from bench.prerequisites import load_classifier_payload, train_classifier
from bench.sweep import RunSpec, resolve_protocol

# ../shared beside the repository, or $BENCH_SHARED (as in test_cifar_data.py).
SHARED = Path(os.environ.get("BENCH_SHARED", Path(__file__).resolve().parents[2] / "shared"))
JPEG_ROOT = SHARED / "datasets" / "cifar10-jpeg"


def test_paper_and_fast_protocols_take_their_counts_from_the_preset():
    preset = get_preset("cifar10")
    paper = resolve_protocol(preset, RunSpec(preset="cifar10", method="safemax", forget_class=0, seed=0, results="results"))
    assert (paper.name, paper.sampler_steps, paper.eta, paper.guidance) == ("paper", 1000, 1.0, 2.0)
    assert (paper.forget_samples, paper.retain_samples_per_class, paper.fid_reference_per_class) == (500, 5000, None)
    assert paper.fid_features == "inception"
    fast = resolve_protocol(preset, RunSpec(preset="cifar10", method="safemax", forget_class=0, seed=0, results="results",
                                            protocol="fast"))
    assert (fast.sampler_steps, fast.retain_samples_per_class, fast.fid_features) == (100, 1000, "inception")
    recipe = preset.pretrain
    assert (recipe.iterations, recipe.batch_size, recipe.lr, recipe.ema_decay) == (800_000, 128, 2e-4, 0.9999)
    assert (preset.diffusion.timesteps, preset.iteration_scale, preset.unlearn_batch_size) == (1000, 1.0, 128)
    assert (preset.classifier.arch, preset.classifier.weights, preset.classifier.input_size) == ("resnet34", "imagenet", 224)


def test_resnet34_classifier_resizes_and_gives_512_d_features_and_probabilities():
    model = build_classifier(ClassifierConfig(arch="resnet34", input_size=64), in_channels=3, num_classes=10).eval()
    grey = build_classifier(ClassifierConfig(arch="resnet34", input_size=64), in_channels=1, num_classes=10).eval()
    with torch.no_grad():
        assert model.features(torch.rand(2, 3, 32, 32) * 2 - 1).shape == (2, 512)
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
        assert grey(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_imagenet_weights_fine_tune_the_body_slower_and_fall_back_to_scratch_offline(monkeypatch):
    from torchvision.models import ResNet34_Weights, resnet34

    config = get_preset("cifar10").classifier
    published = resnet34().state_dict()
    monkeypatch.setattr(ResNet34_Weights.IMAGENET1K_V1.__class__, "get_state_dict",
                        lambda self, *args, **kwargs: published)
    model = build_classifier(config, 3, 10)
    origin, lrs = initialize(model, config)
    assert "ImageNet" in origin and torch.equal(model.body.conv1.weight, published["conv1.weight"])
    assert lrs["head.weight"] == 1e-4 and lrs["body.conv1.weight"] == 1e-5

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(ResNet34_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    origin, lrs = initialize(build_classifier(config, 3, 10), config)
    assert origin.startswith("trained from scratch (ImageNet weights unavailable") and set(lrs.values()) == {1e-3}


def test_a_resnet_classifier_records_its_origin_and_test_accuracy_and_loads_back(tmp_path):
    tiny = get_preset("tiny")
    preset = dataclasses.replace(tiny, name="tiny-resnet", classifier=ClassifierConfig(
        arch="resnet34", epochs=1, batch_size=16, lr=1e-3, weights="none", input_size=32))
    cache = Cache(tmp_path)
    payload = train_classifier(preset, cache, torch.device("cpu"), steps=3, test_images=40, progress=False)
    assert payload["source"].startswith("trained from scratch (seed 0); 3 steps of batch 16")
    assert payload["test_images"] == 40 and 0.0 <= payload["test_accuracy"] <= 1.0
    loaded = load_classifier(load_classifier_payload(preset, cache), preset, torch.device("cpu"))
    assert isinstance(loaded, ResNetClassifier)
    assert torch.equal(loaded.head.weight, payload["model"]["head.weight"])


def test_classifier_fid_is_lower_for_real_retained_images_than_for_the_forget_class(tiny_cache, tmp_path):
    preset, cache = get_preset("tiny"), Cache(tiny_cache)
    classifier = load_classifier(load_classifier_payload(preset, cache), preset, torch.device("cpu"))
    train, test = cache.dataset(preset, "train"), cache.dataset(preset, "test")
    protocol = preset.protocol(None)
    scorer = fid_scorer(protocol, train, 3, classifier, tmp_path, torch.device("cpu"), progress=False)
    assert scorer.description["reference_images"] == len(train.retain(3))
    assert list(tmp_path.glob("*-retain3-*-classifier-*.npz"))
    held_out_retained, forget = test.retain(3).images, test.forget(3).images
    assert scorer(held_out_retained) < scorer(forget)
    subset = reference_images(train, 3, per_class=5)
    assert len(subset) == 45 and 3 not in subset.labels.tolist()


@pytest.mark.skipif(not JPEG_ROOT.is_dir(), reason=f"no CIFAR-10 JPEG copy at {JPEG_ROOT} (set BENCH_SHARED)")
@pytest.mark.slow
def test_cifar10_fast_protocol_runs_end_to_end_on_the_cpu_with_inception_fid(tmp_path, bench_cli):
    """Mechanics only: a 2-step base model, a 1-step ResNet34, 1 SAFEMax iteration, 2 sampler steps, 2 + 9 sampled images."""
    common = ("--preset", "cifar10", "--cache", str(tmp_path / "cache"), "--data-root", str(JPEG_ROOT),
              "--device", "cpu")
    steps = [("pretrain", *common, "--iterations", "2", "--batch-size", "2"),
             ("classifier", *common, "--steps", "1", "--batch-size", "2", "--test-images", "8"),
             ("run", *common, "--protocol", "fast", "--methods", "safemax", "--classes", "0", "--out",
              str(tmp_path / "results"), "--no-progress", "--set", "safemax.iterations=1",
              "--set", "safemax.batch_size=2", "--set", "protocol.sampler_steps=2",
              "--set", "protocol.forget_samples=2", "--set", "protocol.retain_samples_per_class=1",
              "--set", "protocol.noise_samples=2", "--set", "protocol.fid_reference_per_class=1",
              "--set", "protocol.inception_weights=fid-helper")]
    outputs = []
    for args in steps:
        result = bench_cli(*args, timeout_s=900)
        assert result.returncode == 0, result.stdout + result.stderr
        outputs.append(result.stdout + result.stderr)
    # The first command on the empty cache decodes the 50,000 JPEGs once and keeps them; the next ones read them
    train = JPEG_ROOT / "train"
    assert f"decoded 50000 images from {train}" in outputs[0]
    assert all(f"read 50000 decoded images of {train}" in out and "decoded 50000 images" not in out
               for out in outputs[1:]), outputs[1:]
    assert outputs[2].count("(a smoke-test classifier: its metrics are mechanics only)") == 1  # was once per load
    [path] = (tmp_path / "results").rglob("record.json")
    record = json.loads(path.read_text())
    assert record["dataset"] == "CIFAR-10 (JPEG copy)"
    assert record["protocol"]["name"] == "fast" and record["protocol"]["sampler_steps"] == 2
    assert record["fid"]["features"].startswith("inception") and "fid-helper" in record["fid"]["weights"]
    assert record["fid"]["reference_images"] == 9 and record["metrics"]["retain_samples"] == 9
    assert record["metrics"]["fid"] > 0 and record["timings"]["iterations"] == 1
    assert "smoke test" in record["base_model"]["source"] and "smoke test" in record["classifier"]["source"]
    reference = tmp_path / "cache" / "cifar10" / "fid-reference"
    assert list(reference.glob("cifar-10--jpeg-copy-retain0-n9-inception-code*.npz"))
