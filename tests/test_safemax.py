"""SAFEMax: the psi weight, the forget/retain loss on a tiny model, and the three eps_T targets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bench.config import UNETS, DiffusionConfig, get_preset
from bench.data import DIGIT_CLASSES, ClassDataset
from bench.diffusion import NoiseSchedule
from bench.unet import ConditionalUNet
from methods import Context
from methods.safemax import SafeMax, SafeMaxConfig, psi

T = 1000
ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))
FORGET_CLASS = 3


def _context(seed: int = 0) -> Context:
    gen = torch.Generator().manual_seed(123)
    labels = torch.arange(40) % 10
    data = ClassDataset(torch.rand((40, 1, 8, 8), generator=gen) * 2 - 1, labels, DIGIT_CLASSES, "synthetic")
    return Context(
        preset=get_preset("tiny"), forget_class=FORGET_CLASS, seed=seed, schedule=NoiseSchedule(DiffusionConfig()),
        train_data=data, device=torch.device("cpu"), noise_generator=torch.Generator().manual_seed(seed),
        data_generator=torch.Generator().manual_seed(seed), base_weights={}, base_ema={},
    )


def _method(seed: int = 0, **overrides) -> SafeMax:
    return SafeMax(SafeMaxConfig(**overrides), _context(seed))


def test_psi_is_exp_minus_lambda_t_over_T():
    t = torch.tensor([0, 1, 250, 500, 999])
    torch.testing.assert_close(psi(t, 2.5, T), torch.exp(-2.5 * t.double() / T).float())
    assert torch.equal(psi(t, 0.0, T), torch.ones(5))


class _Capture(torch.nn.Module):
    """Wraps a model and keeps every (x, t, labels, output) it was called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, labels):
        out = self.model(x, t, labels)
        self.calls.append((x.detach(), t.detach(), labels.detach(), out.detach()))
        return out


def test_loss_is_psi_weighted_forget_term_plus_plain_retain_term():
    torch.manual_seed(0)
    model = _Capture(ConditionalUNet(dataclasses.replace(UNETS["tiny"], dropout=0.0)))
    lam = 3.0
    method = _method(seed=5, lam=lam, target="zero")
    gen = torch.Generator().manual_seed(6)
    x_forget = torch.rand((4, 1, 8, 8), generator=gen) * 2 - 1
    x_retain = torch.rand((5, 1, 8, 8), generator=gen) * 2 - 1
    y_retain = torch.tensor([0, 1, 2, 4, 5])
    terms = method.loss(model, {"forget": (x_forget, torch.full((4,), FORGET_CLASS)), "retain": (x_retain, y_retain)})

    x_t, t, labels, eps = (torch.cat(parts) for parts in zip(*model.calls, strict=True))
    assert len(x_t) == 9
    xt_r, t_f, t_r, eps_f, eps_r = x_t[4:], t[:4], t[4:], eps[:4], eps[4:]
    assert torch.equal(labels[:4], torch.full((4,), FORGET_CLASS))  # no label dropout on the forget term
    # The retain target is the noise that built x_t, recovered in closed form.
    abar_r = torch.tensor(ABAR[t_r.numpy()], dtype=torch.float32).reshape(-1, 1, 1, 1)
    noise_r = (xt_r - abar_r.sqrt() * x_retain) / (1 - abar_r).sqrt()
    weight = torch.exp(-lam * t_f.double() / T).float()
    forget = (weight * eps_f.square().flatten(1).sum(1)).mean()  # target "zero"
    retain = (noise_r - eps_r).square().flatten(1).sum(1).mean()
    torch.testing.assert_close(terms["forget"].detach(), forget, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["retain"].detach(), retain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(terms["loss"].detach(), forget + retain, rtol=1e-4, atol=1e-4)
    assert terms["loss"].requires_grad


def test_loss_is_reproducible_for_fixed_generator_seeds():
    torch.manual_seed(0)
    model = ConditionalUNet(dataclasses.replace(UNETS["tiny"], dropout=0.0))
    gen = torch.Generator().manual_seed(7)
    batch = {"forget": (torch.rand((3, 1, 8, 8), generator=gen), torch.full((3,), FORGET_CLASS)),
             "retain": (torch.rand((3, 1, 8, 8), generator=gen), torch.tensor([0, 1, 2]))}
    first = _method(seed=1).loss(model, batch)["loss"].item()
    assert _method(seed=1).loss(model, batch)["loss"].item() == first
    assert _method(seed=2).loss(model, batch)["loss"].item() != first


def _noised(n: int, t_value: int, seed: int, x0_value: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.full((n, 1, 2, 2), x0_value)
    noise = torch.randn((n, 1, 2, 2), generator=gen)
    t = torch.full((n,), t_value)
    abar = torch.tensor(ABAR[t_value], dtype=torch.float32)
    return x0, noise, t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def test_zero_target_is_zeros():
    x0, _, t, x_t = _noised(8, 500, 0)
    target = _method(target="zero").target(x0, x_t, t)
    assert target.shape == x0.shape and torch.equal(target, torch.zeros_like(x0))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.double().flatten(), b.double().flatten()]))[0, 1].item()


def test_iid_target_is_unit_noise_independent_of_x_t():
    x0, noise, t, x_t = _noised(20_000, 990, 1)
    target = _method(seed=3, target="iid").target(x0, x_t, t)
    assert abs(target.var().item() - 1) < 0.03
    assert abs(_corr(target, noise)) < 0.015
    # The same generator state gives the same target whatever x_t is: it does not look at x_t.
    other = _method(seed=3, target="iid").target(x0, torch.zeros_like(x_t), t)
    assert torch.equal(target, other)


@pytest.mark.parametrize("t_value", [500, 990])
def test_chain_target_follows_the_closed_form(t_value):
    # eps_T = (sqrt(abar_T/abar_t) sqrt(1-abar_t) eps + sqrt(1 - abar_T/abar_t) z) / sqrt(1 - abar_T): x0 cancels,
    # the variance is 1 and the correlation with x_t's noise eps is sqrt(abar_T (1-abar_t) / (abar_t (1-abar_T))).
    x0, noise, t, x_t = _noised(20_000, t_value, 2)
    target = _method(seed=4, target="chain").target(x0, x_t, t)
    rho = np.sqrt(ABAR[T - 1] * (1 - ABAR[t_value]) / (ABAR[t_value] * (1 - ABAR[T - 1])))
    assert abs(target.var().item() - 1) < 0.03
    assert abs(_corr(target, noise) - rho) < 0.015
    x0_other, _, _, x_t_other = _noised(20_000, t_value, 2, x0_value=-0.7)  # same noise, another image
    torch.testing.assert_close(_method(seed=4, target="chain").target(x0_other, x_t_other, t), target,
                               rtol=0, atol=2e-3)


def test_invalid_target_raises_naming_the_choices():
    with pytest.raises(ValueError) as info:
        SafeMaxConfig(target="final")
    assert "final" in str(info.value)
    for choice in ("chain", "iid", "zero"):
        assert choice in str(info.value)


def test_negative_lambda_raises():
    with pytest.raises(ValueError, match="lam"):
        SafeMaxConfig(lam=-1.0)
    assert SafeMaxConfig(lam=0.0).lam == 0.0
