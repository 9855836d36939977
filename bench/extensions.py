"""The user's own work, without editing this package: presets from YAML files and methods from their packages.

`bench --preset-file my.yaml --method-module mypkg.mymethod:MyMethod run ...` registers both before the command
runs. Each becomes a string (`preset-file:<path>`, `method-module:<pkg.mod:Class>`) that every RunSpec carries, so
that a worker process or a SLURM job registers the same extensions before it runs the spec. Installed packages can
instead declare methods under the entry-point group `unlearning_bench.methods` (loaded everywhere automatically).

A preset file holds the fields of `bench.config.Preset`, any of which may be left out to take them from `base`:

    name: mydigits
    base: digits                 # start from this built-in preset (default: digits)
    description: digits with a wider UNet
    unet: {ch: 32}               # fields replaced in the base preset's UNetConfig
    pretrain: {iterations: 2000}
    protocols: {paper: {sampler_steps: 50}, quick: {forget_samples: 100}}  # a new name starts from the default
    iteration_scale: 0.2
    min_classifier_accuracy: 0.9 # no run evaluates with a classifier below this test accuracy
    base_model: digits           # optional: say that this preset reuses digits' base model (checked)

Every field is checked when the file is read, before any work. `name` is an identifier (letters, digits, `_`, `-`).
Base models and classifiers are cached by what determines them (`bench.cache.folder_name`), so a preset that
changes only the protocols reuses its base preset's base model and classifier; `base_model: NAME` makes that
explicit, and the file is refused if it changes a field the base model depends on.
"""

from __future__ import annotations

import dataclasses
import importlib
import traceback
from pathlib import Path

import torch
import yaml

from bench.cache import base_fields
from bench.config import PRESET_NAME, PRESETS, ClassifierConfig, DiffusionConfig, Preset, Protocol, TrainConfig, UNetConfig
from methods import METHODS, load_method

_FROM_FILES: dict[str, Preset] = {}  # presets registered from files in this process (re-registering replaces)
_FILES: dict[str, Path] = {}  # the file each of them came from (bench.fingerprint)
NESTED = {"unet": UNetConfig, "pretrain": TrainConfig, "classifier": ClassifierConfig, "diffusion": DiffusionConfig}
MAX_PARAMETERS = 1_000_000_000  # 26x the published 38.6 M; more is a typo, not a model this tool trains


def _replace(kind: type, current, values, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping of field: value, not {values!r}")
    fields = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return dataclasses.replace(current, **values)  # each config checks its own values
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}{_field_path(str(exc), where)}") from None


def _field_path(message: str, where: str) -> str:
    """The message of a config's check with the field as the file spells it: `classifier.epochs must be >= 1`
    under `p.yaml: classifier` reads `p.yaml: classifier.epochs must be >= 1`."""
    head, dot, rest = message.partition(".")
    if dot and " " not in head:  # the config named its own prefix (`protocol.`, `classifier.`): use the file's
        message = rest
    return f".{message}" if message.split(" ")[0].isidentifier() else f": {message}"


