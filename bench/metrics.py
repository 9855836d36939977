"""Unlearning and retention metrics from classifier outputs: UA, entropy, FID, classifier-on-noise.

Pure functions of tensors; sampling and file writing live elsewhere.
"""

from __future__ import annotations

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

# Direction of every metric a record holds, so that tables can mark the best value without guessing.
HIGHER_IS_BETTER = {
    "ua": True, "entropy": True, "forget_prob": False, "fid": False, "retain_accuracy": True,
    "rte_s": False, "prepare_s": False, "peak_gpu_allocated_gib": False, "peak_gpu_reserved_gib": False,
    "peak_process_mib": False,
}


def entropy(probs: Tensor) -> Tensor:
    """Natural-log entropy of each row of probabilities."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)


def class_histogram(probs: Tensor, num_classes: int) -> list[int]:
    return torch.bincount(probs.argmax(dim=1), minlength=num_classes).tolist()


def forget_metrics(probs: Tensor, forget_class: int) -> dict:
    """UA = 100 - % of forget-class samples classified as the forget class; H = mean entropy."""
    predicted = probs.argmax(dim=1)
    return {
        "ua": 100.0 * float((predicted != forget_class).float().mean()),
        "entropy": float(entropy(probs).mean()),
        "forget_prob": float(probs[:, forget_class].mean()),
        "forget_histogram": class_histogram(probs, probs.shape[1]),
        "forget_samples": len(probs),
    }


def retain_accuracy(probs: Tensor, labels: Tensor) -> float:
    """% of retained-class samples the classifier assigns to the class they were generated for."""
    return 100.0 * float((probs.argmax(dim=1) == labels).float().mean())


def feature_statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of (N, D) features, in float64 as pytorch-fid expects (one BLAS thread: see `fid`)."""
    array = features.double().numpy()
    with threadpool_limits(limits=1, user_api="blas"):
        return array.mean(axis=0), np.cov(array, rowvar=False)


def fid(generated: Tensor, real: Tensor | tuple[np.ndarray, np.ndarray]) -> float:
    """Frechet distance between generated features and real features (or their cached statistics).

    On one BLAS thread: from 256-d features on, OpenBLAS splits the covariance and square-root work by thread
    count and the last digits change with it, so a run in a worker or SLURM job would not repeat the same run
    in the parent process. One thread keeps records bit-identical across executors (2048-d: 12 s vs 10 s).
    """
    from pytorch_fid.fid_score import calculate_frechet_distance  # here: it imports torchvision (1.5 s per process)

    with threadpool_limits(limits=1, user_api="blas"):
        mu_real, sigma_real = real if isinstance(real, tuple) else feature_statistics(real)
        mu_gen, sigma_gen = feature_statistics(generated)
        return float(calculate_frechet_distance(mu_gen, sigma_gen, mu_real, sigma_real))


def noise_prediction(probs: Tensor) -> dict:
    """What the classifier makes of pure noise: its histogram, favourite class and that class's share."""
    histogram = class_histogram(probs, probs.shape[1])
    top = int(np.argmax(histogram))
    return {"histogram": histogram, "top_class": top, "top_fraction": histogram[top] / max(1, len(probs)),
            "entropy": float(entropy(probs).mean())}
