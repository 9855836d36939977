#!/usr/bin/env python3
"""Does bf16 move the benchmark's metrics more than seed-to-seed noise? The study behind the `amp` default.

Runs original, safemax, sa and salun on `digits` over forget classes 0-9 and seeds 0-2 twice: in fp32
(`--speed amp=false`) and with bf16 autocast (`--speed amp=true`, training and sampling alike), then compares
each method's mean UA, H, FD and retained accuracy between the two arms with the spread across seeds (the
standard deviation over seeds of the per-seed means over classes). bf16 stays a default only where every mean
moves less than that spread. Writes docs/bf16.md.

On a CPU without native bf16 kernels (AVX-512 BF16 / AMX), torch's bf16 convolutions take a reference path ten
times slower than fp32 (measured: 1.26 s vs 0.12 s per digits step), which puts SA's bf16 arm alone at ~20 CPU
hours. `--arm bf16-emulated` keeps fp32 kernels and rounds what autocast rounds: the inputs and the output of
every convolution, linear layer, matrix product and attention to bf16, with fp32 accumulation (what CUDA's bf16
autocast computes on tensor cores). `validate` compares the emulation with real CPU autocast on the guided
prediction.

    python scripts/bf16_study.py run --arm fp32 --out /tmp/bf16            # 120 runs
    python scripts/bf16_study.py run --arm bf16-emulated --out /tmp/bf16   # 120 runs
    python scripts/bf16_study.py validate --cache C
    python scripts/bf16_study.py summarize --out /tmp/bf16 --write docs/bf16.md
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

log = logging.getLogger("bf16_study")

METHODS = ("original", "safemax", "sa", "salun")
METRICS = ("ua", "entropy", "fid", "retain_accuracy")
ARMS = {"fp32": False, "bf16": True, "bf16-emulated": True}
# Ops CPU and CUDA autocast run in bf16 (torch's autocast lower-precision lists, as this UNet uses them).
LOWER_PRECISION = {F.conv2d, F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
                   F.scaled_dot_product_attention, torch.Tensor.matmul, torch.Tensor.__matmul__}


def _to_bf16(value):
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.to(torch.bfloat16).to(torch.float32)
    return value


class BF16Emulation(TorchFunctionMode):
    """bf16-rounded inputs and output of autocast's lower-precision ops, computed and accumulated in fp32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LOWER_PRECISION:
            result = func(*map(_to_bf16, args), **{k: _to_bf16(v) for k, v in kwargs.items()})
            return _to_bf16(result)
        return func(*args, **kwargs)


def _emulated_autocast(device, enabled: bool, cache: bool = True):
    return BF16Emulation() if enabled else contextlib.nullcontext()


def install_emulation() -> None:
    """Make the harness's one autocast entry point (training and sampling) emulate bf16 instead."""
    import bench.diffusion
    import bench.runner

    bench.runner.autocast = _emulated_autocast
    bench.diffusion.autocast = _emulated_autocast


def specs(arm: str, out: str, methods, classes, seeds, cache: str | None):
    from bench.config import get_preset
    from bench.sweep import Sweep, build_specs

    return build_specs(get_preset("digits"), list(methods), list(classes), list(seeds), Sweep({}, {}),
                       results=str(Path(out) / arm), cache=cache, speed=(("amp", ARMS[arm]),), device="cpu",
                       progress=False)


def _worker(arm: str, shard: list, threads: int) -> list[str]:
    from bench.orchestrate import run_claimed

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if arm == "bf16-emulated":
        install_emulation()
    done = []
    for spec in shard:
        outcome = run_claimed(spec)
        log.info("%s %s: %s", arm, spec.describe(), outcome.status)
        done.append(outcome.status)
    return done


def run(args) -> None:
    from bench.orchestrate import split_finished
    from bench.prerequisites import build, prerequisites_for

    todo = split_finished(specs(args.arm, args.out, args.methods, args.classes, args.seeds, args.cache))[1]
    for task in prerequisites_for(todo):
        build(task)
    shards = [todo[i :: args.workers] for i in range(args.workers)]
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        results = pool.starmap(_worker, [(args.arm, shard, threads) for shard in shards if shard])
    log.info("%s: %d run(s): %s", args.arm, sum(map(len, results)), [s for r in results for s in r])


def _metrics(out: Path, arm: str) -> dict:
    """(method, forget class, seed) -> metric -> value, for every record of one arm."""
    from bench.records import read_all

    records, corrupt = read_all(out / arm) if (out / arm).is_dir() else ([], [])
    if corrupt:
        raise SystemExit(f"corrupt records: {corrupt}")
    return {(r["method"], r["forget_class"], r["seed"]): {m: r["metrics"][m] for m in METRICS} for r in records}


def _per_seed(runs: dict, keys: list, metric: str) -> dict:
    """seed -> mean over the forget classes of `keys` (one method's runs)."""
    seeds: dict = {}
    for key in keys:
        seeds.setdefault(key[2], []).append(runs[key][metric])
    return {seed: statistics.fmean(values) for seed, values in seeds.items()}


