"""Per-architecture training recipes of `train-source`: the ViT preset (AdamW, label smoothing,
mixup/CutMix, gradient clipping), explicit overrides, exact resumption, and the ResNet default."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from testtime.cli import main
from testtime.errors import ConfigError
from testtime.models.train import (
    PRESETS,
    TrainConfig,
    config_for,
    mix_batch,
    mix_targets,
    train_source,
)


def _data(n: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g).numpy()
    return x, (np.arange(n) % 10).astype(np.int64)


def _npz(tmp_path) -> str:
    x, y = _data(16)
    path = tmp_path / "cifar10_tiny.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    return str(path)


def _opt_groups(out_dir) -> list[dict]:
    return torch.load(out_dir / "checkpoint.pt", weights_only=True)["opt"]["param_groups"]


# --------------------------------------------------------------------------- the ResNet default


def test_default_config_is_todays_resnet_recipe():
    today = {
        "arch": "resnet26",
        "epochs": 60,
        "batch_size": 128,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "warmup_epochs": 2,
        "seed": 0,
        "bf16": True,
        "threads": 0,
        "eval_every": 5,
        "flip": True,
        "pad": 4,
    }
    cfg = dataclasses.asdict(TrainConfig())
    assert {k: cfg[k] for k in today} == today
    # the new fields default to "off", so nothing of the ResNet recipe changes
    assert {k: v for k, v in cfg.items() if k not in today} == {
        "optimizer": "sgd",
        "label_smoothing": 0.0,
        "mix": "none",
        "grad_clip": 0.0,
    }
    # no preset for the ResNets: config_for gives the dataclass defaults
    assert "resnet26" not in PRESETS and "resnet26_gn" not in PRESETS
    assert config_for("resnet26") == TrainConfig()
    assert config_for("resnet26_gn", epochs=None, lr=None) == TrainConfig(arch="resnet26_gn")


def test_default_training_takes_the_sgd_path(tmp_path):
    x, y = _data(8)
    cfg = TrainConfig(arch="resnet20", epochs=1, batch_size=8, warmup_epochs=1, bf16=False, eval_every=1)
    train_source(cfg, (x, y), None, tmp_path, progress=False)
    groups = _opt_groups(tmp_path)
    assert all(g["nesterov"] and g["momentum"] == 0.9 and "betas" not in g for g in groups)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["config"]["optimizer"] == "sgd" and log["config"]["mix"] == "none"


# --------------------------------------------------------------------------- presets and overrides


def test_vit_preset_is_applied_and_explicit_values_win():
    cfg = config_for("vit_tiny_p4")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.warmup_epochs) == ("adamw", 1e-3, 0.05, 5)
    assert (cfg.label_smoothing, cfg.mix, cfg.grad_clip, cfg.epochs) == (0.1, "mixup_cutmix", 1.0, 100)
    assert cfg.batch_size == TrainConfig.batch_size  # not in the preset: the default
    over = config_for("vit_tiny_p4", lr=3e-4, optimizer="sgd", mix="none", grad_clip=0.0, epochs=7)
    assert (over.lr, over.optimizer, over.mix, over.grad_clip, over.epochs) == (3e-4, "sgd", "none", 0.0, 7)
    assert (over.weight_decay, over.label_smoothing) == (0.05, 0.1)  # the rest still from the preset
    # an explicit 0 is a value, not "unset"
    assert config_for("vit_tiny_p4", label_smoothing=0.0).label_smoothing == 0.0


def test_train_source_help_states_the_presets(capsys):
    with pytest.raises(SystemExit):
        main(["train-source", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    p = PRESETS["vit_tiny_p4"]
    for flag, key in [
        ("--epochs", "epochs"),
        ("--lr", "lr"),
        ("--optimizer", "optimizer"),
        ("--weight-decay", "weight_decay"),
        ("--label-smoothing", "label_smoothing"),
        ("--mix", "mix"),
        ("--grad-clip", "grad_clip"),
    ]:
        helptext = text.split(f" {flag} ")[-1].split(" --")[0]
        stated = re.search(r"default: (\S+) for vit_tiny_p4", helptext)
        assert stated, (flag, helptext)
        value = stated.group(1)
        assert (value if isinstance(p[key], str) else float(value)) == p[key], (flag, value)


@pytest.mark.parametrize(
    ("arch", "flags", "want"),
    [
        ("vit_tiny_p4", [], {"optimizer": "adamw", "lr": 1e-3, "mix": "mixup_cutmix", "weight_decay": 0.05}),
        (
            "vit_tiny_p4",
            ["--lr", "5e-4", "--mix", "none", "--weight-decay", "0.1", "--grad-clip", "0"],
            {"optimizer": "adamw", "lr": 5e-4, "mix": "none", "weight_decay": 0.1, "grad_clip": 0.0},
        ),
        ("resnet20", [], {"optimizer": "sgd", "lr": 0.1, "mix": "none", "label_smoothing": 0.0}),
        (
            "resnet20",
            ["--optimizer", "adamw", "--label-smoothing", "0.2"],
            {"optimizer": "adamw", "lr": 0.1, "label_smoothing": 0.2, "weight_decay": 5e-4},
        ),
    ],
)
def test_cli_uses_the_preset_and_explicit_flags_override_it(tmp_path, arch, flags, want):
    out = tmp_path / "out"
    argv = ["train-source", "--arch", arch, "--data", _npz(tmp_path), "--epochs", "1", "-b", "8"]
    assert main([*argv, "--no-bf16", "--threads", "1", *flags, "--out", str(out)]) == 0
    config = json.loads((out / "train_log.json").read_text())["config"]
    assert {k: config[k] for k in want} == want
    if "--epochs" not in flags:
        assert config["epochs"] == 1
    groups = _opt_groups(out)
    assert ("betas" in groups[0]) == (want["optimizer"] == "adamw")
    assert [g["weight_decay"] for g in groups] == [want.get("weight_decay", config["weight_decay"]), 0.0]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--optimizer", "adam"], "--optimizer must be one of sgd, adamw, got 'adam'"),
        (["--mix", "cutmix"], "--mix must be one of none, mixup_cutmix, got 'cutmix'"),
        (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
        (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0"),
        (["--label-smoothing", "1"], r"--label-smoothing must be in \[0, 1\)"),
        (["--label-smoothing", "nan"], r"--label-smoothing must be in \[0, 1\)"),
        (["--grad-clip", "-1"], "--grad-clip must be a finite number >= 0"),
        (["--lr", "0", "--arch", "vit_tiny_p4"], "--lr must be a positive number"),
        (["--epochs", "0", "--arch", "vit_tiny_p4"], "--epochs must be >= 1"),
    ],
)
def test_cli_refuses_bad_recipe_values_first(tmp_path, argv, match, capsys):
    out = tmp_path / "out"
    assert main(["train-source", *argv, "--data", str(tmp_path / "missing.npz"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("testtime: error:"), err
    assert re.search(match, err[-1]), err[-1]
    assert not out.exists()


def test_train_source_refuses_bad_config_values(tmp_path):
    x, y = _data(8)
    for bad in ({"optimizer": "adam"}, {"mix": "cutmix"}, {"label_smoothing": 1.5}, {"grad_clip": -1.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            train_source(
                TrainConfig(arch="resnet20", epochs=1, batch_size=8, **bad), (x, y), None, tmp_path / "o"
            )
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- mixup / CutMix


def _constant_images(n: int = 6) -> torch.Tensor:
    """Image k is filled with the value k, so every output pixel tells which images it mixes."""
    return torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 32, 32).clone()


def test_cutmix_pastes_a_box_from_the_reversed_batch_and_lam_is_its_kept_area():
    x = _constant_images()
    seen = set()
    for seed in range(20):
        out, lam = mix_batch(x, torch.Generator().manual_seed(seed), switch_prob=1.0)
        n = len(x)
        for k in range(n):
            own = (out[k] == k).float().mean().item()
            other = (out[k] == n - 1 - k).float().mean().item()
            assert own + other == 1.0  # every pixel is the image's own or its partner's
            assert own == pytest.approx(lam, abs=1e-6)  # lam is the kept area, as in timm (correct_lam)
        seen.add(round(lam, 6))
        assert 0.0 <= lam <= 1.0
    assert len(seen) > 10  # lam varies with the draw


def test_mixup_blends_with_the_reversed_batch():
    x = _constant_images()
    for seed in range(10):
        out, lam = mix_batch(x, torch.Generator().manual_seed(seed), switch_prob=0.0)
        n = len(x)
        want = lam * torch.arange(n) + (1 - lam) * torch.arange(n).flip(0)
        assert torch.allclose(out[:, 0, 0, 0], want.float(), atol=1e-6)
        assert torch.equal(out, out[:, :1, :1, :1].expand_as(out))  # whole-image blend, no box


def test_mixed_targets_carry_the_right_mass():
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    t = mix_targets(y, 0.3, 10)
    assert torch.allclose(t.sum(1), torch.ones(8))
    assert torch.allclose(t[torch.arange(8), y], torch.full((8,), 0.3))
    assert torch.allclose(t[torch.arange(8), y.flip(0)], torch.full((8,), 0.7))
    # an image mixed with one of its own class keeps all the mass on that class
    assert torch.allclose(mix_targets(torch.tensor([3, 5, 3]), 0.4, 10)[1, 5], torch.tensor(1.0))
    # torch's label smoothing on these soft targets is timm's mixup_target(smoothing=0.1) + soft CE
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    off, on = 0.1 / 10, 1 - 0.1 + 0.1 / 10
    smooth = F.one_hot(y, 10).float() * (on - off) + off
    timm = 0.3 * smooth + 0.7 * smooth.flip(0)
    ref = (-timm * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(F.cross_entropy(logits, t, label_smoothing=0.1), ref, atol=1e-6)


def test_mixing_is_deterministic_per_seed_and_uses_both_kinds():
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(5)
        runs.append([mix_batch(x, g) for _ in range(30)])
    for (a, la), (b, lb) in zip(*runs):
        assert la == lb and torch.equal(a, b)
    assert mix_batch(x, torch.Generator().manual_seed(6))[1] != runs[0][0][1]  # another seed, another lam
    # DeiT switches between the two with probability 0.5: in 30 batches both occur
    pixels_from_partner = [((a == x.flip(0)) & (a != x)).float().mean().item() for a, _ in runs[0]]
    cutmix = sum(p > 0 for p in pixels_from_partner)  # CutMix copies pixels exactly; mixup blends
    assert 5 <= cutmix <= 25, cutmix


# --------------------------------------------------------------------------- training with the recipe


def test_vit_recipe_resumes_bit_identically(tmp_path):
    x, y = _data(16)
    cfg = config_for("vit_tiny_p4", epochs=3, batch_size=8, warmup_epochs=1, bf16=False, eval_every=1)
    assert (cfg.optimizer, cfg.mix, cfg.grad_clip, cfg.label_smoothing) == ("adamw", "mixup_cutmix", 1.0, 0.1)
    a = train_source(cfg, (x, y), None, tmp_path / "a", progress=False)
    train_source(cfg, (x, y), None, tmp_path / "b", progress=False, stop_after=1)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    b = train_source(cfg, (x, y), None, tmp_path / "b", progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    groups = _opt_groups(tmp_path / "a")
    assert "betas" in groups[0] and [g["weight_decay"] for g in groups] == [0.05, 0.0]
    la = json.loads((tmp_path / "a" / "train_log.json").read_text())
    lb = json.loads((tmp_path / "b" / "train_log.json").read_text())
    assert [r["train_loss"] for r in la["log"]] == [r["train_loss"] for r in lb["log"]]
    assert all(math.isfinite(r["train_loss"]) for r in la["log"])
    assert la["config"] == dataclasses.asdict(cfg)  # the recipe used is on record


def test_grad_clip_bounds_the_update(tmp_path):
    """With SGD (no momentum history after one step) the first update is lr * clipped gradient."""
    x, y = _data(8)
    base = {"arch": "resnet20", "epochs": 1, "batch_size": 8, "warmup_epochs": 0, "bf16": False}
    base |= {"weight_decay": 0.0, "lr": 1.0}
    moved = {}
    for clip in (0.0, 1e-3):
        torch.manual_seed(0)
        init = {k: v.clone() for k, v in _init_state("resnet20").items()}
        m = train_source(
            TrainConfig(**base, grad_clip=clip), (x, y), None, tmp_path / str(clip), progress=False
        )
        delta = [m.state_dict()[k] - init[k] for k, _ in m.named_parameters()]
        moved[clip] = torch.sqrt(sum((d.float() ** 2).sum() for d in delta)).item()
    # the Nesterov step is lr * (1 + momentum) * g on the first step: norm <= 1.9 * clip
    assert moved[1e-3] <= 1.9e-3 * 1.001
    assert moved[0.0] > 10 * moved[1e-3]


def _init_state(arch: str) -> dict[str, torch.Tensor]:
    from testtime.models.zoo import build_model
    from testtime.utils import seed_everything

    seed_everything(0)
    return build_model(arch).state_dict()


@pytest.mark.parametrize(("first", "then"), [("sgd", "adamw"), ("adamw", "sgd")])
def test_resuming_with_another_optimizer_is_refused(tmp_path, first, then):
    x, y = _data(8)
    cfg = TrainConfig(arch="resnet20", epochs=2, batch_size=8, warmup_epochs=1, bf16=False, optimizer=first)
    train_source(cfg, (x, y), None, tmp_path, progress=False, stop_after=1)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match=f"cannot resume from this checkpoint.*optimizer '{first}'"):
        train_source(dataclasses.replace(cfg, optimizer=then), (x, y), None, tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # nothing overwritten
    # the same optimizer resumes
    train_source(cfg, (x, y), None, tmp_path, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2
