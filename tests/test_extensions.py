"""A researcher's own method and preset, from a package outside this repository: found, run, reported.

The scratch package is real files on PYTHONPATH: a method module (`--method-module`), a preset YAML file
(`--preset-file`), and an installed-distribution layout (`*.dist-info/entry_points.txt`) that importlib finds the
way it finds a pip-installed plugin.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from bench import records

TOY = '''
"""A toy method: SAFEMax's idea with a plain L2 pull of the forget class's prediction to zero."""
from dataclasses import dataclass

import torch

from bench.config import TrainConfig
from bench.diffusion import noise_loss, noised
from methods.base import UnlearningMethod, register


@dataclass(frozen=True)
class ToyConfig(TrainConfig):
    weight: float = 1.0


@register
class Toy(UnlearningMethod):
    name = "toy"
    Config = ToyConfig
    description = "toy: forget-class prediction pulled to zero"

    def loss(self, model, batch):
        (x_f, _), (x_r, y_r) = batch["forget"], batch["retain"]
        t, _, x_t = noised(self.ctx.schedule, x_f, self.ctx.noise_generator)
        forget = model(x_t, t, torch.full_like(t, self.ctx.forget_class)).square().flatten(1).sum(1).mean()
        retain = noise_loss(model, self.ctx.schedule, x_r, y_r, self.ctx.noise_generator, 0.1).mean()
        return {"loss": self.config.weight * forget + retain, "forget": forget, "retain": retain}
'''

PRESET = '''
name: tiny-wide
base: tiny
description: the tiny preset with a wider UNet and 3 sampler steps
unet: {ch: 64}
pretrain: {iterations: 12}
protocols: {paper: {sampler_steps: 3}}
'''


@pytest.fixture
def scratch(tmp_path) -> Path:
    """A package `toyunlearn` outside the repository, with an entry-point declaration for `toy`."""
    package = tmp_path / "scratch" / "toyunlearn"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "toy.py").write_text(TOY)
    info = tmp_path / "scratch" / "toyunlearn-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyunlearn\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[unlearning_bench.methods]\ntoy = toyunlearn.toy:Toy\n")
    (tmp_path / "wide.yaml").write_text(PRESET)
    return tmp_path


def _env(scratch: Path) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(scratch / "scratch"), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_a_plugin_method_and_a_preset_file_run_in_workers_and_reach_the_report(scratch, bench_cli):
    results, cache = scratch / "results", scratch / "cache"
    common = ("--preset-file", str(scratch / "wide.yaml"))
    listed = bench_cli(*common, "ls", env=_env(scratch))
    assert listed.returncode == 0, listed.stderr
    assert "toy" in listed.stdout and "tiny-wide" in listed.stdout  # the entry point and the file
    run = bench_cli(*common, "run", "--preset", "tiny-wide", "--methods", "toy,original", "--classes", "0,1",
                    "--set", "toy.weight=0.5", "--results", str(results), "--cache", str(cache), "--workers", "2",
                    "--no-progress", env=_env(scratch), timeout_s=600)
    assert run.returncode == 0, run.stdout + run.stderr
    found, corrupt = records.read_all(results)
    assert not corrupt and sorted((r["method"], r["forget_class"]) for r in found) == [
        ("original", 0), ("original", 1), ("toy", 0), ("toy", 1)]
    toy = next(r for r in found if r["method"] == "toy")
    assert toy["preset"] == "tiny-wide" and toy["hyperparameters"]["weight"] == 0.5
    assert toy["protocol"]["sampler_steps"] == 3
    report = bench_cli(*common, "report", "--results", str(results), "--no-figure1", env=_env(scratch))
    assert report.returncode == 0, report.stderr
    page = (results / "report" / "report.html").read_text()
    assert "tiny-wide" in page and "toy" in page


def test_method_module_registers_a_class_by_its_import_path(scratch, bench_cli):
    described = bench_cli("--method-module", "toyunlearn.toy:Toy", "ls", "toy", "--preset", "tiny",
                          env=_env(scratch))
    assert described.returncode == 0, described.stderr
    assert "weight" in described.stdout and "toy: forget-class prediction pulled to zero" in described.stdout
    missing = bench_cli("--method-module", "toyunlearn.toy:Nope", "ls", env=_env(scratch))
    assert missing.returncode != 0 and "toyunlearn.toy has no Nope" in missing.stderr


@pytest.mark.slow
def test_a_preset_file_is_checked_like_a_built_in_preset(scratch, bench_cli):
    bad = scratch / "bad.yaml"
    bad.write_text(textwrap.dedent("""
        name: broken
        base: tiny
        pretrain: {lr: -1}
    """))
    result = bench_cli("--preset-file", str(bad), "ls")
    assert result.returncode != 0 and "pretrain" in result.stderr and "lr must be > 0" in result.stderr
    bad.write_text("name: odd\nbase: tiny\nunet: {ch: 12}\n")
    odd = bench_cli("--preset-file", str(bad), "ls")
    assert odd.returncode != 0 and "unet.norm_groups (8) must divide" in odd.stderr
    bad.write_text("name: tiny\nbase: digits\n")
    clash = bench_cli("--preset-file", str(bad), "ls")
    assert clash.returncode != 0 and "built-in preset" in clash.stderr


def test_bench_ls_describes_a_methods_resolved_configuration(bench_cli):
    result = bench_cli("ls", "salun", "--preset", "digits")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert lines["iterations"][1:4] == ["int", "1000", "100"] and lines["iterations"][-1] == "scaled"
    assert lines["alpha"][1:4] == ["float", "0.001", "0.001"]


def test_version_and_json_status(tmp_path, bench_cli):
    assert bench_cli("--version").stdout.startswith("bench, version")
    (tmp_path / "results").mkdir()
    shown = bench_cli("status", "--results", str(tmp_path / "results"), "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["counts"]["done"] == 0
