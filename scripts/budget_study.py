#!/usr/bin/env python3
"""The budget study of docs/budget-study.md (issue 25 items 1-2): each method's metrics as a function of its
iteration budget on calibration classes declared in advance, and the declared rule that picks its budget.

`run` drives `bench run` (one call per method, fraction and hyperparameter value; finished runs are skipped, so a
second `run` continues the first), fractions in increasing order, and stops a method's curve where the predicted
RTE of the next fraction exceeds `--max-run-seconds`. `select` applies the rule to the records and writes
budget-selection.json and budget-selection.md beside them. `run --dry-run` lists the runs and writes nothing.

    python scripts/budget_study.py run --results results-budget --workers 2
    python scripts/budget_study.py run --dry-run
    python scripts/budget_study.py select --results results-budget

A fraction f means the run the preset would make with `iteration_scale = f` (`UnlearningMethod.preset_defaults`):
the iterations and the fields derived from them (EraseDiff's outer steps, the EMA decay), passed as `--set`
values that differ from the preset's own, so the preset's own fraction is its `default` run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import records  # noqa: E402
from bench.config import get_preset  # noqa: E402
from bench.sweep import build_specs, parse_sets, resolve_method_config  # noqa: E402

# The declared protocol (docs/budget-study.md); the options' defaults.
METHODS = ("safemax", "sa", "salun", "erasediff", "sfron", "ga", "neggrad_plus")
FRACTIONS = (0.03, 0.1, 0.3, 1.0)
CLASSES = (1, 5)
SEEDS = (0, 1)
MAX_RUN_SECONDS = 900.0
# The one hyperparameter swept for these methods, and its values (docs/budget-study.md says where they come from).
HYPERPARAMETERS = {"neggrad_plus": ("gamma", (0.03, 0.1, 0.3, 1.0)), "ga": ("alpha", (0.001, 0.01, 0.1, 1.0))}
# Fields the preset's scaling derives from the budget: set together with the iterations.
BUDGET_FIELDS = ("iterations", "outer_steps", "ema_decay")
# The rule's constants (docs/budget-study.md, "The selection rule").
RETENTION_POINTS = 10.0  # admissible: retained accuracy >= the original's - this
UA_TOLERANCE = 5.0  # candidates: UA >= the best admissible UA - this
FORGETS_AT = 50.0  # a method forgets when its best admissible UA reaches this
FD_TIE = 0.01
RULE = "docs/budget-study.md#the-selection-rule"
LOG_NAME = "budget-study-log.json"


# --- the plan ---------------------------------------------------------------------------------------------------

def budget_overrides(preset_name: str, method: str, fraction: float) -> dict:
    """The `--set` values that make `method` run as the preset would at `iteration_scale = fraction`: the budget
    fields whose value differs from the preset's own. Fractions outside (0, 1] are refused (never above the paper)."""
    if not 0 < fraction <= 1.0:
        raise ValueError(f"fraction {fraction}: the study runs fractions in (0, 1] of the paper's iterations")
    preset = get_preset(preset_name)
    _, own, _ = resolve_method_config(preset, method)
    _, scaled, _ = resolve_method_config(unchosen(preset, fraction), method)
    return {name: getattr(scaled, name) for name in BUDGET_FIELDS
            if hasattr(scaled, name) and getattr(scaled, name) != getattr(own, name)}


def unchosen(preset, fraction: float | None = None):
    """`preset` as it was before any study chose its budgets: method_defaults without the budget fields and the
    swept hyperparameters, no budget_sources; with `fraction`, at iteration_scale = fraction. The plan's fractions
    and the rule's "published default" are read from it, so a study can be rerun after its choice is applied."""
    swept = {method: field for method, (field, _) in HYPERPARAMETERS.items()}
    defaults = {method: {k: v for k, v in values.items() if k not in BUDGET_FIELDS and k != swept.get(method)}
                for method, values in preset.method_defaults.items()}
    scale = preset.iteration_scale if fraction is None else fraction
    return dataclasses.replace(preset, method_defaults=defaults, budget_sources={}, iteration_scale=scale)


