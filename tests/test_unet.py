"""The class-conditional UNet: the published SA/SalUn layout, the null class, and shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.config import UNETS
from bench.unet import NULL_CLASS, ConditionalUNet, count_parameters

KEYS_FILE = Path(__file__).parent / "data" / "sa-state-dict-keys.txt"


def _reference_shapes() -> dict[str, tuple[int, ...]]:
    """`name (d1, d2, ...)` per line, as listed from the published SA/SalUn checkpoint layout."""
    shapes = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line.strip():
            name, shape = line.split(" ", 1)
            shapes[name] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return shapes


@pytest.fixture(scope="module")
def sa_unet() -> ConditionalUNet:
    return ConditionalUNet(UNETS["sa"])


def test_sa_unet_has_the_published_parameter_count(sa_unet):
    assert count_parameters(sa_unet) == 38_632_323


def test_sa_unet_state_dict_matches_published_keys_and_shapes(sa_unet):
    reference = _reference_shapes()
    assert len(reference) == 334
    ours = {name: tuple(value.shape) for name, value in sa_unet.state_dict().items()}
    assert sorted(set(reference) - set(ours)) == []  # missing
    assert sorted(set(ours) - set(reference)) == []  # unexpected
    assert {k: v for k, v in ours.items() if reference[k] != v} == {}


@pytest.fixture(scope="module")
def tiny_unet() -> ConditionalUNet:
    torch.manual_seed(0)
    return ConditionalUNet(UNETS["tiny"]).eval()


def test_null_label_uses_null_classes_emb_only_for_null_rows(tiny_unet):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((4, 1, 8, 8), generator=gen)
    t = torch.tensor([10, 200, 600, 999])
    labels = torch.tensor([0, NULL_CLASS, 3, NULL_CLASS])
    with torch.no_grad():
        before = tiny_unet(x, t, labels)
        original = tiny_unet.null_classes_emb.detach().clone()
        try:
            tiny_unet.null_classes_emb.add_(torch.randn(original.shape, generator=gen))
            after = tiny_unet(x, t, labels)
        finally:
            tiny_unet.null_classes_emb.copy_(original)
    null_rows = labels == NULL_CLASS
    assert torch.equal(before[~null_rows], after[~null_rows])
    for row in null_rows.nonzero().flatten():
        assert not torch.allclose(before[row], after[row])


def test_null_label_differs_from_every_real_class(tiny_unet):
    # The null branch must not silently fall back to a real class's embedding (e.g. class 0 after clamping).
    with torch.no_grad():
        original = tiny_unet.null_classes_emb.detach().clone()
        try:
            tiny_unet.null_classes_emb.normal_(generator=torch.Generator().manual_seed(1))
            x = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(2)).expand(11, 1, 8, 8)
            out = tiny_unet(x, torch.full((11,), 300), torch.tensor([NULL_CLASS, *range(10)]))
        finally:
            tiny_unet.null_classes_emb.copy_(original)
    for label in range(10):
        assert not torch.allclose(out[0], out[label + 1])


@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_unet_output_shape_equals_input_shape(tiny_unet, batch):
    config = UNETS["tiny"]
    x = torch.randn((batch, config.in_channels, config.image_size, config.image_size))
    with torch.no_grad():
        out = tiny_unet(x, torch.randint(0, 1000, (batch,)), torch.randint(0, 10, (batch,)))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
