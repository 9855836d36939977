"""The one training loop, shared by pretraining, unlearning and retraining.

It owns everything that is not a method's business: the device, the speed switches (`Speed`: bf16 autocast,
channels_last, fused Adam, torch.compile), gradient clipping, gradient masks, EMA, non-finite checks, progress,
periodic checkpoints, and the measurement of runtime (RTE, synchronized on CUDA; per-step times on request) and
peak memory. A method only supplies `loss_fn(step) -> {"loss": ...}`, so every switch applies to every method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

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
class Speed:
    """Switches that make a step faster without changing what it computes beyond bf16 rounding.

    Every method trains through `train()` (and samples through `bench.diffusion.sample`), so one switch applies
    to all of them alike. A switch that does not apply to the device is dropped there (`for_device`).
    """

    # bf16 autocast with fp32 master weights and optimizer state: None (default) on CUDA only, True on any device
    # (the CPU too), False nowhere (the published fp32 computation).
    amp: bool | None = None
    # NHWC weights and activations for the convolutions. Off until a GPU table shows it pays: the H200 anchor
    # (bf16 + channels_last + fused Adam, eager) was slower than plain fp32 for this UNet.
    channels_last: bool = False
    fused_adam: bool = True  # one fused Adam kernel (CUDA and CPU: 3x foreach's speed there); else foreach
    compile: bool = False  # torch.compile the model; its compile time lands in the first step, reported apart
    cuda_graphs: bool = True  # the sampler's guided forward captured once and replayed (CUDA only)

    def for_device(self, device: torch.device) -> Speed:
        """The switches that apply on `device`: CUDA graphs need CUDA, and autocast does unless asked for by True."""
        cuda = device.type == "cuda"
        return dataclasses.replace(self, amp=self.amp is True or (self.amp is None and cuda),
                                   cuda_graphs=self.cuda_graphs and cuda)

    def describe(self) -> str:
        on = [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]
        return ", ".join(on) or "none (plain fp32 eager)"


# The plain fp32 eager path, the reference the switches are checked against.
PLAIN = Speed(amp=False, channels_last=False, fused_adam=False, compile=False, cuda_graphs=False)


@dataclass(frozen=True)
class TrainSpec:
    iterations: int
    lr: float
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    speed: Speed = Speed()
    check_every: int = 25
    checkpoint_every: int | None = None
    time_steps: bool = False  # keep every step's duration (`TrainResult.step_seconds`), for `bench perf`
    # Fraction of the final iterations over which the learning rate falls linearly towards 0 (0: constant).
    lr_warmdown: float = 0.0

    def lr_factor(self, step: int) -> float:
        """The learning rate of 0-based `step` as a fraction of the nominal one; a function of the step alone."""
        span = self.iterations * self.lr_warmdown
        return 1.0 if span <= 0 else min(1.0, (self.iterations - step) / span)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    # Mean of every loss term over each window of `check_every` steps, with the window's last step.
    loss_history: list[dict[str, float]] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    # The first step alone: it holds torch.compile's compile time and cuDNN's first-call set-up.
    first_step_seconds: float | None = None
    step_seconds: list[float] = field(default_factory=list)  # with `TrainSpec.time_steps`

    @property
    def final_losses(self) -> dict[str, float]:
        return self.loss_history[-1] if self.loss_history else {}


def same_layout(tensor: Tensor, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """`tensor` on `like`'s device with `like`'s strides (channels_last or not), copied only when they differ.

    foreach kernels take their fast path (one launch for all tensors) only over tensors of equal strides.
    """
    dtype = dtype or tensor.dtype
    if tensor.device == like.device and tensor.dtype == dtype and tensor.stride() == like.stride():
        return tensor
    return torch.empty_like(like, dtype=dtype).copy_(tensor)


def prepare_model(model: nn.Module, speed: Speed) -> None:
    """Apply the model-level switches in place: channels_last weights, then torch.compile of its forward.

    `nn.Module.compile` keeps the module (and its parameter names): methods call the same object they hold.
    The model stays compiled (and channels_last) after training.
    """
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    if speed.compile:
        model.compile()


def make_optimizer(params: list[Tensor], lr: float, speed: Speed, device: torch.device) -> torch.optim.Optimizer:
    """Adam with the published betas and eps: fused when asked (CUDA, CPU), else foreach (never a Python loop)."""
    fused = speed.fused_adam and device.type in ("cuda", "cpu")
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused, foreach=not fused)


class StepTimer:
    """Per-step durations without a host sync per step: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, enabled: bool):
        self.cuda, self.enabled, self.marks = device.type == "cuda", enabled, []

    def mark(self) -> None:
        if not self.enabled:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Durations between consecutive marks; call after the device is synchronized."""
        if self.cuda:
            return [start.elapsed_time(end) / 1000 for start, end in pairwise(self.marks)]
        return [end - start for start, end in pairwise(self.marks)]


class EMA:
    """Exponential moving average of parameters, updated with foreach ops (no Python loop per tensor)."""

    def __init__(self, model: nn.Module, decay: float, shadow: dict[str, Tensor] | None = None):
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        source = shadow if shadow is not None else dict(model.named_parameters())
        self.shadow = [source[name].detach().clone().float() for name in self.names]

    def match_layout(self, model: nn.Module) -> None:
        """Give the shadow the parameters' strides (after channels_last), so the update stays one foreach kernel."""
        self.shadow = [same_layout(s, p, torch.float32) for s, p in zip(self.shadow, model.parameters())]

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
    """Peak GPU memory (GiB) and the process's peak resident memory (MiB) since `reset_peak_memory`."""
    stats = {"peak_process_mib": _peak_rss_mib()}
    if device.type == "cuda":
        stats["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        stats["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return stats


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the GPU allocator's and, on Linux, the process's resident high-water mark.

    Without the second, a worker that ran SA first would report SA's peak for every later run it does.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # elsewhere the peak counts from the process's start (ru_maxrss)


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, enabled: bool, cache: bool = True):
    """bf16 autocast on `device` when `enabled` (callers decide where it applies: `Speed.for_device`).

    `cache=False` for CUDA-graph capture, whose replays must not read casts cached outside the graph.
    """
    if enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def forward_backward(model: nn.Module, loss_fn: LossFn, step: int, device: torch.device,
                     speed: Speed) -> dict[str, Tensor]:
    """Zero the gradients, compute step `step`'s loss terms under the switches and backpropagate the loss.

    This is the part of a step whose numbers the switches may change; tests compare it across switches.
    `speed` must already be resolved for `device` (`Speed.for_device`).
    """
    model.zero_grad(set_to_none=True)
    with autocast(device, speed.amp):
        terms = loss_fn(step)
    terms["loss"].backward()
    return terms


