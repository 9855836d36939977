"""The one training loop, shared by pretraining, unlearning and retraining.

It owns everything that is not a method's business: the device and bf16 autocast on CUDA, Adam, gradient
clipping, gradient masks, EMA, non-finite checks, progress, periodic checkpoints, and the measurement of
runtime (RTE, synchronized on CUDA) and peak memory. A method only supplies `loss_fn(step) -> {"loss": ...}`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

LossFn = Callable[[int], dict[str, Tensor]]


def progress_bar(**kwargs) -> tqdm:
    """A tqdm bar that redraws live on a terminal and every 30 s in a log file (SLURM, CI)."""
    return tqdm(mininterval=0.1 if sys.stderr.isatty() else 30.0, **kwargs)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the step and every loss term."""


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given, else CUDA when available, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


@dataclass(frozen=True)
class TrainSpec:
    iterations: int
    lr: float
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    amp: bool = True  # bf16 autocast where it pays (CUDA); fp32 master weights always
    check_every: int = 25
    checkpoint_every: int | None = None


@dataclass
class TrainResult:
    steps: int
    seconds: float
    # Mean of every loss term over each window of `check_every` steps, with the window's last step.
    loss_history: list[dict[str, float]] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)

    @property
    def final_losses(self) -> dict[str, float]:
        return self.loss_history[-1] if self.loss_history else {}


class EMA:
    """Exponential moving average of parameters, updated with foreach ops (no Python loop per tensor)."""

    def __init__(self, model: nn.Module, decay: float, shadow: dict[str, Tensor] | None = None):
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        source = shadow if shadow is not None else dict(model.named_parameters())
        self.shadow = [source[name].detach().clone().float() for name in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.shadow))

    def copy_to(self, model: nn.Module) -> None:
        with torch.no_grad():
            for param, value in zip(model.parameters(), self.shadow):
                param.copy_(value)


def memory_snapshot(device: torch.device) -> dict[str, float]:
    """Peak GPU memory since the last reset (GiB) and the process's peak resident memory (MiB)."""
    stats = {"peak_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        stats["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        stats["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return stats


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_finite(pending: list[dict[str, Tensor]], first_step: int) -> dict[str, float]:
    """Move the pending loss terms to the host (one sync), fail on the first non-finite one, return their means."""
    rows = [{name: float(value) for name, value in terms.items()} for terms in pending]
    for offset, row in enumerate(rows):
        if not all(math.isfinite(v) for v in row.values()):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in row.items())
            raise NonFiniteLoss(f"non-finite loss at step {first_step + offset}: {terms}")
    means = {name: sum(row[name] for row in rows) / len(rows) for name in rows[0]}
    return {"step": first_step + len(rows), **means}


def train(
    model: nn.Module,
    loss_fn: LossFn,
    spec: TrainSpec,
    device: torch.device,
    *,
    ema: EMA | None = None,
    grad_mask: dict[str, Tensor] | None = None,
    start_step: int = 0,
    optimizer_state: dict | None = None,
    on_checkpoint: Callable[[int, torch.optim.Optimizer], None] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> TrainResult:
    """Run `spec.iterations - start_step` optimizer steps of `loss_fn`; returns timing, losses and memory.

    `grad_mask` maps parameter names to 0/1 (or boolean) tensors: gradients are multiplied by it after
    clipping, so masked weights never move. `on_checkpoint(step, optimizer)` is called every
    `spec.checkpoint_every` steps and at the end.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    optimizer = torch.optim.Adam(params, lr=spec.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused, foreach=not fused)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    masks = None
    if grad_mask is not None:
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        masks = [grad_mask[name].to(device=device, dtype=p.dtype) for name, p in zip(names, params)]

    model.train()
    reset_peak_memory(device)
    history: list[dict[str, float]] = []
    pending: list[dict[str, Tensor]] = []
    bar = progress_bar(total=spec.iterations, initial=start_step, desc=desc, disable=not progress, leave=False)
    synchronize(device)
    started = time.perf_counter()
    for step in range(start_step, spec.iterations):
        with autocast(device, spec.amp):
            terms = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if spec.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip, foreach=True)
        if masks is not None:
            torch._foreach_mul_([p.grad for p in params], masks)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        pending.append({name: value.detach() for name, value in terms.items()})
        done = step + 1
        checkpoint_due = on_checkpoint is not None and spec.checkpoint_every and done % spec.checkpoint_every == 0
        # Check the pending losses before any checkpoint, so that none ever holds non-finite weights.
        if len(pending) >= spec.check_every or done == spec.iterations or checkpoint_due:
            history.append(_check_finite(pending, done - len(pending)))
            pending = []
            bar.set_postfix(loss=f"{history[-1]['loss']:.4g}")
        bar.update(1)
        if checkpoint_due:
            on_checkpoint(done, optimizer)
    synchronize(device)
    seconds = time.perf_counter() - started
    bar.close()
    if on_checkpoint is not None and spec.iterations > start_step:
        on_checkpoint(spec.iterations, optimizer)
    return TrainResult(steps=spec.iterations - start_step, seconds=seconds, loss_history=history,
                       memory=memory_snapshot(device))
