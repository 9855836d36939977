"""CIFAR-10 from both layouts: an ImageFolder tree (the JPEG copy) and a torchvision `cifar-10-batches-py` root; data
sets kept decoded in the cache."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, ImageFolder

from bench import data
from bench.data import CIFAR10_CLASSES, load_cifar10, load_dataset, load_digits

PER_CLASS = 2


def shared_dir() -> Path:
    """../shared beside the repository, or $BENCH_SHARED."""
    return Path(os.environ.get("BENCH_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    """A copy of the first PER_CLASS training JPEGs of every class of the shared JPEG copy."""
    source = shared_dir() / "datasets" / "cifar10-jpeg"
    if not (source / "train").is_dir():
        pytest.skip(f"no CIFAR-10 JPEG copy at {source} (set BENCH_SHARED)")
    root = tmp_path_factory.mktemp("cifar10-jpeg")
    for name in sorted(p.name for p in (source / "train").iterdir()):
        (root / "train" / name).mkdir(parents=True)
        for path in sorted((source / "train" / name).iterdir())[:PER_CLASS]:
            shutil.copy(path, root / "train" / name / path.name)
    return root


def test_the_shared_jpeg_copy_has_one_folder_per_class_in_label_order(jpeg_root):
    # ImageFolder, and our reader, number folders in sorted order: it must be CIFAR-10's label order.
    assert tuple(sorted(p.name for p in (jpeg_root / "train").iterdir())) == CIFAR10_CLASSES
    assert ImageFolder(str(jpeg_root / "train")).class_to_idx == {name: i for i, name in enumerate(CIFAR10_CLASSES)}


def test_image_folder_layout_gives_cifar_labels_and_says_jpeg_copy(jpeg_root):
    data = load_dataset("cifar10", "train", image_size=32, root=jpeg_root)
    assert data.source == "CIFAR-10 (JPEG copy)" and data.class_names == CIFAR10_CLASSES
    assert torch.equal(data.labels, torch.arange(10).repeat_interleave(PER_CLASS))
    assert data.images.shape == (10 * PER_CLASS, 3, 32, 32)
    # The first ship (label 8) is the first JPEG of ship/, decoded and scaled to [-1, 1].
    first_ship = sorted((jpeg_root / "train" / "ship").iterdir())[0]
    pixels = torch.from_numpy(np.array(Image.open(first_ship).convert("RGB"))).permute(2, 0, 1).float()
    assert torch.allclose(data.images[8 * PER_CLASS], pixels / 127.5 - 1.0)


def test_a_folder_tree_without_every_cifar_class_is_refused(jpeg_root, tmp_path):
    shutil.copytree(jpeg_root / "train", tmp_path / "train", ignore=shutil.ignore_patterns("truck"))
    with pytest.raises(ValueError, match="CIFAR-10 class"):
        load_cifar10("train", tmp_path)



def test_an_image_folder_is_decoded_once_and_read_back_until_a_file_changes(jpeg_root, tmp_path, caplog):
    root = tmp_path / "jpeg"
    shutil.copytree(jpeg_root, root)
    decoded = tmp_path / "cache" / "datasets"
    caplog.set_level("INFO", logger="bench.data")
    first = load_cifar10("train", root, decoded_cache=decoded)
    [kept] = decoded.glob("cifar10-train-*.npz")
    # Asked again in the same process (a run's checks, prerequisites and run each ask): the same images, not read
    caplog.clear()
    assert load_cifar10("train", root, decoded_cache=decoded) is first and "decoded" not in caplog.text
    data._loaded.clear()  # as in a new process: read back from the kept file
    again = load_cifar10("train", root, decoded_cache=decoded)
    assert f"read 20 decoded images of {root / 'train'} from {kept}" in caplog.text
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert again.source == first.source == "CIFAR-10 (JPEG copy)" and again.labels.dtype == torch.long

    # A rewritten image is a new listing: decoded again, and the run gets the new pixels.
    ship = sorted((root / "train" / "ship").iterdir())[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(ship, quality=100)
    changed = load_cifar10("train", root, decoded_cache=decoded)
    [newer] = set(decoded.glob("cifar10-train-*.npz")) - {kept}
    assert changed.images[8 * PER_CLASS, 0].mean() > 0.9 and not torch.equal(changed.images, first.images)

    # A corrupt decoded file is named, decoded again and replaced (by the next process).
    newer.write_bytes(b"not an npz")
    caplog.clear()
    data._loaded.clear()
    reread = load_cifar10("train", root, decoded_cache=decoded)
    assert f"decoded data set {newer} does not load" in caplog.text
    assert torch.equal(reread.images, changed.images)
    assert newer.stat().st_size > 20 * 3072 and not list(decoded.glob(".*tmp*"))


def test_the_digits_split_kept_in_the_cache_is_scikit_learns_to_the_bit(tmp_path):
    kept = tmp_path / "datasets"
    for split in ("train", "test"):
        fresh = load_digits(split, decoded_cache=kept)
        [path] = kept.glob(f"digits-{split}-*.npz")
        again = load_digits(split, decoded_cache=kept)
        assert torch.equal(again.images, fresh.images) and torch.equal(again.labels, fresh.labels)
        plain = load_digits(split)
        assert torch.equal(plain.images, again.images) and torch.equal(plain.labels, again.labels)
        assert again.labels.dtype == torch.long and again.source == "scikit-learn digits (8x8)"
    with np.load(path) as stored:
        images, labels = stored["images"], stored["labels"] + 1
    np.savez(path, images=images, labels=labels)  # the kept file, not scikit-learn, is what later loads read
    assert torch.equal(load_digits("test", decoded_cache=kept).labels, torch.from_numpy(labels).long())

def fake_batch(label_offset: int, count: int) -> dict:
    """A batch in the original pickle format: rows of 3,072 bytes (1,024 red, 1,024 green, 1,024 blue)."""
    labels = [(label_offset + i) % 10 for i in range(count)]
    data = np.zeros((count, 3, 32, 32), dtype=np.uint8)
    for row, label in enumerate(labels):
        data[row, 0], data[row, 1], data[row, 2] = 20 * label, 100, 255 - 20 * label
        data[row, 0, 0, 5] = 7  # one marked pixel: row 0, column 5, red channel
    return {"batch_label": "fake", "labels": labels, "data": data.reshape(count, 3072),
            "filenames": [f"fake_{label_offset}_{i}.png" for i in range(count)]}


@pytest.fixture()
def torchvision_root(tmp_path, monkeypatch) -> Path:
    """A tiny `cifar-10-batches-py`; torchvision's md5 table is pointed at these files, so its check still runs."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    files = {f"data_batch_{i}": fake_batch(i, 3) for i in range(1, 6)} | {"test_batch": fake_batch(0, 4)}
    files["batches.meta"] = {"num_cases_per_batch": 3, "label_names": list(CIFAR10_CLASSES), "num_vis": 3072}
    md5 = {}
    for name, content in files.items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    return tmp_path


def test_torchvision_layout_gives_labels_and_pixels_in_place(torchvision_root):
    train = load_dataset("cifar10", "train", image_size=32, root=torchvision_root)
    test = load_dataset("cifar10", "test", image_size=32, root=torchvision_root)
    assert train.source == test.source == "CIFAR-10 (torchvision)"
    assert train.labels.tolist() == [(offset + i) % 10 for offset in range(1, 6) for i in range(3)]
    assert test.labels.tolist() == [0, 1, 2, 3]
    image, label = test.images[3], 3
    assert torch.allclose(image[:, 10, 10] * 127.5 + 127.5, torch.tensor([20.0 * label, 100.0, 255 - 20.0 * label]))
    assert image[0, 0, 5] * 127.5 + 127.5 == pytest.approx(7.0)


def test_a_corrupted_torchvision_file_is_refused(torchvision_root):
    with open(torchvision_root / "cifar-10-batches-py" / "data_batch_3", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(RuntimeError, match="corrupted"):
        load_cifar10("train", torchvision_root)
