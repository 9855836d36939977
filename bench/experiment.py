"""One run: RunSpec -> load prerequisites -> unlearn -> evaluate -> record.

`run_one` is a module-level function of a picklable `RunSpec`, so the same code runs in this process, in a local
worker or in a SLURM job. It only loads what the prerequisites step built (`bench.prerequisites`), checks the
trained weights and the samples before writing anything, writes the sample grid, and writes the record last.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import subprocess
import time
from functools import cache
from importlib import metadata
from pathlib import Path

import torch

from bench import fingerprint, records
from bench.cache import Cache
from bench.checkpoints import file_sha256, model_metadata, write_safetensors
from bench.classifier import load_classifier
from bench.config import get_preset
from bench.device import Speed, device_name, memory_snapshot, pick_device, reset_peak_memory, usable_cores
from bench.evaluate import Sampler, evaluate, fid_scorer, grid_image, noise_probabilities
from bench.flops import Clock, Ledger, ledger
from bench.prerequisites import load_base, load_classifier_payload, load_preparation, make_context
from bench.runner import EMA, Resume, train
from bench.sweep import RunSpec, budget_choice, resolve_method_config, resolve_protocol
from bench.unet import ConditionalUNet

log = logging.getLogger(__name__)

PACKAGES = ("torch", "torchvision", "numpy", "pytorch-fid", "submitit", "scikit-learn")
PARTIAL_NAME = "partial.pt"


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
            "hostname": platform.node(), "cores": usable_cores()}


def code_fingerprints(cls: type, preset: str) -> dict:
    """`method_code` (the method's source), `bench_code` (the harness code the run executes) and `preset_file` (the
    YAML it came from, if any) for a record's provenance: a record whose fingerprint differs from the code now is
    stale (`bench.orchestrate.stale_reason`)."""
    found = {**{key: make(cls) for key, _, make in fingerprint.RUN_CODE}, "preset_file": fingerprint.preset_file(preset)}
    return {key: value for key, value in found.items() if value is not None}


def run_one(spec: RunSpec) -> dict:
    """Unlearn, evaluate and write the record of one run; returns the record."""
    started, clock = time.perf_counter(), Clock()
    preset, cache_dir = get_preset(spec.preset), Cache(spec.cache, spec.data_root)
    cls, config, scaled = resolve_method_config(preset, spec.method, spec.method_overrides)
    protocol = resolve_protocol(preset, spec)
    device = pick_device(spec.device)
    base, classifier_payload = load_base(preset, cache_dir), load_classifier_payload(preset, cache_dir)
    classifier = load_classifier(classifier_payload, preset, device)
    ctx = make_context(preset, cache_dir, base, spec.forget_class, spec.seed, device, spec.progress)
    method = cls(config, ctx)
    prepare = load_preparation(method, cache_dir, base["id"])  # stage -> seconds it took when computed

    torch.manual_seed(spec.seed)  # retrain's initial weights, and dropout
    model = ConditionalUNet(preset.unet).to(device)
    if not cls.from_scratch:
        model.load_state_dict(base["model"])
    ema = EMA(model, config.ema_decay, shadow=None if cls.from_scratch else base["ema"]) if config.ema else None
    speed = Speed(**dict(spec.speed)).for_device(device, cls.bf16_measured)  # training and sampling alike
    reset_peak_memory(device)
    result = None
    if config.iterations > 0:
        every = preset.checkpoint_every if config.iterations > preset.checkpoint_every else None
        resume = Resume(spec.directory / PARTIAL_NAME, every, {"noise": ctx.noise_generator}, method)
        result = train(model, method.batches(), method.update, config, device, speed=speed, ema=ema,
                       grad_mask=method.grad_mask(), resume=resume, progress=spec.progress, desc=spec.describe(),
                       step_kind=method.step_kind)
    memory = result.memory if result else memory_snapshot(device)
    if ema is not None:
        ema.copy_to(model)

    sample_cache = None
    if result is None and not cls.from_scratch:  # weights untouched: samples are the same in every run
        sample_cache = cache_dir.path(preset, "samples", base["id"] + ("-ema" if config.ema else "-raw"))
    sampler = Sampler(model, ctx.schedule, protocol, preset, device, spec.seed, sample_cache, spec.progress,
                      speed)
    eval_clock = Clock()
    with ledger() as eval_flops:  # what the evaluation executed: sampling (none where cached), classifier, FID features
        fid = fid_scorer(protocol, ctx.train_data, spec.forget_class, classifier,
                         cache_dir.path(preset, "fid-reference"), device, spec.progress)
        shape = (preset.unet.in_channels, preset.unet.image_size, preset.unet.image_size)
        noise_probs = noise_probabilities(classifier, shape, protocol.noise_samples, spec.seed)
        evaluation = evaluate(sampler, classifier, spec.forget_class, fid, noise_probs)
    eval_cost = eval_clock.stop()

    artifacts = {"samples": "samples.png"}
    directory = spec.directory
    directory.mkdir(parents=True, exist_ok=True)
    grid_image(evaluation.grid, ctx.train_data.class_names, spec.forget_class).save(directory / "samples.png")
    if spec.save_model:
        artifacts["model"] = save_model(model, directory, preset, spec, base)
    timings = {
        "rte_s": result.seconds if result else 0.0,
        # The first step alone (torch.compile's compile time and first-call set-up land there); inside rte_s.
        "first_step_s": result.first_step_seconds if result else None,
        "iterations": result.steps if result else 0,
        "resumed_from_step": result.resumed_from if result else 0,
        "prepare_s": prepare,
        "prepare_total_s": sum(prepare.values()),
        "eval_s": evaluation.seconds,
        "total_s": time.perf_counter() - started,
        # Cost that travels between machines (bench.flops): FLOPs executed, CPU seconds, and the load it ran under.
        "flops": run_flops(result.flops if result else None, eval_flops, method.prepared_flops),
        "train_cpu_s": result.cpu_seconds if result else 0.0,
        "eval_cpu_s": eval_cost["cpu_s"],
        **{key: value for key, value in clock.stop().items() if key != "wall_s"},
    }
    record = records.make_record(
        preset=preset.name, dataset=ctx.train_data.source, protocol=dataclasses.asdict(protocol), method=spec.method,
        variant=spec.variant, forget_class=spec.forget_class,
        forget_class_name=ctx.train_data.class_names[spec.forget_class], seed=spec.seed,
        hyperparameters=method.hyperparameters(), method_report=method.report(),
        overrides={"method": dict(spec.method_overrides), "protocol": dict(spec.protocol_overrides)},
        scaled_from_paper=scaled, budget=budget_choice(preset, spec.method, config, spec.method_overrides),
        metrics=evaluation.metrics, timings=timings, memory=memory,
        losses={"final": result.final_losses if result else {}, "history": result.loss_history if result else []},
        base_model={"path": str(cache_dir.base_path(preset)), "id": base["id"], "step": base["step"],
                    "source": base.get("source")},
        classifier={"id": classifier_payload["id"], "arch": preset.classifier.arch,
                    "test_accuracy": classifier_payload["test_accuracy"], "source": classifier_payload.get("source"),
                    "fid_features": protocol.fid_features, "noise_check": classifier_payload.get("noise_check")},
        fid=fid.description,
        speed={"requested": dict(spec.speed), "switches": dataclasses.asdict(speed),
               "describe": speed.describe()},
        provenance={**provenance(), **code_fingerprints(cls, preset.name), "device": device_name(device),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "extensions": list(spec.extensions)},  # how its preset and method were registered (reports)
        artifacts=artifacts,
    )
    records.write_json_atomic(directory / records.RECORD_NAME, record)
    (directory / PARTIAL_NAME).unlink(missing_ok=True)
    (directory / records.FAILURE_NAME).unlink(missing_ok=True)
    return record


def run_flops(train_flops: dict | None, eval_flops: Ledger, prepared: dict | None) -> dict:
    """The record's FLOPs: the unlearning loop (total and per kind of step; 0 without one), the evaluation, and the
    preparation (computed once per cache key and shared by the runs that use it, like its seconds; 0 without one,
    None where a preparation cached before FLOPs were counted was loaded). `total` is one run's own: train + evaluate.
    """
    train_total = train_flops["total"] if train_flops else 0
    prepare_total = prepared["total"] if prepared else None
    return {"train": train_total, "train_steps": (train_flops or {}).get("kinds", {}),
            "evaluate": eval_flops.total, "evaluate_parts": dict(eval_flops.flops),
            "prepare": prepare_total, "prepare_parts": dict((prepared or {}).get("parts") or {}),
            "total": None if train_total is None else train_total + eval_flops.total,
            "counter": "torch.utils.flop_counter.FlopCounterMode (2 per multiply-add; matmul, conv, attention)"}


def save_model(model: torch.nn.Module, directory: Path, preset, spec: RunSpec, base: dict) -> dict:
    """The unlearned weights as `model.safetensors` beside the record, with the UNet configuration that rebuilds
    them; the same weights give the same bytes, so the SHA-256 identifies them. Returns its path and SHA-256."""
    metadata = model_metadata(preset.unet, preset.name, method=spec.method, variant=spec.variant,
                              forget_class=spec.forget_class, seed=spec.seed, base_id=base["id"])
    path = write_safetensors(model.state_dict(), directory / "model.safetensors", metadata)
    return {"path": path.name, "sha256": file_sha256(path), "format": "safetensors"}
