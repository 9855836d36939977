"""Every registered method, two steps on the tiny preset; SA's Fisher and EWC; SalUn's mask and pseudo classes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench.cache import Cache
from bench.config import TrainConfig, get_preset
from bench.device import Speed
from bench.prerequisites import build_preparation, load_base, load_preparation, make_context
from bench.runner import EMA, train
from bench.sweep import parse_sets, resolve_method_config
from bench.unet import ConditionalUNet
from methods import METHODS, get_method
from methods.sa import diagonal_fisher
from methods.salun import pseudo_labels, top_fraction_mask


def make_setup(tiny_cache, tmp_path, method, forget_class=3, prepare=True, **overrides):
    """A method on the tiny preset's base model (its preparation built in the cache and loaded), with the model
    it trains and that model's EMA."""
    preset, cache = get_preset("tiny"), Cache(tiny_cache)
    cls, config, _ = resolve_method_config(preset, method, tuple(overrides.items()))
    base = load_base(preset, cache)
    ctx = make_context(preset, cache, base, forget_class, 0, torch.device("cpu"), False)
    runner = cls(config, ctx)
    timings = None
    if prepare:
        build_preparation(runner, cache, base["id"])
        timings = load_preparation(runner, cache, base["id"])
    torch.manual_seed(0)
    model = ConditionalUNet(preset.unet)
    if not cls.from_scratch:
        model.load_state_dict(base["model"])
    ema = EMA(model, config.ema_decay, shadow=None if cls.from_scratch else base["ema"]) if config.ema else None
    return SimpleNamespace(method=runner, model=model, ema=ema, ctx=ctx, timings=timings, base=base)


def cache_snapshot(root) -> dict:
    return {p: p.stat().st_mtime_ns for p in Path(root).rglob("*.pt")}


@pytest.mark.parametrize("name", [m for m in METHODS if METHODS[m].Config().iterations > 0])
@pytest.mark.slow
def test_every_method_trains_two_finite_steps(name, tiny_cache, tmp_path):
    setup = make_setup(tiny_cache, tmp_path, name)
    method, model = setup.method, setup.model
    base = {k: v.clone() for k, v in setup.ctx.base_weights.items()}
    cached = cache_snapshot(tiny_cache)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = dataclasses.replace(method.config, iterations=2, lr=1e-3)
    result = train(model, method.batches(), method.update, config, setup.ctx.device, ema=setup.ema,
                   grad_mask=method.grad_mask(), progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.final_losses.values())
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no weight"
    assert all(torch.equal(base[k], setup.ctx.base_weights[k]) for k in base), "the frozen base weights changed"
    assert cache_snapshot(tiny_cache) == cached, "a cached artifact was rewritten"
    mask = method.grad_mask()
    if mask is not None:
        for key, keep in mask.items():
            frozen = ~keep.bool()
            assert torch.equal(before[key][frozen], after[key][frozen]), f"masked weights of {key} moved"


def test_original_does_not_train(tiny_cache, tmp_path):
    assert make_setup(tiny_cache, tmp_path, "original").method.config.iterations == 0


def test_sa_ewc_is_zero_at_the_first_step_and_grows(tiny_cache, tmp_path):
    setup = make_setup(tiny_cache, tmp_path, "sa")
    assert setup.method.ewc(setup.model).item() == 0.0
    with torch.no_grad():
        for p in setup.model.parameters():
            p.add_(0.01)
    assert setup.method.ewc(setup.model).item() > 0


def test_sa_priors_and_fisher_are_cached_once(tiny_cache, tmp_path):
    first = make_setup(tiny_cache, tmp_path, "sa", forget_class=1)
    assert set(first.timings) == {"priors", "fisher"}
    files = cache_snapshot(tiny_cache)
    second = make_setup(tiny_cache, tmp_path, "sa", forget_class=2)  # Fisher does not depend on the class
    assert second.timings == first.timings
    assert cache_snapshot(tiny_cache) == files


def test_batched_fisher_equals_per_sample_brute_force():
    from bench.config import UNETS, DiffusionConfig
    from bench.diffusion import NoiseSchedule, squared_error

    torch.manual_seed(0)
    model = ConditionalUNet(UNETS["tiny"]).eval()
    schedule = NoiseSchedule(DiffusionConfig(timesteps=20))
    images, labels = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([0, 4, 9])
    steps = torch.tensor([0, 5, 11, 19])
    fisher = diagonal_fisher(model, schedule, images, labels, steps, 2.0, torch.Generator().manual_seed(7),
                             batch_size=2, timestep_chunk=3)
    noise = torch.randn((3, 4, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(3):  # one image at a time, plain autograd
        model.zero_grad()
        x_t = schedule.add_noise(images[i].expand(4, 1, 8, 8), noise[i], steps)
        squared_error(noise[i], model(x_t, steps, labels[i].expand(4))).sum().backward()
        for name, p in model.named_parameters():
            expected[name] += (2.0 * p.grad) ** 2 / 3
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], rtol=2e-3, atol=1e-6)


def test_salun_mask_keeps_exactly_the_requested_fraction():
    scores = {"a": torch.rand(10, 7), "b": torch.rand(33), "c": torch.rand(2, 2, 3)}
    total = sum(s.numel() for s in scores.values())
    for keep in (0.5, 0.1, 0.73):
        masks = top_fraction_mask(scores, keep)
        assert sum(int(m.sum()) for m in masks.values()) == int(keep * total)
        kept = torch.cat([s[m] for s, m in zip(scores.values(), masks.values())])
        dropped = torch.cat([s[~m] for s, m in zip(scores.values(), masks.values())])
        assert kept.min() >= dropped.max()