def summarize(args) -> None:
    """Paired: only the (method, class, seed) runs that both arms have are compared."""
    out = Path(args.out)
    reference = _metrics(out, "fp32")
    lines = []
    for arm in ("bf16-emulated", "bf16"):
        other = _metrics(out, arm)
        paired = sorted(k for k in set(reference) & set(other) if args.classes is None or k[1] in args.classes)
        if not paired:
            continue
        lines += [f"### fp32 against {arm}: {len(paired)} paired runs", "",
                  "| method | classes | seeds | metric | fp32 mean | " + arm + " mean | difference "
                  "| seed spread (fp32 std over seeds) | within spread |", "|---|---|---|---|---:|---:|---:|---:|---|"]
        for method in [m for m in METHODS if any(k[0] == m for k in paired)]:
            keys = [k for k in paired if k[0] == method]
            classes = ",".join(str(c) for c in sorted({k[1] for k in keys}))
            seeds = ",".join(str(s) for s in sorted({k[2] for k in keys}))
            for metric in METRICS:
                base, test = _per_seed(reference, keys, metric), _per_seed(other, keys, metric)
                spread = statistics.stdev(base.values()) if len(base) > 1 else float("nan")
                diff = statistics.fmean(test.values()) - statistics.fmean(base.values())
                if diff == 0 or abs(diff) < spread:  # an unchanged mean passes even where the seeds agree exactly
                    ok = "yes"
                else:
                    ok = "n/a" if spread != spread else "**no**"
                lines.append(f"| {method} | {classes} | {seeds} | {metric} | {statistics.fmean(base.values()):.3f} | "
                             f"{statistics.fmean(test.values()):.3f} | {diff:+.3f} | {spread:.3f} | {ok} |")
        lines.append("")
    table = "\n".join(lines)
    print(table)
    if args.write:
        Path(args.write).write_text(Path(args.write).read_text().split("<!-- table -->")[0] + "<!-- table -->\n\n"
                                    + table)


def validate(args) -> None:
    """How far real CPU bf16 autocast and the emulation each move the base model's guided eps from fp32."""
    from bench.cache import Cache
    from bench.config import get_preset
    from bench.data import load_dataset
    from bench.device import autocast
    from bench.diffusion import NoiseSchedule, guided_eps
    from bench.prerequisites import load_base
    from bench.unet import ConditionalUNet

    preset, cpu = get_preset("digits"), torch.device("cpu")
    cache = Cache(args.cache)
    model = ConditionalUNet(preset.unet)
    model.load_state_dict(load_base(preset, cache)["ema"])
    model.eval()
    data = load_dataset(preset.dataset, "train", image_size=preset.unet.image_size)
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(data.labels), generator=generator)[: args.batch]
    x0, labels = data.images[index], data.labels[index]
    schedule = NoiseSchedule(preset.diffusion, cpu)
    print("| t | real bf16 vs fp32 | emulated vs fp32 | emulated vs real bf16 |\n|---:|---:|---:|---:|")
    for step in (10, 250, 500, 750, 990):
        t = torch.full((len(labels),), step)
        x = schedule.add_noise(x0, torch.randn(x0.shape, generator=generator), t)
        with torch.no_grad():
            fp32 = guided_eps(model, x, t, labels, 2.0)
            with autocast(cpu, True):
                real = guided_eps(model, x, t, labels, 2.0).float()
            with BF16Emulation():
                emulated = guided_eps(model, x, t, labels, 2.0)

        def rel(a, b):
            return f"{((a - b).norm() / b.norm()).item():.2%}"

        print(f"| {step} | {rel(real, fp32)} | {rel(emulated, fp32)} | {rel(emulated, real)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runner = sub.add_parser("run")
    runner.add_argument("--arm", choices=tuple(ARMS), required=True)
    runner.add_argument("--out", required=True)
    runner.add_argument("--cache", default=None)
    runner.add_argument("--methods", type=lambda s: s.split(","), default=METHODS)
    runner.add_argument("--classes", type=lambda s: [int(c) for c in s.split(",")], default=range(10))
    runner.add_argument("--seeds", type=lambda s: [int(c) for c in s.split(",")], default=(0, 1, 2))
    runner.add_argument("--workers", type=int, default=2)
    check = sub.add_parser("validate", help="guided eps of the cached digits base model: real bf16 and the "
                                            "emulation against fp32")
    check.add_argument("--cache", default=None)
    check.add_argument("--batch", type=int, default=256)
    summary = sub.add_parser("summarize")
    summary.add_argument("--out", required=True)
    summary.add_argument("--classes", type=lambda s: [int(c) for c in s.split(",")], default=None,
                         help="compare only these forget classes (every seed must have the same ones)")
    summary.add_argument("--write", default=None, help="replace the table at the end of this Markdown file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    {"run": run, "summarize": summarize, "validate": validate}[args.command](args)


if __name__ == "__main__":
    main()
