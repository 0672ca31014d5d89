"""Bad-input suite: malformed inputs across the public API and CLI fail clearly and change nothing.

Every case asserts an error type from `testtime.errors` (all of which are also ValueErrors) with a
message naming the problem; inputs fed to an adapted model must also leave its state (parameters,
buffers, extra state) bit-for-bit unchanged.
"""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest
import torch

from conftest import state_hash
from test_all_methods import make
from testtime.adapt import adapt, get_method, list_methods
from testtime.cli import main
from testtime.data.cifar import load_cifar10
from testtime.data.streams import StreamSpec, build_stream
from testtime.errors import ConfigError, DataError, ModelError
from testtime.models.zoo import build_model, load_model, load_state

METHODS = list_methods()


# ----------------------------------------------------------------------------- tensors fed to every method
def _pixel(value: float, n: int = 4) -> torch.Tensor:
    x = torch.rand(n, 3, 32, 32)
    x[n // 2, 1, 5, 7] = value
    return x


TENSOR_CASES = {
    "rank3_single_image": (lambda: torch.rand(3, 32, 32), DataError, r"4-D batch.*\(3, 32, 32\)"),
    "rank2_flat": (lambda: torch.rand(4, 3072), DataError, "4-D batch"),
    "rank5": (lambda: torch.rand(1, 4, 3, 32, 32), DataError, "4-D batch"),
    "scalar": (lambda: torch.tensor(0.5), DataError, r"4-D batch.*got shape \(\)"),
    "one_channel": (lambda: torch.rand(4, 1, 32, 32), DataError, "expects 3 channels"),
    "four_channels": (lambda: torch.rand(4, 4, 32, 32), DataError, "expects 3 channels"),
    "channels_last_layout_nhwc": (lambda: torch.rand(4, 32, 32, 3), DataError, "expects 3 channels"),
    "zero_height": (lambda: torch.rand(4, 3, 0, 32), DataError, "zero-size dimension"),
    "zero_width": (lambda: torch.rand(4, 3, 32, 0), DataError, "zero-size dimension"),
    "empty_batch": (lambda: torch.rand(0, 3, 32, 32), DataError, "empty batch"),
    "uint8": (lambda: torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), DataError, "floating-point"),
    "int64": (lambda: torch.randint(0, 256, (4, 3, 32, 32)), DataError, "floating-point.*int64"),
    "bool": (lambda: torch.rand(4, 3, 32, 32) > 0.5, DataError, "floating-point.*bool"),
    "complex": (lambda: torch.rand(4, 3, 32, 32, dtype=torch.complex64), DataError, "floating-point"),
    "nan_pixel": (lambda: _pixel(float("nan")), DataError, "NaN or Inf"),
    "inf_pixel": (lambda: _pixel(float("inf")), DataError, "NaN or Inf"),
    "neg_inf_pixel": (lambda: _pixel(float("-inf")), DataError, "NaN or Inf"),
    "nan_batch": (lambda: torch.full((4, 3, 32, 32), float("nan")), DataError, "NaN or Inf"),
    "inf_batch": (lambda: torch.full((4, 3, 32, 32), float("inf")), DataError, "NaN or Inf"),
    "nan_float64": (lambda: _pixel(float("nan")).double(), DataError, "NaN or Inf"),
    "huge_batch_1e30": (lambda: torch.full((4, 3, 32, 32), 1e30), DataError, "far outside the image range"),
    "huge_pixel_1e30": (lambda: _pixel(1e30), DataError, "far outside the image range"),
    "huge_negative_pixel": (lambda: _pixel(-1e30), DataError, "far outside the image range"),
    # the common preprocessing mistakes: images left in 0..255, or mean/std-normalised (input_range=unit)
    "float_0_255": (
        lambda: torch.randint(0, 256, (4, 3, 32, 32)).float(),
        DataError,
        r"outside the image range \[0, 1\].*looks like 0..255 pixel values: divide by 255",
    ),
    "float64_0_255": (lambda: torch.rand(4, 3, 32, 32).double() * 255, DataError, "divide by 255"),
    "dark_0_255": (lambda: torch.rand(4, 3, 32, 32) * 20, DataError, "divide by 255"),
    "standardised": (
        lambda: (torch.rand(4, 3, 32, 32) - 0.49) / 0.25,
        DataError,
        r"looks like mean/std-normalised.*input_range=any",
    ),
    "minus_one_to_one": (lambda: torch.rand(4, 3, 32, 32) * 2 - 1, DataError, "mean/std-normalised"),
    "one_pixel_at_2": (lambda: _pixel(2.0), DataError, r"values in \[.*, 2\], outside the image range"),
    "one_pixel_at_-1": (lambda: _pixel(-1.0), DataError, r"values in \[-1, .*\], outside the image range"),
    "values_up_to_1000": (lambda: torch.rand(4, 3, 32, 32) * 1000, DataError, "scale the images to"),
    "list": (lambda: torch.rand(2, 3, 32, 32).tolist(), DataError, "torch.Tensor.*got list"),
    "numpy": (lambda: np.random.rand(4, 3, 32, 32).astype(np.float32), DataError, "got ndarray"),
    "none": (lambda: None, DataError, "got NoneType"),
    "string": (lambda: "image.png", DataError, "got str"),
    "meta_device": (lambda: torch.empty(4, 3, 32, 32, device="meta"), DataError, "device meta"),
}


