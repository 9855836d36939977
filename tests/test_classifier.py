"""The evaluation classifiers: heads, shapes, errors, and the digits classifier's behaviour on noise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.cache import Cache
from bench.classifier import CosineHead, build_classifier, load_classifier, predict
from bench.config import ClassifierConfig, get_preset
from bench.prerequisites import train_classifier


def entropy(probs: torch.Tensor) -> float:
    return float(-(probs * probs.clamp_min(1e-12).log()).sum(1).mean())


def test_cosine_head_bounds_the_logits_by_its_scale():
    head = CosineHead(dim=32, num_classes=10, scale=16.0)
    features = torch.randn(64, 32) * 1000  # however large the features, the logits stay in [-scale, scale]
    logits = head(features)
    assert logits.abs().max() <= 16.0 + 1e-4
    assert torch.allclose(head(features), head(features / 1000), atol=1e-4)  # only the direction counts


@pytest.mark.parametrize("arch, head, dim", [("small_cnn", "linear", 128), ("flat_cnn", "cosine", 64 * 2 * 2),
                                             ("flat_cnn", "linear", 64 * 2 * 2)])
def test_classifier_shapes(arch, head, dim):
    model = build_classifier(ClassifierConfig(arch=arch, head=head), in_channels=1, num_classes=10, image_size=8)
    probs, features = predict(model, torch.rand(5, 1, 8, 8) * 2 - 1)
    assert probs.shape == (5, 10) and features.shape == (5, dim)
    assert torch.allclose(probs.sum(1), torch.ones(5))


def test_unknown_head_lists_the_choices():
    with pytest.raises(ValueError, match="linear, cosine"):
        build_classifier(ClassifierConfig(head="softmax"), in_channels=1, num_classes=10)


def test_mixup_training_records_its_settings(tmp_path):
    preset = get_preset("tiny")
    payload = train_classifier(preset, Cache(tmp_path), torch.device("cpu"), progress=False, steps=3)
    assert payload["config"]["mixup"] == 1.0 and payload["config"]["head"] == "cosine"
    assert "smoke test" in payload["source"]


@pytest.mark.slow
def test_digits_classifier_labels_saturated_noise_as_one_class_with_high_entropy(tmp_path):
    """What makes UA and H readable: SAFEMax's forget samples are saturated (+-1) noise, SA's uniform noise.

    As the paper's ResNet34 does with CIFAR-10 noise ("bird", H ~1.1), the digits classifier must put such noise
    in one class, so that UA dips on that class alone, and be less sure of it than of real digits.
    """
    preset = get_preset("digits")
    payload = train_classifier(preset, Cache(tmp_path), torch.device("cpu"), progress=False)
    assert payload["test_accuracy"] >= 0.97
    model = load_classifier(payload, preset, torch.device("cpu"))
    digit_entropy = entropy(predict(model, Cache(tmp_path).dataset(preset, "test").images)[0])
    check = payload["noise_check"]  # stored with the classifier, 1,000 images of each kind
    for kind in ("saturated", "uniform"):
        assert check[kind]["top_fraction"] >= 0.85, (kind, check[kind]["histogram"])
        assert check[kind]["entropy"] > digit_entropy + 0.2, (kind, check[kind]["entropy"], digit_entropy)


def test_a_classifier_checkpoint_from_another_config_is_refused(tmp_path):
    """A cache classifier trained with the old head must not be silently reused by a preset that changed it."""
    from bench.cache import CheckpointError
    from bench.prerequisites import load_classifier_payload

    preset = get_preset("tiny")
    cache = Cache(tmp_path)
    train_classifier(preset, cache, torch.device("cpu"), progress=False, steps=1)
    changed = dataclasses.replace(preset, classifier=dataclasses.replace(preset.classifier, head="linear"))
    with pytest.raises(CheckpointError, match="bench classifier --preset tiny"):
        load_classifier_payload(changed, cache)


def test_noise_kinds():
    from bench.classifier import noise_images

    generator = torch.Generator().manual_seed(0)
    assert set(noise_images("saturated", 50, (1, 8, 8), generator).unique().tolist()) == {-1.0, 1.0}
    for kind in ("gaussian", "uniform"):
        images = noise_images(kind, 50, (1, 8, 8), generator)
        assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.4
    with pytest.raises(ValueError, match="gaussian, uniform, saturated"):
        noise_images("pink", 1, (1, 8, 8), generator)
