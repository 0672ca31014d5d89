"""Registry of methods by name, and the `adapt()` entry point."""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from torch import nn

from testtime.adapt.base import AdaptedModel
from testtime.adapt.config import with_overrides
from testtime.errors import ConfigError

METHODS: dict[str, type[AdaptedModel]] = {}
# what `adapt(model)` and `-m default` run: testtime's own recipe (see adapt/methods/auto.py and
# benchmarks/default_vs_zoo/); results files record the resolved name
DEFAULT_METHOD = "auto"
A = TypeVar("A", bound=type[AdaptedModel])


def register_method(cls: A) -> A:
    """Class decorator: register an AdaptedModel subclass under its `name`."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ConfigError(f"method {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Registered method names in canonical order (built-ins first, then others alphabetically)."""
    _load_builtin()
    from testtime.adapt.methods import CANONICAL_ORDER

    rank = {n: i for i, n in enumerate(CANONICAL_ORDER)}
    return sorted(METHODS, key=lambda n: (rank.get(n, len(rank)), n))


def resolve_method(name: str) -> str:
    """`"default"` means DEFAULT_METHOD; every other name is itself."""
    return DEFAULT_METHOD if name == "default" else name


def get_method(name: str) -> type[AdaptedModel]:
    _load_builtin()
    name = resolve_method(name)
    if name not in METHODS:
        raise ConfigError(
            f"unknown method {name!r}; known: default ({DEFAULT_METHOD}), {', '.join(list_methods())}"
        )
    return METHODS[name]


def adapt(
    model: nn.Module,
    method: str = "default",
    *,
    inplace: bool = False,
    source_data: Any = None,
    **overrides: Any,
) -> AdaptedModel:
    """Wrap `model` with a test-time method (`"default"`: DEFAULT_METHOD, testtime's own recipe);
    keyword overrides replace the paper defaults.

    The model is deep-copied unless `inplace=True`, so the caller's model is never modified.
    `source_data` — (images, labels) or an ImageSet of labelled source samples — is passed to
    methods that can use it (others ignore it).
    """
    cls = get_method(method)
    config = with_overrides(cls.Config(), overrides)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"adapt() needs a torch.nn.Module, got {type(model).__name__}")
    return cls(model if inplace else copy.deepcopy(model), config, source_data=source_data)


def _load_builtin() -> None:
    import testtime.adapt.methods  # noqa: F401  (registers the built-in methods)
