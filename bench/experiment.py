"""One run: (preset, method, forget class, seed, overrides) -> unlearned model -> evaluation -> record.

`run_one` is a module-level function of a picklable `RunSpec`, so the same code runs in this process, in a
local worker or in a SLURM job. It writes the sample grid first and the record last.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import subprocess
import time
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path

import torch
from torchvision.utils import save_image

from bench import records
from bench.artifacts import Cache, atomic_save, ensure_base_model, ensure_classifier, load_classifier, load_unet, new_unet
from bench.config import Preset, Protocol, get_preset
from bench.diffusion import NoiseSchedule
from bench.evaluate import (
    GRID_COLUMNS,
    Sampler,
    classifier_key,
    evaluate,
    fid_reference_key,
    fid_scorer,
    from_uint8,
    noise_probabilities,
    reference_images,
)
from bench.runner import EMA, Speed, TrainSpec, device_name, memory_snapshot, pick_device, reset_peak_memory, train
from methods import Context, get_method

log = logging.getLogger(__name__)

PACKAGES = ("torch", "torchvision", "numpy", "pytorch-fid", "submitit", "scikit-learn")


@dataclass(frozen=True)
class RunSpec:
    preset: str
    method: str
    forget_class: int
    seed: int
    out: str
    cache: str | None = None
    protocol: str | None = None
    method_overrides: tuple[tuple[str, object], ...] = ()
    protocol_overrides: tuple[tuple[str, object], ...] = ()
    # `bench.runner.Speed` switches (bf16, channels_last, compile, ...) for training and sampling. How a run is
    # computed, not what: not part of the variant or the run's folder, but recorded.
    speed: tuple[tuple[str, object], ...] = ()
    data_root: str | None = None
    device: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def variant(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.method_overrides)]
        parts += [f"protocol.{k}={v}" for k, v in sorted(self.protocol_overrides)]
        return ",".join(parts) or "default"

    @property
    def protocol_name(self) -> str:
        return get_preset(self.preset).protocol(self.protocol).name

    @property
    def directory(self) -> Path:
        return records.run_dir(self.out, self.preset, self.protocol_name, self.method, self.variant,
                               self.forget_class, self.seed)

    def describe(self) -> str:
        extra = "" if self.variant == "default" else f" [{self.variant}]"
        return f"{self.method}{extra} class {self.forget_class} seed {self.seed}"


def resolve_protocol(preset: Preset, spec: RunSpec) -> Protocol:
    return dataclasses.replace(preset.protocol(spec.protocol), **dict(spec.protocol_overrides))


def resolve_method_config(preset: Preset, spec: RunSpec):
    """Paper defaults, then the preset's scaling, then the user's overrides; plus what was scaled."""
    cls = get_method(spec.method)
    paper = cls.Config()
    scaled = cls.preset_defaults(preset)
    config = dataclasses.replace(paper, **{**scaled, **dict(spec.method_overrides)})  # the user's value wins
    changes = {k: {"paper": getattr(paper, k), "preset": v} for k, v in scaled.items() if getattr(paper, k) != v}
    return cls, config, changes


@cache
def provenance() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"git_commit": commit or None, "versions": versions, "python": platform.python_version(),
            "hostname": platform.node()}


def prepare_prerequisites(preset_name: str, cache_dir: str | None, data_root: str | None = None,
                          device: str | None = None, progress: bool = True) -> dict:
    """Build (or load) the base model and the classifier; returns where they are."""
    preset, cache = get_preset(preset_name), Cache(cache_dir, data_root)
    dev = pick_device(device)
    base = ensure_base_model(preset, cache, dev, progress)
    classifier = ensure_classifier(preset, cache, dev, progress)
    return {"base": str(cache.base_path(preset)), "base_seconds": base.get("seconds"),
            "classifier": str(cache.classifier_path(preset)), "classifier_accuracy": classifier["test_accuracy"],
            "classifier_seconds": classifier.get("seconds")}


def shared_preparation_ready(spec: RunSpec) -> bool:
    """Whether the forget-class-independent preparation of `spec`'s method is cached (needs the base model)."""
    preset = get_preset(spec.preset)
    cls, config, _ = resolve_method_config(preset, spec)
    cache = Cache(spec.cache, spec.data_root)
    if not cache.base_path(preset).exists():
        return False
    base_id = torch.load(cache.base_path(preset), map_location="cpu", weights_only=True)["id"]
    return cls.preparation_ready(cache, preset, base_id, config)


def prepare_shared(spec: RunSpec) -> dict[str, float]:
    """Build the preparation every forget class of `spec`'s method shares; returns seconds per stage."""
    setup = setup_method(spec)
    log.info("preparing %s once for every forget class", spec.method)
    return setup.method.prepare()


