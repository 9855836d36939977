"""Shared fixtures for the fast CPU suite.

Every test runs on the CPU with one torch thread: the suite shares small machines with other jobs, and
oversubscribed intra-op threads made a tiny UNet step ~50x slower there. `tiny_cache` builds the `tiny`
preset's base model and classifier once per session so that end-to-end and CLI tests reuse them;
`debug_sweep` runs the tiny sweep once through `--cluster debug`, the reference the other executors must match.
Subprocesses (`bench_cli`) and the jobs they start get OMP_NUM_THREADS=1 for the same reason; `bench_cli`'s
processes are forked from a server that has torch imported (tests/preloaded.py, and why it is faithful there).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
from pathlib import Path

import preloaded
import pytest
import torch

torch.set_num_threads(1)
# Commands invoked in this process (click's CliRunner) choose their threads from this, as subprocesses do.
os.environ["OMP_NUM_THREADS"] = "1"

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
    from bench.prerequisites import Prerequisites, build

    root = tmp_path_factory.mktemp("tiny-cache")
    build(Prerequisites("tiny", str(root), device="cpu", progress=False))
    return str(root)


# The tiny sweep every executor runs: 2 methods x 2 forget classes on the tiny preset.
TINY_SWEEP = ("--preset", "tiny", "--methods", "original,safemax", "--classes", "0,1", "--no-progress")
REPO = Path(__file__).resolve().parent.parent


def run_bench(*args: str, env: dict | None = None, timeout_s: float = 300,
              cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """`python -m bench.cli ARGS` in a process of its own, one torch thread in it and in its jobs; forked from a
    server that has torch imported (tests/preloaded.py), which saves ~3 CPU-s per command."""
    global _server
    if _server is None:
        _server = preloaded.Server()
        atexit.register(_server.close)
    return _server.run([str(a) for a in args], {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                       cwd or REPO, timeout_s)


_server: preloaded.Server | None = None


# The `bench` console script, as users start it. Tests that check the exit status after a signal start this, not
# `python -m bench.cli`: under -m, CPython 3.11 exits by SIGINT (returncode -2) whenever a Ctrl-C once landed inside
# exec()'d code (a dataclass being built during an import), even after the program handled it and called exit(130).
BENCH_SCRIPT = Path(sys.executable).with_name("bench")


def _as_from_a_terminal() -> None:
    """Ctrl-C's default action, which a command started from a terminal has: a test runner started in the
    background passes on SIG_IGN, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_bench(*args, env: dict | None = None) -> subprocess.Popen:
    """`bench ARGS` in its own session (so a signal to its group reaches no one else), one torch thread, Ctrl-C
    handled as from a terminal; `env` added to this process's environment."""
    assert BENCH_SCRIPT.is_file(), f"no {BENCH_SCRIPT}: install the package into this Python (make install)"
    return subprocess.Popen([str(BENCH_SCRIPT), *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            start_new_session=True, preexec_fn=_as_from_a_terminal)


def read_sweep(out: str | Path) -> dict[tuple, dict]:
    """(method, variant, forget class, seed) -> metrics of every record under `out`; fails on a corrupt one."""
    from bench import records

    found, corrupt = records.read_all(out)
    assert not corrupt, corrupt
    return {(r["method"], r["variant"], r["forget_class"], r["seed"]): r["metrics"] for r in found}


@pytest.fixture(scope="session")
def bench_cli():
    return run_bench


@pytest.fixture(scope="session")
def tiny_sweep() -> tuple[str, ...]:
    return TINY_SWEEP


@pytest.fixture(scope="session")
def sweep_records():
    return read_sweep


@pytest.fixture(scope="session")
def debug_sweep(tmp_path_factory, tiny_cache) -> Path:
    """The tiny sweep run once through `bench run --cluster debug` (jobs in this process); its results folder."""
    from click.testing import CliRunner

    from bench.cli import main

    out = tmp_path_factory.mktemp("debug-sweep")
    result = CliRunner().invoke(main, ["run", *TINY_SWEEP, "--cache", tiny_cache, "--out", str(out),
                                       "--cluster", "debug"])
    assert result.exit_code == 0, result.output
    return out


# Files in the order `make test` hands them to its workers (--dist loadfile --no-loadscope-reorder): the longest
# first, measured (`--durations=0`, docs/benchmarks/README.md), then the rest, each a few seconds, fill in behind.
# xdist's own order (most tests first) left a long file for the end: one worker ran it ~25 s after the other had
# finished. A file missing here only runs later; the order changes no result.
LONGEST_FIRST = (
    "test_slurm_cluster.py", "test_cifar10_preset.py", "test_orchestrate.py", "test_faults.py",
    "test_budget_report.py", "test_report_reference.py", "test_extensions.py", "test_faults_orchestration.py",
    "test_workers.py", "test_reports.py", "test_fashion_data.py", "test_staleness.py", "test_cli_consistency.py",
    "test_classifier.py", "test_cluster_resources.py", "test_your_method_doc.py", "test_flops.py",
    "test_report_stats.py", "test_perf.py", "test_pinned_numerics.py",
)


def pytest_collection_modifyitems(config, items):
    """The longest files first (`LONGEST_FIRST`; a stable sort, so each file's tests keep their order). Tests marked
    `gpu` need CUDA: they run on a GPU machine and are skipped (with the reason) elsewhere."""
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); `make gpu-check` and these run on one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
