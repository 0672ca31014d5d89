"""The adapted-model wrapper every method builds on."""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from testtime.adapt.components.compile import compile_forward
from testtime.adapt.components.guard import CollapseGuard
from testtime.adapt.components.norm_types import NormSupport, check_norm_support, guard_groupnorm
from testtime.adapt.config import MethodConfig
from testtime.errors import DataError, ModelError
from testtime.precision import effective_precision, resolve_amp
from testtime.utils import atomic_torch_save

SourceData = tuple[torch.Tensor, torch.Tensor]
log = logging.getLogger("testtime")


# the range that images scaled to [0, 1] stay within (input_range="unit"); see image_range_problem
UNIT_RANGE: tuple[float, float] = (-0.5, 1.5)


def image_range_problem(lo: float, hi: float) -> str | None:
    """Why finite values spanning [lo, hi] are not images scaled to [0, 1]; None if they may be.

    The accepted range is [-0.5, 1.5], not [0, 1] itself: images in [0, 1] stay within it after
    resampling overshoot (bicubic / Lanczos resizing) or additive noise, while 0..255 pixel values
    leave it unless every pixel of the batch is below 1.5 grey levels (a black batch, for which
    both readings agree), and mean/std-normalised images go below -0.5 (CIFAR or ImageNet
    statistics map a black pixel to about -2).
    """
    if UNIT_RANGE[0] <= lo and hi <= UNIT_RANGE[1]:
        return None
    span = f"values in [{lo:.4g}, {hi:.4g}], outside the image range [0, 1] (accepted: [-0.5, 1.5])"
    if lo >= UNIT_RANGE[0] and hi <= 255 + UNIT_RANGE[1]:
        why = "this looks like 0..255 pixel values: divide by 255"
    elif lo < UNIT_RANGE[0] and hi <= 20:
        why = (
            "this looks like mean/std-normalised images: pass the images in [0, 1] "
            "(testtime's models normalise them themselves)"
        )
    else:
        why = "scale the images to [0, 1]"
    return f"{span}; {why} (if your own model takes such inputs, set the option input_range=any)"


def as_source_data(data: Any, input_range: str = "unit") -> SourceData | None:
    """Normalise source samples to (float NCHW in [0, 1], int64 labels); accepts an ImageSet too.

    With `input_range="unit"` float images outside [-0.5, 1.5] are refused (`image_range_problem`).
    """
    if data is None:
        return None
    if hasattr(data, "x") and hasattr(data, "y"):  # testtime.data.cifar.ImageSet (uint8 NHWC)
        x = torch.from_numpy(data.x).permute(0, 3, 1, 2).float().div(255)
        return x.contiguous(memory_format=torch.channels_last), torch.as_tensor(data.y, dtype=torch.long)
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise DataError("source_data must be (images, labels) tensors or an ImageSet")
    x, y = data
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 4):
        raise DataError("source_data images must be a float tensor (N, C, H, W) in [0, 1]")
    y = torch.as_tensor(y, dtype=torch.long)
    if y.dim() != 1 or len(y) != len(x) or len(x) == 0:
        raise DataError(
            f"source_data needs one label per image, got {len(x)} images and {tuple(y.shape)} labels"
        )
    if not bool(torch.isfinite(x).all()):
        raise DataError("source_data images contain NaN or Inf values")
    if input_range == "unit":
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        problem = image_range_problem(lo, hi)
        if problem:
            raise DataError(f"source_data images have {problem}")
    if bool((y < 0).any()):
        raise DataError("source_data labels must be class indices >= 0")
    return x, y


