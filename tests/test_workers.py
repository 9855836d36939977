"""`bench run --workers N`: runs in N local processes, the same records as one at a time, and no process left
behind when the orchestrator is killed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import process_alive

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_workers_give_the_same_records_as_debug_jobs(debug_sweep, tiny_cache, tiny_sweep, tmp_path, bench_cli,
                                                    sweep_records):
    shown = [arg for arg in tiny_sweep if arg != "--no-progress"]  # the sweep's bar too (records are the same)
    # On a machine showing GPUs 5 and 7 (none is there: the runs are on the CPU), each worker takes one of its own:
    # workers that all saw both would all have run on the first.
    # TQDM_MININTERVAL=0: the bar's line in this log at every change, not every 30 s
    result = bench_cli("run", *shown, "--cache", tiny_cache, "--out", str(tmp_path), "--workers", "2",
                       env={"CUDA_VISIBLE_DEVICES": "5,7", "TQDM_MININTERVAL": "0"})
    assert result.returncode == 0, result.stderr
    assert "in 2 worker processes" in result.stderr and "GPUs 5, 7, one per worker" in result.stderr
    assert sorted(re.findall(r"worker \d+: GPU (\d) \(CUDA_VISIBLE_DEVICES\)", result.stderr)) == ["5", "7"]
    # the workers allocate with tcmalloc (make installs libtcmalloc-minimal4), the debug jobs with the C library's:
    # the same records
    assert "worker malloc: tcmalloc" in result.stderr, "libtcmalloc-minimal4 missing? (make system-packages)"
    assert sweep_records(tmp_path) == sweep_records(debug_sweep)
    assert "interrupted" not in result.stderr  # every worker sweep said "interrupted: 4 of 4 finished"
    # 4 runs on 2 workers: after each of the first two ends, the freed worker already holds the next run
    bars = re.findall(r"^\d\d:\d\d:\d\d sweep: .*\| (\d)/4 \[[^\]]*running=(\d)", result.stderr, re.MULTILINE)
    assert "\r" not in result.stderr and sorted(n for n, _ in bars) == ["1", "2", "3", "4"], result.stderr
    assert [running for n, running in bars if n in "12"] and all(running == "2" for n, running in bars if n in "12"), \
        bars


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc (Linux only)")
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.slow
def test_killing_the_orchestrator_stops_its_workers(tiny_cache, tmp_path, how):
    """A SIGTERM, a SIGKILL (or a lost session) to `bench run --workers` must not leave runs going on in the
    background, nor the fork server the workers came from."""
    command = [sys.executable, "-m", "bench.cli", "run", "--preset", "tiny", "--methods", "sa", "--classes", "0-9",
               "--set", "sa.iterations=100000", "--workers", "2", "--no-progress", "--cache", tiny_cache,
               "--out", str(tmp_path)]
    workers: list[int] = []
    servers: list[int] = []
    parent = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(workers) < 2:
            time.sleep(0.5)
            servers = [pid for pid in _children(parent.pid) if "forkserver" in _cmdline(pid)]
            workers = [pid for server in servers for pid in _children(server)]
        assert len(workers) == 2, "the worker processes never started"
        time.sleep(3)  # let them start their runs
        parent.send_signal(how)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(process_alive(pid) for pid in [*workers, *servers]):
            time.sleep(0.5)
        assert not any(process_alive(pid) for pid in workers), "workers outlived the orchestrator"
        assert not any(process_alive(pid) for pid in servers), "the fork server outlived the orchestrator"
        assert not list(tmp_path.rglob("record.json"))  # and nothing half-done was recorded
    finally:
        for pid in [parent.pid, *_children(parent.pid), *servers, *workers]:  # whatever the outcome
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
