"""The minimal image passes an algorithm needs, declared next to each method's recipe.

Every built-in method has `minimal_passes()`: how many image-forward and image-backward passes
per test image its algorithm cannot do without (one forward that gives both the prediction and
the loss, a teacher pass, augmented views, ...), with the reason. Benchmarks compare it with the
passes the method actually makes (`AdaptedModel.counters()`, counted by hooks on the networks), so
a redundant pass shows up as a ratio above 1.

Where the algorithm decides at run time whether a pass is needed (CoTTA's augmented teacher,
RoTTA's memory replay, ROID's consistency views, EATA's Fisher from test batches), the method
tallies the images each decision concerned in `self.tally` (plain integers of this object's
lifetime, like `guard_events`: not part of the adaptation state) and the minimum is computed from
them. Two conditional passes are not part of any minimum: an update skipped because no sample of
the batch was selected (fewer backward passes than declared), and the collapse guard's source
pass that confirms an alarm (rare; `testtime.adapt.base.AdaptedModel._guard_step`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Passes:
    """Image passes per test image: `forward` and `backward`, and why the algorithm needs them."""

    forward: float
    backward: float
    why: str = ""

    def as_dict(self) -> dict[str, float | str]:
        return {"forward": self.forward, "backward": self.backward, "why": self.why}


def new_tally() -> Counter[str]:
    """Images per run-time decision (e.g. `tally["augmented"]`), for `minimal_passes()`."""
    return Counter()


def per_image(images: torch.Tensor | int, count: int) -> float:
    """`count` images spread over the `images` seen so far (0 before the first batch)."""
    n = int(images)
    return count / n if n else 0.0