def test_salun_mask_is_cached_per_class(tiny_cache, tmp_path):
    setup = make_setup(tiny_cache, tmp_path, "salun", forget_class=5, sparsity=0.5)
    assert "mask" in setup.timings
    files = cache_snapshot(tiny_cache)
    again = make_setup(tiny_cache, tmp_path, "salun", forget_class=5, sparsity=0.5)
    assert cache_snapshot(tiny_cache) == files, "the mask was computed again"
    for name, mask in setup.method.grad_mask().items():
        assert torch.equal(mask.cpu(), again.method.grad_mask()[name].cpu())


def test_pseudo_classes():
    assert pseudo_labels(3, 4, 10, "next", None, "cpu").tolist() == [4] * 4
    assert pseudo_labels(9, 2, 10, "next", None, "cpu").tolist() == [0, 0]
    drawn = pseudo_labels(3, 500, 10, "random", torch.Generator().manual_seed(0), "cpu")
    assert 3 not in drawn.tolist() and set(drawn.tolist()) == set(range(10)) - {3}


def test_set_parses_to_declared_types_and_sweeps():
    sweep = parse_sets(["safemax.lam=0,1,50,100", "safemax.target=iid"], ["safemax"])
    variants = sweep.method_variants("safemax")
    assert len(variants) == 4
    assert {dict(v)["lam"] for v in variants} == {0.0, 1.0, 50.0, 100.0}
    assert all(isinstance(dict(v)["lam"], float) for v in variants)


@pytest.mark.parametrize("item, message", [
    ("safemax.nope=1", "valid: "),
    ("safemax.lam=abc", "cannot read 'abc' as float"),
    ("salun.iterations=2", "not one of the methods being run"),
    ("safemax.target=../../etc", "cannot read"),
    ("safemax.target=bogus", "safemax.target must be one of chain, iid, zero"),
    ("safemax.lam", "use method.field=value"),
])
def test_set_errors_name_the_problem(item, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_sets([item], ["safemax"])


def test_sweep_values_give_distinct_record_paths(tmp_path):
    from bench.config import get_preset
    from bench.sweep import build_specs

    sweep = parse_sets(["safemax.lam=0,1,50"], ["safemax", "original"])
    specs = build_specs(get_preset("tiny"), ["safemax", "original"], [0], [0], sweep, results=str(tmp_path))
    paths = [s.directory for s in specs]
    assert len(specs) == 4 and len(set(paths)) == 4
    assert all(tmp_path in p.parents for p in paths)
    assert {s.variant for s in specs} == {"lam=0.0", "lam=1.0", "lam=50.0", "default"}


def test_scaled_presets_record_what_they_scaled():
    _, config, scaled = resolve_method_config(get_preset("digits"), "sa")
    assert scaled["iterations"]["paper"] == 20_000 and config.iterations == scaled["iterations"]["preset"]
    assert config.ema_decay ** config.iterations == pytest.approx(0.9999 ** 20_000, rel=1e-2)
    _, paper_config, paper_scaled = resolve_method_config(get_preset("cifar10"), "sa")
    assert paper_scaled == {} and paper_config.iterations == 20_000 and paper_config.lam == 10.0


def test_registry_lists_every_method_with_a_valid_serialisable_config():
    assert set(METHODS) >= {"original", "safemax", "sa", "salun", "retrain", "ga", "neggrad_plus"}
    for name, cls in METHODS.items():
        assert cls.name == name and cls.description
        config = cls.Config()
        assert isinstance(config, TrainConfig)
        json.dumps(dataclasses.asdict(config))  # every hyperparameter goes into the JSON record


# docs/bf16.md: the methods whose mean metrics bf16 autocast moved less than the seed-to-seed spread.
BF16_MEASURED = {"original", "safemax", "sa", "salun"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_default_speed_uses_bf16_on_cuda_only_for_methods_the_bf16_study_cleared(name):
    cls, cuda, cpu = get_method(name), torch.device("cuda"), torch.device("cpu")  # resolving needs no GPU
    assert cls.bf16_measured == (name in BF16_MEASURED)
    assert Speed().for_device(cuda, cls.bf16_measured).amp is (name in BF16_MEASURED)
    assert Speed().for_device(cpu, cls.bf16_measured).amp is False
    assert Speed(amp=True).for_device(cuda, cls.bf16_measured).amp is True  # asked for: always
    assert Speed(amp=False).for_device(cuda, cls.bf16_measured).amp is False
    resolved = Speed().for_device(cuda, cls.bf16_measured)
    assert resolved.for_device(cuda) == resolved  # resolving again (the sampler does) changes nothing


@pytest.mark.parametrize("item, message", [
    ("sa.lam=-1", "sa.lam must be >= 0"),
    ("sa.gamma=-0.5", "sa.gamma must be >= 0"),
    ("sa.prior_samples_per_class=0", "sa.prior_samples_per_class must be >= 1"),
    ("sa.fim_label_dropout=2", "sa.fim_label_dropout must be <= 1"),
    ("salun.alpha=-1", "salun.alpha must be >= 0"),
    ("salun.mask_batch_size=0", "salun.mask_batch_size must be >= 1"),
    ("ga.alpha=-1", "ga.alpha must be >= 0"),
    ("neggrad_plus.gamma=-0.1", "neggrad_plus.gamma must be >= 0"),
])
def test_method_fields_are_checked_before_any_work(item, message):
    """A negative weight (SA's EWC, a retain or forget weight) would turn the method into another one and still
    write a record."""
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        parse_sets([item], [item.split(".")[0]])