@pytest.fixture(scope="module", params=METHODS)
def adapted(request, source_model, embedded):
    """One adapted model per method, shared by every tensor case (bad inputs must not change it)."""
    return make(source_model, request.param, embedded)


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_bad_batch_fails_clearly_and_leaves_state(adapted, case):
    factory, error, match = TENSOR_CASES[case]
    bad = factory()
    h = state_hash(adapted)
    counters = adapted.counters()
    with pytest.raises(error, match=match) as info:
        adapted(bad)
    assert adapted.name in str(info.value)
    assert state_hash(adapted) == h, f"{adapted.name}: {case} changed the adapted state"
    assert adapted.counters() == counters


@pytest.mark.parametrize("method", [m for m in METHODS if get_method(m).min_batch_size > 1])
@pytest.mark.parametrize("n", [1])
def test_batch_below_min_batch_size(source_model, embedded, method, n):
    a = make(source_model, method, embedded)
    h = state_hash(a)
    with pytest.raises(DataError, match=rf"{method} needs batches of at least \d+ samples.*got {n}"):
        a(torch.rand(n, 3, 32, 32))
    assert state_hash(a) == h


@pytest.mark.parametrize("method", ["tent", "eta", "sar", "bn"])
def test_batch_of_one_through_batchnorm1d(method):
    """A batch of one has a single value per channel at a BatchNorm1d layer: no batch statistics."""
    a = adapt(load_model("mnist_digitnet"), method)
    h = state_hash(a)
    with pytest.raises(DataError, match="more than one value per channel"):
        a(torch.rand(1, 3, 32, 32))
    assert state_hash(a) == h


@pytest.mark.parametrize("method", ["tent", "bn"])
def test_input_range_any_accepts_other_inputs(source_model, method):
    """input_range=any: a model of one's own may take standardised inputs; only +-1e6 is refused."""
    x = (torch.rand(4, 3, 32, 32) - 0.49) / 0.25
    with pytest.raises(DataError, match="mean/std-normalised"):
        adapt(source_model, method)(x)
    a = adapt(source_model, method, input_range="any")
    assert torch.isfinite(a(x)).all() and a.counters()["batches"] == 1
    with pytest.raises(DataError, match="far outside the image range"):
        a(torch.full((4, 3, 32, 32), 1e7))


@pytest.mark.parametrize("value", [1.5, -0.5, 1.2, -0.2])
def test_values_near_the_unit_range_are_accepted(source_model, value):
    """Resampling overshoot or noise slightly outside [0, 1] is valid input (tolerance [-0.5, 1.5])."""
    a = adapt(source_model, "tent")
    assert torch.isfinite(a(_pixel(value))).all()


