"""Behaviour of every stream scenario on small tagged data, open-set metrics, and the CLI end to end."""

from __future__ import annotations

import csv
import json
from collections import Counter
from itertools import groupby, pairwise

import numpy as np
import pytest
import torch

from testtime.data.cifar import CIFAR10C_CORRUPTIONS, ImageSet
from testtime.data.streams import (
    GRADUAL_FIRST,
    GRADUAL_NEXT,
    DomainData,
    NaturalShift,
    StreamSpec,
    build_stream,
    list_scenarios,
    unknown_images,
)
from testtime.errors import ConfigError, DataError
from testtime.metrics import MetricAccumulator, auroc, open_set_metrics

CLEAN = 99  # domain tag of the clean images
THREE = ("gaussian_noise", "fog", "contrast")


class TaggedData(DomainData):
    """Images whose pixels encode (domain, severity, sample index), labels = index % 10.

    Pixel (0, 0) holds (domain tag, severity, 0) and pixel (0, 1) holds (index % 256, index // 256, 0);
    the domain tag is the corruption's index in CIFAR10C_CORRUPTIONS (99 for clean).
    """

    def __init__(self, n: int = 100, size: int = 2, cache_dir=None) -> None:
        self.n, self.size, self.cache_dir = n, size, cache_dir

    def get(self, domain):
        k = CLEAN if domain.corruption == "clean" else CIFAR10C_CORRUPTIONS.index(domain.corruption)
        x = np.zeros((self.n, self.size, self.size, 3), np.uint8)
        idx = np.arange(self.n)
        x[:, 0, 0, 0] = k
        x[:, 0, 0, 1] = domain.severity
        x[:, 0, 1, 0] = idx % 256
        x[:, 0, 1, 1] = idx // 256
        return x, idx % 10

    def describe(self):
        return "tagged"

    def num_samples(self):
        return self.n


def make_spec(n: int = 100, **kw) -> StreamSpec:
    data = kw.pop("data", None) or TaggedData(n)
    base = {"data": data, "corruptions": THREE, "batch_size": 16}
    return StreamSpec(**{**base, **kw})


def decode(batch) -> tuple[list[int], list[int], list[int]]:
    """(domain tag, severity, sample index) of every sample of a batch."""
    x = (batch.x * 255).round().long()
    return x[:, 0, 0, 0].tolist(), x[:, 1, 0, 0].tolist(), (x[:, 0, 0, 1] + 256 * x[:, 1, 0, 1]).tolist()


def samples(stream) -> list[tuple[int, int, int, int]]:
    """(domain tag, severity, index, label) per sample, in stream order; checks the tags agree with domain_ids."""
    out = []
    for b in stream:
        tags, sevs, idx = decode(b)
        for t, s, i, y, d in zip(tags, sevs, idx, b.y.tolist(), b.domain_ids):
            dom = stream.domains[int(d)]
            assert t == (CLEAN if dom.corruption == "clean" else CIFAR10C_CORRUPTIONS.index(dom.corruption))
            assert s == dom.severity and y == i % 10  # pixels and labels come from the right place
            out.append((t, s, i, y))
    return out


def runs(seq) -> list[tuple[object, int]]:
    return [(k, len(list(g))) for k, g in groupby(seq)]


def switch_rate(labels) -> float:
    labels = np.asarray(labels)
    return float((labels[1:] != labels[:-1]).mean())


TAG = {c: CIFAR10C_CORRUPTIONS.index(c) for c in THREE}


