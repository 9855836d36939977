"""Retraining from scratch on the retained classes with the pretraining recipe: the gold standard."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from bench.config import TrainConfig
from bench.data import training_batches
from bench.diffusion import noise_loss
from methods.base import Batch, UnlearningMethod, register


@dataclass(frozen=True)
class RetrainConfig(TrainConfig):
    iterations: int = 800_000
    batch_size: int = 128
    lr: float = 2e-4
    ema: bool = True
    ema_decay: float = 0.9999
    label_dropout: float = 0.1
    hflip: str = "every_draw"  # as pretraining: a RandomHorizontalFlip in the loader


@register
class Retrain(UnlearningMethod):
    name = "retrain"
    Config = RetrainConfig
    display_name = "Retrain"
    description = "retrain from scratch on the retained classes (pretraining recipe)"
    from_scratch = True

    @classmethod
    def preset_defaults(cls, preset) -> dict:
        """The preset's pretraining recipe, field for field."""
        return {**dataclasses.asdict(preset.pretrain), **preset.method_defaults.get(cls.name, {})}

    def batches(self) -> Iterator[Batch]:
        ctx = self.ctx
        retain = ctx.train_data.retain(ctx.forget_class)
        for pair in training_batches(retain, self.config.batch_size, ctx.data_generator, self.config.hflip):
            yield {"retain": pair}

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        x, y = batch["retain"]
        loss = noise_loss(model, self.ctx.schedule, x, y, self.ctx.noise_generator, self.config.label_dropout).mean()
        return {"loss": loss}
