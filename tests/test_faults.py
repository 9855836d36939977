"""Never a wrong record (issue 15): bad input and faults through the real CLI, real files and real processes.

A bad value fails before any work with an error naming the option, and leaves nothing in the cache or the results
folder. A fault (divergence, a killed worker, Ctrl-C, a damaged file) leaves no record: a `failure.json` that
`bench status` shows, or a rebuilt file and a right record. An interrupted run resumes to the very same weights.
docs/reliability.md lists every check of the issue with what the CLI prints now.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import os
import pathlib
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from bench import claims, experiment, records, runner
from bench.cache import Cache, CheckpointError, atomic_save
from bench.cache import load_file as load_torch_file
from bench.cli import main
from bench.config import get_preset
from bench.prerequisites import pretrain
from bench.sweep import build_specs, parse_sets
from bench.unet import ConditionalUNet
from tests.conftest import start_bench

TINY = ("--preset", "tiny", "--device", "cpu", "--no-progress")
WAIT_S = 240


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def _clean_exit(result) -> bool:
    """The command ended with a message, not a traceback."""
    return result.exception is None or isinstance(result.exception, SystemExit)


def _run_dir(out: Path, method: str, forget_class: int = 0, sets: tuple[str, ...] = ()) -> Path:
    sweep = parse_sets(sets, [method])
    (spec,) = build_specs(get_preset("tiny"), [method], [forget_class], [0], sweep, results=str(out))
    return spec.directory


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def original_results(tmp_path_factory, tiny_cache):
    """`bench run --methods original,original --classes 0` on a copy of the tiny cache: (result, results, cache)."""
    root = tmp_path_factory.mktemp("original")
    cache, out = root / "cache", root / "results"
    shutil.copytree(tiny_cache, cache)
    result = _invoke("run", *TINY, "--methods", "original,original", "--classes", "0", "--cache", cache, "--out", out)
    assert result.exit_code == 0, result.output
    return result, out, cache


def _copy(original_results, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the fixture's results folder and cache, for a test that changes them."""
    _, out, cache = original_results
    shutil.copytree(out, tmp_path / "results")
    shutil.copytree(cache, tmp_path / "cache")
    return tmp_path / "results", tmp_path / "cache"


# -- bad values: an error naming the option, before any work --------------------------------------------------------
BAD_VALUES = [
    (("--set", "protocol.eta=nan"), "protocol.eta"),
    (("--set", "protocol.guidance=nan"), "protocol.guidance"),
    (("--set", "safemax.grad_clip=-1"), "safemax.grad_clip"),  # gradient ascent
    (("--set", "safemax.grad_clip=0"), "safemax.grad_clip"),  # no training at all
    (("--set", "safemax.ema_decay=1.5"), "safemax.ema_decay"),
    (("--set", "safemax.ema_decay=-0.1"), "safemax.ema_decay"),
    (("--set", "safemax.iterations=-1"), "safemax.iterations"),
    (("--set", "safemax.batch_size=-1"), "safemax.batch_size"),  # hung forever
    (("--set", "safemax.batch_size=0"), "safemax.batch_size"),
    (("--set", "protocol.forget_samples=0"), "protocol.forget_samples"),
    (("--set", "protocol.batch_size=0"), "protocol.batch_size"),
    (("--set", "protocol.noise_samples=-1"), "protocol.noise_samples"),
    (("--set", "protocol.sampler_steps=2000"), "protocol.sampler_steps"),  # failed in every run
    (("--seeds", ""), "seed"),  # ran nothing with exit 0
    (("--seeds", "99999999999999999999"), "seed"),  # failed only after the prerequisites
    (("--device", "foo"), "--device"),
]
if not torch.cuda.is_available():
    BAD_VALUES.append((("--device", "cuda"), "--device cuda"))


@pytest.mark.parametrize(("option", "named"), BAD_VALUES, ids=["=".join(o) for o, _ in BAD_VALUES])
def test_a_bad_value_fails_before_any_work_naming_the_option(tmp_path, option, named):
    result = _invoke("run", "--preset", "tiny", "--no-progress", "--methods", "safemax", "--classes", "0", *option,
                     "--cache", tmp_path / "cache", "--out", tmp_path / "results")
    assert result.exit_code == 1 and _clean_exit(result), result.output
    assert named in result.output.splitlines()[-1]
    assert sorted(tmp_path.iterdir()) == []  # no cache, no results folder: nothing was built or run