# ----------------------------------------------------------------------------- gradual
def test_gradual_severity_sequence():
    n = 20
    s = build_stream("gradual", make_spec(n, batch_size=7))
    got = samples(s)
    steps = runs([(t, sev) for t, sev, _, _ in got])
    want = [(TAG["gaussian_noise"], v) for v in GRADUAL_FIRST]
    want += [(TAG[c], v) for c in THREE[1:] for v in GRADUAL_NEXT]
    assert [k for k, _ in steps] == want
    assert GRADUAL_FIRST == (5, 4, 3, 2, 1) and GRADUAL_NEXT == (1, 2, 3, 4, 5, 4, 3, 2, 1)
    assert all(length == n for _, length in steps)
    # every step shows all n images, reshuffled at every step
    pos, orders = 0, []
    for _ in steps:
        order = [i for _, _, i, _ in got[pos : pos + n]]
        assert sorted(order) == list(range(n))
        orders.append(order)
        pos += n
    assert len({tuple(o) for o in orders}) == len(orders)
    # one never-reset segment; one domain per distinct (corruption, severity)
    assert len(s.segments) == 1 and not s.reset_each_segment
    assert sorted((d.corruption, d.severity) for d in s.domains) == sorted(
        (c, v) for c in THREE for v in range(1, 6)
    )
    # --severity does not change the sequence
    assert samples(build_stream("gradual", make_spec(n, batch_size=7, severity=2))) == got


def test_gradual_needs_severities():
    clean = ImageSet(np.zeros((10, 2, 2, 3), np.uint8), np.arange(10) % 10, "c")
    data = NaturalShift("usps", ImageSet(np.zeros((10, 2, 2, 3), np.uint8), np.arange(10) % 10, "u"), clean)
    with pytest.raises(ConfigError, match="severities"):
        build_stream("gradual", make_spec(data=data, corruptions=("usps",)))
    assert build_stream("continual", make_spec(data=data, corruptions=("usps",))).num_samples == 10


# ----------------------------------------------------------------------------- mixed domains
def test_mixed_domains_every_image_once_and_shuffled():
    n = 50
    s = build_stream("mixed_domains", make_spec(n, batch_size=10))
    got = samples(s)
    pairs = [(t, i) for t, _, i, _ in got]
    assert len(pairs) == 3 * n and set(pairs) == {(TAG[c], i) for c in THREE for i in range(n)}
    tags = [t for t, _ in pairs]
    assert len(runs(tags)) > n  # domains interleave (sequential would give 3 runs)
    batch_domains = [len(set(decode(b)[0])) for b in s]
    assert sum(k > 1 for k in batch_domains) >= len(batch_domains) - 1
    assert all(sev == 5 for _, sev, _, _ in got)
    assert samples(build_stream("mixed_domains", make_spec(n, batch_size=10, seed=1))) != got


# ----------------------------------------------------------------------------- correlated
def test_correlated_few_label_switches_each_image_once():
    n = 200
    iid = build_stream("continual", make_spec(n, n_per_domain=150, batch_size=32))
    cor = build_stream("correlated", make_spec(n, n_per_domain=150, batch_size=32, options={"delta": 0.1}))
    got = samples(cor)
    for c in THREE:  # each domain: 150 distinct images, in order, one domain after another
        idx = [i for t, _, i, _ in got if t == TAG[c]]
        assert len(idx) == len(set(idx)) == 150
    assert [t for t, _ in runs([t for t, _, _, _ in got])] == [TAG[c] for c in THREE]
    first = TAG["gaussian_noise"]  # the same image subset as continual, only reordered
    assert {i for t, _, i, _ in got if t == first} == {i for t, _, i, _ in samples(iid) if t == first}
    rate_iid = np.mean([switch_rate(seg_labels) for seg_labels in _segment_labels(iid)])
    rate_cor = np.mean([switch_rate(seg_labels) for seg_labels in _segment_labels(cor)])
    assert rate_iid > 0.8 and rate_cor < 0.3 and rate_cor < rate_iid / 3
    assert "delta=0.1" in cor.description


def _segment_labels(stream) -> list[np.ndarray]:
    labels = np.arange(stream.data.num_samples()) % 10
    return [labels[seg.sample_idx] for seg in stream.segments]