@dataclass
class Point:
    """One configuration of the plan: a method at a fraction (and hyperparameter value), its overrides and runs."""

    method: str
    fraction: float
    iterations: int
    value: float | None  # the swept hyperparameter's value; None for a method without one
    overrides: dict
    specs: list = field(default_factory=list)
    config: dict = field(default_factory=dict)  # the resolved hyperparameters, as records hold them

    @property
    def done(self) -> list[dict]:
        """The records of this configuration, one per (class, seed) of the plan, found by their hyperparameters in
        any variant folder of the method: after the preset adopts a budget, the run it chose is the `default`
        variant while its study records sit under the `--set` folder they were made in (and an old `default`
        folder holds another configuration)."""
        wanted = {(s.forget_class, s.seed) for s in self.specs}
        method_folder = self.specs[0].directory.parents[2]  # .../<method>/<variant>/class<k>/seed<s>
        found = {}
        for path in sorted(method_folder.glob(f"*/class*/seed*/{records.RECORD_NAME}")):
            record = _read(path)
            if record is None:
                continue
            key = (record["forget_class"], record["seed"])
            if key in wanted and key not in found and record["hyperparameters"] == self.config:
                found[key] = record
        return [found[key] for key in sorted(found)]

    def sets(self) -> list[str]:
        return [f"{self.method}.{name}={value}" for name, value in self.overrides.items()]


_READ: dict[Path, tuple[int, dict | None]] = {}  # record path -> (mtime_ns, record): every point scans the same folder


def _read(path: Path) -> dict | None:
    """The record at `path`, parsed once per version of the file (None, said once, where it is corrupt)."""
    stamp = path.stat().st_mtime_ns
    if path not in _READ or _READ[path][0] != stamp:
        try:
            _READ[path] = (stamp, records.read_record(path))
        except records.CorruptRecord as exc:
            print(f"skipped: {exc}", file=sys.stderr)
            _READ[path] = (stamp, None)
    return _READ[path][1]


def plan(preset_name: str, methods, fractions, classes, seeds, results: str) -> list[Point]:
    """Every configuration of the study, `original` first (fraction 0), then each method by increasing fraction."""
    preset = get_preset(preset_name)
    points = [_point(preset, "original", 0.0, 0, None, {}, classes, seeds, results)]
    for method in methods:
        name, values = HYPERPARAMETERS.get(method, (None, (None,)))
        _, own, _ = resolve_method_config(preset, method)
        for fraction in sorted(fractions):
            budget = budget_overrides(preset_name, method, fraction)
            for value in values:
                overrides = dict(budget)
                if name is not None and value != getattr(own, name):
                    overrides[name] = value
                _, config, _ = resolve_method_config(preset, method, tuple(overrides.items()))
                points.append(_point(preset, method, fraction, config.iterations, value, overrides, classes, seeds,
                                     results))
    return points


def _point(preset, method, fraction, iterations, value, overrides, classes, seeds, results) -> Point:
    sets = [f"{method}.{k}={v}" for k, v in overrides.items()]
    specs = build_specs(preset, [method], list(classes), list(seeds), parse_sets(sets, [method]), results=results)
    _, config, _ = resolve_method_config(preset, method, tuple(overrides.items()))
    return Point(method, fraction, iterations, value, overrides, specs, json.loads(json.dumps(dataclasses.asdict(config))))


def seconds_per_iteration(points: list[Point]) -> float | None:
    """Median RTE per iteration over the finished runs of `points`; None before any."""
    found = []
    for point in points:
        for record in point.done:
            rte = (record.get("timings") or {}).get("rte_s")
            if rte and point.iterations:
                found.append(rte / point.iterations)
    return statistics.median(found) if found else None


# --- run --------------------------------------------------------------------------------------------------------

def bench_command(point: Point, args) -> list[str]:
    command = [sys.executable, "-m", "bench.cli", "run", "--preset", args.preset, "--methods", point.method,
               "--classes", ",".join(map(str, args.classes)), "--seeds", ",".join(map(str, args.seeds)),
               "--results", args.results, "--workers", str(args.workers), "--no-progress"]
    command += [item for text in point.sets() for item in ("--set", text)]
    command += ["--cache", args.cache] if args.cache else []
    command += ["--device", args.device] if args.device else []
    return command


