"""Metric arithmetic a user compares across machines and executors."""

from __future__ import annotations

import torch
from threadpoolctl import threadpool_limits

from bench.metrics import feature_statistics, fid


def test_fid_does_not_depend_on_how_many_blas_threads_the_process_has():
    # A sweep's records must be the same whether a run went to a worker, a SLURM job or the parent process,
    # and those differ in BLAS threads; from 256-d features on, OpenBLAS's result depends on the thread count.
    generator = torch.Generator().manual_seed(0)
    generated = torch.randn(90, 256, generator=generator) * 1.3 + 0.1
    real = torch.randn(500, 256, generator=generator)
    values = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            values.append((fid(generated, real), fid(generated, feature_statistics(real))))
    assert values[0] == values[1]
    assert values[0][0] == values[0][1]  # cached statistics give the same number as the features
    assert values[0][0] > 10
