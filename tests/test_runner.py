"""The shared training loop: non-finite losses and weights, gradient masks, EMA, checkpoints and exact resume."""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.config import TrainConfig
from bench.device import memory_snapshot, reset_peak_memory
from bench.runner import EMA, NonFiniteLoss, NonFiniteWeights, Resume, default_update, train

CPU = torch.device("cpu")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.3), nn.Linear(4, 1))


def _batches(seed: int = 1):
    """Endless (x, y) batches drawn from a seeded generator, as methods draw theirs."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn((16, 3), generator=gen), torch.randn((16, 1), generator=gen)


def _loss(model: nn.Module, nan_at: int | None = None, calls: list | None = None):
    calls = [] if calls is None else calls

    def loss(batch) -> dict[str, torch.Tensor]:
        x, y = batch
        forget = (model(x) - y).square().mean()
        retain = model(x).abs().mean()
        if len(calls) == nan_at:
            forget = forget * math.nan
        calls.append(1)
        return {"loss": forget + retain, "forget": forget, "retain": retain}

    return default_update(loss)


def config(iterations: int, **values) -> TrainConfig:
    return TrainConfig(iterations=iterations, lr=values.pop("lr", 1e-2), hflip="none", **values)


@pytest.mark.parametrize("check_every", [1, 25])
def test_nan_loss_raises_naming_the_step_and_the_terms(check_every):
    model = _model()
    with pytest.raises(NonFiniteLoss) as info:
        train(model, _batches(), _loss(model, nan_at=2), config(6), CPU, check_every=check_every, progress=False)
    message = str(info.value)
    assert "step 2" in message
    for term in ("loss=nan", "forget=nan", "retain="):
        assert term in message


def test_no_checkpoint_is_saved_after_a_non_finite_loss(tmp_path):
    # A periodic checkpoint written after a NaN step would hold NaN weights, and a resumed run would go on from it.
    model = _model()
    path = tmp_path / "partial.pt"
    with pytest.raises(NonFiniteLoss):
        train(model, _batches(), _loss(model, nan_at=3), config(8), CPU, resume=Resume(path, 2), progress=False)
    state = torch.load(path, weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_divergence_on_the_last_step_fails_instead_of_returning_nan_weights():
    # The loss of the last step is finite; the update it causes is not (a huge learning rate), so only a check of
    # the weights after training catches it.
    model = _model()
    with pytest.raises(NonFiniteWeights, match="non-finite weights in"):
        train(model, _batches(), _loss(model), config(1, lr=1e38, grad_clip=None), CPU, progress=False)


def test_zero_gradient_mask_freezes_that_parameter_while_others_move():
    model = _model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    mask = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    mask["0.weight"] = torch.zeros_like(mask["0.weight"])
    partial = torch.ones_like(mask["3.weight"])
    partial[0, :2] = 0
    mask["3.weight"] = partial
    train(model, _batches(), _loss(model), config(5, lr=1e-1), CPU, grad_mask=mask, progress=False)
    after = dict(model.named_parameters())
    assert torch.equal(after["0.weight"], before["0.weight"])
    assert torch.equal(after["3.weight"][0, :2], before["3.weight"][0, :2])
    assert not torch.equal(after["3.weight"][0, 2:], before["3.weight"][0, 2:])
    for name in ("0.bias", "3.bias"):
        assert not torch.equal(after[name], before[name]), name


def test_gradient_norm_before_clipping_is_logged():
    model = _model()
    result = train(model, _batches(), _loss(model), config(3, grad_clip=1e-6), CPU, check_every=1, progress=False)
    assert all(row["grad_norm"] > 1e-3 for row in result.loss_history)  # far above the clip it was cut to


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
    train(model, _batches(), _loss(model), config(1, lr=1e-1), CPU, ema=ema, progress=False)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ema.state_dict()[name], 0.75 * initial[name] + 0.25 * param.detach())


def test_lr_warmdown_falls_linearly_over_the_final_fraction():
    spec = config(10, lr_warmdown=0.5)
    assert [spec.lr_factor(step) for step in (0, 4, 5, 6, 9)] == pytest.approx([1.0, 1.0, 1.0, 0.8, 0.2])
    assert config(10).lr_factor(9) == 1.0  # the reference: constant


def _run(tmp_path: Path, stop_at: int | None, iterations: int = 9, lr_warmdown: float = 0.5):
    """Train with dropout, a noise generator, an EMA and a warm-down; with `stop_at`, crash there and resume."""
    path = tmp_path / "partial.pt"

    def attempt(crash: int | None):
        torch.manual_seed(0)
        model = _model()
        ema = EMA(model, 0.8)
        noise = torch.Generator().manual_seed(5)

        def update(step, trainer, batch):
            if step == crash:
                raise KeyboardInterrupt  # a kill between two checkpoints
            x, y = batch
            x = x + torch.randn(x.shape, generator=noise)
            return trainer.update(lambda: {"loss": (model(x) - y).square().mean()})

        resume = Resume(path, 2, {"noise": noise})
        result = train(model, _batches(), update, config(iterations, lr_warmdown=lr_warmdown), CPU, ema=ema,
                       resume=resume, progress=False)
        return model, ema, result

    if stop_at is not None:
        with pytest.raises(KeyboardInterrupt):
            attempt(stop_at)
    return attempt(None)


def test_a_resumed_run_equals_the_uninterrupted_one_bit_for_bit(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    whole_model, whole_ema, whole = _run(tmp_path / "a", None)
    model, ema, resumed = _run(tmp_path / "b", stop_at=5)
    assert resumed.resumed_from == 4 and resumed.steps == whole.steps == 9
    for (name, a), b in zip(whole_model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(whole_ema.shadow, ema.shadow):
        assert torch.equal(a, b)
    assert resumed.loss_history[-1] == whole.loss_history[-1]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_peak_process_memory_counts_from_the_reset_not_from_the_process_start():
    # 400 MB mapped and touched here, not through malloc: freed memory that malloc kept from earlier tests in this
    # process can serve a tensor without raising the peak, and stays resident when the tensor is freed
    big = mmap.mmap(-1, 400 * 2**20)
    for offset in range(0, len(big), mmap.PAGESIZE):
        big[offset] = 1
    before = memory_snapshot(CPU)["peak_process_mib"]
    big.close()
    reset_peak_memory(CPU)
    after = memory_snapshot(CPU)["peak_process_mib"]
    assert after < before - 300
