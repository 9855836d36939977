"""The DDPM arithmetic: noise schedule, training loss and sampler, kept apart from the network.

Timesteps are integers in [0, T): step t has cumulative product abar_t = prod_{i<=t} (1 - beta_i), as in the
DDIM codebase that SA and SalUn build on. The loss is theirs: squared error summed over pixels, antithetic
timesteps, classifier-free-guidance label dropout. The sampler is DDIM's "generalized" update; eta = 1 over
every step is the reference evaluation (it equals ancestral DDPM sampling), fewer steps give the DDIM protocols.
Given a `Speed`, the guided prediction runs under bf16 autocast, torch.compile or as a replayed CUDA graph;
without one it is the plain fp32 eager forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bench.config import DiffusionConfig
from bench.device import PLAIN, Speed, autocast
from bench.flops import count_forward, count_gradient
from bench.unet import NULL_CLASS

log = logging.getLogger(__name__)

EpsModel = Callable[[Tensor, Tensor, Tensor], Tensor]


class NoiseSchedule:
    def __init__(self, config: DiffusionConfig, device: torch.device | str = "cpu"):
        self.config = config
        self.timesteps = config.timesteps
        betas = torch.linspace(config.beta_start, config.beta_end, config.timesteps, dtype=torch.float64)
        self.betas = betas.to(device)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(device)

    def abar(self, t: Tensor) -> Tensor:
        """abar_t for integer steps; t = -1 gives 1 (the clean image), as the sampler's last step needs."""
        padded = torch.cat([torch.ones(1, dtype=torch.float64, device=self.alphas_cumprod.device), self.alphas_cumprod])
        return padded[t.long() + 1]

    def _bcast(self, values: Tensor, like: Tensor) -> Tensor:
        return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        abar = self.abar(t)
        return self._bcast(abar.sqrt(), x0) * x0 + self._bcast((1 - abar).sqrt(), x0) * noise

    def continue_chain(self, x_t: Tensor, t: Tensor, t_end: Tensor, noise: Tensor) -> Tensor:
        """Run the forward chain on from step t to step t_end > t: x_end ~ q(x_end | x_t) with fresh `noise`."""
        ratio = self.abar(t_end) / self.abar(t)
        return self._bcast(ratio.sqrt(), x_t) * x_t + self._bcast((1 - ratio).sqrt(), x_t) * noise

    def noise_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """The noise that takes x0 to x_t at step t: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
        abar = self.abar(t)
        return (x_t - self._bcast(abar.sqrt(), x0) * x0) / self._bcast((1 - abar).sqrt(), x0)

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None, device) -> Tensor:
        """Antithetic timesteps as in the DDPM/SA code: n//2 + 1 uniform draws u, then T - 1 - u, cut to n."""
        half = torch.randint(0, self.timesteps, (batch_size // 2 + 1,), generator=generator, device=device)
        return torch.cat([half, self.timesteps - 1 - half])[:batch_size]

    def sampler_steps(self, num_steps: int) -> list[int]:
        """The published `uniform` skip: range(0, T, T // num_steps), evaluated from its last step down.

        Where `num_steps` does not divide T the sequence is longer than `num_steps` (n = 300 of T = 1000 gives
        334 steps, 0, 3, ..., 999), exactly as the SA/SalUn sampler runs it. The chain starts from pure noise at
        the sequence's last step (999 for n = 300 or 1000, 990 for n = 100, 950 for n = 20).
        """
        if not 1 <= num_steps <= self.timesteps:
            raise ValueError(f"sampler steps must be in [1, {self.timesteps}], got {num_steps}")
        return list(range(0, self.timesteps, self.timesteps // num_steps))

    def ddim_step(self, x_t: Tensor, eps: Tensor, t: Tensor, t_prev: Tensor, eta: float, noise: Tensor) -> Tensor:
        """One generalized DDIM update from step t to t_prev (t_prev = -1 ends at the image)."""
        at, at_prev = self._bcast(self.abar(t), x_t), self._bcast(self.abar(t_prev), x_t)
        x0_pred = (x_t - eps * (1 - at).sqrt()) / at.sqrt()
        c1 = eta * ((1 - at / at_prev) * (1 - at_prev) / (1 - at)).sqrt()
        c2 = ((1 - at_prev) - c1**2).sqrt()
        return at_prev.sqrt() * x0_pred + c1 * noise + c2 * eps


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


def guided_eps(model: EpsModel, x: Tensor, t: Tensor, labels: Tensor, guidance: float) -> Tensor:
    """(1 + w) eps(x, c) - w eps(x, null), with both halves in one batched forward pass."""
    if guidance == 0:
        return model(x, t, labels)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, NULL_CLASS)]))
    cond, uncond = both.chunk(2)
    return (1 + guidance) * cond - guidance * uncond


