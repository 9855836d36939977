"""Selective Amnesia (Heng & Soh, NeurIPS 2023) for class-conditional DDPMs, as in the published code.

Preparation (once per base model, cached): 'priors', N samples per class from the base model's EMA weights
with guidance 2; the diagonal empirical Fisher of the per-sample loss summed over the timesteps, from the
non-EMA weights in eval mode, computed with batched per-sample gradients (torch.func.vmap).
Loss: uniform-noise images labelled with the forget class + gamma * replay of retained-class priors
+ lambda * sum F (theta - theta*)^2; EMA continued from the base model's EMA.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from bench.config import TrainConfig, check_choice, check_number
from bench.data import ClassDataset, from_uint8, training_batches
from bench.device import progress_bar, same_layout
from bench.diffusion import NoiseSchedule, count_noise_gradients, drop_labels, squared_error
from bench.unet import NULL_CLASS
from methods.base import Batch, UnlearningMethod, register

FIM_INPUTS = ("unit", "model")


@dataclass(frozen=True)
class SAConfig(TrainConfig):
    iterations: int = 20_000
    ema: bool = True  # continued from the base model's EMA
    lam: float = 10.0  # EWC weight
    gamma: float = 1.0  # weight of the replay (retain) term
    # Label dropout of the replay term; the published forget objective passes 0 to both of its noise losses.
    label_dropout: float = 0.0
    hflip: str = "every_draw"  # replay images, flipped with p = 0.5 at every draw as published
    prior_samples_per_class: int = 500
    fim_timesteps: int = 0  # 0 = all T timesteps, as published; fewer are evenly spaced and rescaled by T/K
    # The published code feeds the Fisher its images in [0, 1] instead of the model's [-1, 1]: "unit" keeps that.
    fim_inputs: str = "unit"
    fim_batch_size: int = 4  # images per vmap call
    fim_timestep_chunk: int = 250  # timesteps per forward within one vmap call
    # The published Fisher calls the noise loss with its default label dropout: each (image, timestep) term uses
    # the null-class embedding with this probability, so the null embedding gets Fisher mass and EWC holds it.
    fim_label_dropout: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        check_choice("fim_inputs", self.fim_inputs, FIM_INPUTS)
        check_number("lam", self.lam, low=0)  # a negative EWC weight pushes away from the base model
        check_number("gamma", self.gamma, low=0)
        check_number("prior_samples_per_class", self.prior_samples_per_class, low=1, integer=True)
        check_number("fim_timesteps", self.fim_timesteps, low=0, integer=True)
        check_number("fim_batch_size", self.fim_batch_size, low=1, integer=True)
        check_number("fim_timestep_chunk", self.fim_timestep_chunk, low=1, integer=True)
        check_number("fim_label_dropout", self.fim_label_dropout, low=0, high=1)


def fisher_timesteps(schedule: NoiseSchedule, count: int, device) -> tuple[Tensor, float]:
    """All T timesteps, or `count` evenly spaced ones with the factor T / count that rescales their sum."""
    if count <= 0 or count >= schedule.timesteps:
        return torch.arange(schedule.timesteps, device=device), 1.0
    steps = torch.linspace(0, schedule.timesteps - 1, count, device=device).round().long()
    return steps, schedule.timesteps / count


def diagonal_fisher(model: nn.Module, schedule: NoiseSchedule, images: Tensor, labels: Tensor, timesteps: Tensor,
                    scale: float, generator: torch.Generator, batch_size: int, timestep_chunk: int,
                    progress: bool = False, label_dropout: float = 0.0) -> dict[str, Tensor]:
    """F = mean over images of g^2, g = scale * grad of sum_t ||noise_t - eps(x_t, y_t, t)||^2 (one draw per t).

    y_t is the image's label, or the null class with probability `label_dropout`, drawn per (image, t).
    Per-sample gradients come from vmap over images; the timesteps of one image form the batch of its
    forward pass, in chunks whose gradients add up before squaring.
    """
    model.eval()
    device = images.device
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def image_loss(p, x0, step_labels, noise, steps):
        x_t = schedule.add_noise(x0.expand(len(steps), *x0.shape), noise, steps)
        eps = functional_call(model, (p, buffers), (x_t, steps, step_labels))
        return squared_error(noise, eps).sum()

    per_sample_grad = vmap(grad(image_loss), in_dims=(None, 0, 0, 0, None))
    count_noise_gradients("fisher", model, len(images) * len(timesteps), tuple(images.shape[1:]))
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    for start in progress_bar(iterable=range(0, len(images), batch_size), desc="fisher", disable=not progress,
                              leave=False):
        x0, y = images[start : start + batch_size], labels[start : start + batch_size]
        noise = torch.randn((len(x0), len(timesteps), *x0.shape[1:]), generator=generator, device=device)
        step_labels = y[:, None].expand(-1, len(timesteps))
        if label_dropout > 0:
            dropped = torch.rand(step_labels.shape, generator=generator, device=device) < label_dropout
            step_labels = torch.where(dropped, NULL_CLASS, step_labels)
        total = None
        for chunk in range(0, len(timesteps), timestep_chunk):
            steps = timesteps[chunk : chunk + timestep_chunk]
            chunk_labels = step_labels[:, chunk : chunk + len(steps)]
            grads = per_sample_grad(params, x0, chunk_labels, noise[:, chunk : chunk + len(steps)], steps)
            total = grads if total is None else {k: total[k] + grads[k] for k in grads}
        for name, g in total.items():
            fisher[name] += (scale * g).square().sum(0)
    return {name: value / len(images) for name, value in fisher.items()}


@register
class SelectiveAmnesia(UnlearningMethod):
    name = "sa"
    Config = SAConfig
    display_name = "SA"
    description = "Selective Amnesia: EWC with a diagonal Fisher + generative replay, forget class -> uniform noise"
    bf16_measured = True  # docs/bf16.md (its preparations stay fp32)

    def cache_key(self) -> str:
        """Priors and Fisher depend on the base model, the prior count, the sampler and the Fisher's settings;
        not on the forget class: one preparation serves every class."""
        config, protocol = self.config, self.ctx.preset.protocol(None)
        sampler = f"{protocol.sampler_steps}s-eta{protocol.eta}-w{protocol.guidance}-{protocol.image_conversion}"
        return (f"priors{config.prior_samples_per_class}-{sampler}-fisher-t{config.fim_timesteps}-"
                f"{config.fim_inputs}-drop{config.fim_label_dropout}")

    def prepare(self) -> dict[str, Tensor]:
        """Priors from the base model's EMA weights (the evaluation sampler, as published), then the Fisher of the
        non-EMA weights on them: {"priors.images" (uint8), "priors.labels", "fisher.<parameter>"}."""
        ctx, config = self.ctx, self.config
        n = config.prior_samples_per_class
        sampler_steps = len(ctx.schedule.sampler_steps(ctx.preset.protocol(None).sampler_steps))
        with ctx.stage("priors", n * ctx.num_classes * sampler_steps, "image-steps"):
            images = torch.cat([ctx.generate(ctx.base_ema, c, n) for c in range(ctx.num_classes)])
            labels = torch.arange(ctx.num_classes).repeat_interleave(n)
        steps, scale = fisher_timesteps(ctx.schedule, config.fim_timesteps, ctx.device)
        with ctx.stage("fisher", len(images) * len(steps), "image-timesteps"):
            model = ctx.unet(ctx.base_weights)
            inputs = from_uint8(images).to(ctx.device)
            if config.fim_inputs == "unit":
                inputs = (inputs + 1) / 2
            generator = torch.Generator(ctx.device).manual_seed(1234)
            fisher = diagonal_fisher(model, ctx.schedule, inputs, labels.to(ctx.device), steps, scale, generator,
                                     config.fim_batch_size, config.fim_timestep_chunk, ctx.progress,
                                     config.fim_label_dropout)
        return {"priors.images": images, "priors.labels": labels,
                **{f"fisher.{name}": value.cpu() for name, value in fisher.items()}}

    def batches(self) -> Iterator[Batch]:
        priors = ClassDataset(from_uint8(self.prepared["priors.images"]), self.prepared["priors.labels"],
                              self.ctx.train_data.class_names, "SA priors")
        replay = priors.retain(self.ctx.forget_class)
        for pair in training_batches(replay, self.config.batch_size, self.ctx.data_generator, self.config.hflip):
            yield {"retain": pair}

    def ewc(self, model: nn.Module) -> Tensor:
        """sum_i F_i (theta_i - theta*_i)^2, with foreach ops over all parameters."""
        names, params = zip(*model.named_parameters())
        if not hasattr(self, "_fisher"):  # once, at the first step: F and theta* in the weights' device and layout
            self._fisher = [same_layout(self.prepared[f"fisher.{name}"], p) for name, p in zip(names, params)]
            self._theta_star = [same_layout(self.ctx.base_weights[name], p) for name, p in zip(names, params)]
        diffs = torch._foreach_sub(list(params), self._theta_star)
        weighted = torch._foreach_mul(torch._foreach_mul(diffs, diffs), self._fisher)
        return torch.stack([w.sum() for w in weighted]).sum()

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        ctx, config = self.ctx, self.config
        x_retain, y_retain = batch["retain"]
        gen = ctx.noise_generator
        size = len(x_retain)
        t = ctx.schedule.sample_timesteps(size, gen, x_retain.device)  # the same t for both terms, as published
        x_forget = torch.rand(x_retain.shape, generator=gen, device=x_retain.device) * 2 - 1
        noise = torch.randn((2 * size, *x_retain.shape[1:]), generator=gen, device=x_retain.device)
        t_both = torch.cat([t, t])
        x_t = ctx.schedule.add_noise(torch.cat([x_forget, x_retain]), noise, t_both)
        labels = torch.cat([torch.full_like(t, ctx.forget_class), drop_labels(y_retain, config.label_dropout, gen)])
        eps_forget, eps_retain = model(x_t, t_both, labels).split([size, size])
        noise_forget, noise_retain = noise.split([size, size])
        forget = squared_error(noise_forget, eps_forget).mean()
        retain = squared_error(noise_retain, eps_retain).mean()
        ewc = self.ewc(model)
        return {"loss": forget + config.gamma * retain + config.lam * ewc, "forget": forget, "retain": retain,
                "ewc": ewc}
