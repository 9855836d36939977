"""Data sets as class-labelled image tensors in [-1, 1], with forget and retain views by class.

`digits` ships with scikit-learn, so the harness runs with no download at all. CIFAR-10 is read from a
torchvision `CIFAR10` root (downloaded there when the network allows) or from an ImageFolder tree whose
class folders follow CIFAR-10's label order, such as a JPEG copy. An image folder is decoded once (50,000 JPEGs:
~11 s) and kept as one array under the cache's `datasets/`, keyed by every file's name, size and modification time,
so that each later process (every `bench` call, worker and SLURM job) reads it in a fraction of a second; the
digits split is kept there too, which spares each process importing scikit-learn.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bench.config import HFLIPS

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DIGIT_CLASSES = tuple(str(d) for d in range(10))


@dataclass
class ClassDataset:
    """Images (N, C, H, W) in [-1, 1] with integer labels; `source` says where they came from."""

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def of_classes(self, classes: list[int]) -> ClassDataset:
        keep = torch.isin(self.labels, torch.tensor(classes))
        return ClassDataset(self.images[keep], self.labels[keep], self.class_names, self.source)

    def forget(self, forget_class: int) -> ClassDataset:
        return self.of_classes([forget_class])

    def retain(self, forget_class: int) -> ClassDataset:
        return self.of_classes([c for c in range(self.num_classes) if c != forget_class])


IMAGE_CONVERSIONS = ("stretch", "clamp")


def to_uint8(images: Tensor, conversion: str = "stretch") -> Tensor:
    """Sampler output in [-1, 1] -> 8-bit images, as the published code writes its PNGs.

    Both clamp to [0, 1] first (`inverse_data_transform`). `stretch` then maps each image's own [min, max] to
    [0, 1], as torchvision's `save_image(image, normalize=True)` does image by image in the SA/SalUn code;
    `clamp` stops there (`save_image` without `normalize`). Quantized like `save_image`: floor(255 x + 0.5).
    """
    if conversion not in IMAGE_CONVERSIONS:
        raise ValueError(f"unknown image conversion {conversion!r}; choose from {', '.join(IMAGE_CONVERSIONS)}")
    unit = ((images.float() + 1) / 2).clamp(0, 1)
    if conversion == "stretch":
        flat = unit.flatten(1)
        low, high = flat.min(1).values, flat.max(1).values
        shape = (-1,) + (1,) * (unit.dim() - 1)
        unit = (unit - low.view(shape)) / (high - low).clamp_min(1e-5).view(shape)
    return unit.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).cpu()


def from_uint8(images: Tensor) -> Tensor:
    return images.float() / 127.5 - 1.0


def fit_to_size(images: Tensor, size: int) -> Tensor:
    """Pad (centred, with the background value -1) or resize square images to `size` x `size`."""
    current = images.shape[-1]
    if current == size:
        return images
    if current < size and (size - current) % 2 == 0:
        pad = (size - current) // 2
        return F.pad(images, (pad, pad, pad, pad), value=-1.0)
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)


def load_digits(split: str, image_size: int = 8, test_fraction: float = 0.2,
                decoded_cache: Path | None = None) -> ClassDataset:
    """scikit-learn's 8x8 digits, scaled from 0..16 to [-1, 1], with a fixed stratified split.

    With `decoded_cache` the split is kept there (per scikit-learn version), so that later processes skip importing
    scikit-learn (1.1 s each: every worker, job and `bench` call of the digits and tiny presets).
    """
    from importlib.metadata import version

    path = None
    if decoded_cache is not None:
        path = decoded_cache / f"digits-{split}-{test_fraction:g}-scikit-learn-{version('scikit-learn')}.npz"
        kept = _read_arrays(path, ("images", "labels"), np.dtype(np.float64), (8, 8))
        if kept is not None:
            return _digits(kept["images"], kept["labels"], image_size)
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    indices = np.arange(len(bunch.target))
    train_idx, test_idx = train_test_split(indices, test_size=test_fraction, stratify=bunch.target, random_state=0)
    chosen = np.sort(train_idx if split == "train" else test_idx)
    images, labels = bunch.images[chosen], bunch.target[chosen]
    if path is not None:
        _write_arrays(path, images=images, labels=labels)
    return _digits(images, labels, image_size)


def _digits(images: np.ndarray, labels: np.ndarray, image_size: int) -> ClassDataset:
    scaled = torch.from_numpy(images).float().div(16.0).mul(2).sub(1).unsqueeze(1)
    return ClassDataset(fit_to_size(scaled, image_size), torch.from_numpy(labels).long(), DIGIT_CLASSES,
                        "scikit-learn digits (8x8)")


def _uint8_to_tensor(array: np.ndarray) -> Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float in [-1, 1]."""
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def load_cifar10(split: str, root: str | Path, download: bool = False, decoded_cache: Path | None = None) -> ClassDataset:
    """CIFAR-10 from a torchvision root (`cifar-10-batches-py` inside) or an ImageFolder tree `root/<split>/<class>/`;
    an ImageFolder tree is decoded once into `decoded_cache` (when given) and read from there while it is unchanged."""
    root = Path(root)
    folder = root / split
    if folder.is_dir():
        return _load_cifar_image_folder(folder, decoded_cache)
    from torchvision.datasets import CIFAR10

    if not (root / "cifar-10-batches-py").is_dir() and not download:
        raise FileNotFoundError(
            f"no CIFAR-10 under {root}: expected {root}/cifar-10-batches-py (torchvision layout) or "
            f"{root}/{split}/<class>/ (ImageFolder layout); pass --download on a machine with network access"
        )
    data = CIFAR10(str(root), train=split == "train", download=download)
    labels = torch.tensor(data.targets, dtype=torch.long)
    return ClassDataset(_uint8_to_tensor(data.data), labels, CIFAR10_CLASSES, "CIFAR-10 (torchvision)")


