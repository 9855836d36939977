"""What a `bench run` asks for: one `RunSpec` per run, from forget classes, seeds and swept values.

`--set method.field=v1,v2` sweeps a method hyperparameter and `--set protocol.field=v` changes the evaluation;
`--speed switch=v` sets how runs are computed. Values are parsed to the field's declared type (`none` for an
optional one) and checked by the config itself, before any work starts; errors name the valid keys.
`resolve_method_config` and `resolve_protocol` turn a spec into the configuration it runs with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import typing
from dataclasses import dataclass, field
from pathlib import Path

from bench import records
from bench.config import Preset, Protocol, TrainConfig, get_preset
from bench.device import Speed
from methods import get_method

# A variant folder name longer than this is cut and completed with a hash of the whole (file names have limits).
MAX_VARIANT = 96


@dataclass(frozen=True)
class RunSpec:
    """One run: (preset, method, forget class, seed, overrides). Picklable, so it runs in any process or job."""

    preset: str
    method: str
    forget_class: int
    seed: int
    results: str
    cache: str | None = None
    protocol: str | None = None
    method_overrides: tuple[tuple[str, object], ...] = ()
    protocol_overrides: tuple[tuple[str, object], ...] = ()
    # `bench.device.Speed` switches for training and sampling: how a run is computed, not what. Not part of the
    # run's folder; a record made with other switches is not reused for this spec (`bench.orchestrate`).
    speed: tuple[tuple[str, object], ...] = ()
    data_root: str | None = None
    device: str | None = None
    progress: bool = True
    save_model: bool = False
    # `bench.extensions` items (preset files, method modules) a job must register before it runs this spec
    extensions: tuple[str, ...] = ()
    # `bench.attacks` names run on this run's saved model right after it, in its job; not part of its folder
    attacks: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def variant(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.method_overrides)]
        parts += [f"protocol.{k}={v}" for k, v in sorted(self.protocol_overrides)]
        full = ",".join(parts) or "default"
        if len(full) <= MAX_VARIANT:
            return full
        return f"{full[:MAX_VARIANT - 17]}+{hashlib.sha1(full.encode()).hexdigest()[:16]}"

    @property
    def protocol_name(self) -> str:
        return get_preset(self.preset).protocol(self.protocol).name

    @property
    def directory(self) -> Path:
        return records.run_dir(self.results, self.preset, self.protocol_name, self.method, self.variant,
                               self.forget_class, self.seed)

    def describe(self) -> str:
        extra = "" if self.variant == "default" else f" [{self.variant}]"
        return f"{self.method}{extra} class {self.forget_class} seed {self.seed}"


def resolve_protocol(preset: Preset, spec: RunSpec) -> Protocol:
    """The preset's protocol with the spec's overrides; checked against the preset's diffusion too."""
    protocol = dataclasses.replace(preset.protocol(spec.protocol), **dict(spec.protocol_overrides))
    if protocol.sampler_steps > preset.diffusion.timesteps:
        raise ValueError(f"protocol.sampler_steps must be <= the preset's {preset.diffusion.timesteps} diffusion "
                         f"steps, got {protocol.sampler_steps}")
    return protocol


def _named(method: str, make, *args, **fields):
    """`make(*args, **fields)`: a method's config; a bad value's error names the option as typed (method.field)."""
    try:
        return make(*args, **fields)
    except ValueError as error:  # the field's own check names the field
        raise ValueError(f"{method}.{error}") from None


def resolve_method_config(preset: Preset, method: str, overrides=()) -> tuple[type, TrainConfig, dict]:
    """Paper defaults, then the preset's scaling, then the user's overrides; plus what the preset changed."""
    cls = get_method(method)
    paper = cls.Config()
    scaled = cls.preset_defaults(preset)
    config = _named(method, dataclasses.replace, paper, **{**scaled, **dict(overrides)})  # the user's value wins
    changes = {k: {"paper": getattr(paper, k), "preset": v} for k, v in scaled.items() if getattr(paper, k) != v}
    return cls, config, changes


def budget_choice(preset: Preset, method: str, config: TrainConfig, overrides=()) -> dict:
    """Which rule set this run's iterations, for its record: the user's --set, the study the preset names
    (`budget_sources`), the preset's own `method_defaults`, the preset's pretraining (retrain), or the paper's count
    times `iteration_scale`."""
    cls = get_method(method)
    paper = cls.Config()
    if config.iterations == 0:
        chosen_by, how = "none", "no unlearning iterations"
    elif "iterations" in dict(overrides):
        chosen_by, how = "override", f"--set {method}.iterations={config.iterations}"
    elif method in preset.budget_sources:
        chosen_by, how = "study", preset.budget_sources[method]
    elif "iterations" in preset.method_defaults.get(method, {}):
        chosen_by, how = "preset", f"the preset's method_defaults ({config.iterations} iterations)"
    elif cls.from_scratch:
        chosen_by, how = "pretraining", f"the preset's pretraining recipe ({preset.pretrain.iterations} iterations)"
    elif preset.iteration_scale != 1.0:
        chosen_by = "iteration_scale"
        how = f"the paper's {paper.iterations} iterations x the preset's iteration_scale {preset.iteration_scale:g}"
    else:
        chosen_by, how = "paper", f"the paper's {paper.iterations} iterations"
    return {"iterations": config.iterations, "paper_iterations": paper.iterations, "chosen_by": chosen_by,
            "how": how}


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
    """'0', '0,1,2', '0-2' or a mix; seeds are integers in [0, 2**31)."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in str(spec).split(",") if p.strip()):
            low, dash, high = part.partition("-")
            seeds.extend(range(int(low), int(high) + 1) if dash else [int(part)])
    except ValueError:
        raise ValueError(f"cannot read seeds {spec!r}: use forms like 0, 0,1,2 or 0-2") from None
    if not seeds:
        raise ValueError(f"no seed in {spec!r}: use forms like 0, 0,1,2 or 0-2")
    bad = [s for s in seeds if not 0 <= s < 2**31]
    if bad:
        raise ValueError(f"seed(s) {bad[:3]} out of range: seeds are integers in [0, 2147483647]")
    return sorted(set(seeds))


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
            _named(method, get_method(method).Config, **dict(combo))
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
