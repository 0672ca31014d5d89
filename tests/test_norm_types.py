"""Every method on GroupNorm and LayerNorm models: it runs and adapts what it states, or refuses
early with a ModelError; the GroupNorm ResNet-26 and the small ViT architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import state_hash, tiny_gn, tiny_ln
from testtime.adapt import adapt, get_method, list_methods
from testtime.adapt.components.norm_types import BN, GN, LN, TRAINS, NormSupport, norm_layer_counts
from testtime.adapt.components.params import norm_affine_params
from testtime.bench.suites import ARCH_MODELS  # the shipped non-BN models and their norm kind
from testtime.errors import ModelError
from testtime.models.resnet import CIFAR10_MEAN, CIFAR10_STD, CifarResNet, GroupNorm2d
from testtime.models.train import TrainConfig, evaluate, train_source
from testtime.models.vit import ViT
from testtime.models.zoo import build_model

METHODS = list_methods()


MODELS = {GN: tiny_gn, LN: tiny_ln}

# settings that make adaptation happen on a few batches of an untrained tiny model (its predictions
# are nearly uniform: the default entropy margins would select no sample), or keep it fast
OVERRIDES = {
    "eta": {"e_margin": 1.0},
    "eata": {"e_margin": 1.0},
    "sar": {"e_margin": 1.0},
    "deyo": {"e_margin": 1.0, "plpd_threshold": -1.0},
    "rotta": {"update_frequency": 16, "memory_size": 16},
    "memo": {"n_augmentations": 4},
    "cotta": {"n_augment": 2},
    "petal": {"n_augment": 2},
}


def make(model: nn.Module, method: str) -> nn.Module:
    kw = dict(OVERRIDES.get(method, {}))
    if getattr(get_method(method), "requires_source_data", False):
        g = torch.Generator().manual_seed(1)
        kw["source_data"] = (torch.rand(40, 3, 8, 8, generator=g), torch.arange(40) % 10)
    return adapt(model, method, **kw)


def stream(method: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, size = (2, 1) if method == "memo" else (2, 16)  # MEMO adapts per image: keep it short
    return [torch.rand(size, 3, 8, 8, generator=g) for _ in range(n)]


def params(a: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in a.model.named_parameters()}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_states_what_adapts(method):
    support = get_method(method).norm_support
    assert isinstance(support, NormSupport), f"{method}: no norm_support statement"
    assert support.params in TRAINS and support.source, method
    if not (support.supports(GN) and support.supports(LN)):
        assert support.why, f"{method}: refuses GN/LN without saying why"
    assert "BN:" in support.summary() and ("GN" in support.summary() and "LN" in support.summary())


@pytest.mark.parametrize("kind", [GN, LN])
@pytest.mark.parametrize("method", METHODS)
def test_method_runs_or_refuses_early(method, kind):
    cls = get_method(method)
    support = cls.norm_support
    model = MODELS[kind]()
    if not support.supports(kind):
        with pytest.raises(ModelError, match=rf"{method} needs BatchNorm layers \(.+\).*{kind}"):
            make(model, method)  # at construction, before any batch
        return
    a = make(model, method)
    h0, p0 = state_hash(a), params(a)
    batches = stream(method)
    first = a(batches[0])
    for x in batches[1:]:
        out = a(x)
        assert out.shape == (len(x), 10) and torch.isfinite(out).all(), method
    changed = {n for n, p in a.model.named_parameters() if not torch.equal(p, p0[n])}
    norm = {n for n, _ in norm_affine_params(a.model)}
    if support.params == "none" or not cls.keeps_state:
        assert not changed, f"{method} changed {sorted(changed)}"
    elif support.params == "norm":
        assert changed and changed <= norm, f"{method} on {kind}: {sorted(changed)}"
    else:  # all weights, or all but the classifier
        assert changed - norm, f"{method} on {kind} trained only {sorted(changed)}"
        if support.params == "features":
            head = [n for n, m in a.model.named_modules() if isinstance(m, nn.Linear)][-1]
            assert not {n for n in changed if n.startswith(f"{head}.")}, method
    if support.params != "none" and not cls.keeps_state:  # episodic (MEMO): adapted, then restored
        with torch.no_grad():
            assert not torch.equal(first, MODELS[kind]()(batches[0])), method
    a.reset()
    assert state_hash(a) == h0, f"{method} on {kind}: reset() did not restore the state bit for bit"
    torch.testing.assert_close(a(batches[0]), first, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["sar", "deyo"])
def test_sar_deyo_skip_the_final_vit_norm(method):
    a = make(tiny_ln(), method)
    assert not a.model.norm.weight.requires_grad and a.model.blocks[0].norm1.weight.requires_grad


def test_refusal_names_the_problem_and_bn_methods_run_on_mixed_models():
    with pytest.raises(ModelError, match=r"bn needs BatchNorm layers .*5 LayerNorm"):
        adapt(tiny_ln(), "bn")
    mixed = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 10),
    )  # fmt: skip
    a = adapt(mixed, "bn")  # adapts the statistics of its BatchNorm layer, GroupNorm unchanged
    assert a(torch.rand(4, 3, 8, 8)).shape == (4, 10)
    assert norm_layer_counts(a.model) == {BN: 1, GN: 1, LN: 0}


def test_groupnorm_inputs_are_made_contiguous():
    """torch 2.13 CPU GroupNorm backward segfaults on channels_last input when only the affine
    parameters need gradients; both the architecture and the method wrapper avoid it."""
    conv = nn.Conv2d(3, 8, 3).requires_grad_(False)
    gn = GroupNorm2d(2, 8)
    x = torch.rand(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    gn(conv(x)).square().sum().backward()
    assert gn.weight.grad is not None and torch.isfinite(gn.weight.grad).all()
    a = adapt(tiny_gn(), "tent")
    assert all(len(m._forward_pre_hooks) == 1 for m in a.model.modules() if isinstance(m, nn.GroupNorm))


# ----------------------------------------------------------------------------- architectures


def test_resnet26_gn_architecture():
    bn, gn = build_model("resnet26"), build_model("resnet26_gn")
    assert norm_layer_counts(gn) == {BN: 0, GN: norm_layer_counts(bn)[BN], LN: 0}
    assert all(m.num_groups == 8 for m in gn.modules() if isinstance(m, nn.GroupNorm))
    # same layers and names; GroupNorm has no running statistics
    assert sum(p.numel() for p in gn.parameters()) == sum(p.numel() for p in bn.parameters())
    stats = {k for k in bn.state_dict() if "running_" in k or "num_batches" in k}
    assert set(gn.state_dict()) == set(bn.state_dict()) - stats
    out = gn.eval()(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)
    with pytest.raises(ValueError, match="multiple of the GroupNorm groups"):
        CifarResNet(depth=8, width=12, norm="gn", groups=8)


def test_vit_architecture_and_parameter_count():
    m = build_model("vit_tiny_p4").eval()
    d, hidden, depth, tokens = 192, 384, 6, 64
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    expected = (3 * 16 * d + d) + tokens * d + depth * block + 2 * d + (d * 10 + 10)
    assert sum(p.numel() for p in m.parameters()) == expected
    assert norm_layer_counts(m) == {BN: 0, GN: 0, LN: 2 * depth + 1}
    x = torch.rand(3, 3, 32, 32)
    assert m(x).shape == (3, 10) and m.forward_features(x).shape == (3, d)
    cls = ViT(image_size=8, patch_size=2, dim=16, depth=1, heads=2, pool="cls")
    assert cls(torch.rand(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="built for 32x32"):
        m(torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize("arch", ["resnet26_gn", "vit_tiny_p4"])
def test_train_source_builds_the_new_archs(tmp_path, arch):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=g).numpy()
    y = (torch.arange(8) % 10).numpy()
    cfg = TrainConfig(arch=arch, epochs=1, batch_size=8, warmup_epochs=1, bf16=False, eval_every=1)
    model = train_source(cfg, (x, y), None, tmp_path, progress=False)
    assert (tmp_path / f"{arch}.pt").is_file()
    assert 0.0 <= evaluate(model, x[:4], y[:4]) <= 100.0
    state = torch.load(tmp_path / f"{arch}.pt", weights_only=True)
    build_model(arch).load_state_dict(state)  # the saved weights fit the registered architecture


def test_vit_normalises_inputs_inside():
    """Images in [0, 1] are standardised with the CIFAR-10 statistics inside the model."""
    torch.manual_seed(0)
    m = ViT(image_size=8, patch_size=2, dim=16, depth=1, heads=2).eval()
    x = torch.rand(2, 3, 8, 8)
    out = m(x)
    standardised = (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(
        1, 3, 1, 1
    )
    m.normalize = nn.Identity()
    torch.testing.assert_close(m(standardised), out)


def test_methods_listing_shows_what_adapts(capsys):
    from testtime.cli import main

    assert main(["methods", "-v"]) == 0
    out = capsys.readouterr().out
    assert "refused" in out and "GN/LN" in out and "norm affine" in out


@pytest.fixture(scope="module", params=list(ARCH_MODELS))
def shipped(request) -> tuple[str, nn.Module]:
    from testtime.models.zoo import load_model

    return request.param, load_model(request.param)


def test_shipped_non_bn_models_have_their_norm_and_are_accurate_on_clean_embedded(shipped, embedded):
    name, model = shipped
    counts = norm_layer_counts(model)
    kind = ARCH_MODELS[name]
    assert counts[BN] == 0 and counts[kind] > 0
    assert all(counts[k] == 0 for k in (GN, LN) if k != kind)
    if kind == GN:
        assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {8}
    # full test set: 13.16% (GN), 16.48% (ViT); 500 images leave a few points of sampling noise
    assert evaluate(model, embedded.x[:500], embedded.y[:500]) < {GN: 16.0, LN: 20.0}[kind]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_the_shipped_non_bn_models_or_refuses(shipped, embedded, method):
    name, model = shipped
    kind = ARCH_MODELS[name]
    x = torch.from_numpy(embedded.x[:8]).permute(0, 3, 1, 2).float() / 255
    kw = dict(OVERRIDES.get(method, {}))
    if getattr(get_method(method), "requires_source_data", False):
        kw["source_data"] = (torch.from_numpy(embedded.x[8:48]).permute(0, 3, 1, 2).float() / 255,
                             torch.from_numpy(embedded.y[8:48].astype("int64")))  # fmt: skip
    if kind not in get_method(method).norm_support.kinds:
        with pytest.raises(ModelError, match=r"GroupNorm|LayerNorm|BatchNorm"):
            adapt(model, method, **kw)
        return
    adapted = adapt(model, method, **kw)
    h0 = state_hash(adapted)
    out = adapted(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    adapted.reset()
    assert state_hash(adapted) == h0, f"{method} on {name}: reset() did not restore the state bit for bit"
