"""A small Python API over the harness: a run's model, samples from it, and the preset's classifier on images.

    from bench import api

    model, record = api.load_run("results/digits/paper/safemax/default/class3/seed0")   # saved with --save-model
    images = api.sample(model, label=3, n=64, preset="digits", seed=0)   # uint8 (64, C, H, W), as the metrics see them
    api.evaluate_images(images, "digits", label=3)                       # {"ua": ..., "entropy": ..., ...}
    api.evaluate_images("my-pngs/", "digits", label=3)                   # a folder of image files

Every function is a thin layer over the code a run uses: the record reader and hash check (`bench.records`,
`bench.checkpoints`), the evaluation sampler (`bench.evaluate.Sampler`, so `sample(folder, ...)` with the run's seed
draws the very images its record was measured on), and the cached classifier (`bench.prerequisites`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors
from torch import Tensor

from bench import metrics
from bench.cache import Cache, CheckpointError
from bench.checkpoints import file_sha256
from bench.classifier import load_classifier, predict
from bench.config import Preset, Protocol, get_preset
from bench.data import from_uint8
from bench.device import Speed, pick_device
from bench.diffusion import NoiseSchedule
from bench.evaluate import Sampler
from bench.prerequisites import load_classifier_payload
from bench.records import RECORD_NAME, read_record
from bench.unet import ConditionalUNet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    try:
        return get_preset(preset)
    except ValueError as exc:
        raise ValueError(f"{exc} (a preset from a file: bench.extensions.load_preset_file(path) first)") from None


def load_run(folder: str | Path, device: str | torch.device | None = None) -> tuple[ConditionalUNet, dict]:
    """(the run's unlearned model in eval mode on `device`, its record) from a run folder or its record.json.

    The weights are the `model.safetensors` that `bench run --save-model` kept (the evaluated weights: EMA where the
    method uses it), checked against the SHA-256 in the record.
    """
    folder = Path(folder)
    folder = folder.parent if folder.name == RECORD_NAME else folder
    if not (folder / RECORD_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no {RECORD_NAME}: give a run folder "
                                "(<results>/<preset>/<protocol>/<method>/<variant>/class<k>/seed<s>)")
    record = read_record(folder / RECORD_NAME)
    saved = record["artifacts"].get("model")
    if not saved:
        raise CheckpointError(f"{folder} has no saved model; run it again with `bench run ... --save-model --force`")
    path = folder / saved["path"]
    if not path.is_file() or file_sha256(path) != saved["sha256"]:
        raise CheckpointError(f"{path} is missing or does not match the hash in its record; run it again with "
                              "--save-model --force")
    preset = _preset(record["preset"])
    model = ConditionalUNet(preset.unet)
    try:
        model.load_state_dict(load_safetensors(str(path)))
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the UNet of preset {preset.name!r} (changed since the run?): "
                              f"{str(exc).splitlines()[0]}") from None
    model.run_record = record  # lets `sample(model, ...)` use the run's preset, protocol and numerics
    return model.to(pick_device(device)).eval(), record


def sample(model_or_folder: ConditionalUNet | str | Path, label: int, n: int, *, seed: int = 0,
           preset: str | Preset | None = None, protocol: str | None = None, device: str | None = None,
           progress: bool = False) -> Tensor:
    """`n` images of class `label` as uint8 (n, C, H, W), drawn and quantised by the evaluation sampler.

    From a run folder (or a model `load_run` returned): the run's preset, protocol and speed switches, so the run's
    own seed gives the samples its metrics were computed on. From any other model: `preset` is needed, and
    `protocol` names one of its protocols (default: the preset's). `bench.data.from_uint8` maps them to [-1, 1].
    """
    if isinstance(model_or_folder, (str, Path)):
        model, _ = load_run(model_or_folder, device)
    else:
        model = model_or_folder
    record = getattr(model, "run_record", None)
    if preset is None and record is None:
        raise ValueError("sample(model, ...) needs preset=NAME for a model that load_run did not return")
    preset_obj = _preset(preset if preset is not None else record["preset"])
    if protocol is not None or record is None:
        chosen = preset_obj.protocol(protocol)
    else:
        chosen = Protocol(**record["protocol"])
    speed = Speed(**record["speed"]["switches"]) if record is not None and protocol is None else None
    if not 0 <= label < preset_obj.num_classes:
        raise ValueError(f"label {label} is not a class of preset {preset_obj.name} (0-{preset_obj.num_classes - 1})")
    run_device = next(model.parameters()).device
    sampler = Sampler(model, NoiseSchedule(preset_obj.diffusion, run_device), chosen, preset_obj, run_device, seed,
                      progress=progress, speed=speed)
    return sampler.class_samples(label, n)


def read_images(folder: str | Path, preset: str | Preset) -> Tensor:
    """The image files of `folder` (sorted by name) as uint8 (N, C, H, W) in the preset's channels; each must have
    the preset's image size (resizing would change what the classifier sees)."""
    from PIL import Image

    preset_obj, folder = _preset(preset), Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    mode, size = ("L" if preset_obj.unet.in_channels == 1 else "RGB"), preset_obj.unet.image_size
    images = []
    for path in files:
        with Image.open(path) as image:
            if image.size != (size, size):
                raise ValueError(f"{path} is {image.size[0]}x{image.size[1]}; preset {preset_obj.name} evaluates "
                                 f"{size}x{size} images")
            pixels = torch.from_numpy(np.array(image.convert(mode), dtype=np.uint8))
        images.append(pixels.reshape(size, size, -1).permute(2, 0, 1))
    return torch.stack(images)


def evaluate_images(images: Tensor | str | Path, preset: str | Preset, label: int, *, cache: str | Path | None = None,
                    device: str | None = None) -> dict:
    """What the preset's evaluation classifier says about images meant to be class `label`.

    `images`: uint8 (N, C, H, W) as `sample` returns, floats in [-1, 1], or a folder of image files. Returns the
    record's forget-class metrics (`ua`: % not labelled `label`; `entropy`: mean entropy in nats; `forget_prob`:
    mean probability of `label`; `forget_histogram`: predicted classes; `forget_samples`) and `accuracy`
    (% labelled `label`: retained accuracy, for a retained class). The classifier is the one in `cache`
    (default: $BENCH_CACHE), as `bench run` built it.
    """
    preset_obj = _preset(preset)
    if isinstance(images, (str, Path)):
        images = read_images(images, preset_obj)
    if not 0 <= label < preset_obj.num_classes:
        raise ValueError(f"label {label} is not a class of preset {preset_obj.name} (0-{preset_obj.num_classes - 1})")
    payload = load_classifier_payload(preset_obj, Cache(cache))
    classifier = load_classifier(payload, preset_obj, pick_device(device))
    pixels = from_uint8(images) if images.dtype == torch.uint8 else images.float()
    probs, _ = predict(classifier, pixels)
    found = metrics.forget_metrics(probs, label)
    return {**found, "accuracy": 100.0 - found["ua"], "classifier": payload["id"]}
