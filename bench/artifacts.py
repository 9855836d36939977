"""Cached artifacts every run needs: the pretrained base model and the evaluation classifier.

Each is a self-describing checkpoint (format, kind, preset, config, step, weights, EMA, provenance) loaded
with `torch.load(weights_only=True)`. `ensure_*` builds a missing one and reuses it otherwise; a file that
does not load or does not match the preset is an error naming the file and the command that rebuilds it.
Pretraining saves a partial checkpoint periodically and resumes from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import math
import os
import time
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.classifier import build_classifier, describe_noise_check, initialize, noise_check, predict, random_shift
from bench.config import Preset
from bench.data import ClassDataset, infinite_batches, load_dataset
from bench.diffusion import NoiseSchedule
from bench.runner import EMA, TrainSpec, device_name, train
from bench.unet import ConditionalUNet
from methods.base import noise_loss

log = logging.getLogger(__name__)

FORMAT = "unlearning-bench/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the preset."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "unlearning-bench"))


class Cache:
    """One folder per preset for its base model, classifier and preparation artifacts."""

    def __init__(self, root: str | Path | None = None, data_root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.data_root = Path(data_root) if data_root is not None else None

    def path(self, preset: Preset, *parts: str) -> Path:
        return self.root.joinpath(preset.name, *parts)

    def base_path(self, preset: Preset) -> Path:
        return self.path(preset, "base.pt")

    def classifier_path(self, preset: Preset) -> Path:
        return self.path(preset, "classifier.pt")

    def dataset(self, preset: Preset, split: str) -> ClassDataset:
        return load_dataset(preset.dataset, split, image_size=preset.unet.image_size, root=self.data_root)


def atomic_save(payload: dict, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when something above failed


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on `path` (created if needed): parallel runs build a cached artifact once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_checkpoint(path: Path, kind: str, preset: Preset, rebuild: str) -> dict:
    """Load and check a checkpoint of `kind` for `preset`; errors say how to rebuild it."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a truncated file, or one that needs arbitrary unpickling
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise CheckpointError(f"cannot load {path} ({reason}); rebuild it with `{rebuild}`") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("kind") != kind:
        raise CheckpointError(f"{path} is not a {kind} checkpoint of this tool; rebuild it with `{rebuild}`")
    config = preset.unet if kind == "diffusion" else preset.classifier
    expected = dataclasses.asdict(config)
    # A field added to the configuration after the checkpoint was written counts with its default value.
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    saved = payload.get("config")
    if not isinstance(saved, dict) or {**defaults, **saved} != expected:
        raise CheckpointError(
            f"{path} was built for another configuration ({payload.get('config')}) than preset "
            f"{preset.name!r} ({expected}); rebuild it with `{rebuild}`"
        )
    return payload


def new_unet(preset: Preset, device: torch.device) -> ConditionalUNet:
    return ConditionalUNet(preset.unet).to(device)


