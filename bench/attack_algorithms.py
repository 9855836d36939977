"""The two attacks on an unlearned model: relearning from a few real images, and a class-embedding search.

Each is a function of a `Target` (the attacked weights and what evaluates them) and its config, and returns its
own part of the attack record; `bench.attacks` resolves configs, loads targets and writes the records. Both train
through `bench.runner.train` (the one loop: Adam, clipping, non-finite checks, exact resume) and keep in the
attack's folder what a killed attack needs to go on exactly: the loop's `partial.pt`, the weights at each schedule
point (`snapshots/`), the metrics of each evaluated point (`progress.json`) and the search's result (`found.pt`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from bench import metrics, records
from bench.cache import Cache, atomic_save, load_derived
from bench.classifier import predict
from bench.config import Preset, Protocol, TrainConfig, check_choice, check_number
from bench.data import ClassDataset, from_uint8, training_batches
from bench.device import Speed
from bench.diffusion import NoiseSchedule, noise_loss
from bench.evaluate import Sampler
from bench.runner import Resume, train
from bench.unet import NULL_CLASS, ConditionalUNet

log = logging.getLogger(__name__)

PARTIAL_NAME = "partial.pt"
PROGRESS_NAME = "progress.json"
SNAPSHOTS = "snapshots"
FOUND_NAME = "found.pt"
RELEARNED_AT = 50.0  # forget-class accuracy (%) from which the class counts as relearned
TARGETS = ("embedding", "embedding+guidance")


@dataclass(frozen=True)
class RelearnConfig:
    """Fine-tune on `k` held-out forget-class images with the pretraining loss, measured after each `schedule`
    step count. None takes the run's value: `samples` the protocol's forget_samples, `lr` the preset's pretraining
    rate, `batch_size` min(k, the pretraining batch)."""

    k: int = 5
    schedule: tuple[int, ...] = (0, 10, 50, 100, 200)
    samples: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    label_dropout: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 50

    def __post_init__(self):
        object.__setattr__(self, "schedule", tuple(self.schedule))
        steps = self.schedule
        if not steps or any(type(s) is not int or s < 0 for s in steps) or list(steps) != sorted(set(steps)):
            raise ValueError(f"--schedule must be increasing step counts >= 0 such as 0,10,50, got {steps}")
        check_number("--k", self.k, low=1, integer=True)
        check_number("--samples", self.samples, low=1, integer=True, optional=True)
        check_number("--lr", self.lr, low=0, low_open=True, optional=True)
        check_number("--batch-size", self.batch_size, low=1, integer=True, optional=True)
        check_number("label_dropout", self.label_dropout, low=0, high=1)
        check_number("grad_clip", self.grad_clip, low=0, low_open=True)
        check_number("--checkpoint-every", self.checkpoint_every, low=1, integer=True)

    def complete(self, preset: Preset, protocol: Protocol) -> RelearnConfig:
        return dataclasses.replace(self, samples=self.samples or protocol.forget_samples,
                                   lr=self.lr or preset.pretrain.lr,
                                   batch_size=self.batch_size or min(self.k, preset.pretrain.batch_size))


@dataclass(frozen=True)
class EmbeddingConfig:
    """Search the forget class's embedding vector (with target `embedding+guidance` the guidance weight too) by
    `steps` Adam steps of `batch_size` samples, each drawn by a `sampler_steps`-step DDIM sampler (eta 0) that
    gradients flow through. None `samples`: the protocol's forget_samples, drawn to measure success."""

    target: str = "embedding"
    steps: int = 100
    batch_size: int = 16
    sampler_steps: int = 10
    lr: float = 0.05
    max_guidance: float = 10.0
    samples: int | None = None
    checkpoint_every: int = 25

    def __post_init__(self):
        check_choice("--targets", self.target, TARGETS)
        check_number("--steps", self.steps, low=1, integer=True)
        check_number("--batch-size", self.batch_size, low=1, integer=True)
        check_number("--sampler-steps", self.sampler_steps, low=1, high=1000, integer=True)
        check_number("--lr", self.lr, low=0, low_open=True)
        check_number("--max-guidance", self.max_guidance, low=0)
        check_number("--samples", self.samples, low=1, integer=True, optional=True)
        check_number("--checkpoint-every", self.checkpoint_every, low=1, integer=True)

    def complete(self, preset: Preset, protocol: Protocol) -> EmbeddingConfig:
        return dataclasses.replace(self, samples=self.samples or protocol.forget_samples)