def _published(path: Path, kind: str) -> Path:
    """The tiny UNet in the published ckpt.pth layout [model, optimizer, step, ema], spoiled as `kind` says."""
    state = ConditionalUNet(get_preset("tiny").unet).state_dict()
    model, ema = {"module." + key: value for key, value in state.items()}, dict(state)
    if kind == "nan":
        model = {key: torch.full_like(value, float("nan")) for key, value in model.items()}
        ema = {key: torch.full_like(value, float("nan")) for key, value in ema.items()}
    if kind == "random bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
        return path
    states = [model, {}, 9, ema]
    if kind == "integer keys":
        states[0] = dict(enumerate(model.values()))
    if kind == "list as EMA":
        states[3] = list(ema.values())
    torch.save(states, path)
    return path


@pytest.mark.parametrize(("kind", "named"), [
    ("nan", "holds NaN or infinite values"),
    ("random bytes", "damaged or not a torch file"),  # was: "needs arbitrary unpickling, which can run code"
    ("integer keys", "keys that are not parameter names, such as 0"),
    ("list as EMA", "the EMA shadow should be a dict of tensors by parameter name, found a list"),
])
def test_a_spoiled_published_checkpoint_is_refused_naming_what_is_wrong(tmp_path, kind, named):
    result = _invoke("import-checkpoint", _published(tmp_path / "ckpt.pth", kind), "--preset", "tiny", "--cache",
                     tmp_path / "cache")
    assert result.exit_code == 1 and _clean_exit(result), result.output
    assert named in result.output and "unpickling" not in result.output
    assert not (tmp_path / "cache").exists()  # no base model whose numbers mean nothing


# Random 4 KiB files fail torch.load in four ways (2,000 seeds: 91% torch's refusal of an operand, 6% IndexError,
# 1% KeyError, 1% UnicodeDecodeError); the seeds below draw one of each. The last three were named by their exception only,
# and the test above, on os.urandom, failed whenever it drew one of the last three.
@pytest.mark.parametrize("seed", [0, 2, 20, 195], ids=["refused-operand", "IndexError", "KeyError", "UnicodeDecodeError"])
def test_random_bytes_are_named_a_damaged_file_however_the_unpickler_fails(tmp_path, seed):
    path = tmp_path / "base.pt"
    path.write_bytes(random.Random(seed).randbytes(4096))
    with pytest.raises(CheckpointError, match=f"cannot read {path} \\(it is damaged or not a torch file: .+\\); rebuild"):
        load_torch_file(path, "rebuild it")


def test_a_damaged_file_gets_the_error_alone_not_torchs_warning_beside_it(tmp_path):
    # 0.5% of random files start like a pickle of protocol 191, and torch warned so on stderr before bench's error
    path = tmp_path / "base.pt"
    path.write_bytes(random.Random(502).randbytes(4096))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="it is damaged or not a torch file"):
            load_torch_file(path, "rebuild it")
    assert [str(w.message) for w in caught] == []


