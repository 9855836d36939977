"""The one training loop, shared by pretraining, unlearning, retraining and the evaluation classifier.

`train` owns what is nobody else's business: the optimizer (Adam with the published betas), the speed switches,
gradient clipping and masks, the EMA, the learning-rate warm-down, non-finite checks (losses during training,
weights and EMA at the end), progress, timing (RTE, synchronised on CUDA) and peak memory, and resumable
checkpoints. Each iteration calls `update(step, trainer, batch)`; a method that needs more than one optimizer step
per iteration (SFR-on) or extra steps between iterations (EraseDiff's unroll) composes `Trainer.update` calls
there, so no method ever needs a special case in this file.

Resume is exact on the CPU: a checkpoint holds the weights, EMA, optimizer, the named generators, torch's global
generators (dropout) and the caller's extra state; the batch stream is replayed from its start (batches are
drawn from a seeded generator, so replaying them restores its state without saving it).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from bench import interrupts
from bench.cache import CheckpointError, atomic_save, checkpoint_step, load_derived
from bench.config import TrainConfig
from bench.device import (
    Speed,
    autocast,
    memory_snapshot,
    prepare_model,
    progress_bar,
    reset_peak_memory,
    same_layout,
    synchronize,
)
from bench.flops import StepTally, batch_kind, counted_flops

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "unlearning-bench/partial-1"


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the step and every loss term."""


class NonFiniteWeights(RuntimeError):
    """Training left NaN or infinite weights (or EMA weights); the message names the first such tensor."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainResult:
    steps: int  # counted from step 0, including steps before a resume
    seconds: float  # the whole run's training time, including the time before a resume
    # Mean of every loss term over each window of `check_every` steps, with the window's last step.
    loss_history: list[dict[str, float]] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    # The first step alone: it holds torch.compile's compile time and cuDNN's first-call set-up.
    first_step_seconds: float | None = None
    step_seconds: list[float] = field(default_factory=list)  # with `time_steps`
    resumed_from: int = 0
    flops: dict = field(default_factory=dict)  # StepTally.summary(): total FLOPs, per kind of step
    cpu_seconds: float | None = None  # this process's CPU time (all threads) over the loop, this attempt only

    @property
    def final_losses(self) -> dict[str, float]:
        return self.loss_history[-1] if self.loss_history else {}


def make_optimizer(params, lr: float, speed: Speed, device: torch.device) -> torch.optim.Optimizer:
    """Adam with the published betas and eps: fused when asked (CUDA, CPU), else foreach (never a Python loop)."""
    fused = speed.fused_adam and device.type in ("cuda", "cpu")
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused, foreach=not fused)


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

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.shadow = [state[name].to(s.device, s.dtype) for name, s in zip(self.names, self.shadow)]

    def copy_to(self, model: nn.Module) -> None:
        with torch.no_grad():
            for param, value in zip(model.parameters(), self.shadow):
                param.copy_(value)


_DEFAULT = object()


class Trainer:
    """What an update may do: optimizer steps of a loss (with clipping and masks), and parameter snapshots.

    `update` is the one optimizer step every method's iteration is made of; its numbers are what the speed
    switches may change, and what tests compare across switches.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, speed: Speed,
                 grad_clip: float | None, grad_mask: dict[str, Tensor] | None):
        self.model, self.optimizer, self.device, self.speed, self.grad_clip = model, optimizer, device, speed, grad_clip
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self._masks: dict[int, tuple[dict, list[Tensor]]] = {}
        self.default_mask = grad_mask

    def _layout(self, mask: dict[str, Tensor]) -> list[Tensor]:
        """The mask in the parameters' dtype and strides, converted once per mask object."""
        key = id(mask)
        if key not in self._masks:
            self._masks[key] = (mask, [same_layout(mask[name], p, p.dtype) for name, p in self.named])
        return self._masks[key][1]

    def forward_backward(self, loss_fn: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        """Zero the gradients, compute the loss terms under the switches and backpropagate `loss`."""
        self.model.zero_grad(set_to_none=True)
        with autocast(self.device, self.speed.amp):
            terms = loss_fn()
        terms["loss"].backward()
        return terms

    def update(self, loss_fn: Callable[[], dict[str, Tensor]], *, clip: bool = True, mask=_DEFAULT,
               mask_before_clip: bool = False) -> dict[str, Tensor]:
        """One optimizer step of `loss_fn()["loss"]`; returns its terms, with `grad_norm` (before clipping).

        `mask` (default: the method's `grad_mask()`) multiplies the gradients after clipping, as SalUn does, or
        before it with `mask_before_clip` (SFR-on); `clip=False` skips clipping (EraseDiff's inner unroll).
        """
        terms = self.forward_backward(loss_fn)
        mask = self.default_mask if mask is _DEFAULT else mask
        masks = None if mask is None else self._layout(mask)
        if masks is not None and mask_before_clip:
            self._apply(masks)
        if clip and self.grad_clip is not None:
            params = [p for _, p in self.named]
            terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
        if masks is not None and not mask_before_clip:
            self._apply(masks)
        self.optimizer.step()
        return terms

    def _apply(self, masks: list[Tensor]) -> None:
        pairs = [(p.grad, m) for (_, p), m in zip(self.named, masks) if p.grad is not None]
        torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    def snapshot(self) -> list[Tensor]:
        """A copy of every parameter (not the optimizer state), for `restore`."""
        return [p.detach().clone() for _, p in self.named]

    @torch.no_grad()
    def restore(self, saved: list[Tensor]) -> None:
        for (_, p), value in zip(self.named, saved):
            p.copy_(value)


Update = Callable[[int, Trainer, Any], dict[str, Tensor]]


def default_update(loss: Callable[[Any], dict[str, Tensor]]) -> Update:
    """An update of one optimizer step of `loss(batch)`."""
    return lambda step, trainer, batch: trainer.update(lambda: loss(batch))


def to_device(batch, device: torch.device):
    """Tensors inside dicts, tuples and lists moved to `device` (non-blocking from pinned memory on CUDA)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


@dataclass
class Resume:
    """Where a run keeps its resumable checkpoint, how often, and what else it must restore.

    `generators` are saved and restored by name (the noise generator); torch's global CPU and CUDA generators
    (dropout) always are. `extra` is the caller's own state (a method's f_hat, say).
    """

    path: Path
    every: int | None
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    extra: Stateful | None = None


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


def _param_groups(model: nn.Module, lr: float, param_lrs: dict[str, float] | None) -> list:
    """Adam parameter groups, one per learning rate, in the model's parameter order within each group."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not param_lrs:
        return [p for _, p in params]
    groups: dict[float, list[Tensor]] = {}
    for name, param in params:
        groups.setdefault(param_lrs.get(name, lr), []).append(param)
    return [{"params": group, "lr": group_lr} for group_lr, group in groups.items()]