def _provenance(device: torch.device, started: float) -> dict:
    return {"device": device_name(device), "seconds": time.perf_counter() - started,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": str(torch.__version__)}


def pretrain(preset: Preset, cache: Cache, device: torch.device, seed: int = 0, progress: bool = True,
             iterations: int | None = None, batch_size: int | None = None) -> dict:
    """Train the base model with the preset's recipe; resumes from `base.partial.pt` if one exists.

    `iterations` and `batch_size` replace the recipe's for smoke tests (a paper-scale UNet on a CPU); the
    checkpoint records the recipe it was trained with, and its source says it is not the preset's model.
    """
    recipe, final = preset.pretrain, cache.base_path(preset)
    overrides = {k: v for k, v in (("iterations", iterations), ("batch_size", batch_size)) if v is not None}
    recipe = dataclasses.replace(recipe, **overrides)
    partial = final.with_name("base.partial.pt")
    torch.manual_seed(seed)  # the initial weights: without it they depend on what the process drew before
    model = new_unet(preset, device)
    ema, start, opt_state = EMA(model, recipe.ema_decay), 0, None
    if partial.exists():
        state = torch.load(partial, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        ema = EMA(model, recipe.ema_decay, shadow=state["ema"])
        start, opt_state = state["step"], state["optimizer"]
        log.info("resuming pretraining of %s from step %d (%s)", preset.name, start, partial)
    data = cache.dataset(preset, "train")
    schedule = NoiseSchedule(preset.diffusion, device)
    noise_gen = torch.Generator(device).manual_seed(seed * 1_000_003 + start)
    batches = infinite_batches(data, recipe.batch_size, torch.Generator().manual_seed(seed + start), recipe.hflip)

    def loss_fn(step: int) -> dict:
        x, y = next(batches)
        loss = noise_loss(model, schedule, x.to(device), y.to(device), noise_gen, recipe.label_dropout).mean()
        return {"loss": loss}

    def save_partial(step: int, optimizer: torch.optim.Optimizer) -> None:
        atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "step": step,
                     "optimizer": optimizer.state_dict()}, partial)

    started = time.perf_counter()
    spec = TrainSpec(recipe.iterations, recipe.lr, recipe.grad_clip, recipe.ema_decay,
                     checkpoint_every=recipe.checkpoint_every, lr_warmdown=recipe.lr_warmdown)
    log.info("pretraining %s: %d iterations of batch %d on %s", preset.name, recipe.iterations,
             recipe.batch_size, device_name(device))
    result = train(model, loss_fn, spec, device, ema=ema, start_step=start, optimizer_state=opt_state,
                   on_checkpoint=save_partial, desc=f"pretrain {preset.name}", progress=progress)
    payload = {
        "format": FORMAT, "kind": "diffusion", "preset": preset.name, "config": dataclasses.asdict(preset.unet),
        "diffusion": dataclasses.asdict(preset.diffusion), "recipe": dataclasses.asdict(recipe),
        "step": recipe.iterations, "model": model.state_dict(), "ema": ema.state_dict(),
        "id": f"{preset.name}-{uuid.uuid4().hex[:12]}", "source": _pretrain_source(preset, recipe, seed),
        "final_loss": result.final_losses.get("loss", math.nan), **_provenance(device, started),
    }
    atomic_save(payload, final)
    partial.unlink(missing_ok=True)
    log.info("base model saved to %s (%.0f s)", final, payload["seconds"])
    return payload


def _pretrain_source(preset: Preset, recipe, seed: int) -> str:
    source = f"pretrained here (seed {seed})"
    if recipe != preset.pretrain:
        changed = {k: v for k, v in dataclasses.asdict(recipe).items() if getattr(preset.pretrain, k) != v}
        source += f" with {changed} instead of the preset's recipe: a smoke test, not the benchmark's base model"
    return source


def ensure_base_model(preset: Preset, cache: Cache, device: torch.device, progress: bool = True) -> dict:
    path = cache.base_path(preset)
    rebuild = f"bench pretrain --preset {preset.name} --cache {cache.root} --force"
    if path.exists():
        return load_checkpoint(path, "diffusion", preset, rebuild)
    return pretrain(preset, cache, device, progress=progress)


