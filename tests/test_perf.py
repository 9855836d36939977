"""`bench perf` runs and reports every workload; the speed switches compute the same step as plain fp32."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from click.testing import CliRunner

from bench.cli import main
from bench.config import UNETS, get_preset
from bench.device import PLAIN, Speed
from bench.diffusion import NoiseSchedule, sample
from bench.perf import DEFAULT_METHODS, SAMPLER_IMAGE_STEPS, Bench, PerfOptions, first_step, prepared_for, relative_error
from bench.runner import EMA, train
from methods import METHODS

CPU = torch.device("cpu")
# Dropout off: its masks are drawn in memory order, so they differ between layouts (and dtypes) by design.
PRESET = dataclasses.replace(get_preset("tiny"), unet=dataclasses.replace(UNETS["tiny"], dropout=0.0))


@pytest.fixture(scope="module")
def bench() -> Bench:
    return Bench(PRESET, PerfOptions.for_preset("tiny"), CPU)


@pytest.fixture(scope="module")
def prepared(bench) -> dict:
    """Each method's real preparation (SA's priors and Fisher, SalUn's mask) on the random base model."""
    return {name: prepared_for(bench, name) for name in DEFAULT_METHODS}


@pytest.mark.slow
def test_perf_at_tiny_size_writes_a_row_per_method_variant_and_the_sampler(tmp_path):
    # Every method's step under `default` (what `bench run` uses) and the sampler under two variants: one row per
    # (workload, variant). Timing every step twice more (fp32) cost half of this test's minute and checked nothing more.
    result = CliRunner().invoke(main, ["perf", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path),
                                       "--sampler-variants", "fp32,default"])
    assert result.exit_code == 0, result.output
    (json_path,), (md_path,) = tmp_path.glob("*.json"), tmp_path.glob("*.md")
    report = json.loads(json_path.read_text())
    rows = {(row["workload"], row["variant"]): row for row in report["rows"]}
    trainable = [name for name, cls in METHODS.items() if cls.Config().iterations > 0]
    assert set(DEFAULT_METHODS) < set(trainable) and "erasediff" in trainable
    expected = [(f"{m} step", "default") for m in trainable] + [("sampler", "fp32"), ("sampler", "default")]
    assert set(expected) <= set(rows), sorted(rows)
    assert {"sa priors", "sa fisher", "salun mask", "sfron forget fisher"} <= {workload for workload, _ in rows}
    for key, row in rows.items():
        assert "error" not in row, (key, row)
        assert math.isfinite(row["value"]) and row["value"] > 0, (key, row)
    assert all(rows[(f"{m} step", "default")]["iterations"] == 5 for m in DEFAULT_METHODS)  # tiny: a smoke test
    # Every timed step, the sampler and the classifier report achieved FLOP/s against the measured peak
    assert report["peak"]["flops_per_s"] > 0 and "one CPU thread" in report["peak"]["measured_on"]
    for key in [*expected, ("classifier (UA, FD features)", "default")]:
        assert rows[key]["flops_per_s"] > 0 and rows[key]["peak_fraction"] > 0, (key, rows[key])
    table = md_path.read_text()
    assert "GFLOP/s" in table and "% of peak" in table
    assert report["torch"] in table and "cpu" in table and "random weights and random data" in table
    # retrain's runs use its pretraining recipe's batch (32 at tiny), not the common unlearning batch its row is timed at
    assert report["batch"]["runs_differ"] == {"retrain": 32} and "retrain's runs use 32" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(rows) + 1  # + the header
    assert table in result.output


def test_perf_rejects_an_unknown_variant_and_a_method_without_steps(tmp_path):
    for args, choices in ((["--variants", "turbo"], "fp32, default"), (["--methods", "original"], "safemax")):
        result = CliRunner().invoke(main, ["perf", "--preset", "tiny", "--out", str(tmp_path), *args])
        assert result.exit_code != 0 and choices in result.output, result.output
    assert not list(tmp_path.iterdir())
    # Fewer than 20 timed steps only at the tiny preset, whose table is a smoke test
    with pytest.raises(ValueError, match="at least 20 steps"):
        PerfOptions.for_preset("digits", iterations=5).check()
    assert PerfOptions.for_preset("digits").iterations == 20 and PerfOptions.for_preset("tiny").iterations == 5


