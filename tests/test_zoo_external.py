"""RobustBench architectures and checkpoint loading, the ImageNet extra, device selection."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from testtime.device import select_device
from testtime.errors import ConfigError, ModelError
from testtime.models import zoo
from testtime.models.resnet import Normalize
from testtime.models.robustbench import CifarResNeXt, WideResNet

STANDARD = "robustbench:cifar10:Standard"
AUGMIX100 = "robustbench:cifar100:Hendrycks2020AugMix_ResNeXt"


def small_wrn(num_classes: int = 10, **kw) -> WideResNet:
    return WideResNet(depth=10, widen_factor=1, num_classes=num_classes, **kw)


def small_resnext(num_classes: int = 100) -> CifarResNeXt:
    return CifarResNeXt(depth=11, cardinality=2, base_width=4, num_classes=num_classes)


SMALL = {STANDARD: small_wrn, AUGMIX100: small_resnext}


def randomise_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, so that a wrongly loaded buffer shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.fixture
def small_zoo(monkeypatch):
    """The registry's RobustBench entries with small variants of their architectures."""
    for name, build in SMALL.items():
        monkeypatch.setitem(zoo.ROBUSTBENCH, name, dataclasses.replace(zoo.ROBUSTBENCH[name], build=build))


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """An empty model cache and a working directory without RobustBench's ./models."""
    monkeypatch.setenv("TESTTIME_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "cache" / "models"


# full-size key layouts, checked (key order, shapes, logits) against RobustBench 1.1.1's own
# wide_resnet.py / resnext.py model classes when this was written
FULL = {
    "robustbench:cifar10:Standard": (155, 36_479_194, "block1.layer.0.convShortcut.weight", (160, 16, 1, 1)),
    "robustbench:cifar10:Hendrycks2020AugMix_WRN": (
        227,
        2_243_546,
        "block3.layer.5.conv2.weight",
        (128, 128, 3, 3),
    ),
    "robustbench:cifar10:Hendrycks2020AugMix_ResNeXt": (
        188,
        6_807_882,
        "stage_3.2.conv_conv.weight",
        (512, 128, 3, 3),
    ),
    "robustbench:cifar100:Hendrycks2020AugMix_ResNeXt": (188, 6_900_132, "classifier.weight", (100, 1024)),
    "robustbench:cifar100:Hendrycks2020AugMix_WRN": (227, 2_255_156, "fc.weight", (100, 128)),
}


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_layout(name):
    n_keys, n_params, key, shape = FULL[name]
    with torch.device("meta"):
        model = zoo.ROBUSTBENCH[name].build()
    sd = model.state_dict()
    assert len(sd) == n_keys and sum(p.numel() for p in model.parameters()) == n_params
    assert tuple(sd[key].shape) == shape
    # normalisation is part of the definition, not of the checkpoint
    assert not any(k.startswith("normalize") or k in ("mu", "sigma") for k in sd)


def test_registry_normalisation_per_model():
    """Standard sees raw [0, 1] inputs; the AugMix models normalise with mean = std = 0.5."""
    for name, spec in zoo.ROBUSTBENCH.items():
        model = spec.build()  # full size, on the CPU (under a second)
        mean, std = model.normalize.mean.flatten().tolist(), model.normalize.std.flatten().tolist()
        if name == STANDARD:
            assert (mean, std) == ([0.0] * 3, [1.0] * 3)
        else:
            assert "AugMix" in name and (mean, std) == ([0.5] * 3, [0.5] * 3)


LAYOUTS = {
    "raw": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 200},
    "module": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "state_dict+module": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    "model": lambda sd: {f"model.{k}": v for k, v in sd.items()},
}


