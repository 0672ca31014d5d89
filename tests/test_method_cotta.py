"""CoTTA: mean teacher (EMA), augmentation-averaged pseudo-labels, stochastic restoration."""

from __future__ import annotations

import pytest
import torch

from conftest import BOOKKEEPING, changed_keys, snapshot
from testtime.adapt import adapt
from testtime.adapt.components.teacher import ema_update, frozen_copy, param_state, stochastic_restore
from testtime.errors import ConfigError

COUNTERS = BOOKKEEPING
N, BS = 128, 32
B1 = 16  # single-batch checks


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _capture_after_step(a) -> list[dict[str, torch.Tensor]]:
    """Student parameters right after each optimiser step (before EMA and restoration)."""
    seen: list[dict[str, torch.Tensor]] = []
    a.optimizer.register_step_post_hook(lambda *_: seen.append(_params(a.model)))
    return seen


def test_teacher_components_on_constructed_inputs():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0, s0 = _params(teacher), _params(student)
    ema_update(teacher, student, 0.75)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach(), 0.75 * t0[n] + 0.25 * s0[n], rtol=1e-6, atol=1e-7)
    assert _params(student).keys() == s0.keys() and all(
        torch.equal(v, s0[n]) for n, v in _params(student).items()
    )
    ema_update(teacher, student, 0.0)  # momentum 0: the teacher becomes the student
    assert all(torch.equal(p.detach(), s0[n]) for n, p in teacher.named_parameters())

    # stochastic restore: element-wise, only trainable parameters, fraction ~ prob
    big = torch.nn.Linear(200, 100)
    big.bias.requires_grad_(False)
    source = param_state(big)
    with torch.no_grad():
        for p in big.parameters():
            p.add_(1.0)
    moved = _params(big)
    g = torch.Generator().manual_seed(0)
    assert stochastic_restore(big, source, 0.0, g) == 0 and torch.equal(big.weight.detach(), moved["weight"])
    n = stochastic_restore(big, source, 0.3, g)
    w = big.weight.detach()
    back = w == source["weight"]
    assert n == int(back.sum()) and abs(n / w.numel() - 0.3) < 0.02
    assert torch.equal(w[~back], moved["weight"][~back])  # the others are untouched
    assert torch.equal(big.bias.detach(), moved["bias"])  # frozen: never restored
    assert stochastic_restore(big, source, 1.0, g) == w.numel()  # counts every trainable element
    assert torch.equal(big.weight.detach(), source["weight"])
    f = frozen_copy(big)
    assert not any(p.requires_grad for p in f.parameters()) and not f.training


