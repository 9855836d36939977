"""Checkpoints of the published SA/SalUn DDPM code, to and from our self-describing format.

The published `ckpt.pth` is a list [model state dict, optimizer state, step] with the EMA shadow appended when
EMA is on (clear-nus/selective-amnesia and OPTML-Group/Unlearn-Saliency, `ddpm/runners/diffusion.py`). The model
was wrapped in DataParallel, so its keys start with `module.`; the EMA helper unwraps it, so its keys usually do
not (either is accepted). `step` is the 0-based index of the last iteration, so a checkpoint saved after n
iterations says n - 1; ours store n. Published files are pickles from the internet: they are read with
`torch.load(weights_only=True)` only, and a file that needs anything more is refused.

A run's `model.safetensors` and what `bench export` writes describe themselves (`model_metadata`: preset, method,
class, seed and the UNet configuration, in a fixed order) and are byte-for-byte reproducible, so that the SHA-256
in a record identifies the weights; `load_exported` rebuilds the UNet from such a file alone (docs/export.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import struct
import time
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from torch import Tensor

from bench.cache import (
    FORMAT,
    Cache,
    CheckpointError,
    atomic_save,
    checkpoint_step,
    load_error,
    refusal,
    temporary_name,
    torch_load,
)
from bench.config import PRESETS, Preset, UNetConfig
from bench.records import FAILURE_NAME, RECORD_NAME, parse_run_dir, read_record
from bench.unet import ConditionalUNet

log = logging.getLogger(__name__)

PREFIX = "module."


def read_published(src: Path) -> list:
    """The published list, loaded without arbitrary unpickling; errors name the file and the problem."""
    try:
        states = torch_load(src)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated, not a torch file, or it asks for code to run
        refused = refusal(exc)
        if refused is not None and refused[1]:  # a global: a class or function that unpickling would call
            raise CheckpointError(
                f"refusing {src}: loading it needs arbitrary unpickling, which can run code from the file "
                f"({refused[0]}). A published checkpoint holds only tensors, dicts, lists and numbers; "
                "re-save just those from a copy you trust"
            ) from exc
        raise CheckpointError(f"cannot read {src} as a PyTorch checkpoint ({load_error(exc)})") from exc
    if not isinstance(states, (list, tuple)) or len(states) not in (3, 4) or not isinstance(states[0], dict):
        found = f"a {type(states).__name__}" + (f" of {len(states)} items" if isinstance(states, (list, tuple)) else "")
        raise CheckpointError(f"{src} is not in the published layout [model, optimizer, step(, ema)]: found {found}")
    return list(states)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataparallel_prefix(state: dict, what: str, src: Path) -> str:
    """`module.` if every key carries DataParallel's prefix, "" if none does; a mix is an error."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{src}: {what} should be a dict of tensors by parameter name, found a "
                              f"{type(state).__name__}")
    odd = [key for key in state if not isinstance(key, str)]
    if odd:
        raise CheckpointError(f"{src}: {what} has keys that are not parameter names, such as {odd[0]!r}")
    prefixed = [key.startswith(PREFIX) for key in state]
    if any(prefixed) and not all(prefixed):
        bare = next(key for key, has in zip(state, prefixed) if not has)
        raise CheckpointError(f"{src}: {what} mixes `{PREFIX}` keys with keys without it, such as {bare!r}")
    return PREFIX if prefixed and all(prefixed) else ""


