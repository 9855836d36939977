"""No unlearning: the pretrained model as it is, the baseline row of every table."""

from __future__ import annotations

from dataclasses import dataclass

from bench.config import TrainConfig
from methods.base import UnlearningMethod, register


@dataclass(frozen=True)
class OriginalConfig(TrainConfig):
    iterations: int = 0
    ema: bool = True  # evaluated with the base model's EMA weights, as the reference evaluates its models


@register
class Original(UnlearningMethod):
    name = "original"
    Config = OriginalConfig
    display_name = "Original"
    description = "no unlearning: the pretrained model (baseline)"
    bf16_measured = True  # docs/bf16.md