def _cifar_tree(root: Path, kind: str) -> Path:
    from PIL import Image

    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    for name in classes:
        folder = root / "train" / name
        folder.mkdir(parents=True)
        if not (kind == "empty class folder" and name == "cat"):
            Image.new("RGB", (32, 32)).save(folder / "0.png")
    if kind == "non-image file":
        (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def _fashion_files(root: Path, kind: str) -> Path:
    root.mkdir()
    header = b"".join(n.to_bytes(4, "big") for n in (2051, 1000, 28, 28))
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        data = gzip.compress(header + bytes(28 * 28 * 10))
        (root / name).write_bytes(b"not gzip at all" if kind == "not gzip" else data[: len(data) // 2])
    return root


@pytest.mark.parametrize(("command", "preset", "kind", "named"), [
    ("pretrain", "cifar10", "non-image file", "notes.txt is not a readable image"),
    ("pretrain", "cifar10", "empty class folder", "cat holds no images"),
    ("pretrain", "fashion", "not gzip", "train-images-idx3-ubyte.gz is not a complete gzip file"),
    ("pretrain", "fashion", "truncated", "train-images-idx3-ubyte.gz is not a complete gzip file"),
    ("pretrain", "cifar10", "empty root", "pass --download"),  # --download exists now
    ("classifier", "cifar10", "empty root", "pass --download"),
])
def test_a_broken_data_set_fails_naming_the_file(tmp_path, command, preset, kind, named):
    if kind == "empty root":
        (root := tmp_path / "data").mkdir()
    elif preset == "cifar10":
        root = _cifar_tree(tmp_path / "data", kind)
    else:
        root = _fashion_files(tmp_path / "data", kind)
    result = _invoke(command, "--preset", preset, "--data-root", root, "--cache", tmp_path / "cache", "--device", "cpu")
    assert result.exit_code == 1 and _clean_exit(result), result.output
    assert named in result.output
    assert not (tmp_path / "cache").exists()
    if "--download" in named:
        assert "--download" in _invoke(command, "--help").output


# -- faults: no wrong record --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_divergence_on_the_last_step_leaves_a_failure_that_status_shows(tmp_path, tiny_cache):
    out = tmp_path / "results"  # run without --cluster: status reads the run folders themselves
    # lr 1000: one step breaks the weights, so that the samples are not finite
    result = _invoke("run", *TINY, "--methods", "safemax", "--classes", "0", "--set", "safemax.iterations=1",
                     "--set", "safemax.lr=1000", "--cache", tiny_cache, "--out", out)
    assert result.exit_code == 1 and "NonFinite" in result.output, result.output
    assert list(out.rglob(records.RECORD_NAME)) == []  # was: a "done" record with UA 100%
    (failure,) = out.rglob(records.FAILURE_NAME)
    assert "NonFinite" in json.loads(failure.read_text())["error"]
    shown = _invoke("status", "--results", out).output
    assert "0 done, 0 stale, 0 running, 1 failed, 0 missing" in shown and "NonFinite" in shown


def test_duplicate_methods_run_once(original_results):
    result, out, _ = original_results
    assert "1 run(s): methods original x" in result.output and "1 run(s) done" in result.output
    assert len(list(out.rglob(records.RECORD_NAME))) == 1


def test_a_record_of_another_base_model_is_run_again(original_results, tmp_path, caplog):
    out, cache = _copy(original_results, tmp_path)
    (path,) = out.rglob(records.RECORD_NAME)
    old = records.read_record(path)["base_model"]["id"]
    rebuilt = _invoke("pretrain", "--preset", "tiny", "--cache", cache, "--force", "--iterations", "2", "--device",
                      "cpu")
    assert rebuilt.exit_code == 0, rebuilt.output
    with caplog.at_level("WARNING"):
        rerun = _invoke("run", *TINY, "--methods", "original", "--classes", "0", "--cache", cache, "--out", out)
    assert rerun.exit_code == 0 and "1 run(s) done, 0 skipped" in rerun.output, rerun.output
    assert f"made with base model {old}" in caplog.text
    assert records.read_record(path)["base_model"]["id"] not in (old, None)  # the table holds one base model


def test_a_record_of_other_hyperparameters_is_run_again(original_results, tmp_path, caplog):
    """A newer version whose preset or method defaults differ does not reuse the old records of the same folder."""
    out, cache = _copy(original_results, tmp_path)
    (path,) = out.rglob(records.RECORD_NAME)
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "hyperparameters": {**record["hyperparameters"], "lr": 0.5}}))
    with caplog.at_level("WARNING"):
        rerun = _invoke("run", *TINY, "--methods", "original", "--classes", "0", "--cache", cache, "--out", out)
    assert rerun.exit_code == 0 and "1 run(s) done, 0 skipped" in rerun.output, rerun.output
    assert "made with other hyperparameters: lr 0.5, now" in caplog.text
    assert records.read_record(path)["hyperparameters"] == record["hyperparameters"]


def test_a_record_with_a_wrong_typed_field_is_failed_and_run_again(original_results, tmp_path):
    out, cache = _copy(original_results, tmp_path)
    (path,) = out.rglob(records.RECORD_NAME)
    path.write_text(json.dumps({**json.loads(path.read_text()), "metrics": None}))  # valid JSON, wrong type
    shown = _invoke("status", "--results", out).output
    assert "'metrics' is NoneType, not dict" in shown and "0 done, 0 stale, 0 running, 1 failed" in shown
    report = _invoke("report", "--results", out, "--no-figure1")
    assert report.exit_code == 0 and _clean_exit(report), report.output
    rerun = _invoke("run", *TINY, "--methods", "original", "--classes", "0", "--cache", cache, "--out", out)
    assert rerun.exit_code == 0 and "1 run(s) done, 0 skipped" in rerun.output, rerun.output
    assert isinstance(records.read_record(path)["metrics"], dict)