def train(
    model: nn.Module,
    batches: Iterator,
    update: Update,
    config: TrainConfig,
    device: torch.device,
    *,
    speed: Speed | None = None,
    ema: EMA | None = None,
    grad_mask: dict[str, Tensor] | None = None,
    param_lrs: dict[str, float] | None = None,
    resume: Resume | None = None,
    check_every: int = 25,
    time_steps: bool = False,
    desc: str = "train",
    progress: bool = True,
    step_kind: Callable[[int, Any], str] | None = None,
    count_flops: bool | None = None,
) -> TrainResult:
    """Run `config.iterations` iterations of `update(step, trainer, next(batches))`; returns timing, losses, memory.

    `batches` yields CPU tensors (moved to `device` here); `speed` defaults to `Speed()` (bf16 on CUDA only).
    With `resume`, a checkpoint at `resume.path` is loaded first (the batch stream is replayed to its step) and
    saved every `resume.every` steps; the caller deletes it once its final result is safe. `param_lrs` gives some
    parameters (by name) their own learning rate. Raises NonFiniteLoss or NonFiniteWeights instead of returning a
    model that means nothing.

    FLOPs (`TrainResult.flops`): the first step of each kind (`step_kind(step, batch)`, default: the batch's shapes)
    is run once more under the FLOP counter, outside the timed loop, and every number it touched (weights, Adam
    state, torch's generators and `resume.generators`, `resume.extra`) is put back, so counting changes neither the
    result nor RTE. By default (`count_flops=None`) only a loop with `resume` counts: its generators are all the
    random state its steps draw from (the same condition as an exact resume).
    """
    speed = (speed or Speed()).for_device(device)
    prepare_model(model, speed)
    optimizer = make_optimizer(_param_groups(model, config.lr, param_lrs), config.lr, speed, device)
    nominal_lrs = [group["lr"] for group in optimizer.param_groups]  # before a resumed state's decayed ones
    if ema is not None:
        ema.match_layout(model)
    trainer = Trainer(model, optimizer, device, speed, config.grad_clip, grad_mask)
    count = resume is not None if count_flops is None else count_flops
    tally = StepTally(enabled=count and not speed.compile)  # the counter does not see inside compiled graphs
    start, seconds_before, history = (_load_checkpoint(resume, model, ema, optimizer, device, tally) if resume
                                      else (0, 0.0, []))
    if start:
        log.info("resuming %s from step %d of %d (%s)", desc, start, config.iterations, resume.path)
    for _ in range(start):  # replay the stream: the data generator ends where it was at the interruption
        next(batches)
    model.train()
    reset_peak_memory(device)

    generators = resume.generators if resume is not None else {}
    extra = resume.extra if resume is not None else None

    def iteration(step: int) -> tuple[dict[str, Tensor], Callable[[], None] | None]:
        """One step; and, for the first step of a new kind, its FLOP count, to run outside the timed loop."""
        if config.lr_warmdown > 0:
            for group, lr in zip(optimizer.param_groups, nominal_lrs):
                group["lr"] = lr * config.lr_factor(step)
        batch = to_device(next(batches), device)
        terms = update(step, trainer, batch)
        if ema is not None:
            ema.update(model)
        if not tally.enabled:  # no kind to work out on every step when nothing is counted
            return terms, None
        kind = step_kind(step, batch) if step_kind is not None else batch_kind(batch)
        if not tally.add(kind):
            return terms, None
        return terms, lambda: tally.measured(kind, _step_flops(trainer, update, step, batch, generators, extra))

    def save(step: int, seconds: float) -> None:
        check_finite_weights(model, ema, f"step {step}")
        _save_checkpoint(resume, step, seconds_before + seconds, model, ema, optimizer, history, tally)

    every = resume.every if resume is not None else None
    result = _loop(iteration, config.iterations, device, start, check_every, save if every else None, every, desc,
                   progress, time_steps, history)
    check_finite_weights(model, ema, "the end of training")
    result.steps, result.seconds, result.resumed_from = config.iterations, seconds_before + result.seconds, start
    result.flops = tally.summary()
    return result


