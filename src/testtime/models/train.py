"""Source-model training on the CIFAR-10 training split (`testtime train-source`)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from testtime.precision import bf16_support, precision_record, resolve_amp
from testtime.utils import atomic_torch_save, env_info, seed_everything

OPTIMIZERS = ("sgd", "adamw")
MIXES = ("none", "mixup_cutmix")


@dataclass
class TrainConfig:
    """Training recipe. The defaults are the standard CIFAR ResNet recipe: SGD+Nesterov, cosine
    schedule with warm-up, crop+flip augmentation; `PRESETS` change them per architecture (the
    transformer recipe of `vit_tiny_p4`) and `config_for` applies a preset and explicit overrides.
    """

    arch: str = "resnet26"
    epochs: int = 60
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 2
    seed: int = 0
    # autocast matmuls/convs to bfloat16 where bf16 is fast on this CPU (AVX512-BF16/AMX and the
    # micro-benchmark of testtime.precision agreeing; about 2x faster there), float32 elsewhere (bf16
    # is ~10x slower on an AVX2-only CPU); False: float32 always
    bf16: bool = True
    threads: int = 0  # 0: leave torch's default
    eval_every: int = 5
    flip: bool = True  # horizontal flips (off for digits)
    pad: int = 4  # random-crop padding
    optimizer: str = "sgd"  # "sgd" (Nesterov, `momentum`) | "adamw" (betas 0.9/0.999, eps 1e-8)
    label_smoothing: float = 0.0  # of the cross-entropy target (hard or mixed)
    # "mixup_cutmix": DeiT's batch mixing (see `mix_batch`); "none": plain labels
    mix: str = "none"
    grad_clip: float = 0.0  # max global gradient norm; 0: no clipping


# Per-architecture recipes: TrainConfig fields that differ from the ResNet defaults above. Values
# and their sources (DeiT = Touvron et al. 2021, "Training data-efficient image transformers",
# Table 9 / its main.py; Lee et al. 2021 = "Vision Transformer for Small-Size Datasets", the
# CIFAR ViT recipe of github.com/aanna0701/SPT_LSA_ViT main.py):
#   optimizer adamw, weight_decay 0.05, label_smoothing 0.1, mixup 0.8 / CutMix 1.0 switched with
#     probability 0.5 on every batch: DeiT (Lee et al. use the same optimizer, decay and smoothing).
#   lr 1e-3 at batch 128: Lee et al. (AdamW, batch 128, lr 1e-3 for ViTs on CIFAR; also
#     omihub777/ViT-CIFAR: Adam 1e-3 at batch 128). DeiT's rule 5e-4 * batch/512 would give 1.25e-4,
#     tuned for 300 ImageNet epochs at batch 1024; the CIFAR recipes above train ~8x hotter.
#     Not rescaled automatically with --batch-size: pass --lr when changing the batch.
#   warmup_epochs 5: DeiT (Lee et al. use 10 of 100 epochs).
#   grad_clip 1.0: the original ViT (Dosovitskiy et al. 2021, clipping at global norm 1); DeiT does
#     not clip. A guard against AdamW's early loss spikes, costing one norm per step.
#   epochs 100: Lee et al.'s budget (DeiT trains 300 on ImageNet; CIFAR ViT recipes 100-200).
#     The shipped cifar10_vit took 41,752 s (11.6 h) for them on one CPU thread of this project's
#     machine (bf16 autocast, 361-607 s/epoch), resumed across sessions; 200 epochs would double it.
# Deviations from DeiT: no RandAugment, random erasing, repeated augmentation or stochastic depth
# (the augmentation is the ResNet's crop + flip, then the mixing); weight decay on every tensor
# with ndim > 1, so the ViT's position embedding is decayed (timm exempts it).
PRESETS: dict[str, dict[str, object]] = {
    "vit_tiny_p4": {
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.05,
        "warmup_epochs": 5,
        "label_smoothing": 0.1,
        "mix": "mixup_cutmix",
        "grad_clip": 1.0,
        "epochs": 100,
    },
}


def config_for(arch: str, **overrides: object) -> TrainConfig:
    """TrainConfig for `arch`: the dataclass defaults, then `PRESETS[arch]`, then every override
    that is not None (explicit settings always win)."""
    fields = {**PRESETS.get(arch, {}), **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(arch=arch, **fields)


def check_config(cfg: TrainConfig, flags: bool = False) -> None:
    """ConfigError for recipe values train_source cannot use (before anything is written); with
    `flags`, each value is named by its `train-source` flag (`--weight-decay`) instead of its field."""
    from testtime.errors import ConfigError

    def name(field: str) -> str:
        return "--" + field.replace("_", "-") if flags else field

    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"{name('optimizer')} must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}"
        )
    if cfg.mix not in MIXES:
        raise ConfigError(f"{name('mix')} must be one of {', '.join(MIXES)}, got {cfg.mix!r}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ConfigError(f"{name('label_smoothing')} must be in [0, 1), got {cfg.label_smoothing}")
    if not (cfg.grad_clip >= 0 and math.isfinite(cfg.grad_clip)):
        raise ConfigError(f"{name('grad_clip')} must be a finite number >= 0 (0: off), got {cfg.grad_clip}")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise ConfigError(f"{name('weight_decay')} must be a finite number >= 0, got {cfg.weight_decay}")


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip of a uint8 NHWC batch -> float NCHW in [0,1]."""
    n, h, w, _ = x.shape
    xp = F.pad(x.permute(0, 3, 1, 2), (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, 3, h, w + 2 * pad)
    xp = torch.gather(xp, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, 3, h, w)
    out = torch.gather(xp, 3, cols)
    if flip:
        flips = torch.rand(n, generator=gen) < 0.5
        out[flips] = out[flips].flip(3)
    return out.float().div_(255)


def mix_batch(
    x: torch.Tensor,
    gen: torch.Generator,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
) -> tuple[torch.Tensor, float]:
    """DeiT's mixing of a float NCHW batch with its reverse (timm `Mixup`, mode "batch", prob 1).

    Per batch, with probability `switch_prob` CutMix (Yun et al. 2019): a box of area about
    1 - lam, lam ~ Beta(cutmix_alpha, cutmix_alpha), centred uniformly and clipped at the border,
    is pasted from the reversed batch and lam is corrected to the kept area; otherwise mixup
    (Zhang et al. 2018): lam * x + (1 - lam) * x.flip(0), lam ~ Beta(mixup_alpha, mixup_alpha).
    Returns the mixed batch and lam; the target is `mix_targets(y, lam, classes)`. Every draw
    comes from `gen` (one seed for a numpy Generator, which has the Beta distribution), so the
    run's generator state alone makes an interrupted training resume identically.
    """
    rng = np.random.default_rng(int(torch.randint(0, 2**63 - 1, (1,), generator=gen)))
    if rng.random() < switch_prob:
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        out = x.clone()
        out[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        return out, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    lam = float(rng.beta(mixup_alpha, mixup_alpha))
    return x * lam + x.flip(0) * (1.0 - lam), lam


def mix_targets(y: torch.Tensor, lam: float, classes: int) -> torch.Tensor:
    """Soft targets of a `mix_batch` batch: lam on each image's label, 1 - lam on its partner's."""
    onehot = F.one_hot(y, classes).float()
    return onehot * lam + onehot.flip(0) * (1.0 - lam)


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC numpy -> float NCHW tensor in [0, 1], channels_last."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255)
    return t.contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 error (%) of `model` in eval mode on uint8 NHWC images."""
    model.eval()
    wrong = 0
    for i in range(0, len(y), batch_size):
        pred = model(to_tensor(x[i : i + batch_size])).argmax(1).numpy()
        wrong += int((pred != y[i : i + batch_size]).sum())
    return 100.0 * wrong / len(y)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _checkpoint_optimizer(state: dict) -> str | None:
    """The optimizer a training checkpoint was written by, from its param-group keys."""
    groups = state.get("opt", {}).get("param_groups") if isinstance(state.get("opt"), dict) else None
    if not groups:
        return None
    if "betas" in groups[0]:
        return "adamw"
    if "nesterov" in groups[0]:
        return "sgd"
    return None


def train_source(
    cfg: TrainConfig,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
    out_dir: str | Path,
    progress: bool = True,
    stop_after: int | None = None,
) -> nn.Module:
    """Train from scratch, checkpointing every epoch to `out_dir/checkpoint.pt`; resumes if present.

    `stop_after=k` ends after epoch k (as an interruption would), leaving the checkpoint to resume.
    """
    from testtime.models.zoo import build_model

    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    model = build_model(cfg.arch).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, log = 0, []
    ckpt = out_dir / "checkpoint.pt"
    if ckpt.exists():
        try:
            state = torch.load(ckpt, weights_only=True)
            saved = _checkpoint_optimizer(state)
            if saved is not None and saved != cfg.optimizer:
                from testtime.errors import ConfigError

                raise ConfigError(
                    f"{ckpt}: cannot resume from this checkpoint (it was trained with optimizer "
                    f"{saved!r}, this run uses {cfg.optimizer!r}); pass --optimizer {saved}, choose "
                    "another --out, or delete it to start over"
                )
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            start_epoch, log = int(state["epoch"]), json.loads(state["log"])
        except Exception as e:  # unreadable, or another architecture's checkpoint
            from testtime.errors import ConfigError

            if isinstance(e, ConfigError):
                raise
            raise ConfigError(
                f"{ckpt}: cannot resume from this checkpoint ({type(e).__name__}; e.g. another --arch); "
                "choose another --out, or delete it to start over"
            ) from e
        print(f"resumed from {ckpt} at epoch {start_epoch} of {cfg.epochs}", flush=True)
    use_bf16 = resolve_amp("auto" if cfg.bf16 else "off", "cpu")
    if cfg.bf16 and progress:
        print(f"precision: {'bf16' if use_bf16 else 'float32'} ({bf16_support('cpu').summary()})", flush=True)
    xtr = torch.from_numpy(train[0])
    ytr = torch.from_numpy(train[1].astype(np.int64))
    n = len(ytr)
    spe = n // cfg.batch_size
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after is not None and epoch >= stop_after:
            return model
        model.train()
        t0 = time.time()
        perm = torch.randperm(n, generator=gen)
        tot_loss, tot_wrong = 0.0, 0
        for i in range(spe):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb = augment(xtr[idx], gen, cfg.pad, cfg.flip).contiguous(memory_format=torch.channels_last)
            yb = ytr[idx]
            if cfg.mix == "mixup_cutmix":
                xb, lam = mix_batch(xb, gen)
                xb = xb.contiguous(memory_format=torch.channels_last)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, epoch * spe + i, spe)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(xb)
            if cfg.mix == "mixup_cutmix":
                target = mix_targets(yb, lam, logits.shape[1])
                loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
                ytrue = yb if lam >= 0.5 else yb.flip(0)  # the label of the larger part
            elif cfg.label_smoothing:
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
                ytrue = yb
            else:
                loss = F.cross_entropy(logits.float(), yb)
                ytrue = yb
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            tot_loss += float(loss.detach()) * len(yb)
            tot_wrong += int((logits.argmax(1) != ytrue).sum())
        rec = {
            "epoch": epoch + 1,
            "train_loss": tot_loss / (spe * cfg.batch_size),
            "train_error": 100.0 * tot_wrong / (spe * cfg.batch_size),
            "seconds": time.time() - t0,
        }
        if test is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            rec["test_error"] = evaluate(model, *test)
        log.append(rec)
        if progress:
            print(json.dumps(rec), flush=True)
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
                "epoch": epoch + 1,
                "log": json.dumps(log),
            },
            ckpt,
        )
    final = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(final, out_dir / f"{cfg.arch}.pt")
    meta = {
        "config": asdict(cfg),
        "precision": "bf16" if use_bf16 else "fp32",
        "bf16_detection": precision_record("cpu") if cfg.bf16 else None,
        "log": log,
        "env": env_info(),
    }
    (out_dir / "train_log.json").write_text(json.dumps(meta, indent=2))
    return model