def run(args) -> int:
    points = plan(args.preset, args.methods, args.fractions, args.classes, args.seeds, args.results)
    log_path = Path(args.results) / LOG_NAME
    earlier = json.loads(log_path.read_text()).get("capped", {}) if log_path.exists() else {}
    # A method run now gets its cap entry anew; the others keep theirs from earlier calls.
    log = {"protocol": protocol_facts(args), "capped": {m: v for m, v in earlier.items() if m not in args.methods}}
    failed = 0
    for method in ["original", *args.methods]:
        mine = [p for p in points if p.method == method]
        for fraction in sorted({p.fraction for p in mine}):
            at = [p for p in mine if p.fraction == fraction]
            rate = seconds_per_iteration([p for p in mine if p.fraction < fraction])
            predicted = rate * at[0].iterations if rate is not None else None
            if predicted is not None and predicted > args.max_run_seconds:
                log["capped"][method] = {"fraction": fraction, "iterations": at[0].iterations,
                                         "predicted_s": round(predicted, 1), "cap_s": args.max_run_seconds}
                print(f"{method}: curve stops below fraction {fraction} ({at[0].iterations} iterations): predicted "
                      f"RTE {predicted:.3g} s > cap {args.max_run_seconds:g} s")
                break
            for point in at:
                todo = len(point.specs) - len(point.done)
                label = _label(point) + (f", predicted RTE {predicted:.3g} s" if predicted is not None else "")
                if args.dry_run:
                    print(f"{label}: {todo} of {len(point.specs)} run(s) to do  [{' '.join(point.sets()) or 'default'}]")
                    continue
                if not todo:
                    continue
                print(f"{label}: {todo} run(s)", flush=True)
                failed += subprocess.run(bench_command(point, args), cwd=REPO).returncode != 0
    if args.dry_run:
        total = sum(len(p.specs) - len(p.done) for p in points)
        print(f"{total} run(s) to do at most (fractions over the cap are dropped once smaller ones have run); "
              "nothing written")
        return 0
    Path(args.results).mkdir(parents=True, exist_ok=True)
    log_path.write_text(json.dumps(log, indent=1) + "\n")
    return 1 if failed else 0


def _label(point: Point) -> str:
    if point.method == "original":
        return "original"
    name = HYPERPARAMETERS.get(point.method, (None,))[0]
    value = f", {name} {point.value:g}" if name else ""
    return f"{point.method} fraction {point.fraction:g} ({point.iterations} iterations{value})"


def protocol_facts(args) -> dict:
    return {"preset": args.preset, "methods": list(args.methods), "fractions": list(args.fractions),
            "classes": list(args.classes), "seeds": list(args.seeds), "max_run_seconds": args.max_run_seconds,
            "hyperparameters": {m: {"field": f, "values": list(v)} for m, (f, v) in HYPERPARAMETERS.items()
                                if m in args.methods}}


# --- the rule ---------------------------------------------------------------------------------------------------

@dataclass
class Configuration:
    """A configuration's means over the calibration runs: each class's mean over seeds, then over classes."""

    fraction: float
    iterations: int
    value: float | None
    ua: float
    retain_accuracy: float
    fid: float
    runs: int
    complete: bool
    admissible: bool = False
    candidate: bool = False


@dataclass
class Choice:
    method: str
    status: str  # forgets | never-forgets | no-retention | no-data
    chosen: Configuration | None
    best_ua: float | None
    original_retain_accuracy: float | None
    text: str
    configurations: list[Configuration] = field(default_factory=list)


def _mean_over_classes(rows: list[dict], metric: str) -> float:
    by_class: dict[int, list[float]] = {}
    for row in rows:
        value = row.get(metric)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            by_class.setdefault(row["class"], []).append(float(value))
    means = [statistics.fmean(values) for values in by_class.values()]
    return statistics.fmean(means) if means else math.nan


def configurations(rows: list[dict], classes, seeds) -> list[Configuration]:
    """Rows (method, fraction, iterations, value, class, seed, ua, retain_accuracy, fid) of one method ->
    one Configuration per (fraction, value); complete when every (class, seed) of the protocol has a row."""
    wanted = {(c, s) for c in classes for s in seeds}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if (row["class"], row["seed"]) in wanted:
            groups.setdefault((row["fraction"], row["iterations"], row.get("value")), []).append(row)
    found = []
    for (fraction, iterations, value), group in sorted(groups.items(), key=lambda item: (item[0][1], _order(item[0][2]))):
        unique = {(r["class"], r["seed"]): r for r in group}  # one run per (class, seed)
        found.append(Configuration(fraction, iterations, value, _mean_over_classes(unique.values(), "ua"),
                                   _mean_over_classes(unique.values(), "retain_accuracy"),
                                   _mean_over_classes(unique.values(), "fid"), len(unique), set(unique) == wanted))
    return found


def _order(value) -> float:
    return -math.inf if value is None else float(value)