def _class_files(folder: Path) -> list[list[Path]]:
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if tuple(found) != CIFAR10_CLASSES:
        raise ValueError(f"{folder} must hold one folder per CIFAR-10 class {CIFAR10_CLASSES}, found {found}")
    listing = []
    for name in CIFAR10_CLASSES:
        files = sorted(p for p in (folder / name).iterdir() if not p.name.startswith("."))
        if not files:
            raise ValueError(f"{folder / name} holds no images: every CIFAR-10 class folder needs its images")
        listing.append(files)
    return listing


def _listing_key(folder: Path, listing: list[list[Path]]) -> str:
    """Changes when any image is added, removed, renamed, rewritten or touched, or the folder moves."""
    digest = hashlib.sha1(str(folder.resolve()).encode())
    for files in listing:
        for path in files:
            stat = path.stat()
            digest.update(f"{path.parent.name}/{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def folder_key(folder: Path) -> str:
    """The key that `folder`'s decoded copy is named by now; ValueError where it is no CIFAR-10 image folder."""
    return _listing_key(folder, _class_files(folder))


def decoded_folder(path: Path) -> Path | None:
    """The image folder that the decoded CIFAR-10 copy at `path` was made from; None for a copy kept before copies
    named it. Raises what numpy raises for a file that does not load."""
    with np.load(path) as stored:
        return Path(str(stored["folder"])) if "folder" in stored.files else None


def _read_arrays(path: Path, names: tuple[str, ...], dtype: np.dtype, image_shape: tuple[int, ...]
                 ) -> dict[str, np.ndarray] | None:
    """The arrays of a kept data set (`images` of `dtype` and `image_shape` each, as many `labels`), or None (the
    caller reads the source again and overwrites) when the file is missing, corrupt or holds other arrays."""
    if not path.exists():
        return None
    try:
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in names}
        images, labels = arrays["images"], arrays["labels"]
        if images.dtype != dtype or images.shape[1:] != image_shape or len(images) != len(labels):
            raise ValueError(f"arrays of shape {images.shape} ({images.dtype}) and {labels.shape}")
        return arrays
    except Exception as exc:  # a truncated or foreign file: numpy raises zipfile, OS, key and value errors alike
        log.warning("decoded data set %s does not load (%s); reading the source again and replacing it", path, exc)
        return None