def test_perf_times_the_sampler_at_the_batch_the_evaluation_samples_a_retained_class_in(monkeypatch):
    # A CPU's image-steps per second depend on the batch (at digits 32 images per call reach about half of 100's),
    # so the sampler row is timed at the calls the evaluation makes, over its steps
    from bench import evaluate

    preset = get_preset("digits")
    protocol = preset.protocol(None)
    calls = []
    monkeypatch.setattr(evaluate, "sample", lambda model, schedule, labels, shape, *, steps, **_: (
        calls.append((len(labels), steps)) or torch.zeros(len(labels), *shape)))
    sampler = evaluate.Sampler(torch.nn.Identity(), NoiseSchedule(preset.diffusion), protocol, preset, CPU, seed=0,
                               progress=False)
    sampler.class_samples(1, protocol.retain_samples_per_class)
    options = PerfOptions.for_preset("digits")
    assert calls == [(options.sample_batch, options.sample_steps)] == [(100, 20)]
    assert PerfOptions.for_preset("digits", sample_batch=7, sample_steps=3).sample_batch == 7
    # fashion's evaluation samples 500 images per call over 100 steps of a 7 M-parameter UNet: a few steps of that
    # batch give its rate, where the whole chain would keep a CPU busy for many minutes
    fashion = PerfOptions.for_preset("fashion")
    assert fashion.sample_batch == 500 and fashion.sample_steps * 500 <= SAMPLER_IMAGE_STEPS
    assert (PerfOptions.for_preset("tiny").sample_batch, PerfOptions.for_preset("tiny").sample_steps) == (32, 5)


def _assert_grads_close(grads, reference, rtol: float, floor: float) -> None:
    """Each gradient within `rtol` of its reference's norm, plus `floor` x the whole gradient's norm: some
    gradients are zero in exact arithmetic (an attention key's bias), and their rounding noise has no scale."""
    total = torch.cat([g.flatten() for g in reference.values()]).norm()
    for name, ref in reference.items():
        error = (grads[name] - ref).norm()
        assert error <= rtol * ref.norm() + floor * total, f"{name}: error {error:.3g}, norm {ref.norm():.3g}"


@pytest.mark.parametrize("name", DEFAULT_METHODS)
def test_channels_last_step_matches_the_plain_fp32_step(bench, prepared, name):
    ref_loss, ref_grads = first_step(bench, name, PLAIN, prepared[name])
    loss, grads = first_step(bench, name, Speed(amp=False, channels_last=True), prepared[name])
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    _assert_grads_close(grads, ref_grads, rtol=1e-4, floor=1e-5)


@pytest.mark.parametrize("name", DEFAULT_METHODS)
def test_bf16_channels_last_step_matches_the_plain_fp32_step_within_bf16_rounding(bench, prepared, name):
    # Measured on the tiny UNet: loss within 4e-4, whole gradient within 1.2-5.9% (SalUn's forget loss is a
    # difference of two predictions, so it loses the most), each tensor within 14% + 1e-4 of the total.
    ref_loss, ref_grads = first_step(bench, name, PLAIN, prepared[name])
    loss, grads = first_step(bench, name, Speed(amp=True, channels_last=True), prepared[name])
    assert loss != ref_loss, "autocast did not apply: the bf16 step computed exactly the fp32 loss"
    assert loss == pytest.approx(ref_loss, rel=2e-3)
    assert relative_error(grads, ref_grads) <= 0.1
    _assert_grads_close(grads, ref_grads, rtol=0.25, floor=1e-3)


def test_channels_last_training_keeps_masked_weights_and_a_foreach_ema(bench, prepared):
    model, method = bench.model(), bench.method("salun", prepared["salun"], iterations=2)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    ema, mask = EMA(model, 0.5), method.grad_mask()
    config = dataclasses.replace(method.config, lr=1e-2)
    train(model, method.batches(), method.update, config, CPU, speed=Speed(channels_last=True), ema=ema,
          grad_mask=mask, progress=False)
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for (name, param), shadow in zip(model.named_parameters(), ema.shadow):
        frozen = ~mask[name]
        assert torch.equal(param[frozen], before[name][frozen]), f"masked weights of {name} moved"
        assert shadow.stride() == param.stride(), f"EMA shadow of {name} is not in the parameter's layout"
    assert any(not torch.equal(p, before[k]) for k, p in model.named_parameters())


def test_sampler_speed_switches_draw_the_plain_samples(bench):
    labels = torch.arange(6) % 3

    def draw(speed, steps):
        model = bench.model().eval()
        return sample(model, bench.schedule, labels, (1, 8, 8), steps=steps, eta=1.0, guidance=2.0,
                      generator=torch.Generator().manual_seed(7), speed=speed)

    # Three steps amplify rounding (guidance triples it each step); a random-weight model's chain also saturates
    # the clamp, so bf16 is checked on one step (one guided prediction): measured 4.5e-4 apart at most. fp32
    # channels_last over three steps: measured 3.8e-4.
    torch.testing.assert_close(draw(Speed(amp=False, channels_last=True), 3), draw(None, 3), rtol=0, atol=1e-3)
    plain, bf16 = draw(None, 1), draw(Speed(amp=True), 1)
    assert not torch.equal(bf16, plain), "autocast did not apply to the sampler"
    torch.testing.assert_close(bf16, plain, rtol=0, atol=5e-3)
