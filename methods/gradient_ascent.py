"""Gradient-based baselines: gradient ascent on the forget class and NegGrad+.

`ga` is SalUn's published `ga` baseline by default (`variant="salun"`): ascend the forget class's noise loss, with
the loss's default label dropout of 0.1, plus `alpha` times the retained classes' noise loss (label dropout 0.1),
SalUn's loaders (each image flipped once), no mask, no EMA. `variant="plain"` drops the retained term and the
label dropout: pure gradient ascent on the forget loss, which nothing holds in place.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from bench.config import TrainConfig, check_choice
from bench.diffusion import noise_loss
from methods.base import Batch, UnlearningMethod, register

GA_VARIANTS = ("salun", "plain")


@dataclass(frozen=True)
class GradientAscentConfig(TrainConfig):
    variant: str = "salun"  # salun: SalUn's `ga` (forget ascent + alpha * retain); plain: forget ascent alone
    # Weight of the retained term. SalUn's `--alpha` defaults to 1.0 in its argument parser; its README runs the
    # same script with `--alpha 1e-3`, the value taken here (and by `salun`).
    alpha: float = 1e-3
    label_dropout: float = 0.1  # both terms, the loss's default in the published code (plain: 0 on its one term)

    def __post_init__(self):
        super().__post_init__()
        check_choice("variant", self.variant, GA_VARIANTS)


@register
class GradientAscent(UnlearningMethod):
    """Maximize the forget class's noise loss (SalUn's `ga`: plus alpha times the retained classes' loss)."""

    name = "ga"
    Config = GradientAscentConfig
    display_name = "GA"
    description = "gradient ascent on the forget class's noise loss (+ alpha * retain loss, SalUn's ga)"

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        ctx, config = self.ctx, self.config
        x_forget, y_forget = batch["forget"]
        if config.variant == "plain":
            forget = noise_loss(model, ctx.schedule, x_forget, y_forget, ctx.noise_generator).mean()
            return {"loss": -forget, "forget": forget}
        x_retain, y_retain = batch["retain"]
        retain = noise_loss(model, ctx.schedule, x_retain, y_retain, ctx.noise_generator, config.label_dropout).mean()
        forget = noise_loss(model, ctx.schedule, x_forget, y_forget, ctx.noise_generator, config.label_dropout).mean()
        return {"loss": -forget + config.alpha * retain, "forget": forget, "retain": retain}


@dataclass(frozen=True)
class NegGradPlusConfig(TrainConfig):
    gamma: float = 0.1  # weight of the (negated) forget loss
    label_dropout: float = 0.1  # on the retained term, as in pretraining


@register
class NegGradPlus(UnlearningMethod):
    """Retain loss minus gamma times forget loss (Kurmanji et al.)."""

    name = "neggrad_plus"
    Config = NegGradPlusConfig
    display_name = "NegGrad+"
    description = "retain noise loss - gamma * forget noise loss"

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        ctx, config = self.ctx, self.config
        x_forget, y_forget = batch["forget"]
        x_retain, y_retain = batch["retain"]
        forget = noise_loss(model, ctx.schedule, x_forget, y_forget, ctx.noise_generator).mean()
        retain = noise_loss(model, ctx.schedule, x_retain, y_retain, ctx.noise_generator, config.label_dropout).mean()
        return {"loss": retain - config.gamma * forget, "forget": forget, "retain": retain}
