"""`make gpu-check` is one prepared script for a GPU visit of a few minutes: it must not be the first to find that
it no longer runs. Its correctness half runs here on the CPU at the tiny preset; its timing half is `bench perf`
(tests/test_perf.py)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from bench.perf import DEFAULT_METHODS

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


@pytest.mark.slow
def test_the_gpu_checks_run_and_pass_on_the_cpu_at_the_tiny_preset():
    gpu_check = runpy.run_path(str(SCRIPT))  # its globals; `main` does not run
    checks = gpu_check["correctness"]("tiny", torch.device("cpu"), compile_sampler=False)
    expected = {f"{name} step, {label}" for name in DEFAULT_METHODS for label in gpu_check["STEP_SPEEDS"]}
    # On the CPU the CUDA-graph variants are skipped and the sampler is checked under bf16 alone
    assert sorted(c["check"] for c in checks) == sorted(expected | {"sampler eps, bf16"})
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
