"""`bench clean` removes the derived cache files nothing reads again (older code, base models and classifiers trained
again, unfinished writes) and nothing a run still reads: a sweep run after it skips its finished runs and rebuilds
nothing, and the files of a method it cannot import stay.

Real records and cache files of the tiny preset; the "older" files are copies named as older code names them."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import records
from bench.cli import main
from bench.orchestrate import run_local
from bench.sweep import RunSpec


def _clean(*args: str):
    result = CliRunner().invoke(main, ["clean", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_clean_removes_what_nothing_reads_and_a_rerun_then_skips_and_rebuilds_nothing(tmp_path, tiny_cache):
    cache, results = tmp_path / "cache", tmp_path / "results"
    # the base model and classifier only: other tests of this session leave derived files in the shared cache
    shutil.copytree(tiny_cache, cache, ignore=shutil.ignore_patterns("prepared", "samples", "fid-reference", "*.tmp"))
    specs = [RunSpec("tiny", method, 0, 0, str(results), str(cache), device="cpu", progress=False)
             for method in ("original", "salun")]
    run_local(specs, show_progress=False)
    folder = cache / "tiny"
    (mask,) = (folder / "prepared" / "salun").glob("*/*.pt")
    (key,) = (p for p in (folder / "samples").glob("*/*") if p.is_dir())
    (reference,) = (folder / "fid-reference").glob("*.npz")
    current = _files(cache)
    old = {  # what older code, another base model and another classifier left behind
        "older code's mask": mask.with_name(mask.name.replace(mask.stem[-10:], "0" * 10)),
        "another base model's masks": folder / "prepared" / "salun" / "tiny-0123456789ab" / mask.name,
        "older code's samples": key.with_name(key.name[:-10] + "0" * 10),
        "another base model's samples": folder / "samples" / "tiny-0123456789ab-ema" / key.name,
        "samples of the layout before code keys": key.with_name("e7c968a010"),
        "older code's statistics": reference.with_name(reference.stem[:-10] + "0" * 10 + ".npz"),
        "another classifier's statistics": reference.with_name(
            reference.name.replace(reference.name.split("-classifier-")[1][:16], "0123456789abcdef")),
    }
    for path in old.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent.parent.name == "samples":
            shutil.copytree(key, path)
        else:
            shutil.copy(mask if path.suffix == ".pt" else reference, path)
    unfinished, writing = folder / ".base.pt.4242.0123abcd.tmp", folder / "samples" / ".x.pt.4243.89abcdef.tmp"
    for path in (unfinished, writing):
        path.write_bytes(b"half")
    os.utime(unfinished, (time.time() - 7200,) * 2)  # untouched for two hours; the other is being written now

    other_base = {old["another base model's masks"].parent, old["another base model's samples"].parent}
    named = [path for path in old.values() if path.parent not in other_base] + sorted(other_base) + [unfinished]
    run = ("run", "--preset", "tiny", "--methods", "original,salun", "--classes", "0", "--cache", str(cache),
           "--results", str(results), "--device", "cpu", "--no-progress")
    rerun = CliRunner().invoke(main, run)  # both finished: skipped, and the run says what is left unread
    assert rerun.exit_code == 0 and "0 run(s) done, 2 skipped" in rerun.output, rerun.output
    assert f"note: the cache holds {len(named)} file(s) or folder(s)" in rerun.output
    assert f"`bench clean --cache {cache} --dry-run` lists them" in rerun.output

    listed = _clean("--cache", str(cache), "--dry-run")
    assert all(path.exists() for path in old.values()) and unfinished.exists()  # a dry run removes nothing
    for path in named:  # a folder of another base model is named once, as the folder
        assert f"  {path}  (" in listed, (path, listed)
    assert str(writing) not in listed and f"would remove {len(named)} file(s) or folder(s)" in listed
    assert f"{folder / 'prepared' / 'salun' / 'tiny-0123456789ab'}  (another base model's)" in listed
    assert f"{key.with_name('e7c968a010')}  (older cache layout (no code key))" in listed

    removed = _clean("--cache", str(cache))
    assert not any(path.exists() for path in old.values()) and not unfinished.exists() and writing.exists()
    assert f"removed {len(named)} file(s) or folder(s)" in removed
    writing.unlink()
    assert _files(cache) == current  # what the current code and models read is untouched
    rerun = CliRunner().invoke(main, run)  # skipped again, nothing rebuilt, nothing left to say
    assert rerun.exit_code == 0 and "2 skipped" in rerun.output and "note: the cache" not in rerun.output
    assert _files(cache) == current and len(records.read_all(results)[0]) == 2
    assert "nothing to remove" in _clean("--cache", str(cache))


def test_clean_removes_decoded_data_sets_that_no_run_reads_again(tmp_path):
    from importlib.metadata import version

    import numpy as np
    from PIL import Image

    from bench.data import CIFAR10_CLASSES, load_cifar10

    def image_folder(root: Path) -> Path:
        for shade, name in enumerate(CIFAR10_CLASSES):
            (root / "train" / name).mkdir(parents=True)
            Image.new("RGB", (32, 32), (shade * 20, 0, 0)).save(root / "train" / name / "0.png")
        return root

    datasets = tmp_path / "cache" / "datasets"
    kept, gone = image_folder(tmp_path / "kept"), image_folder(tmp_path / "gone")
    load_cifar10("train", kept, decoded_cache=datasets)
    (changed,) = datasets.glob("cifar10-train-*.npz")
    load_cifar10("train", gone, decoded_cache=datasets)
    (of_gone,) = set(datasets.glob("cifar10-train-*.npz")) - {changed}
    shutil.rmtree(gone)
    Image.new("RGB", (32, 32)).save(kept / "train" / "cat" / "1.png")  # a run now decodes the folder again
    load_cifar10("train", kept, decoded_cache=datasets)
    (current,) = set(datasets.glob("cifar10-train-*.npz")) - {changed, of_gone}
    legacy = datasets / "cifar10-test-0123456789abcdef.npz"  # kept before copies named their folder
    np.savez(legacy, images=np.zeros((1, 32, 32, 3), np.uint8), labels=np.zeros(1, np.int64), source=np.array("x"))
    installed = version("scikit-learn")
    old_digits = datasets / "digits-train-0.2-scikit-learn-0.0.1.npz"
    digits = datasets / f"digits-train-0.2-scikit-learn-{installed}.npz"
    for path in (old_digits, digits):
        path.write_bytes(b"judged by its name")

    listed = _clean("--cache", str(tmp_path / "cache"), "--dry-run")
    assert f"  {changed}  (the images in {kept / 'train'} changed since (a run decodes them again, as " in listed
    assert f"  {of_gone}  (its image folder {gone / 'train'} is gone)" in listed
    assert f"  {old_digits}  (scikit-learn 0.0.1's split; {installed} is installed)" in listed
    assert f"kept: {legacy}: decoded before copies named their folder" in listed
    assert f"  {current}  " not in listed and f"  {digits}  " not in listed
    assert "would remove 3 file(s) or folder(s)" in listed
    assert "removed 3 file(s)" in _clean("--cache", str(tmp_path / "cache"))
    assert set(datasets.iterdir()) == {current, legacy, digits}
    again = load_cifar10("train", kept, decoded_cache=datasets)  # the current copy is read, nothing decoded
    assert set(datasets.iterdir()) == {current, legacy, digits} and len(again) == 11


def test_clean_of_a_missing_cache_fails_naming_it(tmp_path):
    result = CliRunner().invoke(main, ["clean", "--cache", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and f"cache folder {tmp_path / 'nowhere'} does not exist" in result.output
