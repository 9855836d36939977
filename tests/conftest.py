"""Shared fixtures for the fast CPU suite.

Every test runs on the CPU with one torch thread: the suite shares small machines with other jobs, and
oversubscribed intra-op threads made a tiny UNet step ~50x slower there. `tiny_cache` builds the `tiny`
preset's base model and classifier once per session so that end-to-end and CLI tests reuse them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED_KEYS = Path(__file__).parent / "data" / "sa-state-dict-keys.txt"


@pytest.fixture(autouse=True, scope="session")
def _isolated_default_cache(tmp_path_factory):
    """Point $BENCH_CACHE at a temporary folder so no test ever writes to the user's real cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BENCH_CACHE", str(tmp_path_factory.mktemp("default-bench-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> str:
    """A cache folder holding the `tiny` preset's base model and classifier, built once per session."""
    from bench.experiment import prepare_prerequisites

    root = tmp_path_factory.mktemp("tiny-cache")
    prepare_prerequisites("tiny", str(root), device="cpu", progress=False)
    return str(root)
