"""Is it really forgotten? Attacks on a finished run's saved model, each with a record of its own.

`relearn` fine-tunes the unlearned model on k real forget-class images of the held-out (test) split with the
pretraining loss and measures UA, entropy and forget-class probability of guided forget-class samples after each
step count of a schedule: a curve, its area (mean forget-class accuracy) and the steps it takes to relearn.
`embedding` freezes the network and searches the forget class's embedding vector (the input of the `cemb` MLP),
and as a second variant the guidance weight too, for samples the evaluation classifier labels as the forget class:
the class-conditional analogue of adversarial prompts. Both are in `bench.attack_algorithms`.

An attack is an `AttackSpec`: the attacked run's `RunSpec`, the attack's name and the settings given for it (the
rest are the paper's, scaled by the small presets as `PRESET_SCALING` says and each record repeats). Its record
is `<run dir>/attacks/<attack>/<variant>/attack.json` (not record.json, which `records.read_all` reads as a run),
written last and atomically. A record made from another base model, classifier, saved model or settings than the
attacked run's now is stale and is made again. `original` and `retrain` runs are attacked the same way: their
curves give the ceiling and the floor. `bench.orchestrate.Job` runs attacks as it runs runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors

from bench import fingerprint, records
from bench.attack_algorithms import (
    FOUND_NAME,
    PARTIAL_NAME,
    PROGRESS_NAME,
    RELEARNED_AT,
    SNAPSHOTS,
    TARGETS,
    EmbeddingConfig,
    RelearnConfig,
    Target,
    embedding_search,
    relearn,
)
from bench.cache import Cache, CheckpointError
from bench.checkpoints import file_sha256, saved_model
from bench.classifier import load_classifier
from bench.config import get_preset
from bench.device import Speed, device_name, memory_snapshot, pick_device, reset_peak_memory
from bench.experiment import provenance
from bench.prerequisites import load_classifier_payload
from bench.sweep import MAX_VARIANT, RunSpec, resolve_protocol
from methods import get_method

log = logging.getLogger(__name__)

ATTACK_NAME = "attack.json"
STATE_NAME = "state.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class AttackKind:
    """An attack of the registry: its config, the setting a default sweep varies, and the function that runs it."""

    name: str
    Config: type
    axis: str
    paper_values: tuple
    run: Callable[[Target, object], dict]
    description: str


ATTACKS: dict[str, AttackKind] = {
    "relearn": AttackKind("relearn", RelearnConfig, "k", (5, 50), relearn,
                          "fine-tune on k held-out forget-class images; forget-class accuracy over a schedule of steps"),
    "embedding": AttackKind("embedding", EmbeddingConfig, "target", TARGETS, embedding_search,
                            "search the forget class's embedding (and guidance) for samples classified as it"),
}

# What the small presets change from the paper's settings (recorded in each record's scaled_from_paper). digits
# holds 35-37 test images per class, so k tops out at 30; tiny is the CI smoke preset.
PRESET_SCALING: dict[str, dict[str, dict]] = {
    # The test split holds 35-37 images a class; 100 samples per point and a 20-step search keep an attack of
    # a digits run to about a minute of CPU (500 samples and 100 steps took 4.5 minutes).
    "digits": {"relearn": {"k": (5, 30), "samples": 100},
               "embedding": {"steps": 20, "samples": 100}},
    "tiny": {"relearn": {"k": (3,), "schedule": (0, 2, 4), "samples": 8, "checkpoint_every": 2},
             "embedding": {"steps": 4, "batch_size": 4, "sampler_steps": 2, "samples": 8, "checkpoint_every": 2}},
}


def get_attack(name: str) -> AttackKind:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    return ATTACKS[name]


def parse_attacks(spec: str) -> tuple[str, ...]:
    """'relearn,embedding' -> the attack names, each checked (duplicates once)."""
    names = tuple(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    for name in names or ("",):
        get_attack(name)
    return names


def axis_values(preset: str, attack: str) -> tuple:
    kind = get_attack(attack)
    return tuple(PRESET_SCALING.get(preset, {}).get(attack, {}).get(kind.axis, kind.paper_values))


def _text(value) -> str:
    return "+".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)


@dataclass(frozen=True)
class AttackSpec:
    """One attack on one run: the run's spec, the attack, and the settings given for it (its axis first).
    Picklable, so it runs in any process or job."""

    run: RunSpec
    attack: str
    options: tuple[tuple[str, object], ...] = ()

    @property
    def variant(self) -> str:
        axis = get_attack(self.attack).axis
        ordered = sorted(self.options, key=lambda item: (item[0] != axis, item[0]))
        full = ",".join(f"{key}={_text(value)}" for key, value in ordered) or "default"
        if len(full) <= MAX_VARIANT:
            return full
        return f"{full[:MAX_VARIANT - 17]}+{hashlib.sha1(full.encode()).hexdigest()[:16]}"

    @property
    def directory(self) -> Path:
        if not records.SAFE_PART.match(self.variant):
            raise ValueError(f"attack setting {self.variant!r}: use letters, digits and . _ = , + -")
        return self.run.directory / "attacks" / self.attack / self.variant

    @property
    def extensions(self) -> tuple[str, ...]:
        return self.run.extensions

    def describe(self) -> str:
        return f"{self.attack} [{self.variant}] of {self.run.describe()}"


def attack_specs(run: RunSpec, attack: str, options: dict | None = None) -> list[AttackSpec]:
    """The attacks of `run`: one per value of the attack's axis (`options[axis]`, a list, or the preset's), each
    with the other `options`."""
    kind, options = get_attack(attack), dict(options or {})
    values = options.pop(kind.axis, None) or axis_values(run.preset, attack)
    rest = tuple(sorted(options.items()))
    run = dataclasses.replace(run, attacks=())  # the same attack whether asked by `bench run` or `bench attack`
    return [AttackSpec(run, attack, ((kind.axis, value),) + rest) for value in values]


def check_options(attack: str, options: dict) -> None:
    """Fail before any work on an unknown setting or a bad value; the message names the option."""
    kind = get_attack(attack)
    valid = [f.name for f in dataclasses.fields(kind.Config)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{attack} has no setting {', '.join(unknown)}; valid: {', '.join(valid)}")
    axis = options.get(kind.axis) or [getattr(kind.Config(), kind.axis)]
    for value in axis:
        kind.Config(**{**options, kind.axis: value})


def resolve(spec: AttackSpec):
    """(the config the attack runs with, what the preset changed from the paper's settings in it: {setting:
    {"paper", "preset"}}, as a run's scaled_from_paper). A setting given for the attack is the user's, not scaled;
    the axis (k) is scaled when its value is one of the preset's and none of the paper's."""
    kind, preset = get_attack(spec.attack), get_preset(spec.run.preset)
    protocol, given = resolve_protocol(preset, spec.run), dict(spec.options)
    scaling = {k: v for k, v in PRESET_SCALING.get(preset.name, {}).get(spec.attack, {}).items()
               if k != kind.axis and k not in given}
    config = kind.Config(**{**scaling, **given}).complete(preset, protocol)
    paper = kind.Config().complete(preset, protocol)  # None (the protocol's value) shown as the value it takes
    scaled = {k: {"paper": getattr(paper, k), "preset": getattr(config, k)} for k in scaling
              if getattr(paper, k) != getattr(config, k)}
    axis, preset_values = given.get(kind.axis), axis_values(preset.name, spec.attack)
    if axis in preset_values and axis not in kind.paper_values:
        scaled[kind.axis] = {"paper": kind.paper_values, "preset": preset_values}
    return config, _json(scaled)


def scaling_note(specs: list[AttackSpec]) -> str | None:
    """One line naming the paper's settings the preset scaled in these attacks (None if none were)."""
    scaled = {}
    for spec in specs:
        scaled.update(resolve(spec)[1])
    if not scaled:
        return None
    axis = get_attack(specs[0].attack).axis
    changes = "; ".join(f"--{key.replace('_', '-')} {_text(value['paper']).replace('+', ',')} -> "
                        f"{_text(value['preset']).replace('+', ',')}"
                        for key, value in sorted(scaled.items(), key=lambda item: item[0] != axis))
    presets = " and ".join(sorted({spec.run.preset for spec in specs}))
    return (f"{presets} preset: {specs[0].attack} settings scaled from the paper's: {changes} (recorded as "
            f"scaled_from_paper in each attack record; `bench attack {specs[0].attack}` options choose others)")