def test_correlated_switch_rate_grows_with_delta():
    def rate(delta):
        return np.mean(
            [
                switch_rate(np.concatenate(_segment_labels(build_stream("correlated", sp))))
                for sp in (
                    make_spec(200, corruptions=("fog",), seed=seed, options={"delta": delta})
                    for seed in range(4)
                )
            ]
        )

    rates = [rate(d) for d in (0.01, 0.1, 1.0, 10.0)]
    assert all(a < b for a, b in pairwise(rates)), rates
    assert rates[0] < 0.12 and rates[-1] > 0.35


def test_correlated_delta_zero_sorts_each_domain_by_label():
    """delta 0: the reference code's default for CIFAR-10 label-correlated runs (sorted by class)."""
    n = 200
    s = build_stream("correlated", make_spec(n, n_per_domain=150, batch_size=32, options={"delta": 0}))
    for seg_labels in _segment_labels(s):
        assert len(seg_labels) == 150 and np.all(np.diff(seg_labels) >= 0)  # classes ascending
        assert switch_rate(seg_labels) == pytest.approx(9 / 149)  # one switch per class boundary
    iid = build_stream("continual", make_spec(n, n_per_domain=150, batch_size=32))
    assert sorted(s.segments[0].sample_idx) == sorted(iid.segments[0].sample_idx)  # reordered only
    assert "delta=0.0" in s.description
    mixed = build_stream("mixed_correlated", make_spec(n, options={"delta": 0}))
    assert np.all(np.diff(np.concatenate(_segment_labels(mixed))) >= 0)


def test_correlated_deterministic_per_seed():
    def order(seed, delta=0.1):
        s = build_stream("correlated", make_spec(100, seed=seed, options={"delta": delta}))
        return [i for _, _, i, _ in samples(s)]

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert order(3) != order(3, delta=1.0)


def test_mixed_correlated():
    n = 100
    mixed = build_stream("mixed_domains", make_spec(n))
    s = build_stream("mixed_correlated", make_spec(n, options={"delta": 0.1}))
    got = samples(s)
    pairs = [(t, i) for t, _, i, _ in got]
    assert len(pairs) == len(set(pairs)) == 3 * n
    assert set(pairs) == {(t, i) for t, _, i, _ in samples(mixed)}
    tags = [t for t, _ in pairs]
    assert len(runs(tags)) > 50  # domains stay mixed ...
    assert (
        switch_rate([y for *_, y in got]) < 0.3 < switch_rate([y for *_, y in samples(mixed)])
    )  # ... labels not


# ----------------------------------------------------------------------------- imbalanced label shift
def test_imbalanced_label_shift_phases():
    n = 100  # 10 phases of 10 samples per corruption
    s = build_stream("imbalanced_label_shift", make_spec(n, corruptions=THREE[:2], batch_size=10))
    assert s.reset_each_segment and len(s.segments) == 2  # each corruption on its own, as in SAR
    assert s.meta["phase_length"] == 10
    got = samples(s)
    assert len(got) == 2 * n
    for c in THREE[:2]:
        labels = [y for t, _, _, y in got if t == TAG[c]]
        phases = [labels[j : j + 10] for j in range(0, n, 10)]
        assert all(len(set(p)) == 1 for p in phases)  # ratio 500000: one class per phase
        assert sorted(p[0] for p in phases) == list(range(10))  # every class leads one phase
    majors = [[y for t, _, _, y in got if t == TAG[c]][::10] for c in THREE[:2]]
    assert majors[0] != majors[1]  # each corruption draws its own class order


def test_imbalanced_label_shift_ratio_controls_purity():
    n = 1000  # phases of 100

    def purity(ratio):
        s = build_stream(
            "imbalanced_label_shift",
            make_spec(n, corruptions=("fog",), options={"imbalance_ratio": ratio}),
        )
        labels = np.arange(n)[s.segments[0].sample_idx] % 10
        return np.mean(
            [Counter(labels[j : j + 100].tolist()).most_common(1)[0][1] / 100 for j in range(0, n, 100)]
        )

    # major-class probability ratio / (ratio + 9): 1 -> 0.1 (the max count is a bit above), 9 -> 0.5
    assert purity(1) < 0.3
    assert 0.38 < purity(9) < 0.62
    assert purity(500000) == 1.0