def load_preset_file(path: str | Path) -> Preset:
    """Read a preset YAML file (checked like the built-in presets) and register it under its `name`."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"--preset-file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"--preset-file {path} is not valid YAML: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"--preset-file {path}: a mapping with at least `name` (and usually `base`)")
    if not PRESET_NAME.fullmatch(spec["name"]):  # it names cache and results folders
        raise ValueError(f"--preset-file {path}: name {spec['name']!r} must be an identifier: letters, digits, _ "
                         "and - only")
    base_name, base_model = spec.pop("base", "digits"), spec.pop("base_model", None)
    if not isinstance(base_name, str) or base_name not in PRESETS:
        raise ValueError(f"--preset-file {path}: base {base_name!r} is not a preset; choose from {', '.join(PRESETS)}")
    base = PRESETS[base_name]
    preset_fields = {f.name for f in dataclasses.fields(Preset)}
    unknown = sorted(set(spec) - preset_fields)
    if unknown:
        raise ValueError(f"--preset-file {path}: unknown field(s) {', '.join(unknown)}; "
                         f"valid: base, base_model, {', '.join(sorted(preset_fields))}")
    values = {}
    for key, value in spec.items():
        if key in NESTED:
            values[key] = _replace(NESTED[key], getattr(base, key), value, f"--preset-file {path}: {key}")
        elif key == "protocols":
            values[key] = _protocols(base, value, path)
        else:
            values[key] = value
    try:
        preset = dataclasses.replace(base, **values)  # Preset checks its own fields and how they fit together
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--preset-file {path}: {exc}") from None
    _check_size(preset, path)
    _check_method_defaults(preset, path)
    if base_model is not None:
        _check_base_model(preset, base_model, path)
    if preset.name in PRESETS and preset.name not in _FROM_FILES:
        raise ValueError(f"--preset-file {path}: {preset.name!r} is a built-in preset; give yours another name")
    PRESETS[preset.name] = _FROM_FILES[preset.name] = preset
    _FILES[preset.name] = path.resolve()
    return preset


def preset_path(name: str) -> Path | None:
    """The YAML file preset `name` was registered from in this process, or None (a built-in preset)."""
    return _FILES.get(name)


def _check_size(preset: Preset, path: Path) -> None:
    """Refuse a UNet too large to build (counted on the meta device: nothing is allocated)."""
    from bench.unet import ConditionalUNet

    with torch.device("meta"):
        count = sum(p.numel() for p in ConditionalUNet(preset.unet).parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(f"--preset-file {path}: unet has {count:,} parameters, more than {MAX_PARAMETERS:,}; "
                         "make unet.ch, ch_mult or num_res_blocks smaller")


def _check_method_defaults(preset: Preset, path: Path) -> None:
    """Each method_defaults entry of a registered method resolves (its config checks its values)."""
    from bench.sweep import resolve_method_config

    for method in preset.method_defaults:
        if method in METHODS:  # methods from --method-module register after preset files, and are checked then
            try:
                resolve_method_config(preset, method)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"--preset-file {path}: method_defaults.{exc}") from None


def _check_base_model(preset: Preset, name, path: Path) -> None:
    """`base_model: NAME`: the preset reuses NAME's base model, so it may not change what determines it."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"--preset-file {path}: base_model {name!r} is not a preset; choose from {', '.join(PRESETS)}")
    mine, theirs, changed = base_fields(preset), base_fields(PRESETS[name]), []
    for key, value in mine.items():
        if isinstance(value, dict):
            changed += [f"{key}.{field}" for field in value if value[field] != theirs[key][field]]
        elif value != theirs[key]:
            changed.append(key)
    if changed:
        raise ValueError(f"--preset-file {path}: base_model {name!r}, but this preset changes {', '.join(changed)}, "
                         f"which its base model depends on; drop base_model, or those changes to reuse {name}'s")


def _protocols(base: Preset, value, path: Path) -> dict[str, Protocol]:
    if not isinstance(value, dict):
        raise ValueError(f"--preset-file {path}: protocols must map names to protocol fields")
    protocols = dict(base.protocols)
    start = base.protocol(None)  # a new protocol starts from the base preset's default one, at the preset's scale
    for name, fields in value.items():
        current = protocols.get(name, start)
        where = f"--preset-file {path}: protocols.{name}"
        protocols[name] = _replace(Protocol, current, {**(fields or {}), "name": name}, where)
    return protocols


def load_extensions(items: tuple[str, ...]) -> None:
    """Register every `preset-file:<path>` and `method-module:<pkg.mod:Class>` in `items` (idempotent)."""
    for item in items:
        kind, _, value = item.partition(":")
        if kind == "preset-file":
            load_preset_file(value)
        elif kind == "method-module":
            _import_method_module(value)
            load_method(value)
        else:
            raise ValueError(f"unknown extension {item!r}")


def _import_method_module(path: str) -> None:
    """Import the module of `pkg.mod:Class`; one that raises or exits while importing (a bug, a syntax error,
    `sys.exit`) becomes a ValueError naming the module, the file and line, and the exception. ImportError is left
    to `load_method`, which names what is missing."""
    module_name = path.partition(":")[0]
    if not module_name:
        return
    try:
        importlib.import_module(module_name)
    except (ImportError, KeyboardInterrupt):
        return
    except BaseException as exc:  # SystemExit too: a plug-in must not end bench silently with its own exit code
        raise ValueError(f"--method-module {path!r}: importing {module_name} failed at {_where(exc)} with "
                         f"{_describe(exc)}; fix the module (`python -c 'import {module_name}'` shows the whole "
                         "traceback)") from None


def _where(exc: BaseException) -> str:
    """file:line where `exc` was raised, leaving out importlib's own frames."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<frozen") and f.filename != __file__]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "an unknown place"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"sys.exit({exc.code!r})"
    if isinstance(exc, SyntaxError):
        return f"{type(exc).__name__}: {exc.msg}"
    return f"{type(exc).__name__}: {exc}"
