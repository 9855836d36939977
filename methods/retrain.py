"""Retraining from scratch on the retained classes with the pretraining recipe: the gold standard."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from bench.data import training_batches
from methods.base import Batch, MethodConfig, UnlearningMethod, noise_loss


@dataclass(frozen=True)
class RetrainConfig(MethodConfig):
    iterations: int = 800_000
    batch_size: int = 128
    lr: float = 2e-4
    ema: bool = True
    ema_decay: float = 0.9999
    label_dropout: float = 0.1
    hflip: str = "every_draw"  # as pretraining: a RandomHorizontalFlip in the loader


class Retrain(UnlearningMethod):
    name = "retrain"
    Config = RetrainConfig
    description = "retrain from scratch on the retained classes (pretraining recipe)"
    from_scratch = True

    @classmethod
    def preset_defaults(cls, preset) -> dict:
        recipe = preset.pretrain
        return {"iterations": recipe.iterations, "batch_size": recipe.batch_size, "lr": recipe.lr,
                "ema_decay": recipe.ema_decay, "hflip": "every_draw" if recipe.hflip else "none", "grad_clip": recipe.grad_clip,
                "lr_warmdown": recipe.lr_warmdown,
                **preset.method_defaults.get(cls.name, {})}

    def batches(self) -> Iterator[Batch]:
        ctx = self.ctx
        retain = ctx.train_data.retain(ctx.forget_class)
        for x, y in training_batches(retain, self.config.batch_size, ctx.data_generator, self.config.hflip):
            yield {"retain": (x.to(ctx.device), y.to(ctx.device))}

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        x, y = batch["retain"]
        loss = noise_loss(model, self.ctx.schedule, x, y, self.ctx.noise_generator, self.config.label_dropout).mean()
        return {"loss": loss}