# ----------------------------------------------------------------------------- open set
@pytest.mark.parametrize(("ratio", "n_known", "n_unknown"), [(0.5, 40, 40), (0.2, 40, 10), (0.75, 20, 60)])
def test_open_set_unknown_fraction_and_labels(tmp_path, ratio, n_known, n_unknown):
    data = TaggedData(100, size=32, cache_dir=tmp_path)
    spec = make_spec(
        data=data,
        corruptions=THREE[:2],
        n_per_domain=n_known,
        batch_size=16,
        options={"unknown": "noise", "unknown_ratio": ratio},
    )
    s = build_stream("open_set", spec)
    assert s.meta["unknown"] == "noise" and not s.reset_each_segment
    assert len(s.segments) == 2 and s.num_samples == 2 * (n_known + n_unknown)
    for seg in s.segments:
        known = seg.sample_idx[seg.sample_idx < 100]
        unknown = seg.sample_idx[seg.sample_idx >= 100]
        assert len(known) == len(set(known)) == n_known
        assert len(unknown) == len(set(unknown)) == n_unknown
        assert (
            np.flatnonzero(seg.sample_idx >= 100).max() > np.flatnonzero(seg.sample_idx < 100).min()
        )  # mixed
    n_seen = Counter()
    for b in s:
        tags, _, idx = decode(b)
        unk = b.y == -1
        dom = int(b.domain_ids[0])
        n_seen[(dom, "u")] += int(unk.sum())
        n_seen[(dom, "k")] += int((~unk).sum())
        corr = CIFAR10C_CORRUPTIONS.index(s.domains[dom].corruption)
        for t, i, y in zip(tags, idx, b.y.tolist()):
            if y >= 0:  # known samples are the tagged images with their own label
                assert t == corr and y == i % 10
    assert all(n_seen[(d, "u")] == n_unknown and n_seen[(d, "k")] == n_known for d in range(2))
    frac = n_unknown / (n_known + n_unknown)
    assert frac == pytest.approx(ratio)


def test_open_set_unknowns_are_corrupted_with_the_domain(tmp_path):
    data = TaggedData(20, size=32, cache_dir=tmp_path)
    s = build_stream(
        "open_set",
        make_spec(data=data, corruptions=("gaussian_noise", "contrast"), options={"unknown": "noise"}),
    )
    u = [s.data.get(d)[0][20:] for d in s.domains]
    assert u[0].shape == (20, 32, 32, 3) and not np.array_equal(u[0], u[1])
    assert u[1].std() < u[0].std()  # contrast shrinks the noise, gaussian noise does not
    assert all((s.data.get(d)[1][20:] == -1).all() for d in s.domains)


def test_mnist_unknowns():
    try:
        x = unknown_images("mnist", 8, seed=0)
    except DataError:
        pytest.skip("mnist.npz not available")
    assert x.shape == (8, 32, 32, 3) and x.dtype == np.uint8
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()  # grey digits as RGB
    assert x.max() > 200 and np.array_equal(x, unknown_images("mnist", 8, seed=0))
    noise = unknown_images("noise", 8, seed=0)
    assert noise.shape == (8, 32, 32, 3) and len(np.unique(noise)) > 200


def test_auroc_known_values():
    pos = np.array([0, 0, 1, 1], bool)
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), pos) == pytest.approx(100.0)  # perfect detector
    assert auroc(np.array([0.8, 0.9, 0.1, 0.2]), pos) == pytest.approx(0.0)
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), pos) == pytest.approx(75.0)  # 3 of 4 pairs ordered
    assert auroc(np.full(4, 0.5), pos) == pytest.approx(50.0)  # ties count half
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1], bool)))
    rng = np.random.default_rng(0)
    assert auroc(rng.random(20000), rng.random(20000) < 0.3) == pytest.approx(50.0, abs=2.0)  # random


