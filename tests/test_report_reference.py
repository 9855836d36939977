"""Reports and `bench compare` centred on what is in the results folder (issue 26 item 3): tables show the methods
and classes that have records unless asked for others, `--reference` picks the paired baseline, methods are named by
their class's `display_name` (plug-ins too), the missing-run commands carry `--method-module` and run as pasted, and
`bench compare --by variant` pairs a protocol variant with the default runs and says so.

Real commands on real records of the tiny preset (`bench run` in subprocesses).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from bench import records

TOY = '''
import torch
from dataclasses import dataclass

from bench.config import TrainConfig
from bench.diffusion import noise_loss
from methods.base import UnlearningMethod, register


@dataclass(frozen=True)
class ToyConfig(TrainConfig):
    weight: float = 1.0


@register
class Toy(UnlearningMethod):
    name = "toy"
    display_name = "ToyMax"
    Config = ToyConfig
    description = "toy: plain retain loss"

    def loss(self, model, batch):
        x_r, y_r = batch["retain"]
        return {"loss": noise_loss(model, self.ctx.schedule, x_r, y_r, self.ctx.noise_generator, 0.1).mean()}
'''


def _env(root: Path) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(root / "scratch"), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_cache, bench_cli):
    """original and safemax on classes 0-1, safemax with 3 sampler steps, and the plug-in `toy` on class 0 (its
    --method-module after the subcommand)."""
    root = tmp_path_factory.mktemp("reference")
    (root / "scratch" / "toyplug").mkdir(parents=True)
    (root / "scratch" / "toyplug" / "__init__.py").write_text("")
    (root / "scratch" / "toyplug" / "toy.py").write_text(TOY)
    results = root / "results"
    common = ("--preset", "tiny", "--cache", tiny_cache, "--results", str(results), "--device", "cpu", "--no-progress")
    for args in (("--methods", "original,safemax", "--classes", "0,1"),
                 ("--methods", "safemax", "--classes", "0,1", "--set", "protocol.sampler_steps=3"),
                 ("--method-module", "toyplug.toy:Toy", "--methods", "toy", "--classes", "0")):
        run = bench_cli("run", *args, *common, env=_env(root))
        assert run.returncode == 0, run.stdout + run.stderr
    return {"root": root, "results": results, "cache": tiny_cache}


def _report(bench_cli, folder, name: str, *args: str):
    out = folder["root"] / name
    result = bench_cli("report", "--results", str(folder["results"]), "--report-dir", str(out), "--no-figure1", *args,
                       env=_env(folder["root"]))
    return result, out / "tiny" / "paper" / "tables"


def _header(markdown: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith("| Class"))


@pytest.mark.slow
def test_tables_show_the_methods_and_classes_that_have_records(folder, bench_cli):
    result, tables = _report(bench_cli, folder, "plain")
    assert result.returncode == 0, result.stderr
    table1 = (tables / "table1.md").read_text()
    header = _header(table1)
    # the plug-in is named by its class's display_name; the paper's SA and SalUn get no empty columns
    assert "Original H" in header and "SAFEMax H" in header and "ToyMax H" in header
    assert "SA H" not in header and "SalUn" not in header and "| toy" not in header
    rows = [line.split("|")[1].strip() for line in table1.splitlines() if re.match(r"\| \d", line)]
    assert rows == ["0", "1"]  # not classes 2-9 of the preset
    assert list((tables.parent / "figures").glob("*.png")) and list((tables.parent / "figures").glob("*.pdf"))


@pytest.mark.slow
def test_missing_run_commands_carry_the_method_module_and_run_as_pasted(folder, bench_cli):
    result, tables = _report(bench_cli, folder, "commands", "--no-figures")
    assert result.returncode == 0, result.stderr
    script = (tables.parent / "missing_runs.sh").read_text()
    command = next(line for line in script.splitlines() if line.startswith("bench "))
    assert command.startswith("bench --method-module toyplug.toy:Toy run --preset tiny") and "--methods toy" in command
    assert "--classes 1 " in command
    pasted = bench_cli(*shlex.split(command)[1:], "--device", "cpu", "--no-progress", env=_env(folder["root"]))
    assert pasted.returncode == 0, pasted.stdout + pasted.stderr
    found, _ = records.read_all(folder["results"])
    assert ("toy", 1) in {(r["method"], r["forget_class"]) for r in found}


@pytest.mark.slow
def test_reference_picks_the_paired_baseline(folder, bench_cli):
    # --no-figures: the tables and the page, no figure (the other tests here draw them)
    result, tables = _report(bench_cli, folder, "default-ref", "--no-figures")
    assert result.returncode == 0, result.stderr
    assert (tables / "paired.md").read_text().startswith("**Differences to SAFEMax.**")
    assert not (tables.parent / "figures").exists() and not list(tables.parents[2].rglob("*.png"))
    assert "Figures not drawn (--no-figures)" in (tables.parents[2] / "report.html").read_text()
    result, tables = _report(bench_cli, folder, "original-ref", "--reference", "original", "--no-figures")
    assert result.returncode == 0, result.stderr
    paired = (tables / "paired.md").read_text()
    assert paired.startswith("**Differences to Original.**") and "| SAFEMax: all classes |" in paired
    # without SAFEMax in the report, the first method is the reference
    result, tables = _report(bench_cli, folder, "no-safemax", "--methods", "original,toy", "--no-figures")
    assert result.returncode == 0, result.stderr
    assert (tables / "paired.md").read_text().startswith("**Differences to Original.**")
    result, _ = _report(bench_cli, folder, "bad-ref", "--reference", "sa")
    assert result.returncode != 0 and "--reference sa: no record of that method" in result.stderr
    assert "choose from original, safemax, toy" in result.stderr and not (folder["root"] / "bad-ref").exists()


@pytest.mark.slow
def test_asked_for_methods_and_classes_get_columns_and_commands(folder, bench_cli):
    result, tables = _report(bench_cli, folder, "asked", "--methods", "original,safemax,sa", "--classes", "0-2")
    assert result.returncode == 0, result.stderr
    table1 = (tables / "table1.md").read_text()
    assert "SA H" in _header(table1) and "ToyMax" not in _header(table1)
    row2 = next(line for line in table1.splitlines() if line.startswith("| 2 |"))
    assert row2.count("missing [") == 6
    assert "bench run --preset tiny --protocol paper --methods sa --classes 0-2 --seeds 0" in table1


def test_compare_by_variant_pairs_a_protocol_variant_with_the_default_runs(folder, bench_cli):
    results = str(folder["results"])
    plain = bench_cli("compare", results, results)
    assert plain.returncode == 0 and "protocol.sampler_steps=3 →" not in plain.stdout
    paired = bench_cli("compare", results, results, "--by", "variant")
    assert paired.returncode == 0, paired.stderr
    text = paired.stdout
    assert ("paired by variant (matching preset, protocol, method, class, seed): A's 'default' with B's "
            "'protocol.sampler_steps=3': 2 row(s)") in text
    assert "SAFEMax (default → protocol.sampler_steps=3)" in text
    assert "with B's 'default'" not in text  # one folder: each pair once, the default runs as A
    assert "Original (" not in text  # original has no other variant to pair with
