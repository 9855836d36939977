"""Threads per process follow what the machine can give: cores split between workers, fewer under load."""

from __future__ import annotations

import os

import pytest
import torch

from bench import device
from bench.device import choose_threads


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})


def _load(monkeypatch, one_minute: float, now: float | None = None) -> None:
    """A 1-minute load average and the runnable threads at this moment (default: the same)."""
    monkeypatch.setattr(os, "getloadavg", lambda: (one_minute, one_minute, one_minute))
    monkeypatch.setattr(device, "runnable_now", lambda: one_minute if now is None else now)


def test_an_idle_machine_splits_its_cores_between_the_workers(four_cores, monkeypatch):
    _load(monkeypatch, 0.1)
    assert choose_threads(1)[0] == 4
    assert choose_threads(2)[0] == 2
    assert choose_threads(8)[0] == 1


def test_a_busy_machine_gives_fewer_threads_and_says_why(four_cores, monkeypatch):
    _load(monkeypatch, 3.0)  # three other single-threaded programs running
    threads, why = choose_threads(1)
    assert threads == 1 and "busy" in why and "load 3.0" in why
    _load(monkeypatch, 1.0)
    assert choose_threads(1)[0] == 3
    assert choose_threads(2)[0] == 1  # 3 free cores between 2 workers


def test_omp_num_threads_wins(four_cores, monkeypatch):
    _load(monkeypatch, 7.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(1) == (3, "OMP_NUM_THREADS")


def test_work_that_has_just_ended_does_not_count(four_cores, monkeypatch):
    """The load average still holds the install or sweep that ended a moment ago; nothing runs now: all cores."""
    _load(monkeypatch, 3.0, now=0.0)
    threads, why = choose_threads(1)
    assert threads == 4 and "busy" not in why and "0 runnable now" in why
    _load(monkeypatch, 3.0, now=3.0)  # and work that goes on does count
    assert choose_threads(1)[0] == 1


def test_runnable_now_reads_this_machine():
    """On Linux, the runnable count of /proc/loadavg less the reader; None elsewhere."""
    now = device.runnable_now(samples=2, interval_s=0.0)
    if os.path.exists("/proc/loadavg"):
        assert now is not None and now >= 0
    else:
        assert now is None


# -- what records call this CPU -----------------------------------------------------------------------------------
EPYC = "AMD EPYC 9654 96-Core Processor"


def _cpuinfo(tmp_path, *models: str):
    path = tmp_path / "cpuinfo"
    path.write_text("".join(f"processor\t: {i}\nvendor_id\t: AuthenticAMD\nmodel name\t: {model}\nflags\t\t: fpu\n\n"
                            for i, model in enumerate(models)))
    return path


def test_a_cpu_device_is_named_by_its_model_and_threads(tmp_path, monkeypatch):
    """RTE on one CPU model does not compare with another's: the name that records and `bench perf` carry says which."""
    assert device.cpu_model(_cpuinfo(tmp_path, EPYC, EPYC)) == EPYC
    monkeypatch.setattr(device, "cpu_model", lambda: EPYC)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert device.device_name(torch.device("cpu")) == f"cpu ({EPYC}, 1 thread)"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert device.device_name(torch.device("cpu")) == f"cpu ({EPYC}, 8 threads)"


def test_a_cpuinfo_without_a_model_name_falls_back_to_what_the_system_says(tmp_path):
    """Linux on ARM has no 'model name' line: lscpu (or at least the architecture) names it, never ''."""
    bare = tmp_path / "arm-cpuinfo"
    bare.write_text("processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd4f\n\n")
    assert device.cpu_model(bare) and device.cpu_model(tmp_path / "missing")


def test_records_from_two_cpu_models_are_flagged_as_mixed_devices(tmp_path, monkeypatch):
    from reports.mixing import mixed_devices

    names = []
    for model in (EPYC, "Intel(R) Xeon(R) Platinum 8480+"):
        monkeypatch.setattr(device, "cpu_model", lambda model=model: model)
        names.append(device.device_name(torch.device("cpu")))
    runs = [{"preset": "digits", "protocol": {"name": "paper"}, "provenance": {"device": name}} for name in names]
    assert mixed_devices(runs) == {("digits", "paper"): {names[0]: 1, names[1]: 1}}


@pytest.mark.parametrize(("env", "given", "threads", "why"), [
    # a SLURM job: the CPUs it holds, also where only SLURM_CPUS_ON_NODE says so (no --cpus-per-task)
    ({"SUBMITIT_EXECUTOR": "slurm", "SLURM_CPUS_ON_NODE": "1"}, None, 1, "SLURM_CPUS_ON_NODE"),
    ({"SUBMITIT_EXECUTOR": "slurm", "SLURM_CPUS_PER_TASK": "1", "SLURM_CPUS_ON_NODE": "2"}, None, 1,
     "SLURM_CPUS_PER_TASK"),
    # a local job, also inside a SLURM allocation: the orchestrator's share
    ({"SUBMITIT_EXECUTOR": "local", "SLURM_CPUS_ON_NODE": "2"}, 1, 1, "the orchestrator's share"),
    ({"SUBMITIT_EXECUTOR": "slurm", "OMP_NUM_THREADS": "2", "SLURM_CPUS_ON_NODE": "1"}, None, 2, "OMP_NUM_THREADS"),
])
def test_a_job_takes_the_threads_it_was_given_and_says_so(monkeypatch, caplog, env, given, threads, why):
    from bench.orchestrate import _job_setup
    from bench.prerequisites import Prerequisites

    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what torch starts with on two cores
    try:
        with caplog.at_level("INFO", logger="bench.orchestrate"):
            _job_setup(given, Prerequisites("tiny", None))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert f"the tiny prerequisites: {threads} CPU thread(s) ({why}" in caplog.text


def test_a_worker_inside_a_slurm_allocation_keeps_its_share(monkeypatch):
    """Not a job of ours (a worker of `--workers`, or `bench run` itself, in an allocation): the allocation's CPU
    count is not its own, and taking it would oversubscribe the workers."""
    from bench.orchestrate import _job_setup
    from bench.prerequisites import Prerequisites

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "4")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the pool's share
    try:
        _job_setup(None, Prerequisites("tiny", None))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
