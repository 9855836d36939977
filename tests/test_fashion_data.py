"""Fashion-MNIST from Debian's dataset-fashion-mnist package: full splits, labels 0-9, pixels in [-1, 1]."""

from __future__ import annotations

import functools

import pytest
import torch

from bench.data import FASHION_MNIST_ROOT, load_dataset, load_fashion_mnist


def needs_package(test):
    """The Makefile installs Debian's dataset-fashion-mnist; without it these tests fail and say so."""

    def checked(*args, **kwargs):
        assert (FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), (
            "Debian package dataset-fashion-mnist is not installed: `make install` installs it")
        return test(*args, **kwargs)

    return functools.wraps(test)(checked)


@needs_package
@pytest.mark.parametrize("split, count", [("train", 60_000), ("test", 10_000)])
def test_full_splits_with_balanced_labels_in_range(split, count):
    data = load_dataset("fashion", split, image_size=28)
    assert data.images.shape == (count, 1, 28, 28) and data.images.dtype == torch.float32
    assert torch.equal(torch.bincount(data.labels), torch.full((10,), count // 10))
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert data.source == "Fashion-MNIST" and data.class_names[9] == "Ankle boot"


@needs_package
def test_a_larger_image_size_pads_with_the_background():
    data = load_fashion_mnist("test", image_size=32)
    assert data.images.shape[-2:] == (32, 32)
    assert torch.all(data.images[:, :, :2, :] == -1.0)


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_dataset("fashion", "train", image_size=28, root=tmp_path)


def test_fashion_preset_scales_the_paper_and_fits_its_data():
    from bench.config import get_preset

    preset = get_preset("fashion")
    assert (preset.dataset, preset.unet.image_size, preset.unet.in_channels) == ("fashion", 28, 1)
    assert preset.protocol(None).fid_features == "classifier" and preset.iteration_scale == 0.5
    assert preset.pretrain.iterations == 40_000


@needs_package
@pytest.mark.slow
def test_fashion_preset_runs_end_to_end_on_the_cpu(tmp_path, bench_cli):
    """Mechanics on the real data set: a 2-step base model and classifier, 2 SAFEMax steps, a few samples."""
    import json

    common = ("--preset", "fashion", "--cache", str(tmp_path / "cache"), "--device", "cpu")
    for args in [("pretrain", *common, "--iterations", "2", "--batch-size", "4"),
                 ("classifier", *common, "--steps", "2", "--batch-size", "16", "--test-images", "100"),
                 ("run", *common, "--methods", "safemax", "--classes", "7", "--out", str(tmp_path / "results"),
                  "--no-progress", "--set", "safemax.iterations=2", "--set", "safemax.batch_size=4",
                  "--set", "protocol.sampler_steps=2", "--set", "protocol.forget_samples=8",
                  "--set", "protocol.retain_samples_per_class=4", "--set", "protocol.noise_samples=8",
                  "--set", "protocol.fid_reference_per_class=20")]:
        result = bench_cli(*args, timeout_s=600)
        assert result.returncode == 0, result.stdout + result.stderr
    [path] = (tmp_path / "results").rglob("record.json")
    record = json.loads(path.read_text())
    assert record["dataset"] == "Fashion-MNIST" and record["forget_class_name"] == "Sneaker"
    assert record["fid"]["reference_images"] == 180 and record["fid"]["features"].startswith("evaluation classifier")
    assert record["scaled_from_paper"]["iterations"] == {"paper": 1000, "preset": 500}
    assert record["hyperparameters"]["iterations"] == 2 and record["overrides"]["method"]["iterations"] == 2
