"""EraseDiff (Wu, Le, Hayat, Harandi; CVPR 2025) for class-conditional DDPMs, as its published DDPM code runs it.

Outer loss: the retained images' noise loss (element mean, no label dropout) + lambda (forget loss - f_hat).
Before every round of `outer_steps` outer steps, the unroll: K passes of unclipped Adam steps on the forget loss
over the whole forget set with the shared optimizer, then the weights (not Adam's state) put back; f_hat is the
mean forget loss of the last pass. Forget loss `relabel` (the code's HEAD): element-mean MSE between eps(x_t, c_f)
and a detached eps(x_t, c~), one pseudo class c~ uniform in {1..9} per batch, label dropout 0.1 on both;
`uniform_noise` (Feb-Aug 2024): the noise loss with U[0, 1) noise as corruption and target. EMA 0.99 continued
from the base model's EMA; flips redrawn at every draw.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.config import Preset, TrainConfig, check_choice, check_number
from bench.data import flip_once, infinite_batches
from bench.diffusion import drop_labels, squared_error
from bench.runner import Trainer
from methods.base import Context, UnlearningMethod, register

FORGET_LOSSES = ("relabel", "uniform_noise")
ROUNDS = 8  # 4 epochs (`--unl_eps`) x 2 rounds each (`--S_steps`)


@dataclass(frozen=True)
class EraseDiffConfig(TrainConfig):
    iterations: int = 288  # outer steps: 8 rounds x 36
    ema: bool = True  # continued from the base model's EMA, updated on outer steps only
    ema_decay: float = 0.99
    hflip: str = "every_draw"
    label_dropout: float = 0.0  # of the retain term, as published
    outer_steps: int = 36  # per round: the published round stops once > 4,500 retained images were used
    inner_passes: int = 2  # K: passes over the forget set per unroll
    lam: float = 0.1  # constraint weight; negative: adaptive, max(eta - cos(grad F, grad q), 0)
    eta: float = 0.1  # of the adaptive lambda only
    forget_loss: str = "relabel"
    forget_label_dropout: float = 0.1  # relabel: both predictions (the yml's cond_drop_prob); uniform_noise: none

    def __post_init__(self):
        super().__post_init__()
        check_choice("forget_loss", self.forget_loss, FORGET_LOSSES)
        check_number("outer_steps", self.outer_steps, low=1, integer=True)
        check_number("inner_passes", self.inner_passes, low=1, integer=True)
        check_number("lam", self.lam)
        check_number("eta", self.eta)
        check_number("forget_label_dropout", self.forget_label_dropout, low=0, high=1)


def adaptive_lambda(retain: Tensor, forget: Tensor, params: list[Tensor], eta: float) -> Tensor:
    """max(eta - cos(grad retain, grad forget), 0) over all parameters flattened together; 0 where grad forget = 0."""
    grads_retain = torch.autograd.grad(retain, params, retain_graph=True, allow_unused=True)
    grads_forget = torch.autograd.grad(forget, params, retain_graph=True, allow_unused=True)
    zero = retain.new_zeros(())
    dot = sum(((a * b).sum() for a, b in zip(grads_retain, grads_forget) if a is not None and b is not None), zero)
    norm_retain = sum((a.square().sum() for a in grads_retain if a is not None), zero).sqrt()
    norm_forget = sum((b.square().sum() for b in grads_forget if b is not None), zero).sqrt()
    cosine = dot / (norm_retain * norm_forget).clamp_min(torch.finfo(dot.dtype).tiny)
    return torch.where(norm_forget > 0, (eta - cosine).clamp_min(0), zero).detach()


@register
class EraseDiff(UnlearningMethod):
    name = "erasediff"
    Config = EraseDiffConfig
    display_name = "EraseDiff"
    description = "EraseDiff: retain loss + lambda (relabel forget loss - its value after a K-pass unroll)"

    def __init__(self, config: EraseDiffConfig, ctx: Context):
        super().__init__(config, ctx)
        self.f_hat, self.inner_steps = 0.0, 0

    @classmethod
    def preset_defaults(cls, preset: Preset) -> dict:
        """8 rounds (fewer where the scaled run is shorter) of 1/8 of the scaled outer steps: digits gets 8 x 4 steps
        of 32, 128 retained images a round, ~10% of its retained set, as 36 x 128 is of CIFAR-10's 45,000."""
        defaults, paper = super().preset_defaults(preset), cls.Config()
        rounds = min(ROUNDS, defaults["iterations"])
        outer_steps = max(1, round(defaults["iterations"] / rounds))
        iterations = rounds * outer_steps
        ema_decay = round(paper.ema_decay ** (paper.iterations / iterations), 6)  # keeps 0.99 ** 288 of the base EMA
        scaled = {"iterations": iterations, "outer_steps": outer_steps, "ema_decay": ema_decay}
        return {**defaults, **scaled, **preset.method_defaults.get(cls.name, {})}

    def datasets(self):
        ctx = self.ctx
        forget, retain = ctx.train_data.forget(ctx.forget_class), ctx.train_data.retain(ctx.forget_class)
        if self.config.hflip == "once":
            forget, retain = flip_once(forget, ctx.data_generator), flip_once(retain, ctx.data_generator)
        return forget, retain

    def batches(self) -> Iterator[dict]:
        """Rounds of `outer_steps` (forget, retain) batches from fresh shuffles, as each published round restarts its
        loaders; a round's first batch also holds `unroll`: K shuffled passes over the whole forget set, end to end."""
        config, generator = self.config, self.ctx.data_generator
        forget, retain = self.datasets()
        flip = config.hflip == "every_draw"
        while True:
            passes = [next(infinite_batches(forget, len(forget), generator, flip)) for _ in range(config.inner_passes)]
            unroll = tuple(torch.cat(parts) for parts in zip(*passes))
            forget_batches = infinite_batches(forget, config.batch_size, generator, flip)
            retain_batches = infinite_batches(retain, config.batch_size, generator, flip)
            for index in range(config.outer_steps):
                batch = {"forget": next(forget_batches), "retain": next(retain_batches)}
                yield {**batch, "unroll": unroll} if index == 0 else batch

    def update(self, step: int, trainer: Trainer, batch: dict) -> dict[str, Tensor]:
        if "unroll" in batch:
            self.f_hat = self.unroll(trainer, batch["unroll"])
        return trainer.update(lambda: self.loss(trainer.model, batch))

    def unroll(self, trainer: Trainer, unroll: tuple[Tensor, Tensor]) -> float:
        """K passes of Adam steps on the forget loss (no clipping, no mask; batches of the configured size, each
        pass's short last batch kept), then the weights restored; Adam's moments and step count stay, as published.
        Returns f_hat, the batch-size-weighted mean forget loss of the last pass."""
        images, model = unroll[0], trainer.model
        saved = trainer.snapshot()
        for one_pass in images.split(len(images) // self.config.inner_passes):
            weighted_sum = images.new_zeros((), dtype=torch.float32)
            for x in one_pass.split(self.config.batch_size):
                terms = trainer.update(lambda x=x: {"loss": self.forget_loss(model, x)}, clip=False, mask=None)
                weighted_sum += terms["loss"].detach().float() * len(x)
                self.inner_steps += 1
        trainer.restore(saved)
        return float(weighted_sum) / len(one_pass)

    def forget_loss(self, model: nn.Module, x0: Tensor, t: Tensor | None = None) -> Tensor:
        """The lower-level objective f on a batch of forget images (relabel: at timesteps `t` when given)."""
        ctx, config, generator = self.ctx, self.config, self.ctx.noise_generator
        pixels = x0[0].numel()
        if config.forget_loss == "uniform_noise":  # its own antithetic t, as published
            t = ctx.schedule.sample_timesteps(len(x0), generator, x0.device)
            uniform = torch.rand(x0.shape, generator=generator, device=x0.device)
            x_t = ctx.schedule.add_noise(x0, uniform, t)
            return squared_error(uniform, model(x_t, t, torch.full_like(t, ctx.forget_class))).mean() / pixels
        t = ctx.schedule.sample_timesteps(len(x0), generator, x0.device) if t is None else t
        x_t = ctx.schedule.add_noise(x0, torch.randn(x0.shape, generator=generator, device=x0.device), t)
        # `torch.randint(1, 10)`: one class per batch from {1..9}; the forget class itself is not excluded.
        pseudo = torch.randint(1, ctx.num_classes, (1,), generator=generator, device=x0.device).expand(len(t))
        with torch.no_grad():
            target = model(x_t, t, drop_labels(pseudo, config.forget_label_dropout, generator))
        forget_labels = torch.full_like(t, ctx.forget_class)
        prediction = model(x_t, t, drop_labels(forget_labels, config.forget_label_dropout, generator))
        return squared_error(target, prediction).mean() / pixels

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        """L_dr + lambda (L_du - f_hat), the forget half at the retain half's timesteps (fresh noise for each)."""
        ctx, config, generator = self.ctx, self.config, self.ctx.noise_generator
        (x_retain, y_retain), (x_forget, _) = batch["retain"], batch["forget"]
        t = ctx.schedule.sample_timesteps(max(len(x_retain), len(x_forget)), generator, x_retain.device)
        noise = torch.randn(x_retain.shape, generator=generator, device=x_retain.device)
        x_t = ctx.schedule.add_noise(x_retain, noise, t[: len(x_retain)])
        eps = model(x_t, t[: len(x_retain)], drop_labels(y_retain, config.label_dropout, generator))
        retain = squared_error(noise, eps).mean() / x_retain[0].numel()
        forget = self.forget_loss(model, x_forget, t[: len(x_forget)])
        terms = {"retain": retain, "forget": forget, "f_hat": torch.tensor(self.f_hat)}
        if config.lam < 0:
            params = [p for p in model.parameters() if p.requires_grad]
            terms["lambda"] = lam = adaptive_lambda(retain, forget, params, config.eta)
        else:
            lam = config.lam
        return {"loss": retain + lam * (forget - self.f_hat), **terms}

    def period(self) -> int:
        return self.config.outer_steps

    def report(self) -> dict:
        relabel = self.config.forget_loss == "relabel"
        pseudo = "one per batch, uniform in {1..9} (the forget class not excluded)" if relabel else None
        return {"inner_steps": self.inner_steps, "last_f_hat": self.f_hat, "pseudo_class": pseudo}

    def state_dict(self) -> dict:
        return {"f_hat": self.f_hat, "inner_steps": self.inner_steps}

    def load_state_dict(self, state: dict) -> None:
        self.f_hat, self.inner_steps = float(state["f_hat"]), int(state["inner_steps"])
