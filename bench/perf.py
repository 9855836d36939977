"""`bench perf`: seconds per step, peak memory and sampler throughput, measured the same way for every method.

Speed and memory do not depend on the values of the weights or the data, so the model has random weights and
the data are random images: no base model, data set or cache is needed. Each training step is the real
method's update through the runner's `train()` (optimizer, clipping, masks, EMA, finite checks), timed per
step with CUDA events and summarized by the median after warm-up; the first step, which holds any
torch.compile time, is reported apart. Each method's preparation is its own `prepare()`, shrunk by
`PerfOptions.prepare_sets` (`--set`-style: SA draws one prior per class); every stage it times is projected to
the paper's counts from the units it declares. Results go to JSON and a Markdown table.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import records
from bench.classifier import build_classifier, predict
from bench.config import PINNED_PRESET, Preset, get_preset
from bench.data import ClassDataset
from bench.device import (
    PLAIN,
    Speed,
    device_name,
    memory_snapshot,
    pick_device,
    prepare_model,
    reset_peak_memory,
    synchronize,
)
from bench.diffusion import NoiseSchedule, sample
from bench.evaluate import Sampler
from bench.flops import ledger
from bench.runner import EMA, Trainer, make_optimizer, train
from bench.sweep import parse_sets
from bench.unet import ConditionalUNet, count_parameters
from methods import METHODS, Context, get_method

log = logging.getLogger(__name__)

# Named sets of speed switches; `fp32` is the plain path the others are checked against.
VARIANTS: dict[str, Speed] = {
    "fp32": PLAIN,
    "default": Speed(),
    "channels_last": Speed(channels_last=True),
    "compile": Speed(compile=True),
    "compile_channels_last": Speed(compile=True, channels_last=True),
}
DEFAULT_METHODS = ("safemax", "sa", "salun")
# Speed targets on one H100/H200 at the cifar10 preset (the GPU work plan in docs/benchmarks/README.md).
TARGETS = {
    "safemax": {"max_s": 0.05, "max_gib": 6.0},
    "salun": {"max_s": 0.08},
    "sa": {"max_s": 0.10},
    "sampler": {"min_rate": 16_000},
    "sa fisher": {"max_paper_s": 3600},  # 5,000 images x 1,000 timesteps in 60 min
}
# The published code on one H200 (torch 2.11, mean of 20 steps after 3 warm-up steps), measured 2026-11-28.
ANCHORS = {
    "safemax": "0.142 s, 15.4 GiB (fp32 eager); 0.144 s, 5.6 GiB (bf16 + compile)",
    "sa": "0.271 s, 15.9 GiB (published code)",
    "salun": "0.225 s, 22.9 GiB (published code)",
    "sampler": "3,674/s (published, fp32, batch 512); 13,048/s (bf16 + compile, batch 1,024)",
}
# How many units of work a preparation stage does at the paper's CIFAR-10 counts, by the unit it declares
# (`Context.stage`): SA's 5,000 priors x 1,000 sampler steps or Fisher timesteps, one class's 5,000 images,
# the other 45,000.
PAPER_WORK = {"image-steps": 5000 * 1000, "image-timesteps": 5000 * 1000, "forget-class images": 5000,
              "retained images": 45_000}
NOTE = "random weights and random data: speed and memory do not depend on the values"


SMOKE_STEPS = {"iterations": 5, "warmup": 1}  # the tiny preset's: a smoke test, not a benchmark
SMOKE_SAMPLER = {"sample_batch": 32, "sample_steps": 5}  # the tiny preset's, and an unregistered preset's
CLASSIFIER_BATCHES = 4  # the classifier row times this many sampler batches of images
# Image-steps the sampler row times outside cifar10 (every step of a chain costs the same, so a few steps of the
# evaluation's batch measure its rate): digits' 100 images x 20 steps; fashion's 500-image calls, 4 steps.
SAMPLER_IMAGE_STEPS = 2_000


def evaluation_batch(preset: Preset) -> tuple[int, int]:
    """(images per sampler call, sampler steps) of the default protocol's evaluation when it samples one retained
    class (`bench.evaluate.Sampler`: a class's images in calls of at most `batch_size`). Most of an evaluation's
    sampling is drawn at this batch (digits: 9 classes x 100 images against 500 of the forget class in one call),
    and a CPU step's throughput depends on it: at digits, 32 images per call reach about half the image-steps per
    second of 100 (docs/benchmarks/README.md)."""
    protocol = preset.protocol(None)
    return min(protocol.batch_size, protocol.retain_samples_per_class), protocol.sampler_steps


@dataclass(frozen=True)
class PerfOptions:
    """What to time and how often; `for_preset` fills the sizes that suit the preset."""

    preset: str = "cifar10"
    methods: tuple[str, ...] = DEFAULT_METHODS
    variants: tuple[str, ...] = ("default",)
    sampler_variants: tuple[str, ...] = ("default",)
    iterations: int = 20
    warmup: int = 3
    batch_size: int | None = None  # forget and retain images per step; None: the preset's
    sample_batch: int = 1024
    sample_steps: int = 50
    images_per_class: int = 256  # random training images per class (the data that masks are computed on)
    # `--set`-style overrides that shrink a preparation to seconds; its stages are projected back to paper counts
    prepare_sets: tuple[str, ...] = ("sa.prior_samples_per_class=1",)
    device: str | None = None
    seed: int = 0

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> PerfOptions:
        """Paper-scale sizes for cifar10. Elsewhere the sampler is timed at the batch the preset's evaluation draws
        a retained class in (`evaluation_batch`) over its steps, at most `SAMPLER_IMAGE_STEPS` image-steps (and at
        least 2 steps), and the methods' data are 32 images per class. The tiny preset (the CI smoke test, whose
        times mean nothing) times 5 steps after 1 warm-up step and the sampler at 32 images x 5 steps: its table
        checks that every workload runs."""
        if preset == "cifar10":
            sizes = {}
        elif preset == "tiny":
            sizes = {**SMOKE_SAMPLER, "images_per_class": 32, **SMOKE_STEPS}
        else:
            try:
                batch, steps = evaluation_batch(get_preset(preset))
                sampler = {"sample_batch": batch, "sample_steps": min(steps, max(2, SAMPLER_IMAGE_STEPS // batch))}
            except ValueError:  # not a registered preset (the pinned model's): `check` names it where that matters
                sampler = SMOKE_SAMPLER
            sizes = {**sampler, "images_per_class": 32}
        return cls(preset=preset, **{**sizes, **{k: v for k, v in overrides.items() if v is not None}})

    def check(self) -> None:
        """Fail on names a user can get wrong, listing the valid choices."""
        get_preset(self.preset)
        for name in self.methods:
            if get_method(name).Config().iterations == 0:
                trainable = ", ".join(m for m, cls in METHODS.items() if cls.Config().iterations > 0)
                raise ValueError(f"method {name!r} has no training step to time; choose from {trainable}")
        for name in (*self.variants, *self.sampler_variants):
            if name not in VARIANTS:
                raise ValueError(f"unknown speed variant {name!r}; choose from {', '.join(VARIANTS)}")
        if self.iterations < 20 and self.preset != "tiny":
            raise ValueError(f"time at least 20 steps for a stable median, got {self.iterations} (fewer only at the "
                             "tiny preset, the smoke test)")
        parse_sets(self.prepare_sets, list(METHODS))


class Bench:
    """The random base model, random data and schedule every workload of one `bench perf` run shares."""

    def __init__(self, preset: Preset, options: PerfOptions, device: torch.device):
        self.preset, self.options, self.device = preset, options, device
        self.batch_size = options.batch_size or preset.unlearn_batch_size
        cfg, per_class = preset.unet, max(self.batch_size, options.images_per_class)
        gen = torch.Generator().manual_seed(options.seed)
        images = torch.rand((per_class * cfg.num_classes, cfg.in_channels, cfg.image_size, cfg.image_size),
                            generator=gen) * 2 - 1
        labels = torch.arange(cfg.num_classes).repeat_interleave(per_class)
        self.data = ClassDataset(images, labels, tuple(str(c) for c in range(cfg.num_classes)), "random")
        torch.manual_seed(options.seed)
        self.base = ConditionalUNet(cfg).state_dict()  # on the CPU, as a loaded base checkpoint is
        self.schedule = NoiseSchedule(preset.diffusion, device)
        shrink = parse_sets(options.prepare_sets, list(METHODS))
        self.shrink = {method: dict(values[0]) for method in shrink.method
                       for values in [shrink.method_variants(method)]}

    def model(self) -> ConditionalUNet:
        with self.device:  # initialized where it runs: the CPU takes seconds for the 38.6 M-parameter UNet
            model = ConditionalUNet(self.preset.unet)
        model.load_state_dict(self.base)
        return model

    def generate(self, weights: dict, label: int, count: int) -> torch.Tensor:
        if getattr(self, "_sampled", (None,))[0] is not weights:  # one model per set of weights
            model = self.model()
            model.load_state_dict(weights)
            self._sampled = (weights, Sampler(model, self.schedule, self.preset.protocol(None), self.preset,
                                              self.device, seed=0, progress=False))
        return self._sampled[1].class_samples(label, count)

    def context(self, forget_class: int = 0) -> Context:
        seed = self.options.seed
        return Context(preset=self.preset, forget_class=forget_class, seed=seed, schedule=self.schedule,
                       train_data=self.data, device=self.device,
                       noise_generator=torch.Generator(self.device).manual_seed(seed),
                       data_generator=torch.Generator().manual_seed(seed), base_weights=self.base,
                       base_ema=self.base, generate=self.generate, progress=False)

    def method(self, name: str, prepared: dict, iterations: int | None = None, shrink: bool = False):
        """The method with the preset's configuration and the perf batch size, `prepared` handed to it."""
        cls = get_method(name)
        values = {**cls.preset_defaults(self.preset), "batch_size": self.batch_size,
                  "iterations": iterations or self.options.warmup + self.options.iterations}
        if shrink:
            values.update(self.shrink.get(name, {}))
        method = cls(dataclasses.replace(cls.Config(), **values), self.context())
        method.prepared = prepared
        return method


