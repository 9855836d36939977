"""Published SA/SalUn checkpoints: our `sa` UNet saved in the published layout imports strictly and predicts the same.

The round trip uses the real 38.6 M-parameter backbone (the `cifar10` preset); the refusals use the `tiny` preset,
whose checkpoints have the same layout and are quick to write.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from bench.cache import Cache, CheckpointError, load_checkpoint
from bench.checkpoints import export_published_checkpoint, import_published_checkpoint
from bench.config import get_preset
from bench.prerequisites import pretrain
from bench.unet import ConditionalUNet


def published_states(model: ConditionalUNet, step: int, ema_prefix: str = "") -> list:
    """What the published training loop saves: [DataParallel state dict, Adam state, step, EMA shadow]."""
    torch.manual_seed(1)
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=2e-4)
    params[0].grad = torch.randn_like(params[0])  # Adam keeps state only for parameters that had a gradient
    optimizer.step()
    params[0].grad = None
    ema = {ema_prefix + name: param.detach() + 0.01 * torch.randn_like(param) for name, param in model.named_parameters()}
    model_state = {"module." + key: value for key, value in model.state_dict().items()}
    return [model_state, optimizer.state_dict(), step, ema]


def fresh_model(preset_name: str) -> ConditionalUNet:
    torch.manual_seed(0)
    return ConditionalUNet(get_preset(preset_name).unet).eval()


def predict(model: ConditionalUNet, image_size: int, channels: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, channels, image_size, image_size, generator=generator)
    with torch.no_grad():
        return model(x, torch.tensor([10, 700]), torch.tensor([3, -1]))


@pytest.mark.slow
def test_published_sa_checkpoint_imports_strictly_and_predicts_the_same(tmp_path):
    preset = get_preset("cifar10")
    original = fresh_model("cifar10")
    states = published_states(original, step=799_999)
    src = tmp_path / "ckpt.pth"
    torch.save(states, src)
    cache = Cache(tmp_path / "cache")

    path = import_published_checkpoint(src, preset, cache)

    payload = load_checkpoint(path, "diffusion", preset, rebuild="import it again")
    assert path == cache.base_path(preset)
    assert payload["step"] == 800_000 and payload["source"] == f"imported from {src.resolve()}"
    imported = ConditionalUNet(preset.unet).eval()
    imported.load_state_dict(payload["model"])  # strict
    assert torch.equal(predict(imported, 32, 3), predict(original, 32, 3))
    assert all(torch.equal(payload["ema"][name], value) for name, value in states[3].items())

    # And back: the exported file carries the same weights under the published names.
    back = torch.load(export_published_checkpoint(payload, tmp_path / "back.pth"), weights_only=True)
    assert back[2] == 799_999 and back[0].keys() == states[0].keys()
    assert all(torch.equal(back[0][key], value) for key, value in states[0].items())


def test_ema_keys_with_the_dataparallel_prefix_are_accepted(tmp_path):
    preset = get_preset("tiny")
    states = published_states(fresh_model("tiny"), step=9, ema_prefix="module.")
    torch.save(states, tmp_path / "ckpt.pth")
    payload = torch.load(import_published_checkpoint(tmp_path / "ckpt.pth", preset, Cache(tmp_path)), weights_only=True)
    assert all(torch.equal(payload["ema"][name.removeprefix("module.")], value) for name, value in states[3].items())


@pytest.mark.parametrize("change, named", [
    (lambda state: state.update({"module.extra.weight": torch.zeros(3)}), "module.extra.weight"),
    (lambda state: state.pop("module.conv_out.bias"), "module.conv_out.bias"),
])
def test_an_unexpected_or_missing_key_is_refused_by_name(tmp_path, change, named):
    states = published_states(fresh_model("tiny"), step=9)
    change(states[0])
    torch.save(states, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        import_published_checkpoint(tmp_path / "ckpt.pth", get_preset("tiny"), Cache(tmp_path / "cache"))
    assert not Cache(tmp_path / "cache").base_path(get_preset("tiny")).exists()


class TouchOnUnpickle:
    """An object whose unpickling runs code (creates a file): what a malicious checkpoint would hold."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_file_that_needs_arbitrary_unpickling_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    states = published_states(fresh_model("tiny"), step=9)
    torch.save(states + [TouchOnUnpickle(marker)], tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match="arbitrary unpickling.*Unsupported global"):
        import_published_checkpoint(tmp_path / "ckpt.pth", get_preset("tiny"), Cache(tmp_path / "cache"))
    assert not marker.exists()


@pytest.mark.slow
def test_pretraining_is_reproducible_whatever_the_process_drew_before(tmp_path):
    # The base model every run starts from must be the same on every machine and in every process for one seed.
    preset = get_preset("tiny")
    first = pretrain(preset, Cache(tmp_path / "a"), torch.device("cpu"), progress=False)
    torch.rand(1000)  # what an earlier step of the same process might have drawn
    second = pretrain(preset, Cache(tmp_path / "b"), torch.device("cpu"), progress=False)
    for name, value in first["model"].items():
        assert torch.equal(value, second["model"][name]), name