def test_open_set_metrics_known_values():
    # known: correct & confident, wrong, correct but rejected, rejected; unknown: rejected, rejected, accepted
    conf = np.array([0.9, 0.9, 0.3, 0.2, 0.1, 0.4, 0.8])
    correct = np.array([1, 0, 1, 1, 0, 0, 0], bool)
    unknown = np.array([0, 0, 0, 0, 1, 1, 1], bool)
    m = open_set_metrics(conf, correct, unknown, threshold=0.5)
    assert m["known_acc_open"] == pytest.approx(25.0)
    assert m["unknown_rejected"] == pytest.approx(100 * 2 / 3)
    assert m["h_score"] == pytest.approx(100 * 2 * 0.25 * (2 / 3) / (0.25 + 2 / 3))  # harmonic mean
    assert m["auroc"] == pytest.approx(100 * 8 / 12)  # unknown below known in 8 of 12 pairs
    perfect = open_set_metrics(
        np.array([0.9, 0.95, 0.1, 0.2]), np.array([1, 1, 0, 0], bool), np.array([0, 0, 1, 1], bool)
    )
    assert perfect["auroc"] == pytest.approx(100.0) and perfect["h_score"] == pytest.approx(100.0)
    none_rejected = open_set_metrics(
        np.full(4, 0.9), np.array([1, 1, 0, 0], bool), np.array([0, 0, 1, 1], bool)
    )
    assert none_rejected["h_score"] == 0.0 and none_rejected["known_acc_open"] == pytest.approx(100.0)


def test_accumulator_open_set_counts_batches_before_the_first_unknown():
    acc = MetricAccumulator()
    first = torch.tensor([[8.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # confident right; unsure (conf 1/3) wrong
    acc.update(first, torch.tensor([0, 1]))  # an all-known batch before any unknown
    mixed = torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.1, 0.0], [8.0, 0.0, 0.0]])  # unknowns: conf 0.356
    assert acc.update(mixed, torch.tensor([-1, -1, 0])) == 0.0
    s = acc.summary()
    assert s["n"] == 3 and s["error"] == pytest.approx(100 / 3)  # unknowns are not in the closed-set metrics
    # all 5 samples count: each unknown is below 2 of the 3 knowns; 2 of 3 knowns right and accepted
    assert s["auroc"] == pytest.approx(100 * 4 / 6)
    assert s["known_acc_open"] == pytest.approx(100 * 2 / 3) and s["unknown_rejected"] == pytest.approx(100.0)
    assert s["h_score"] == pytest.approx(100 * 2 * (2 / 3) / (2 / 3 + 1))
    closed = MetricAccumulator()
    closed.update(first, torch.tensor([0, 1]))
    assert "auroc" not in closed.summary()  # closed-set streams report no open-set metrics


# ----------------------------------------------------------------------------- long horizon, forgetting, bs 1
def test_long_horizon_repeats_the_continual_sequence():
    n = 20
    cont = build_stream("continual", make_spec(n, batch_size=8))
    s = build_stream("long_horizon", make_spec(n, batch_size=8, options={"rounds": 3}))
    assert s.meta["rounds"] == 3 and len(s) == 3 * len(cont) and s.num_samples == 3 * cont.num_samples
    assert not s.reset_each_segment
    got = samples(s)
    cont_tags = [t for t, _, _, _ in samples(cont)]
    assert [t for t, _, _, _ in got] == cont_tags * 3
    rounds = [got[r * 3 * n : (r + 1) * 3 * n] for r in range(3)]
    for r in rounds:
        for c in THREE:
            assert sorted(i for t, _, i, _ in r if t == TAG[c]) == list(range(n))
    assert len({tuple(i for _, _, i, _ in r) for r in rounds}) == 3  # reshuffled every round
    assert build_stream("long_horizon", make_spec(n)).meta["rounds"] == 10  # default


