"""The registry of unlearning methods: a dict of classes that also feeds the CLI's choices."""

from __future__ import annotations

from methods.base import Context, MethodConfig, UnlearningMethod
from methods.gradient_ascent import GradientAscent, NegGradPlus
from methods.original import Original
from methods.retrain import Retrain
from methods.sa import SelectiveAmnesia
from methods.safemax import SafeMax
from methods.salun import SalUn

METHODS: dict[str, type[UnlearningMethod]] = {
    cls.name: cls for cls in (Original, SafeMax, SelectiveAmnesia, SalUn, Retrain, GradientAscent, NegGradPlus)
}


def get_method(name: str) -> type[UnlearningMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def parse_methods(spec: str) -> list[str]:
    """'all' or a comma-separated list of method names, each checked against the registry."""
    names = list(METHODS) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no method given; choose from all, {', '.join(METHODS)}")
    for name in names:
        get_method(name)
    return names


__all__ = ["METHODS", "Context", "MethodConfig", "UnlearningMethod", "get_method", "parse_methods"]