def train_classifier(preset: Preset, cache: Cache, device: torch.device, seed: int = 0, progress: bool = True,
                     steps: int | None = None, test_images: int | None = None, batch_size: int | None = None) -> dict:
    """Train the evaluation classifier on the training split; store its test accuracy with it.

    `steps` (default: the preset's epochs), `batch_size` and `test_images` (default: the whole test split) shorten
    it for smoke tests; all are recorded, and the source says so.
    """
    config, started = preset.classifier, time.perf_counter()
    batch_size = batch_size or config.batch_size
    train_data, test_data = cache.dataset(preset, "train"), cache.dataset(preset, "test")
    torch.manual_seed(seed)
    model = build_classifier(config, preset.unet.in_channels, preset.num_classes, preset.unet.image_size)
    origin, lrs = initialize(model, config)
    model = model.to(device)
    data_gen = torch.Generator().manual_seed(seed)
    batches = infinite_batches(train_data, batch_size, data_gen, hflip=preset.pretrain.hflip)
    full_steps = config.epochs * math.ceil(len(train_data) / config.batch_size)
    steps = full_steps if steps is None else steps

    mix = torch.distributions.Beta(config.mixup, config.mixup) if config.mixup > 0 else None

    def loss_fn(step: int) -> dict:
        x, y = next(batches)
        x, y = random_shift(x, 1, data_gen).to(device), y.to(device)
        if mix is None:
            return {"loss": F.cross_entropy(model(x), y)}
        # mixup: one weight per batch, each image paired with another of the same batch
        weight = float(mix.sample())  # torch's global generator, seeded above
        pair = torch.randperm(len(x), generator=data_gen).to(device)
        logits = model(weight * x + (1 - weight) * x[pair])
        return {"loss": weight * F.cross_entropy(logits, y) + (1 - weight) * F.cross_entropy(logits, y[pair])}

    train(model, loss_fn, TrainSpec(steps, config.lr, grad_clip=None), device, param_lrs=lrs,
          desc=f"classifier {preset.name}", progress=progress)
    if test_images is not None:
        test_data = _subset(test_data, test_images)
    accuracy = _accuracy(model, test_data)
    shape = (preset.unet.in_channels, preset.unet.image_size, preset.unet.image_size)
    # 1,000 images of each noise kind; a smoke test (`test_images`) checks as many as it tests: at 224x224 a
    # ResNet34 on one CPU thread takes minutes for 3,000 noise images
    noise = noise_check(model, shape, count=1000 if test_images is None else test_images)
    source = f"{origin} (seed {seed})"
    if steps != full_steps or batch_size != config.batch_size:
        source += (f"; {steps} steps of batch {batch_size} instead of {full_steps} of {config.batch_size}: a smoke "
                   "test, not the evaluation classifier")
    payload = {
        "format": FORMAT, "kind": "classifier", "preset": preset.name, "config": dataclasses.asdict(config),
        "in_channels": preset.unet.in_channels, "num_classes": preset.num_classes, "model": model.state_dict(),
        "test_accuracy": accuracy, "test_images": len(test_data), "steps": steps, "batch_size": batch_size,
        "source": source, "noise_check": noise,
        **_provenance(device, started),
    }
    atomic_save(payload, cache.classifier_path(preset))
    log.info("classifier saved to %s: %s, test accuracy %.2f%% on %d images", cache.classifier_path(preset), origin,
             100 * accuracy, len(test_data))
    log.info("classifier on noise: %s", describe_noise_check(noise))
    return payload


def _subset(data: ClassDataset, count: int) -> ClassDataset:
    """The first `count` images of a random (seed 0) order: a class-balanced sample on average."""
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count]
    return ClassDataset(data.images[keep], data.labels[keep], data.class_names, data.source)


def _accuracy(model: nn.Module, data: ClassDataset) -> float:
    probs, _ = predict(model, data.images)
    return float((probs.argmax(1) == data.labels).float().mean())


def ensure_classifier(preset: Preset, cache: Cache, device: torch.device, progress: bool = True) -> dict:
    path = cache.classifier_path(preset)
    rebuild = f"bench classifier --preset {preset.name} --cache {cache.root} --force"
    if path.exists():
        return load_checkpoint(path, "classifier", preset, rebuild)
    return train_classifier(preset, cache, device, progress=progress)


def load_classifier(payload: dict, preset: Preset, device: torch.device) -> nn.Module:
    model = build_classifier(preset.classifier, payload["in_channels"], payload["num_classes"], preset.unet.image_size)
    model.load_state_dict(payload["model"])
    return model.to(device).eval()


def load_unet(weights: dict, preset: Preset, device: torch.device) -> ConditionalUNet:
    model = new_unet(preset, device)
    model.load_state_dict(weights)
    return model
