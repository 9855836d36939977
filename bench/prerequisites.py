"""What runs share, built once before them: the base DDPM, the evaluation classifier, each method's preparation
and the FID reference statistics.

`build(task)` is the prerequisites step of every sweep (a job of its own on a cluster): under one claim per preset
(`bench.claims`) it builds whatever is missing, so that parallel runs never race to build the same file. A run
only loads (`load_base`, `load_classifier_payload`, `load_preparation`); a missing base model, classifier or
preparation is an error naming the command that builds it. A complete cache is used without writing to it, so a
read-only shared cache works.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import claims, fingerprint
from bench.cache import FORMAT, Cache, CheckpointError, atomic_save, load_checkpoint, load_derived
from bench.classifier import (
    build_classifier,
    describe_noise_check,
    initialize,
    load_classifier,
    noise_check,
    predict,
    random_shift,
)
from bench.config import Preset, TrainConfig, get_preset
from bench.data import ClassDataset, infinite_batches
from bench.device import PLAIN, Speed, device_name, pick_device
from bench.diffusion import NoiseSchedule, noise_loss
from bench.evaluate import Sampler, classifier_key, fid_scorer, reference_images
from bench.flops import ledger
from bench.runner import EMA, Resume, default_update, train
from bench.sweep import RunSpec, resolve_method_config, resolve_protocol
from bench.unet import ConditionalUNet
from methods import Context, UnlearningMethod

log = logging.getLogger(__name__)
_warned: set[str] = set()  # the smoke-test classifiers warned about in this process


def _provenance(device: torch.device, started: float) -> dict:
    return {"device": device_name(device), "seconds": time.perf_counter() - started,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": str(torch.__version__)}


# -- the base model -------------------------------------------------------------------------------------------
def pretrain(preset: Preset, cache: Cache, device: torch.device, *, seed: int = 0, speed: Speed = PLAIN,
             progress: bool = True, iterations: int | None = None, batch_size: int | None = None) -> dict:
    """Train the base model with the preset's recipe; resumes exactly from `base.partial.pt` if one exists.

    `speed` is fp32 by default, as published (`--speed` in `bench pretrain`); `iterations` and `batch_size` replace
    the recipe's for smoke tests, and the checkpoint's source then says it is not the preset's model.
    """
    overrides = {k: v for k, v in (("iterations", iterations), ("batch_size", batch_size)) if v is not None}
    recipe = dataclasses.replace(preset.pretrain, **overrides)
    final = cache.base_path(preset)
    torch.manual_seed(seed)  # the initial weights and dropout: independent of what the process drew before
    model = ConditionalUNet(preset.unet).to(device)
    ema = EMA(model, recipe.ema_decay)
    data, schedule = cache.dataset(preset, "train", keep=True), NoiseSchedule(preset.diffusion, device)
    noise = torch.Generator(device).manual_seed(seed * 1_000_003)
    batches = infinite_batches(data, recipe.batch_size, torch.Generator().manual_seed(seed),
                               hflip=recipe.hflip == "every_draw")

    def loss(batch) -> dict:
        x, y = batch
        return {"loss": noise_loss(model, schedule, x, y, noise, recipe.label_dropout).mean()}

    started = time.perf_counter()
    log.info("pretraining %s: %d iterations of batch %d on %s", preset.name, recipe.iterations, recipe.batch_size,
             device_name(device))
    resume = Resume(final.with_name("base.partial.pt"), preset.checkpoint_every, {"noise": noise})
    result = train(model, batches, default_update(loss), recipe, device, speed=speed, ema=ema, resume=resume,
                   desc=f"pretrain {preset.name}", progress=progress)
    payload = {
        "format": FORMAT, "kind": "diffusion", "preset": preset.name, "config": dataclasses.asdict(preset.unet),
        "diffusion": dataclasses.asdict(preset.diffusion), "recipe": dataclasses.asdict(recipe),
        "speed": speed.for_device(device).describe(), "step": recipe.iterations, "model": model.state_dict(),
        "ema": ema.state_dict(), "id": f"{final.parent.name}-{uuid.uuid4().hex[:12]}",  # the folder: what it is
        "source": _pretrain_source(preset, recipe, seed), "final_loss": result.final_losses.get("loss", math.nan),
        **_provenance(device, started),
    }
    atomic_save(payload, final)
    resume.path.unlink(missing_ok=True)
    log.info("base model saved to %s (%.0f s)", final, payload["seconds"])
    return payload


def _pretrain_source(preset: Preset, recipe: TrainConfig, seed: int) -> str:
    source = f"pretrained here (seed {seed})"
    if recipe != preset.pretrain:
        changed = {k: v for k, v in dataclasses.asdict(recipe).items() if getattr(preset.pretrain, k) != v}
        source += f" with {changed} instead of the preset's recipe: a smoke test, not the benchmark's base model"
    return source


def _missing(what: str, path, command: str) -> CheckpointError:
    return CheckpointError(f"no {what} at {path}; build it with `{command}` (or run `bench run`, which builds it first)")


def load_base(preset: Preset, cache: Cache) -> dict:
    """The base model's checkpoint; an error naming `bench pretrain` if there is none."""
    path, command = cache.base_path(preset), f"bench pretrain --preset {preset.name} --cache {cache.root}"
    if not path.exists():
        raise _missing("base model", path, command)
    payload = load_checkpoint(path, "diffusion", preset, command + " --force")
    _check_finite_checkpoint(payload, path, command + " --force")
    step = payload.get("step")
    if isinstance(step, int) and step < 1:  # untrained: every metric of a run from it would be noise
        raise CheckpointError(f"{path} was trained for {step} steps: no base model to unlearn from; rebuild it with "
                              f"`{command} --force` (pretrain.iterations of preset {preset.name!r} is "
                              f"{preset.pretrain.iterations})")
    return payload