def test_other_float_precisions_are_converted_not_rejected(source_model):
    """float64/float16 batches are valid input: converted to the model's precision (not bad inputs)."""
    x = torch.rand(4, 3, 32, 32)
    a = adapt(source_model, "source")
    ref = a(x)
    torch.testing.assert_close(a(x.double()), ref)
    assert torch.isfinite(a(x.half())).all()


# ----------------------------------------------------------------------------- adapt(): names and models
TINY = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())


@pytest.mark.parametrize("name", ["nope", "", "TENT", " tent", "tent ", "ten", "bn,tent", "all", None, 3])
def test_unknown_method_name(name):
    with pytest.raises(ConfigError, match=r"unknown method .*; known: default \(auto\), source, bn, tent"):
        adapt(TINY, name)


@pytest.mark.parametrize(
    "model", [None, "resnet26", {"conv.weight": torch.zeros(1)}, lambda x: x, torch.nn.Linear, 3.0]
)
def test_non_module_model(model):
    with pytest.raises(ConfigError, match=r"adapt\(\) needs a torch\.nn\.Module"):
        adapt(model, "tent")


@pytest.mark.parametrize("model", [None, "resnet26", torch.zeros(3)])
def test_non_module_model_direct_constructor(model):
    with pytest.raises(ModelError, match=r"expected a torch\.nn\.Module"):
        get_method("tent")(model)


def _plain() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10)
    )


# methods that work on any classifier (no normalisation layers needed)
NO_NORM_OK = {"source", "lame", "adanpc", "t3a", "memo", "cafa"}


@pytest.mark.parametrize("method", [m for m in METHODS if m not in NO_NORM_OK])
def test_model_without_batchnorm(method):
    with pytest.raises(ModelError, match="no BatchNorm"):
        adapt(_plain(), method)


# ----------------------------------------------------------------------------- bad config values, per method
def _wrong_type(typ: typing.Any) -> typing.Any:
    if typing.get_origin(typ) is not None:  # Optional[int] and the like
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    return {float: "fast", int: 2.5, bool: "maybe", str: 3}.get(typ, object())


def _config_cases() -> list[tuple[str, dict[str, typing.Any], str]]:
    cases = []
    for m in METHODS:
        cfg = get_method(m).Config
        hints = typing.get_type_hints(cfg)
        cases.append((m, {"not_an_option": 1}, "unknown option.*not_an_option"))
        cases.append((m, {"learning_rate": 0.1}, "unknown option.*learning_rate"))
        cases.append((m, {"seed": "abc"}, "seed: expected an integer"))
        for f in dataclasses.fields(cfg):
            if f.name == "seed":
                continue
            cases.append((m, {f.name: _wrong_type(hints[f.name])}, f.name))
        names = {f.name for f in dataclasses.fields(cfg)}
        if "lr" in names:
            cases += [
                (m, {"lr": -1.0}, "lr=-1.0: must be a positive"),
                (m, {"lr": 0}, "lr=0.0: must be a positive"),
                (m, {"lr": float("nan")}, "lr: NaN"),
                (m, {"lr": float("inf")}, "lr=inf: must be a positive finite"),
                (m, {"optimizer": "rmsprop"}, "optimizer='rmsprop'"),
                (m, {"beta1": 1.5}, r"beta1=1.5: must be in \[0, 1\)"),
                (m, {"momentum": -0.5}, "momentum"),
                (m, {"steps": 0}, "steps=0"),
            ]
    return cases


