"""Cost that travels between machines: the floating-point operations a run executed, and its CPU time and load.

FLOPs are what `torch.utils.flop_counter.FlopCounterMode` counts: matrix products, convolutions and attention, two
per multiply-add; elementwise work (activations, the optimizer, the EMA) is not counted. Counting every operation
under the counter costs about 3x the time on the CPU, so nothing timed runs under it for long:

- a training loop (`StepTally`) runs the first step of each kind under the counter and multiplies by how many steps
  of that kind ran; a kind is the shapes of the step's batch (EraseDiff's unroll batch is its own kind) unless the
  method names its kinds (`UnlearningMethod.step_kind`);
- a network applied to images (the sampler's UNet, the classifier, Inception) is counted once per image shape, on
  one image, and multiplied by the images it was applied to (`count_forward`): a convolution or a matrix product
  costs the same for every image of a batch. Forwards are counted into the `Ledger` that is open (`ledger()`), if
  any, so sampling and evaluation code need no extra argument.

`tests/test_flops.py` checks both against the counter run over the whole computation.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode


def counted_flops(fn: Callable[[], object]) -> tuple[object, int]:
    """`fn()` under FlopCounterMode: (its result, the FLOPs it executed)."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, int(counter.get_total_flops())


def batch_kind(batch) -> str:
    """A training batch's kind: the names and shapes of its tensors (steps of one kind cost the same FLOPs)."""
    if isinstance(batch, Tensor):
        return "x".join(map(str, batch.shape)) or "scalar"
    if isinstance(batch, dict):
        return "{" + ",".join(f"{key}:{batch_kind(value)}" for key, value in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ",".join(batch_kind(value) for value in batch) + ")"
    return type(batch).__name__


class StepTally:
    """FLOPs of a training loop: the first step of each kind measured, then multiplied by the steps of that kind.

    The loop calls `add(kind)` for every step it ran; where that returns True (a kind not measured yet) it measures
    one step of the kind and hands the count to `measured`. Resumable: `state_dict` holds the per-kind counts and
    the steps run so far, so a resumed loop reports the same total as an uninterrupted one. `enabled=False`
    (torch.compile, whose graphs the counter does not see) counts nothing and reports None.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.per_step: dict[str, int] = {}  # kind -> FLOPs of one step of it
        self.steps: dict[str, int] = {}  # kind -> steps run

    def add(self, kind: str) -> bool:
        """Count one step of `kind`; True where the kind still needs measuring."""
        if not self.enabled:
            return False
        self.steps[kind] = self.steps.get(kind, 0) + 1
        return kind not in self.per_step

    def measured(self, kind: str, flops: int) -> None:
        self.per_step[kind] = int(flops)

    @property
    def total(self) -> int | None:
        if not self.enabled:
            return None
        return sum(self.per_step[kind] * count for kind, count in self.steps.items())

    def summary(self) -> dict:
        """The record's view: total FLOPs and, per kind, FLOPs of one step and steps run."""
        return {"total": self.total, "kinds": {kind: {"flops_per_step": self.per_step.get(kind), "steps": count}
                                               for kind, count in self.steps.items()},
                "counted": self.enabled}

    def state_dict(self) -> dict:
        return {"per_step": dict(self.per_step), "steps": dict(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.per_step = {str(k): int(v) for k, v in (state or {}).get("per_step", {}).items()}
        self.steps = {str(k): int(v) for k, v in (state or {}).get("steps", {}).items()}


@dataclass
class Ledger:
    """FLOPs of forwards applied to images, by name ("sampler", "classifier", ...): images x FLOPs per image."""

    flops: dict[str, int] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    _per_image: dict[tuple, int] = field(default_factory=dict)

    def add(self, name: str, key: tuple, images: int, one_image: Callable[[], object],
            module: torch.nn.Module | None = None) -> None:
        """`images` x the FLOPs of `one_image()`, counted the first time `key` is seen. With `module`, `one_image`
        runs a backward pass too: gradients are on, and the module's parameter gradients are put back after it."""
        if key not in self._per_image:
            with torch.no_grad() if module is None else _gradients_kept(module):
                self._per_image[key] = counted_flops(one_image)[1]
        self.flops[name] = self.flops.get(name, 0) + images * self._per_image[key]
        self.images[name] = self.images.get(name, 0) + images

    @property
    def total(self) -> int:
        return sum(self.flops.values())


@contextlib.contextmanager
def _gradients_kept(module: torch.nn.Module) -> Iterator[None]:
    """Put `module`'s parameter gradients back as they were after the block (a counted backward pass)."""
    params = list(module.parameters())
    kept = [p.grad for p in params]
    try:
        yield
    finally:
        for p, g in zip(params, kept):
            p.grad = g


_OPEN: contextvars.ContextVar[Ledger | None] = contextvars.ContextVar("flop_ledger", default=None)


@contextlib.contextmanager
def ledger() -> Iterator[Ledger]:
    """Count the forwards of the block (`count_forward`) into a new Ledger; nested ledgers count into the inner one."""
    book = Ledger()
    token = _OPEN.set(book)
    try:
        yield book
    finally:
        _OPEN.reset(token)


def count_forward(name: str, module: torch.nn.Module, images: int, one_image: Callable[[], object],
                  shape: tuple) -> None:
    """Add `images` forwards of `module` (per-image input `shape`) to the open ledger; `one_image()` runs the same
    forward on one image, under the counter, the first time this module and shape are seen. No ledger: nothing."""
    book = _OPEN.get()
    if book is not None and images > 0:
        book.add(name, (id(module), tuple(shape)), images, one_image)


def count_gradient(name: str, module: torch.nn.Module, passes: int, one_pass: Callable[[], object],
                   key: tuple) -> None:
    """Add `passes` forward + backward passes of `module` to the open ledger (a Fisher, a saliency mask): `one_pass()`
    runs one on one image, without drawing from any generator, the first time `key` is seen (its gradients are put
    back). FLOPs grow linearly with the batch, so a per-sample pass (vmap) costs the same. No ledger: nothing."""
    book = _OPEN.get()
    if book is not None and passes > 0:
        book.add(name, (id(module), "gradient", *key), passes, one_pass, module=module)


@dataclass
class Clock:
    """Wall time, this process's CPU time (all its threads) and the machine's load average, from start to `stop`."""

    wall: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=time.process_time)
    load_start: list[float] = field(default_factory=lambda: load_average())

    def stop(self) -> dict:
        return {"wall_s": time.perf_counter() - self.wall, "cpu_s": time.process_time() - self.cpu,
                "load_average": {"start": self.load_start, "end": load_average()}}


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages (runnable processes), or [] where the OS has none."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (OSError, AttributeError):
        return []