def _check_finite_checkpoint(payload: dict, path, rebuild: str) -> None:
    for part in ("model", "ema"):
        for name, tensor in (payload.get(part) or {}).items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(f"{path} holds non-finite weights ({part} {name}); rebuild it with `{rebuild}`")


# -- the evaluation classifier --------------------------------------------------------------------------------
def train_classifier(preset: Preset, cache: Cache, device: torch.device, *, seed: int = 0, progress: bool = True,
                     steps: int | None = None, test_images: int | None = None, batch_size: int | None = None) -> dict:
    """Train the evaluation classifier on the training split; store its test accuracy and noise check with it.

    `steps` (default: the preset's epochs), `batch_size` and `test_images` (default: the whole test split) shorten
    it for smoke tests; all are recorded, and the source says so.
    """
    config, started, path = preset.classifier, time.perf_counter(), cache.classifier_path(preset)
    batch_size = batch_size or config.batch_size
    train_data, test_data = cache.dataset(preset, "train", keep=True), cache.dataset(preset, "test", keep=True)
    torch.manual_seed(seed)
    model = build_classifier(config, preset.unet.in_channels, preset.num_classes, preset.unet.image_size)
    origin, lrs = initialize(model, config)
    model = model.to(device)
    data_gen = torch.Generator().manual_seed(seed)
    batches = infinite_batches(train_data, batch_size, data_gen, hflip=preset.pretrain.hflip == "every_draw")
    full_steps = config.epochs * math.ceil(len(train_data) / config.batch_size)
    steps = full_steps if steps is None else steps
    mix = torch.distributions.Beta(config.mixup, config.mixup) if config.mixup > 0 else None

    def loss(batch) -> dict:
        x, y = batch
        x = random_shift(x, 1, data_gen)
        if mix is None:
            return {"loss": F.cross_entropy(model(x), y)}
        # mixup: one weight per batch, each image paired with another of the same batch
        weight = float(mix.sample())  # torch's global generator, seeded above
        pair = torch.randperm(len(x), generator=data_gen).to(x.device)
        logits = model(weight * x + (1 - weight) * x[pair])
        return {"loss": weight * F.cross_entropy(logits, y) + (1 - weight) * F.cross_entropy(logits, y[pair])}

    recipe = TrainConfig(iterations=steps, batch_size=batch_size, lr=config.lr, grad_clip=None, hflip="none")
    train(model, batches, default_update(loss), recipe, device, param_lrs=lrs, desc=f"classifier {preset.name}",
          progress=progress)
    if test_images is not None:
        keep = torch.randperm(len(test_data), generator=torch.Generator().manual_seed(0))[:test_images]
        test_data = ClassDataset(test_data.images[keep], test_data.labels[keep], test_data.class_names,
                                 test_data.source)
    accuracy = float((predict(model, test_data.images)[0].argmax(1) == test_data.labels).float().mean())
    shape = (preset.unet.in_channels, preset.unet.image_size, preset.unet.image_size)
    # 1,000 images of each noise kind; a smoke test checks as many as it tests (a ResNet34 at 224x224 on one CPU
    # thread takes minutes for 3,000)
    noise = noise_check(model, shape, count=1000 if test_images is None else test_images)
    source = f"{origin} (seed {seed})"
    if steps != full_steps or batch_size != config.batch_size:
        source += (f"; {steps} steps of batch {batch_size} instead of {full_steps} of {config.batch_size}: a smoke "
                   "test, not the evaluation classifier")
    payload = {
        "format": FORMAT, "kind": "classifier", "preset": preset.name, "config": dataclasses.asdict(config),
        "in_channels": preset.unet.in_channels, "num_classes": preset.num_classes, "model": model.state_dict(),
        "id": f"{path.parent.name}-classifier-{uuid.uuid4().hex[:12]}", "test_accuracy": accuracy,
        "test_images": len(test_data), "steps": steps, "batch_size": batch_size, "source": source,
        "noise_check": noise, **_provenance(device, started),
    }
    atomic_save(payload, path)
    log.info("classifier saved to %s: %s, test accuracy %.2f%% on %d images", path, origin, 100 * accuracy,
             len(test_data))
    log.info("classifier on noise: %s", describe_noise_check(noise))
    if accuracy < preset.classifier_floor and "smoke test" not in source:
        log.warning("test accuracy %.2f%% is below min_classifier_accuracy %.2f%% of preset %s: runs will refuse "
                    "this classifier", 100 * accuracy, 100 * preset.classifier_floor, preset.name)
    return payload


