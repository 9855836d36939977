"""EraseDiff: the unroll (weights back, Adam's state kept, f_hat of the last pass), its schedule, the outer loss as
published (element means, shared timesteps, pseudo classes in {1..9}), adaptive lambda, presets and exact resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.config import get_preset
from bench.device import PLAIN
from bench.perf import Bench, PerfOptions
from bench.runner import EMA, Resume, Trainer, make_optimizer, train
from bench.sweep import resolve_method_config
from bench.unet import NULL_CLASS
from methods.erasediff import EraseDiff, adaptive_lambda

CPU = torch.device("cpu")


def tiny_bench(images_per_class: int = 40) -> Bench:
    """Random tiny-preset data: 40 forget images make batches of 16, 16 and a short 8."""
    return Bench(get_preset("tiny"), PerfOptions.for_preset("tiny", images_per_class=images_per_class), CPU)


def make_method(bench: Bench, forget_class: int = 0, **overrides) -> EraseDiff:
    values = {**EraseDiff.preset_defaults(bench.preset), **overrides}
    return EraseDiff(dataclasses.replace(EraseDiff.Config(), **values), bench.context(forget_class))


def make_trainer(model) -> Trainer:
    model.train()
    return Trainer(model, make_optimizer(list(model.parameters()), 1e-4, PLAIN, CPU), CPU, PLAIN, 1.0, None)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class Recording(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, labels):
        self.calls.append((t.clone(), labels.clone()))
        return self.model(x, t, labels)


def test_unroll_restores_the_weights_and_keeps_adams_state():
    bench = tiny_bench()
    method, model = make_method(bench), bench.model()
    trainer = make_trainer(model)
    before = weights(model)
    method.unroll(trainer, next(method.batches())["unroll"])
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    state = [trainer.optimizer.state[p] for p in model.parameters()]
    assert {int(s["step"]) for s in state} == {2 * 3}  # K = 2 passes of 3 batches (16, 16, 8)
    assert any(bool(s["exp_avg"].abs().sum() > 0) for s in state)
    assert method.inner_steps == 6


def test_f_hat_is_the_batch_weighted_mean_of_the_last_pass(monkeypatch):
    bench = tiny_bench()
    method, model = make_method(bench), bench.model()
    values, sizes = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), []

    def fake_forget_loss(model, x, t=None):
        sizes.append(len(x))
        return next(values) + 0 * sum(p.sum() for p in model.parameters())

    monkeypatch.setattr(method, "forget_loss", fake_forget_loss)
    f_hat = method.unroll(make_trainer(model), next(method.batches())["unroll"])
    assert sizes == [16, 16, 8] * 2
    assert f_hat == pytest.approx((16 * 4.0 + 16 * 5.0 + 8 * 6.0) / 40)


def test_each_round_starts_with_k_fresh_passes_over_the_whole_forget_set():
    bench = tiny_bench()
    method = make_method(bench, forget_class=2, outer_steps=3)
    batches = method.batches()
    stream = [next(batches) for _ in range(7)]
    assert [index for index, batch in enumerate(stream) if "unroll" in batch] == [0, 3, 6]
    forget = bench.data.forget(2).images.flatten(1)
    for batch in (stream[0], stream[3]):
        images, labels = batch["unroll"]
        assert len(images) == 2 * len(forget) and bool((labels == 2).all())
        for one_pass in images.split(len(forget)):
            assert torch.equal(one_pass.flatten(1).sum(1).sort().values, forget.sum(1).sort().values)
    assert not torch.equal(stream[0]["unroll"][0], stream[3]["unroll"][0])
    assert all(bool((b["retain"][1] != 2).all()) and bool((b["forget"][1] == 2).all()) for b in stream)


def test_outer_forget_term_shares_the_retain_timesteps_and_draws_pseudo_classes_from_1_to_9():
    bench = tiny_bench()
    method = make_method(bench, forget_class=3)
    model = Recording(bench.model().train())
    batches = method.batches()
    for _ in range(5):
        method.loss(model, next(batches))
        (t_retain, y_retain), (t_pseudo, y_pseudo), (t_forget, y_forget) = model.calls[-3:]
        assert torch.equal(t_retain, t_pseudo) and torch.equal(t_retain, t_forget)
        assert not bool((y_retain == NULL_CLASS).any())  # no label dropout on the retain term
        assert bool((y_forget[y_forget != NULL_CLASS] == 3).all())
        assert len(set(y_pseudo[y_pseudo != NULL_CLASS].tolist())) == 1  # one pseudo class per batch
    dropped = torch.cat([labels for _, labels in model.calls[1::3] + model.calls[2::3]]) == NULL_CLASS
    assert 0 < float(dropped.float().mean()) < 0.2  # label dropout 0.1 on both forget predictions, drawn apart
    one_image = next(batches)["forget"][0][:1]
    method.config = dataclasses.replace(method.config, forget_label_dropout=0.0)
    for _ in range(60):
        method.forget_loss(model, one_image)
    assert {int(labels) for _, labels in model.calls[-120::2]} == set(range(1, 10))  # the forget class 3 too; 0 never


def zero_model(x, t, labels):
    return torch.zeros_like(x)


@pytest.mark.parametrize("forget_loss, forget_mean", [("relabel", 0.0), ("uniform_noise", 1 / 3)])
def test_losses_are_element_means_and_combine_as_published(forget_loss, forget_mean):
    bench = tiny_bench()
    method = make_method(bench, batch_size=256, forget_loss=forget_loss)
    method.f_hat = 0.5
    terms = method.loss(zero_model, next(method.batches()))
    assert terms["retain"].item() == pytest.approx(1.0, abs=0.05)  # mean of noise^2, not the sum over 64 pixels
    assert terms["forget"].item() == pytest.approx(forget_mean, abs=0.02)  # uniform_noise: E[u^2] = 1/3
    expected = terms["retain"] + 0.1 * (terms["forget"] - 0.5)
    assert terms["loss"].item() == pytest.approx(expected.item()) and terms["f_hat"].item() == 0.5


def test_adaptive_lambda_is_eta_minus_the_gradient_cosine_floored_at_zero():
    w = torch.zeros(2, requires_grad=True)
    retain = w[0]  # gradient (1, 0)

    def lam(forget):
        return float(adaptive_lambda(retain, forget, [w], eta=0.1))

    assert lam(w[0] * 3) == 0.0  # cosine 1
    assert lam(w[1]) == pytest.approx(0.1)  # orthogonal
    assert lam(-w[0]) == pytest.approx(1.1)  # opposite
    assert lam(w.sum() * 0) == 0.0  # no forget gradient


def test_adaptive_lambda_is_used_and_logged_when_lam_is_negative():
    bench = tiny_bench()
    method = make_method(bench, lam=-1.0)
    terms = method.loss(bench.model().train(), next(method.batches()))
    lam = terms["lambda"].item()
    assert 0 <= lam <= 1.1
    expected = terms["retain"] + lam * (terms["forget"] - terms["f_hat"])
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_unroll_runs_inside_the_first_iteration_and_the_ema_sees_only_the_outer_step():
    bench = tiny_bench()
    method, model = make_method(bench, iterations=1), bench.model()
    ema = EMA(model, 0.99, shadow=bench.base)
    train(model, method.batches(), method.update, method.config, CPU, speed=PLAIN, ema=ema, progress=False)
    final = dict(model.named_parameters())
    for name, shadow in ema.state_dict().items():
        torch.testing.assert_close(shadow, 0.99 * bench.base[name] + 0.01 * final[name].detach())
    assert method.inner_steps == 6 and method.f_hat > 0


@pytest.mark.slow
def test_resume_in_the_middle_of_a_round_equals_an_uninterrupted_run(tmp_path):
    def run(path, crash_at=None):
        bench = tiny_bench()
        method, model = make_method(bench, iterations=4, outer_steps=3), bench.model()

        def update(step, trainer, batch):
            if step == crash_at:
                raise KeyboardInterrupt
            return method.update(step, trainer, batch)

        torch.manual_seed(0)
        resume = Resume(path, 2, {"noise": method.ctx.noise_generator}, method)
        result = train(model, method.batches(), update, method.config, CPU, speed=PLAIN, resume=resume, check_every=1,
                       progress=False)
        return weights(model), result.loss_history, method.inner_steps

    reference, history, inner_steps = run(tmp_path / "whole.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut.pt", crash_at=2)  # after the checkpoint at step 2, inside the first round
    resumed, resumed_history, resumed_inner_steps = run(tmp_path / "cut.pt")
    assert all(torch.equal(reference[name], resumed[name]) for name in reference)
    # The checkpoint keeps steps 0-1's history; step 2 logs the f_hat of the unroll before step 0, restored.
    assert resumed_history == history
    assert resumed_inner_steps == inner_steps == 12


@pytest.mark.parametrize("field, value", [("outer_steps", 0), ("inner_passes", 0), ("forget_loss", "noise"),
                                          ("forget_label_dropout", 1.5), ("lam", float("nan"))])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EraseDiff.Config(**{field: value})


def test_cifar10_defaults_are_the_published_values_and_digits_keeps_eight_rounds():
    _, paper, changed = resolve_method_config(get_preset("cifar10"), "erasediff")
    assert (paper.iterations, paper.outer_steps, paper.inner_passes, paper.batch_size, paper.lr, paper.grad_clip,
            paper.lam, paper.eta, paper.forget_loss, paper.label_dropout, paper.forget_label_dropout, paper.ema,
            paper.ema_decay, paper.hflip) == \
        (288, 36, 2, 128, 1e-4, 1.0, 0.1, 0.1, "relabel", 0.0, 0.1, True, 0.99, "every_draw")
    assert changed == {}
    # The scaling (0.1x) gives 8 rounds of 4 steps; the budget study gave EraseDiff the paper's 288 outer steps
    # (docs/budget-study.md), which the preset runs.
    scaled = dataclasses.replace(get_preset("digits"), method_defaults={}, budget_sources={})
    _, digits, changed = resolve_method_config(scaled, "erasediff")
    assert (digits.iterations, digits.outer_steps, digits.inner_passes, digits.batch_size, digits.hflip) == \
        (32, 4, 2, 32, "none")
    assert digits.ema_decay ** digits.iterations == pytest.approx(0.99**288, rel=1e-4)
    assert set(changed) == {"iterations", "outer_steps", "batch_size", "hflip", "ema_decay"}
    _, digits, changed = resolve_method_config(get_preset("digits"), "erasediff")
    assert (digits.iterations, digits.outer_steps, digits.ema_decay) == (288, 36, 0.99)
    assert set(changed) == {"batch_size", "hflip"}
    _, tiny, _ = resolve_method_config(get_preset("tiny"), "erasediff")
    assert (tiny.iterations, tiny.outer_steps) == (1, 1)