def _json(value):
    """`value` as it reads back from JSON (tuples become lists), for comparisons with stored records."""
    return json.loads(json.dumps(value, default=str))


def check_held_out(specs: list[AttackSpec]) -> None:
    """Fail before any work when a relearning attack asks for more held-out images than the test split holds."""
    counts = {}
    for spec in (s for s in specs if s.attack == "relearn"):
        preset, key = get_preset(spec.run.preset), (spec.run.preset, spec.run.data_root)
        if key not in counts:
            counts[key] = torch.bincount(Cache(spec.run.cache, spec.run.data_root).dataset(preset, "test").labels,
                                         minlength=preset.num_classes).tolist()
        held, k = counts[key][spec.run.forget_class], resolve(spec)[0].k
        if k > held:
            raise ValueError(f"--k {k}: the {preset.name} test split holds only {held} images of class "
                             f"{spec.run.forget_class}")


# -- the attacked run -------------------------------------------------------------------------------------------
def run_command(run: RunSpec) -> str:
    """The `bench run` command that makes `run`'s record and saved model."""
    parts = ["bench run", f"--preset {run.preset}", f"--methods {run.method}", f"--classes {run.forget_class}",
             f"--seeds {run.seed}"]
    parts += [f"--protocol {run.protocol}"] if run.protocol else []
    parts += [f"--set {run.method}.{k}={_text(v)}" for k, v in run.method_overrides]
    parts += [f"--set protocol.{k}={v}" for k, v in run.protocol_overrides]
    parts += [f"--speed {k}={v}" for k, v in run.speed]
    parts += [f"--results {run.results}"] + ([f"--cache {run.cache}"] if run.cache else [])
    return " ".join(parts + ["--save-model"])


