"""Figure 1 for a preset's data: how the forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps raises the
entropy of the latents and makes the classes alike. Uses the training images and the noise schedule only.

Estimators (nats per dimension; images in [-1, 1]):
- marginal entropy: Gaussian differential entropy 0.5 log(2 pi e var_d) of each pixel's variance over noised
  images (Monte Carlo with NoiseSchedule.add_noise), averaged over pixels;
- joint entropy: 0.5 log det(2 pi e Sigma_t) / D with Sigma_t = abar_t Sigma_0 + (1 - abar_t) I and Sigma_0 the
  training images' covariance (closed form from its eigenvalues).
Both are the maximum entropy for the given (co)variance, so upper bounds; they meet 0.5 log(2 pi e) = 1.419 at x_T.
- class distance: mean over class pairs of the Frechet distance between the laws of x_t given the class, for
  Gaussian fits N(mu_c, S_c) of each class in the top-k principal components of the data (isotropic noise
  projects to N(0, I_k)); closed form, since x_t | c ~ N(sqrt(abar_t) mu_c, abar_t S_c + (1 - abar_t) I), which
  avoids the large small-sample bias of a Frechet distance between two sets of noised samples;
- class separability: accuracy of assigning noised images (Monte Carlo, add_noise) to the nearest class mean, the
  means fitted on the other half of the images (chance = 1 / classes).
The numbers depend only on the data, the schedule and the estimator settings: `cached_figure1` keeps them beside
the figure, keyed by a hash of the training images, so a second report reads them instead of recomputing them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.config import Preset
from bench.data import ClassDataset, load_dataset
from bench.diffusion import NoiseSchedule
from reports.figures import Figure, plt, sns

log = logging.getLogger(__name__)
GAUSSIAN_ENTROPY = 0.5 * math.log(2 * math.pi * math.e)
STATS_NAME, KEY_NAME = "figure1_latents.csv", "figure1_latents.json"


def balanced_subset(data: ClassDataset, per_class: int, generator: torch.Generator) -> ClassDataset:
    keep = []
    for label in range(data.num_classes):
        indices = torch.nonzero(data.labels == label).flatten()
        keep.append(indices[torch.randperm(len(indices), generator=generator)[:per_class]])
    keep = torch.cat(keep)
    return ClassDataset(data.images[keep], data.labels[keep], data.class_names, data.source)


def latent_statistics(data: ClassDataset, schedule: NoiseSchedule, *, points: int = 40, per_class: int = 500,
                      components: int = 64, seed: int = 0) -> pd.DataFrame:
    """One row per timestep t: marginal and joint entropy, mean class-pair Frechet distance, nearest-mean accuracy."""
    generator = torch.Generator().manual_seed(seed)
    data = balanced_subset(data, per_class, generator)
    x0 = data.images.flatten(1).double()
    labels, dims = data.labels, x0.shape[1]
    _, singular, vh = torch.linalg.svd(x0 - x0.mean(0), full_matrices=False)
    eigen = torch.zeros(dims, dtype=torch.float64)
    eigen[: len(singular)] = singular**2 / (len(x0) - 1)
    basis = vh[: min(components, dims)].T
    projected = (x0 @ basis).numpy()
    classes = sorted(set(labels.tolist()))
    fits = {c: (projected[labels == c].mean(0), np.cov(projected[labels == c], rowvar=False)) for c in classes}
    # Means are fitted on one half of each class and scored on the other, so pure noise scores chance.
    fit_half = torch.rand(len(x0), generator=generator) < 0.5
    rows = []
    for t in np.unique(np.linspace(0, schedule.timesteps - 1, points).round().astype(int)):
        abar = float(schedule.abar(torch.tensor([int(t)]))[0])
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        x_t = schedule.add_noise(x0, noise, torch.full((len(x0),), int(t)))
        means = torch.stack([x_t[fit_half & (labels == c)].mean(0) for c in classes])
        nearest = torch.tensor(classes)[torch.cdist(x_t[~fit_half], means).argmin(1)]
        rows.append({
            "t": int(t), "abar": abar,
            "marginal_entropy": float((0.5 * torch.log(2 * math.pi * math.e * x_t.var(0))).mean()),
            "joint_entropy": float((0.5 * torch.log(2 * math.pi * math.e * (abar * eigen + 1 - abar))).mean()),
            "class_frechet": float(np.mean([_frechet(fits[a], fits[b], abar) for a, b in
                                            itertools.combinations(classes, 2)])),
            "nearest_mean_accuracy": 100 * float((nearest == labels[~fit_half]).double().mean()),
        })
    return pd.DataFrame(rows)


def _frechet(fit_a, fit_b, abar: float) -> float:
    """Frechet distance between the laws of x_t for two classes' Gaussian fits N(mu, S): N(sqrt(abar) mu,
    abar S + (1 - abar) I)."""
    eye = np.eye(len(fit_a[0]))
    cov_a, cov_b = abar * fit_a[1] + (1 - abar) * eye, abar * fit_b[1] + (1 - abar) * eye
    # Both covariances are symmetric positive definite: tr sqrt(A B) = sum sqrt(eig(A^1/2 B A^1/2)).
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    mean_gap = abar * float(np.sum((fit_a[0] - fit_b[0]) ** 2))
    return mean_gap + float(np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def load_training_images(preset: Preset, data_root: str | None) -> ClassDataset:
    return load_dataset(preset.dataset, "train", image_size=preset.unet.image_size, root=data_root)


def figure1(stats: pd.DataFrame, preset: Preset, source: str, per_class: int, components: int) -> Figure:
    fig, (ax_h, ax_fd, ax_acc) = plt.subplots(1, 3, layout="constrained", figsize=(10.5, 3.1))
    palette = sns.color_palette()
    ax_h.plot(stats["t"], stats["marginal_entropy"], color=palette[0], label="marginal (per-pixel variance)")
    ax_h.plot(stats["t"], stats["joint_entropy"], color=palette[1], label="joint (full covariance)")
    ax_h.axhline(GAUSSIAN_ENTROPY, color="0.4", linestyle="--", linewidth=1, label="N(0, I): ½ log 2πe")
    ax_h.set_ylabel("entropy (nats / dimension)")
    ax_h.set_title("(a) entropy of x_t", fontsize=8)
    ax_h.legend(fontsize=6)
    ax_fd.plot(stats["t"], stats["class_frechet"], color=palette[2])
    ax_fd.set_yscale("log")
    ax_fd.set_ylabel("Fréchet distance, class pairs")
    ax_fd.set_title("(b) class-conditional latents converge", fontsize=8)
    ax_acc.plot(stats["t"], stats["nearest_mean_accuracy"], color=palette[3])
    classes = preset.num_classes
    ax_acc.axhline(100 / classes, color="0.4", linestyle="--", linewidth=1, label="chance")
    ax_acc.set_ylabel("nearest-mean accuracy (%)")
    ax_acc.set_title("(c) classes become indistinguishable", fontsize=8)
    ax_acc.legend(fontsize=6)
    for ax in (ax_h, ax_fd, ax_acc):
        ax.set_xlabel("diffusion step t")
    title = "Figure 1. Entropy and class similarity of the latents x_t"
    fig.suptitle(f"{title} — {preset.name} ({source})", fontsize=9)
    dims = preset.unet.in_channels * preset.unet.image_size**2
    caption = (
        f"From up to {per_class} training images per class of {source} noised with the preset's schedule "
        f"(T = {preset.diffusion.timesteps}, linear betas {preset.diffusion.beta_start}-{preset.diffusion.beta_end}); "
        "no model. (a) Gaussian differential entropy per dimension: marginal = mean over pixels of "
        "½ log(2πe var) of each noised pixel (Monte Carlo, add_noise); joint = ½ log det(2πe Σ_t) / D with "
        "Σ_t = ā_t Σ_0 + (1 - ā_t) I from the data covariance Σ_0. Both are maximum-entropy upper bounds for "
        "the given (co)variance and reach ½ log 2πe = 1.419 at x_T. (b) Mean over class pairs of the Fréchet "
        "distance between the laws of x_t given each class, N(√ā_t μ_c, ā_t S_c + (1 - ā_t) I), for Gaussian "
        f"fits (μ_c, S_c) of each class in the top {min(components, dims)} principal components of the data "
        f"(D = {dims}). (c) Share of noised images (add_noise) closest to their own class mean, the means fitted "
        "on the other half of the images (chance = 1 / classes).")
    return Figure("figure1_latents", title, caption, fig)


def build_figure1(preset: Preset, data_root: str | None = None, per_class: int = 500, components: int = 64,
                  points: int = 40) -> tuple[Figure, pd.DataFrame]:
    """Figure 1 and its numbers per t; raises ValueError/OSError when the preset's data is not available."""
    data = load_training_images(preset, data_root)
    stats = latent_statistics(data, NoiseSchedule(preset.diffusion), points=points, per_class=per_class,
                              components=components)
    return figure1(stats, preset, data.source, per_class, components), stats


