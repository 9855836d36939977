"""Gradient-based baselines: gradient ascent on the forget class (SalUn's `ga`) and NegGrad+."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from methods.base import Batch, MethodConfig, UnlearningMethod, noise_loss


class GradientAscent(UnlearningMethod):
    """Maximize the forget class's noise loss; nothing holds the retained classes in place."""

    name = "ga"
    description = "gradient ascent on the forget class's noise loss"

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        x_forget, y_forget = batch["forget"]
        forget = noise_loss(model, self.ctx.schedule, x_forget, y_forget, self.ctx.noise_generator).mean()
        return {"loss": -forget, "forget": forget}


@dataclass(frozen=True)
class NegGradPlusConfig(MethodConfig):
    gamma: float = 0.1  # weight of the (negated) forget loss
    label_dropout: float = 0.1  # on the retained term, as in pretraining


class NegGradPlus(UnlearningMethod):
    """Retain loss minus gamma times forget loss (Kurmanji et al.)."""

    name = "neggrad_plus"
    Config = NegGradPlusConfig
    description = "retain noise loss - gamma * forget noise loss"

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        ctx, config = self.ctx, self.config
        x_forget, y_forget = batch["forget"]
        x_retain, y_retain = batch["retain"]
        forget = noise_loss(model, ctx.schedule, x_forget, y_forget, ctx.noise_generator).mean()
        retain = noise_loss(model, ctx.schedule, x_retain, y_retain, ctx.noise_generator, config.label_dropout).mean()
        return {"loss": retain - config.gamma * forget, "forget": forget, "retain": retain}
