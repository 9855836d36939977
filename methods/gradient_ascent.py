"""Gradient-based baselines: gradient ascent on the forget class and NegGrad+.

`ga` is SalUn's published `ga` baseline by default (`variant="salun"`): ascend the forget class's noise loss, with
the loss's default label dropout of 0.1, plus `alpha` times the retained classes' noise loss (label dropout 0.1),
SalUn's loaders (each image flipped once), no mask, no EMA. `variant="plain"` drops the retained term and the
label dropout: pure gradient ascent on the forget loss, which nothing holds in place.

The published script takes `--alpha` (parser default 1.0) and applies SalUn's saliency mask whenever `--mask_path`
is given; its README's one unlearning command passes `--alpha 1e-3` and a mask. Our default reads it as an unmasked
baseline with the README's alpha; `mask="saliency"` is that command with `--method ga` (SalUn's mask, after
clipping), and `alpha=1.0` the parser's default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor, nn

from bench.config import TrainConfig, check_choice, check_number
from bench.diffusion import noise_loss
from methods.base import Batch, UnlearningMethod, register
from methods.salun import SalUn, SalUnConfig, saliency_scores, top_fraction_mask

GA_VARIANTS = ("salun", "plain")
GA_MASKS = ("none", "saliency")


@dataclass(frozen=True)
class GradientAscentConfig(TrainConfig):
    variant: str = "salun"  # salun: SalUn's `ga` (forget ascent + alpha * retain); plain: forget ascent alone
    # Weight of the retained term. SalUn's `--alpha` defaults to 1.0 in its argument parser; its README runs the
    # same script with `--alpha 1e-3`, the value taken here (and by `salun`).
    alpha: float = 1e-3
    label_dropout: float = 0.1  # both terms, the loss's default in the published code (plain: 0 on its one term)
    # none: no mask (the script without `--mask_path`); saliency: SalUn's mask (top 50% of the forget gradient, its
    # settings), applied after clipping, as the script does whenever `--mask_path` is given (the README command)
    mask: str = "none"

    def __post_init__(self):
        super().__post_init__()
        check_choice("variant", self.variant, GA_VARIANTS)
        check_choice("mask", self.mask, GA_MASKS)
        check_number("alpha", self.alpha, low=0)


@register
class GradientAscent(UnlearningMethod):
    """Maximize the forget class's noise loss (SalUn's `ga`: plus alpha times the retained classes' loss)."""

    name = "ga"
    Config = GradientAscentConfig
    display_name = "GA"
    description = "gradient ascent on the forget class's noise loss (+ alpha * retain loss, SalUn's ga)"

    def salun_mask_settings(self) -> SalUnConfig:
        """SalUn's config on this run's preset: the mask's `sparsity`, `mask_guidance` and `mask_batch_size`."""
        return dataclasses.replace(SalUnConfig(), **SalUn.preset_defaults(self.ctx.preset))

    def cache_key(self) -> str | None:
        if self.config.mask == "none":
            return None
        salun = self.salun_mask_settings()
        return (f"saliency-mask-class{self.ctx.forget_class}-sparsity{salun.sparsity}-w{salun.mask_guidance}"
                f"-b{salun.mask_batch_size}")

    def prepare(self) -> dict[str, Tensor]:
        """{"mask.<parameter>": bool}: SalUn's saliency mask with SalUn's settings (`mask="saliency"` only)."""
        if self.config.mask == "none":
            return {}
        ctx, salun = self.ctx, self.salun_mask_settings()
        with ctx.stage("mask", len(ctx.train_data.forget(ctx.forget_class)), "forget-class images"):
            scores = saliency_scores(ctx.unet(ctx.base_weights), ctx, salun.mask_batch_size, salun.mask_guidance)
            mask = top_fraction_mask(scores, 1.0 - salun.sparsity)
        return {f"mask.{name}": value.cpu() for name, value in mask.items()}

    def grad_mask(self) -> dict[str, Tensor] | None:
        if self.config.mask == "none":
            return None
        if not self.prepared:
            raise RuntimeError("ga with mask=saliency needs its preparation (SalUn's mask): set `prepared = prepare()`")
        return {name.removeprefix("mask."): mask for name, mask in self.prepared.items()}

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

    def __post_init__(self):
        super().__post_init__()
        check_number("gamma", self.gamma, low=0)  # negative: a second retain term, not unlearning


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