def map_strictly(state: dict, expected: dict[str, Tensor], what: str, src: Path) -> dict[str, Tensor]:
    """`state` (keys with or without `module.`) checked key by key against `expected`, names and shapes.

    Errors name keys as the file spells them. Returns contiguous float32 CPU tensors under our names.
    """
    prefix = dataparallel_prefix(state, what, src)
    ours = {key[len(prefix):]: value for key, value in state.items()}
    unexpected = [prefix + key for key in sorted(set(ours) - set(expected))]
    missing = [prefix + key for key in sorted(set(expected) - set(ours))]
    if unexpected or missing:
        parts = [f"unexpected key(s) {unexpected}" if unexpected else "", f"missing key(s) {missing}" if missing else ""]
        raise CheckpointError(f"{src}: {what} does not match the UNet: {'; '.join(p for p in parts if p)}")
    mapped = {}
    for key, reference in expected.items():
        value = ours[key]
        if not isinstance(value, Tensor) or value.shape != reference.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise CheckpointError(
                f"{src}: {what} key {prefix + key!r} has shape {shape}, the UNet needs {tuple(reference.shape)}"
            )
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{src}: {what} key {prefix + key!r} holds NaN or infinite values; refusing a "
                                  "base model whose numbers mean nothing")
        mapped[key] = value.detach().to(torch.float32).contiguous()
    return mapped


def import_published_checkpoint(src: Path, preset: Preset, cache: Cache, force: bool = False) -> Path:
    """Convert a published `ckpt.pth` into the base model of `preset` at `cache.base_path(preset)`.

    Every key must map onto the preset's UNet; the result is loaded back strictly before it is written. An
    existing base model is only replaced with `force`. Returns the path written.
    """
    src, dst = Path(src).resolve(), cache.base_path(preset)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already holds a base model for preset {preset.name!r}; pass force to replace it")
    started = time.perf_counter()
    states = read_published(src)
    model = ConditionalUNet(preset.unet)
    expected = model.state_dict()
    weights = map_strictly(states[0], expected, "the model state dict", src)
    if len(states) == 4:
        ema = map_strictly(states[3], expected, "the EMA shadow", src)
        ema_note = ""
    else:
        log.warning("%s has no EMA shadow; the raw weights stand in for the EMA weights", src)
        ema, ema_note = {key: value.clone() for key, value in weights.items()}, "; no EMA in the file, EMA = raw weights"
    model.load_state_dict(weights, strict=True)
    step = checkpoint_step(states[2], src, "the third item (the step)",
                           "re-save the list with the step as a plain integer: states[2] = int(step)") + 1
    digest = file_sha256(src)
    payload = {
        "format": FORMAT, "kind": "diffusion", "preset": preset.name, "config": dataclasses.asdict(preset.unet),
        "diffusion": dataclasses.asdict(preset.diffusion), "recipe": dataclasses.asdict(preset.pretrain),
        "step": step, "model": weights, "ema": ema,
        # The same file always gets the same id, so caches keyed by it (samples) stay valid across imports.
        "id": f"{preset.name}-imported-{digest[:12]}", "source": f"imported from {src}{ema_note}",
        "source_sha256": digest, "final_loss": math.nan, "device": "unknown (imported)",
        "seconds": time.perf_counter() - started, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": str(torch.__version__),
    }
    atomic_save(payload, dst)
    log.info("imported %s (step %d) as the base model of %s: %s", src, step, preset.name, dst)
    return dst


def export_published_checkpoint(payload: dict, dst: Path, lr: float | None = None,
                                metadata: dict[str, str] | None = None) -> Path:
    """Write our diffusion checkpoint `payload` as a published `ckpt.pth` that the SA/SalUn code loads.

    Model keys get the `module.` prefix, the EMA shadow is appended without it (as the EMA helper saves it),
    `step` becomes the 0-based index, and the optimizer state is a fresh Adam state (ours are not kept). `metadata`
    (see `model_metadata`) rides in the optimizer state under `unlearning_bench`, a key torch's
    `Optimizer.load_state_dict` ignores, so the list stays the 4 items the published code loads.
    """
    if payload.get("format") != FORMAT or payload.get("kind") != "diffusion":
        raise ValueError(f"not a diffusion checkpoint of this tool (format {payload.get('format')!r}, "
                         f"kind {payload.get('kind')!r})")
    model = {PREFIX + key: value for key, value in payload["model"].items()}
    lr = lr if lr is not None else payload.get("recipe", {}).get("lr", 2e-4)
    optimizer = {"state": {}, "param_groups": [{
        "lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
        "params": list(range(len(payload["ema"]))),  # one index per parameter, as Adam numbers them
    }]}
    if metadata is not None:
        optimizer[METADATA_KEY] = dict(metadata)
    states = [model, optimizer, int(payload["step"]) - 1, dict(payload["ema"])]
    atomic_save(states, Path(dst))
    return Path(dst)