@pytest.mark.parametrize(
    ("name", "layout"),
    [(STANDARD, layout) for layout in LAYOUTS] + [(AUGMIX100, "raw"), (AUGMIX100, "state_dict+module")],
)
def test_checkpoint_layouts_load_and_normalise(name, layout, tmp_path, small_zoo):
    torch.manual_seed(0)
    src = randomise_bn(SMALL[name]())
    p = tmp_path / "ckpt.pt"
    torch.save(LAYOUTS[layout](src.state_dict()), p)
    model = zoo.load_model(name, path=p)
    assert not model.training
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        # the same weights without the model's normalisation, fed explicitly normalised inputs
        bare = SMALL[name]()
        bare.load_state_dict(src.state_dict())
        bare.normalize = Normalize((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        expected = bare.eval()(x if name == STANDARD else (x - 0.5) / 0.5)
    assert out.shape == (3, 10 if name == STANDARD else 100)
    torch.testing.assert_close(out, expected)
    if name != STANDARD:  # feeding [0, 1] inputs unnormalised gives different logits
        assert not torch.allclose(out, bare(x))


def test_mu_sigma_in_checkpoint_are_used(tmp_path, small_zoo):
    src = small_resnext()
    sd = dict(src.state_dict())
    sd["mu"], sd["sigma"] = torch.full((1, 3, 1, 1), 0.25), torch.full((1, 3, 1, 1), 0.3)
    p = tmp_path / "with_mu.pt"
    torch.save(sd, p)
    model = zoo.load_model(AUGMIX100, path=p)
    assert torch.allclose(model.normalize.mean, torch.tensor(0.25)) and torch.allclose(
        model.normalize.std, torch.tensor(0.3)
    )
    sd["sigma"] = torch.zeros(1, 3, 1, 1)
    torch.save(sd, p)
    with pytest.raises(ModelError, match="sigma must be positive"):
        zoo.load_model(AUGMIX100, path=p)


def test_wrong_architecture_truncated_and_unknown(tmp_path, small_zoo):
    p = tmp_path / "resnext.pt"
    torch.save(small_resnext().state_dict(), p)
    with pytest.raises(ModelError, match=r"weights do not fit WideResNet \(missing: conv1\.weight") as e:
        zoo.load_model(STANDARD, path=p)
    assert "unexpected: conv_1_3x3.weight" in str(e.value) and "\n" not in str(e.value)
    wide = tmp_path / "wide.pt"  # right names, wrong widths
    torch.save(WideResNet(depth=10, widen_factor=2).state_dict(), wide)
    with pytest.raises(ModelError, match=r"shape mismatch: block1\.layer\.0\.conv1\.weight"):
        zoo.load_model(STANDARD, path=wide)
    cifar100 = tmp_path / "c100.pt"  # right architecture, 100 classes
    torch.save(small_wrn(100).state_dict(), cifar100)
    with pytest.raises(ModelError, match=r"fc\.weight: file \(100, 64\) vs model \(10, 64\)"):
        zoo.load_model(STANDARD, path=cifar100)
    trunc = tmp_path / "trunc.pt"
    torch.save(small_wrn().state_dict(), trunc)
    trunc.write_bytes(trunc.read_bytes()[:2000])
    with pytest.raises(ModelError, match="cannot load weights"):
        zoo.load_model(STANDARD, path=trunc)
    with pytest.raises(ModelError, match="not found"):
        zoo.load_model(STANDARD, path=tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="unknown RobustBench model"):
        zoo.load_model("robustbench:cifar10:Nope", path=p)


def test_download_offline_fails_with_one_clear_error(isolated_cache, monkeypatch, small_zoo):
    monkeypatch.setattr(zoo, "GDRIVE_URL", "http://127.0.0.1:9/{id}")  # nothing listens there
    with pytest.raises(ModelError) as e:
        zoo.load_model(STANDARD)
    msg = str(e.value)
    assert msg.startswith(f"cannot download {STANDARD}") and "--model-path" in msg and "\n" not in msg
    assert str(isolated_cache / "robustbench" / "cifar10" / "corruptions" / "Standard.pt") in msg
    assert not list(isolated_cache.rglob("*.part"))  # nothing half-written left behind


def test_download_caches_and_rejects_web_pages(isolated_cache, tmp_path, small_zoo):
    spec = zoo.ROBUSTBENCH[STANDARD]
    html = tmp_path / "quota.html"
    html.write_text("<!DOCTYPE html><html>Google Drive - quota exceeded</html>")
    with pytest.raises(ModelError, match="web page instead of the file"):
        zoo.download_robustbench(spec, url=html.as_uri())
    src = randomise_bn(small_wrn())
    ckpt = tmp_path / "Standard.pt"
    torch.save({"state_dict": src.state_dict()}, ckpt)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[:3000])
    with pytest.raises(ModelError, match="is not a readable checkpoint"):
        zoo.download_robustbench(spec, url=cut.as_uri())
    assert not list(isolated_cache.rglob("*.pt*"))
    path = zoo.download_robustbench(spec, url=ckpt.as_uri())
    assert path == isolated_cache / "robustbench" / "cifar10" / "corruptions" / "Standard.pt"
    model = zoo.load_model(STANDARD)  # found in the cache, no download
    assert torch.equal(model.fc.weight, src.fc.weight)


def test_robustbench_default_model_dir_is_used(isolated_cache, tmp_path, small_zoo):
    src = small_resnext()
    local = tmp_path / "models" / "cifar100" / "corruptions" / "Hendrycks2020AugMix_ResNeXt.pt"
    local.parent.mkdir(parents=True)
    torch.save(src.state_dict(), local)
    model = zoo.load_model(AUGMIX100)
    assert torch.equal(model.classifier.weight, src.classifier.weight)


def test_model_info_and_served_model(tmp_path, small_zoo):
    from testtime.data.cifar import CIFAR100_CLASSES
    from testtime.serve import load_served_model

    assert zoo.model_info(AUGMIX100) == zoo.ModelInfo(AUGMIX100, "cifar100", 100, 32)
    assert zoo.model_info("torchvision:resnet50").input_size == 224
    with pytest.raises(ConfigError, match="unknown model"):
        zoo.model_info("nope")
    p = tmp_path / "m.pt"
    torch.save(small_resnext().state_dict(), p)
    _, label, shape, classes = load_served_model(AUGMIX100, str(p))
    assert shape == (3, 32, 32) and classes == CIFAR100_CLASSES and AUGMIX100 in label


def test_feature_methods_find_the_classifier(small_zoo):
    """Feature-space methods (T3A, SHOT, ...) find `fc` / `classifier` as the last nn.Linear."""
    from testtime.adapt.components.features import FeatureTap

    for model in (small_wrn(), small_resnext()):
        tap = FeatureTap(model.eval())
        feats, _ = tap(model, torch.rand(2, 3, 32, 32))
        assert feats.shape == (2, model.feature_dim) and tap.classifier is model.fc


# ----------------------------------------------------------------------------- ImageNet extra
HAS_TV = importlib.util.find_spec("torchvision") is not None
HAS_TIMM = importlib.util.find_spec("timm") is not None


@pytest.mark.skipif(HAS_TV, reason="torchvision is installed")
def test_torchvision_missing_names_the_extra():
    with pytest.raises(ConfigError, match=r"needs torchvision.*pip install 'testtime\[imagenet\]'"):
        zoo.load_model("torchvision:resnet50")


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed")
def test_timm_missing_names_the_extra():
    with pytest.raises(ConfigError, match=r"needs timm.*testtime\[imagenet\]"):
        zoo.load_model("timm:vit_base_patch16_224")


@pytest.mark.skipif(not HAS_TV, reason="torchvision not installed (optional extra testtime[imagenet])")
def test_torchvision_model_from_user_weights(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(num_classes=1000)
    p = tmp_path / "r18.pt"
    torch.save(net.state_dict(), p)
    model = zoo.load_model("torchvision:resnet18", path=p)
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert torch.allclose(model.normalize.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    with torch.no_grad():
        x = torch.rand(1, 3, 224, 224)
        torch.testing.assert_close(model(x), net.eval()(model.normalize(x)))
    with pytest.raises(ConfigError, match="unknown torchvision model"):
        zoo.load_model("torchvision:nope", path=p)


@pytest.mark.skipif(not HAS_TIMM, reason="timm not installed (optional extra testtime[imagenet])")
def test_timm_model_uses_its_pretrained_cfg_normalisation(tmp_path):
    import timm

    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    net = timm.create_model(name, pretrained=False)
    p = tmp_path / "vit.pt"
    torch.save(net.state_dict(), p)
    model = zoo.load_model(f"timm:{name}", path=p)
    assert model.normalize.mean.flatten().tolist() == pytest.approx(list(net.pretrained_cfg["mean"]))
    assert model.normalize.std.flatten().tolist() == pytest.approx(list(net.pretrained_cfg["std"]))


# ----------------------------------------------------------------------------- devices
def test_select_device():
    auto = select_device("auto")
    if torch.cuda.is_available():
        assert auto.type == "cuda"
    else:
        from testtime.device import mps_available

        assert auto.type == ("mps" if mps_available() else "cpu")
    assert select_device(None) == auto and select_device(" AUTO ") == auto
    assert select_device("cpu") == torch.device("cpu") == select_device(torch.device("cpu"))
    with pytest.raises(ConfigError, match="unknown device 'nope'"):
        select_device("nope")
    with pytest.raises(ConfigError, match="cuda:99"):
        select_device("cuda:99")
    from testtime.bench import experiment

    assert experiment.resolve_device is select_device


def test_cli_device_defaults_to_auto():
    from testtime.cli import build_parser

    p = build_parser()
    for argv in (["run"], ["bench"], ["serve"]):
        assert p.parse_args(argv).device == "auto"


def test_explicit_arch_wins_over_the_model_name(tmp_path):
    """`--model-path FILE --arch A` loads A's weights even where the dataset's default model is RobustBench's."""
    from testtime.models.resnet import CifarResNet

    p = tmp_path / "r20.pt"
    torch.save(zoo.build_model("resnet20").state_dict(), p)
    assert isinstance(zoo.load_model(AUGMIX100, path=p, arch="resnet20"), CifarResNet)
