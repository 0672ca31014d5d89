"""RMT: mean teacher, symmetric cross-entropy, source-prototype contrastive loss, warm-up/replay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import to_batch
from testtime.adapt import adapt
from testtime.adapt.components.consistency import (
    class_prototypes,
    multiview_contrastive_loss,
    nearest_prototype,
    projection_head,
)
from testtime.adapt.components.losses import cross_entropy_soft, symmetric_cross_entropy
from testtime.errors import ConfigError

BS = 16


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _supcon_reference(z: torch.Tensor, t: float) -> torch.Tensor:
    """Unvectorised SupCon ("all" mode, no labels): positives are the other views of a sample."""
    n, v, _ = z.shape
    f = F.normalize(z, dim=2)
    terms = []
    for i in range(n):
        for a in range(v):
            others = [(j, b) for j in range(n) for b in range(v) if (j, b) != (i, a)]
            denom = torch.logsumexp(torch.stack([f[i, a] @ f[j, b] / t for j, b in others]), 0)
            pos = [f[i, a] @ f[i, b] / t - denom for b in range(v) if b != a]
            terms.append(-torch.stack(pos).mean())
    return torch.stack(terms).mean()


def test_loss_components_on_constructed_inputs():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, 5, generator=g)
    torch.testing.assert_close(multiview_contrastive_loss(z, 0.1), _supcon_reference(z, 0.1))
    aligned = torch.eye(4)[:, None, :].expand(4, 3, 4) * 3  # views agree, samples orthogonal
    assert float(multiview_contrastive_loss(aligned, 0.1)) < float(multiview_contrastive_loss(z, 0.1)) - 1
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    sce = symmetric_cross_entropy(s, t)
    torch.testing.assert_close(sce, 0.5 * cross_entropy_soft(s, t) + 0.5 * cross_entropy_soft(t, s))
    torch.testing.assert_close(sce, symmetric_cross_entropy(t, s))
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert nearest_prototype(torch.tensor([[5.0, 1.0], [0.1, 2.0], [-1.0, 0.2]]), protos).tolist() == [
        0,
        1,
        1,
    ]
    feats = torch.tensor([[1.0, 1.0], [3.0, 1.0], [0.0, 4.0]])
    got = class_prototypes(feats, torch.tensor([0, 0, 2]), fallback=torch.full((3, 2), -1.0))
    assert got.tolist() == [[2.0, 1.0], [-1.0, -1.0], [0.0, 4.0]]  # class 1 unseen: fallback row
    h1, h2 = (
        projection_head(8, 4, torch.Generator().manual_seed(3)),
        projection_head(8, 4, torch.Generator().manual_seed(3)),
    )
    assert all(torch.equal(a, b) for a, b in zip(h1.parameters(), h2.parameters()))


def test_bad_config_values():
    for bad in ({"temperature": 0.0}, {"projection_dim": 0}, {"lambda_cont": -1.0}, {"ema_momentum": 1.1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            adapt(torch.nn.Linear(2, 2), "rmt", **bad)


def test_one_update_student_teacher_projector(source_model, noisy_stream):
    x = noisy_stream[0][:BS]
    m = 0.9
    a = adapt(source_model, "rmt", ema_momentum=m)
    ref = adapt(source_model, "rmt")
    with torch.no_grad(), ref.no_count():
        expected = ref.model(x) + ref.teacher(x)  # student + teacher, both at the source before the update
    assert torch.equal(a.prototypes, a.model.fc.weight.detach())  # source-free: classifier rows
    s0, t0, p0 = _params(a.model), _params(a.teacher), _params(a.projector)
    out = a(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    student = _params(a.model)
    assert all(not torch.equal(student[n], s0[n]) for n in student)  # every parameter trains
    for n, p in a.teacher.named_parameters():
        torch.testing.assert_close(p.detach(), m * t0[n] + (1 - m) * student[n], rtol=1e-6, atol=1e-7)
    assert all(not torch.equal(p.detach(), p0[n]) for n, p in a.projector.named_parameters())
    assert torch.equal(a.prototypes, ref.prototypes)  # prototypes are fixed
    c = a.counters()
    assert c["forward_images"] == 3 * BS and c["backward_images"] == 2 * BS  # plain + augmented + teacher


def test_each_loss_reaches_what_it_should(source_model, noisy_stream):
    x = noisy_stream[0][:BS]
    # self-training only: the projector gets no gradient
    a = adapt(source_model, "rmt", lambda_cont=0.0)
    p0 = _params(a.projector)
    a(x)
    assert all(torch.equal(p.detach(), p0[n]) for n, p in a.projector.named_parameters())
    # contrastive only: acts on the features, never on the classifier
    b = adapt(source_model, "rmt", lambda_ce_trg=0.0)
    fc0, s0 = _params(b.model.fc), _params(b.model)
    b(x)
    assert all(torch.equal(p.detach(), fc0[n]) for n, p in b.model.fc.named_parameters())
    assert sum(not torch.equal(p.detach(), s0[n]) for n, p in b.model.named_parameters()) > len(s0) // 2


def test_source_data_prototypes_warmup_and_replay(source_model, embedded, noisy_stream):
    xs, ys = to_batch(embedded.x[-96:]), torch.from_numpy(embedded.y[-96:])
    cold = adapt(source_model, "rmt", source_data=(xs, ys), warmup_samples=0, source_batch_size=32)
    src = _params(cold.model)
    assert all(torch.equal(p.detach(), src[n]) for n, p in cold.teacher.named_parameters())  # no warm-up
    with torch.no_grad():
        feats = torch.cat([cold.tap(cold.model, xs[i : i + 32])[0] for i in range(0, 96, 32)])
    torch.testing.assert_close(cold.prototypes, class_prototypes(feats, ys, cold.model.fc.weight.detach()))
    assert not torch.equal(cold.prototypes, cold.model.fc.weight.detach())
    warm = adapt(source_model, "rmt", source_data=(xs, ys), warmup_samples=64, source_batch_size=32)
    assert warm.counters()["backward_images"] == 0  # the warm-up is part of the source state
    moved = _params(warm.model)
    assert any(not torch.equal(moved[n], src[n]) for n in src)  # two warm-up steps
    assert any(not torch.equal(p.detach(), src[n]) for n, p in warm.teacher.named_parameters())
    assert [g["lr"] for g in warm.optimizer.param_groups] == [1e-3, 1e-3]  # ramp ends at the final lr
    warm.reset()
    assert all(torch.equal(p.detach(), moved[n]) for n, p in warm.model.named_parameters())
    x = noisy_stream[0][:BS]
    warm(x)
    c = warm.counters()
    assert c["backward_images"] == 3 * BS  # batch, augmented copy, replayed source batch


def test_adapts_and_beats_source(source_model, noisy_stream):
    x, y = noisy_stream[0][:128], noisy_stream[1][:128]
    a, src = adapt(source_model, "rmt"), adapt(source_model, "source")
    err = 100 * float(
        (torch.cat([a(x[i : i + 32]) for i in range(0, 128, 32)]).argmax(1) != y).float().mean()
    )
    src_err = 100 * float((src(x).argmax(1) != y).float().mean())
    assert err < src_err - 5, (src_err, err)
