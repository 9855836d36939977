"""The cache folder and every file in it: where things live, atomic writes, and one guarded loader.

Layout under the cache root (`$BENCH_CACHE`, default ~/.cache/unlearning-bench), one folder per base model and
one per classifier, named by what determines them (`folder_name`), not by the preset that asks: a built-in preset's
folder is its name; a preset file's is the built-in preset's whose determining fields it keeps, else the data set
and a short hash of those fields. A preset that changes only the evaluation protocol reuses its base's models.
  base.pt, base.partial.pt               the pretrained DDPM (and its resumable checkpoint while training)
  classifier.pt                          the evaluation classifier (in the classifier's folder)
  prepared/<method>/<base id>/<key>.pt   a method's preparation (SA's priors and Fisher, a saliency mask)
  fid-reference/<key>.npz                real images' feature statistics
  samples/<base id>-ema|-raw/<key>/...   the unchanged base model's samples, reused by every `original` run
  datasets/cifar10-<split>-<key>.npz     a decoded image folder (CIFAR-10's JPEG copy), keyed by its files (at the root)
  datasets/digits-<split>-...npz         the digits split, per scikit-learn version (at the root)
The key of a preparation, of the FID statistics and of the samples holds a short hash of the code that computes them
(`fingerprint.code_key`), so edited code computes them afresh; `bench clean` removes the older ones (bench/clean.py).

Every file is written to a temporary name and renamed, so a reader never sees half of one, and read with
`torch.load(weights_only=True)` only: a file that needs more is refused, never unpickled. A file that does not
load is an error naming the file and the command or step that rebuilds it; derived files (statistics, samples,
preparations) are deleted and rebuilt instead, since nothing is lost by recomputing them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch

from bench.config import BUILTIN_PRESETS, Preset
from bench.data import ClassDataset, load_dataset

log = logging.getLogger(__name__)

FORMAT = "unlearning-bench/1"


class CheckpointError(RuntimeError):
    """A cached file is missing, unreadable or does not match the preset; the message says how to rebuild it."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "unlearning-bench"))


def base_fields(preset: Preset) -> dict:
    """What determines the base model: the data, the UNet, the noise schedule and the pretraining recipe (its seed is
    `bench pretrain --seed`, 0 when a run builds it)."""
    return {"dataset": preset.dataset, "unet": dataclasses.asdict(preset.unet),
            "diffusion": dataclasses.asdict(preset.diffusion), "pretrain": dataclasses.asdict(preset.pretrain)}


def classifier_fields(preset: Preset) -> dict:
    """What determines the evaluation classifier: the data at the UNet's size and the classifier's recipe."""
    unet = preset.unet
    return {"dataset": preset.dataset, "shape": [unet.in_channels, unet.image_size, unet.num_classes],
            "hflip": preset.pretrain.hflip, "classifier": dataclasses.asdict(preset.classifier)}


def folder_name(preset: Preset, fields) -> str:
    """The cache folder of what `fields(preset)` determines: a built-in preset's name (as always), the built-in preset
    whose fields are the same, else `<dataset>-<hash of the fields>`."""
    if preset.name in BUILTIN_PRESETS:
        return preset.name
    mine = fields(preset)
    for name, builtin in BUILTIN_PRESETS.items():
        if fields(builtin) == mine:
            return name
    digest = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()[:12]
    return f"{preset.dataset}-{digest}"


