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