# semantic bad values of method-specific options (the type cases above cover every field)
SEMANTIC = [
    ("bn", {"prior_n": -1}, "prior_n"),
    ("eta", {"e_margin": -1.0}, "e_margin"),
    ("eata", {"fisher_alpha": -1.0}, "fisher_alpha"),
    ("eata", {"d_margin": -1.0}, "d_margin"),
    ("sar", {"rho": -1.0}, "rho"),
    ("deyo", {"aug_type": "bogus"}, "aug_type"),
    ("cotta", {"restore_prob": -1.0}, "restore_prob"),
    ("cotta", {"n_augment": 0}, "n_augment"),
    ("rmt", {"temperature": 0.0}, "temperature"),
    ("petal", {"fim_quantile": -1.0}, "fim_quantile"),
    ("rotta", {"memory_size": 0}, "memory_size"),
    ("roid", {"temperature": -1.0}, "temperature"),
    ("lame", {"knn": 0}, "knn"),
    ("lame", {"max_steps": 0}, "max_steps"),
    ("unmix_tns", {"num_components": 0}, "num_components"),
    ("unmix_tns", {"temperature": -1.0}, "temperature"),
    ("alpha_bn", {"alpha": -1.0}, "alpha"),
    ("adanpc", {"k": 0}, "k"),
    ("t3a", {"filter_k": -2}, "filter_k"),
    ("cafa", {"covariance": "full_bogus"}, "covariance"),
    ("crowd_filter", {"lr": -5.0}, "lr"),
    ("memo", {"n_augmentations": 0}, "n_augmentations"),
    ("shot", {"pseudo_labels": "bogus"}, "pseudo_labels"),
    ("shot", {"cls_par": -1.0}, "cls_par"),
]


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [pytest.param(m, o, r, id=f"{m}-{next(iter(o))}-{i}") for i, (m, o, r) in enumerate(_config_cases())]
    + [pytest.param(m, o, r, id=f"{m}-{next(iter(o))}-semantic") for m, o, r in SEMANTIC],
)
def test_bad_config_value(method, options, match):
    with pytest.raises(ConfigError, match=match):
        adapt(TINY, method, **options)


# ----------------------------------------------------------------------------- bad source data
SOURCE_CASES = {
    "string": ("abc", "must be \\(images, labels\\)"),
    "one_element": ((torch.rand(4, 3, 32, 32),), "must be \\(images, labels\\)"),
    "label_count": ((torch.rand(4, 3, 32, 32), torch.zeros(3)), "one label per image"),
    "labels_2d": ((torch.rand(4, 3, 32, 32), torch.zeros(4, 2)), "one label per image"),
    "empty": ((torch.rand(0, 3, 32, 32), torch.zeros(0)), "one label per image"),
    "rank3_images": ((torch.rand(4, 32, 32), torch.zeros(4)), "float tensor \\(N, C, H, W\\)"),
    "int_images": ((torch.randint(0, 2, (4, 3, 32, 32)), torch.zeros(4)), "float tensor"),
    "nan_images": ((torch.full((4, 3, 32, 32), float("nan")), torch.zeros(4)), "NaN or Inf"),
    "negative_labels": ((torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, -1])), "labels must be class"),
    "wrong_channels": ((torch.rand(4, 1, 32, 32), torch.zeros(4)), "1 channels, the model expects 3"),
    "images_0_255": ((torch.rand(4, 3, 32, 32) * 255, torch.zeros(4)), "looks like 0..255.*divide by 255"),
    "images_standardised": ((torch.rand(4, 3, 32, 32) * 4 - 2, torch.zeros(4)), "mean/std-normalised"),
}


@pytest.mark.parametrize("method", ["cafa", "eata", "adanpc"])
@pytest.mark.parametrize("case", list(SOURCE_CASES))
def test_bad_source_data(source_model, method, case):
    data, match = SOURCE_CASES[case]
    with pytest.raises(DataError, match=match):
        adapt(source_model, method, source_data=data)


# ----------------------------------------------------------------------------- scenarios
class _Data:
    """Tiny domain data (2x2 images) for scenario construction."""

    def get(self, domain):
        return np.zeros((50, 2, 2, 3), np.uint8), np.arange(50) % 10

    def describe(self):
        return "tiny"

    def num_samples(self):
        return 50

    def domain_names(self):
        from testtime.data.cifar import CIFAR10C_CORRUPTIONS

        return CIFAR10C_CORRUPTIONS


