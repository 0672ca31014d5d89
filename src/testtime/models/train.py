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


@dataclass
class TrainConfig:
    """Standard CIFAR recipe: SGD+Nesterov, cosine schedule with warm-up, crop+flip augmentation."""

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

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    model = build_model(cfg.arch).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, log = 0, []
    ckpt = out_dir / "checkpoint.pt"
    if ckpt.exists():
        try:
            state = torch.load(ckpt, weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            start_epoch, log = int(state["epoch"]), json.loads(state["log"])
        except Exception as e:  # unreadable, or another architecture's checkpoint
            from testtime.errors import ConfigError

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
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, epoch * spe + i, spe)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += float(loss.detach()) * len(yb)
            tot_wrong += int((logits.argmax(1) != yb).sum())
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