def _check_finite(pending: list[dict[str, Tensor]], first_step: int) -> dict[str, float]:
    """Move the pending loss terms to the host (one sync), fail on the first non-finite one, return their means."""
    rows = [{name: float(value) for name, value in terms.items()} for terms in pending]
    for offset, row in enumerate(rows):
        if not all(math.isfinite(v) for v in row.values()):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in row.items())
            raise NonFiniteLoss(f"non-finite loss at step {first_step + offset}: {terms}")
    means = {name: sum(row[name] for row in rows) / len(rows) for name in rows[0]}
    return {"step": first_step + len(rows), **means}


def _param_groups(model: nn.Module, lr: float, param_lrs: dict[str, float] | None) -> list[dict]:
    """Adam parameter groups, one per learning rate, in the model's parameter order within each group."""
    groups: dict[float, list[Tensor]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((param_lrs or {}).get(name, lr), []).append(param)
    return [{"params": params, "lr": group_lr} for group_lr, params in groups.items()]


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
    param_lrs: dict[str, float] | None = None,
) -> TrainResult:
    """Run `spec.iterations - start_step` optimizer steps of `loss_fn`; returns timing, losses and memory.

    `grad_mask` maps parameter names to 0/1 (or boolean) tensors: gradients are multiplied by it after
    clipping, so masked weights never move. `on_checkpoint(step, optimizer)` is called every
    `spec.checkpoint_every` steps and at the end. `spec.speed`'s model switches are applied to `model` in place.
    `param_lrs` gives some parameters (by name) their own learning rate, e.g. a pretrained body fine-tuned slower
    than a new head; the others get `spec.lr`.
    """
    speed = spec.speed.for_device(device)
    prepare_model(model, speed)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = make_optimizer(_param_groups(model, spec.lr, param_lrs) if param_lrs else params, spec.lr, speed, device)
    nominal_lrs = [group["lr"] for group in optimizer.param_groups]  # before a resumed state's decayed ones
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    # Masks in the parameters' dtype and strides: one foreach multiply applies them all.
    masks = None if grad_mask is None else [same_layout(grad_mask[name], p, p.dtype) for name, p in named]
    if ema is not None:
        ema.match_layout(model)

    def update(step: int) -> dict[str, Tensor]:
        if spec.lr_warmdown > 0:
            for group, lr in zip(optimizer.param_groups, nominal_lrs):
                group["lr"] = lr * spec.lr_factor(step)
        terms = forward_backward(model, loss_fn, step, device, speed)
        if spec.grad_clip is not None:  # the norm before clipping goes into the loss history
            terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, spec.grad_clip, foreach=True)
        if masks is not None:
            torch._foreach_mul_([p.grad for p in params], masks)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        return terms

    model.train()
    reset_peak_memory(device)
    return _loop(update, spec, device, start_step, optimizer, on_checkpoint, desc, progress)


def _loop(update: Callable[[int], dict[str, Tensor]], spec: TrainSpec, device: torch.device, start_step: int,
          optimizer: torch.optim.Optimizer, on_checkpoint, desc: str, progress: bool) -> TrainResult:
    """Steps, finite checks, checkpoints and timing around `update(step)`, the optimizer step of `train`."""
    history: list[dict[str, float]] = []
    pending: list[dict[str, Tensor]] = []
    bar = progress_bar(total=spec.iterations, initial=start_step, desc=desc, disable=not progress, leave=False)
    timer, first_step = StepTimer(device, spec.time_steps), None
    synchronize(device)
    started = time.perf_counter()
    for step in range(start_step, spec.iterations):
        timer.mark()
        terms = update(step)
        if first_step is None:  # one sync: the first step holds compile time, reported apart
            synchronize(device)
            first_step = time.perf_counter() - started
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
    timer.mark()
    synchronize(device)
    seconds = time.perf_counter() - started
    bar.close()
    if on_checkpoint is not None and spec.iterations > start_step:
        on_checkpoint(spec.iterations, optimizer)
    return TrainResult(steps=spec.iterations - start_step, seconds=seconds, loss_history=history,
                       memory=memory_snapshot(device), first_step_seconds=first_step, step_seconds=timer.seconds())