def data_fingerprint(data: ClassDataset) -> str:
    """SHA-256 of the images and labels (a different copy or subset of the data set gets another key)."""
    digest = hashlib.sha256(data.images.contiguous().numpy().tobytes())
    digest.update(data.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_figure1(preset: Preset, data_root: str | None, folder: Path, per_class: int = 500, components: int = 64,
                   points: int = 40) -> tuple[Figure, pd.DataFrame, bool]:
    """Figure 1, its numbers, and whether they came from `folder` (figure1_latents.csv with its key in
    figure1_latents.json) rather than being computed; computed numbers are saved there for the next report."""
    data = load_training_images(preset, data_root)
    key = {"data": data_fingerprint(data), "source": data.source, "diffusion": dataclasses.asdict(preset.diffusion),
           "per_class": per_class, "components": components, "points": points, "seed": 0}
    stats_path, key_path = Path(folder) / STATS_NAME, Path(folder) / KEY_NAME
    try:
        hit = json.loads(key_path.read_text()) == key and stats_path.exists()
    except (OSError, ValueError):
        hit = False
    if hit:
        stats = pd.read_csv(stats_path)
        log.info("Figure 1 for %s: latent statistics read from %s", preset.name, stats_path)
    else:
        stats = latent_statistics(data, NoiseSchedule(preset.diffusion), points=points, per_class=per_class,
                                  components=components)
        stats_path.parent.mkdir(parents=True, exist_ok=True)
        stats.to_csv(stats_path, index=False)
        key_path.write_text(json.dumps(key, indent=2))
    return figure1(stats, preset, data.source, per_class, components), stats, hit