def _distance(value, default) -> float:
    """|log(value / default)|: how far a hyperparameter value is from the published default."""
    if value is None or default is None or value <= 0 or default <= 0:
        return 0.0
    return abs(math.log(value / default))


def choose(method: str, configs: list[Configuration], original_retain_accuracy: float | None,
           default_value: float | None = None, capped: bool = False) -> Choice:
    """The declared rule (docs/budget-study.md) on one method's configurations."""
    complete = [c for c in configs if c.complete]
    if original_retain_accuracy is None or math.isnan(original_retain_accuracy):
        return Choice(method, "no-data", None, None, None, "no `original` records on the calibration classes and "
                      "seeds: the retention guard has no yardstick; run the study's `original` runs first", configs)
    if not complete:
        return Choice(method, "no-data", None, None, original_retain_accuracy,
                      "no configuration has all its calibration runs", configs)
    floor = original_retain_accuracy - RETENTION_POINTS
    for config in complete:
        config.admissible = config.retain_accuracy >= floor
    admissible = [c for c in complete if c.admissible]
    if not admissible:
        chosen = min(complete, key=lambda c: (-c.retain_accuracy, c.iterations))
        text = (f"no budget keeps retention (best RA {chosen.retain_accuracy:.1f}% vs the original's "
                f"{original_retain_accuracy:.1f}%, floor {floor:.1f}%): the least damaging configuration")
        return Choice(method, "no-retention", chosen, None, original_retain_accuracy, text, configs)
    best = max(c.ua for c in admissible)
    if best < FORGETS_AT:
        chosen = min(admissible, key=lambda c: (-c.iterations, -c.ua, c.fid))
        text = (f"does not forget at any budget tried (best admissible UA {best:.1f}% < {FORGETS_AT:.0f}%): the "
                "largest admissible budget")
        return Choice(method, "never-forgets", chosen, best, original_retain_accuracy, _capped(text, chosen, configs,
                                                                                               capped), configs)
    candidates = [c for c in admissible if c.ua >= best - UA_TOLERANCE]
    for config in candidates:
        config.candidate = True
    fewest = min(c.iterations for c in candidates)
    chosen = min((c for c in candidates if c.iterations == fewest),
                 key=lambda c: (round(c.fid / FD_TIE), _distance(c.value, default_value), _order(c.value)))
    text = (f"the fewest iterations with UA within {UA_TOLERANCE:.0f} points of the best admissible UA "
            f"({best:.1f}%) and retained accuracy >= {floor:.1f}%")
    return Choice(method, "forgets", chosen, best, original_retain_accuracy, _capped(text, chosen, configs, capped),
                  configs)


def _capped(text: str, chosen: Configuration, configs: list[Configuration], capped: bool) -> str:
    if capped and chosen.iterations == max(c.iterations for c in configs if c.complete):
        return text + "; the CPU cap stopped the curve at this fraction, which may not be its maximum"
    return text


# --- select -----------------------------------------------------------------------------------------------------

def study_rows(points: list[Point]) -> list[dict]:
    """One row per finished run of the plan: its configuration and the metrics the rule reads."""
    rows = []
    for point in points:
        for record in point.done:
            metrics = record["metrics"]
            rows.append({"method": point.method, "fraction": point.fraction, "iterations": point.iterations,
                         "value": point.value, "class": record["forget_class"], "seed": record["seed"],
                         "ua": metrics.get("ua"), "retain_accuracy": metrics.get("retain_accuracy"),
                         "fid": metrics.get("fid")})
    return rows


