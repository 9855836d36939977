"""The shared training loop: non-finite losses, gradient masks, EMA and periodic checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.runner import EMA, NonFiniteLoss, TrainSpec, memory_snapshot, reset_peak_memory, train

CPU = torch.device("cpu")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _regression_loss(model: nn.Module, nan_at: int | None = None):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn((16, 3), generator=gen), torch.randn((16, 1), generator=gen)

    def loss_fn(step: int) -> dict[str, torch.Tensor]:
        forget = (model(x) - y).square().mean()
        retain = model(x).abs().mean()
        if step == nan_at:
            forget = forget * math.nan
        return {"loss": forget + retain, "forget": forget, "retain": retain}

    return loss_fn


@pytest.mark.parametrize("check_every", [1, 25])
def test_nan_loss_raises_naming_the_step_and_the_terms(check_every):
    model = _model()
    spec = TrainSpec(iterations=6, lr=1e-2, check_every=check_every)
    with pytest.raises(NonFiniteLoss) as info:
        train(model, _regression_loss(model, nan_at=2), spec, CPU, progress=False)
    message = str(info.value)
    assert "step 2" in message
    for term in ("loss=nan", "forget=nan", "retain="):
        assert term in message


def test_no_checkpoint_is_saved_after_a_non_finite_loss():
    # A periodic checkpoint written after a NaN step would hold NaN weights, and pretraining resumes from it.
    model = _model()
    saved: list[tuple[int, bool]] = []

    def on_checkpoint(step: int, optimizer) -> None:
        saved.append((step, all(torch.isfinite(p).all() for p in model.parameters())))

    spec = TrainSpec(iterations=8, lr=1e-2, check_every=25, checkpoint_every=2)
    with pytest.raises(NonFiniteLoss):
        train(model, _regression_loss(model, nan_at=3), spec, CPU, on_checkpoint=on_checkpoint, progress=False)
    assert [step for step, finite in saved if not finite] == []


def test_zero_gradient_mask_freezes_that_parameter_while_others_move():
    model = _model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    mask = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    mask["0.weight"] = torch.zeros_like(mask["0.weight"])
    partial = torch.ones_like(mask["2.weight"])
    partial[0, :2] = 0
    mask["2.weight"] = partial
    train(model, _regression_loss(model), TrainSpec(iterations=5, lr=1e-1), CPU, grad_mask=mask, progress=False)
    after = dict(model.named_parameters())
    assert torch.equal(after["0.weight"], before["0.weight"])
    assert torch.equal(after["2.weight"][0, :2], before["2.weight"][0, :2])
    assert not torch.equal(after["2.weight"][0, 2:], before["2.weight"][0, 2:])
    for name in ("0.bias", "2.bias"):
        assert not torch.equal(after[name], before[name]), name


def test_ema_update_is_decay_times_shadow_plus_one_minus_decay_times_param():
    model = _model()
    ema = EMA(model, decay=0.9)
    shadow = {name: value.clone() for name, value in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ema.state_dict()[name], 0.9 * shadow[name] + 0.1 * param.detach())


def test_training_updates_the_ema_once_per_step():
    model = _model()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    ema = EMA(model, decay=0.75)
    train(model, _regression_loss(model), TrainSpec(iterations=1, lr=1e-1), CPU, ema=ema, progress=False)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ema.state_dict()[name], 0.75 * initial[name] + 0.25 * param.detach())


def test_lr_warmdown_falls_linearly_over_the_final_fraction_and_survives_a_resume():
    spec = TrainSpec(iterations=10, lr=1e-2, lr_warmdown=0.5)
    assert [spec.lr_factor(step) for step in (0, 4, 5, 6, 9)] == pytest.approx([1.0, 1.0, 1.0, 0.8, 0.2])
    assert TrainSpec(iterations=10, lr=1e-2).lr_factor(9) == 1.0  # the reference: constant

    seen: dict[int, tuple[float, dict]] = {}

    def remember(step, optimizer):
        seen[step] = (optimizer.param_groups[0]["lr"], optimizer.state_dict())

    model = _model()
    spec = TrainSpec(iterations=10, lr=1e-2, lr_warmdown=0.5, checkpoint_every=8)
    train(model, _regression_loss(model), spec, CPU, on_checkpoint=remember, progress=False)
    assert seen[8][0] == pytest.approx(1e-2 * 0.6)  # step 7's rate and seen[10][0] == pytest.approx(1e-2 * 0.2)
    # Resumed from step 8 with the decayed rate in the optimizer state: the rate is still the step's, not decayed twice.
    resumed = {}
    train(model, _regression_loss(model), spec, CPU, start_step=8, optimizer_state=seen[8][1],
          on_checkpoint=lambda step, opt: resumed.setdefault(step, opt.param_groups[0]["lr"]), progress=False)
    assert resumed[10] == pytest.approx(1e-2 * 0.2)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_peak_process_memory_counts_from_the_reset_not_from_the_process_start():
    big = torch.ones(100_000_000)  # 400 MB
    before = memory_snapshot(CPU)["peak_process_mib"]
    del big
    reset_peak_memory(CPU)
    after = memory_snapshot(CPU)["peak_process_mib"]
    assert after < before - 300