def test_a_report_into_an_unwritable_folder_fails_naming_it(original_results, tmp_path):
    _, out, _ = original_results
    blocked = tmp_path / "blocked"
    if os.geteuid() == 0:  # root writes through permissions: a file where a folder must go stops it too
        blocked.write_text("")
    else:
        blocked.mkdir(mode=0o555)
    result = _invoke("report", "--results", out, "--out", blocked / "report", "--no-figure1")
    assert result.exit_code == 1 and _clean_exit(result), result.output
    assert f"cannot write the report to {blocked / 'report'}" in result.output


def test_a_complete_read_only_cache_is_used_without_writing(original_results, tmp_path):
    _, cache = _copy(original_results, tmp_path)
    before = _snapshot(cache)
    paths = [cache, *cache.rglob("*")]
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        result = _invoke("run", *TINY, "--methods", "original", "--classes", "0", "--cache", cache, "--out",
                         tmp_path / "again")
    finally:
        for path in paths:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert result.exit_code == 0 and "1 run(s) done" in result.output, result.output
    assert _snapshot(cache) == before  # not a file added, replaced or touched (root ignores the modes)


@pytest.mark.parametrize("kind", ["FID reference", "cached samples", "preparation", "partial.pt"])
def test_a_corrupt_derived_file_is_named_and_rebuilt(original_results, tmp_path, caplog, kind):
    _, cache = _copy(original_results, tmp_path)
    out, method, sets = tmp_path / "again", "original", ()
    if kind == "FID reference":
        (path,) = (cache / "tiny" / "fid-reference").glob("*retain0*.npz")
    elif kind == "cached samples":
        # the forget-class samples the rerun reads (the shared tiny cache may also hold class 0's retained-class
        # samples, which other tests' runs of other forget classes drew and this run never reads)
        forget_samples = get_preset("tiny").protocol(None).forget_samples
        (path,) = (cache / "tiny" / "samples").rglob(f"class0-n{forget_samples}.pt")
    elif kind == "preparation":
        method = "salun"
        assert _invoke("prepare", *TINY, "--methods", method, "--classes", "0", "--cache", cache).exit_code == 0
        (path,) = (cache / "tiny" / "prepared").rglob("*.pt")
    else:
        method, sets = "retrain", ("retrain.iterations=2",)
        path = _run_dir(out, method, sets=sets) / experiment.PARTIAL_NAME
        path.parent.mkdir(parents=True)
    whole = path.read_bytes() if path.exists() else b""
    damaged = whole[: len(whole) // 2] if whole else b"\x80\x02garbage"  # cut short, or bytes of no format
    path.write_bytes(damaged)
    options = [item for value in sets for item in ("--set", value)]
    with caplog.at_level("WARNING"):
        result = _invoke("run", *TINY, "--methods", method, "--classes", "0", *options, "--cache", cache, "--out", out)
    assert result.exit_code == 0 and "1 run(s) done" in result.output, result.output
    assert str(path) in caplog.text and "weights_only" not in caplog.text
    record = records.read_record(next((out / "tiny" / "paper" / method).rglob(records.RECORD_NAME)))
    assert record["timings"]["resumed_from_step"] == 0
    assert not path.exists() or path.read_bytes() != damaged


class TouchOnUnpickle:
    """An object whose unpickling would run code (create a file)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("kind", ["garbage", "pickled object"])
def test_a_damaged_base_partial_checkpoint_is_named_and_pretraining_starts_over(tmp_path, caplog, kind):
    partial = tmp_path / "cache" / "tiny" / "base.partial.pt"
    partial.parent.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    partial.write_bytes(b"garbage" if kind == "garbage" else pickle.dumps({"step": TouchOnUnpickle(marker)}, 2))
    with caplog.at_level("WARNING"):
        result = _invoke("pretrain", "--preset", "tiny", "--cache", tmp_path / "cache", "--iterations", "2",
                         "--device", "cpu")
    assert result.exit_code == 0 and "(2 steps" in result.output, result.output
    assert str(partial) in caplog.text and "weights_only" not in caplog.text + result.output
    assert ("damaged or not a torch file" if kind == "garbage" else "objects other than tensors") in caplog.text
    assert not marker.exists() and not partial.exists()


def test_a_variant_of_many_overrides_gets_a_folder_name_the_file_system_takes(tiny_cache, tmp_path):
    out = tmp_path / "results"
    sets = ["safemax.iterations=1", "safemax.lr=0.000123456789", "safemax.ema_decay=0.999123456",
            "safemax.lr_warmdown=0.123456789", "safemax.label_dropout=0.123456789", "safemax.grad_clip=0.987654321",
            "safemax.hflip=none", "safemax.batch_size=16", "protocol.guidance=1.23456789", "protocol.eta=0.987654321"]
    result = _invoke("run", *TINY, "--methods", "safemax", "--classes", "0", *[x for s in sets for x in ("--set", s)],
                     "--cache", tiny_cache, "--out", out)
    assert result.exit_code == 0 and "1 run(s) done" in result.output, result.output
    assert max(len(path.name) for path in out.rglob("*")) <= 255  # was: "File name too long"


def test_a_takeover_marker_left_by_a_killed_claimant_does_not_block_the_run(original_results, tmp_path):
    _, _, cache = original_results
    out = tmp_path / "results"
    claim = _run_dir(out, "original") / claims.CLAIM_NAME
    claim.parent.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    holder = {"host": socket.gethostname(), "pid": dead.pid, "pid_start": "1", "job_id": None, "since": "earlier"}
    claim.write_text(text := json.dumps({**holder, "token": "killed-running"}))
    marker = claim.with_name(f".{claims.CLAIM_NAME}.takeover-{hashlib.sha256(text.encode()).hexdigest()[:16]}")
    marker.write_text(json.dumps({**holder, "token": "killed-taking-over"}))
    result = _invoke("run", *TINY, "--methods", "original", "--classes", "0", "--cache", cache, "--out", out)
    assert result.exit_code == 0 and "1 run(s) done" in result.output, result.output
    assert not claim.exists() and not marker.exists()


def _save_many(path: str, value: int, count: int) -> None:
    for _ in range(count):
        atomic_save({"writer": torch.full((256,), value)}, Path(path))


def test_concurrent_writers_of_one_cache_file_leave_a_whole_file(tmp_path):
    # Two runs caching the same samples write one file at once; a shared temporary name broke one or both.
    path = tmp_path / "samples" / "class0-n20.pt"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_save_many, args=(str(path), value, 40)) for value in (1, 2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert [writer.exitcode for writer in writers] == [0, 0]
    saved = torch.load(path, weights_only=True)["writer"]
    assert saved.unique().tolist() in ([1], [2])
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


# -- processes: a killed worker, Ctrl-C ----------------------------------------------------------------------------
def _claimant(run_dir: Path, deadline: float) -> int:
    """The pid in the run's claim.json, once it is there."""
    while time.monotonic() < deadline:
        try:
            return json.loads((run_dir / claims.CLAIM_NAME).read_text())["pid"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.1)
    raise AssertionError(f"no claim appeared in {run_dir}")


@pytest.mark.slow
def test_a_killed_worker_fails_its_run_only_and_a_rerun_completes_it(tiny_cache, tmp_path):
    out = tmp_path / "results"
    # No --device: on a machine showing GPUs 5 and 7 (none is there: the runs are on the CPU) each worker takes one
    grid = ("run", "--preset", "tiny", "--no-progress", "--methods", "safemax", "--classes", "0-2", "--set",
            "safemax.iterations=30", "--cache", tiny_cache, "--out", out)
    sweep = start_bench(*grid, "--workers", "2", env={"CUDA_VISIBLE_DEVICES": "5,7"})
    try:
        # killed the instant its claim appears: the orchestrator knows which run each worker holds by handing it out
        worker = _claimant(_run_dir(out, "safemax", 0, ("safemax.iterations=30",)), time.monotonic() + WAIT_S)
        os.kill(worker, signal.SIGKILL)
        stdout, stderr = sweep.communicate(timeout=WAIT_S)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 1, stdout + stderr
    (failed,) = [line for line in stderr.splitlines() if line.startswith("FAILED")]
    assert "class 0 seed 0" in failed and f"worker process {worker} died" in failed
    gpus = dict(re.findall(r"worker (\d+): GPU (\d) \(CUDA_VISIBLE_DEVICES\)", stderr))
    assert len(gpus) == 3 and set(gpus.values()) == {"5", "7"}, stderr  # two workers, then a replacement,
    assert list(gpus.values()).count(gpus[str(worker)]) == 2, gpus  # which took the dead worker's GPU
    assert sorted(records.read_record(p)["forget_class"] for p in out.rglob(records.RECORD_NAME)) == [1, 2]
    assert "died" in _invoke("status", "--results", out).output
    rerun = _invoke(*grid)
    assert rerun.exit_code == 0 and "1 run(s) done, 2 skipped" in rerun.output, rerun.output


@pytest.mark.slow
def test_ctrl_c_stops_a_worker_sweep_within_seconds_and_prints_the_summary(tiny_cache, tmp_path):
    out = tmp_path / "results"
    sweep = start_bench("run", *TINY, "--methods", "safemax", "--classes", "0-3", "--set", "safemax.iterations=100000",
                   "--workers", "2", "--cache", tiny_cache, "--out", out)
    try:
        deadline = time.monotonic() + WAIT_S
        for forget_class in (0, 1):  # both workers are in their runs
            _claimant(_run_dir(out, "safemax", forget_class, ("safemax.iterations=100000",)), deadline)
        sent = time.monotonic()
        os.killpg(sweep.pid, signal.SIGINT)  # what a terminal sends its foreground group on Ctrl-C
        stdout, stderr = sweep.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert took < 20, f"took {took:.0f} s to stop"
    assert sweep.returncode == 130, stdout + stderr
    assert "0 run(s) done" in stdout and "4 not finished (stopped)" in stdout
    assert stderr.count("NOT FINISHED safemax") == 4
    assert list(out.rglob(records.RECORD_NAME)) == []


# -- exact resume -------------------------------------------------------------------------------------------------
def _die_after_first_checkpoint(monkeypatch) -> list[int]:
    saved, real_save = [], runner.atomic_save

    def save_then_die(payload, path):
        real_save(payload, path)
        saved.append(payload["step"])
        raise KeyboardInterrupt("killed after the first checkpoint")

    monkeypatch.setattr(runner, "atomic_save", save_then_die)
    return saved


@pytest.mark.slow
def test_a_resumed_run_with_dropout_is_bit_identical_to_an_uninterrupted_one(tiny_cache, tmp_path, monkeypatch):
    # retrain trains from scratch with the UNet's dropout (0.1): exact only if the generators are restored too
    grid = ("run", *TINY, "--methods", "retrain", "--classes", "0", "--set", "retrain.iterations=30",
            "--save-model", "--cache", tiny_cache)
    whole = _invoke(*grid, "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    saved = _die_after_first_checkpoint(monkeypatch)
    cut = _invoke(*grid, "--out", tmp_path / "cut")
    assert cut.exit_code == 130 and saved == [10], cut.output
    monkeypatch.undo()
    resumed = _invoke(*grid, "--out", tmp_path / "cut")
    assert resumed.exit_code == 0, resumed.output
    (a,), (b,) = (list((tmp_path / name).rglob(records.RECORD_NAME)) for name in ("whole", "cut"))
    first, second = records.read_record(a), records.read_record(b)
    assert (second["timings"]["resumed_from_step"], second["timings"]["iterations"]) == (10, 30)
    weights_a, weights_b = load_file(a.parent / "model.safetensors"), load_file(b.parent / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert max(float((weights_a[k] - weights_b[k]).abs().max()) for k in weights_a) == 0.0
    assert first["metrics"] == second["metrics"] and first["losses"] == second["losses"]


@pytest.mark.slow
def test_resumed_pretraining_is_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch):
    preset, cpu = get_preset("tiny"), torch.device("cpu")
    whole = pretrain(preset, Cache(tmp_path / "whole"), cpu, progress=False)
    saved = _die_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pretrain(preset, Cache(tmp_path / "cut"), cpu, progress=False)
    assert saved == [10] and (tmp_path / "cut" / "tiny" / "base.partial.pt").exists()
    monkeypatch.undo()
    resumed = pretrain(preset, Cache(tmp_path / "cut"), cpu, progress=False)
    for part in ("model", "ema"):
        assert whole[part].keys() == resumed[part].keys()
        for name, value in whole[part].items():
            assert torch.equal(value, resumed[part][name]), f"{part} {name}"
    assert not (tmp_path / "cut" / "tiny" / "base.partial.pt").exists()