# -- files that describe themselves: the weights plus what rebuilds the UNet ---------------------------------------
WEIGHTS_FORMAT = "unlearning-bench/weights-1"
METADATA_KEY = "unlearning_bench"  # where a published ckpt.pth written by `bench export` keeps the metadata
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def model_metadata(unet: UNetConfig | dict, preset: str, **fields) -> dict[str, str]:
    """The metadata of an exported model, in a fixed order: the format, the preset, `fields` (method, variant,
    forget_class, seed, base_id) as strings, and the UNet configuration as JSON. Nothing that changes between two
    runs with the same weights (no time, no record), so the file's hash identifies the weights."""
    unet = dataclasses.asdict(unet) if isinstance(unet, UNetConfig) else dict(unet)
    return {"format": WEIGHTS_FORMAT, "preset": preset, **{key: str(value) for key, value in fields.items()},
            "unet": json.dumps(unet)}


def write_safetensors(state: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """`state` as a safetensors file (atomically) whose bytes depend only on the tensors and `metadata`.

    The safetensors package writes its metadata in a random order on each call, so identical weights hashed
    differently; here the header is the metadata in the given order, then the tensors by name, then their bytes
    in the same order (the layout the format specifies, little-endian as every supported machine is).
    """
    header, blobs, offset = {"__metadata__": {key: str(value) for key, value in metadata.items()}}, [], 0
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: cannot write dtype {tensor.dtype} to safetensors")
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors' own writer pads it
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(text)) + text)
            for blob in blobs:
                handle.write(blob)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when something above failed
    return path


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file in the file's order (the safetensors package returns it unordered)."""
    with open(path, "rb") as handle:
        start = handle.read(8)
        size = struct.unpack("<Q", start)[0] if len(start) == 8 else 1 << 27
        try:
            header = json.loads(handle.read(size)) if size < 1 << 27 else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header does not read)")
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def unet_from_metadata(metadata: dict[str, str], where: Path) -> ConditionalUNet:
    """An untrained UNet of the configuration in an exported file's metadata."""
    try:
        fields = json.loads(metadata["unet"])
        return ConditionalUNet(UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where} does not carry a usable UNet configuration ({type(exc).__name__}: {exc}); "
                              "export it again with `bench export`") from exc


def load_exported(path: str | Path) -> tuple[ConditionalUNet, dict[str, str]]:
    """A UNet rebuilt from a file `bench export` wrote (safetensors, or a published ckpt.pth) with nothing else:
    the model, with the exported weights, in eval mode, and the file's metadata."""
    path = Path(path)
    if path.suffix == ".safetensors":
        metadata, weights = safetensors_metadata(path), load_safetensors(str(path))
    else:
        states = read_published(path)
        metadata = states[1].get(METADATA_KEY) if isinstance(states[1], dict) else None
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{path} holds no `{METADATA_KEY}` metadata in its optimizer state; only files "
                                  "written by `bench export` carry the UNet configuration")
        weights = states[3] if len(states) == 4 else states[0]
    model = unet_from_metadata(metadata, path)
    expected = model.state_dict()
    model.load_state_dict(map_strictly(weights, expected, "the weights", path), strict=True)
    return model.eval(), metadata


# -- bench export --------------------------------------------------------------------------------------------------
def export_target(dst: Path, run_folder: Path, force: bool) -> Path:
    """`dst` resolved, refused where writing it would lose data: inside a run folder (its record and model are the
    run), a folder, or an existing file without `force`."""
    target = Path(dst).resolve()
    for parent in target.parents:
        if parent == run_folder or any((parent / name).exists() for name in (RECORD_NAME, FAILURE_NAME)):
            raise CheckpointError(f"--to {dst} is inside the run folder {parent}, whose files are the run's own "
                                  "record and weights; export to a path outside every run folder")
        try:
            parse_run_dir(parent)
        except ValueError:
            continue
        raise CheckpointError(f"--to {dst} is inside {parent}, a run folder; export to a path outside it")
    if target.is_dir():
        raise CheckpointError(f"--to {dst} is a folder; give the file to write, e.g. {Path(dst) / 'ckpt.pth'}")
    if target.exists() and not force:
        raise FileExistsError(f"--to {dst} already exists; pass --force to replace it")
    return target


