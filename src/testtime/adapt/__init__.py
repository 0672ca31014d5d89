"""Test-time adaptation: `adapt(model, "tent")` wraps a classifier with a registered method."""

from testtime.adapt.base import AdaptedModel
from testtime.adapt.config import MethodConfig, OptimConfig
from testtime.adapt.registry import adapt, get_method, list_methods, register_method

__all__ = [
    "AdaptedModel",
    "MethodConfig",
    "OptimConfig",
    "adapt",
    "get_method",
    "list_methods",
    "register_method",
]