@dataclass
class Target:
    """An attacked model and what evaluates it: the run's preset, protocol sampler, classifier, class and seed."""

    preset: Preset
    protocol: Protocol
    forget_class: int
    seed: int
    weights: dict[str, Tensor]  # the attacked weights, on the CPU
    classifier: nn.Module
    cache: Cache
    device: torch.device
    speed: Speed  # already resolved for the device, as the run sampled with it
    directory: Path
    progress: bool = True
    desc: str = "attack"
    schedule: NoiseSchedule = field(init=False)

    def __post_init__(self):
        self.schedule = NoiseSchedule(self.preset.diffusion, self.device)

    def model(self) -> ConditionalUNet:
        """A fresh copy of the attacked model on the device."""
        model = ConditionalUNet(self.preset.unet).to(self.device)
        model.load_state_dict(self.weights)
        return model

    def forget_metrics(self, model: nn.Module, count: int, protocol: Protocol | None = None) -> dict:
        """UA, entropy, forget-class probability and accuracy of `count` guided forget-class samples, drawn as the
        run's evaluation draws them (same sampler, seed and noise)."""
        sampler = Sampler(model, self.schedule, protocol or self.protocol, self.preset, self.device, self.seed,
                          progress=self.progress, speed=self.speed)
        probs, _ = predict(self.classifier, from_uint8(sampler.class_samples(self.forget_class, count)))
        found = metrics.forget_metrics(probs, self.forget_class)
        return {"ua": found["ua"], "entropy": found["entropy"], "forget_prob": found["forget_prob"],
                "forget_accuracy": 100.0 - found["ua"], "forget_histogram": found["forget_histogram"]}


def _cpu(model: nn.Module) -> dict[str, Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}


# -- relearning -----------------------------------------------------------------------------------------------
def held_out_images(target: Target, k: int) -> tuple[ClassDataset, list[int]]:
    """`k` forget-class images of the test split, chosen by the seed (the first k of one permutation, so a smaller
    k is a subset of a larger one); and their indices in the test split."""
    test = target.cache.dataset(target.preset, "test")
    positions = torch.nonzero(test.labels == target.forget_class).flatten()
    if k > len(positions):
        raise ValueError(f"--k {k}: the {target.preset.name} test split holds only {len(positions)} images of class "
                         f"{target.forget_class}")
    chosen = positions[torch.randperm(len(positions), generator=torch.Generator().manual_seed(target.seed))[:k]]
    return ClassDataset(test.images[chosen], test.labels[chosen], test.class_names, test.source), chosen.tolist()


def _snapshot(target: Target, step: int) -> Path:
    return target.directory / SNAPSHOTS / f"step{step}.pt"


def _fine_tune(target: Target, config: RelearnConfig, images: ClassDataset) -> dict:
    """Fine-tune a copy of the attacked model to the schedule's last step, saving the weights at every point."""
    model, recipe_hflip = target.model(), target.preset.pretrain.hflip
    noise = torch.Generator(target.device).manual_seed(target.seed * 1_000_003 + 1)
    batches = training_batches(images, config.batch_size, torch.Generator().manual_seed(target.seed), recipe_hflip)
    recipe = TrainConfig(iterations=config.schedule[-1], batch_size=config.batch_size, lr=config.lr,
                         grad_clip=config.grad_clip, hflip=recipe_hflip, label_dropout=config.label_dropout)
    inner = set(config.schedule[:-1]) - {0}

    def update(step, trainer, batch):
        if step in inner:  # the weights after `step` steps: a point of the curve
            atomic_save(_cpu(model), _snapshot(target, step))
        x, y = batch
        return trainer.update(lambda: {"loss": noise_loss(model, target.schedule, x, y, noise,
                                                          config.label_dropout).mean()})

    torch.manual_seed(target.seed)  # dropout; a resumed run restores its state
    resume = Resume(target.directory / PARTIAL_NAME, config.checkpoint_every, {"noise": noise})
    result = train(model, batches, update, recipe, target.device, speed=target.speed, resume=resume,
                   progress=target.progress, desc=target.desc)
    atomic_save(_cpu(model), _snapshot(target, config.schedule[-1]))
    resume.path.unlink(missing_ok=True)
    return {"train_s": result.seconds, "first_step_s": result.first_step_seconds,
            "resumed_from_step": result.resumed_from, "losses": result.loss_history, "memory": result.memory}


def _read_progress(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"points": {}, "train": None}