def test_forgetting_ends_with_clean():
    n = 30
    cont = build_stream("continual", make_spec(n, n_per_domain=20))
    s = build_stream("forgetting", make_spec(n, n_per_domain=20))
    got = samples(s)
    assert str(s.domains[-1]) == "clean" and s.domains[:-1] == cont.domains
    assert got[:60] == samples(cont)  # the continual stream first ...
    clean = got[60:]
    assert len(clean) == 20 and all(t == CLEAN and sev == 0 for t, sev, _, _ in clean)  # ... then clean
    assert len({i for *_, i, _ in clean}) == 20
    assert not s.reset_each_segment


def test_batch_size_1():
    s = build_stream("batch_size_1", make_spec(20, batch_size=64))
    batches = list(s)
    assert s.batch_size == 1 and len(batches) == len(s) == s.num_samples == 60
    assert all(len(b.y) == 1 for b in batches)
    assert [t for t, _, _, _ in samples(s)] == [
        t for t, _, _, _ in samples(build_stream("continual", make_spec(20)))
    ]


# ----------------------------------------------------------------------------- bad options
@pytest.mark.parametrize(
    ("scenario", "options", "match"),
    [
        ("correlated", {"delta": -1}, "delta must be >= 0, got -1"),
        ("mixed_correlated", {"delta": -0.5}, "delta must be >= 0"),
        ("correlated", {"delta": float("nan")}, "delta must be >= 0, got nan"),
        ("correlated", {"delta": "abc"}, "not a number"),
        ("long_horizon", {"rounds": 0}, r"rounds must be in \[1, 1000\], got 0"),
        ("long_horizon", {"rounds": 2.5}, "rounds=2.5 must be a whole number"),
        ("open_set", {"unknown_ratio": 0}, r"unknown_ratio must be in \(0, 1\), got 0"),
        ("open_set", {"unknown_ratio": 1}, r"unknown_ratio must be in \(0, 1\), got 1"),
        ("open_set", {"unknown_ratio": 1.5}, r"unknown_ratio must be in \(0, 1\)"),
        ("open_set", {"unknown": "cifar100"}, "unknown open-set source 'cifar100'"),
        ("imbalanced_label_shift", {"imbalance_ratio": 0.5}, "imbalance_ratio must be >= 1"),
        ("continual", {"delta": 0.1}, "scenario continual does not take option.*delta.*none"),
        ("correlated", {"rounds": 2}, r"does not take option\(s\) rounds \(it takes: delta\)"),
    ],
)
def test_bad_scenario_options(scenario, options, match):
    with pytest.raises(ConfigError, match=match):
        build_stream(scenario, make_spec(options=options))


def test_unknown_scenario_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown scenario 'nope'; known: continual, .*open_set"):
        build_stream("nope", make_spec())
    assert set(list_scenarios()) >= {
        "continual", "reset_each_shift", "batch_size_1", "gradual", "mixed_domains", "correlated",
        "mixed_correlated", "imbalanced_label_shift", "open_set", "long_horizon", "forgetting",
    }  # fmt: skip


# ----------------------------------------------------------------------------- CLI end to end
def _rows(path):
    return list(csv.DictReader((path / "results.csv").open()))