def timed(device: torch.device, fn: Callable[[], object]) -> tuple[object, float]:
    """`fn()` and its wall time, synchronized on CUDA."""
    synchronize(device)
    started = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - started


def fresh_memory(device: torch.device) -> None:
    """Forget the previous workload: free cached blocks so peak *reserved* memory is this workload's own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)


def prepared_for(bench: Bench, name: str) -> dict:
    """`name`'s preparation, shrunk by `prepare_sets` (for steps that need one but not its timing)."""
    method = bench.method(name, {}, shrink=True)
    return method.prepare() if method.cache_key() is not None else {}


def prepare(bench: Bench, name: str) -> tuple[dict, list[dict]]:
    """`name`'s own `prepare()` (shrunk by `prepare_sets`; once to warm up, once timed): the tensors, one row per
    stage with its time projected to the paper's counts."""
    if bench.method(name, {}).cache_key() is None:
        return {}, []
    try:
        bench.method(name, {}, shrink=True).prepare()  # warm-up: cuDNN, vmap tracing, allocator
        method = bench.method(name, {}, shrink=True)
        fresh_memory(bench.device)
        prepared, seconds = timed(bench.device, method.prepare)
    except Exception as exc:  # every failure is reported in the table
        return {}, [error_row(f"{name} preparation", "-", exc)]
    memory, rows = memory_snapshot(bench.device), []
    shrunk = ", ".join(f"{k}={v}" for k, v in bench.shrink.get(name, {}).items()) or "as configured"
    for stage, stage_seconds in method.ctx.timings.items():
        work, unit = method.ctx.work.get(stage, (0, ""))
        paper = PAPER_WORK.get(unit)
        rows.append({"workload": f"{name} {stage}", "method": name, "variant": "fp32 (as published)",
                     "unit": f"s / {unit.rstrip('s')}" if work else "s", "value": stage_seconds / work if work
                     else stage_seconds, "measured_on": f"{work:,} {unit} ({shrunk})" if work else shrunk,
                     **memory, "paper_scale_s": stage_seconds / work * paper if work and paper else None})
    if not rows:
        rows.append({"workload": f"{name} preparation", "method": name, "variant": "fp32 (as published)",
                     "unit": "s", "value": seconds, "measured_on": shrunk, **memory})
    return prepared, rows


