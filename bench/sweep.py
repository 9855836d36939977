"""The grid a `bench run` asks for: forget classes, seeds, swept values -> one RunSpec per run.

`--set method.field=v1,v2` sweeps a method hyperparameter and `--set protocol.field=v` changes the evaluation;
`--speed switch=v` sets how runs are computed. Values are parsed to the field's declared type (`none` for an
optional one) and checked by the config itself, before any work starts; errors name the valid keys.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from dataclasses import dataclass

from bench import records
from bench.config import Preset, Protocol
from bench.experiment import RunSpec
from bench.runner import Speed
from methods import get_method


def parse_classes(spec: str, num_classes: int) -> list[int]:
    """'0-9', '0,3,7' or a mix like '0-2,5'; every class must exist in the preset."""
    classes: list[int] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                classes.extend(range(low, high + 1))
            else:
                classes.append(int(part))
        except ValueError:
            raise ValueError(f"cannot read class list {spec!r}: use forms like 0-9 or 0,3,7") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"class(es) {bad or spec!r} not in this preset, which has classes 0-{num_classes - 1}")
    return sorted(set(classes))


def parse_seeds(spec: str) -> list[int]:
    try:
        return sorted({int(p) for p in str(spec).split(",") if p.strip()})
    except ValueError:
        raise ValueError(f"cannot read seeds {spec!r}: use forms like 0 or 0,1,2") from None


def _convert(text: str, kind: type, key: str):
    options = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    if options and len(options) < len(typing.get_args(kind)):  # Optional[X]: `none` or an X
        return None if text.lower() in ("none", "null") else _convert(text, options[0], key)
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if kind is str:
            if not records.SAFE_PART.match(text):
                raise ValueError(text)
            return text
        return kind(text)
    except ValueError:
        raise ValueError(f"{key}: cannot read {text!r} as {kind.__name__}") from None


def _field_types(config_type: type) -> dict[str, type]:
    hints = typing.get_type_hints(config_type)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_type)}


@dataclass
class Sweep:
    """Parsed --set options: per-method hyperparameter values and protocol values, each a list to sweep."""

    method: dict[str, dict[str, list]]
    protocol: dict[str, list]

    def method_variants(self, method: str) -> list[tuple[tuple[str, object], ...]]:
        return _product(self.method.get(method, {}))

    def protocol_variants(self) -> list[tuple[tuple[str, object], ...]]:
        return _product(self.protocol)


def _product(values: dict[str, list]) -> list[tuple[tuple[str, object], ...]]:
    keys = sorted(values)
    return [tuple(zip(keys, combo)) for combo in itertools.product(*(values[k] for k in keys))]


def parse_sets(items: typing.Iterable[str], methods: list[str]) -> Sweep:
    """Read `method.field=v1,v2` and `protocol.field=v` options; errors name the valid keys."""
    sweep = Sweep({}, {})
    for item in items:
        key, sep, raw = item.partition("=")
        owner, dot, name = key.strip().partition(".")
        if not sep or not dot or not raw:
            raise ValueError(f"--set {item!r}: use method.field=value[,value...] or protocol.field=value")
        if owner == "protocol":
            types = {k: v for k, v in _field_types(Protocol).items() if k != "name"}
        elif owner in methods:
            types = _field_types(get_method(owner).Config)
        else:
            raise ValueError(f"--set {item!r}: {owner!r} is not one of the methods being run ({', '.join(methods)}) "
                             "nor 'protocol'")
        if name not in types:
            raise ValueError(f"--set {item!r}: {owner} has no setting {name!r}; valid: {', '.join(sorted(types))}")
        values = [_convert(v.strip(), types[name], f"--set {key}") for v in raw.split(",")]
        target = sweep.protocol if owner == "protocol" else sweep.method.setdefault(owner, {})
        target[name] = values
    for method, overrides in sweep.method.items():  # let each config check its own values now, not mid-sweep
        for combo in _product(overrides):
            get_method(method).Config(**dict(combo))
    for combo in _product(sweep.protocol):
        Protocol("check", **dict(combo))
    return sweep


def parse_speed(items: typing.Iterable[str]) -> tuple[tuple[str, object], ...]:
    """`--speed FIELD=V` options -> (field, value) pairs of `bench.runner.Speed`; errors name the valid fields."""
    types = _field_types(Speed)
    pairs = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not raw:
            raise ValueError(f"--speed {item!r}: use FIELD=VALUE, e.g. compile=true")
        if name not in types:
            raise ValueError(f"--speed {item!r}: no switch {name!r}; valid: {', '.join(sorted(types))}")
        pairs[name] = _convert(raw.strip(), types[name], f"--speed {name}")
    return tuple(sorted(pairs.items()))


def build_specs(preset: Preset, methods: list[str], classes: list[int], seeds: list[int], sweep: Sweep,
                **common) -> list[RunSpec]:
    specs = []
    for method, forget_class, seed in itertools.product(methods, classes, seeds):
        for overrides in sweep.method_variants(method):
            for protocol_overrides in sweep.protocol_variants():
                specs.append(RunSpec(preset=preset.name, method=method, forget_class=forget_class, seed=seed,
                                     method_overrides=overrides, protocol_overrides=protocol_overrides, **common))
    return specs
