"""Records of one preset must come from one base model and one classifier before a table puts them together.

After `bench pretrain --force` the records made before it stand beside the new ones until they are run again; a
table mixing the two would average unlearning from two different models without a word. `mixed_models` finds
such a preset, `refusal` says which ids, how many records each, which are stale (the ids of the models in the
records' cache now) and the `bench run` commands that redo them; `bench report` and `bench compare` refuse unless
--allow-mixed. `made_by_other_code` finds the records whose code has changed since they were made, which both show
with a note; `mixed_devices` the tables whose records ran on different devices, which the report notes.
"""

from __future__ import annotations

import shlex
from collections import Counter, defaultdict
from pathlib import Path

from bench.fingerprint import code_changed
from reports.tables import class_spec


class MixedModels(ValueError):
    """Records made from different base models or classifiers where one table would show them together."""


def models(record: dict) -> tuple[str, str]:
    """(base model id, classifier id) a record was made with."""
    return str(record["base_model"].get("id")), str(record["classifier"].get("id"))


def _by_preset(records: list[dict]) -> dict[str, list[dict]]:
    found = defaultdict(list)
    for record in records:
        found[record["preset"]].append(record)
    return dict(sorted(found.items()))


def describe(counts: Counter) -> str:
    return "; ".join(f"base model {base}, classifier {classifier}: {n} record(s)"
                     for (base, classifier), n in counts.most_common())


def mixed_models(records: list[dict]) -> dict[str, Counter]:
    """preset -> record count per (base model id, classifier id), for each preset whose records hold several."""
    found = {preset: Counter(models(r) for r in chosen) for preset, chosen in _by_preset(records).items()}
    return {preset: counts for preset, counts in found.items() if len(counts) > 1}


def mixed_devices(records: list[dict]) -> dict[tuple[str, str], Counter]:
    """(preset, protocol) -> record count per device (`provenance.device`: the GPU, or the CPU model and its threads), for
    each table whose records ran on several: their seconds and peak memory do not compare."""
    found = defaultdict(Counter)
    for record in records:
        key = (record["preset"], str((record.get("protocol") or {}).get("name")))
        found[key][str((record.get("provenance") or {}).get("device") or "unknown")] += 1
    return {key: counts for key, counts in sorted(found.items()) if len(counts) > 1}


def _classifier_path(base: Path, preset: str) -> Path:
    """Where the cache of base model `base` keeps the classifier of `preset` (beside it, for an unknown preset)."""
    from bench.cache import Cache
    from bench.config import get_preset

    try:
        return Cache(base.parent.parent).classifier_path(get_preset(preset))
    except ValueError:
        return base.with_name("classifier.pt")


def _current(records: list[dict]) -> set[tuple[str, str]]:
    """(base id, classifier id) of the models in the caches the records' base models came from, as they are now."""
    from bench.cache import CheckpointError, load_file  # torch, only once mixing was found

    found = set()
    for base, preset in {(r["base_model"].get("path"), r["preset"]) for r in records if r["base_model"].get("path")}:
        ids = []
        for path in (Path(base), _classifier_path(Path(base), preset)):
            try:
                payload = load_file(path, "", mmap=True)
            except (OSError, CheckpointError):
                payload = None
            ids.append(str(payload.get("id")) if isinstance(payload, dict) else None)
        found.add((ids[0], ids[1]))
    return found


def _registering(record: dict) -> list[str]:
    """The --preset-file / --method-module options the record's run was made with (`provenance.extensions`)."""
    items = (str(item).partition(":") for item in record["provenance"].get("extensions") or ())
    return [f"--{kind} {shlex.quote(value)}" for kind, _, value in items if kind in ("preset-file", "method-module")]


def _value(value) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def rerun_commands(records: list[dict], results: str | Path) -> list[str]:
    """`bench run` commands that make these runs again (same preset, protocol, method, overrides, speed, cache)."""
    classes = defaultdict(set)
    for r in records:
        overrides, base = r["overrides"], r["base_model"].get("path")
        options = [f"--set {r['method']}.{k}={_value(v)}" for k, v in sorted(overrides.get("method", {}).items())]
        options += [f"--set protocol.{k}={_value(v)}" for k, v in sorted(overrides.get("protocol", {}).items())]
        options += [f"--speed {k}={_value(v)}" for k, v in sorted(((r.get("speed") or {}).get("requested")
                                                                   or {}).items())]
        options += [f"--cache {shlex.quote(str(Path(base).parent.parent))}"] if base else []
        options += ["--data-root DATA_ROOT"] if r["preset"] == "cifar10" else []
        head = " ".join(["bench", *_registering(r), "run", "--preset",
                         r["preset"], "--protocol", str(r["protocol"].get("name")), "--methods", r["method"]])
        tail = " ".join([f"--seeds {r['seed']}", f"--results {shlex.quote(str(results))}", *options])
        classes[(head, tail)].add(r["forget_class"])
    return [f"{head} --classes {class_spec(sorted(found))} {tail}" for (head, tail), found in classes.items()]


