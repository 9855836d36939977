"""The published SA/SalUn behaviours the `cifar10` preset reproduces (docs/fidelity.md), one test each."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from bench.config import UNETS, DiffusionConfig, get_preset
from bench.data import ClassDataset, to_uint8, training_batches
from bench.device import PLAIN
from bench.diffusion import NoiseSchedule, sample
from bench.runner import Trainer, make_optimizer
from bench.unet import NULL_CLASS, ConditionalUNet
from methods import get_method
from methods.gradient_ascent import GradientAscent
from methods.sa import SelectiveAmnesia, diagonal_fisher
from methods.salun import SalUn, top_fraction_mask
from methods.sfron import FISHER_FLIP_SEED, SFROn


class Recording(torch.nn.Module):
    """Wraps a UNet and keeps every label and timestep batch it was called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.labels, self.steps = model, [], []

    def forward(self, x, t, labels):
        self.labels.append(labels.detach().clone())
        self.steps.append(t.detach().clone())
        return self.model(x, t, labels)


def tiny_context(num_images: int = 64, seed: int = 0):
    from bench.perf import Bench, PerfOptions

    options = PerfOptions.for_preset("tiny", seed=seed, images_per_class=num_images)
    return Bench(get_preset("tiny"), options, torch.device("cpu"))


def test_cifar10_defaults_are_the_published_values():
    preset = get_preset("cifar10")
    resolved = {name: dataclasses.replace(get_method(name).Config(), **get_method(name).preset_defaults(preset))
                for name in ("sa", "salun", "ga", "retrain", "safemax", "sfron")}
    sa, salun, ga, retrain = resolved["sa"], resolved["salun"], resolved["ga"], resolved["retrain"]
    assert (sa.iterations, sa.batch_size, sa.lr, sa.lam, sa.gamma, sa.label_dropout, sa.hflip) == \
        (20_000, 128, 1e-4, 10.0, 1.0, 0.0, "every_draw")
    assert (sa.fim_label_dropout, sa.fim_inputs, sa.fim_timesteps, sa.prior_samples_per_class) == (0.1, "unit", 0, 500)
    assert (salun.iterations, salun.lr, salun.alpha, salun.sparsity, salun.pseudo, salun.hflip, salun.ema) == \
        (1000, 1e-4, 1e-3, 0.5, "next", "once", False)
    assert (ga.variant, ga.alpha, ga.label_dropout, ga.iterations, ga.mask) == ("salun", 1e-3, 0.1, 1000, "none")
    assert resolved["sfron"].fisher_hflip == "once"  # `cifar10_fisher.yml`: random_flip true
    assert (retrain.iterations, retrain.lr, retrain.hflip, retrain.ema_decay) == (800_000, 2e-4, "every_draw", 0.9999)
    assert all(p.image_conversion == "stretch" for p in preset.protocols.values())


def test_sa_replay_term_never_uses_the_null_class():
    bench = tiny_context()
    config = dataclasses.replace(SelectiveAmnesia.Config(), batch_size=64)
    method = SelectiveAmnesia(config, bench.context())
    method.prepared = {"priors.images": to_uint8(bench.data.images), "priors.labels": bench.data.labels}
    model = Recording(bench.model())
    method.ewc = lambda _: torch.zeros(())
    batches = method.batches()
    for _ in range(5):
        method.loss(model, next(batches))
    assert not any((labels == NULL_CLASS).any() for labels in model.labels)


def test_sa_fisher_gives_the_null_embedding_mass_through_label_dropout():
    torch.manual_seed(0)
    model = ConditionalUNet(UNETS["tiny"]).eval()
    schedule = NoiseSchedule(DiffusionConfig(timesteps=20))
    images, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 4, 9, 2])
    steps = torch.arange(20)

    def fisher(dropout):
        return diagonal_fisher(model, schedule, images, labels, steps, 1.0, torch.Generator().manual_seed(3),
                               batch_size=2, timestep_chunk=7, label_dropout=dropout)

    assert float(fisher(0.0)["null_classes_emb"].sum()) == 0.0
    assert float(fisher(0.1)["null_classes_emb"].sum()) > 0.0
    # every term on the null class: the class rows get nothing, the null embedding everything
    everything = fisher(1.0)
    assert float(everything["classes_emb.weight"].sum()) == 0.0 and float(everything["null_classes_emb"].sum()) > 0


