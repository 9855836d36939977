"""The evaluation classifiers: small CNNs for the small presets, torchvision's ResNet34 for CIFAR-10.

All expose `features(x)` (the penultimate layer, also FID features for the small presets) and `head`, and take
images in [-1, 1] at the data set's size. The head is linear, or cosine (bounded logits, see `CosineHead`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import metrics
from bench.config import ClassifierConfig
from bench.flops import count_forward

log = logging.getLogger(__name__)

ARCHS = ("small_cnn", "flat_cnn", "resnet34")
HEADS = ("linear", "cosine")
WEIGHTS = ("none", "imagenet")
# torchvision's ImageNet normalization, which its pretrained ResNets expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CosineHead(nn.Module):
    """Logits = scale * cos(features, class weight), as in NormFace (Wang et al., 2017).

    Bounded logits cap the confidence: an input unlike every class, such as noise, gets a flat distribution
    (high entropy) instead of a confident one, while clean images still reach near one-hot probabilities.
    """

    def __init__(self, dim: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.1)
        self.scale = scale

    def forward(self, features: Tensor) -> Tensor:
        return self.scale * F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t()


def make_head(config: ClassifierConfig, dim: int, num_classes: int) -> nn.Module:
    if config.head not in HEADS:
        raise ValueError(f"unknown classifier head {config.head!r}; choose from {', '.join(HEADS)}")
    return CosineHead(dim, num_classes, config.cosine_scale) if config.head == "cosine" else nn.Linear(dim, num_classes)


class SmallCNN(nn.Module):
    """Three 3x3 conv layers and global average pooling: 128-d features, then the head."""

    feature_dim = embedding_dim = 128

    def __init__(self, in_channels: int, num_classes: int, config: ClassifierConfig | None = None):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = make_head(config or ClassifierConfig(), self.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def embed(self, features: Tensor) -> Tensor:
        return features

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


class FlatCNN(nn.Module):
    """Two 3x3 conv layers and 2x2 max pooling; the flattened map (64 x (size/2)^2) is the feature vector.

    Without global pooling the features keep where the strokes are. On the 8x8 digits, with a cosine head and
    mixup, this is the classifier that labels saturated noise as one class (see the digits preset).
    The FID embedding pools the map to 2x2 (256-d): a few hundred samples per class cannot estimate a
    covariance in the 1,024 dimensions of the full map.
    """

    embedding_grid = 2

    def __init__(self, in_channels: int, num_classes: int, image_size: int, config: ClassifierConfig):
        super().__init__()
        self.map_size = image_size // 2
        self.feature_dim = 64 * self.map_size**2
        self.embedding_dim = 64 * min(self.embedding_grid, self.map_size) ** 2
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = make_head(config, self.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def embed(self, features: Tensor) -> Tensor:
        grid = features.view(len(features), 64, self.map_size, self.map_size)
        return F.adaptive_avg_pool2d(grid, min(self.embedding_grid, self.map_size)).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


class ResNetClassifier(nn.Module):
    """torchvision's ResNet34 with a `num_classes`-way head, as the reference's CIFAR-10 classifier.

    Images in [-1, 1] are resized to `input_size` (bilinear; 224 as in the reference), grey ones repeated to three
    channels, and normalized as torchvision's ImageNet models expect. `features` is the 512-d average pool.
    """

    feature_dim = embedding_dim = 512
    predict_batch = 128  # 224x224 activations: smaller chunks than the small CNN's

    def __init__(self, num_classes: int, input_size: int | None = 224, config: ClassifierConfig | None = None):
        super().__init__()
        from torchvision.models import resnet34

        self.input_size = input_size
        self.body = resnet34()
        self.body.fc = nn.Identity()
        self.head = make_head(config or ClassifierConfig(), self.feature_dim, num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def load_imagenet_weights(self) -> None:
        """torchvision's ImageNet weights for the body (downloaded, or found in torch hub's cache); the head stays."""
        from torchvision.models import ResNet34_Weights

        state = ResNet34_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        self.body.load_state_dict(state, strict=True)

    def features(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.input_size is not None and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        return self.body(x)

    def embed(self, features: Tensor) -> Tensor:
        return features

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build_classifier(config: ClassifierConfig, in_channels: int, num_classes: int,
                     image_size: int | None = None) -> nn.Module:
    """The untrained classifier `config` describes (weights are loaded or trained by bench.prerequisites)."""
    if config.weights not in WEIGHTS:
        raise ValueError(f"unknown classifier weights {config.weights!r}; choose from {', '.join(WEIGHTS)}")
    if config.arch == "small_cnn":
        return SmallCNN(in_channels, num_classes, config)
    if config.arch == "flat_cnn":
        if image_size is None:
            raise ValueError("the flat_cnn classifier needs the image size")
        return FlatCNN(in_channels, num_classes, image_size, config)
    if config.arch == "resnet34":
        return ResNetClassifier(num_classes, config.input_size, config)
    raise ValueError(f"unknown classifier arch {config.arch!r}; choose from {', '.join(ARCHS)}")


def load_classifier(payload: dict, preset, device: torch.device) -> nn.Module:
    """The classifier a checkpoint payload (`bench.prerequisites.train_classifier`) describes, in eval mode."""
    model = build_classifier(preset.classifier, payload["in_channels"], payload["num_classes"], preset.unet.image_size)
    model.load_state_dict(payload["model"])
    return model.to(device).eval()


def initialize(model: nn.Module, config: ClassifierConfig) -> tuple[str, dict[str, float]]:
    """Load pretrained weights where `config` asks for them; returns (what it starts from, lr per parameter).

    ImageNet weights that cannot be had (no network, nothing in torch hub's cache) fall back to training from
    scratch, with a warning; the returned description goes into the checkpoint and every record.
    """
    names = [name for name, _ in model.named_parameters()]
    if config.weights == "imagenet" and isinstance(model, ResNetClassifier):
        try:
            model.load_imagenet_weights()
        except Exception as exc:  # offline: URLError; a proxy page: an unpickling or size error
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("ImageNet weights for ResNet34 unavailable (%s); training it from scratch", reason)
            lr = config.scratch_lr or config.lr
            return f"trained from scratch (ImageNet weights unavailable: {reason})", dict.fromkeys(names, lr)
        body_lr = config.body_lr or config.lr
        lrs = {name: config.lr if name.startswith("head.") else body_lr for name in names}
        return "fine-tuned from torchvision's ImageNet weights (IMAGENET1K_V1)", lrs
    return "trained from scratch", dict.fromkeys(names, config.scratch_lr or config.lr)


def random_shift(x: Tensor, pixels: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to `pixels` in x and y, filling with the background value -1."""
    if pixels == 0:
        return x
    size = x.shape[-1]
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return padded[..., offsets[0] : offsets[0] + size, offsets[1] : offsets[1] + size]


@torch.no_grad()
def predict(classifier: nn.Module, images: Tensor, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Softmax probabilities and FID embeddings (from the penultimate layer) of `images`, on the CPU."""
    batch_size = batch_size or getattr(classifier, "predict_batch", 1000)
    classifier.eval()
    device = next(classifier.parameters()).device
    probs, feats = [], []
    count_forward("classifier", classifier, len(images),
                  lambda: _logits_and_embedding(classifier, images[:1].to(device).float()), tuple(images.shape[1:]))
    for chunk in images.split(batch_size):
        logits, embedding = _logits_and_embedding(classifier, chunk.to(device).float())
        probs.append(F.softmax(logits, dim=1).cpu())
        feats.append(embedding.cpu())
    return torch.cat(probs), torch.cat(feats)


def _logits_and_embedding(classifier: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    features = classifier.features(images)
    return classifier.head(features), classifier.embed(features)


NOISE_KINDS = ("gaussian", "uniform", "saturated")


def noise_images(kind: str, count: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Noise as unlearned models make it: N(0, I) clamped to [-1, 1], U[-1, 1] (SA's target), or +-1 pixels
    (what the sampler's final clamp makes of a model that stopped denoising, as SAFEMax's does)."""
    if kind == "gaussian":
        return torch.randn((count, *shape), generator=generator).clamp(-1, 1)
    if kind == "uniform":
        return torch.rand((count, *shape), generator=generator) * 2 - 1
    if kind == "saturated":
        return torch.randint(0, 2, (count, *shape), generator=generator).float() * 2 - 1
    raise ValueError(f"unknown noise kind {kind!r}; choose from {', '.join(NOISE_KINDS)}")


def noise_check(classifier: nn.Module, shape: tuple[int, ...], count: int = 1000, seed: int = 0) -> dict[str, dict]:
    """How the classifier labels each kind of noise: favourite class, its share, mean entropy, histogram.

    A classifier that spreads noise over several classes makes UA dip on each of them for methods that output
    noise; the paper's ResNet34 puts CIFAR-10 noise in one class ("bird") with high entropy.
    """
    generator = torch.Generator().manual_seed(seed)
    return {kind: metrics.noise_prediction(predict(classifier, noise_images(kind, count, shape, generator))[0])
            for kind in NOISE_KINDS}


def describe_noise_check(check: dict[str, dict]) -> str:
    return "; ".join(f"{kind} noise -> class {c['top_class']} ({100 * c['top_fraction']:.0f}%, H {c['entropy']:.2f})"
                     for kind, c in check.items())