def _step_flops(trainer: Trainer, update: Update, step: int, batch, generators: dict[str, torch.Generator],
                extra: Stateful | None) -> int:
    """FLOPs of `update(step, trainer, batch)`, run once more under the counter; every number it changes (weights,
    Adam state, torch's and the named generators, the method's state, gradients) is restored afterwards."""
    params, adam = trainer.snapshot(), copy.deepcopy(trainer.optimizer.state_dict())
    rng, named = torch.get_rng_state(), {name: gen.get_state() for name, gen in generators.items()}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    own = copy.deepcopy(extra.state_dict()) if extra is not None else None
    try:
        return counted_flops(lambda: update(step, trainer, batch))[1]
    finally:
        trainer.restore(params)
        trainer.optimizer.load_state_dict(adam)
        torch.set_rng_state(rng)
        for name, gen in generators.items():
            gen.set_state(named[name])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        if extra is not None:
            extra.load_state_dict(own)
        trainer.model.zero_grad(set_to_none=True)


def _loop(iteration: Callable[[int], tuple[dict[str, Tensor], Callable[[], None] | None]], iterations: int,
          device: torch.device, start: int, check_every: int, save: Callable[[int, float], None] | None,
          every: int | None, desc: str, progress: bool, time_steps: bool,
          history: list[dict[str, float]]) -> TrainResult:
    """Steps, finite checks, checkpoints and timing around `iteration(step)`; appends each window's mean losses to
    `history` (the windows before a resume come from its checkpoint). The FLOP counts that `iteration` hands back
    run off the clock (wall and CPU)."""
    pending: list[dict[str, Tensor]] = []
    bar = progress_bar(total=iterations, initial=start, desc=desc, disable=not progress, leave=False)
    timer, first_step, untimed = StepTimer(device, time_steps), None, 0.0
    synchronize(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(start, iterations):
        interrupts.check()  # a Ctrl-C or SIGTERM that Python dropped (raised inside a finalizer) stops it here
        timer.mark()
        terms, count = iteration(step)
        if first_step is None:  # one sync: the first step holds compile time, reported apart
            synchronize(device)
            first_step = time.perf_counter() - started
        if count is not None:
            synchronize(device)
            paused, cpu_paused = time.perf_counter(), time.process_time()
            count()
            synchronize(device)
            untimed += time.perf_counter() - paused
            cpu_started += time.process_time() - cpu_paused
        pending.append({name: value.detach() for name, value in terms.items()})
        done = step + 1
        checkpoint_due = save is not None and every and done % every == 0 and done < iterations
        # Check the pending losses before any checkpoint, so that none ever holds non-finite weights.
        if len(pending) >= check_every or done == iterations or checkpoint_due:
            history.append(_check_finite(pending, done - len(pending)))
            pending = []
            bar.set_postfix(loss=f"{history[-1]['loss']:.4g}")
        bar.update(1)
        if checkpoint_due:
            save(done, time.perf_counter() - started - untimed)
    timer.mark()
    synchronize(device)
    seconds = time.perf_counter() - started - untimed
    bar.close()
    return TrainResult(steps=iterations - start, seconds=seconds, loss_history=history,
                       memory=memory_snapshot(device), first_step_seconds=first_step, step_seconds=timer.seconds(),
                       cpu_seconds=time.process_time() - cpu_started)


def _check_finite(pending: list[dict[str, Tensor]], first_step: int) -> dict[str, float]:
    """Move the pending loss terms to the host (one sync), fail on the first non-finite one, return their means."""
    rows = [{name: float(value) for name, value in terms.items()} for terms in pending]
    for offset, row in enumerate(rows):
        if not all(math.isfinite(v) for v in row.values()):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in row.items())
            raise NonFiniteLoss(f"non-finite loss at step {first_step + offset}: {terms}")
    means = {name: sum(row[name] for row in rows) / len(rows) for name in rows[0]}
    return {"step": first_step + len(rows), **means}


