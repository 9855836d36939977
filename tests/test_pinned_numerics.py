"""Pinned numerics: each method's first two steps on the frozen pinned model (`bench.config.PINNED_PRESET`, the
`tiny` preset as it was when these were pinned), from seeded random weights and data.

`bench.perf.probe` runs a method's real preparation, batches, loss and the runner's update (clipping, mask,
Adam, EMA) on the CPU in fp32. The values below were written by hand from its output. A change that moves any of
them changes the method: the commit that updates a value must say why (docs/fidelity.md, "Pinned numerics").
Measured spread between 1 and 2 torch threads: 3e-7 relative; the tolerance is 1e-5.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.config import PINNED_PRESET
from bench.perf import Bench, PerfOptions, probe
from methods import get_method
from methods.sfron import SFROn

RELATIVE = 1e-5

# method -> (losses of step 1 and step 2, each {term: value}; `grad_norm` is the norm before clipping)
LOSSES = {
    "safemax": [
        {"loss": 110.579833984375, "forget": 42.74879455566406, "retain": 67.83103942871094,
         "grad_norm": 311.5267028808594},
        {"loss": 109.04473876953125, "forget": 45.99885559082031, "retain": 63.04588317871094,
         "grad_norm": 302.3455810546875},
    ],
    "sa": [
        {"loss": 132.1427001953125, "forget": 65.05895233154297, "retain": 67.08375549316406, "ewc": 0.0,
         "grad_norm": 496.4038391113281},
        {"loss": 16374.9111328125, "forget": 65.94634246826172, "retain": 69.48407745361328,
         "ewc": 1623.947998046875, "grad_norm": 5547071.0},
    ],
    "salun": [
        {"loss": 0.11394208669662476, "forget": 0.046916473656892776, "retain": 67.0256118774414,
         "grad_norm": 0.6678332090377808},
        {"loss": 0.11201046407222748, "forget": 0.047571469098329544, "retain": 64.43899536132812,
         "grad_norm": 0.7108335494995117},
    ],
    "ga": [
        {"loss": -67.53273010253906, "forget": 67.60037231445312, "retain": 67.63905334472656,
         "grad_norm": 278.53436279296875},
        {"loss": -67.31245422363281, "forget": 67.38499450683594, "retain": 72.54327392578125,
         "grad_norm": 293.3371276855469},
    ],
    "neggrad_plus": [
        {"loss": 62.36619567871094, "forget": 67.25486755371094, "retain": 69.09168243408203,
         "grad_norm": 272.5986022949219},
        {"loss": 57.08088302612305, "forget": 65.00362396240234, "retain": 63.58124542236328,
         "grad_norm": 242.58172607421875},
    ],
    "retrain": [
        {"loss": 77.71688079833984, "grad_norm": 289.5930480957031},
        {"loss": 42.778438568115234, "grad_norm": 166.89517211914062},
    ],
    # tiny: one outer step per round, so an unroll (2 passes x 2 batches) precedes both steps; f_hat is its last pass
    "erasediff": [
        {"loss": 1.1262420415878296, "retain": 1.1266556978225708, "forget": 0.039592988789081573,
         "f_hat": 0.04373012110590935, "grad_norm": 4.932432651519775},
        {"loss": 1.0859675407409668, "retain": 1.086012363433838, "forget": 0.04248662292957306,
         "f_hat": 0.04293527081608772, "grad_norm": 4.607812404632568},
    ],
    # each step: the masked forget step (its grad_norm: of the masked gradient), then the retain step. `tiny` never
    # flips its images, so neither does its Fisher (`fisher_hflip="none"`, this harness before issue 24)
    "sfron": [
        {"loss": -582.1180419921875, "alpha": 10.0, "forget": 66.6836929321289, "forget_adaptive": 65.2278060913086,
         "retain": 70.16006469726562, "forget_grad_norm": 2009.5989990234375, "retain_grad_norm": 293.8141784667969},
        {"loss": -279.55426025390625, "alpha": 5.0, "forget": 69.97625732421875, "forget_adaptive": 69.16436767578125,
         "retain": 66.26756286621094, "forget_grad_norm": 1076.3070068359375, "retain_grad_norm": 295.5444030761719},
    ],
}

# Named options, probed with the preset's defaults plus these fields.
OPTIONS = {
    # SFR-on's published Fisher (issue 24): each image flipped once; the default on cifar10 and fashion
    "sfron-flipped-fisher": ("sfron", {"fisher_hflip": "once"}),
    # GA run as the published README's command (`--mask_path`): SalUn's mask, applied after clipping (issue 24)
    "ga-saliency-mask": ("ga", {"mask": "saliency"}),
}
OPTION_LOSSES = {
    "sfron-flipped-fisher": [
        {"loss": -582.1356201171875, "alpha": 10.0, "forget": 66.6836929321289, "forget_adaptive": 65.2278060913086,
         "retain": 70.14246368408203, "forget_grad_norm": 2045.686279296875, "retain_grad_norm": 293.7419738769531},
        {"loss": -279.49420166015625, "alpha": 5.0, "forget": 69.96479034423828, "forget_adaptive": 69.14926147460938,
         "retain": 66.25211334228516, "forget_grad_norm": 1106.4432373046875, "retain_grad_norm": 295.4125671386719},
    ],
    # the mask's preparation draws from the same generators first, so step 1 differs from plain GA's
    "ga-saliency-mask": [
        {"loss": -69.48175048828125, "forget": 69.54769897460938, "retain": 65.94749450683594,
         "grad_norm": 286.03509521484375},
        {"loss": -67.92323303222656, "forget": 67.9948959350586, "retain": 71.66375732421875,
         "grad_norm": 294.2134094238281},
    ],
}

# What the preparation computed: the sum over every tensor, the count of non-zero entries, and one tensor's sum.
PREPARED = {
    "sa": {"total": 162418311731.61734, "nonzero": 775681, "fisher.null_classes_emb": 4666.237064361572},
    "salun": {"total": 387840.0, "nonzero": 387840, "mask.null_classes_emb": 10.0},
    # the forget class's row; its whole count is pinned below without the round-off coordinates
    "sfron": {"mask.classes_emb.weight": 32.0},
}

# SFR-on's Fisher on `tiny` for each `fisher_hflip`: sum over coordinates of sqrt(F_f) and of sqrt(F_r) (the sum of F
# itself is ~1 whatever the images, each batch's gradient being clipped to norm 1), and the mask's count over the
# coordinates whose Fisher is not round-off. 25,088 of the tiny UNet's 775,681 weights (biases followed by a
# GroupNorm, attention key biases, ...) have a gradient that is zero in exact arithmetic: their Fisher is < 1e-14 in
# both sets, its ratio is 1 give or take rounding, and which of them reach >= 1 differs between machines (216 of
# them between the machine that first pinned the whole count, 259,457, and another). Every other weight has
# max(F_f, F_r) > 1e-12.
SFRON_FISHER = {
    "none": {"forget": 424.23536685368464, "retain": 486.2305414827971, "decided": 750593, "selected": 251967},
    "once": {"forget": 423.56995967969914, "retain": 487.9219662539139, "decided": 750593, "selected": 250267},
}


@pytest.fixture(scope="module")
def probes():
    return {}


def probed(probes: dict, method: str) -> dict:
    if method not in probes:
        name, overrides = OPTIONS.get(method, (method, {}))
        with pytest.MonkeyPatch.context() as patch:  # the probe resolves the preset's defaults, then these
            cls = get_method(name)
            defaults = cls.preset_defaults
            patch.setattr(cls, "preset_defaults", classmethod(lambda _, preset: {**defaults(preset), **overrides}))
            probes[method] = probe(name, steps=2, seed=0)
    return probes[method]


@pytest.mark.parametrize("method", sorted(LOSSES) + sorted(OPTION_LOSSES))
def test_first_two_steps_are_pinned(method, probes):
    losses, expected = probed(probes, method)["losses"], {**LOSSES, **OPTION_LOSSES}[method]
    assert [sorted(step) for step in losses] == [sorted(step) for step in expected]
    for measured, pinned in zip(losses, expected):
        for term, value in pinned.items():
            assert measured[term] == pytest.approx(value, rel=RELATIVE, abs=1e-9), (method, term)


@pytest.mark.parametrize("method", sorted(PREPARED))
def test_preparation_is_pinned(method, probes):
    prepared = probed(probes, method)["prepared"]
    summary = {"total": sum(v["sum"] for v in prepared.values()),
               "nonzero": sum(v["nonzero"] for v in prepared.values())}
    pinned = PREPARED[method]
    if "nonzero" in pinned:
        assert summary["nonzero"] == pinned["nonzero"]
        assert summary["total"] == pytest.approx(pinned["total"], rel=RELATIVE)
    name = next(key for key in pinned if "." in key)
    assert prepared[name]["sum"] == pytest.approx(pinned[name], rel=RELATIVE)


@pytest.mark.parametrize("fisher_hflip", sorted(SFRON_FISHER))
def test_sfron_fisher_and_mask_are_pinned(fisher_hflip):
    bench = Bench(PINNED_PRESET, PerfOptions.for_preset("pinned", seed=0, device="cpu"), torch.device("cpu"))
    values = {**SFROn.preset_defaults(bench.preset), "fisher_hflip": fisher_hflip}
    method = SFROn(dataclasses.replace(SFROn.Config(), **values), bench.context())
    forget, retain = (torch.cat([f.flatten() for f in fisher.values()]).double() for fisher in method.fishers())
    decided = torch.maximum(forget, retain) > 1e-12
    selected = ((forget + 1e-15) / (retain + 1e-15) >= 1.0)[decided]
    pinned = SFRON_FISHER[fisher_hflip]
    # Counts past a threshold are pinned to RELATIVE, as every other number here: another CPU's kernels add the
    # Fisher's float32 sums in another order, and an entry whose ratio lies near 1 then falls on the other side (one
    # of 750,593 flipped on a Xeon with AVX-512 and AMX; the sums below agreed to 1e-7).
    assert int(decided.sum()) == pytest.approx(pinned["decided"], rel=RELATIVE)
    assert int(selected.sum()) == pytest.approx(pinned["selected"], rel=RELATIVE)
    assert float(forget.sqrt().sum()) == pytest.approx(pinned["forget"], rel=RELATIVE)
    assert float(retain.sqrt().sum()) == pytest.approx(pinned["retain"], rel=RELATIVE)
