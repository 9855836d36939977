"""The CUDA paths, on a CUDA GPU only: CUDA-graph sampling, bf16 training steps and GPU memory accounting.

Skipped where no GPU is (CI); `make gpu-check` runs the same comparisons at cifar10 scale with timings.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.config import UNETS, get_preset
from bench.device import PLAIN, Speed, memory_snapshot, reset_peak_memory
from bench.diffusion import sample
from bench.perf import Bench, PerfOptions, first_step, prepared_for, relative_error

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
PRESET = dataclasses.replace(get_preset("tiny"), unet=dataclasses.replace(UNETS["tiny"], dropout=0.0))


@pytest.fixture(scope="module")
def bench() -> Bench:
    return Bench(PRESET, PerfOptions.for_preset("tiny", device="cuda"), CUDA)


def test_cuda_graph_sampler_draws_the_eager_samples(bench):
    labels = torch.arange(8, device=CUDA) % 3

    def draw(speed):
        return sample(bench.model().eval(), bench.schedule, labels, (1, 8, 8), steps=5, eta=1.0, guidance=2.0,
                      generator=torch.Generator(CUDA).manual_seed(7), speed=speed)

    graphed, eager = draw(Speed(amp=False, cuda_graphs=True)), draw(PLAIN)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["safemax", "sa", "salun"])
def test_bf16_step_matches_the_fp32_step_within_bf16_rounding(bench, name):
    prepared = prepared_for(bench, name)
    ref_loss, ref_grads = first_step(bench, name, PLAIN, prepared)
    loss, grads = first_step(bench, name, Speed(amp=True), prepared)
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    assert relative_error(grads, ref_grads) <= 0.1


def test_peak_gpu_memory_is_measured_from_the_reset():
    reset_peak_memory(CUDA)
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device=CUDA)  # 256 MiB
    peak = memory_snapshot(CUDA)["peak_gpu_allocated_gib"]
    del block
    assert 0.24 <= peak <= 1.0