def _spec(**kw):
    from testtime.data.streams import DomainData

    data = type("D", (_Data, DomainData), {})()
    return StreamSpec(**{"data": data, "corruptions": ("gaussian_noise", "fog"), "batch_size": 16, **kw})


@pytest.mark.parametrize("name", ["nope", "", "Continual", "continual ", "correlated,continual"])
def test_unknown_scenario(name):
    with pytest.raises(ConfigError, match=r"unknown scenario .*known: continual"):
        build_stream(name, _spec())


@pytest.mark.parametrize(
    ("scenario", "options", "match"),
    [
        ("long_horizon", {"rounds": float("nan")}, "rounds=nan must be a whole number"),
        ("long_horizon", {"rounds": float("inf")}, "rounds=inf must be a whole number"),
        ("long_horizon", {"rounds": -2}, "rounds must be in"),
        ("long_horizon", {"rounds": None}, "rounds=None is not a number"),
        ("correlated", {"delta": float("nan")}, "delta must be >= 0"),
        ("correlated", {"delta": -0.1}, "delta must be >= 0"),
        ("correlated", {"delta": [1]}, "delta=.* is not a number"),
        ("mixed_correlated", {"delta": "x"}, "not a number"),
        ("open_set", {"unknown_ratio": float("nan")}, "unknown_ratio must be in"),
        ("open_set", {"unknown_ratio": -0.5}, "unknown_ratio must be in"),
        ("imbalanced_label_shift", {"imbalance_ratio": float("nan")}, "imbalance_ratio must be >= 1"),
        ("imbalanced_label_shift", {"imbalance_ratio": 0}, "imbalance_ratio must be >= 1"),
        ("continual", {"rounds": 2}, "does not take option"),
        ("gradual", {"delta": 0.1}, "does not take option"),
    ],
)
def test_bad_scenario_option(scenario, options, match):
    with pytest.raises(ConfigError, match=match):
        build_stream(scenario, _spec(options=options))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"severity": 0}, "severity must be an integer in 1..5, got 0"),
        ({"severity": 6}, "severity .* got 6"),
        ({"severity": 2.5}, "severity .* got 2.5"),
        ({"batch_size": 0}, "batch size must be an integer >= 1"),
        ({"batch_size": -1}, "batch size"),
        ({"batch_size": 1.5}, "batch size"),
        ({"n_per_domain": 0}, "n_per_domain must be in 1..50"),
        ({"n_per_domain": 51}, "n_per_domain"),
        ({"corruptions": ()}, "no corruptions"),
        ({"corruptions": ("gaussian_noise", "rain")}, "unknown corruption.*rain"),
    ],
)
def test_bad_stream_spec(kw, match):
    with pytest.raises(ConfigError, match=match):
        build_stream("continual", _spec(**kw))


# ----------------------------------------------------------------------------- weight files
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    good = d / "resnet20.pt"
    torch.save(build_model("resnet20").state_dict(), good)
    blob = good.read_bytes()
    (d / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    (d / "garbage.pt").write_bytes(b"definitely not a checkpoint")
    (d / "empty.pt").write_bytes(b"")
    torch.save({"a": 1, "b": "x"}, d / "not_tensors.pt")
    torch.save([torch.zeros(2)], d / "a_list.pt")
    torch.save(build_model("digitnet").state_dict(), d / "digitnet.pt")
    np.savez(d / "numpy.npz", w=np.zeros(3))
    (d / "subdir").mkdir()
    return d


@pytest.mark.parametrize(
    ("file", "sha", "match"),
    [
        ("missing.pt", None, "weights file not found"),
        ("subdir", None, "weights file not found"),
        ("resnet20.pt", "0" * 64, "sha256 mismatch"),
        ("truncated.pt", None, "cannot load weights"),
        ("truncated.pt", "0" * 64, "sha256 mismatch"),
        ("garbage.pt", None, "cannot load weights"),
        ("empty.pt", None, "cannot load weights"),
        ("numpy.npz", None, "cannot load weights"),
        ("not_tensors.pt", None, "not a state dict of tensors"),
        ("a_list.pt", None, "not a state dict of tensors"),
    ],
)
def test_bad_weight_file(weights, file, sha, match):
    with pytest.raises(ModelError, match=match):
        load_state(weights / file, sha)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"path": "digitnet.pt", "arch": "resnet20"}, ModelError, "do not fit"),
        ({"path": "truncated.pt", "arch": "resnet20"}, ModelError, "cannot load weights"),
        ({"path": "resnet20.pt", "arch": "vgg"}, ConfigError, "unknown architecture"),
        ({"path": "resnet20.pt", "name": "nope"}, ConfigError, "needs an architecture"),
        ({"name": "nope"}, ConfigError, "unknown model 'nope'"),
    ],
)
def test_bad_load_model(weights, kw, error, match):
    if "path" in kw:
        kw = {**kw, "path": weights / kw["path"]}
    with pytest.raises(error, match=match):
        load_model(**kw)


