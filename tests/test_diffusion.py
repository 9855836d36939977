"""The noise schedule, the DDIM sampler and guidance, checked against closed forms computed here."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bench.config import PRESETS, UNETS, DiffusionConfig
from bench.device import PLAIN, Speed
from bench.diffusion import NoiseSchedule, guided_eps, sample
from bench.evaluate import Sampler
from bench.unet import NULL_CLASS, ConditionalUNet

T = 1000
# The reference schedule in closed form, independent of the code under test.
BETAS = np.linspace(1e-4, 0.02, T)
ABAR = np.cumprod(1.0 - BETAS)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule(DiffusionConfig())


def abar_of(t: torch.Tensor) -> torch.Tensor:
    """Closed-form abar_t with abar_{-1} = 1, broadcastable over (N, 1, 1, 1)."""
    padded = np.concatenate([[1.0], ABAR])
    return torch.tensor(padded[t.numpy() + 1], dtype=torch.float64).reshape(-1, 1, 1, 1)


def test_alphas_cumprod_is_cumulative_product_of_linear_betas(schedule):
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), ABAR, rtol=1e-12, atol=0)
    np.testing.assert_allclose(schedule.betas.numpy(), BETAS, rtol=1e-12, atol=0)


def test_abar_of_minus_one_is_one_and_steps_index_the_table(schedule):
    values = schedule.abar(torch.tensor([-1, 0, 500, T - 1]))
    assert values[0].item() == 1.0
    np.testing.assert_allclose(values[1:].numpy(), ABAR[[0, 500, T - 1]], rtol=1e-12)


def test_add_noise_matches_closed_form(schedule):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand((4, 1, 3, 3), generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn((4, 1, 3, 3), generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, T - 1])
    expected = abar_of(t).sqrt() * x0 + (1 - abar_of(t)).sqrt() * noise
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t_start", [0, 900, 980, 995])
def test_continued_chain_noise_has_unit_variance_and_closed_form_correlation(schedule, t_start):
    # eps_T recovered after continuing the chain from x_t to T-1 must be N(0, 1) per pixel, with correlation
    # sqrt(abar_T (1 - abar_t) / (abar_t (1 - abar_T))) with the noise that built x_t.
    gen = torch.Generator().manual_seed(1)
    n = 40_000
    x0 = (torch.rand((1, 1, 2, 2), generator=gen) * 2 - 1).expand(n, 1, 2, 2)
    noise = torch.randn((n, 1, 2, 2), generator=gen)
    t = torch.full((n,), t_start)
    t_end = torch.full((n,), T - 1)
    x_t = schedule.add_noise(x0, noise, t)
    x_end = schedule.continue_chain(x_t, t, t_end, torch.randn((n, 1, 2, 2), generator=gen))
    eps_end = schedule.noise_from_x0(x_end, x0, t_end).double().flatten()
    flat_noise = noise.double().flatten()
    rho = np.sqrt(ABAR[T - 1] * (1 - ABAR[t_start]) / (ABAR[t_start] * (1 - ABAR[T - 1])))
    # 160,000 values: the standard error of each estimate is about 0.003.
    assert abs(eps_end.mean().item()) < 0.015
    assert abs(eps_end.var().item() - 1.0) < 0.02
    assert abs(torch.corrcoef(torch.stack([eps_end, flat_noise]))[0, 1].item() - rho) < 0.015


@pytest.mark.parametrize("batch", [16, 7])
def test_antithetic_timesteps_pair_t_with_T_minus_1_minus_t(schedule, batch):
    # As in the DDPM/DDIM code SA builds on: u = batch // 2 + 1 uniform steps, then T - 1 - u, cut to `batch`.
    gen = torch.Generator().manual_seed(2)
    t = schedule.sample_timesteps(batch, gen, "cpu")
    assert t.shape == (batch,) and t.dtype == torch.long
    assert int(t.min()) >= 0 and int(t.max()) <= T - 1
    first = batch // 2 + 1
    assert torch.equal(t[first:], T - 1 - t[: batch - first])


def test_sampler_steps_skip_evenly(schedule):
    assert schedule.sampler_steps(10) == list(range(0, 1000, 100))
    assert schedule.sampler_steps(T) == list(range(T))
    for bad in (0, T + 1):
        with pytest.raises(ValueError, match=str(bad)):
            schedule.sampler_steps(bad)


@pytest.mark.parametrize("t_now", [1, 10, 500, T - 1])
def test_eta_one_ddim_noise_equals_ddpm_posterior_variance(schedule, t_now):
    # With x_t = 0 and eps = 0 the update is c1 * noise, so noise = 1 exposes c1.
    shape = (1, 1, 1, 1)
    zeros = torch.zeros(shape, dtype=torch.float64)
    t, t_prev = torch.tensor([t_now]), torch.tensor([t_now - 1])
    c1 = schedule.ddim_step(zeros, zeros, t, t_prev, 1.0, torch.ones(shape, dtype=torch.float64)).item()
    posterior = BETAS[t_now] * (1 - ABAR[t_now - 1]) / (1 - ABAR[t_now])
    assert c1**2 == pytest.approx(posterior, rel=1e-9)


def _oracle(x0: torch.Tensor):
    """An eps model that knows the clean image: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""

    def model(x, t, labels):
        abar = abar_of(t.cpu()).float()
        clean = x0.repeat(len(x) // len(x0), 1, 1, 1)  # guidance doubles the batch
        return (x - abar.sqrt() * clean) / (1 - abar).sqrt()

    return model


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_sampler_with_oracle_eps_returns_the_clean_image(schedule, eta, guidance):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand((6, 1, 4, 4), generator=gen) * 1.6 - 0.8
    labels = torch.arange(6) % 3
    out = sample(_oracle(x0), schedule, labels, (1, 4, 4), steps=10, eta=eta, guidance=guidance,
                 generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


class _Recorder:
    """A deterministic eps model that depends on the label and remembers every call's batch size."""

    def __init__(self):
        self.batch_sizes: list[int] = []

    def __call__(self, x, t, labels):
        self.batch_sizes.append(len(x))
        return x * (labels.float() + 3.0)[:, None, None, None] + t.float()[:, None, None, None] / 1000


def test_guided_eps_is_weighted_difference_from_one_doubled_batch():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((4, 1, 3, 3), generator=gen)
    t = torch.tensor([5, 50, 500, 999])
    labels = torch.tensor([0, 1, 2, 3])
    w = 1.5
    reference = _Recorder()
    cond = reference(x, t, labels)
    uncond = reference(x, t, torch.full_like(labels, NULL_CLASS))
    model = _Recorder()
    guided = guided_eps(model, x, t, labels, w)
    torch.testing.assert_close(guided, (1 + w) * cond - w * uncond)
    assert model.batch_sizes == [2 * len(x)]


def test_guidance_zero_returns_the_conditional_prediction():
    x = torch.randn((3, 1, 2, 2), generator=torch.Generator().manual_seed(6))
    t, labels = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    model = _Recorder()
    torch.testing.assert_close(guided_eps(model, x, t, labels, 0.0), _Recorder()(x, t, labels))


@pytest.fixture(scope="module")
def tiny_unet() -> ConditionalUNet:
    torch.manual_seed(0)
    return ConditionalUNet(UNETS["tiny"]).eval()


def _draw(model, schedule, seed: int) -> torch.Tensor:
    labels = torch.tensor([0, 1, 2])
    return sample(model, schedule, labels, (1, 8, 8), steps=3, eta=1.0, guidance=2.0,
                  generator=torch.Generator().manual_seed(seed))


def test_sampler_is_deterministic_given_the_generator_seed(tiny_unet, schedule):
    first, again, other = _draw(tiny_unet, schedule, 7), _draw(tiny_unet, schedule, 7), _draw(tiny_unet, schedule, 8)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_cached_samples_are_reused_only_for_the_same_numerics(tiny_unet, schedule, tmp_path):
    """Samples drawn in fp32 are not handed to a run that asked for bf16 autocast (the bf16 study's arms)."""
    preset = PRESETS["tiny"]
    protocol = dataclasses.replace(preset.protocol(None), sampler_steps=3)

    def draw(speed):
        return Sampler(tiny_unet, schedule, protocol, preset, torch.device("cpu"), seed=0, cache_dir=tmp_path,
                       progress=False, speed=speed).class_samples(1, 4)

    fp32 = draw(PLAIN)
    assert len(list(tmp_path.rglob("class1-n4.pt"))) == 1
    bf16 = draw(Speed(amp=True))
    assert len(list(tmp_path.rglob("class1-n4.pt"))) == 2, "bf16 reused the fp32 samples"
    assert not torch.equal(fp32, bf16)
    assert torch.equal(draw(Speed(amp=False)), fp32)  # same numerics: read back from the cache
