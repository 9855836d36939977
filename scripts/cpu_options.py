#!/usr/bin/env python3
"""Which CPU speed-ups keep every number? Measures the candidates of issue 27 item 2 against the plain path.

For a preset's UNet (`--preset`, digits by default) on one CPU thread, each candidate is timed back to back with
the plain path, interleaved (plain, candidate, plain, candidate, ...) so that a change in the machine's load hits
both arms alike, and checked for bitwise equality with it: a training candidate after `--steps` Adam steps of batch
64 (the weights), a sampling candidate on one guided forward (the prediction). The ratio is the median of the
per-pair ratios. The sampling batches are the preset's evaluation's: one retained class per batch, or all of them.

    python scripts/cpu_options.py                 # prints a Markdown table
    python scripts/cpu_options.py --compile       # torch.compile too (a minute or more of compilation)
    python scripts/cpu_options.py --preset tiny   # the UNet and evaluation batches of the preset the tests use

Candidates: channels-last layout; oneDNN off (PyTorch's own convolution); Adam without foreach / fused; a larger
sampling batch (every retained class in one batch instead of one class per batch); torch.compile (inductor).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.config import UNetConfig, get_preset  # noqa: E402
from bench.unet import ConditionalUNet  # noqa: E402

BATCH = 64


def train_arm(config: UNetConfig, steps: int, channels_last: bool = False, mkldnn: bool = True,
              compile_model: bool = False, **adam) -> tuple[dict, list[float]]:
    """Weights after `steps` Adam steps of the DDPM-style squared error on fixed random data, and each step's
    seconds. Every arm draws the same data and dropout."""
    torch.manual_seed(0)
    model = ConditionalUNet(config)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_model else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, **{"foreach": True, **adam})
    data = torch.Generator().manual_seed(1)
    seconds = []
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = mkldnn
    try:
        for step in range(steps):
            x = torch.randn(BATCH, 1, config.image_size, config.image_size, generator=data)
            t = torch.randint(0, 1000, (BATCH,), generator=data)
            y = torch.randint(0, config.num_classes, (BATCH,), generator=data)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            torch.manual_seed(step)  # dropout
            started = time.perf_counter()
            optimizer.zero_grad()
            (forward(x, t, y) - x).square().sum().backward()
            optimizer.step()
            seconds.append(time.perf_counter() - started)
    finally:
        torch.backends.mkldnn.enabled = previous
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, seconds


def sample_arm(config: UNetConfig, images: int, per_batch: int, channels_last: bool = False,
               compile_model: bool = False) -> tuple[torch.Tensor, float]:
    """The guided forward of `images` images in batches of `per_batch` (x2 for the unconditional half): the
    prediction and the seconds per image."""
    torch.manual_seed(0)
    model = ConditionalUNet(config).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_model else model
    data = torch.Generator().manual_seed(1)
    x = torch.randn(2 * images, 1, config.image_size, config.image_size, generator=data)
    t = torch.randint(0, 1000, (2 * images,), generator=data)
    y = torch.randint(0, config.num_classes, (2 * images,), generator=data)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        forward(x[:2 * per_batch], t[:2 * per_batch], y[:2 * per_batch])  # warm-up (and compilation)
        started = time.perf_counter()
        out = torch.cat([forward(x[i:i + 2 * per_batch], t[i:i + 2 * per_batch], y[i:i + 2 * per_batch])
                         for i in range(0, 2 * images, 2 * per_batch)])
        return out.contiguous(), (time.perf_counter() - started) / images


def compare(name: str, plain: Callable, candidate: Callable, pairs: int, kind: str) -> dict:
    """Interleaved pairs; bitwise equality and largest difference from the last pair; median per-pair ratio."""
    ratios, plain_times, candidate_times = [], [], []
    for _ in range(pairs):
        a, a_time = plain()
        b, b_time = candidate()
        plain_times.append(a_time)
        candidate_times.append(b_time)
        ratios.append(b_time / a_time)
    if kind == "train":
        equal = all(torch.equal(a[k], b[k]) for k in a)
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    else:
        equal, diff = torch.equal(a, b), float((a - b).abs().max())
    return {"candidate": name, "plain_s": statistics.median(plain_times),
            "candidate_s": statistics.median(candidate_times), "ratio": statistics.median(ratios),
            "bitwise": equal, "max_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per arm (default 20)")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved plain/candidate pairs (default 3)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow to compile)")
    parser.add_argument("--preset", default="digits", help="whose UNet and evaluation batches (default digits)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = get_preset(args.preset)
    protocol = preset.protocol(None)
    per_class = min(protocol.retain_samples_per_class, protocol.batch_size)  # one sampler batch per retained class
    retained = (preset.num_classes - 1) * per_class

    def train(**kw):
        def run():
            weights, seconds = train_arm(preset.unet, args.steps, **kw)
            return weights, statistics.median(seconds[2:])
        return run

    def sampled(images: int, per_batch: int, **kw):
        return lambda: sample_arm(preset.unet, images, per_batch, **kw)

    rows = [compare("channels-last (training step)", train(), train(channels_last=True), args.pairs, "train"),
            compare("oneDNN off (training step)", train(), train(mkldnn=False), args.pairs, "train"),
            compare("Adam for-loop instead of foreach", train(), train(foreach=False), args.pairs, "train"),
            compare("Adam fused", train(), train(foreach=False, fused=True), args.pairs, "train"),
            compare(f"{preset.num_classes - 1} classes per sampling batch ({retained} vs {per_class} images)",
                    sampled(retained, per_class), sampled(retained, retained), args.pairs, "sample"),
            compare("channels-last (sampling)", sampled(retained, per_class),
                    sampled(retained, per_class, channels_last=True), args.pairs, "sample")]
    if args.compile:
        rows += [compare("torch.compile (training step)", train(), train(compile_model=True), 1, "train"),
                 compare("torch.compile (sampling)", sampled(retained, per_class),
                         sampled(retained, per_class, compile_model=True), 1, "sample")]
    print(f"torch {torch.__version__}, 1 thread, {preset.name} UNet, training batch {BATCH}, {args.steps} steps, "
          f"{args.pairs} interleaved pairs\n")
    print("| candidate | plain | candidate | candidate / plain time (median of pairs; < 1 is faster) "
          "| bitwise equal | largest difference |")
    print("|---|---:|---:|---:|---|---:|")
    for row in rows:
        label = "ms/image" if "sampl" in row["candidate"] else "ms/step"
        print(f"| {row['candidate']} | {row['plain_s'] * 1e3:.3f} {label} | {row['candidate_s'] * 1e3:.3f} | "
              f"{row['ratio']:.2f}x | {'yes' if row['bitwise'] else 'no'} | {row['max_diff']:.2g} |")


if __name__ == "__main__":
    main()