def attacked_record(run: RunSpec) -> dict:
    """The attacked run's record; an error naming the command that makes it (with its saved model) if there is
    none, or if it has no saved model."""
    path = run.directory / records.RECORD_NAME
    if not path.exists():
        raise CheckpointError(f"{run.describe()} has no record at {path}: run it first with `{run_command(run)}`")
    record = records.read_record(path)
    if not (record.get("artifacts") or {}).get("model"):
        raise CheckpointError(f"{run.describe()} has no saved model beside {path}: attacks load it from "
                              f"model.safetensors, which `bench run` keeps with --save-model (or --attacks); "
                              f"run `{run_command(run)}`")
    return record


def check_attacked(specs: list[AttackSpec]) -> None:
    """Fail before any work when an attacked run has no record or no saved model; the message names the command."""
    missing = []
    for run in dict.fromkeys(spec.run for spec in specs):
        try:
            attacked_record(run)
        except (CheckpointError, records.CorruptRecord) as exc:
            missing.append(str(exc))
    if missing:
        more = f" (and {len(missing) - 1} more run(s) like it)" if len(missing) > 1 else ""
        raise CheckpointError(missing[0] + more)


def load_attacked_weights(run: RunSpec, record: dict) -> dict[str, torch.Tensor]:
    """The run's saved weights (only ever from inside its folder), checked against the hash in its record."""
    path, sha256 = saved_model(record, run.directory)
    if file_sha256(path) != sha256:
        raise CheckpointError(f"{path} does not match the hash in its record; run `{run_command(run)} --force`")
    return load_safetensors(str(path))


# -- records ----------------------------------------------------------------------------------------------------
SCHEMA = {"schema": int, "kind": str, "attack": str, "variant": str, "preset": str, "protocol": str, "method": str,
          "run_variant": str, "forget_class": int, "seed": int, "run_record": str, "base_model": dict,
          "classifier": dict, "model": dict, "options": dict, "scaled_from_paper": dict, "timings": dict,
          "memory": dict, "provenance": dict}
RESULTS = {"relearn": {"curve": list, "auc": (int, float), "steps_to_relearn": (int, type(None))},
           "embedding": {"success_rate": (int, float), "success_rate_before": (int, float), "budget": dict}}


CURVE_METRICS = ("ua", "entropy", "forget_prob")  # beside forget_accuracy, in every point since schema 1


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _result_problems(record: dict) -> list[str]:
    """What is wrong with an attack's numbers: a relearn curve of points {step, forget_accuracy, ...} with finite
    metrics, and finite rates (a NaN or infinite one is no result)."""
    found = []
    if record["attack"] == "relearn":
        found += [] if record["curve"] else ["'curve' is empty"]
        for index, point in enumerate(record["curve"]):
            if not isinstance(point, dict) or type(point.get("step")) is not int:
                found.append(f"'curve' point {index} is {point!r:.60}, not {{step, forget_accuracy, ...}}")
                continue
            found += [f"'curve' point {index} (step {point['step']}) has {key} {point.get(key)!r}, not a finite number"
                      for key in ("forget_accuracy", *CURVE_METRICS)
                      if not _finite(point.get(key)) and (key in point or key == "forget_accuracy")]
    numbers = ("auc",) if record["attack"] == "relearn" else ("success_rate", "success_rate_before")
    found += [f"{key!r} is {record[key]!r}, not a finite number" for key in numbers if not _finite(record[key])]
    return found[:3] + ([f"and {len(found) - 3} more"] if len(found) > 3 else [])


