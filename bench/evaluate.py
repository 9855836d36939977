"""Evaluate one model as the paper does: sample the forget class and every retained class, classify, score.

Samples are drawn class by class with a generator seeded by (seed, class), then quantized to 8 bits like
saved images. A model that was not changed (the `original` row) has the same samples in every run, so they
are cached by the weights' fingerprint and reused.

FID compares the generated retained-class samples with the real retained-class training images, in the features
the protocol names: Inception pool3 (pytorch-fid, as the paper) or the evaluation classifier's penultimate layer
(the small presets). The real images' statistics are computed once per (data set, forget class, features) and cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bench import metrics
from bench.cache import CheckpointError, atomic_save, load_derived
from bench.classifier import predict
from bench.config import Preset, Protocol
from bench.data import ClassDataset, from_uint8, to_uint8
from bench.device import Speed, progress_bar
from bench.diffusion import NoiseSchedule, sample
from bench.fingerprint import code_tag
from bench.inception import images_fingerprint, inception_features, inception_model, reference_statistics

log = logging.getLogger(__name__)

GRID_COLUMNS = 8
UNWRITABLE_SAMPLE_CACHES: set[Path] = set()  # sample folders a write failed in: not tried again by this process


class NonFiniteSamples(RuntimeError):
    """The sampler returned NaN or infinite images: the model or the protocol (eta, guidance) is broken."""


@dataclass
class Evaluation:
    metrics: dict
    grid: Tensor  # (classes * GRID_COLUMNS, C, H, W) uint8, one row per class
    seconds: float


def fingerprint(state: dict[str, Tensor]) -> str:
    """A short hash of a set of weights, for cache keys."""
    digest = hashlib.sha1()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _samples_key(protocol: Protocol, speed: Speed | None, device: torch.device) -> str:
    """What decides the samples besides the weights and the seed: the sampler's settings, the numerics and the code.

    bf16 autocast and the device change the samples (rounding, kernels), so samples drawn in fp32 on the CPU are
    never reused for a run that asked for bf16 or a GPU: that would record the other arm's numbers.
    """
    keys = ("sampler_steps", "eta", "guidance", "image_conversion")
    fields = {k: v for k, v in dataclasses.asdict(protocol).items() if k in keys}
    fields["amp"] = bool(speed is not None and speed.for_device(device).amp)
    fields["device"] = device.type
    # the code's key readable in the name, for `bench clean` (bench/clean.py)
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10] + code_tag()


class Sampler:
    """Draws (and, with `cache_dir`, caches) quantized samples of one model, class by class."""

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, protocol: Protocol, preset: Preset,
                 device: torch.device, seed: int, cache_dir: Path | None = None, progress: bool = True,
                 speed: Speed | None = None):
        self.model, self.schedule, self.protocol, self.preset = model, schedule, protocol, preset
        self.device, self.seed, self.cache_dir, self.progress = device, seed, cache_dir, progress
        self.speed = speed  # None: plain fp32 eager (bench.device.PLAIN)

    def class_samples(self, label: int, count: int) -> Tensor:
        path = None
        if self.cache_dir is not None:
            key = _samples_key(self.protocol, self.speed, self.device)
            path = self.cache_dir / key / f"seed{self.seed}" / f"class{label}-n{count}.pt"
            cached = load_derived(path) if path.exists() else None  # False too where a file blocks the folder
            if cached is not None:
                return cached
        images = self._draw(label, count)
        if path is not None and self.cache_dir not in UNWRITABLE_SAMPLE_CACHES:
            self._keep(images, path)
        return images

    def _keep(self, images: Tensor, path: Path) -> None:
        """Cache drawn samples; where the cache cannot be written (a read-only mount), say so once and go on."""
        try:
            atomic_save(images, path)
        except OSError as exc:
            UNWRITABLE_SAMPLE_CACHES.add(self.cache_dir)
            log.warning("samples are not cached: %s cannot be written (%s); they are drawn for each run",
                        self.cache_dir, exc)

    def _draw(self, label: int, count: int) -> Tensor:
        cfg, protocol = self.preset.unet, self.protocol
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + 7919 * label + 17)
        self.model.eval()
        chunks = []
        steps = protocol.sampler_steps
        total = len(self.schedule.sampler_steps(steps)) * -(-count // protocol.batch_size)
        with progress_bar(total=total, desc=f"sample class {label}", disable=not self.progress, leave=False) as bar:
            for start in range(0, count, protocol.batch_size):
                size = min(protocol.batch_size, count - start)
                labels = torch.full((size,), label, device=self.device, dtype=torch.long)
                images = sample(self.model, self.schedule, labels, (cfg.in_channels, cfg.image_size, cfg.image_size),
                                steps=steps, eta=protocol.eta, guidance=protocol.guidance, generator=generator,
                                on_step=lambda: bar.update(1), speed=self.speed)
                if not torch.isfinite(images).all():  # quantising would turn them into plausible-looking images
                    raise NonFiniteSamples(f"the sampler returned non-finite images for class {label} "
                                           f"({protocol.describe()}): the model's weights or the protocol are broken")
                chunks.append(to_uint8(images, protocol.image_conversion))
        return torch.cat(chunks)


@dataclass
class FidScorer:
    """The features FID is computed in, and the cached statistics of the real images it compares with."""

    extract: Callable[[Tensor], Tensor]  # (N, C, H, W) in [-1, 1] -> (N, D)
    reference: tuple[np.ndarray, np.ndarray]
    description: dict  # features, weights, reference images: goes into the record

    def __call__(self, images: Tensor) -> float:
        return metrics.fid(self.extract(images), self.reference)


def reference_images(data: ClassDataset, forget_class: int, per_class: int | None) -> ClassDataset:
    """The retained classes' real images, or the first `per_class` of each (in the data set's order)."""
    retain = data.retain(forget_class)
    if per_class is None:
        return retain
    keep = torch.cat([torch.nonzero(retain.labels == c).flatten()[:per_class] for c in retain.labels.unique()])
    return ClassDataset(retain.images[keep], retain.labels[keep], retain.class_names, retain.source)


def classifier_id(protocol: Protocol, classifier: nn.Module) -> str | None:
    """The classifier's weight fingerprint and embedding size where FID uses its features (part of the cache
    key), else None."""
    return classifier_key(classifier) if protocol.fid_features == "classifier" else None


def classifier_key(classifier: nn.Module) -> str:
    """What FID features from this classifier depend on: its weights and the size of its embedding."""
    return f"{fingerprint(classifier.state_dict())}-{classifier.embedding_dim}d"


def fid_reference_key(protocol: Protocol, source: str, forget_class: int, count: int, classifier: str | None) -> str:
    """The cache name of the reference statistics: data set, forget class, image count, features and the code that
    computes them (`bench.fingerprint.code_key`)."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in source.lower()).strip("-")
    if protocol.fid_features == "inception":
        return f"{slug}-retain{forget_class}-n{count}-inception{code_tag()}"
    if protocol.fid_features == "classifier":
        return f"{slug}-retain{forget_class}-n{count}-classifier-{classifier}{code_tag()}"
    raise ValueError(f"unknown FID features {protocol.fid_features!r}; choose from inception, classifier")


