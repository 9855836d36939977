"""SAFEMax (Spartalis et al.): teach the model to predict the chain's final noise for the forget class.

Forget loss psi(t) ||eps_T - eps(x_t, c_f, t)||^2 with psi(t) = exp(-lambda t / T), plus the ordinary noise
loss on retained classes. eps_T is noise independent of x_t's own noise, so the optimum is eps(., c_f, .) ~ 0:
the sampler stops denoising and returns noise for the forget class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.config import TrainConfig, check_choice, check_number
from bench.diffusion import drop_labels, noised, squared_error
from methods.base import Batch, UnlearningMethod, register

TARGETS = ("chain", "iid", "zero")


@dataclass(frozen=True)
class SafeMaxConfig(TrainConfig):
    lam: float = 1.0  # decay rate of psi(t); 0 weights every step equally
    target: str = "chain"  # chain: eps_T from continuing the forward chain to T; iid: fresh noise; zero
    label_dropout: float = 0.1  # on the retained term only: regular fine-tuning, as in pretraining

    def __post_init__(self):
        super().__post_init__()
        check_choice("target", self.target, TARGETS)
        check_number("lam", self.lam, low=0)


def psi(t: Tensor, lam: float, timesteps: int) -> Tensor:
    """The forget-loss weight exp(-lambda t / T)."""
    return torch.exp(-lam * t.float() / timesteps)


@register
class SafeMax(UnlearningMethod):
    name = "safemax"
    Config = SafeMaxConfig
    display_name = "SAFEMax"
    description = "entropy maximization: forget class -> final-step Gaussian noise, weighted by exp(-lambda t/T)"
    bf16_measured = True  # docs/bf16.md

    def target(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        schedule, generator = self.ctx.schedule, self.ctx.noise_generator
        fresh = torch.randn(x0.shape, generator=generator, device=x0.device)
        if self.config.target == "zero":
            return torch.zeros_like(x0)
        if self.config.target == "iid":
            return fresh
        last = torch.full_like(t, schedule.timesteps - 1)
        x_last = schedule.continue_chain(x_t, t, last, fresh)
        return schedule.noise_from_x0(x_last, x0, last)

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        ctx = self.ctx
        x_forget, _ = batch["forget"]
        x_retain, y_retain = batch["retain"]
        t_f, _, xt_f = noised(ctx.schedule, x_forget, ctx.noise_generator)
        t_r, noise_r, xt_r = noised(ctx.schedule, x_retain, ctx.noise_generator)
        eps_target = self.target(x_forget, xt_f, t_f)
        labels_f = torch.full_like(t_f, ctx.forget_class)
        labels_r = drop_labels(y_retain, self.config.label_dropout, ctx.noise_generator)
        # One forward pass over forget and retain rows together (per-sample ops only, so it is exact).
        eps_f, eps_r = model(torch.cat([xt_f, xt_r]), torch.cat([t_f, t_r]), torch.cat([labels_f, labels_r])).split(
            [len(t_f), len(t_r)]
        )
        weight = psi(t_f, self.config.lam, ctx.schedule.timesteps)
        forget = (weight * squared_error(eps_target, eps_f)).mean()
        retain = squared_error(noise_r, eps_r).mean()
        return {"loss": forget + retain, "forget": forget, "retain": retain}