def test_bad_config_values():
    for bad in ({"ema_momentum": 1.5}, {"restore_prob": -0.1}, {"anchor_threshold": 2.0}, {"n_augment": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            adapt(torch.nn.Linear(2, 2), "cotta", **bad)


@pytest.fixture(scope="module")
def stream(noisy_stream):
    x, y = noisy_stream
    return x[:N], y[:N]


def test_student_by_gradient_teacher_by_exact_ema(source_model, stream):
    x, _ = stream
    m = 0.9
    a = adapt(source_model, "cotta", restore_prob=0.0, anchor_threshold=0.0, ema_momentum=m)
    source = _params(a.anchor)
    after_step = _capture_after_step(a)
    teacher_before = frozen_copy(a.teacher)
    t0 = _params(a.teacher)
    s0 = snapshot(a)
    out = a(x[:B1])
    # the prediction is the (pre-update) teacher's on the plain batch: anchor confident enough (>= 0)
    torch.testing.assert_close(out, teacher_before(x[:B1]), rtol=0, atol=1e-5)
    assert a.counters()["forward_images"] == 3 * B1  # student, anchor, teacher; no augmentation
    student = _params(a.model)
    assert len(after_step) == 1
    assert all(torch.equal(student[n], after_step[0][n]) for n in student)  # no restoration at p = 0
    moved = [n for n in student if not torch.equal(student[n], source[n])]
    assert len(moved) == len(student)  # every parameter (conv, BN, fc) trains
    for n, p in a.teacher.named_parameters():
        torch.testing.assert_close(p.detach(), m * t0[n] + (1 - m) * student[n], rtol=1e-6, atol=1e-7)
    assert all(torch.equal(p.detach(), source[n]) for n, p in a.anchor.named_parameters())  # anchor frozen
    changed = changed_keys(s0, snapshot(a)) - COUNTERS
    assert all(k.startswith(("model.", "teacher.")) for k in changed)
    assert not any(k.endswith(("running_mean", "running_var")) for k in changed)  # batch statistics only


def test_stochastic_restore_towards_source(source_model, stream):
    x, _ = stream
    a = adapt(source_model, "cotta", anchor_threshold=0.0)  # default restore_prob 0.01
    source = _params(a.anchor)
    after_step = _capture_after_step(a)
    a(x[:B1])
    total = restored = 0
    for n, p in a.model.named_parameters():
        now, stepped = p.detach(), after_step[0][n]
        differs = stepped != source[n]
        back = (now == source[n]) & differs
        assert torch.equal(now[~back], stepped[~back])  # an element is either kept or put back exactly
        total += int(differs.sum())
        restored += int(back.sum())
    assert total > 300_000
    assert 0.008 < restored / total < 0.012, restored / total
    # restoring with probability 1 returns the whole student to the source; the teacher keeps its EMA step
    b = adapt(source_model, "cotta", anchor_threshold=0.0, restore_prob=1.0)
    b(x[:B1])
    assert all(torch.equal(p.detach(), source[n]) for n, p in b.model.named_parameters())
    assert any(not torch.equal(p.detach(), source[n]) for n, p in b.teacher.named_parameters())


def test_augmentation_averaged_teacher_when_anchor_unsure(source_model, stream):
    x, _ = stream
    a = adapt(source_model, "cotta", anchor_threshold=1.0, n_augment=2)  # always unsure
    plain = frozen_copy(a.teacher)(x[:B1])
    out = a(x[:B1])
    assert a.counters()["forward_images"] == (2 + 2) * B1
    assert not torch.allclose(out, plain, atol=1e-3)
    # default configuration (32 augmentations, threshold 0.92) on a small batch
    d = adapt(source_model, "cotta")
    xb = x[:8]
    with d.no_count(), torch.no_grad():
        unsure = float(d.anchor(xb).softmax(1).amax(1).mean()) < 0.92
    assert unsure  # severity-5 impulse noise: the source anchor is not confident
    out = d(xb)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    assert d.counters()["forward_images"] == (2 + 32) * 8


def test_adapts_beats_source_and_reset_restores_teacher(source_model, stream):
    x, y = stream
    a = adapt(source_model, "cotta", n_augment=4)
    src = adapt(source_model, "source")
    out = torch.cat([a(x[i : i + BS]) for i in range(0, N, BS)])
    err = 100 * float((out.argmax(1) != y).float().mean())
    src_err = 100 * float(
        (torch.cat([src(x[i : i + BS]) for i in range(0, N, BS)]).argmax(1) != y).float().mean()
    )
    assert err < src_err - 5, (src_err, err)
    source = _params(a.anchor)
    assert any(not torch.equal(p.detach(), source[n]) for n, p in a.teacher.named_parameters())
    a.reset()
    for net in (a.model, a.teacher):
        assert all(torch.equal(p.detach(), source[n]) for n, p in net.named_parameters())
    assert all(not st for st in a.optimizer.state.values())


def test_episodic_resets_before_every_batch(source_model, stream):
    x, _ = stream
    a = adapt(source_model, "cotta", episodic=True, anchor_threshold=0.0)
    first = a(x[:B1])
    a(x[B1 : 2 * B1])
    again = a(x[:B1])
    torch.testing.assert_close(again, first, rtol=0, atol=0)