def fid_scorer(protocol: Protocol, data: ClassDataset, forget_class: int, classifier: nn.Module, cache_dir: Path,
               device: torch.device, progress: bool = True, classifier_key: str | None = None,
               build: bool = True) -> FidScorer | None:
    """The protocol's FID features, with the real retained images' statistics from (or into) `cache_dir`.

    `classifier_key` is `classifier_id(protocol, classifier)` when the caller has it already. With `build=False`,
    None when the statistics are not cached (nothing is computed or loaded then).
    """
    real = reference_images(data, forget_class, protocol.fid_reference_per_class)
    classifier_key = classifier_key or classifier_id(protocol, classifier)
    key = fid_reference_key(protocol, data.source, forget_class, len(real), classifier_key)
    cached = _reference_cached(cache_dir / f"{key}.npz", real.images)  # a damaged file is removed: rebuilt below
    if not build and not cached:
        return None
    if protocol.fid_features == "inception":
        model = inception_model(device, protocol.inception_weights)
        extract = lambda images: inception_features(model, images, progress=progress)  # noqa: E731
        features, weights = "inception pool3 (2048-d, pytorch-fid)", model.weights_source
    else:
        extract = lambda images: predict(classifier, images)[1]  # noqa: E731
        features = f"evaluation classifier penultimate layer ({classifier.embedding_dim}-d)"
        weights = classifier_key
    log.debug("FID reference: %d real retained images of %s, %s", len(real), data.source, features)
    reference = reference_statistics(cache_dir, key, real.images, extract)
    return FidScorer(extract, reference, {"features": features, "weights": weights, "reference_images": len(real),
                                          "reference_source": data.source})


