"""Method configuration: plain dataclasses with paper defaults, overridable by keyword or CLI string."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from testtime.adapt.components.compile import compile_backends
from testtime.errors import ConfigError
from testtime.precision import AMP_VALUES

C = TypeVar("C")


@dataclass
class MethodConfig:
    """Fields every method accepts."""

    seed: int = 0  # for methods with randomness (augmentation, restoration, shuffling)
    # collapse guard (testtime.adapt.components.guard); off for methods without adapted state
    guard: bool = True
    guard_window: int = 1000  # predictions in the class-histogram window
    guard_max_class_fraction: float = 0.9  # alarm: one class above this share of the window
    guard_min_diversity: float = 0.5  # alarm: class-histogram entropy / ln C of the window below this
    guard_min_entropy: float = 0.02  # alarm: average of mean entropy / ln C below this
    guard_entropy_momentum: float = 0.9  # momentum of that average (per batch)
    guard_restore: str = "source"  # source | last_good
    guard_snapshot_every: int = 100  # batches between healthy snapshots (last_good)
    guard_reset_every: int = 0  # restore the source every this many batches (RDumb); 0: never
    # mixed precision of the method's forward and backward passes (torch.autocast to bfloat16; weights,
    # statistics and optimiser state stay float32; predictions are returned as float32): off (float32);
    # bf16 where bf16 is fast on the device, else a warning and float32; bf16! bf16 regardless (forced);
    # auto: bf16 where it is fast, float32 elsewhere, silently (detection: testtime.precision)
    amp: str = "off"
    # torch.compile of the forward of every network the method runs (model, teacher, anchor): off, or
    # a torch.compile backend (inductor; eager / aot_eager to debug); compilation happens on the
    # first batches, so it pays off only on long streams
    compile: str = "off"
    # the input check: "unit" refuses batches with values outside [-0.5, 1.5] (images must be scaled
    # to [0, 1]: catches 0..255 pixel values and mean/std-normalised input); "any" accepts any finite
    # values up to +-1e6, for a model of your own that takes other inputs (e.g. standardised images)
    input_range: str = "unit"

    def validate(self) -> None:
        """Raise ConfigError on an invalid value; subclasses extend `checks()`."""
        for name, ok, why in self.checks():
            if not ok:
                raise ConfigError(f"{type(self).__name__}.{name}={getattr(self, name)!r}: {why}")

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("guard_window", self.guard_window >= 1, "must be >= 1"),
            ("guard_max_class_fraction", 0 < self.guard_max_class_fraction <= 1, "must be in (0, 1]"),
            ("guard_min_diversity", 0 <= self.guard_min_diversity < 1, "must be in [0, 1)"),
            ("guard_min_entropy", 0 <= self.guard_min_entropy < 1, "must be in [0, 1)"),
            ("guard_entropy_momentum", 0 <= self.guard_entropy_momentum < 1, "must be in [0, 1)"),
            ("guard_restore", self.guard_restore in ("source", "last_good"), "must be source or last_good"),
            ("guard_snapshot_every", self.guard_snapshot_every >= 1, "must be >= 1"),
            ("guard_reset_every", self.guard_reset_every >= 0, "must be >= 0 (0: never)"),
            ("amp", self.amp in AMP_VALUES, "must be off, bf16, bf16! (forced) or auto"),
            ("input_range", self.input_range in ("unit", "any"), "must be unit (images in [0, 1]) or any"),
            (
                "compile",
                self.compile == "off" or self.compile in compile_backends(),
                "must be off or a torch.compile backend (inductor, aot_eager, eager, ...)",
            ),
        ]


@dataclass
class OptimConfig(MethodConfig):
    """Optimiser fields shared by gradient-based methods."""

    optimizer: str = "adam"  # adam | sgd | adamw
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    dampening: float = 0.0  # sgd only
    beta1: float = 0.9  # adam only
    beta2: float = 0.999  # adam only
    weight_decay: float = 0.0
    steps: int = 1  # optimisation steps per test batch

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            *super().checks(),
            ("optimizer", self.optimizer in ("adam", "adamw", "sgd"), "must be adam, adamw or sgd"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "must be a positive finite number"),
            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("dampening", 0 <= self.dampening <= 1, "must be in [0, 1]"),
            ("beta1", 0 <= self.beta1 < 1, "must be in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "must be in [0, 1)"),
            (
                "nesterov",
                not (
                    self.nesterov and self.optimizer == "sgd" and (self.momentum <= 0 or self.dampening != 0)
                ),
                "sgd with nesterov needs momentum > 0 and dampening 0",
            ),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "must be >= 0"),
            ("steps", self.steps >= 1, "must be >= 1"),
        ]


def _coerce(value: Any, typ: Any, field: str) -> Any:
    """Convert a CLI string (or a compatible value) to the field's annotated type."""
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(value, args[0], field)
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(typ) or (float,)
        items = value.split(",") if isinstance(value, str) else list(value)
        return origin(_coerce(v, inner, field) for v in items)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{field}: expected a boolean, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{field}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{field}: expected an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{field}: expected a number, got {value!r}")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{field}: expected a number, got {value!r}") from None
        if math.isnan(v):
            raise ConfigError(f"{field}: NaN is not a valid value")
        return v
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{field}: expected a string, got {value!r}")
        return value
    return value


def with_overrides(config: C, overrides: dict[str, Any]) -> C:
    """A copy of `config` with fields replaced, values coerced to the declared types, then validated."""
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for {type(config).__name__}; "
            f"valid: {', '.join(sorted(names))}"
        )
    values = {k: _coerce(v, hints[k], k) for k, v in overrides.items()}
    new = dataclasses.replace(config, **values)  # type: ignore[type-var]
    new.validate()
    return new


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """Parse CLI `key=value` strings."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"option {item!r} must look like key=value")
        k, v = item.split("=", 1)
        if not k.strip():
            raise ConfigError(f"option {item!r} must look like key=value (the key is empty)")
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def config_table(config: Any) -> list[tuple[str, str, str]]:
    """(name, type, default) rows for docs and `testtime methods --verbose`."""
    hints = typing.get_type_hints(type(config))
    return [
        (f.name, getattr(hints[f.name], "__name__", str(hints[f.name])), repr(getattr(config, f.name)))
        for f in dataclasses.fields(config)
    ]