def time_step(bench: Bench, name: str, variant: str, prepared: dict) -> dict:
    """Median seconds per training step of method `name` under `variant`, and the step's peak memory."""
    opts, device = bench.options, bench.device
    period = bench.method(name, prepared).period()
    timed_steps = -(-opts.iterations // period) * period  # whole periods: every kind of iteration in its share
    method = bench.method(name, prepared, iterations=opts.warmup + timed_steps)
    config = method.config
    model = bench.model()
    ema = EMA(model, config.ema_decay, shadow=bench.base) if config.ema else None
    fresh_memory(device)
    speed = VARIANTS[variant].for_device(device, type(method).bf16_measured)  # `default`: what `bench run` uses
    result = train(model, method.batches(), method.update, config, device, speed=speed, ema=ema,
                   grad_mask=method.grad_mask(), time_steps=True, desc=f"perf {name}", progress=False,
                   step_kind=method.step_kind, count_flops=True)  # random data: its draws may be replayed
    measured = result.step_seconds[opts.warmup:]
    median, mean = statistics.median(measured), statistics.fmean(measured)
    # FLOPs of the timed iterations (whole periods) over their time: what the step achieves, unrolls and all
    kinds = result.flops["kinds"].values() if result.flops.get("total") is not None else []
    per_iteration = sum(k["flops_per_step"] * k["steps"] for k in kinds) / result.steps if kinds else None
    return {"workload": f"{name} step", "method": name, "variant": variant, "unit": "s / iteration",
            "value": median, "mean_s": mean, "p10": _quantile(measured, 0.1), "p90": _quantile(measured, 0.9),
            "flops_per_iteration": per_iteration, "flops_per_s": per_iteration / mean if per_iteration else None,
            "iterations": len(measured), "period": period, "first_step_s": result.first_step_seconds,
            "final_loss": result.final_losses.get("loss"), **result.memory,
            # the mean over whole periods: a run's time, unrolls and all (the median is a typical iteration)
            "paper_scale_s": mean * get_method(name).Config().iterations}


def time_sampler(bench: Bench, variant: str) -> dict:
    """Guided image-steps per second of `sample` at a batch (2 network evaluations per image-step)."""
    opts, device, cfg = bench.options, bench.device, bench.preset.unet
    protocol = bench.preset.protocol(None)
    model = bench.model().eval()
    labels = torch.arange(opts.sample_batch, device=device) % cfg.num_classes
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    generator = torch.Generator(device).manual_seed(opts.seed)

    def run(steps: int):
        return sample(model, bench.schedule, labels, shape, steps=steps, eta=protocol.eta, guidance=protocol.guidance,
                      generator=generator, speed=VARIANTS[variant])

    fresh_memory(device)
    _, first = timed(device, lambda: run(2))  # compile or graph capture happens here
    with ledger() as book:
        _, seconds = timed(device, lambda: run(opts.sample_steps))
    rate = opts.sample_batch * opts.sample_steps / seconds
    paper = get_preset("cifar10").protocol("paper")
    full = (cfg.num_classes - 1) * paper.retain_samples_per_class * paper.sampler_steps
    return {"workload": "sampler", "method": "-", "variant": variant, "unit": "image-steps / s", "value": rate,
            "flops_per_s": book.total / seconds, "first_step_s": first,
            "measured_on": f"batch {opts.sample_batch} x {opts.sample_steps} steps",
            **memory_snapshot(device), "paper_scale_s": full / rate}


def time_features(bench: Bench) -> dict:
    """Images per second through the evaluation classifier (UA's probabilities and FD's features in one pass)."""
    opts, device, cfg = bench.options, bench.device, bench.preset.unet
    classifier = build_classifier(bench.preset.classifier, cfg.in_channels, cfg.num_classes, cfg.image_size)
    classifier = classifier.to(device).eval()
    images = torch.rand(opts.sample_batch * CLASSIFIER_BATCHES, cfg.in_channels, cfg.image_size, cfg.image_size,
                        generator=torch.Generator().manual_seed(opts.seed)) * 2 - 1
    predict(classifier, images[:8])  # first-call set-up
    with ledger() as book:
        _, seconds = timed(device, lambda: predict(classifier, images))
    return {"workload": "classifier (UA, FD features)", "method": "-", "variant": "default", "unit": "images / s",
            "value": len(images) / seconds, "flops_per_s": book.total / seconds,
            "measured_on": f"{len(images)} images", **memory_snapshot(device)}


def peak_flops(device: torch.device, size: int = 2048) -> dict:
    """This machine's practical FP32 peak: a large matrix product on one CPU thread (or the GPU), best of 5."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        a = torch.randn(size, size, device=device, generator=torch.Generator(device).manual_seed(0))
        timed(device, lambda: a @ a)
        best = min(timed(device, lambda: a @ a)[1] for _ in range(5))
    finally:
        torch.set_num_threads(threads)
    where = "one CPU thread" if device.type == "cpu" else device_name(device)
    return {"flops_per_s": 2 * size**3 / best, "measured_on": f"fp32 {size}x{size} matmul on {where}, best of 5"}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def first_step(bench: Bench, name: str, speed: Speed, prepared: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of `name`'s first step under `speed` (`Trainer.forward_backward`, as training runs it).

    Each call builds the method afresh, so its generators draw the same noise and timesteps every time.
    """
    speed = speed.for_device(bench.device)
    model = bench.model()
    prepare_model(model, speed)
    method = bench.method(name, prepared)
    batch = next(method.batches())
    batch = {key: tuple(t.to(bench.device) for t in pair) for key, pair in batch.items()}
    trainer = Trainer(model, make_optimizer(list(model.parameters()), 1e-4, speed, bench.device), bench.device, speed,
                      None, None)
    terms = trainer.forward_backward(lambda: method.loss(model, batch))
    return terms["loss"].item(), {k: p.grad.detach().float().clone() for k, p in model.named_parameters()
                                  if p.grad is not None}


def relative_error(values: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """||values - reference|| / ||reference|| over all tensors together."""
    error = sum(float((values[k].float() - ref.float()).square().sum()) for k, ref in reference.items())
    norm = sum(float(ref.float().square().sum()) for ref in reference.values())
    return math.sqrt(error / norm)


def error_row(workload: str, variant: str, exc: Exception) -> dict:
    """A failure (out of memory, a compile error) becomes a row saying so, not a lost table."""
    log.error("perf workload %s (%s) failed: %s", workload, variant, exc, exc_info=exc)
    return {"workload": workload, "variant": variant, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def guarded(workload: str, variant: str, fn: Callable[..., dict], *args) -> dict:
    try:
        return fn(*args)
    except Exception as exc:  # every failure is reported in the table
        return error_row(workload, variant, exc)


def probe(method: str, preset: str | Preset = PINNED_PRESET, steps: int = 2, seed: int = 0) -> dict:
    """The first `steps` training steps of `method` on seeded random weights and data, through its real
    preparation, batches, update and the runner (clipping, mask, Adam, EMA), on the CPU in fp32; on the frozen
    model of the pinned values (`bench.config.PINNED_PRESET`) unless `preset` names another.

    Returns `losses` (each step's loss terms, `grad_norm` the gradient's norm before clipping) and `prepared`
    (per Fisher or mask tensor of its preparation: its sum and its count of non-zero entries). The pinned-numerics
    tests compare these with values written in the tests.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    options = PerfOptions.for_preset(preset.name, methods=(method,), seed=seed, device="cpu")
    bench = Bench(preset, options, torch.device("cpu"))
    cls = get_method(method)
    config = dataclasses.replace(cls.Config(), **{**cls.preset_defaults(bench.preset), "iterations": steps})
    runner = cls(config, bench.context())
    runner.prepared = runner.prepare()
    if cls.from_scratch:
        torch.manual_seed(seed + 1)  # retrain's initial weights (and its dropout)
        model = ConditionalUNet(bench.preset.unet)
    else:
        model = bench.model()
    ema = EMA(model, config.ema_decay, shadow=None if cls.from_scratch else bench.base) if config.ema else None
    result = train(model, runner.batches(), runner.update, config, bench.device, speed=PLAIN, ema=ema,
                   grad_mask=runner.grad_mask(), check_every=1, progress=False)
    prepared = {name: {"sum": float(tensor.double().sum()), "nonzero": int(tensor.count_nonzero())}
                for name, tensor in runner.prepared.items() if name.startswith(("fisher.", "mask."))}
    return {"losses": [{k: v for k, v in row.items() if k != "step"} for row in result.loss_history],
            "prepared": prepared}


def run_perf(options: PerfOptions) -> dict:
    """Time every method's step under every variant, each method's preparation, and the sampler."""
    options.check()
    preset, device = get_preset(options.preset), pick_device(options.device)
    bench = Bench(preset, options, device)
    rows = []
    for name in options.methods:
        prepared, prep_rows = prepare(bench, name)
        rows += prep_rows
        rows += [guarded(f"{name} step", variant, time_step, bench, name, variant, prepared)
                 for variant in options.variants]
    rows += [guarded("sampler", variant, time_sampler, bench, variant) for variant in options.sampler_variants]
    rows.append(guarded("classifier (UA, FD features)", "default", time_features, bench))
    peak = peak_flops(device)
    for row in rows:
        row["target"], row["meets_target"] = target_check(row, preset, device)
        if row.get("flops_per_s"):
            row["peak_fraction"] = row["flops_per_s"] / peak["flops_per_s"]
    return {"preset": preset.name, "device": device_name(device), "device_type": device.type,
            "torch": torch.__version__, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "unet_parameters": count_parameters(bench.model()), "unet": dataclasses.asdict(preset.unet),
            "batch": {"forget": bench.batch_size, "retain": bench.batch_size, "runs_differ": runs_differ(bench)},
            "note": NOTE,
            "options": dataclasses.asdict(options), "peak": peak, "threads": torch.get_num_threads(),
            "variants": {name: dataclasses.asdict(VARIANTS[name].for_device(device))
                         for name in dict.fromkeys((*options.variants, *options.sampler_variants))},
            "rows": rows}


def runs_differ(bench: Bench) -> dict[str, int]:
    """The timed methods whose runs at this preset use another batch than the one every row is timed at (retrain: its
    pretraining recipe's), and that batch: their rows are per-step costs at the common batch, not their runs' steps."""
    if bench.options.batch_size is not None:
        return {}
    own = {name: get_method(name).preset_defaults(bench.preset).get("batch_size") for name in bench.options.methods}
    return {name: batch for name, batch in own.items() if batch not in (None, bench.batch_size)}


def target_check(row: dict, preset: Preset, device: torch.device) -> tuple[str, bool | None]:
    """The target for this row as text, and whether it is met (judged only on CUDA at cifar10)."""
    key = row.get("method") if row.get("workload", "").endswith("step") else row.get("workload")
    target = TARGETS.get(key)
    if target is None:
        return "", None
    text = ", ".join(_target_text(k, v) for k, v in target.items())
    if "value" not in row or device.type != "cuda" or preset.name != "cifar10":
        return text, None
    checks = {"max_s": lambda limit: row["value"] <= limit, "min_rate": lambda limit: row["value"] >= limit,
              "max_gib": lambda limit: row.get("peak_gpu_allocated_gib", math.inf) <= limit,
              "max_paper_s": lambda limit: (row.get("paper_scale_s") or math.inf) <= limit}
    return text, all(checks[kind](limit) for kind, limit in target.items())


def _target_text(kind: str, value: float) -> str:
    return {"max_s": f"<= {value:.3g} s", "max_gib": f"<= {value:g} GiB", "min_rate": f">= {value:,.0f}/s",
            "max_paper_s": f"<= {value / 60:.0f} min at paper counts"}[kind]


COLUMNS = ("workload", "variant", "median", "unit", "GFLOP/s", "% of peak", "first step s", "peak GPU alloc GiB",
           "peak GPU reserved GiB", "target", "meets", "anchor (H200)", "at paper counts")


def markdown(result: dict) -> str:
    """The result as a Markdown page: provenance lines, then one table row per workload and variant."""
    steps = f"median of {result['options']['iterations']} steps after {result['options']['warmup']} warm-up steps"
    lines = [f"# bench perf: {result['preset']} on {result['device']}", "",
             f"- torch {result['torch']}, {result['date']}",
             f"- UNet: {result['unet_parameters']:,} parameters, {result['unet']['in_channels']}x"
             f"{result['unet']['image_size']}x{result['unet']['image_size']}; batch {result['batch']['forget']} "
             f"forget + {result['batch']['retain']} retain for every method"
             + "".join(f"; {name}'s runs use {batch} (its row is at the common batch)"
                       for name, batch in result["batch"]["runs_differ"].items()),
             f"- {result['note']}",
             f"- steps: {steps}; the first step (torch.compile time, if any) is reported apart",
             f"- sampler: {result['options']['sample_batch']:,} images per call x {result['options']['sample_steps']} "
             f"steps; classifier: {CLASSIFIER_BATCHES} such batches",
             "- variants: " + "; ".join(f"`{name}` = {Speed(**flags).describe()}"
                                        for name, flags in result["variants"].items()),
             f"- process peak RSS: {max(r.get('peak_process_mib', 0) for r in result['rows']):,.0f} MiB",
             f"- FLOPs: FlopCounterMode's count (matmul, conv, attention); peak "
             f"{result['peak']['flops_per_s'] / 1e9:,.1f} GFLOP/s ({result['peak']['measured_on']}); the run used "
             f"{result['threads']} thread(s)", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in result["rows"]]
    if result.get("checks"):
        lines += ["", "## Correctness checks (optimized against plain fp32 eager)", "",
                  "| check | measured | tolerance | ok |", "|---|---|---|---|"]
        lines += [f"| {c['check']} | {c['measured']} | {c['tolerance']} | {'yes' if c['ok'] else 'NO'} |"
                  for c in result["checks"]]
    return "\n".join(lines) + "\n"


def _cells(row: dict) -> list[str]:
    if "error" in row:
        return [row["workload"], row["variant"], f"failed: {row['error']}"] + [""] * (len(COLUMNS) - 3)
    method = row.get("method", "")
    anchor = ANCHORS.get("sampler" if row["workload"] == "sampler" else method, "") if "step" in row["workload"] \
        or row["workload"] == "sampler" else ""
    meets = {True: "yes", False: "no", None: ""}[row.get("meets_target")]
    gflops = row.get("flops_per_s")
    fraction = row.get("peak_fraction")
    return [row["workload"], row["variant"], _number(row["value"]), row["unit"],
            _number(gflops / 1e9) if gflops else "n/a", f"{100 * fraction:.0f}%" if fraction else "n/a",
            _number(row.get("first_step_s")),
            _number(row.get("peak_gpu_allocated_gib")), _number(row.get("peak_gpu_reserved_gib")),
            row.get("target", ""), meets, anchor, _duration(row.get("paper_scale_s"))]


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def slug(device: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'; the CPU is 'cpu'."""
    return "cpu" if device.startswith("cpu") else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def write_outputs(result: dict, out: str | Path) -> tuple[Path, Path]:
    """`<out>/<gpu>-<date>[-<preset>].json` and `.md` (the preset is named when it is not cifar10)."""
    stem = f"{slug(result['device'])}-{result['date'][:10]}"
    stem += "" if result["preset"] == "cifar10" else f"-{result['preset']}"
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    records.write_json_atomic(json_path, result)
    md_path.write_text(markdown(result))
    return json_path, md_path