def load_classifier_payload(preset: Preset, cache: Cache) -> dict:
    """The classifier's checkpoint; an error naming `bench classifier` if there is none."""
    path, command = cache.classifier_path(preset), f"bench classifier --preset {preset.name} --cache {cache.root}"
    if not path.exists():
        raise _missing("evaluation classifier", path, command)
    payload = load_checkpoint(path, "classifier", preset, command + " --force")
    payload.setdefault("id", f"{preset.name}-classifier-unversioned")  # checkpoints from before ids
    _check_classifier_fit(payload, preset, path, command)
    return payload


def _check_classifier_fit(payload: dict, preset: Preset, path, command: str) -> None:
    """Refuse a classifier below the preset's accuracy floor: UA and FID from it would look valid and mean nothing.
    A smoke-test classifier (`bench classifier --steps`, said in its source and every record) only warns."""
    accuracy, floor = payload.get("test_accuracy"), preset.classifier_floor
    if not isinstance(accuracy, (int, float)) or accuracy >= floor:
        return
    found = (f"{path} reaches {100 * accuracy:.2f}% test accuracy, below min_classifier_accuracy "
             f"{100 * floor:.2f}% of preset {preset.name}")
    if "smoke test" in str(payload.get("source", "")):
        if found not in _warned:  # once per process: a sweep loads the classifier for each check and each run
            _warned.add(found)
            log.warning("%s (a smoke-test classifier: its metrics are mechanics only)", found)
        return
    config = preset.classifier
    raise CheckpointError(f"{found}: UA and FID measured with it would mean nothing. Change its recipe "
                          f"(classifier.epochs, now {config.epochs}; classifier.lr, now {config.lr}: a preset file "
                          f"with other classifier fields trains a classifier of its own), rebuild it with "
                          f"`{command} --force`, or lower the preset's min_classifier_accuracy")


