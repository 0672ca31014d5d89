"""Optional `torch.compile` of the networks a method runs (model, teacher, anchor, ...).

Only each network's `forward` is compiled, in place: parameter names, the state dict, hooks
(which run around `forward`, in eager mode) and `reset()` are unchanged. The compiled forward is
kept as an instance attribute that re-compiles for the copy when the network is deep-copied, so a
copied network never runs the original's weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from testtime.errors import ConfigError

OFF = "off"


def compile_backends() -> list[str]:
    """Names `MethodConfig.compile` accepts besides "off" (torch.compile backends, debug ones included)."""
    import torch._dynamo

    return sorted(set(torch._dynamo.list_backends(exclude_tags=())) | {"inductor"})


def check_backend(backend: str) -> None:
    if backend == OFF:
        return
    known = compile_backends()
    if backend not in known:
        raise ConfigError(
            f"compile={backend!r}: unknown torch.compile backend; use off or one of {', '.join(known)}"
        )


class CompiledForward:
    """`module.forward`, compiled with `backend`; deep-copies as a fresh compile of the copy."""

    def __init__(self, module: nn.Module, backend: str, eager_forward: Any) -> None:
        self.module, self.backend = module, backend
        self.fn = torch.compile(eager_forward, backend=backend)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch._dynamo  # loaded by torch.compile already

        # guard on hooks: Dynamo's default skips them, so a graph compiled for one instance of a class
        # could be reused for another that has different hooks (feature taps, counters)
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledForward:
        twin = copy.deepcopy(self.module, memo)  # already in memo while the module is being copied
        return CompiledForward(twin, self.backend, type(self.module).forward.__get__(twin))

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a compiled forward cannot be pickled; save the state_dict instead")


def compile_forward(module: nn.Module, backend: str) -> nn.Module:
    """Compile `module.forward` in place with `backend` (no-op for "off" or if already compiled)."""
    check_backend(backend)
    if backend == OFF or isinstance(module.__dict__.get("forward"), CompiledForward):
        return module
    import torch._functorch.config

    # process-wide: graphs compiled with donated buffers cannot be backpropagated twice, which some
    # methods do through one forward (EATA's Fisher estimate uses retain_graph)
    torch._functorch.config.donated_buffer = False
    eager = module.forward  # the class's forward (or one a user set on the instance)
    module.forward = CompiledForward(module, backend, eager)  # type: ignore[method-assign]
    return module


def uncompile_forward(module: nn.Module) -> nn.Module:
    """Undo `compile_forward`."""
    fwd = module.__dict__.get("forward")
    if isinstance(fwd, CompiledForward):
        del module.forward
    return module