def fid_references(specs: list[RunSpec], build: bool) -> bool:
    """Whether the FID reference statistics every spec's evaluation needs are cached; with `build`, make them so.

    They depend on the data set, the forget class and the protocol's FID features (not on the method), so the
    orchestrator builds them once per forget class before the runs instead of letting parallel runs race.
    """
    if not specs:
        return True
    preset, cache = get_preset(specs[0].preset), Cache(specs[0].cache, specs[0].data_root)
    device = pick_device(specs[0].device)
    if not cache.classifier_path(preset).exists():
        return False
    classifier = load_classifier(ensure_classifier(preset, cache, device, False), preset, device)
    data, folder = cache.dataset(preset, "train"), cache.path(preset, "fid-reference")
    weights = classifier_key(classifier)  # once, not per forget class
    for spec in specs:
        protocol = resolve_protocol(preset, spec)
        key = weights if protocol.fid_features == "classifier" else None
        count = len(reference_images(data, spec.forget_class, protocol.fid_reference_per_class))
        if (folder / f"{fid_reference_key(protocol, data.source, spec.forget_class, count, key)}.npz").exists():
            continue
        if not build:
            return False
        fid_scorer(protocol, data, spec.forget_class, classifier, folder, device, spec.progress, key)
    return True


@dataclass
class Setup:
    """A method bound to its context, with the model it trains and that model's EMA (if any)."""

    preset: Preset
    method: object
    model: torch.nn.Module
    ema: EMA | None
    ctx: Context
    base: dict
    scaled: dict


def setup_method(spec: RunSpec) -> Setup:
    """Resolve the configuration, load the base model and data, and build the method's context."""
    preset = get_preset(spec.preset)
    cls, config, scaled = resolve_method_config(preset, spec)
    if not 0 <= spec.forget_class < preset.num_classes:
        raise ValueError(f"preset {preset.name} has classes 0-{preset.num_classes - 1}, not {spec.forget_class}")
    device, cache = pick_device(spec.device), Cache(spec.cache, spec.data_root)
    base = ensure_base_model(preset, cache, device, spec.progress)
    torch.manual_seed(spec.seed)
    model = new_unet(preset, device) if cls.from_scratch else load_unet(base["model"], preset, device)
    ema = None
    if config.ema:
        ema = EMA(model, config.ema_decay, shadow=None if cls.from_scratch else base["ema"])
    ctx = Context(
        preset=preset, forget_class=spec.forget_class, seed=spec.seed, schedule=NoiseSchedule(preset.diffusion, device),
        train_data=cache.dataset(preset, "train"), device=device,
        noise_generator=torch.Generator(device).manual_seed(spec.seed),
        data_generator=torch.Generator().manual_seed(spec.seed), base_weights=base["model"], base_ema=base["ema"],
        base_id=base["id"], cache=cache, progress=spec.progress,
    )
    return Setup(preset, cls(config, ctx), model, ema, ctx, base, scaled)


