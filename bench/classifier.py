"""The evaluation classifier: a small CNN for the small presets, with a penultimate feature layer for FID."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.config import ClassifierConfig


class SmallCNN(nn.Module):
    """Three 3x3 conv layers and global average pooling: 128-d features, then a linear head."""

    feature_dim = 128

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


def build_classifier(config: ClassifierConfig, in_channels: int, num_classes: int) -> nn.Module:
    if config.arch == "small_cnn":
        return SmallCNN(in_channels, num_classes)
    raise ValueError(f"unknown classifier arch {config.arch!r}; choose from small_cnn")


def random_shift(x: Tensor, pixels: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to `pixels` in x and y, filling with the background value -1."""
    if pixels == 0:
        return x
    size = x.shape[-1]
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return padded[..., offsets[0] : offsets[0] + size, offsets[1] : offsets[1] + size]


@torch.no_grad()
def predict(classifier: nn.Module, images: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """Softmax probabilities and penultimate features of `images` (any device), returned on the CPU."""
    classifier.eval()
    device = next(classifier.parameters()).device
    probs, feats = [], []
    for chunk in images.split(batch_size):
        features = classifier.features(chunk.to(device).float())
        probs.append(F.softmax(classifier.head(features), dim=1).cpu())
        feats.append(features.cpu())
    return torch.cat(probs), torch.cat(feats)