def select(args) -> int:
    points = plan(args.preset, args.methods, args.fractions, args.classes, args.seeds, args.results)
    rows = study_rows(points)
    log_path = Path(args.results) / LOG_NAME
    capped = json.loads(log_path.read_text()).get("capped", {}) if log_path.exists() else {}
    original = [r for r in rows if r["method"] == "original"]
    ra0 = _mean_over_classes(original, "retain_accuracy") if original else None
    choices = []
    preset = get_preset(args.preset)
    for method in args.methods:
        name = HYPERPARAMETERS.get(method, (None,))[0]
        default = getattr(resolve_method_config(unchosen(preset), method)[1], name) if name else None
        configs = configurations([r for r in rows if r["method"] == method], args.classes, args.seeds)
        choices.append(choose(method, configs, ra0, default, method in capped))
    summary = {"rule": RULE, "protocol": protocol_facts(args), "capped": capped, "original_retain_accuracy": ra0,
               "methods": {c.method: _choice_json(c, args.preset) for c in choices}}
    out = Path(args.results)
    (out / "budget-selection.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out / "budget-selection.md").write_text(markdown(choices, summary))
    for choice in choices:
        chosen = choice.chosen
        where = "-" if chosen is None else f"fraction {chosen.fraction:g} ({chosen.iterations} iterations" + (
            f", {HYPERPARAMETERS[choice.method][0]} {chosen.value:g})" if chosen.value is not None else ")")
        print(f"{choice.method}: {choice.status}: {where}: {choice.text}")
    print(f"written: {out / 'budget-selection.json'}, {out / 'budget-selection.md'}")
    return 0


def _choice_json(choice: Choice, preset: str) -> dict:
    chosen = choice.chosen
    entry = None
    if chosen is not None:
        entry = dict(budget_overrides(preset, choice.method, chosen.fraction)) if chosen.fraction else {}
        entry = {**{"iterations": chosen.iterations}, **entry}
        if chosen.value is not None:
            entry[HYPERPARAMETERS[choice.method][0]] = chosen.value
    return {"status": choice.status, "text": choice.text, "best_ua": choice.best_ua,
            "chosen": dataclasses.asdict(chosen) if chosen else None, "method_defaults": entry,
            "configurations": [dataclasses.asdict(c) for c in choice.configurations]}


def markdown(choices: list[Choice], summary: dict) -> str:
    ra0 = summary["original_retain_accuracy"]
    lines = ["# Budget study: selection", "",
             f"Rule: {RULE} (written before the study's numbers). Original's retained accuracy on the calibration "
             f"runs: {'n/a' if ra0 is None else f'{ra0:.1f}%'}.", ""]
    for choice in choices:
        lines += [f"## {choice.method}", "", f"**{choice.status}**: {choice.text}.", ""]
        entry = summary["methods"][choice.method]["method_defaults"]
        if entry:
            lines += [f"`method_defaults` entry: `{json.dumps(entry)}`", ""]
        lines += ["| fraction | iterations | value | UA % | RA % | FD | runs | admissible | candidate | chosen |",
                  "|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|:-:|"]
        for c in choice.configurations:
            runs = f"{c.runs}{'' if c.complete else ' (incomplete)'}"
            lines.append(f"| {c.fraction:g} | {c.iterations} | {'' if c.value is None else f'{c.value:g}'} | "
                         f"{c.ua:.1f} | {c.retain_accuracy:.1f} | {c.fid:.2f} | {runs} | "
                         f"{'yes' if c.admissible else ''} | {'yes' if c.candidate else ''} | "
                         f"{'**yes**' if c is choice.chosen else ''} |")
        lines.append("")
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------------------------

def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(sorted({float(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: use numbers like 0.03,0.1,0.3,1.0") from None
    bad = [v for v in values if not 0 < v <= 1.0]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"fractions {bad or text!r}: each must be in (0, 1] (never above the "
                                         "paper's count)")
    return values


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: use integers like 1,5") from None


def _methods(text: str) -> tuple[str, ...]:
    from methods import METHODS as REGISTRY

    found = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in found if m not in REGISTRY or m in ("original", "retrain")]
    if bad or not found:
        raise argparse.ArgumentTypeError(f"methods {bad or text!r}: choose from {', '.join(METHODS)}")
    return found


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = main.add_subparsers(dest="command", required=True)
    for name in ("run", "select"):
        sub = commands.add_parser(name)
        sub.add_argument("--preset", default="digits")
        sub.add_argument("--results", default="results-budget", help="records folder (bench run --results)")
        sub.add_argument("--methods", type=_methods, default=METHODS)
        sub.add_argument("--fractions", type=_floats, default=FRACTIONS, help="of the paper's iterations, in (0, 1]")
        sub.add_argument("--classes", type=_ints, default=CLASSES, help="calibration forget classes")
        sub.add_argument("--seeds", type=_ints, default=SEEDS)
        if name == "run":
            sub.add_argument("--max-run-seconds", type=float, default=MAX_RUN_SECONDS,
                             help="a fraction whose predicted RTE per run exceeds this is not run, nor larger ones")
            sub.add_argument("--workers", type=int, default=1)
            sub.add_argument("--cache", default=None)
            sub.add_argument("--device", default=None)
            sub.add_argument("--dry-run", action="store_true", help="list the runs; run and write nothing")
    return main


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        get_preset(args.preset)
        if args.command == "select":
            args.max_run_seconds = MAX_RUN_SECONDS
        return run(args) if args.command == "run" else select(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