def test_stretch_matches_torchvision_save_image_normalize():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand((6, 3, 8, 8), generator=gen) * 0.5 - 0.2  # low contrast, inside [-1, 1]
    images[1] = images[1] * 4  # partly outside [-1, 1]: clamped first, as inverse_data_transform does
    published = []
    for image in images:
        buffer = io.BytesIO()
        save_image(((image + 1) / 2).clamp(0, 1), buffer, format="png", normalize=True)  # inverse_data_transform
        published.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue()))).transpose(2, 0, 1))
    stretched = to_uint8(images, "stretch")
    assert torch.equal(stretched, torch.from_numpy(np.stack(published)))
    assert stretched.flatten(1).min(1).values.tolist() == [0] * 6 and stretched.flatten(1).max(1).values.tolist() == \
        [255] * 6
    clamped = to_uint8(images, "clamp")
    assert int(clamped[0].min()) > 80 and int(clamped[0].max()) < 180  # a low-contrast image stays low-contrast


def asymmetric_images(count: int) -> ClassDataset:
    images = torch.zeros(count, 1, 4, 4)
    images[:, :, :, 0] = 1.0  # a bright left column: flipped images have it on the right
    return ClassDataset(images, torch.zeros(count, dtype=torch.long), ("a",), "test")


def flipped(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0, 0, -1] == 1.0


def test_every_draw_flips_at_the_published_rate():
    data = asymmetric_images(1000)
    batches = training_batches(data, 1000, torch.Generator().manual_seed(0), "every_draw")
    rates = [float(flipped(next(batches)[0]).float().mean()) for _ in range(4)]
    assert all(abs(rate - 0.5) < 0.05 for rate in rates)  # 5 standard deviations of a binomial(1000, 0.5)


def test_once_fixes_each_images_flip_for_the_whole_run():
    data = asymmetric_images(200)
    data.labels = torch.arange(200)  # to follow each image through the shuffles
    batches = training_batches(data, 50, torch.Generator().manual_seed(0), "once")
    seen: dict[int, set] = {}
    for _ in range(16):  # four epochs
        x, y = next(batches)
        for label, is_flipped in zip(y.tolist(), flipped(x).tolist()):
            seen.setdefault(label, set()).add(is_flipped)
    assert len(seen) == 200 and all(len(states) == 1 for states in seen.values())
    assert 0.35 < sum(True in states for states in seen.values()) / 200 < 0.65


def test_loaders_keep_the_short_last_batch_of_each_epoch():
    data = asymmetric_images(10)
    batches = training_batches(data, 4, torch.Generator().manual_seed(0), "none")
    assert [len(next(batches)[0]) for _ in range(6)] == [4, 4, 2, 4, 4, 2]


def test_salun_mask_keeps_the_floor_of_half_the_weights():
    scores = {"a": torch.rand(3, 3), "b": torch.rand(2)}  # 11 weights: int(5.5) = 5 move
    assert sum(int(m.sum()) for m in top_fraction_mask(scores, 0.5).values()) == 5


def test_sampler_runs_the_published_step_sequence_from_t_999():
    schedule = NoiseSchedule(DiffusionConfig())
    assert len(schedule.sampler_steps(300)) == 334 and schedule.sampler_steps(300)[-1] == 999
    model = Recording(ConditionalUNet(UNETS["tiny"]).eval())
    sample(model, schedule, torch.zeros(2, dtype=torch.long), (1, 8, 8), steps=300, eta=1.0, guidance=0.0,
           generator=torch.Generator().manual_seed(0))
    visited = [int(t[0]) for t in model.steps]
    assert visited[0] == 999 and visited[-1] == 0 and len(visited) == 334


def test_null_embedding_starts_standard_normal():
    torch.manual_seed(0)
    null = ConditionalUNet(UNETS["sa"]).null_classes_emb.detach()
    assert null.abs().min() > 0 and 0.7 < float(null.std()) < 1.3 and abs(float(null.mean())) < 0.3


@pytest.mark.parametrize("variant, retained, dropped", [("salun", True, True), ("plain", False, False)])
def test_ga_variants(variant, retained, dropped):
    bench = tiny_context(num_images=256)
    config = dataclasses.replace(GradientAscent.Config(), batch_size=256, variant=variant)
    method = GradientAscent(config, bench.context())
    model = Recording(bench.model())
    terms = method.loss(model, next(method.batches()))  # CPU batches: the CPU is the device here
    assert ("retain" in terms) == retained
    forget_labels = model.labels[-1]
    assert bool((forget_labels == NULL_CLASS).any()) == dropped
    if retained:
        assert torch.allclose(terms["loss"], -terms["forget"] + config.alpha * terms["retain"])