def _reference_cached(path: Path, images: Tensor) -> bool:
    """Whether `path` holds the statistics of `images`. A file that does not load (cut short, not an .npz) is removed
    with a warning naming it, as every derived cache file is (`bench.cache.load_derived`)."""
    try:
        with np.load(path) as cached:
            return str(cached["fingerprint"]) == images_fingerprint(images)
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        # numpy's own message may advise allow_pickle=True: never for a cache file
        reason = f"it is damaged or not an .npz of statistics: {type(exc).__name__}"
        log.warning("cached statistics %s do not load (%s); recomputing them", path, reason)
        try:
            path.unlink()
        except OSError as unlink_error:  # a read-only cache: say so rather than rebuild into nowhere
            raise CheckpointError(f"cannot read {path} ({reason}) and cannot remove it ({unlink_error}); "
                                  "delete it by hand") from exc
        return False


def evaluate(sampler: Sampler, classifier: nn.Module, forget_class: int, fid: FidScorer,
             noise_probs: Tensor) -> Evaluation:
    """UA, entropy and forget-class histogram; FID and accuracy on the retained classes; noise predictions."""
    started = time.perf_counter()
    protocol, num_classes = sampler.protocol, sampler.preset.num_classes
    forget_images = sampler.class_samples(forget_class, protocol.forget_samples)
    forget_probs, _ = predict(classifier, from_uint8(forget_images))
    retained = [c for c in range(num_classes) if c != forget_class]
    per_class = {c: sampler.class_samples(c, protocol.retain_samples_per_class) for c in retained}
    retain_images = torch.cat([per_class[c] for c in retained])
    retain_labels = torch.cat([torch.full((len(per_class[c]),), c) for c in retained])
    retain_probs, _ = predict(classifier, from_uint8(retain_images))
    results = {
        **metrics.forget_metrics(forget_probs, forget_class),
        "fid": fid(from_uint8(retain_images)),
        "retain_accuracy": metrics.retain_accuracy(retain_probs, retain_labels),
        "retain_samples": len(retain_images),
        "noise_prediction": metrics.noise_prediction(noise_probs),
    }
    grid = torch.cat([_grid_row((forget_images if c == forget_class else per_class[c])[:GRID_COLUMNS])
                      for c in range(num_classes)])
    return Evaluation(results, grid, time.perf_counter() - started)


def _grid_row(images: Tensor) -> Tensor:
    """GRID_COLUMNS images, white ones filling in for samples a small protocol did not draw."""
    blank = torch.full((GRID_COLUMNS - len(images), *images.shape[1:]), 255, dtype=images.dtype)
    return torch.cat([images, blank])


def noise_probabilities(classifier: nn.Module, shape: tuple[int, ...], count: int, seed: int) -> Tensor:
    """Classifier outputs on pure N(0, I) noise, clamped to [-1, 1] as the sampler clamps its output."""
    generator = torch.Generator().manual_seed(seed + 99991)
    noise = torch.randn((count, *shape), generator=generator).clamp(-1, 1)
    return predict(classifier, noise)[0]


def grid_image(grid: Tensor, class_names: tuple[str, ...], forget_class: int, cell: int = 48):
    """The (classes x GRID_COLUMNS) uint8 sample grid as a PIL image: cells upscaled (nearest) to `cell` pixels, one
    row per class labelled with its name, the forget class's row marked."""
    from PIL import Image, ImageDraw

    rows = len(class_names)
    channels, size = grid.shape[1], grid.shape[-1]
    scale = max(1, cell // size)
    images = grid.reshape(rows, GRID_COLUMNS, channels, size, size).permute(0, 3, 1, 4, 2)  # rows, y, cols, x, c
    pixels = images.reshape(rows * size, GRID_COLUMNS * size, channels).repeat_interleave(scale, 0)
    pixels = pixels.repeat_interleave(scale, 1)
    body = Image.fromarray(pixels.squeeze(-1).numpy() if channels == 1 else pixels.numpy()).convert("RGB")
    label_width, gap = 110, 2
    page = Image.new("RGB", (label_width + body.width, body.height), "white")
    page.paste(body, (label_width, 0))
    draw = ImageDraw.Draw(page)
    row_height = size * scale
    for row, name in enumerate(class_names):
        y = row * row_height
        forget = row == forget_class
        if forget:
            draw.rectangle([label_width - gap, y, page.width - 1, y + row_height - 1], outline="red", width=gap)
        label = name[:12] if name == str(row) else f"{row} {name[:12]}"
        draw.text((4, y + row_height // 2 - 6), label + (" (forget)" if forget else ""),
                  fill="red" if forget else "black")
    return page
