"""bench's processes run with tcmalloc where it is installed (bench.allocator): the `bench` console script restarts
itself with it, the processes it starts for runs get it, other programs it starts do not, and BENCH_ALLOCATOR=system
keeps the C library's malloc. That the records are the same either way is tested where both run: the workers
(tcmalloc) against the debug jobs of this test process (the C library's), tests/test_workers.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import start_bench

from bench.allocator import allocator_library, malloc_of, preloading
from bench.cluster import make_executor, submit_all

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc: Linux only")

# A plug-in method module that writes down what the `bench` process importing it runs with.
PROBE = '''
import json
import os

from bench.allocator import malloc_of
from methods.safemax import SafeMax

with open(os.environ["PROBE_OUT"], "w") as out:
    json.dump({"pid": os.getpid(), "malloc": malloc_of("self"), "LD_PRELOAD": os.environ.get("LD_PRELOAD")}, out)


class Probe(SafeMax):
    name = "probe"
'''


@pytest.fixture
def library(monkeypatch) -> str:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("BENCH_ALLOCATOR", raising=False)
    found = allocator_library()
    assert found is not None and "tcmalloc" in found, "libtcmalloc-minimal4 missing? (make system-packages)"
    return found


def _malloc_of_running(pid: int) -> str:
    """malloc_of(pid), given the time a process just started needs to map its libraries."""
    deadline = time.monotonic() + 10
    while malloc_of(pid) != "tcmalloc" and time.monotonic() < deadline:
        time.sleep(0.05)
    return malloc_of(pid)


def test_preloading_reaches_what_starts_inside_and_only_that(library):
    with preloading(library):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert "LD_PRELOAD" not in os.environ
        assert _malloc_of_running(child.pid) == "tcmalloc"
    finally:
        child.kill()
        child.wait()


def test_bench_allocator_system_or_a_users_ld_preload_choose_no_preload_and_a_bad_value_is_named(library, monkeypatch):
    monkeypatch.setenv("BENCH_ALLOCATOR", "system")
    assert allocator_library() is None
    monkeypatch.setenv("BENCH_ALLOCATOR", "jemalloc")
    with pytest.raises(ValueError, match="BENCH_ALLOCATOR='jemalloc': choose tcmalloc"):
        allocator_library()
    monkeypatch.setenv("BENCH_ALLOCATOR", "tcmalloc")
    monkeypatch.setenv("LD_PRELOAD", "/opt/mine/libother.so")  # the user's own preload is left as it is
    assert allocator_library() is None


@pytest.mark.parametrize("choice, malloc", [(None, "tcmalloc"), ("system", "system")])
def test_the_bench_script_runs_with_tcmalloc_in_its_own_process_and_hands_no_preload_on(library, tmp_path, choice,
                                                                                         malloc):
    (tmp_path / "mallocprobe.py").write_text(PROBE)
    out = tmp_path / "probe.json"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), "PROBE_OUT": str(out),
           **({"BENCH_ALLOCATOR": choice} if choice else {})}
    process = start_bench("--method-module", "mallocprobe:Probe", "ls", env=env)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    # the same process (a restart keeps the pid a signal goes to), the malloc chosen, and programs it starts
    # (sbatch, a user's hook) get no LD_PRELOAD from it
    assert json.loads(out.read_text()) == {"pid": process.pid, "malloc": malloc, "LD_PRELOAD": None}


def test_the_bench_script_names_a_bad_bench_allocator_before_any_work(library):
    process = start_bench("ls", env={"BENCH_ALLOCATOR": "jemalloc"})
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert err.strip() == "bench: BENCH_ALLOCATOR='jemalloc': choose tcmalloc (the default) or system"


@pytest.mark.slow
def test_local_jobs_start_with_tcmalloc(library, tmp_path):
    jobs = submit_all(make_executor("local", tmp_path), malloc_of, ["self"])  # /proc/self: the job's own
    assert jobs[0].result() == "tcmalloc"
    assert "LD_PRELOAD" not in os.environ