def saved_model(record: dict, folder: Path) -> tuple[Path, str]:
    """The path of the run's `model.safetensors` (only ever inside `folder`) and its SHA-256 from `record`."""
    where = folder / RECORD_NAME
    saved = (record.get("artifacts") or {}).get("model")
    if not saved:
        raise CheckpointError(f"{folder} has no saved model; run it again with `bench run ... --save-model --force`")
    if not isinstance(saved, dict) or not all(isinstance(saved.get(key), str) for key in ("path", "sha256")):
        raise CheckpointError(f"{where}: artifacts.model should be {{\"path\": file name, \"sha256\": hex digest}}, "
                              f"found {str(saved)[:120]}; run it again with --save-model --force")
    source = (folder / saved["path"]).resolve()
    if source.parent != folder.resolve():
        raise CheckpointError(f"{where}: artifacts.model.path {saved['path']!r} points outside the run folder; a run "
                              "saves its model beside its record, so this record was edited: rerun it with --force")
    if not source.is_file():
        raise CheckpointError(f"{source} is missing; run it again with --save-model --force")
    return source, saved["sha256"]


def export_run(run: Path, fmt: str, dst: Path, force: bool = False) -> Path:
    """A run's saved weights (`model.safetensors`, checked against the hash in its record) written to `dst` as a
    published `ckpt.pth` (the evaluated weights as model and EMA) or as safetensors; both carry `model_metadata`.

    `run` is a run folder or its record. `dst` must lie outside every run folder, and replaces a file only with
    `force`. Returns the path written.
    """
    run = Path(run)
    folder = (run.parent if run.name == RECORD_NAME else run).resolve()
    if not (folder / RECORD_NAME).is_file():
        raise CheckpointError(f"{run} is not a run folder (no {RECORD_NAME} in it): give a run's folder, "
                              f"<results>/<preset>/<protocol>/<method>/<variant>/class<k>/seed<s>, or its {RECORD_NAME}")
    target = export_target(dst, folder, force)
    record = read_record(folder / RECORD_NAME)
    source, sha256 = saved_model(record, folder)
    if file_sha256(source) != sha256:
        raise CheckpointError(f"{source} does not match the hash in its record; run it again with --save-model --force")
    weights = load_safetensors(str(source))
    metadata = model_metadata(_unet_config(source, record["preset"]), record["preset"], method=record["method"],
                              variant=record["variant"], forget_class=record["forget_class"], seed=record["seed"],
                              base_id=record["base_model"].get("id"))
    if fmt == "safetensors":
        return write_safetensors(weights, target, metadata)
    iterations = record["timings"].get("iterations")
    payload = {"format": FORMAT, "kind": "diffusion", "model": weights, "ema": weights,
               "step": (iterations if isinstance(iterations, int) else 0) + 1,
               "recipe": {"lr": record["hyperparameters"].get("lr", 2e-4)}}
    return export_published_checkpoint(payload, target, metadata=metadata)


def _unet_config(source: Path, preset: str) -> dict:
    """The UNet configuration saved with the weights, or (files saved before it was) the registered preset's."""
    saved = safetensors_metadata(source).get("unet")
    if saved:
        try:
            return json.loads(saved)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{source}: its `unet` metadata is not JSON ({exc}); rerun the run with --force") from exc
    if preset not in PRESETS:
        raise CheckpointError(f"{source} predates saving the UNet configuration and preset {preset!r} is not "
                              "registered: pass its --preset-file to `bench`, or rerun the run with --force")
    return dataclasses.asdict(PRESETS[preset].unet)
