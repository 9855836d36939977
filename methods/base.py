"""The method interface, the context a method runs in, and the loss terms several methods share.

A method is a loss plus optional preparation (Fisher, saliency mask, replay samples). It never owns a loop,
a device choice or file I/O beyond its cached artifacts: the runner trains, the experiment evaluates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from bench.data import HFLIPS, ClassDataset, training_batches
from bench.diffusion import NoiseSchedule
from bench.unet import NULL_CLASS

if TYPE_CHECKING:
    from bench.artifacts import Cache
    from bench.config import Preset

Batch = dict[str, tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class MethodConfig:
    """Hyperparameters every fine-tuning method has; defaults are the paper-scale (SalUn) values."""

    iterations: int = 1000
    batch_size: int = 128
    lr: float = 1e-4
    grad_clip: float = 1.0
    # Evaluate (and keep) an EMA of the weights; SA continues the base model's EMA, SalUn keeps none.
    ema: bool = False
    ema_decay: float = 0.9999
    lr_warmdown: float = 0.0  # fraction of the final iterations with a linearly falling lr; 0 (constant) as published
    # Horizontal flips of the training images: `once` per image when the lists are built (SalUn's loaders, which
    # SAFEMax shares: "the same hyperparameters as SalUn"), `every_draw` (pretraining, SA's replay) or `none`.
    hflip: str = "once"

    def __post_init__(self):
        if not 0 <= self.lr_warmdown <= 1:
            raise ValueError(f"lr_warmdown must be in [0, 1], got {self.lr_warmdown}")
        if self.hflip not in HFLIPS:
            raise ValueError(f"hflip must be one of {', '.join(HFLIPS)}, got {self.hflip!r}")


@dataclass
class Context:
    """Everything a method may read: the task, the data, the frozen base model and the cache."""

    preset: Preset
    forget_class: int
    seed: int
    schedule: NoiseSchedule
    train_data: ClassDataset
    device: torch.device
    noise_generator: torch.Generator  # on `device`: timesteps, noise, label dropout
    data_generator: torch.Generator  # on the CPU: batch order, flips
    base_weights: dict[str, Tensor]  # pretrained (non-EMA) weights, theta*
    base_ema: dict[str, Tensor]  # the base model's EMA weights
    base_id: str  # identifies the base checkpoint, for cache keys
    cache: Cache
    progress: bool = True

    @property
    def num_classes(self) -> int:
        return self.train_data.num_classes


class UnlearningMethod:
    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    description: ClassVar[str] = ""
    # True for methods that start from fresh weights rather than from the pretrained model.
    from_scratch: ClassVar[bool] = False
    # True when `prepare` builds artifacts every forget class shares (SA's priors and Fisher): the orchestrator
    # then builds them once, in the prerequisites step, before the runs that need them.
    shares_preparation: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, ctx: Context):
        self.config = config
        self.ctx = ctx

    @classmethod
    def preset_defaults(cls, preset: Preset) -> dict:
        """Paper-scale values this preset replaces: iterations scaled, batch size the preset's."""
        paper = cls.Config()
        scale = preset.iteration_scale
        defaults = {
            "iterations": max(1, round(paper.iterations * scale)) if paper.iterations else 0,
            "batch_size": preset.unlearn_batch_size,
        }
        if paper.ema and paper.iterations and scale != 1.0:
            # Keep the EMA's horizon the same fraction of the (shorter) run: decay ** iterations is preserved.
            defaults["ema_decay"] = round(paper.ema_decay ** (1.0 / scale), 6)
        if not preset.pretrain.hflip:  # data whose mirror image is another thing (a flipped 3 is no 3)
            defaults["hflip"] = "none"
        return {**defaults, **preset.method_defaults.get(cls.name, {})}

    def prepare(self) -> dict[str, float]:
        """Compute or load cached preparation (Fisher, mask, priors); returns seconds per named stage."""
        return {}

    @classmethod
    def preparation_ready(cls, cache: Cache, preset: Preset, base_id: str, config: MethodConfig) -> bool:
        """Whether the shared preparation for this base model and configuration is already cached."""
        return True

    def batches(self) -> Iterator[Batch]:
        """Endless training batches; by default real forget-class and retained-class images."""
        ctx, size, hflip = self.ctx, self.config.batch_size, self.config.hflip
        forget = training_batches(ctx.train_data.forget(ctx.forget_class), size, ctx.data_generator, hflip)
        retain = training_batches(ctx.train_data.retain(ctx.forget_class), size, ctx.data_generator, hflip)
        for pair in zip(forget, retain):
            yield {name: (x.to(ctx.device), y.to(ctx.device)) for name, (x, y) in zip(("forget", "retain"), pair)}

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

    def grad_mask(self) -> dict[str, Tensor] | None:
        return None

    def hyperparameters(self) -> dict:
        return dataclasses.asdict(self.config)


def drop_labels(labels: Tensor, probability: float, generator: torch.Generator | None) -> Tensor:
    """Replace each label by the null class with `probability` (classifier-free guidance training)."""
    if probability <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < probability
    return torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)


def squared_error(target: Tensor, prediction: Tensor) -> Tensor:
    """Per-sample squared error summed over pixels, in float32."""
    return (target.float() - prediction.float()).square().flatten(1).sum(1)


def noised(schedule: NoiseSchedule, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Antithetic timesteps t, fresh noise, and x_t for a batch of clean images."""
    t = schedule.sample_timesteps(len(x0), generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    return t, noise, schedule.add_noise(x0, noise, t)


def noise_loss(
    model: nn.Module, schedule: NoiseSchedule, x0: Tensor, labels: Tensor, generator: torch.Generator,
    label_dropout: float = 0.0,
) -> Tensor:
    """The DDPM loss per sample: || noise - eps(x_t, label, t) ||^2 summed over pixels."""
    t, noise, x_t = noised(schedule, x0, generator)
    return squared_error(noise, model(x_t, t, drop_labels(labels, label_dropout, generator)))