# -- method preparation ---------------------------------------------------------------------------------------
def make_context(preset: Preset, cache: Cache, base: dict, forget_class: int, seed: int, device: torch.device,
                 progress: bool) -> Context:
    """The context a method runs in: data, base weights, seeded generators and a sampler of the base model."""
    schedule = NoiseSchedule(preset.diffusion, device)

    samplers: dict[int, tuple[dict, Sampler]] = {}

    def generate(weights: dict, label: int, count: int) -> torch.Tensor:
        """`count` images of `label` drawn with the preset's evaluation sampler, fp32, seed 0 (as SA's priors)."""
        if id(weights) not in samplers:  # one model per set of weights, not one per class
            model = ConditionalUNet(preset.unet).to(device)
            model.load_state_dict(weights)
            samplers[id(weights)] = (weights, Sampler(model, schedule, preset.protocol(None), preset, device, seed=0,
                                                      progress=progress))
        return samplers[id(weights)][1].class_samples(label, count)

    return Context(preset=preset, forget_class=forget_class, seed=seed, schedule=schedule,
                   train_data=cache.dataset(preset, "train"), device=device,
                   noise_generator=torch.Generator(device).manual_seed(seed),
                   data_generator=torch.Generator().manual_seed(seed), base_weights=base["model"],
                   base_ema=base["ema"], generate=generate, progress=progress)


def preparation_path(cache: Cache, method: UnlearningMethod, base_id: str):
    """Where `method`'s preparation is cached: by base model, the method's `cache_key()` (its settings) and the code
    that computes it (`fingerprint.code_key`); None when it has nothing to prepare."""
    key = method.cache_key()
    return None if key is None else cache.prepared_path(method.ctx.preset, method.name, base_id,
                                                        key + fingerprint.code_tag(type(method)))


def load_preparation(method: UnlearningMethod, cache: Cache, base_id: str) -> dict[str, float]:
    """Set `method.prepared` from the cache; returns the seconds each stage took when it was computed."""
    path = preparation_path(cache, method, base_id)
    if path is None:
        method.prepared_flops = {"total": 0, "parts": {}}  # nothing to prepare
        return {}
    stored = load_derived(path)
    if stored is None:
        spec = f"--preset {method.ctx.preset.name} --methods {method.name} --classes {method.ctx.forget_class}"
        raise CheckpointError(f"{method.name}'s preparation is not cached at {path}; build it with `bench prepare "
                              f"{spec}` (with the run's --set options), or run `bench run`, which builds it first")
    method.prepared = stored["tensors"]
    method.prepared_flops = stored.get("flops")  # None: cached before preparations counted their FLOPs
    return dict(stored["timings"])


def build_preparation(method: UnlearningMethod, cache: Cache, base_id: str, job_id: str | None = None) -> bool:
    """Compute and cache `method`'s preparation unless it is cached; True if it was computed here."""
    path = preparation_path(cache, method, base_id)
    if path is None or load_derived(path) is not None:
        return False
    with claims.hold(path.with_name(path.name + ".claim"), f"{method.name}'s preparation", job_id):
        if load_derived(path) is not None:  # built by the process we waited for
            return False
        log.info("preparing %s (%s) once: %s", method.name, method.cache_key(), path)
        method.ctx.timings.clear()
        with ledger() as flops:  # the sampler's forwards (SA's priors) and the Fisher and saliency passes
            tensors = method.prepare()
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"{method.name}'s preparation computed non-finite values in {name}")
        atomic_save({"tensors": tensors, "timings": dict(method.ctx.timings), "key": method.cache_key(),
                     "flops": {"total": flops.total, "parts": dict(flops.flops)}}, path)
        return True


# -- the prerequisites step -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prerequisites:
    """What a set of runs of one preset and cache needs first; `specs` are the runs (one per preparation key and
    per FID reference is enough)."""

    preset: str
    cache: str | None
    data_root: str | None = None
    device: str | None = None
    progress: bool = True
    specs: tuple[RunSpec, ...] = ()

    def cache_obj(self) -> Cache:
        return Cache(self.cache, self.data_root)