def check_finite_weights(model: nn.Module, ema: EMA | None, when: str) -> None:
    """Raise NonFiniteWeights naming the first parameter (or EMA tensor) that holds a NaN or an infinity."""
    named = list(model.named_parameters())
    finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()
    for (name, _), ok in zip(named, finite):
        if not ok:
            raise NonFiniteWeights(f"non-finite weights in {name} at {when}: training diverged")
    if ema is not None:
        finite = torch.stack([torch.isfinite(s).all() for s in ema.shadow]).tolist()
        for name, ok in zip(ema.names, finite):
            if not ok:
                raise NonFiniteWeights(f"non-finite EMA weights in {name} at {when}: training diverged")


def _generator_states(resume: Resume) -> dict:
    states = {"named": {name: gen.get_state() for name, gen in resume.generators.items()},
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _save_checkpoint(resume: Resume, step: int, seconds: float, model: nn.Module, ema: EMA | None,
                     optimizer: torch.optim.Optimizer, history: list[dict[str, float]], tally: StepTally) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "step": step, "seconds": seconds, "history": history,
               "flops": tally.state_dict(),
               "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else {},
               "optimizer": optimizer.state_dict(),
               "rng": _generator_states(resume), "extra": resume.extra.state_dict() if resume.extra else {}}
    atomic_save(payload, resume.path)


def _load_checkpoint(resume: Resume, model: nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer,
                     device: torch.device, tally: StepTally) -> tuple[int, float, list[dict[str, float]]]:
    """Restore everything from `resume.path` if it exists; (step to go on from, seconds already trained, the loss
    history so far)."""
    state = load_derived(resume.path, map_location=device)  # a corrupt one is removed: the run starts over
    if state is None:
        return 0, 0.0, []
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        log.warning("%s is not a resumable checkpoint of this version; starting over", resume.path)
        return 0, 0.0, []
    try:  # checked before anything is restored, so that starting over starts from the untouched model
        step = checkpoint_step(state.get("step"), resume.path, "its `step`", "starting over")
    except CheckpointError as exc:
        log.warning("%s", exc)
        return 0, 0.0, []
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    for name, generator in resume.generators.items():
        generator.set_state(state["rng"]["named"][name].cpu())
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    if resume.extra is not None:
        resume.extra.load_state_dict(state["extra"])
    tally.load_state_dict(state.get("flops"))  # a checkpoint made before FLOP counting: the kinds are counted anew
    return step, float(state["seconds"]), list(state.get("history", []))