def test_cli_correlated_and_open_set(tmp_path, capsys):
    from testtime.cli import main

    common = ["--n-per-domain", "50", "--corruptions", "gaussian_noise,fog", "--batch-size", "25"]
    common += ["--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]
    assert main(["run", "-m", "bn", "-s", "correlated", "--delta", "0.1", *common, "--run-id", "cor"]) == 0
    cfg = json.loads((tmp_path / "cor" / "config.json").read_text())
    assert cfg["config"]["scenario"] == "correlated" and cfg["config"]["scenario_options"] == {"delta": "0.1"}
    rows = _rows(tmp_path / "cor")
    assert {r["scenario"] for r in rows} == {"correlated"}
    errors = {r["corruption"]: float(r["value"]) for r in rows if r["metric"] == "error"}
    assert set(errors) == {"gaussian_noise", "fog", "mean"}
    assert errors["mean"] == pytest.approx((errors["gaussian_noise"] + errors["fog"]) / 2)
    assert {float(r["value"]) for r in rows if r["metric"] == "n"} == {50.0}
    assert not any(r["metric"] in ("auroc", "h_score") for r in rows)

    args = ["run", "-m", "source", "-s", "open_set", "--unknown", "noise", "--unknown-ratio", "0.5"]
    assert main([*args, *common, "--run-id", "open"]) == 0
    rows = _rows(tmp_path / "open")
    by = {(r["corruption"], r["metric"]): float(r["value"]) for r in rows}
    for dom in ("gaussian_noise", "fog", "mean"):
        assert 0.0 <= by[(dom, "auroc")] <= 100.0 and 0.0 <= by[(dom, "h_score")] <= 100.0
    for dom in ("gaussian_noise", "fog"):
        assert by[(dom, "n")] == 50  # closed-set metrics over the 50 known images only
        assert 0.0 <= by[(dom, "unknown_rejected")] <= 100.0
    assert by[("mean", "auroc")] == pytest.approx(
        (by[("gaussian_noise", "auroc")] + by[("fog", "auroc")]) / 2
    )
    trace = list(csv.DictReader((tmp_path / "open" / "trace.csv").open()))
    assert sum(int(t["n"]) for t in trace) == 2 * 100  # 50 known + 50 unknown per corruption

    capsys.readouterr()
    assert main(["run", "-m", "source", "-s", "continual", "--delta", "0.1", *common, "--run-id", "bad"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("testtime: error: scenario continual does not take option(s) delta")
    assert len(err.splitlines()) == 1


def test_cli_batch_size_1_records_the_batch_size_it_ran(tmp_path):
    from testtime.cli import main

    args = ["run", "-m", "source", "-s", "batch_size_1", "--n-per-domain", "6", "--corruptions", "fog"]
    args += [
        "--batch-size",
        "64",
        "--out",
        str(tmp_path),
        "--cache-dir",
        str(tmp_path / "c"),
        "--run-id",
        "b1",
    ]
    assert main(args) == 0
    rows = _rows(tmp_path / "b1")
    assert {r["batch_size"] for r in rows} == {"1"}
    trace = list(csv.DictReader((tmp_path / "b1" / "trace.csv").open()))
    assert len(trace) == 6 and {t["n"] for t in trace} == {"1"}


def test_mixed_levels_add_lower_severities_as_domains():
    n = 40
    s = build_stream("mixed_correlated", make_spec(n, options={"delta": 0.1, "levels": 3}))
    got = samples(s)
    assert {(t, sev) for t, sev, _, _ in got} == {(TAG[c], v) for c in THREE for v in (5, 4, 3)}
    assert len(got) == len({(t, sev, i) for t, sev, i, _ in got}) == 3 * 3 * n
    assert [str(d) for d in s.domains][:3] == ["gaussian_noise@5", "gaussian_noise@4", "gaussian_noise@3"]
    assert switch_rate([y for *_, y in got]) < 0.3
    m = build_stream("mixed_domains", make_spec(n, options={"levels": 2}))
    assert {sev for _, sev, _, _ in samples(m)} == {5, 4}
    one = build_stream("mixed_domains", make_spec(n, options={"levels": 1}))
    assert samples(one) == samples(build_stream("mixed_domains", make_spec(n)))
    with pytest.raises(ConfigError, match="below severity 1"):
        build_stream("mixed_domains", make_spec(n, severity=2, options={"levels": 3}))
    with pytest.raises(ConfigError, match="levels must be in"):
        build_stream("mixed_domains", make_spec(n, options={"levels": 0}))
    with pytest.raises(ConfigError, match="whole number"):
        build_stream("mixed_domains", make_spec(n, options={"levels": 1.5}))
    with pytest.raises(ConfigError, match="does not take option"):
        build_stream("continual", make_spec(n, options={"levels": 2}))