def _write_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Kept atomically (a killed process leaves no half-written file); a read-only cache is said and skipped."""
    from bench.cache import atomic_savez  # here: bench.cache imports this module

    try:
        atomic_savez(path, **arrays)
    except OSError as exc:  # a read-only cache: every process reads the source, as before
        log.warning("decoded data set not kept: %s cannot be written (%s)", path, exc)


def _load_cifar_image_folder(folder: Path, decoded_cache: Path | None = None) -> ClassDataset:
    """The folder's images: once per process while its files are unchanged (a run's checks, its prerequisites and
    the run itself each ask for the split: ~1.5 s and 614 MB of float images each time for CIFAR-10's 50,000)."""
    listing = _class_files(folder)
    key = _listing_key(folder, listing)
    loaded = (folder.resolve(), key, decoded_cache)
    if loaded not in _loaded:  # not read yet, or its files changed since
        while len(_loaded) >= 2:  # the train and the test split at most: the oldest goes before another is read
            _loaded.pop(next(iter(_loaded)))
        _loaded[loaded] = _read_image_folder(folder, listing, key, decoded_cache)
    return _loaded[loaded]


_loaded: dict[tuple, ClassDataset] = {}  # (folder, listing key, decoded_cache) -> its images, in reading order


def _read_image_folder(folder: Path, listing: list[list[Path]], key: str, decoded_cache: Path | None) -> ClassDataset:
    cached = None
    if decoded_cache is not None:
        cached_path = decoded_cache / f"cifar10-{folder.name}-{key}.npz"
        cached = _read_arrays(cached_path, ("images", "labels", "source"), np.dtype(np.uint8), (32, 32, 3))
    if cached is not None:
        images, labels = cached["images"], cached["labels"]
        log.info("read %d decoded images of %s from %s", len(labels), folder, cached_path)
        return ClassDataset(_uint8_to_tensor(images), torch.from_numpy(labels), CIFAR10_CLASSES, str(cached["source"]))
    from PIL import Image

    arrays, labels, suffixes = [], [], set()
    for label, files in enumerate(listing):
        for path in files:
            try:
                with Image.open(path) as image:
                    arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
            except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
                raise ValueError(f"{path} is not a readable image ({exc}); remove it from {path.parent}") from None
            if arrays[-1].shape != (32, 32, 3):
                raise ValueError(f"{path} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]}, not a 32x32 CIFAR-10 image")
            labels.append(label)
            suffixes.add(path.suffix.lower())
    source = "CIFAR-10 (JPEG copy)" if suffixes & {".jpg", ".jpeg"} else "CIFAR-10 (image folder)"
    images, label_array = np.stack(arrays), np.array(labels, dtype=np.int64)
    log.info("decoded %d images from %s", len(labels), folder)
    if decoded_cache is not None:
        _write_arrays(cached_path, images=images, labels=label_array, source=np.array(source),
                      folder=np.array(str(folder.resolve())))  # what `bench clean` checks it against
    return ClassDataset(_uint8_to_tensor(images), torch.from_numpy(label_array), CIFAR10_CLASSES, source)


# --- Fashion-MNIST (Debian's dataset-fashion-mnist package, or torchvision's download folder) ---

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
_IDX_MAGIC = {"images": 2051, "labels": 2049}


def _read_idx_gz(path: Path, kind: str) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes: (N, rows, cols) images or (N,) labels."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:  # not gzip, or cut short
        raise ValueError(f"{path} is not a complete gzip file ({exc}); reinstall dataset-fashion-mnist or "
                         "download the file again") from None
    magic, count = int.from_bytes(raw[0:4], "big"), int.from_bytes(raw[4:8], "big")
    if magic != _IDX_MAGIC[kind]:
        raise ValueError(f"{path} is not an IDX {kind} file (magic {magic}, expected {_IDX_MAGIC[kind]})")
    header = 8 if kind == "labels" else 16
    rows, cols = (1, 1) if kind == "labels" else (int.from_bytes(raw[8:12], "big"), int.from_bytes(raw[12:16], "big"))
    if len(raw) < header + count * rows * cols:
        raise ValueError(f"{path} is truncated: its header promises {count} {kind}, the file holds fewer")
    array = np.frombuffer(raw, dtype=np.uint8, count=count * rows * cols, offset=header)
    return array if kind == "labels" else array.reshape(count, rows, cols)


