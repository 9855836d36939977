"""docs/your-method.md is followable: its files, written where their first line says, and its commands, run as a
reader runs them in a shell, make a plug-in method that runs on the tiny preset, passes its pinned-numerics test and
is read back through bench.api."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import records
from methods import ENTRY_POINT_GROUP

DOC = Path(__file__).resolve().parent.parent / "docs" / "your-method.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
COMMANDS = "# run these from the folder that holds mymethods/"


def blocks(kind: str | None = None) -> list[str]:
    return [text for info, text in FENCE.findall(DOC.read_text()) if kind is None or info == kind]


def files() -> dict[str, str]:
    """path -> text of every block whose first line is `# file: PATH`."""
    found = {}
    for text in blocks():
        first = text.splitlines()[0] if text.strip() else ""
        if first.startswith("# file: "):
            found[first.removeprefix("# file: ").strip()] = text
    return found


def test_every_python_block_compiles():
    for text in blocks("python"):
        compile(re.sub(r"^    ", "", text, flags=re.M) if text.startswith("    ") else text, str(DOC), "exec")


def test_the_entry_point_block_declares_the_class_the_commands_use():
    pyproject = files()["pyproject.toml"]  # (tomllib is Python 3.11+; the section is read as text)
    section = pyproject.split(f'[project.entry-points."{ENTRY_POINT_GROUP}"]\n')[1].split("\n[")[0]
    declared = dict(re.findall(r'^(\w+) = "([^"]+)"$', section, re.M))
    (commands,) = [text for text in blocks("bash") if text.startswith(COMMANDS)]
    used = set(re.findall(r"--method-module (\S+)", commands))
    assert used == {declared["quiet"]} == {"mymethods.quiet:Quiet"}


@pytest.mark.slow
def test_the_doc_runs_end_to_end(tmp_path, tiny_cache):
    for path, text in files().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    (commands,) = [text for text in blocks("bash") if text.startswith(COMMANDS)]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", BENCH_CACHE=tiny_cache,
               OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found, corrupt = records.read_all(tmp_path / "results")
    assert not corrupt and sorted(r["method"] for r in found) == ["quiet", "safemax"]
    quiet = next(r for r in found if r["method"] == "quiet")
    assert quiet["preset"] == "tiny" and 0 < quiet["method_report"]["moving_weights"] < 1
    assert "1 passed" in result.stdout  # the pinned-numerics test of the doc
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("record UA")]
    _, _, recorded, _, _, recomputed = line.split()
    assert float(recorded) == float(recomputed) == quiet["metrics"]["ua"]