def relearn(target: Target, config: RelearnConfig) -> dict:
    """Fine-tune on k real forget-class images; forget metrics of guided samples at each schedule point."""
    images, indices = held_out_images(target, config.k)
    path = target.directory / PROGRESS_NAME
    progress = _read_progress(path)
    points = progress["points"]  # step (as text) -> metrics, kept as each point is measured
    missing = [step for step in config.schedule if str(step) not in points]
    if any(step > 0 and not _snapshot(target, step).exists() for step in missing):
        progress["train"] = _fine_tune(target, config, images)
        records.write_json_atomic(path, progress)
    probe = ConditionalUNet(target.preset.unet).to(target.device)
    for step in missing:
        weights = target.weights if step == 0 else load_derived(_snapshot(target, step))
        if weights is None:  # unreadable, and removed by load_derived: the next attempt fine-tunes again
            raise RuntimeError(f"{_snapshot(target, step)} did not load; run the attack again")
        probe.load_state_dict(weights)
        started = time.perf_counter()
        point = {"step": step, **target.forget_metrics(probe, config.samples)}
        points[str(step)] = {**point, "seconds": time.perf_counter() - started}
        records.write_json_atomic(path, progress)
        log.info("%s: step %d, forget-class accuracy %.1f%%", target.desc, step, point["forget_accuracy"])
    curve = [points[str(step)] for step in config.schedule]
    trained = progress["train"] or {}
    return {"curve": curve, "auc": area_under_curve(curve), "steps_to_relearn": steps_to_relearn(curve),
            "relearned_at": RELEARNED_AT, "images": {"split": "test", "indices": indices},
            "losses": trained.get("losses", []),
            "timings": {"train_s": trained.get("train_s", 0.0), "first_step_s": trained.get("first_step_s"),
                        "resumed_from_step": trained.get("resumed_from_step", 0),
                        "eval_s": sum(p["seconds"] for p in curve)}}


def area_under_curve(curve: list[dict]) -> float:
    """Mean forget-class accuracy (%) over the schedule: the trapezoid rule over steps divided by the step span
    (the one point's accuracy for a one-point schedule). 0 = never relearned, 100 = recognised throughout."""
    steps, accuracy = [p["step"] for p in curve], [p["forget_accuracy"] for p in curve]
    if len(curve) == 1:
        return accuracy[0]
    area = sum((s1 - s0) * (a0 + a1) / 2 for s0, s1, a0, a1 in zip(steps, steps[1:], accuracy, accuracy[1:]))
    return area / (steps[-1] - steps[0])


def steps_to_relearn(curve: list[dict]) -> int | None:
    """The first schedule step at which forget-class accuracy reaches RELEARNED_AT, or None."""
    return next((p["step"] for p in curve if p["forget_accuracy"] >= RELEARNED_AT), None)


# -- class-embedding search -----------------------------------------------------------------------------------
class FreeClass(nn.Module):
    """The search's only trainable values: the forget class's embedding vector and the guidance weight."""

    def __init__(self, vector: Tensor, guidance: float, learn_guidance: bool):
        super().__init__()
        self.vector = nn.Parameter(vector.detach().clone().float())
        self.guidance = nn.Parameter(torch.tensor(float(guidance), device=vector.device),
                                     requires_grad=learn_guidance)


def soft_images(images: Tensor, conversion: str) -> Tensor:
    """What `to_uint8` then `from_uint8` make of sampler output, without the rounding: differentiable."""
    unit = ((images + 1) / 2).clamp(0, 1)
    if conversion == "stretch":
        flat = unit.flatten(1)
        low, high = flat.min(1).values, flat.max(1).values
        shape = (-1,) + (1,) * (unit.dim() - 1)
        unit = (unit - low.view(shape)) / (high - low).clamp_min(1e-5).view(shape)
    return unit * 2 - 1


def _ddim_step(model: nn.Module, schedule: NoiseSchedule, table: Tensor, guidance: Tensor, x: Tensor,
               labels: Tensor, t_now: int, t_prev: int) -> Tensor:
    """One guided DDIM step (eta 0) with `table` as the class-embedding table."""
    t = torch.full_like(labels, t_now)
    both = functional_call(model, {"classes_emb.weight": table},
                           (torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, NULL_CLASS)])))
    cond, uncond = both.float().chunk(2)
    eps = (1 + guidance) * cond - guidance * uncond
    return schedule.ddim_step(x, eps, t, torch.full_like(t, t_prev), 0.0, torch.zeros_like(x))


def differentiable_samples(target: Target, model: nn.Module, free: FreeClass, config: EmbeddingConfig,
                           generator: torch.Generator) -> Tensor:
    """`config.batch_size` guided forget-class samples of `model` with the forget row of its class table replaced by
    `free.vector`; each step is checkpointed (recomputed in backward), so memory holds one step's graph (the same
    numbers as without: measured on digits)."""
    weight = model.classes_emb.weight.detach()
    row = torch.arange(len(weight), device=weight.device)[:, None] == target.forget_class
    table = torch.where(row, free.vector[None], weight)
    guidance = free.guidance.clamp(0, config.max_guidance)
    labels = torch.full((config.batch_size,), target.forget_class, device=target.device, dtype=torch.long)
    unet = target.preset.unet
    x = torch.randn((config.batch_size, unet.in_channels, unet.image_size, unet.image_size), generator=generator,
                    device=target.device)
    seq = target.schedule.sampler_steps(config.sampler_steps)
    for t_now, t_prev in zip(reversed(seq), reversed([-1] + seq[:-1])):
        x = checkpoint(_ddim_step, model, target.schedule, table, guidance, x, labels, t_now, t_prev,
                       use_reentrant=False)
    return x.clamp(-1, 1)


