"""`bench` on the command line: errors a user can cause are reported with the valid choices, before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.cli import main
from bench.config import PRESETS
from methods import METHODS


@pytest.fixture
def invoke(tmp_path):
    """Run `bench run ...` on the tiny preset with a results folder and an (empty) cache under tmp_path."""

    def run(*args: str, command: str = "run", defaults: bool = True):
        argv = [command, *args]
        if defaults:
            argv += ["--preset", "tiny", "--device", "cpu", "--no-progress"]
            if "--out" not in args:
                argv += ["--out", str(tmp_path / "results")]
            if "--cache" not in args:
                argv += ["--cache", str(tmp_path / "cache")]
        return CliRunner().invoke(main, argv)

    return run


def _assert_failed_before_work(result, tmp_path: Path) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert not (tmp_path / "cache").exists()  # nothing was pretrained


def test_unknown_method_lists_valid_methods(invoke, tmp_path):
    result = invoke("--methods", "original,forgetful", "--classes", "0")
    _assert_failed_before_work(result, tmp_path)
    assert "forgetful" in result.output
    for name in METHODS:
        assert name in result.output


def test_unknown_preset_lists_presets(tmp_path):
    result = CliRunner().invoke(main, ["run", "--preset", "imagenet", "--out", str(tmp_path / "results"),
                                       "--cache", str(tmp_path / "cache")])
    _assert_failed_before_work(result, tmp_path)
    assert "imagenet" in result.output
    for name in PRESETS:
        assert name in result.output


def test_class_outside_the_preset_is_an_error(invoke, tmp_path):
    result = invoke("--methods", "original", "--classes", "12")
    _assert_failed_before_work(result, tmp_path)
    assert "12" in result.output and "0-9" in result.output


def test_unwritable_results_folder_fails_before_any_work(invoke, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = invoke("--methods", "original", "--classes", "0", "--out", str(blocker / "results"))
    _assert_failed_before_work(result, tmp_path)
    assert str(blocker / "results") in result.output


def test_corrupt_base_checkpoint_names_the_file_and_the_rebuild_command(invoke, tmp_path):
    cache = tmp_path / "corrupt-cache"
    base = cache / "tiny" / "base.pt"
    base.parent.mkdir(parents=True)
    base.write_bytes(b"this is not a torch checkpoint" * 10)
    result = invoke("--methods", "original", "--classes", "0", "--cache", str(cache))
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert str(base) in result.output
    assert f"bench pretrain --preset tiny --cache {cache} --force" in result.output
    assert not (tmp_path / "results" / "tiny" / "paper" / "original").exists()


def test_ls_lists_methods_and_presets():
    result = CliRunner().invoke(main, ["ls"])
    assert result.exit_code == 0, result.output
    for name in [*METHODS, *PRESETS]:
        assert name in result.output


def test_unknown_set_key_names_it_and_the_valid_keys(invoke, tmp_path):
    result = invoke("--methods", "safemax", "--classes", "0", "--set", "safemax.nope=1")
    _assert_failed_before_work(result, tmp_path)
    assert "nope" in result.output
    for key in ("lam", "target", "iterations", "lr"):
        assert key in result.output


def test_invalid_set_value_is_checked_by_the_method_config(invoke, tmp_path):
    result = invoke("--methods", "safemax", "--classes", "0", "--set", "safemax.target=final")
    _assert_failed_before_work(result, tmp_path)
    for choice in ("final", "chain", "iid", "zero"):
        assert choice in result.output


def test_unknown_speed_switch_names_the_valid_ones(invoke, tmp_path):
    result = invoke("--methods", "safemax", "--classes", "0", "--speed", "turbo=true")
    _assert_failed_before_work(result, tmp_path)
    for switch in ("turbo", "amp", "channels_last", "compile", "cuda_graphs"):
        assert switch in result.output
    result = invoke("--methods", "safemax", "--classes", "0", "--speed", "compile=maybe")
    _assert_failed_before_work(result, tmp_path)
    assert "--speed compile: cannot read 'maybe' as bool" in result.output


def test_a_command_exits_with_its_objects_frozen_and_its_garbage_still_finalized(tmp_path):
    """bench.quick_exit: the interpreter's collections at exit no longer walk torch's objects (~0.5 CPU-s per
    process), and garbage left at the end (a plug-in's object in a reference cycle) is finalized as before."""
    script = """
import atexit, gc, sys
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0))  # runs after bench's handler
from bench.cli import main
try:
    main(["ls", "--preset", "tiny"])
except SystemExit:
    pass
class Cycle:
    def __del__(self):
        print("cycle finalized")
gc.disable()  # only an explicit collection finds it
cycle = Cycle()
cycle.self = cycle
del cycle
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("cycle finalized\nfrozen at exit: True\n"), done.stdout[-300:]