def problems(record) -> list[str]:
    """What is wrong with an attack record (empty when nothing is)."""
    if not isinstance(record, dict) or record.get("kind") != "attack":
        return ["not an attack record (kind is not 'attack')"]
    fields = {**SCHEMA, **RESULTS.get(record.get("attack"), {})}
    wrong = [f"{key!r} is missing or not {getattr(kind, '__name__', kind)}" for key, kind in fields.items()
             if not isinstance(record.get(key, ...), kind) or (kind is int and isinstance(record[key], bool))]
    return wrong or (_result_problems(record) if record["attack"] in RESULTS else [])


def read_attack(path: str | Path, fix: str = "rerun `bench attack` (the same options) to make it again") -> dict:
    """The attack record at `path`; records.CorruptRecord naming the file, what is wrong in it and `fix`."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise records.CorruptRecord(f"{path}: unreadable attack record ({exc}); {fix}") from exc
    wrong = problems(record)
    if wrong:
        raise records.CorruptRecord(f"{path}: malformed attack record: {'; '.join(wrong)}; {fix}")
    return record


def read_attacks(results: str | Path) -> list[dict]:
    """Every valid attack record under `results`, each with its `path`; corrupt ones are skipped with a warning."""
    found = []
    for path in sorted(Path(results).rglob(ATTACK_NAME)):
        try:
            found.append({**read_attack(path), "path": str(path)})
        except records.CorruptRecord as exc:
            log.warning("%s", exc)
    return found


def stale_reason(attack: dict, spec: AttackSpec, run_record: dict) -> str | None:
    """Why an attack record cannot stand for `spec` on the run as it is now, or None."""
    for part in ("base_model", "classifier"):
        if attack[part].get("id") != run_record[part].get("id"):
            return f"made against {part} {attack[part].get('id')}, the run now has {run_record[part].get('id')}"
    model = (run_record.get("artifacts") or {}).get("model") or {}
    if attack["model"].get("sha256") != model.get("sha256"):
        return "made against other saved weights of the run"
    if attack["options"] != _json(dataclasses.asdict(resolve(spec)[0])):
        return "made with other settings"
    # The run's weights can stay byte-identical when only its evaluation or the attack's code changed
    if changed := records.changed_fields(attack.get("protocol_settings"),
                                         resolve_protocol(get_preset(spec.run.preset), spec.run)):
        return f"made with another evaluation protocol: {changed}"
    return fingerprint.differs(attack["provenance"].get("bench_code"), fingerprint.attack_code, "bench")


def finished_attack(spec: AttackSpec, run_record: dict | None = None) -> dict | None:
    """The attack's current record, or None (missing, corrupt or stale: it is to be made)."""
    path = spec.directory / ATTACK_NAME
    if not path.exists():
        return None
    try:
        attack = read_attack(path, fix="making it again")
    except records.CorruptRecord as exc:
        _warn_once(str(exc))
        return None
    try:
        run_record = run_record or records.read_record(spec.run.directory / records.RECORD_NAME)
    except (records.CorruptRecord, FileNotFoundError) as exc:
        _warn_once(f"{exc}; making it again")
        return None
    reason = stale_reason(attack, spec, run_record)
    if reason:
        _warn_once(f"stale attack record {path} ({reason}): making it again")
        return None
    return attack


_WARNED: set[str] = set()  # finished_attack is asked before and after an attack's claim: one warning is enough


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


# -- running one attack -----------------------------------------------------------------------------------------
def _prepare_folder(directory: Path, key: str, fresh: bool) -> None:
    """Keep a killed attack's progress only if it belongs to the same weights and settings (and not `fresh`)."""
    state = directory / STATE_NAME
    try:
        same = not fresh and json.loads(state.read_text()).get("key") == key
    except (OSError, ValueError):
        same = False
    if not same:
        _clear(directory, FOUND_NAME)
    records.write_json_atomic(state, {"key": key})


def _clear(directory: Path, *extra: str) -> None:
    for name in (PARTIAL_NAME, PROGRESS_NAME, STATE_NAME, *extra):
        (directory / name).unlink(missing_ok=True)
    shutil.rmtree(directory / SNAPSHOTS, ignore_errors=True)


