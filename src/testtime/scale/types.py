"""Data types shared by generators, verifiers and strategies."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FinishReason = str  # "eos" (model ended), "stop" (hit a stop string), "length" (token budget), "time"


@dataclass
class Completion:
    """One generated continuation of a prompt."""

    text: str
    n_tokens: int
    finish_reason: FinishReason = "eos"
    logprobs: list[float] | None = None  # per generated token, under the model at temperature 1
    seconds: float = 0.0  # share of the wall time of the call that produced it

    @property
    def sum_logprob(self) -> float | None:
        return None if self.logprobs is None else float(sum(self.logprobs))

    @property
    def mean_logprob(self) -> float | None:
        if self.logprobs is None:
            return None
        return float(sum(self.logprobs) / len(self.logprobs)) if self.logprobs else 0.0

    @property
    def confidence(self) -> float | None:
        """Geometric-mean token probability in (0, 1]."""
        m = self.mean_logprob
        return None if m is None else math.exp(m)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "n_tokens": self.n_tokens, "finish_reason": self.finish_reason,
                "logprobs": self.logprobs, "seconds": self.seconds}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Completion:
        return cls(d["text"], int(d["n_tokens"]), d.get("finish_reason", "eos"), d.get("logprobs"),
                   float(d.get("seconds", 0.0)))  # fmt: skip


@dataclass
class Problem:
    """A question with a gold answer and a scorer `(predicted answer or None) -> float in [0, 1]`."""

    id: str
    question: str
    answer: str
    source: str = "custom"
    metadata: dict[str, Any] = field(default_factory=dict)
    scorer: Callable[[str | None, Problem], float] | None = None

    def score(self, predicted: str | None) -> float:
        if predicted is None:
            return 0.0
        if self.scorer is not None:
            return float(self.scorer(predicted, self))
        from testtime.scale.answers import answers_equal

        return 1.0 if answers_equal(predicted, self.answer) else 0.0


@dataclass
class Candidate:
    """A (possibly partial) solution: the reasoning text, its extracted answer and its cost."""

    text: str
    answer: str | None
    n_tokens: int
    finished: bool = True
    score: float | None = None  # the verifier's aggregated score, where one was used
    step_scores: list[float] | None = None
    logprobs: list[float] | None = None
    step_logprobs: list[list[float]] | None = None  # per step, where the solution was built step by step


@dataclass
class StrategyResult:
    """What a strategy answers for one problem, and what it cost."""

    answer: str | None
    text: str
    n_tokens: int  # generated tokens spent on this problem (all samples / beams)
    seconds: float
    n_samples: int
    candidates: list[Candidate] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
