"""The collapse guard: silent while healthy, restores on a confirmed collapse, counted and persisted."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from conftest import state_hash
from testtime.adapt import adapt
from testtime.adapt.base import AdaptedModel
from testtime.adapt.components.guard import CollapseGuard, diversity
from testtime.adapt.config import MethodConfig
from testtime.errors import ConfigError


@dataclass
class DriftConfig(MethodConfig):
    push: float = 3.0  # added to the class-0 bias of the classifier after every batch


class DriftToClassZero(AdaptedModel):
    """A deliberately collapsing 'method' (test only, not registered): predicts, then moves the
    classifier bias towards class 0, so within a few batches every input is called class 0."""

    name = "drift_to_class_zero"
    Config = DriftConfig
    config: DriftConfig

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        self.model.fc.bias[0] += self.config.push
        return logits


def drifting(model, **cfg) -> DriftToClassZero:
    return DriftToClassZero(copy.deepcopy(model), DriftConfig(**cfg))


def feed(a, x, batch=50):
    return torch.cat([a(x[i : i + batch]) for i in range(0, len(x), batch)])


def test_guard_is_silent_and_changes_nothing_on_a_healthy_run(source_model, noisy_stream):
    x, _ = noisy_stream
    on, off = adapt(source_model, "tent"), adapt(source_model, "tent", guard=False)
    assert on.config.guard and on.guard is not None and off.guard is None
    assert torch.equal(feed(on, x), feed(off, x))
    assert on.counters()["restores"] == 0 and on.guard_events == []
    assert on.counters()["forward_images"] == off.counters()["forward_images"] == len(x)  # no reference pass
    own = {k: v for k, v in on.state_dict().items() if not k.startswith("guard.")}
    for k, v in off.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, own[k]), k


def test_a_collapse_is_detected_restored_logged_and_counted(source_model, noisy_stream, caplog):
    x, y = noisy_stream
    bare = drifting(source_model, guard=False, guard_window=100)
    guarded = drifting(source_model, guard_window=100)
    out_bare, out_guarded = feed(bare, x), feed(guarded, x)
    assert (out_bare[-100:].argmax(1) == 0).float().mean() > 0.95  # the unguarded model collapsed
    n = guarded.counters()["restores"]
    assert n >= 1 and len(guarded.guard_events) == n
    assert all(e["restored"] == "source" for e in guarded.guard_events)
    assert all("class 0" in e["reason"] or "diversity" in e["reason"] for e in guarded.guard_events)
    assert "collapse guard" in caplog.text
    err = lambda out: float((out.argmax(1) != y).float().mean())  # noqa: E731
    assert err(out_guarded) < err(out_bare) - 0.1
    # the batch that triggered a restore is answered by the source model
    b = guarded.guard_events[0]["batch"] - 1
    src = adapt(source_model, "source")
    assert torch.equal(out_guarded[b * 50 : (b + 1) * 50], src(x[b * 50 : (b + 1) * 50]))


def test_restore_brings_back_the_source_state_exactly(source_model, noisy_stream):
    x, _ = noisy_stream
    a = drifting(source_model, guard_window=50)
    fresh = state_hash(a)
    for i in range(0, 400, 50):
        a(x[i : i + 50])
        if a.counters()["restores"]:
            break
    assert a.counters()["restores"] == 1
    assert state_hash(a) == fresh  # weights, optimiser, guard window: as wrapped (counters kept)


def test_the_entropy_alarm_catches_an_overconfident_collapse(source_model, noisy_stream):
    x, _ = noisy_stream
    # a histogram window longer than the run: only the entropy average can raise the alarm
    a = drifting(source_model, push=50.0, guard_window=100_000, guard_entropy_momentum=0.0)
    feed(a, x[:200])
    assert a.counters()["restores"] >= 1
    assert "entropy" in a.guard_events[0]["reason"]


def test_label_correlated_batches_alarm_but_are_not_restored(source_model, embedded):
    # (Tent cannot raise this alarm: test-batch statistics of a one-class batch hide the class)
    # clean images sorted by class: windows dominated by one class, as in the correlated scenario
    from conftest import to_batch

    order = torch.from_numpy(embedded.y).argsort(stable=True)[:600]
    x = to_batch(embedded.x[order.numpy()])
    a = adapt(source_model, "t3a", guard_window=100)  # source BN statistics: sees the classes
    feed(a, x, batch=100)
    c = a.counters()
    assert c["restores"] == 0
    assert c["forward_images"] > len(x)  # the alarm fired and the source model was consulted


def test_periodic_reset(source_model, noisy_stream):
    x, _ = noisy_stream
    a = adapt(source_model, "tent", guard_reset_every=3)
    fresh = state_hash(a)
    feed(a, x[:300])  # 6 batches: restores after batches 3 and 6
    assert a.counters()["restores"] == 2
    assert [e["batch"] for e in a.guard_events] == [3, 6]
    assert state_hash(a) == fresh


def test_restore_to_last_good_snapshot(source_model, noisy_stream):
    x, _ = noisy_stream
    a = drifting(source_model, push=1.0, guard_window=100, guard_restore="last_good", guard_snapshot_every=1)
    feed(a, x, batch=25)
    assert a.counters()["restores"] >= 1
    assert a.guard_events[0]["restored"] == "last_good"
    # restored weights are an earlier drifted state, not the source
    assert float(a.model.fc.bias[0].detach() - source_model.fc.bias[0].detach()) > 0


def test_guard_state_round_trips(source_model, noisy_stream, tmp_path):
    x, _ = noisy_stream
    a = drifting(source_model, guard_window=100)
    feed(a, x[:150])
    a.save_state(tmp_path / "s.pt")
    b = drifting(source_model, guard_window=100)
    b.load_state(tmp_path / "s.pt")
    assert state_hash(a) == state_hash(b) and b.counters()["restores"] == a.counters()["restores"]
    assert torch.equal(feed(a, x[150:]), feed(b, x[150:]))


def test_guard_is_off_for_methods_without_adapted_state(source_model):
    for name in ("source", "bn", "lame", "memo", "alpha_bn"):
        assert adapt(source_model, name).guard is None
    assert adapt(source_model, "alpha_bn", core=True, guard=True).guard is not None


@pytest.mark.parametrize(
    "option",
    [
        {"guard_window": 0},
        {"guard_max_class_fraction": 0.0},
        {"guard_max_class_fraction": 1.5},
        {"guard_min_entropy": -0.1},
        {"guard_min_diversity": 1.0},
        {"guard_entropy_momentum": 1.0},
        {"guard_restore": "yesterday"},
        {"guard_snapshot_every": 0},
        {"guard_reset_every": -1},
        {"guard": "maybe"},
    ],
)
def test_bad_guard_options_fail_clearly(source_model, option):
    with pytest.raises(ConfigError, match=next(iter(option))):
        adapt(source_model, "tent", **option)


def test_confirmation_rule():
    onehot = lambda labels: torch.nn.functional.one_hot(torch.tensor(labels), 10).float()  # noqa: E731
    collapsed, diverse = onehot([0] * 10), onehot(list(range(10)))
    assert CollapseGuard.confirms(collapsed, diverse)
    assert not CollapseGuard.confirms(collapsed, collapsed)  # the source also sees class 0
    assert not CollapseGuard.confirms(diverse, collapsed)  # no dominant class
    two = onehot([3, 7] * 5)  # collapsed onto two classes
    assert CollapseGuard.confirms(two, diverse) and not CollapseGuard.confirms(
        two, onehot([3, 7, 3, 7, 1] * 2)
    )
    # a one-class batch the adapted model gets right, the source model only partly: label skew,
    # not collapse (the source's errors are more diverse, but its most-predicted class is the same)
    right = onehot([5] * 10)
    assert not CollapseGuard.confirms(right, onehot([5, 5, 5, 1, 2, 3, 4, 6, 7, 8]))
    assert CollapseGuard.confirms(right, onehot([5, 1, 1, 1, 2, 3, 4, 6, 7, 8]))  # the source's mode is 1
    assert CollapseGuard.confirms(right, onehot([5, 5, 0, 1, 2, 3, 4, 6, 7, 8]))  # 20% is no majority
    assert diversity(torch.zeros(8, dtype=torch.long), 10) == 0.0
    assert diversity(torch.arange(10), 10) == pytest.approx(1.0)