def _search(target: Target, model: nn.Module, config: EmbeddingConfig) -> dict:
    """Adam on the free vector (and guidance) to maximise the classifier's log-probability of the forget class."""
    free = FreeClass(model.classes_emb.weight[target.forget_class], target.protocol.guidance,
                     config.target == "embedding+guidance")
    generator = torch.Generator(target.device).manual_seed(target.seed * 1_000_003 + 2)
    classifier, forget_class = target.classifier, target.forget_class

    def loss() -> dict[str, Tensor]:
        images = soft_images(differentiable_samples(target, model, free, config, generator),
                             target.protocol.image_conversion)
        log_probs = F.log_softmax(classifier.head(classifier.features(images)).float(), dim=1)[:, forget_class]
        return {"loss": -log_probs.mean(), "forget_prob": log_probs.detach().exp().mean(),
                "guidance": free.guidance.detach().clamp(0, config.max_guidance)}

    recipe = TrainConfig(iterations=config.steps, batch_size=config.batch_size, lr=config.lr, grad_clip=None,
                         hflip="none", label_dropout=0.0)
    resume = Resume(target.directory / PARTIAL_NAME, config.checkpoint_every, {"noise": generator})
    result = train(free, itertools.repeat(None), lambda step, trainer, _: trainer.update(loss), recipe,
                   target.device, speed=target.speed, resume=resume, progress=target.progress,
                   desc=target.desc)
    resume.path.unlink(missing_ok=True)
    return {"vector": free.vector.detach().cpu(), "guidance": float(free.guidance.detach().clamp(0, config.max_guidance)),
            "train_s": result.seconds, "first_step_s": result.first_step_seconds,
            "resumed_from_step": result.resumed_from, "losses": result.loss_history}


def _describe(found: dict, weight: Tensor, forget_class: int) -> dict:
    """Where the found vector lies: its guidance, norm, distance from the class's own row, nearest class row."""
    vector, weight = found["vector"], weight.detach().cpu()
    cosine = F.cosine_similarity(vector[None], weight, dim=1)
    return {"guidance": found["guidance"], "vector_norm": float(vector.norm()),
            "own_norm": float(weight[forget_class].norm()),
            "distance_from_own": float((vector - weight[forget_class]).norm()),
            "nearest_class": int(cosine.argmax()), "cosine_to_classes": [round(float(c), 4) for c in cosine]}


def embedding_search(target: Target, config: EmbeddingConfig) -> dict:
    """Search a forget-class embedding (and guidance); success rate = the forget-class accuracy (% of protocol samples
    the classifier labels as the forget class, 100 - UA) with it, against that with the class's own embedding."""
    model = target.model().eval().requires_grad_(False)
    found = load_derived(target.directory / FOUND_NAME)  # a search finished before a kill is not repeated
    if found is None:
        found = _search(target, model, config)
        atomic_save(found, target.directory / FOUND_NAME)
    started = time.perf_counter()
    before = target.forget_metrics(model, config.samples)
    with torch.no_grad():
        model.classes_emb.weight[target.forget_class] = found["vector"].to(target.device)
    protocol = target.protocol
    if config.target == "embedding+guidance":
        protocol = dataclasses.replace(protocol, guidance=found["guidance"])
    after = target.forget_metrics(model, config.samples, protocol)
    return {"success_rate": after["forget_accuracy"], "success_rate_before": before["forget_accuracy"],
            "before": before, "after": after, "sampler": protocol.describe(),
            "budget": {"optimisation_steps": config.steps, "samples_per_step": config.batch_size,
                       "samples_total": config.steps * config.batch_size, "sampler_steps": config.sampler_steps,
                       "sampler": "DDIM eta=0, guided, checkpointed per step"},
            "found": _describe(found, target.weights["classes_emb.weight"], target.forget_class),
            "losses": found["losses"], "artifacts": {"found": FOUND_NAME},
            "timings": {"train_s": found["train_s"], "first_step_s": found["first_step_s"],
                        "resumed_from_step": found["resumed_from_step"], "eval_s": time.perf_counter() - started}}