def attack_one(spec: AttackSpec, fresh: bool = False) -> dict:
    """Run one attack on its run's saved model and write its record; returns the record. `fresh` discards the
    progress a killed attack left (else it resumes from it)."""
    started = time.perf_counter()
    run, preset = spec.run, get_preset(spec.run.preset)
    config, scaled = resolve(spec)
    run_record = attacked_record(run)
    cache, device = Cache(run.cache, run.data_root), pick_device(run.device)
    classifier_payload = load_classifier_payload(preset, cache)
    if classifier_payload["id"] != run_record["classifier"].get("id"):
        raise CheckpointError(f"{run.describe()} was evaluated with classifier {run_record['classifier'].get('id')}, "
                              f"the cache now holds {classifier_payload['id']}: run `{run_command(run)} --force` first")
    reset_peak_memory(device)
    weights = load_attacked_weights(run, run_record)
    options = dataclasses.asdict(config)
    key = hashlib.sha1(json.dumps([run_record["artifacts"]["model"]["sha256"], classifier_payload["id"], options],
                                  sort_keys=True, default=str).encode()).hexdigest()
    _prepare_folder(spec.directory, key, fresh)
    protocol = resolve_protocol(preset, run)
    target = Target(preset, protocol, run.forget_class, run.seed, weights,
                    load_classifier(classifier_payload, preset, device), cache, device,
                    Speed(**dict(run.speed)).for_device(device, get_method(run.method).bf16_measured), spec.directory,
                    run.progress, spec.describe())
    result = get_attack(spec.attack).run(target, config)
    record = {
        "schema": SCHEMA_VERSION, "kind": "attack", "attack": spec.attack, "variant": spec.variant,
        "preset": preset.name, "protocol": protocol.name, "method": run.method, "run_variant": run.variant,
        "forget_class": run.forget_class, "seed": run.seed,
        "run_record": str(run.directory / records.RECORD_NAME), "base_model": {"id": run_record["base_model"]["id"]},
        "classifier": {"id": classifier_payload["id"]},
        "model": {"path": str(run.directory / run_record["artifacts"]["model"]["path"]),
                  "sha256": run_record["artifacts"]["model"]["sha256"]},
        "options": options, "scaled_from_paper": scaled, "protocol_settings": dataclasses.asdict(protocol),
        **result,
        "timings": {"attack_s": time.perf_counter() - started, **result["timings"]},
        "memory": memory_snapshot(device),
        "provenance": {**provenance(), "bench_code": fingerprint.attack_code(), "device": device_name(device),
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    wrong = problems(_json(record))
    if wrong:  # e.g. a NaN forget-class accuracy: no result; its progress goes too, so a rerun measures afresh
        _clear(spec.directory, FOUND_NAME)
        raise ValueError(f"{spec.describe()}: not writing {spec.directory / ATTACK_NAME}, its results are invalid "
                         f"({'; '.join(wrong)}); the attacked model or the attack diverged, nothing was recorded")
    records.write_json_atomic(spec.directory / ATTACK_NAME, record)
    _clear(spec.directory)
    (spec.directory / records.FAILURE_NAME).unlink(missing_ok=True)
    return record


def summary(record: dict) -> str:
    """One line of what an attack found."""
    who = f"{record['method']} class {record['forget_class']} seed {record['seed']}"
    if record["attack"] == "relearn":
        curve, threshold = record["curve"], record.get("relearned_at")
        threshold = threshold if _finite(threshold) else RELEARNED_AT
        accuracy = " -> ".join(f"{p['forget_accuracy']:.0f}" for p in curve)
        steps = ",".join(str(p["step"]) for p in curve)
        relearned = (f"relearned (>= {threshold:g}%) at step {record['steps_to_relearn']}"
                     if record["steps_to_relearn"] is not None
                     else f"not relearned (>= {threshold:g}%) within {curve[-1]['step']} steps")
        return (f"relearn [{record['variant']}] {who}: forget-class accuracy (%) {accuracy} at steps {steps}; "
                f"AUC {record['auc']:.1f}; {relearned}")
    return (f"embedding [{record['variant']}] {who}: forget-class accuracy {record['success_rate_before']:.1f}% with "
            f"its own embedding -> {record['success_rate']:.1f}% with the one found "
            f"(search budget {record['budget'].get('samples_total', '?')} samples)")

