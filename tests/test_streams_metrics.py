"""Stream scenarios and metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from testtime.data.cifar import ImageSet
from testtime.data.streams import DomainData, StreamSpec, build_stream, list_scenarios
from testtime.errors import ConfigError
from testtime.metrics import MetricAccumulator, expected_calibration_error


class TaggedData(DomainData):
    """Domain data whose pixel value encodes (domain, sample) so order can be checked."""

    def __init__(self, n: int = 50) -> None:
        self.n = n

    def get(self, domain):
        from testtime.data.cifar import CIFAR10C_CORRUPTIONS

        k = CIFAR10C_CORRUPTIONS.index(domain.corruption)
        x = np.zeros((self.n, 2, 2, 3), np.uint8)
        x[..., 0] = k
        x[..., 1] = np.arange(self.n)[:, None, None]
        return x, np.arange(self.n) % 10

    def describe(self):
        return "tagged"

    def num_samples(self):
        return self.n


def spec(**kw):
    base = {"data": TaggedData(), "corruptions": ("gaussian_noise", "fog", "contrast"), "batch_size": 16}
    return StreamSpec(**{**base, **kw})


def decode(batch):
    x = (batch.x * 255).round().long()
    return x[:, 0, 0, 0].tolist(), x[:, 1, 0, 0].tolist()


def test_continual_order_and_batches():
    s = build_stream("continual", spec())
    batches = list(s)
    assert len(batches) == len(s) == 3 * 4  # 50 per domain, batches of 16: 16,16,16,2
    doms = [decode(b)[0] for b in batches]
    assert [d[0] for d in doms] == [0] * 4 + [9] * 4 + [11] * 4  # standard order indices
    assert all(len(set(d)) == 1 for d in doms)  # a batch never straddles domains
    samples = [i for b in batches[:4] for i in decode(b)[1]]
    assert sorted(samples) == list(range(50)) and samples != list(range(50))  # all, shuffled
    assert not s.reset_each_segment and [b.new_segment for b in batches[:5]] == [
        True,
        False,
        False,
        False,
        True,
    ]


def test_reset_each_shift_and_seed_determinism():
    a = [decode(b)[1] for b in build_stream("reset_each_shift", spec(seed=3))]
    b = [decode(b)[1] for b in build_stream("reset_each_shift", spec(seed=3))]
    c = [decode(b)[1] for b in build_stream("reset_each_shift", spec(seed=4))]
    assert a == b and a != c
    assert build_stream("reset_each_shift", spec()).reset_each_segment


def test_n_per_domain_and_labels_follow_images():
    s = build_stream("continual", spec(n_per_domain=20, batch_size=7))
    assert s.num_samples == 60
    for b in s:
        _, idx = decode(b)
        assert b.y.tolist() == [i % 10 for i in idx]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"severity": 0}, "severity"),
        ({"batch_size": 0}, "batch size"),
        ({"corruptions": ()}, "no corruptions"),
        ({"corruptions": ("rain",)}, "unknown corruption"),
        ({"n_per_domain": 51}, "n_per_domain"),
    ],
)
def test_bad_stream_specs(kw, match):
    with pytest.raises(ConfigError, match=match):
        build_stream("continual", spec(**kw))
    with pytest.raises(ConfigError, match="unknown scenario"):
        build_stream("nope", spec())


def test_scenarios_listed():
    assert {"continual", "reset_each_shift"} <= set(list_scenarios())


def test_imageset_validates():
    from testtime.errors import DataError

    with pytest.raises(DataError, match="uint8"):
        ImageSet(np.zeros((2, 4, 4, 3), np.float32), np.zeros(2), "x")
    with pytest.raises(DataError, match="labels"):
        ImageSet(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3), "x")


def test_ece_known_values():
    conf = np.array([0.9, 0.9, 0.9, 0.9, 0.6])
    correct = np.array([1, 1, 1, 0, 1])
    # bins: 0.9 bin -> |0.9-0.75|*4/5, 0.6 bin -> |0.6-1|*1/5
    assert expected_calibration_error(conf, correct) == pytest.approx(100 * (0.15 * 0.8 + 0.4 * 0.2))
    assert expected_calibration_error(np.ones(3), np.ones(3)) == pytest.approx(0.0)


def test_accumulator_metrics():
    acc = MetricAccumulator()
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0], [0.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    err = acc.update(logits, y)
    s = acc.summary()
    assert err == pytest.approx(100 * 2 / 3) and s["error"] == pytest.approx(100 * 2 / 3)
    p = logits.softmax(1)
    nll = float(-(p[torch.arange(3), y]).log().mean())
    brier = float(((p - torch.nn.functional.one_hot(y, 2)) ** 2).sum(1).mean())
    assert s["nll"] == pytest.approx(nll, rel=1e-5) and s["brier"] == pytest.approx(brier, rel=1e-5)
    assert s["n"] == 3
