#!/usr/bin/env python3
"""`make gpu-check`: are the speed switches right on this GPU, and how fast is every method? One prepared script.

First the correctness checks (the optimized first step against the plain fp32 step on the `sa` UNet, for
SAFEMax, SA and SalUn; the sampler's guided prediction under bf16, CUDA graphs and torch.compile against
eager), then `bench perf` at the cifar10 preset's shapes. It prints the table and writes
docs/benchmarks/<gpu>-<date>.md and .json. Under 5 minutes on one H100/H200 (torch.compile of the SAFEMax
step takes ~2 of them; --no-compile skips it). Needs only torch, numpy and tqdm (no submitit, pytorch-fid or
click), and runs from a plain checkout: `python scripts/gpu_check.py`. Exit 1 if a check or a workload failed.
`--preset tiny --device cpu` is a dry run of the whole script on a laptop.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.config import get_preset  # noqa: E402
from bench.device import PLAIN, Speed, pick_device  # noqa: E402
from bench.diffusion import guided_predictor  # noqa: E402
from bench.perf import (  # noqa: E402
    DEFAULT_METHODS,
    Bench,
    PerfOptions,
    first_step,
    markdown,
    prepared_for,
    relative_error,
    run_perf,
    write_outputs,
)

log = logging.getLogger("gpu_check")

# bf16 keeps 8 bits of mantissa: the loss agrees to ~1e-3 and the whole gradient to a few percent (measured on
# the CPU's tiny UNet: 1.2-5.9%); fp32 variants differ only by summation order (and TF32 convolutions on CUDA).
STEP_TOLERANCE = {"bf16": (1e-2, 0.1), "bf16 + channels_last": (1e-2, 0.1), "fp32 channels_last": (1e-3, 1e-2)}
STEP_SPEEDS = {"bf16": Speed(amp=True), "bf16 + channels_last": Speed(amp=True, channels_last=True),
               "fp32 channels_last": Speed(amp=False, channels_last=True)}


def check_steps(bench: Bench) -> list[dict]:
    """Loss and whole-gradient relative error of each optimized first step against the plain fp32 step."""
    checks = []
    for name in DEFAULT_METHODS:
        prepared = prepared_for(bench, name)
        ref_loss, ref_grads = first_step(bench, name, PLAIN, prepared)
        for label, speed in STEP_SPEEDS.items():
            loss, grads = first_step(bench, name, speed, prepared)
            loss_error, grad_error = abs(loss - ref_loss) / abs(ref_loss), relative_error(grads, ref_grads)
            loss_tol, grad_tol = STEP_TOLERANCE[label]
            checks.append({"check": f"{name} step, {label}", "measured": f"loss {loss_error:.1e}, grad {grad_error:.1e}",
                           "tolerance": f"loss {loss_tol:g}, grad {grad_tol:g}",
                           "ok": loss_error <= loss_tol and grad_error <= grad_tol})
    return checks


@torch.no_grad()
def check_sampler(bench: Bench, compile_too: bool) -> list[dict]:
    """The guided prediction (w = 2, mid-chain t) of each sampler variant against fp32 eager."""
    cfg, device = bench.preset.unet, bench.device
    gen = torch.Generator(device).manual_seed(11)
    x = torch.randn((64, cfg.in_channels, cfg.image_size, cfg.image_size), generator=gen, device=device)
    t = torch.full((64,), 500, device=device, dtype=torch.long)
    labels = torch.arange(64, device=device) % cfg.num_classes

    def eps(speed: Speed) -> torch.Tensor:
        model = bench.model().eval()
        return guided_predictor(model, labels, tuple(x.shape), 2.0, speed.for_device(device))(x, t).float()

    reference = eps(PLAIN)
    # Guidance (1 + w) c - w u = 3c - 2u triples bf16's ~1% error per prediction: measured 4.6% on the CPU.
    variants = {"bf16": (Speed(amp=True, cuda_graphs=False), 0.1),
                "fp32 CUDA graph": (dataclasses.replace(PLAIN, cuda_graphs=True), 1e-4),
                "bf16 CUDA graph": (Speed(amp=True), 0.1)}
    if compile_too:
        variants["bf16 compiled + CUDA graphs"] = (Speed(amp=True, compile=True), 0.1)
    checks = []
    for label, (speed, tolerance) in variants.items():
        if speed.cuda_graphs and device.type != "cuda":
            continue
        error = float((eps(speed) - reference).norm() / reference.norm())
        checks.append({"check": f"sampler eps, {label}", "measured": f"{error:.1e}", "tolerance": f"{tolerance:g}",
                       "ok": error <= tolerance})
    return checks


def correctness(preset_name: str, device: torch.device, compile_sampler: bool) -> list[dict]:
    """Every check on the preset's UNet with dropout off (its masks depend on memory layout and dtype)."""
    preset = get_preset(preset_name)
    preset = dataclasses.replace(preset, unet=dataclasses.replace(preset.unet, dropout=0.0))
    bench = Bench(preset, PerfOptions.for_preset(preset_name, batch_size=32, images_per_class=32), device)
    return check_steps(bench) + check_sampler(bench, compile_sampler)


def measure(args: argparse.Namespace) -> dict:
    """`bench perf`: fp32, default and channels_last for every method and the sampler; compiled SAFEMax apart."""
    variants = ("fp32", "default", "channels_last")
    options = PerfOptions.for_preset(args.preset, variants=variants, sampler_variants=variants, device=args.device)
    result = run_perf(options)
    if args.compile:
        compiled = run_perf(dataclasses.replace(options, methods=("safemax",), variants=("compile",),
                                                sampler_variants=("compile",) if args.compile_sampler else ()))
        result["rows"] += compiled["rows"]
        result["variants"].update(compiled["variants"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10", help="cifar10 (the paper's shapes) or tiny (a dry run)")
    parser.add_argument("--device", default=None, help="torch device [default: cuda if available]")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks"), help="folder for the table")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled SAFEMax step")
    parser.add_argument("--compile-sampler", action="store_true", help="also compile the sampler (~90 s more)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = pick_device(args.device)
    if device.type != "cuda":
        log.warning("no GPU: a dry run on %s; its table is not a GPU benchmark", device)
    started = time.perf_counter()
    checks = correctness(args.preset, device, args.compile and args.compile_sampler)
    log.info("correctness checks done in %.0f s: %d of %d ok", time.perf_counter() - started,
             sum(c["ok"] for c in checks), len(checks))
    result = measure(args)
    result["checks"] = checks
    result["gpu_check_seconds"] = time.perf_counter() - started
    json_path, md_path = write_outputs(result, args.out)
    print(markdown(result))
    print(f"wrote {json_path} and {md_path} ({result['gpu_check_seconds']:.0f} s in all)")
    failed = [c["check"] for c in checks if not c["ok"]] + [r["workload"] for r in result["rows"] if "error" in r]
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