# ----------------------------------------------------------------------------- data files
X_OK = np.zeros((10, 32, 32, 3), np.uint8)
Y_OK = np.arange(10, dtype=np.int64)
NPZ_CASES = {
    "missing_keys": ({"foo": np.zeros(3)}, "malformed CIFAR-10 npz, needs keys 'x_test' and 'y_test'"),
    "only_images": ({"x_test": X_OK}, "needs keys"),
    "images_rank3": ({"x_test": X_OK[..., 0], "y_test": Y_OK}, r"images must be uint8 \(N, H, W, 3\)"),
    "images_nchw": ({"x_test": X_OK.transpose(0, 3, 1, 2), "y_test": Y_OK}, r"uint8 \(N, H, W, 3\)"),
    "images_float": ({"x_test": X_OK.astype(np.float32), "y_test": Y_OK}, "got float32"),
    "label_count": ({"x_test": X_OK, "y_test": Y_OK[:7]}, "expected 10 labels"),
    "labels_2d": ({"x_test": X_OK, "y_test": np.zeros((10, 2), np.int64)}, "expected 10 labels"),
    "labels_float": ({"x_test": X_OK, "y_test": np.full(10, 0.5)}, "integer CIFAR-10 class labels"),
    "labels_negative": ({"x_test": X_OK, "y_test": np.full(10, -3)}, r"labels 0..9.*\[-3, -3\]"),
    "labels_too_big": ({"x_test": X_OK, "y_test": np.full(10, 42)}, r"labels 0..9.*42"),
    "empty": ({"x_test": X_OK[:0], "y_test": Y_OK[:0]}, "contains no images"),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_corrupt_npz(tmp_path, case):
    arrays, match = NPZ_CASES[case]
    p = tmp_path / f"{case}.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=match):
        load_cifar10("test", p)


@pytest.mark.parametrize(
    ("content", "match"), [(b"not a zip", "cannot read as npz"), (b"PK\x03\x04trunc", "cannot read as npz")]
)
def test_unreadable_npz(tmp_path, content, match):
    p = tmp_path / "bad.npz"
    p.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_cifar10("test", p)


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory, weights):
    d = tmp_path_factory.mktemp("cli")
    for case, (arrays, _) in NPZ_CASES.items():
        np.savez(d / f"{case}.npz", **arrays)
    (d / "garbage.npz").write_bytes(b"not a zip")
    return {"npz": d, "weights": weights, "out": d / "out"}


