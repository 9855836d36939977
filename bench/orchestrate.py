"""The grid: methods x forget classes x seeds x swept values -> run specs -> skip finished -> run.

`--set method.field=v1,v2` sweeps a method hyperparameter and `--set protocol.field=v` changes the evaluation;
values are parsed to the field's declared type and checked by the config itself.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path

from bench import records
from bench.config import Preset, Protocol
from bench.experiment import RunSpec, prepare_prerequisites, run_one
from methods import get_method

log = logging.getLogger(__name__)


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
        raise ValueError(f"--set {key}: cannot read {text!r} as {kind.__name__}") from None


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
        values = [_convert(v.strip(), types[name], key) for v in raw.split(",")]
        target = sweep.protocol if owner == "protocol" else sweep.method.setdefault(owner, {})
        target[name] = values
    for method, overrides in sweep.method.items():  # let each config check its own values now, not mid-sweep
        for combo in _product(overrides):
            get_method(method).Config(**dict(combo))
    return sweep


def build_specs(preset: Preset, methods: list[str], classes: list[int], seeds: list[int], sweep: Sweep,
                **common) -> list[RunSpec]:
    specs = []
    for method, forget_class, seed in itertools.product(methods, classes, seeds):
        for overrides in sweep.method_variants(method):
            for protocol_overrides in sweep.protocol_variants():
                specs.append(RunSpec(preset=preset.name, method=method, forget_class=forget_class, seed=seed,
                                     method_overrides=overrides, protocol_overrides=protocol_overrides, **common))
    return specs


def check_writable(out: str | Path) -> None:
    """Fail before any work if the results folder cannot be created or written."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"cannot write to results folder {path}: {exc.strerror or exc}") from None


@dataclass
class Outcome:
    spec: RunSpec
    status: str  # done, skipped, failed
    record: dict | None = None
    error: str | None = None


def run_sequential(specs: list[RunSpec], force: bool = False) -> list[Outcome]:
    """Run every spec in this process; finished runs are skipped unless `force`; failures do not stop the rest."""
    outcomes, todo = [], []
    for spec in specs:
        if not force and records.is_done(spec.directory):
            outcomes.append(Outcome(spec, "skipped", records.read_record(spec.directory / records.RECORD_NAME)))
        else:
            todo.append(spec)
    if outcomes:
        log.info("skipping %d finished run(s) (use --force to redo them)", len(outcomes))
    if todo:
        first = todo[0]
        prepare_prerequisites(first.preset, first.cache, first.data_root, first.device, first.progress)
    for index, spec in enumerate(todo, 1):
        log.info("[%d/%d] %s", index, len(todo), spec.describe())
        try:
            outcomes.append(Outcome(spec, "done", run_one(spec)))
        except Exception as exc:  # one failed run must not stop the sweep
            log.error("run failed: %s: %s\n%s", spec.describe(), exc, traceback.format_exc())
            outcomes.append(Outcome(spec, "failed", error=f"{type(exc).__name__}: {exc}"))
    return outcomes
