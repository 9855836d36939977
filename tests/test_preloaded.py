"""A `bench` command forked from the preloaded server (tests/preloaded.py) behaves as one started in a fresh
interpreter: the same output, exit status, working directory, PYTHONPATH and environment."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PLUGIN = textwrap.dedent('''
    import os, sys
    print("cwd", os.getcwd(), "marker", os.environ.get("PRELOADED_MARKER"), "argv0", sys.argv[0])
    from methods.safemax import SafeMax

    class Echo(SafeMax):
        name = "echo"
''')


def _fresh(args, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, cwd=cwd)


@pytest.mark.parametrize("args", [
    ("--method-module", "echoplug:Echo", "ls"),                     # a plug-in from PYTHONPATH, printing at import
    ("--method-module", "echoplug:Nope", "run", "--dry-run"),       # an error: its exit status and message
])
@pytest.mark.slow
def test_a_forked_command_equals_a_fresh_interpreter(tmp_path, args, bench_cli):
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "echoplug.py").write_text(PLUGIN)
    env = {"PYTHONPATH": str(tmp_path / "plug"), "PRELOADED_MARKER": "m1"}
    forked, fresh = bench_cli(*args, env=env, cwd=REPO), _fresh(args, env, REPO)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert "marker m1" in fresh.stdout and (fresh.returncode == 0) == ("Echo" in args[1])


def test_a_command_in_another_checkout_imports_that_checkouts_code(tmp_path, bench_cli):
    copy = tmp_path / "checkout"
    (copy / "bench").mkdir(parents=True)
    (copy / "bench" / "__init__.py").write_text("")
    (copy / "bench" / "cli.py").write_text("import sys\nprint('other checkout', sys.argv[1:])\nsys.exit(7)\n")
    forked = bench_cli("ls", "x", cwd=copy)
    assert (forked.returncode, forked.stdout) == (7, "other checkout ['ls', 'x']\n")


def test_a_variable_read_at_start_up_gets_a_fresh_interpreter(tmp_path, bench_cli):
    copy = tmp_path / "checkout"
    (copy / "bench").mkdir(parents=True)
    (copy / "bench" / "__init__.py").write_text("")
    (copy / "bench" / "cli.py").write_text("import sys\nprint(sys.flags.hash_randomization)\n")
    assert bench_cli(cwd=copy).stdout == "1\n"                                   # forked from the server
    assert bench_cli(env={"PYTHONHASHSEED": "0"}, cwd=copy).stdout == "0\n"      # a fresh interpreter read it