def test_sfron_fisher_reads_each_image_flipped_once_as_published():
    bench = tiny_context()
    values = {**SFROn.preset_defaults(bench.preset), "fisher_hflip": "once"}
    method = SFROn(dataclasses.replace(SFROn.Config(), **values), bench.context())
    data = asymmetric_images(1000)
    rate = float(flipped(method.fisher_images(data, FISHER_FLIP_SEED).images).float().mean())
    assert abs(rate - 0.5) < 0.05
    unflipped = SFROn(dataclasses.replace(method.config, fisher_hflip="none"), bench.context())
    assert not bool(flipped(unflipped.fisher_images(data, FISHER_FLIP_SEED).images).any())


def test_ga_saliency_mask_option_is_salun_mask_applied_after_clipping():
    bench = tiny_context()
    config = dataclasses.replace(GradientAscent.Config(), **GradientAscent.preset_defaults(bench.preset))
    assert GradientAscent(config, bench.context()).cache_key() is None
    assert GradientAscent(config, bench.context()).grad_mask() is None
    masked = GradientAscent(dataclasses.replace(config, mask="saliency"), bench.context())
    masked.prepared = masked.prepare()
    salun_config = dataclasses.replace(SalUn.Config(), **SalUn.preset_defaults(bench.preset))
    salun_mask = SalUn(salun_config, bench.context()).prepare()
    assert masked.prepared.keys() == salun_mask.keys()
    assert all(torch.equal(masked.prepared[name], salun_mask[name]) for name in salun_mask)
    assert masked.cache_key() != GradientAscent(config, bench.context(1)).cache_key()
    model = bench.model()
    trainer = Trainer(model, make_optimizer(list(model.parameters()), 1e-4, PLAIN, torch.device("cpu")),
                      torch.device("cpu"), PLAIN, 1.0, masked.grad_mask())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    masked.update(0, trainer, next(masked.batches()))
    moved = {name: ~torch.isclose(p.detach(), before[name], rtol=0, atol=0) for name, p in model.named_parameters()}
    assert all(not bool(moved[name][~salun_mask[f"mask.{name}"]].any()) for name in moved)
    assert any(bool(moved[name].any()) for name in moved)


def test_ga_mask_option_is_checked():
    with pytest.raises(ValueError, match="mask"):
        GradientAscent.Config(mask="salun")


def test_digits_lists_every_behaviour_it_changes():
    from bench.sweep import resolve_method_config

    _, config, scaled = resolve_method_config(get_preset("digits"), "sa")
    assert config.hflip == "none" and scaled["hflip"] == {"paper": "every_draw", "preset": "none"}
    assert scaled["lam"] == {"paper": 10.0, "preset": 0.001}


def test_cifar10_pretraining_backbone_and_protocol_are_the_published_values():
    from bench.unet import count_parameters

    preset = get_preset("cifar10")
    recipe, paper, unet = preset.pretrain, preset.protocol("paper"), preset.unet
    assert (recipe.iterations, recipe.batch_size, recipe.lr, recipe.ema_decay, recipe.grad_clip,
            recipe.label_dropout, recipe.hflip, recipe.lr_warmdown, recipe.ema) == \
        (800_000, 128, 2e-4, 0.9999, 1.0, 0.1, "every_draw", 0.0, True)
    assert (preset.diffusion.timesteps, preset.diffusion.beta_start, preset.diffusion.beta_end) == (1000, 1e-4, 0.02)
    assert (unet.ch, unet.ch_mult, unet.num_res_blocks, unet.attn_resolutions, unet.dropout) == \
        (128, (1, 2, 2, 2), 2, (16,), 0.1)
    assert count_parameters(ConditionalUNet(unet)) == 38_632_323
    assert (paper.sampler_steps, paper.eta, paper.guidance, paper.forget_samples, paper.retain_samples_per_class,
            paper.fid_features, paper.fid_reference_per_class, paper.image_conversion) == \
        (1000, 1.0, 2.0, 500, 5000, "inception", None, "stretch")
    classifier = preset.classifier
    assert (classifier.arch, classifier.weights, classifier.input_size, classifier.body_lr, classifier.lr) == \
        ("resnet34", "imagenet", 224, 1e-5, 1e-4)