def load_fashion_mnist(split: str, image_size: int = 28, root: str | Path = FASHION_MNIST_ROOT) -> ClassDataset:
    """Fashion-MNIST from its four IDX .gz files in `root` (or `root/FashionMNIST/raw`), scaled to [-1, 1]."""
    prefix = "train" if split == "train" else "t10k"
    names = {"images": f"{prefix}-images-idx3-ubyte.gz", "labels": f"{prefix}-labels-idx1-ubyte.gz"}
    root = Path(root)
    folder = next((f for f in (root, root / "FashionMNIST" / "raw") if (f / names["images"]).is_file()), None)
    if folder is None:
        raise FileNotFoundError(
            f"no Fashion-MNIST {split} split in {root}: expected {names['images']} and {names['labels']}. Install "
            f"Debian's dataset-fashion-mnist package (`apt-get install dataset-fashion-mnist`, files in "
            f"{FASHION_MNIST_ROOT}) or pass --data-root to a folder with the four IDX .gz files"
        )
    images = torch.from_numpy(_read_idx_gz(folder / names["images"], "images").copy())
    labels = torch.from_numpy(_read_idx_gz(folder / names["labels"], "labels").astype(np.int64))
    if len(images) != len(labels):
        raise ValueError(f"{folder} holds {len(images)} {split} images but {len(labels)} labels")
    images = images.float().div(127.5).sub(1.0).unsqueeze(1)
    return ClassDataset(fit_to_size(images, image_size), labels, FASHION_CLASSES, "Fashion-MNIST")


# --- end of Fashion-MNIST ---


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, split: str, *, image_size: int, root: str | Path | None = None,
                 decoded_cache: Path | None = None) -> ClassDataset:
    """The registry of data sets by preset `dataset` name; each is read once per process (callers never modify
    a data set in place: views like `forget`, `retain` and flips make new tensors). `decoded_cache` keeps decoded
    image folders (CIFAR-10's JPEG copy) and the digits split between processes."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose from train, test")
    if name == "digits":
        return load_digits(split, image_size, decoded_cache=decoded_cache)
    if name == "cifar10":
        if root is None:
            raise ValueError("the cifar10 data set needs --data-root (a torchvision CIFAR10 root or an ImageFolder tree)")
        return load_cifar10(split, root, decoded_cache=decoded_cache)
    if name == "fashion":  # Fashion-MNIST: Debian's package folder unless --data-root says otherwise
        return load_fashion_mnist(split, image_size, root if root is not None else FASHION_MNIST_ROOT)
    raise ValueError(f"unknown data set {name!r}; choose from cifar10, digits, fashion")


def infinite_batches(
    dataset: ClassDataset, batch_size: int, generator: torch.Generator, hflip: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled batches (x, y), reshuffled every epoch; random horizontal flips if `hflip`.

    Each epoch ends with its short last batch, as a shuffling DataLoader without `drop_last` (the published
    loaders) gives it. A data set smaller than one batch gives full batches drawn with replacement.
    """
    if len(dataset) == 0:
        raise ValueError("cannot draw batches from an empty data set")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    while True:
        order = torch.randperm(len(dataset), generator=generator)
        if len(order) < batch_size:  # fewer images than one batch: sample with replacement
            order = torch.randint(0, len(dataset), (batch_size,), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x = dataset.images[idx]
            if hflip:
                flip = torch.rand(len(idx), generator=generator) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            yield x, dataset.labels[idx]


def flip_once(dataset: ClassDataset, generator: torch.Generator) -> ClassDataset:
    """Each image flipped horizontally with probability 0.5, drawn once: what SalUn's image lists hold after
    passing every image through RandomHorizontalFlip when they are built."""
    flip = torch.rand(len(dataset), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], dataset.images.flip(-1), dataset.images)
    return ClassDataset(images, dataset.labels, dataset.class_names, dataset.source)


def training_batches(dataset: ClassDataset, batch_size: int, generator: torch.Generator,
                     hflip: str) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless batches with one of the published flip behaviours: `none`; `once` (SalUn: fixed per image for the
    whole run); `every_draw` (a RandomHorizontalFlip in the loader: pretraining, SA's replay)."""
    if hflip not in HFLIPS:
        raise ValueError(f"unknown hflip {hflip!r}; choose from {', '.join(HFLIPS)}")
    if hflip == "once":
        dataset = flip_once(dataset, generator)
    return infinite_batches(dataset, batch_size, generator, hflip=hflip == "every_draw")