CLI_CASES = [
    (["-m", "nope"], "unknown method 'nope'"),
    (["-m", "tent,nope"], "unknown method 'nope'"),
    (["-m", "TENT"], "unknown method 'TENT'"),
    (["--data", "{npz}/missing.npz"], "does not exist"),
    *[(["--data", f"{{npz}}/{case}.npz"], match.split(",")[0]) for case, (_, match) in NPZ_CASES.items()],
    (["--data", "{npz}/garbage.npz"], "cannot read as npz"),
    (["--severity", "0"], "severity must be an integer in 1..5, got 0"),
    (["--severity", "6"], "severity must be an integer in 1..5, got 6"),
    (["--severity", "-1"], "severity"),
    (["--batch-size", "0"], "batch size must be an integer >= 1, got 0"),
    (["--batch-size", "-1"], "batch size must be an integer >= 1, got -1"),
    (["--n-per-domain", "0"], "n_per_domain"),
    (["--n-per-domain", "-3"], "n_per_domain"),
    (["--seed", "x"], "--seed takes whole numbers"),
    (["--seed", "1,-2"], "seed must be an integer >= 0"),
    (["--threads", "-1"], "threads must be"),
    (["--source-samples", "-5"], "source_samples must be"),
    (["--corruption-seed", "-1"], "corruption_seed must be"),
    (["-o", "lr"], "must look like key=value"),
    (["-o", "=1"], "key is empty"),
    (["-o", "lr="], "lr: expected a number"),
    (["-m", "tent", "-o", "lr=-1"], "lr=-1.0: must be a positive"),
    (["-m", "tent", "-o", "lr=nan"], "lr: NaN"),
    (["-m", "tent", "-o", "lr=fast"], "lr: expected a number"),
    (["-m", "tent", "-o", "episodic=maybe"], "episodic: expected a boolean"),
    (["-m", "tent", "-o", "beta2=1.5"], "beta2"),
    (["-m", "source", "-o", "lr=0.1"], "belong to none of the methods"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model-path", "{weights}/missing.pt", "--arch", "resnet26"], "weights file not found"),
    (["--model-path", "{weights}/garbage.pt", "--arch", "resnet26"], "cannot load weights"),
    (["--model-path", "{weights}/truncated.pt", "--arch", "resnet20"], "cannot load weights"),
    (["--model-path", "{weights}/not_tensors.pt", "--arch", "resnet26"], "not a state dict"),
    (["--model-path", "{weights}/digitnet.pt", "--arch", "resnet20"], "do not fit"),
    (["--model-path", "{weights}/resnet20.pt", "--arch", "vgg"], "unknown architecture"),
    (["--scenario", "nope"], "unknown scenario"),
    (["--scenario", "correlated", "--delta", "-0.5"], "delta must be >= 0"),
    (["--scenario", "continual", "--delta", "0.5"], "does not take option"),
    (["--scenario", "long_horizon", "--rounds", "0"], "rounds must be in"),
    (["--scenario", "open_set", "--unknown-ratio", "2"], "unknown_ratio must be in"),
    (["--corruptions", "rain"], "unknown corruption"),
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--cifar10c", "{npz}"], "not a CIFAR-10-C directory"),
    (["--device", "nope"], "device"),
]


def _fill(args: list[str], files) -> list[str]:
    return [a.format(npz=files["npz"], weights=files["weights"]) for a in args]


@pytest.mark.parametrize(
    ("args", "match"), CLI_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_cli_run_bad_args(files, args, match, capsys):
    small = ["--corruptions", "gaussian_noise", "--n-per-domain", "5", "--batch-size", "5"]
    out = ["--out", str(files["out"]), "--cache-dir", str(files["out"])]
    rc = main(["run", *small, *out, *_fill(args, files)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    errors = [line for line in err if line.startswith("testtime: error:")]
    assert len(errors) == 1 and errors == err[-1:], err
    assert __import__("re").search(match, errors[0]), (match, errors[0])
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["report", "{npz}/nothing"], "no results here"),
        (["bench", "--suite", "nope"], "unknown suite"),
        (["train-source", "--data", "{npz}/missing.npz"], "does not exist"),
        (["train-source", "--data", "{npz}/missing_keys.npz"], "needs keys 'x_train'"),
    ],
)
def test_cli_other_commands_bad_args(files, args, match, capsys):
    assert main(_fill(args, files)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("testtime: error:") and __import__("re").search(match, err[-1])


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--batch-size", "abc"],
        ["run", "--severity", "x"],
        ["nosuchcmd"],
        ["run", "--unknown", "cifar100"],
    ],
)
def test_cli_argparse_rejects(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "error: " in capsys.readouterr().err
