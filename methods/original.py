"""No unlearning: the pretrained model as it is, the baseline row of every table."""

from __future__ import annotations

from dataclasses import dataclass

from methods.base import MethodConfig, UnlearningMethod


@dataclass(frozen=True)
class OriginalConfig(MethodConfig):
    iterations: int = 0
    ema: bool = True  # evaluated with the base model's EMA weights, as the reference evaluates its models


class Original(UnlearningMethod):
    name = "original"
    Config = OriginalConfig
    description = "no unlearning: the pretrained model (baseline)"
