"""Checkpoints of the published SA/SalUn DDPM code, to and from our self-describing format.

The published `ckpt.pth` is a list [model state dict, optimizer state, step] with the EMA shadow appended when
EMA is on (clear-nus/selective-amnesia and OPTML-Group/Unlearn-Saliency, `ddpm/runners/diffusion.py`). The model
was wrapped in DataParallel, so its keys start with `module.`; the EMA helper unwraps it, so its keys usually do
not (either is accepted). `step` is the 0-based index of the last iteration, so a checkpoint saved after n
iterations says n - 1; ours store n. Published files are pickles from the internet: they are read with
`torch.load(weights_only=True)` only, and a file that needs anything more is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from torch import Tensor

from bench.cache import FORMAT, Cache, CheckpointError, atomic_save, load_error, refusal
from bench.config import Preset
from bench.records import RECORD_NAME, read_record
from bench.unet import ConditionalUNet

log = logging.getLogger(__name__)

PREFIX = "module."


def read_published(src: Path) -> list:
    """The published list, loaded without arbitrary unpickling; errors name the file and the problem."""
    try:
        states = torch.load(src, map_location="cpu", weights_only=True)
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
    if isinstance(states[2], bool) or not isinstance(states[2], (int, Tensor)):
        raise CheckpointError(f"{src}: the third item should be the step (an integer), found {states[2]!r}")
    step = int(states[2]) + 1
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


def export_published_checkpoint(payload: dict, dst: Path, lr: float | None = None) -> Path:
    """Write our diffusion checkpoint `payload` as a published `ckpt.pth` that the SA/SalUn code loads.

    Model keys get the `module.` prefix, the EMA shadow is appended without it (as the EMA helper saves it),
    `step` becomes the 0-based index, and the optimizer state is a fresh Adam state (ours are not kept).
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
    states = [model, optimizer, int(payload["step"]) - 1, dict(payload["ema"])]
    atomic_save(states, Path(dst))
    return Path(dst)


def export_run(run: Path, fmt: str, dst: Path) -> Path:
    """A run's saved weights (`model.safetensors`, checked against the hash in its record) written to `dst` as a
    published `ckpt.pth` (the evaluated weights as model and EMA) or as a safetensors copy."""
    folder = run.parent if run.name == RECORD_NAME else run
    record = read_record(folder / RECORD_NAME)
    saved = record.get("artifacts", {}).get("model")
    if not saved:
        raise CheckpointError(f"{folder} has no saved model; run it again with `bench run ... --save-model --force`")
    source = folder / saved["path"]
    if file_sha256(source) != saved["sha256"]:
        raise CheckpointError(f"{source} does not match the hash in its record; run it again with --save-model --force")
    if fmt == "safetensors":
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dst)
        return dst
    weights = load_safetensors(str(source))
    payload = {"format": FORMAT, "kind": "diffusion", "model": weights, "ema": weights,
               "step": int(record["timings"].get("iterations") or 0) + 1,
               "recipe": {"lr": record["hyperparameters"].get("lr", 2e-4)}}
    return export_published_checkpoint(payload, dst)