def run_one(spec: RunSpec) -> dict:
    """Unlearn, evaluate and write the record of one run; returns the record."""
    started = time.perf_counter()
    setup = setup_method(spec)
    preset, method, model, ema, ctx, base = setup.preset, setup.method, setup.model, setup.ema, setup.ctx, setup.base
    config, cls, scaled, device, cache = method.config, type(method), setup.scaled, ctx.device, ctx.cache
    protocol = resolve_protocol(preset, spec)
    classifier_payload = ensure_classifier(preset, cache, device, spec.progress)
    classifier = load_classifier(classifier_payload, preset, device)
    train_data, schedule = ctx.train_data, ctx.schedule

    reset_peak_memory(device)
    prep_started = time.perf_counter()
    prepare = method.prepare()  # stage -> seconds it took to compute (also when loaded from the cache)
    prepare_wall = time.perf_counter() - prep_started
    result, resumed_from = None, 0
    speed = Speed(**dict(spec.speed))  # training and sampling alike
    if config.iterations > 0:
        result, resumed_from = _train(spec, preset, model, ema, method, config, ctx, speed)
    memory = result.memory if result else memory_snapshot(device)
    if ema is not None:
        ema.copy_to(model)

    sample_cache = None
    if result is None and not cls.from_scratch:  # weights untouched: samples are the same in every run
        sample_cache = cache.path(preset, "samples", base["id"] + ("-ema" if config.ema else "-raw"))
    speed = speed.for_device(device)
    sampler = Sampler(model, schedule, protocol, preset, device, spec.seed, sample_cache, spec.progress, speed)
    fid = fid_scorer(protocol, train_data, spec.forget_class, classifier, cache.path(preset, "fid-reference"),
                     device, spec.progress)
    shape = (preset.unet.in_channels, preset.unet.image_size, preset.unet.image_size)
    noise_probs = noise_probabilities(classifier, shape, protocol.noise_samples, spec.seed)
    evaluation = evaluate(sampler, classifier, spec.forget_class, fid, noise_probs)

    directory = spec.directory
    directory.mkdir(parents=True, exist_ok=True)
    save_image(from_uint8(evaluation.grid).add(1).div(2), directory / "samples.png", nrow=GRID_COLUMNS, padding=1)
    record = {
        "schema": records.SCHEMA_VERSION,
        "preset": preset.name,
        "dataset": train_data.source,
        "protocol": dataclasses.asdict(protocol),
        "method": spec.method,
        "variant": spec.variant,
        "forget_class": spec.forget_class,
        "forget_class_name": train_data.class_names[spec.forget_class],
        "seed": spec.seed,
        "hyperparameters": method.hyperparameters(),
        "overrides": {"method": dict(spec.method_overrides), "protocol": dict(spec.protocol_overrides)},
        "scaled_from_paper": scaled,
        "metrics": evaluation.metrics,
        "higher_is_better": {"ua": True, "entropy": True, "fid": False, "retain_accuracy": True, "rte_s": False},
        "timings": {
            "rte_s": result.seconds if result else 0.0,
            # The first step alone (torch.compile's compile time and first-call set-up land there); inside rte_s.
            "first_step_s": result.first_step_seconds if result else None,
            "iterations": result.steps if result else 0,
            "resumed_from_step": resumed_from,
            "prepare_s": prepare,
            "prepare_total_s": sum(prepare.values()),
            "prepare_wall_s": prepare_wall,
            "eval_s": evaluation.seconds,
            "total_s": time.perf_counter() - started,
        },
        "memory": memory,
        "losses": {"final": result.final_losses if result else {}, "history": result.loss_history if result else []},
        "base_model": {"path": str(cache.base_path(preset)), "id": base["id"], "step": base["step"],
                       "source": base.get("source")},
        "classifier": {"arch": preset.classifier.arch, "test_accuracy": classifier_payload["test_accuracy"],
                       "source": classifier_payload.get("source"), "fid_features": protocol.fid_features,
                       "noise_check": classifier_payload.get("noise_check")},
        "fid": fid.description,
        "speed": {"switches": dataclasses.asdict(speed), "describe": speed.describe()},
        "provenance": {**provenance(), "device": device_name(device),
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "artifacts": {"samples": "samples.png"},
    }
    records.write_json_atomic(directory / records.RECORD_NAME, record)
    (directory / PARTIAL_NAME).unlink(missing_ok=True)
    return record


PARTIAL_NAME = "partial.pt"


def _train(spec: RunSpec, preset: Preset, model, ema, method, config, ctx: Context, speed: Speed):
    """The unlearning loop; runs longer than the preset's checkpoint interval save and resume `partial.pt`.

    A resumed run reports the whole run: `steps` counts from step 0 and `seconds` adds the time before the
    interruption (stored in `partial.pt`); `resumed_from` is the step it went on from.
    """
    every = preset.pretrain.checkpoint_every if config.iterations > preset.pretrain.checkpoint_every else None
    partial = spec.directory / PARTIAL_NAME
    start, opt_state, seconds_before = 0, None, 0.0
    if every and partial.exists():
        state = torch.load(partial, map_location=ctx.device, weights_only=True)
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.shadow = [state["ema"][name].to(ctx.device) for name in ema.names]
        ctx.noise_generator.set_state(state["noise_generator"])
        ctx.data_generator.set_state(state["data_generator"])
        start, opt_state, seconds_before = state["step"], state["optimizer"], float(state.get("seconds", 0.0))
        log.info("resuming %s from step %d of %d (%s)", spec.describe(), start, config.iterations, partial)
    began = time.perf_counter()

    def save(step: int, optimizer) -> None:
        if step < config.iterations:
            atomic_save({"model": model.state_dict(), "ema": ema.state_dict() if ema else {}, "step": step,
                         "optimizer": optimizer.state_dict(), "noise_generator": ctx.noise_generator.get_state(),
                         "data_generator": ctx.data_generator.get_state(),
                         "seconds": seconds_before + time.perf_counter() - began}, partial)

    batches = method.batches()
    train_spec = TrainSpec(config.iterations, config.lr, config.grad_clip, speed=speed,
                           checkpoint_every=every, lr_warmdown=config.lr_warmdown)
    result = train(model, lambda step: method.loss(model, next(batches)), train_spec, ctx.device, ema=ema,
                   grad_mask=method.grad_mask(), start_step=start, optimizer_state=opt_state,
                   on_checkpoint=save if every else None, desc=f"{spec.method} class {spec.forget_class}",
                   progress=spec.progress)
    return dataclasses.replace(result, steps=start + result.steps, seconds=seconds_before + result.seconds), start