def prerequisites_for(specs: list[RunSpec]) -> list[Prerequisites]:
    """One task per (preset, cache, data root, device) holding every spec that shares it."""
    groups: dict[tuple, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault((spec.preset, spec.cache, spec.data_root, spec.device, spec.progress), []).append(spec)
    return [Prerequisites(*key, specs=tuple(group)) for key, group in groups.items()]


def _methods(task: Prerequisites, base: dict, device: torch.device) -> list[UnlearningMethod]:
    """One method object per distinct preparation the runs need."""
    preset, cache, seen, methods = get_preset(task.preset), task.cache_obj(), set(), []
    for spec in task.specs:
        cls, config, _ = resolve_method_config(preset, spec.method, spec.method_overrides)
        ctx = make_context(preset, cache, base, spec.forget_class, spec.seed, device, task.progress)
        method = cls(config, ctx)
        key = (spec.method, method.cache_key())
        if key[1] is not None and key not in seen:
            seen.add(key)
            methods.append(method)
    return methods


def missing(task: Prerequisites) -> list[str]:
    """What the task would build (empty when the cache is complete); reads files, writes nothing."""
    preset, cache, device = get_preset(task.preset), task.cache_obj(), torch.device("cpu")
    if not cache.base_path(preset).exists():
        return ["base model"]
    found = [] if cache.classifier_path(preset).exists() else ["classifier"]
    base = load_base(preset, cache)
    found += [f"{m.name} preparation" for m in _methods(task, base, device)
              if load_derived(preparation_path(cache, m, base["id"])) is None]
    if not found and not _fid_references(task, build=False):
        found.append("FID reference statistics")
    return found


def _fid_references(task: Prerequisites, build: bool) -> bool:
    """Whether every FID reference the runs need is cached; with `build`, make them so."""
    preset, cache = get_preset(task.preset), task.cache_obj()
    device = pick_device(task.device)
    classifier = load_classifier(load_classifier_payload(preset, cache), preset, device)
    data, folder, key = cache.dataset(preset, "train"), cache.path(preset, "fid-reference"), classifier_key(classifier)
    seen = set()
    for spec in task.specs:
        protocol = resolve_protocol(preset, spec)
        count = len(reference_images(data, spec.forget_class, protocol.fid_reference_per_class))
        identity = (protocol.fid_features, protocol.inception_weights, spec.forget_class, count)
        if identity in seen:
            continue
        seen.add(identity)
        if fid_scorer(protocol, data, spec.forget_class, classifier, folder, device, task.progress, key,
                      build=build) is None:
            return False
    return True


def build(task: Prerequisites, job_id: str | None = None) -> dict:
    """Build what is missing (nothing is written when nothing is); returns where things are and what was built."""
    preset, cache = get_preset(task.preset), task.cache_obj()
    todo = missing(task)
    if todo:
        device = pick_device(task.device)
        classifier_path = cache.classifier_path(preset)
        if classifier_path.parent != cache.base_path(preset).parent:  # a classifier other base models share
            with claims.hold(classifier_path.with_name("prepare.claim.json"), f"the {preset.name} classifier",
                             job_id):
                if not classifier_path.exists():
                    train_classifier(preset, cache, device, progress=task.progress)
        with claims.hold(cache.path(preset, "prepare.claim.json"), f"the {preset.name} prerequisites", job_id):
            if not cache.base_path(preset).exists():
                pretrain(preset, cache, device, progress=task.progress)
            if not classifier_path.exists():
                train_classifier(preset, cache, device, progress=task.progress)
            base = load_base(preset, cache)
            for method in _methods(task, base, device):
                build_preparation(method, cache, base["id"], job_id)
            _fid_references(task, build=True)
    base, classifier = load_base(preset, cache), load_classifier_payload(preset, cache)
    return {"base": str(cache.base_path(preset)), "base_id": base["id"], "classifier": str(cache.classifier_path(preset)),
            "classifier_accuracy": classifier["test_accuracy"], "built": todo}
