"""FLOP counting (bench.flops): each shortcut equals FlopCounterMode run over the whole computation, and counting
changes no number a run computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.classifier import build_classifier, predict
from bench.config import TrainConfig, get_preset
from bench.diffusion import NoiseSchedule, sample
from bench.flops import ledger
from bench.runner import Resume, default_update, train
from bench.unet import ConditionalUNet

PRESET = get_preset("tiny")
SHAPE = (PRESET.unet.in_channels, PRESET.unet.image_size, PRESET.unet.image_size)


def _batches(seed: int, big_every: int = 0):
    """Batches of 4 images; with `big_every`, every such batch has 12 (a step of another kind)."""
    generator = torch.Generator().manual_seed(seed)
    step = 0
    while True:
        size = 12 if big_every and step % big_every == 0 else 4
        yield {"x": torch.randn(size, *SHAPE, generator=generator)}
        step += 1


def _train(iterations: int, count_flops: bool, resume_path: Path, every: int | None = None, big_every: int = 0):
    torch.manual_seed(0)
    model = ConditionalUNet(PRESET.unet)
    noise = torch.Generator().manual_seed(1)

    def loss(batch):
        n = len(batch["x"])
        t = torch.randint(0, 10, (n,), generator=noise)
        labels = torch.randint(0, 10, (n,), generator=noise)
        target = torch.randn(batch["x"].shape, generator=noise)
        return {"loss": (model(batch["x"], t, labels) - target).pow(2).mean()}

    resume = Resume(resume_path, every, {"noise": noise})  # the loss draws from `noise`: restored after a count
    result = train(model, _batches(0, big_every), default_update(loss), TrainConfig(iterations=iterations, lr=1e-3),
                   torch.device("cpu"), progress=False, count_flops=count_flops, resume=resume)
    return model, result


def test_counting_changes_no_weight_and_equals_the_counter_over_the_whole_loop(tmp_path):
    counted_model, counted = _train(7, True, tmp_path / "a.pt", big_every=3)
    with FlopCounterMode(display=False) as whole:
        plain_model, plain = _train(7, False, tmp_path / "b.pt", big_every=3)
    for name, value in counted_model.state_dict().items():
        assert torch.equal(value, plain_model.state_dict()[name]), name
    assert counted.loss_history == plain.loss_history
    assert counted.flops["total"] == whole.get_total_flops() > 0
    assert sorted(kind["steps"] for kind in counted.flops["kinds"].values()) == [3, 4]  # steps 0, 3, 6 are big
    assert plain.flops["total"] is None and not plain.flops["counted"]


def test_a_resumed_loop_reports_the_uninterrupted_count(tmp_path):
    path = tmp_path / "partial.pt"
    _, whole = _train(6, True, path, every=2, big_every=4)  # leaves step 4's checkpoint (the caller deletes it)
    assert path.exists()
    _, resumed = _train(6, True, path, every=2, big_every=4)
    assert resumed.resumed_from == 4
    assert resumed.flops == whole.flops


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_sampler_ledger_equals_the_counter(guidance):
    model = ConditionalUNet(PRESET.unet).eval()
    schedule = NoiseSchedule(PRESET.diffusion)
    labels = torch.tensor([0, 1, 2])

    def draw():
        return sample(model, schedule, labels, SHAPE, steps=3, eta=1.0, guidance=guidance,
                      generator=torch.Generator().manual_seed(0))

    with FlopCounterMode(display=False) as whole:
        draw()
    with ledger() as book:
        draw()
    assert book.flops["sampler"] == whole.get_total_flops() > 0
    assert book.images["sampler"] == len(schedule.sampler_steps(3)) * 3 * (1 if guidance == 0 else 2)


def test_classifier_ledger_equals_the_counter():
    classifier = build_classifier(PRESET.classifier, PRESET.unet.in_channels, 10, PRESET.unet.image_size)
    images = torch.rand(7, *SHAPE) * 2 - 1
    with FlopCounterMode(display=False) as whole:
        predict(classifier, images, batch_size=3)
    with ledger() as book:
        predict(classifier, images, batch_size=3)
    assert book.flops["classifier"] == whole.get_total_flops() > 0


def test_no_ledger_counts_nothing_and_costs_no_forward():
    model = ConditionalUNet(PRESET.unet).eval()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    sample(model, NoiseSchedule(PRESET.diffusion), torch.tensor([0]), SHAPE, steps=2, eta=1.0, guidance=0.0)
    assert len(calls) == 2  # the sampler's own forwards only


@pytest.mark.parametrize("method", ["sa", "salun", "sfron"])
@pytest.mark.slow
def test_preparation_ledger_equals_the_counter_and_changes_nothing(tiny_cache, method):
    """A preparation's FLOPs (SA's priors and Fisher, SalUn's saliency, SFR-on's two Fishers), counted per image,
    equal FlopCounterMode over the whole preparation, and counting leaves what it computes bit for bit the same.

    SA's Fisher takes per-sample gradients with vmap; over n > 1 images vmap runs them as grouped convolutions that
    the counter puts at about 2n one-image passes (n = 4: 7.9x). The ledger counts the n passes the Fisher needs,
    which the counter confirms where vmap holds one image (fim_batch_size=1). The counter pays Python for every
    operation, so the test makes fewer: SA on 2 prior images per class instead of 4 and SFR-on's Fishers in
    batches of 128 instead of 16 keep every kind of pass and cut the three cases from 33 s to 18 s (the sums the
    test compares do not depend on either)."""
    from bench.cache import Cache
    from bench.prerequisites import load_base, make_context
    from bench.sweep import resolve_method_config

    preset, cache = get_preset("tiny"), Cache(tiny_cache)
    base = load_base(preset, cache)

    def prepare():
        overrides = {"sa": (("fim_batch_size", 1), ("prior_samples_per_class", 2)),
                     "sfron": (("fisher_batch_size", 128),)}.get(method, ())
        cls, config, _ = resolve_method_config(preset, method, overrides)
        return cls(config, make_context(preset, cache, base, 3, 0, torch.device("cpu"), False)).prepare()

    with ledger() as book:
        counted = prepare()
    with FlopCounterMode(display=False) as counter:
        plain = prepare()
    assert book.total == counter.get_total_flops() > 0, dict(book.flops)
    assert counted.keys() == plain.keys() and all(torch.equal(counted[k], plain[k]) for k in plain)
    assert set(book.flops) == ({"sampler", "fisher"} if method == "sa" else {"saliency" if method == "salun" else
                                                                            "fisher"})