def count_noise_gradients(name: str, model: nn.Module, passes: int, shape: tuple[int, ...],
                          guidance: float = 0.0) -> None:
    """Count `passes` gradients of the (guided) noise loss, one image each, into the open FLOP ledger (`bench.flops`):
    the Fisher and saliency passes of preparations. Counted once per model, shape and guidance, on zeros."""
    device = next(model.parameters()).device

    def one_pass() -> None:
        x = torch.zeros((1, *shape), device=device)
        t = torch.zeros(1, dtype=torch.long, device=device)
        guided_eps(model, x, t, torch.zeros(1, dtype=torch.long, device=device), guidance).square().sum().backward()

    count_gradient(name, model, passes, one_pass, (tuple(shape), float(guidance)))


def guided_predictor(model: EpsModel, labels: Tensor, shape: tuple[int, ...], guidance: float,
                     speed: Speed) -> Callable[[Tensor, Tensor], Tensor]:
    """eps(x, t) of `guided_eps` for fixed `labels` under `speed` (already resolved for the device).

    Labels and shapes stay fixed over a sampling run, which is what a CUDA graph needs. torch.compile with
    CUDA graphs uses its own graphs ("reduce-overhead"); channels_last converts `model`'s weights in place.
    """
    device = labels.device
    if speed.channels_last and isinstance(model, torch.nn.Module):
        model.to(memory_format=torch.channels_last)
    if speed.compile:
        model = torch.compile(model, mode="reduce-overhead" if speed.cuda_graphs else None)

    def predict(x: Tensor, t: Tensor) -> Tensor:
        if speed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, speed.amp, cache=not speed.cuda_graphs):
            return guided_eps(model, x, t, labels, guidance)

    if speed.cuda_graphs and not speed.compile:
        try:
            return _graphed(predict, shape, device)
        except RuntimeError as exc:  # capture unsupported here (a driver, an op): eager is slower, not wrong
            log.warning("CUDA graph capture of the sampler failed (%s); sampling eagerly", str(exc).splitlines()[0])
    return predict


def _graphed(predict: Callable[[Tensor, Tensor], Tensor], shape: tuple[int, ...],
             device: torch.device) -> Callable[[Tensor, Tensor], Tensor]:
    """Capture `predict` once on static inputs and replay it: one launch per step instead of hundreds."""
    static_x = torch.zeros(shape, device=device)
    static_t = torch.zeros(shape[0], dtype=torch.long, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside the graph: cuDNN/cuBLAS handles and workspaces
        for _ in range(2):
            predict(static_x, static_t)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_eps = predict(static_x, static_t)

    def replay(x: Tensor, t: Tensor) -> Tensor:
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        return static_eps.clone()

    return replay


@torch.no_grad()
def sample(
    model: EpsModel,
    schedule: NoiseSchedule,
    labels: Tensor,
    shape: tuple[int, ...],
    *,
    steps: int,
    eta: float,
    guidance: float,
    generator: torch.Generator | None = None,
    on_step: Callable[[], None] | None = None,
    speed: Speed | None = None,
) -> Tensor:
    """Draw images for `labels` from pure noise; returns values clamped to [-1, 1], in float32.

    `speed` (default: the plain fp32 eager path) switches on bf16, channels_last, compile or CUDA graphs.
    """
    device = labels.device
    seq = schedule.sampler_steps(steps)
    count_forward("sampler", model, len(seq) * len(labels) * (1 if guidance == 0 else 2),
                  lambda: model(torch.zeros((1, *shape), device=device), torch.zeros(1, dtype=torch.long, device=device),
                                labels[:1]), shape)
    predict = guided_predictor(model, labels, (len(labels), *shape), guidance, (speed or PLAIN).for_device(device))
    x = torch.randn((len(labels), *shape), generator=generator, device=device)
    for t_now, t_prev in zip(reversed(seq), reversed([-1] + seq[:-1])):
        t = torch.full((len(labels),), t_now, device=device, dtype=torch.long)
        eps = predict(x, t).float()
        noise = torch.randn(x.shape, generator=generator, device=device) if eta > 0 else torch.zeros_like(x)
        x = schedule.ddim_step(x, eps, t, torch.full_like(t, t_prev), eta, noise)
        if on_step is not None:
            on_step()
    return x.clamp(-1, 1)
