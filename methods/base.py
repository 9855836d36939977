"""The method interface, the context a method runs in, and the registry.

A method is a loss, plus optional preparation. What a method file defines:

- `name`, `Config` (a `TrainConfig` subclass of its hyperparameters, paper-scale defaults), `description`, and
  optionally `display_name` (how reports name it);
- `batches()`: endless training batches as CPU tensors (default: real forget-class and retained-class images);
- `loss(model, batch) -> {"loss": ..., other terms}`;
- optionally `grad_mask()` (gradients are multiplied by it), `prepare() -> dict[str, Tensor]` with `cache_key()`
  (pure computation from the context; the harness caches it per base model and key, times it, and hands it back
  as `self.prepared` before training), `update(step, trainer, batch)` when one iteration is more than one
  optimizer step of `loss` (SFR-on's two steps, EraseDiff's inner unroll), `state_dict()` / `load_state_dict()`
  for state kept between iterations (so that a resumed run equals an uninterrupted one), and `report()` for
  facts the record should hold (`method_report`).

Every random draw of the data (order, flips, extra batches) happens inside `batches()` from `ctx.data_generator`:
a resumed run replays the stream to its step. Noise, timesteps and label dropout come from `ctx.noise_generator`,
dropout from torch's global generator; the runner saves and restores both.

A method never owns a loop, a device choice or a file: the runner trains, the harness caches and evaluates.
`@register` adds a class to `METHODS`; methods from other packages register through the entry-point group
`unlearning_bench.methods` (see `methods/__init__.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from bench.config import Preset, TrainConfig
from bench.data import ClassDataset, training_batches
from bench.device import synchronize
from bench.diffusion import NoiseSchedule
from bench.flops import batch_kind
from bench.runner import Trainer
from bench.unet import ConditionalUNet

Batch = dict[str, tuple[Tensor, Tensor]]


@dataclass
class Context:
    """Everything a method may read: the task, the data, the frozen base model and a sampler for it."""

    preset: Preset
    forget_class: int
    seed: int
    schedule: NoiseSchedule
    train_data: ClassDataset
    device: torch.device
    noise_generator: torch.Generator  # on `device`: timesteps, noise, label dropout
    data_generator: torch.Generator  # on the CPU: batch order, flips
    base_weights: dict[str, Tensor]  # pretrained (non-EMA) weights, theta*
    base_ema: dict[str, Tensor]  # the base model's EMA weights
    # generate(weights, label, count) -> uint8 images of `label` from a model with `weights`, drawn with the
    # preset's evaluation sampler (as SA's priors are)
    generate: Callable[[dict[str, Tensor], int, int], Tensor] | None = None
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)  # seconds per preparation stage
    work: dict[str, tuple[int, str]] = field(default_factory=dict)  # per stage: how many units of what

    @property
    def num_classes(self) -> int:
        return self.train_data.num_classes

    def unet(self, weights: dict[str, Tensor]) -> ConditionalUNet:
        """A UNet of the preset's configuration with `weights`, on the device (the base model, for preparation)."""
        model = ConditionalUNet(self.preset.unet).to(self.device)
        model.load_state_dict(weights)
        return model

    @contextlib.contextmanager
    def stage(self, name: str, work: int = 0, unit: str = ""):
        """Time one stage of a preparation (SA: priors, then Fisher); reported apart in the record.

        `work` units of `unit` (e.g. 5,000 "image-timesteps") let `bench perf` project a shrunk run to paper counts.
        """
        synchronize(self.device)
        started = time.perf_counter()
        yield
        synchronize(self.device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started
        if work:
            self.work[name] = (work, unit)


class UnlearningMethod:
    name: ClassVar[str]
    Config: ClassVar[type[TrainConfig]] = TrainConfig
    description: ClassVar[str] = ""
    display_name: ClassVar[str] = ""  # how tables and figures name the method (e.g. "SAFEMax"); default: `name`
    # True for methods that start from fresh weights rather than from the pretrained model (retrain).
    from_scratch: ClassVar[bool] = False
    # True where docs/bf16.md measured that bf16 autocast moves none of the method's mean metrics beyond the
    # seed-to-seed spread: only then does the default speed (`--speed amp` unset) train and sample it in bf16 on CUDA.
    bf16_measured: ClassVar[bool] = False

    def __init__(self, config: TrainConfig, ctx: Context):
        self.config = config
        self.ctx = ctx
        self.prepared: dict[str, Tensor] = {}  # what `prepare` computed, set by the harness before training
        self.prepared_flops: dict | None = None  # {"total", "parts"} the preparation executed, set with `prepared`

    @classmethod
    def preset_defaults(cls, preset: Preset) -> dict:
        """Paper-scale values this preset replaces: iterations scaled, batch size the preset's."""
        paper = cls.Config()
        scale = preset.iteration_scale
        defaults = {
            "iterations": max(1, round(paper.iterations * scale)) if paper.iterations else 0,
            "batch_size": preset.unlearn_batch_size,
        }
        if paper.ema and paper.iterations and scale != 1.0:
            # Keep the EMA's horizon the same fraction of the (shorter) run: decay ** iterations is preserved.
            defaults["ema_decay"] = round(paper.ema_decay ** (1.0 / scale), 6)
        if preset.pretrain.hflip == "none":  # data whose mirror image is another thing (a flipped 3 is no 3)
            defaults["hflip"] = "none"
        return {**defaults, **preset.method_defaults.get(cls.name, {})}

    def cache_key(self) -> str | None:
        """What `prepare` depends on besides the base model, as a file name; None when there is nothing to prepare.

        A key without the forget class is shared by every forget class, and the harness prepares it once."""
        return None

    def prepare(self) -> dict[str, Tensor]:
        """Compute the preparation (Fisher, mask, priors) from `self.ctx`; pure computation, no files."""
        return {}

    def batches(self) -> Iterator[Batch]:
        """Endless training batches on the CPU; by default real forget-class and retained-class images."""
        ctx, size, hflip = self.ctx, self.config.batch_size, self.config.hflip
        forget = training_batches(ctx.train_data.forget(ctx.forget_class), size, ctx.data_generator, hflip)
        retain = training_batches(ctx.train_data.retain(ctx.forget_class), size, ctx.data_generator, hflip)
        for pair in zip(forget, retain):
            yield dict(zip(("forget", "retain"), pair))

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

    def grad_mask(self) -> dict[str, Tensor] | None:
        return None

    def update(self, step: int, trainer: Trainer, batch: Batch) -> dict[str, Tensor]:
        """One iteration: by default one optimizer step of `loss`, masked by `grad_mask()` after clipping."""
        return trainer.update(lambda: self.loss(trainer.model, batch))

    def period(self) -> int:
        """Iterations after which the pattern of `update` repeats (EraseDiff: a round with its unroll); 1 when every
        iteration is alike. `bench perf` times whole periods."""
        return 1

    def step_kind(self, step: int, batch: Batch) -> str:
        """Which kind of iteration `step` is, for FLOP counting: iterations of one kind execute the same FLOPs, and
        the first of each kind is counted (bench.flops). Default: the batch's tensor names and shapes (EraseDiff's
        round-opening batch carries its unroll, so it is a kind of its own); override where the work depends on the
        step number alone."""
        return batch_kind(batch)

    def report(self) -> dict:
        """Facts about this run the record should hold beyond losses and timings (e.g. a mask's density)."""
        return {}

    def state_dict(self) -> dict:
        """State kept between iterations (not weights, optimizer or generators, which the runner saves)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def hyperparameters(self) -> dict:
        return dataclasses.asdict(self.config)


METHODS: dict[str, type[UnlearningMethod]] = {}


def register(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
    """Class decorator: add a method to the registry under its `name` (a name taken twice is an error)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"method class {cls.__qualname__} needs a `name` made of letters, digits and _")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"method name {name!r} is taken by {METHODS[name].__module__}.{METHODS[name].__qualname__}")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, TrainConfig)):
        raise ValueError(f"method {name!r}: Config must be a TrainConfig dataclass")
    METHODS[name] = cls
    return cls