def first_conv_in_channels(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


class AdaptedModel(nn.Module):
    """A classifier wrapped by a test-time method.

    Calling it on a batch returns logits and (for adapting methods) updates its state;
    `reset()` restores the state it had when wrapped, bit for bit. Subclasses implement
    `setup()` (prepare the model: norm policy, trainable parameters, optimiser, teacher, ...)
    and `step(x)` (predict and adapt on one batch).
    """

    name: ClassVar[str] = "base"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    paper: ClassVar[str] = ""
    min_batch_size: ClassVar[int] = 1  # smallest batch the method can work with
    batch_limitation: ClassVar[str] = ""  # why, when min_batch_size > 1
    MAX_ABS_INPUT: ClassVar[float] = 1e6  # larger input magnitudes are rejected as malformed
    # labelled source (training) images the paper's own setting gives the method; `--suite paper`
    # passes that many (0: none, or the runner's default for methods that require some)
    paper_source_samples: ClassVar[int] = 0
    # False: with the default configuration nothing but the random generator carries over from one
    # batch to the next (no adapted weights, statistics, memory or teacher), so reset_each_shift is
    # the same experiment as continual (identical, up to the random draws a reset replays);
    # `--suite paper` runs such a method once
    keeps_state: ClassVar[bool] = True
    # what adapts on BatchNorm / GroupNorm / LayerNorm layers, and which kinds the method refuses
    # (checked when the method is constructed; see components/norm_types.py); None: not stated
    norm_support: ClassVar[NormSupport | None] = None

    def __init__(
        self, model: nn.Module, config: MethodConfig | None = None, source_data: SourceData | None = None
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
        config = config if config is not None else self.Config()
        if not isinstance(config, self.Config):
            raise ModelError(f"{self.name} expects a {self.Config.__name__}, got {type(config).__name__}")
        config.validate()
        check_norm_support(model, self.name, self.norm_support)  # early: before anything is prepared
        guard_groupnorm(model)
        self.config = config
        self.model = model
        # labelled source (training) samples for methods that use them (CAFA stats, RMT warm-up, ...),
        # kept on the model's device (and moved with this module by `.to()`)
        self.source_data = as_source_data(source_data, config.input_range)
        devices = {t.device for t in (*model.parameters(), *model.buffers())} or {torch.device("cpu")}
        device = next(iter(devices)) if len(devices) == 1 else None  # None: a model split over devices
        if self.source_data is not None and device is not None:
            self.source_data = (self.source_data[0].to(device), self.source_data[1].to(device))
        self.in_channels = first_conv_in_channels(model)
        if self.source_data is not None and self.in_channels not in (None, self.source_data[0].shape[1]):
            raise DataError(
                f"source_data images have {self.source_data[0].shape[1]} channels, "
                f"the model expects {self.in_channels}"
            )
        self.optimizer: torch.optim.Optimizer | None = None
        # the method's random source; its state is part of state_dict() and of reset()
        self.rng = torch.Generator().manual_seed(config.seed)
        self.register_buffer("n_batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("n_images", torch.zeros((), dtype=torch.long))
        self.register_buffer("n_forward", torch.zeros((), dtype=torch.long))  # image-forward passes
        self.register_buffer("n_backward", torch.zeros((), dtype=torch.long))  # image-backward passes
        self.register_buffer("n_skipped", torch.zeros((), dtype=torch.long))  # non-finite updates skipped
        self.register_buffer("n_restores", torch.zeros((), dtype=torch.long))  # collapse-guard restores
        self.model.eval()
        # the collapse guard's reference: the frozen source model (not a submodule: not in state_dict)
        self._reference: nn.Module | None = None
        self.guard: CollapseGuard | None = None
        self.guard_events: list[dict[str, Any]] = []  # restores of this object's lifetime (not persisted)
        self._good: list[dict[str, Any]] = []  # healthy snapshots for guard_restore="last_good"
        if config.guard:
            object.__setattr__(self, "_reference", copy.deepcopy(model).eval())
            self.guard = CollapseGuard(
                config.guard_window,
                config.guard_max_class_fraction,
                config.guard_min_diversity,
                config.guard_min_entropy,
                config.guard_entropy_momentum,
            )
        self.setup()
        self._count_hooks = [
            net.register_forward_pre_hook(self._count_forward) for net in self.counted_networks()
        ]
        for net in self.counted_networks():
            compile_forward(net, config.compile)  # no-op for compile="off"
        if device is not None:  # state made by the base and by setup() lives where the model does
            self.to(device)
        self._snapshot = self._capture()

    # ----------------------------------------------------------------- to implement
    def setup(self) -> None:
        """Prepare the wrapped model (called once, before the source snapshot is taken)."""

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Predict (and adapt on) one validated batch; return logits."""
        raise NotImplementedError

    def counted_networks(self) -> list[nn.Module]:
        """Networks whose forward passes count towards `n_forward` (model, teacher, anchor...)."""
        return [self.model]

    def reset_extra(self) -> None:
        """Restore state not held in tensors registered on this module (override if any)."""

    # ----------------------------------------------------------------- framework
    def get_extra_state(self) -> dict[str, Any]:
        """State not held in registered tensors: method name, RNG and optimiser state."""
        return {
            "method": self.name,
            "rng": self.rng.get_state(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            # deep copy: optimisers update their state in place, the source must stay untouched
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a state saved by `state_dict()` of the same method (and configuration).

        Raises ModelError, before anything is changed, when the state is not a state dict, comes
        from another method, or (with `strict`) its keys do not match; a state that fails while
        loading (shapes, optimiser groups) raises ModelError after the previous state is restored.
        """
        if not isinstance(state_dict, Mapping):
            raise ModelError(f"{self.name}: expected a state dict, got {type(state_dict).__name__}")
        extra = state_dict.get("_extra_state")
        saved = extra.get("method") if isinstance(extra, Mapping) else None
        if saved is not None and saved != self.name:
            raise ModelError(f"cannot load the state of method {saved!r} into {self.name!r}")
        if strict:
            own = set(self.state_dict())
            missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
            if missing or unexpected:
                raise ModelError(
                    f"{self.name}: state dict does not fit this method/configuration "
                    f"(missing: {', '.join(missing[:5]) or '-'}; unexpected: {', '.join(unexpected[:5]) or '-'})"
                )
        backup = self._capture()  # a load that fails halfway must not leave a mixed state
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            super().load_state_dict(backup["module"])
            if self.optimizer is not None:
                self.optimizer.state.clear()
                self.optimizer.load_state_dict(backup["optimizer"])
            first = str(e).strip().splitlines()[:2]
            raise ModelError(f"{self.name}: cannot load state dict ({' '.join(first)})") from e

    def save_state(self, path: str | os.PathLike) -> None:
        """Write `state_dict()` (the whole adaptation state) with its sha256 to `path` atomically.

        The file (see `testtime.adapt.state_file`) holds plain data only and loads with
        `torch.load(..., weights_only=True)`; `load_state` checks the checksum before using it.
        """
        from testtime.adapt.state_file import pack_state

        atomic_torch_save(pack_state(self.state_dict(), self.name), path)

    def load_state(self, path: str | os.PathLike) -> None:
        """Resume from a file written by `save_state` (read with `weights_only=True`).

        Raises ModelError, with the state left as it was, when the file is missing, unreadable
        (truncated, not a torch file, or holding anything but plain data), fails its checksum
        (damaged data), holds implausible values (NaN/Inf weights or optimiser moments, counters
        that are not non-negative integers), or holds the state of another method or configuration.
        """
        from testtime.adapt.state_file import check_state_values, read_state_file

        path = Path(path)
        state = read_state_file(path)
        nets = {id(n) for n in self.counted_networks()}
        prefixes = [f"{name}." for name, m in self.named_modules() if name and id(m) in nets]
        prefixes += [name for name, _ in self.named_parameters()]
        extra = state.get("_extra_state")
        saved = extra.get("method") if isinstance(extra, Mapping) else None
        if saved is None or saved == self.name:  # another method's state: load_state_dict says so
            check_state_values(state, self.COUNTERS, prefixes, path)
        self.load_state_dict(state)

    def _count_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            self.n_forward += args[0].shape[0]

    def _capture(self) -> dict[str, Any]:
        return {
            "module": copy.deepcopy(self.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None,
        }

    COUNTERS: ClassVar[tuple[str, ...]] = (
        "n_batches", "n_images", "n_forward", "n_backward", "n_skipped", "n_restores",
    )  # fmt: skip

    def reset(self) -> None:
        """Restore the source state (weights, statistics, optimiser, teacher, memory) exactly.

        Usage counters (batches, images, passes, restores) keep counting across resets.
        """
        self._load_snapshot(self._snapshot)
        self.reset_extra()

    def reset_counters(self) -> None:
        """Zero the usage counters (batches, images, passes, skipped updates, restores) and the
        run-time pass tallies some methods keep for `minimal_passes()`."""
        for k in self.COUNTERS:
            getattr(self, k).zero_()
        tally = self.__dict__.get("tally")
        if tally is not None:
            tally.clear()

    def bookkeeping_keys(self) -> tuple[str, ...]:
        """State-dict keys of the usage counters: the base ones (`COUNTERS`) plus any a method adds
        (e.g. `auto`'s shift-detector tallies). They keep counting across `reset()` and the
        collapse guard's restores, and are left out of "same state" comparisons."""
        return self.COUNTERS

    def _load_snapshot(self, snapshot: dict[str, Any]) -> None:
        kept = {k: self.get_buffer(k).clone() for k in self.bookkeeping_keys()}
        self.load_state_dict(snapshot["module"])
        for k, v in kept.items():
            self.get_buffer(k).copy_(v)
        if self.optimizer is not None:
            self.optimizer.state.clear()
            self.optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))

    def _guard_step(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Watch this batch's predictions; on a confirmed collapse restore and answer with the source."""
        assert self.guard is not None and self._reference is not None
        cfg, batch = self.config, int(self.n_batches) + 1
        if cfg.guard_reset_every and batch % cfg.guard_reset_every == 0:
            self._restore("source", f"periodic reset every {cfg.guard_reset_every} batches", batch)
            return logits
        reason = self.guard.observe(logits)
        if reason is None:
            if cfg.guard_restore == "last_good" and batch % cfg.guard_snapshot_every == 0:
                self._good = [*self._good[-1:], self._capture()]
            return logits
        with torch.no_grad():
            reference = self._reference(x)
        self.n_forward += x.shape[0]
        if not self.guard.confirms(logits, reference):
            return logits
        self._restore(cfg.guard_restore, reason, batch)
        return reference

    def _restore(self, target: str, reason: str, batch: int) -> None:
        assert self.guard is not None
        if target == "last_good" and self._good:
            self._load_snapshot(self._good[0])  # the older one: the newer may already be drifting
            self._good = self._good[:1]
        else:
            target = "source"
            self.reset()
            self._good = []
        self.guard.clear()
        self.n_restores += 1
        self.guard_events.append({"batch": batch, "reason": reason, "restored": target})
        log.warning(
            "%s: collapse guard at batch %d: %s; restored the %s state", self.name, batch, reason, target
        )

    def _apply(self, fn: Any, recurse: bool = True) -> AdaptedModel:
        super()._apply(fn, recurse)
        if self._reference is not None:
            self._reference._apply(fn, recurse)
        if self.source_data is not None:  # a plain attribute, not a buffer: moved here
            self.source_data = (fn(self.source_data[0]), fn(self.source_data[1]))
        if self.optimizer is not None:  # its parameters moved in place; their moments follow
            for state in self.optimizer.state.values():
                for k, v in state.items():
                    if torch.is_tensor(v) and v.dim() > 0:  # not the scalar step counts
                        state[k] = fn(v)
        return self

    def train(self, mode: bool = True) -> AdaptedModel:
        """Adaptation behaviour does not depend on train/eval mode; the wrapped model stays in eval."""
        super().train(mode)
        self.model.eval()
        return self

    def check_input(self, x: Any) -> torch.Tensor:
        """Validate a batch before any state is touched; raise DataError naming the problem."""
        if not isinstance(x, torch.Tensor):
            raise DataError(f"{self.name}: expected a torch.Tensor batch, got {type(x).__name__}")
        if not x.is_floating_point():
            raise DataError(
                f"{self.name}: expected a floating-point batch (images scaled to [0, 1]), got {x.dtype}"
            )
        if x.dim() != 4:
            raise DataError(f"{self.name}: expected a 4-D batch (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise DataError(f"{self.name}: empty batch")
        if x.numel() == 0:
            raise DataError(f"{self.name}: batch has a zero-size dimension, shape {tuple(x.shape)}")
        ref = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        if ref is not None and x.device != ref.device:
            raise DataError(f"{self.name}: batch is on device {x.device}, the model on {ref.device}")
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            raise DataError(
                f"{self.name}: model expects {self.in_channels} channels, batch has shape {tuple(x.shape)}"
            )
        if x.shape[0] < self.min_batch_size:
            raise DataError(
                f"{self.name} needs batches of at least {self.min_batch_size} samples "
                f"({self.batch_limitation}); got {x.shape[0]}"
            )
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))  # NaN propagates through both
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise DataError(f"{self.name}: batch contains NaN or Inf values")
        peak = max(-lo, hi)
        if peak > self.MAX_ABS_INPUT:
            # such values overflow float32 batch statistics and would corrupt the adapted state
            raise DataError(
                f"{self.name}: batch has values up to {peak:.3g}, far outside the image range [0, 1] "
                f"(limit +-{self.MAX_ABS_INPUT:g})"
            )
        if self.config.input_range == "unit":  # the common preprocessing mistakes: 0..255, normalised
            problem = image_range_problem(lo, hi)
            if problem:
                raise DataError(f"{self.name}: batch has {problem}")
        if ref is not None and x.dtype != ref.dtype:
            x = x.to(ref.dtype)  # e.g. float64 or float16 images to the model's precision
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.check_input(x)
        x = x.contiguous(memory_format=torch.channels_last)
        # amp=bf16 runs float32 (with a warning, once) where bf16 is slow; see testtime.precision
        amp = resolve_amp(self.config.amp, x.device, f"{self.name}: amp")
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = self.step(x)
            if self.guard is not None:
                logits = self._guard_step(x, logits)
        logits = logits.float()
        self.n_batches += 1
        self.n_images += x.shape[0]
        return logits.detach()

    # ----------------------------------------------------------------- helpers for methods
    def backward_and_step(self, loss: torch.Tensor, n_images: int) -> bool:
        """Backpropagate `loss` and take an optimiser step unless loss or gradients are non-finite.

        Returns whether the update was applied; skipped updates leave weights unchanged.
        """
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(float(loss.detach())):
            self.n_skipped += 1
            return False
        loss.backward()
        self.n_backward += n_images
        if not self.grads_finite():
            self.optimizer.zero_grad(set_to_none=True)
            self.n_skipped += 1
            return False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def grads_finite(self) -> bool:
        assert self.optimizer is not None
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        return bool(torch.isfinite(torch.stack([g.detach().abs().sum() for g in grads])).all())

    @contextmanager
    def no_count(self) -> Iterator[None]:
        """Forward passes inside are not counted (e.g. an evaluation-only pass)."""
        before = self.n_forward.clone()
        try:
            yield
        finally:
            self.n_forward.copy_(before)

    def counters(self) -> dict[str, int]:
        return {
            "batches": int(self.n_batches),
            "images": int(self.n_images),
            "forward_images": int(self.n_forward),
            "backward_images": int(self.n_backward),
            "skipped_updates": int(self.n_skipped),
            "restores": int(self.n_restores),
        }

    def describe(self) -> dict[str, Any]:
        """Method name, config and adapted-parameter count, for results files."""
        n_adapted = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        device = next(self.model.parameters(), torch.zeros(())).device
        return {
            "method": self.name,
            "config": asdict(self.config),
            "adapted_params": n_adapted,
            "precision": effective_precision(self.config.amp, device),  # fp32 | bf16, as run
        }