def refusal(records: list[dict], results: str | Path, allow: str = "pass --allow-mixed to show them together") -> str:
    """What is mixed in `records` (ids, record counts), which records are stale and how to rerun them, or `allow`."""
    lines = []
    for preset, counts in mixed_models(records).items():
        chosen = [r for r in records if r["preset"] == preset]
        lines.append(f"the records of preset {preset} under {results} were made from {len(counts)} different base "
                     f"models or classifiers: {describe(counts)}")
        current = [pair for pair in counts if pair in _current(chosen)]
        if len(current) == 1:
            stale = [r for r in chosen if models(r) != current[0]]
            lines.append(f"the cache holds base model {current[0][0]} and classifier {current[0][1]} now: rerun the "
                         f"{len(stale)} stale record(s) (`bench run` runs a stale record again):")
            lines += [f"  {command}" for command in rerun_commands(stale, results)]
        else:
            lines.append(f"`bench status --results {results} --cache CACHE` shows which are stale; rerun them with "
                         "the `bench run` command that made them (it runs a stale record again)")
    return "\n".join([*lines, f"or {allow}."])


def made_by_other_code(records: list[dict]) -> dict[str, list[dict]]:
    """{why: records} of the records whose method or bench code has changed since they were made
    (`bench.fingerprint.code_changed`); a plug-in method that is not registered here is not checked."""
    from methods import METHODS

    stale = defaultdict(list)
    for record in records:
        cls = METHODS.get(record["method"])
        if cls is not None and (reason := code_changed(record["provenance"], cls)):
            stale[reason].append(record)
    return dict(stale)


def unchecked_code(records: list[dict]) -> Counter:
    """method -> record count of the records whose method is not registered here (a plug-in that cannot be
    imported): `made_by_other_code` cannot check their code."""
    from methods import METHODS

    return Counter(record["method"] for record in records if record["method"] not in METHODS)


def counted(stale: dict[str, list[dict]]) -> str:
    """`made_by_other_code`'s result as `<why>: <count>; ...`."""
    return "; ".join(f"{why}: {len(found)}" for why, found in stale.items())


def compare_check(records_a: list[dict], records_b: list[dict], results_a: str | Path, results_b: str | Path,
                  allow_mixed: bool = False) -> list[str]:
    """`bench compare`: refuse a folder whose records of one preset mix models (always), and two folders made from
    different models (unless `allow_mixed`); returns the lines that say what --allow-mixed let through and which
    records were made by code that has changed since."""
    for records, folder in ((records_a, results_a), (records_b, results_b)):
        if mixed_models(records):
            raise MixedModels(refusal(records, folder, "compare folders that each hold one base model and "
                                                       "classifier per preset (--allow-mixed lets only A and B differ)"))
    made = [{preset: models(chosen[0]) for preset, chosen in _by_preset(records).items()}
            for records in (records_a, records_b)]
    lines = [f"preset {preset}: A ({results_a}) was made from base model {made[0][preset][0]}, classifier "
             f"{made[0][preset][1]}; B ({results_b}) from base model {made[1][preset][0]}, classifier "
             f"{made[1][preset][1]}" for preset in sorted(set(made[0]) & set(made[1]))
             if made[0][preset] != made[1][preset]]
    if lines and not allow_mixed:
        raise MixedModels("\n".join([*lines, "the deltas would compare unlearning from different base models or "
                                     "classifiers: pass --allow-mixed if that is the comparison you mean"]))
    notes = [f"- NOTE (--allow-mixed): {line}" for line in lines]
    for name, records in (("A", records_a), ("B", records_b)):
        if stale := made_by_other_code(records):  # a before/after comparison of an edit has these on one side
            notes.append(f"- NOTE: {sum(map(len, stale.values()))} record(s) of {name} were made by code that has "
                         f"changed since ({counted(stale)})")
    return notes
