"""RoTTA: robust BN (EMA statistics), category-balanced memory (CSTU), timeliness-weighted teacher."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import BOOKKEEPING, changed_keys, snapshot
from testtime.adapt import adapt
from testtime.adapt.components.memory import CategoryBalancedMemory, timeliness_weights
from testtime.adapt.methods.rotta import RobustNorm, frozen_stats
from testtime.errors import ConfigError

COUNTERS = BOOKKEEPING
BS = 64


def _item(v: float) -> torch.Tensor:
    return torch.full((1, 2, 2), float(v))


def _stored(mem: CategoryBalancedMemory) -> list[float]:
    return [float(d[0, 0, 0]) for d in mem.contents()[0]]


def test_memory_evicts_within_a_full_class_by_age_and_uncertainty():
    mem = CategoryBalancedMemory(capacity=4, num_classes=2)  # 2 per class
    assert mem.add(_item(0), 0, 0.1) and mem.add(_item(1), 0, 0.2)
    # class 0 is full: the most uncertain/oldest-scoring item (1: u 0.2, age 1) beats the new one
    assert mem.add(_item(2), 0, 0.05)
    assert _stored(mem) == [0.0, 2.0]
    assert not mem.add(_item(3), 0, 3.0)  # a very uncertain newcomer scores higher than any: dropped
    assert mem.add(_item(4), 1, 0.1) and mem.add(_item(5), 1, 0.1)
    assert mem.class_counts().tolist() == [2, 2] and mem.occupancy() == 4
    _, ages = mem.contents()  # class, then insertion order; every offer ages every stored item
    assert _stored(mem) == [0.0, 2.0, 4.0, 5.0]
    assert ages.tolist() == [6 / 4, 4 / 4, 2 / 4, 1 / 4]
    s = mem.score(torch.tensor([2.0]), torch.tensor([0.2]))
    assert float(s) == pytest.approx(1 / (1 + math.exp(-2 / 4)) + 0.2 / math.log(2))


def test_memory_evicts_from_the_majority_classes_when_full():
    mem = CategoryBalancedMemory(capacity=4, num_classes=3)  # 4/3 per class: at most 2 each
    for v, c, u in ((0, 0, 0.1), (1, 0, 0.1), (2, 1, 0.1), (3, 1, 2.0)):
        assert mem.add(_item(v), c, u)
    assert mem.class_counts().tolist() == [2, 2, 0]
    assert mem.add(_item(5), 2, 0.1)  # minority class, memory full: evict from majority classes
    assert mem.occupancy() == 4 and 3.0 not in _stored(mem)  # the uncertain class-1 item went
    assert mem.class_counts().tolist() == [2, 1, 1]
    empty = CategoryBalancedMemory(capacity=4, num_classes=3).state_dict()
    mem.load_state_dict(empty)  # restores the unallocated memory exactly (reset)
    assert mem.occupancy() == 0 and mem.items.data.numel() == 0


def test_timeliness_weights():
    w = timeliness_weights(torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(w, torch.tensor([0.5, 1 / (1 + math.e), 1 / (1 + math.e**2)]))


def test_robust_bn_ema_statistics_and_frozen_prediction():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.running_var.copy_(torch.tensor([4.0, 5.0, 6.0]))
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    r = RobustNorm(bn, momentum=0.05)
    x = torch.randn(5, 3, 4, 4) * 2 + 1
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    m_exp = 0.95 * torch.tensor([1.0, 2.0, 3.0]) + 0.05 * mean
    v_exp = 0.95 * torch.tensor([4.0, 5.0, 6.0]) + 0.05 * var
    out = r(x)
    torch.testing.assert_close(r.running_mean, m_exp)
    torch.testing.assert_close(r.running_var, v_exp)
    torch.testing.assert_close(out, F.batch_norm(x, m_exp, v_exp, bn.weight, bn.bias, False, 0.0, bn.eps))
    with frozen_stats(r):
        frozen = r(x[:1])  # a single sample works; stored statistics, unchanged
    torch.testing.assert_close(r.running_mean, m_exp)
    torch.testing.assert_close(
        frozen, F.batch_norm(x[:1], m_exp, v_exp, bn.weight, bn.bias, False, 0.0, bn.eps)
    )
    assert not r.frozen


def test_bad_config_values():
    for bad in ({"memory_size": 0}, {"nu": 2.0}, {"alpha": -0.1}, {"update_frequency": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            adapt(torch.nn.Linear(2, 2), "rotta", **bad)


def test_one_memory_update_changes_only_bn(source_model, noisy_stream):
    x = noisy_stream[0][:BS]
    nu = 0.1
    a = adapt(source_model, "rotta", nu=nu)
    src = adapt(source_model, "source")
    s0 = snapshot(a)
    out = a(x)
    # predicted before the update by the source teacher with its (source) statistics
    torch.testing.assert_close(out, src(x), rtol=0, atol=1e-4)
    s1 = snapshot(a)
    changed = changed_keys(s0, s1) - COUNTERS
    bn_names = {n for n, m in a.model.named_modules() if isinstance(m, RobustNorm)}
    affine = {f"model.{n}.{p}" for n in bn_names for p in ("weight", "bias")}
    stats = {
        f"{net}.{n}.{s}"
        for net in ("model", "teacher")
        for n in bn_names
        for s in ("running_mean", "running_var")
    }
    assert affine <= changed and stats <= changed  # student trained; both networks' robust BN moved
    teacher_affine = {f"teacher.{k[6:]}" for k in affine}
    assert teacher_affine <= changed
    memory = {k for k in changed if k.startswith("memory.")}
    assert changed == affine | stats | teacher_affine | memory | {"n_seen"}  # conv/fc weights frozen
    for k in affine:  # teacher <- (1 - nu) teacher + nu student, from the source
        t = "teacher." + k[len("model.") :]
        torch.testing.assert_close(s1[t], (1 - nu) * s0[t] + nu * s1[k], rtol=1e-6, atol=1e-7)
    occ = a.memory.occupancy()
    assert 10 < occ <= 64 and int(a.memory.class_counts().max()) <= math.ceil(64 / 10)
    c = a.counters()
    assert c["forward_images"] == BS + 2 * occ and c["backward_images"] == occ
    assert not torch.allclose(a(x), out, atol=1e-3)  # the next prediction uses the updated teacher


def test_updates_every_update_frequency_samples_even_one_at_a_time(source_model, noisy_stream):
    x = noisy_stream[0]
    a = adapt(source_model, "rotta", update_frequency=3)
    for i in range(7):
        assert a(x[i : i + 1]).shape == (1, 10)
    assert int(a.n_seen) == 7
    assert {int(st["step"]) for st in a.optimizer.state.values()} == {2}  # after samples 3 and 6
    b = adapt(source_model, "rotta", update_frequency=16)
    b(x[:BS])
    assert {int(st["step"]) for st in b.optimizer.state.values()} == {4}  # updates inside a batch
    b.reset()
    assert b.memory.occupancy() == 0 and int(b.n_seen) == 0 and not b.optimizer.state


def test_adapts_over_a_short_stream(source_model, noisy_stream):
    x, y = noisy_stream[0][:256], noisy_stream[1][:256]
    a, src = adapt(source_model, "rotta"), adapt(source_model, "source")
    err = 100 * float(
        (torch.cat([a(x[i : i + BS]) for i in range(0, 256, BS)]).argmax(1) != y).float().mean()
    )
    src_err = 100 * float((src(x).argmax(1) != y).float().mean())
    assert err < src_err - 3, (src_err, err)