class Cache:
    """Paths of the cached files of each preset (and where the data set comes from)."""

    def __init__(self, root: str | Path | None = None, data_root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.data_root = Path(data_root) if data_root is not None else None

    def path(self, preset: Preset, *parts: str) -> Path:
        """A path in the base model's folder (its samples, preparations and FID statistics live there too)."""
        return self.root.joinpath(folder_name(preset, base_fields), *parts)

    def base_path(self, preset: Preset) -> Path:
        return self.path(preset, "base.pt")

    def classifier_path(self, preset: Preset) -> Path:
        return self.root.joinpath(folder_name(preset, classifier_fields), "classifier.pt")

    def prepared_path(self, preset: Preset, method: str, base_id: str, key: str) -> Path:
        return self.path(preset, "prepared", method, base_id, f"{key}.pt")

    def dataset(self, preset: Preset, split: str, *, keep: bool = False) -> ClassDataset:
        """The preset's split, decoded once into `datasets/` of a cache that exists (a command that fails on its
        options leaves no cache folder), or of one about to be written (`keep`: pretraining and the classifier,
        the first commands on an empty cache, which otherwise decode the split once each)."""
        decoded = self.root / "datasets" if keep or self.root.is_dir() else None
        return load_dataset(preset.dataset, split, image_size=preset.unet.image_size, root=self.data_root,
                            decoded_cache=decoded)


def temporary_name(path: Path) -> Path:
    """A name beside `path` that no other process or thread writes to."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_save(payload, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:  # a handle, not the name: torch would name the archive inside after it
            torch.save(payload, handle)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when something above failed


def atomic_savez(path: Path, **arrays) -> None:
    """np.savez to a temporary file beside `path`, then rename, as `atomic_save` does for torch files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:  # a handle, not the name: numpy would append .npz to it
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when something above failed


def refusal(exc: BaseException) -> tuple[str, bool] | None:
    """torch's weights-only refusal in one line (`Unsupported global: GLOBAL os.system`, `Unsupported operand 15`)
    and whether the file asks for a global (code to call); None if `exc` is no such refusal."""
    text = str(exc)
    if "Weights only load failed" not in text and "WeightsUnpickler" not in text:
        return None
    for line in text.splitlines():
        line = line.split("WeightsUnpickler error:")[-1].strip()
        if re.match(r"(?i)(unsupported|trying to load)", line):
            line = re.split(r" was not an allowed global| whose module|\. ", line)[0].rstrip(".")
            return line, "global" in line.lower()
    return type(exc).__name__, False


def torch_load(path: Path, map_location="cpu", mmap: bool = False):
    """`torch.load(path, weights_only=True)`. The warnings torch gives while reading a file that then fails to load
    (random bytes can read as "Detected pickle protocol 191") are dropped: the error that follows says what matters.
    A file that loads keeps its warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return loaded


def load_error(exc: BaseException) -> str:
    """One line naming what went wrong, without torch's advice to load untrusted files with weights_only=False."""
    refused = refusal(exc)
    if refused is not None:
        what, needs_code = refused
        if needs_code:
            return f"it holds objects other than tensors, numbers, strings, lists and dicts: {what}"
        return f"it is damaged or not a torch file: {what}"
    text = str(exc).strip()
    first = text.splitlines()[0].split(". ")[0] if text else ""  # torch goes on with advice after the first
    error = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if isinstance(exc, OSError):  # the bytes could not be read at all (a folder, no permission)
        return error
    # Bytes that are not a torch file can also fail inside the unpickler itself (IndexError: pop from empty list,
    # KeyError, UnicodeDecodeError: 9% of random 4 KiB files), not only as torch's refusal of an operand.
    return f"it is damaged or not a torch file: {error}"


def checkpoint_step(value, path: Path, what: str, fix: str) -> int:
    """`value` read from `path` as a step count: an int or a one-element integer tensor, else CheckpointError
    naming the file, `what` was found and `fix`."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        found = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)[:80]
        raise CheckpointError(f"{path}: {what} should be an integer, found {found}; {fix}")
    return value


def load_file(path: Path, fix: str, map_location="cpu", mmap: bool = False):
    """`torch.load(path, weights_only=True)`; a file that does not load raises CheckpointError naming it and `fix`.

    FileNotFoundError passes through: a missing file is the caller's question. `mmap` maps the tensors instead of
    reading them (for reading a checkpoint's metadata).
    """
    try:
        return torch_load(path, map_location, mmap)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated, not a torch file, or it needs arbitrary unpickling
        raise CheckpointError(f"cannot read {path} ({load_error(exc)}); {fix}") from exc


def load_derived(path: Path, map_location="cpu"):
    """A derived cache file, or None (the caller rebuilds it) when it is missing or does not load; a corrupt one
    is removed with a warning naming it."""
    try:
        return torch_load(path, map_location)
    except FileNotFoundError:
        return None
    except Exception as exc:
        log.warning("cached file %s does not load (%s); rebuilding it", path, load_error(exc))
        try:
            path.unlink()
        except OSError as unlink_error:  # a read-only cache: say so rather than rebuild into nowhere
            raise CheckpointError(f"cannot read {path} ({load_error(exc)}) and cannot remove it ({unlink_error}); "
                                  "delete it by hand") from exc
        return None


def checkpoint_id(path: Path) -> str | None:
    """The `id` of the base model or classifier at `path`, its tensors mapped, not read; None if it holds none.
    CheckpointError names a file that does not load."""
    payload = load_file(path, "rebuild it with `bench pretrain` / `bench classifier` with --force", mmap=True)
    return payload.get("id") if isinstance(payload, dict) else None


def load_checkpoint(path: Path, kind: str, preset: Preset, rebuild: str) -> dict:
    """Load and check a checkpoint of `kind` ("diffusion" or "classifier") for `preset`; errors say how to
    rebuild it with the command `rebuild`."""
    payload = load_file(path, f"rebuild it with `{rebuild}`")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("kind") != kind:
        raise CheckpointError(f"{path} is not a {kind} checkpoint of this tool; rebuild it with `{rebuild}`")
    config = preset.unet if kind == "diffusion" else preset.classifier
    expected = dataclasses.asdict(config)
    # A field added to the configuration after the checkpoint was written counts with its default value.
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    saved = payload.get("config")
    if not isinstance(saved, dict) or {**defaults, **saved} != expected:
        raise CheckpointError(
            f"{path} was built for another configuration ({payload.get('config')}) than preset "
            f"{preset.name!r} ({expected}); rebuild it with `{rebuild}`"
        )
    if kind == "diffusion":  # copied into every record's base_model
        payload["step"] = checkpoint_step(payload.get("step"), path, "its `step`", f"rebuild it with `{rebuild}`")
    return payload
