"""Saliency Unlearning (Fan et al., ICLR 2024), random-label variant for DDPMs, as in the published code.

Mask: one pass over the real forget-class training images; the gradient of the guided (w = 2) noise loss,
each batch's gradient clipped to norm 1, summed, absolute value; the top (1 - sparsity) of all weights move.
Loss: MSE between eps(x_t, forget class) and a detached eps(x_t, pseudo class), plus alpha times the retain
noise loss; label dropout stays active in every prediction, as published.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.config import TrainConfig, check_choice, check_number
from bench.diffusion import count_noise_gradients, drop_labels, guided_eps, noise_loss, noised, squared_error
from methods.base import Batch, Context, UnlearningMethod, register

PSEUDO = ("next", "random")


@dataclass(frozen=True)
class SalUnConfig(TrainConfig):
    sparsity: float = 0.5  # fraction of weights frozen by the mask (published: top 50% move)
    alpha: float = 1e-3  # weight of the retain noise loss
    pseudo: str = "next"  # next: (c + 1) mod K, the published mapping; random: the older random labels
    label_dropout: float = 0.1  # kept active in both predictions, as published
    mask_guidance: float = 2.0
    mask_batch_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        check_choice("pseudo", self.pseudo, PSEUDO)
        check_number("sparsity", self.sparsity, low=0, high=1)
        if self.sparsity == 1:
            raise ValueError("sparsity must be < 1 (1 would mask every weight), got 1")
        check_number("alpha", self.alpha, low=0)
        check_number("mask_guidance", self.mask_guidance, low=0)
        check_number("mask_batch_size", self.mask_batch_size, low=1, integer=True)


def pseudo_labels(forget_class: int, count: int, num_classes: int, mode: str, generator: torch.Generator | None,
                  device) -> Tensor:
    """The class each forget image is relabelled to: the next class, or a random other class per image."""
    if mode == "next":
        return torch.full((count,), (forget_class + 1) % num_classes, device=device, dtype=torch.long)
    offsets = torch.randint(1, num_classes, (count,), generator=generator, device=device)
    return (forget_class + offsets) % num_classes


def saliency_scores(model: nn.Module, ctx: Context, batch_size: int, guidance: float) -> dict[str, Tensor]:
    """|sum over batches of clip_1(grad of the guided noise loss)| on the real forget-class images.

    Its noise comes from a fixed seed: the mask belongs to (base model, forget class), not to a run's seed.
    """
    model.eval()
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    forget = ctx.train_data.forget(ctx.forget_class)
    count_noise_gradients("saliency", model, len(forget), tuple(forget.images.shape[1:]), guidance)
    generator = torch.Generator(ctx.device).manual_seed(4242)
    for start in range(0, len(forget), batch_size):
        x0 = forget.images[start : start + batch_size].to(ctx.device)
        labels = forget.labels[start : start + batch_size].to(ctx.device)
        t, noise, x_t = noised(ctx.schedule, x0, generator)
        loss = squared_error(noise, guided_eps(model, x_t, t, labels, guidance)).mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        for name, p in params.items():
            total[name] += p.grad
    model.zero_grad(set_to_none=True)
    model.train()
    return {name: value.abs() for name, value in total.items()}


def top_fraction_mask(scores: dict[str, Tensor], keep: float) -> dict[str, Tensor]:
    """Boolean masks keeping exactly int(keep * total) of all weights (floor, as published), the highest scores."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    count = int(keep * flat.numel())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, count, sorted=False).indices] = True
    masks, offset = {}, 0
    for name, score in scores.items():
        masks[name] = chosen[offset : offset + score.numel()].view_as(score)
        offset += score.numel()
    return masks


@register
class SalUn(UnlearningMethod):
    name = "salun"
    Config = SalUnConfig
    display_name = "SalUn"
    description = "saliency-masked random labelling: forget class -> pseudo class, top-50% weights move"
    bf16_measured = True  # docs/bf16.md (its preparations stay fp32)

    def cache_key(self) -> str:
        config = self.config
        return (f"mask-class{self.ctx.forget_class}-sparsity{config.sparsity}-w{config.mask_guidance}"
                f"-b{config.mask_batch_size}")

    def prepare(self) -> dict[str, Tensor]:
        """{"mask.<parameter>": bool}: the top (1 - sparsity) of saliency scores, from the raw base weights."""
        config = self.config
        images = len(self.ctx.train_data.forget(self.ctx.forget_class))
        with self.ctx.stage("mask", images, "forget-class images"):
            scores = saliency_scores(self.ctx.unet(self.ctx.base_weights), self.ctx, config.mask_batch_size,
                                     config.mask_guidance)
            mask = top_fraction_mask(scores, 1.0 - config.sparsity)
        return {f"mask.{name}": value.cpu() for name, value in mask.items()}

    def grad_mask(self) -> dict[str, Tensor]:
        return {name.removeprefix("mask."): mask for name, mask in self.prepared.items()}

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        ctx, config = self.ctx, self.config
        x_forget, _ = batch["forget"]
        x_retain, y_retain = batch["retain"]
        gen = ctx.noise_generator
        t, _, x_t = noised(ctx.schedule, x_forget, gen)
        forget_labels = torch.full_like(t, ctx.forget_class)
        pseudo = pseudo_labels(ctx.forget_class, len(t), ctx.num_classes, config.pseudo, gen, x_t.device)
        with torch.no_grad():
            target = model(x_t, t, drop_labels(pseudo, config.label_dropout, gen))
        prediction = model(x_t, t, drop_labels(forget_labels, config.label_dropout, gen))
        forget = (prediction.float() - target.float()).square().mean()
        retain = noise_loss(model, ctx.schedule, x_retain, y_retain, gen, config.label_dropout).mean()
        return {"loss": forget + config.alpha * retain, "forget": forget, "retain": retain}
