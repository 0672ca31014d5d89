"""Compute-optimal allocation (Snell et al., 2024; Liu et al., 2025): pick the strategy and N per
question from an estimated difficulty, under a token budget.

Difficulty is predicted without the gold answer from a small pilot of samples: 1 - the share of the
pilot that agrees with its majority answer (0 = all agree, easy). Questions are binned by quantiles of
that estimate on a development set; for each bin the policy stores every configuration's accuracy and
mean tokens there and, at test time, picks the most accurate one whose mean cost fits the budget.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from testtime.errors import ConfigError
from testtime.scale.strategies import Sampling, _result, make_strategy, sample_candidates
from testtime.scale.types import Candidate, Problem, StrategyResult


def pilot_difficulty(cands: Sequence[Candidate]) -> float:
    """1 - (share of candidates agreeing with the most common answer); 1.0 when none has an answer."""
    answers = [c.answer for c in cands if c.answer is not None]
    if not cands or not answers:
        return 1.0
    return 1.0 - Counter(answers).most_common(1)[0][1] / len(cands)


@dataclass
class ComputeOptimalPolicy:
    """Per-difficulty-bin table of configurations (strategy, N) -> (accuracy, tokens)."""

    n_bins: int = 3
    edges: list[float] = field(default_factory=list)
    table: list[dict[tuple[str, int], tuple[float, float]]] = field(default_factory=list)

    def bin_of(self, difficulty: float) -> int:
        return int(np.searchsorted(np.asarray(self.edges), difficulty, side="right")) if self.edges else 0

    def fit(self, rows: Sequence[dict[str, Any]]) -> ComputeOptimalPolicy:
        """rows: one per (problem, strategy, n) with keys problem, difficulty, strategy, n, correct, tokens."""
        if not rows:
            raise ConfigError("compute-optimal allocation needs development results to fit")
        diff = {r["problem"]: float(r["difficulty"]) for r in rows}
        vals = np.asarray(sorted(diff.values()))
        qs = np.quantile(vals, [k / self.n_bins for k in range(1, self.n_bins)]) if self.n_bins > 1 else []
        self.edges = sorted(set(float(q) for q in qs))
        acc: list[dict[tuple[str, int], list[tuple[float, float]]]] = [defaultdict(list)
                                                                       for _ in range(len(self.edges) + 1)]  # fmt: skip
        for r in rows:
            acc[self.bin_of(diff[r["problem"]])][(r["strategy"], int(r["n"]))].append(
                (float(r["correct"]), float(r["tokens"]))
            )
        self.table = [{k: (float(np.mean([a for a, _ in v])), float(np.mean([t for _, t in v])))
                       for k, v in b.items()} for b in acc]  # fmt: skip
        return self

    def choose(self, difficulty: float, budget_tokens: float) -> tuple[str, int]:
        """The most accurate configuration of this difficulty bin whose mean tokens fit the budget
        (the cheapest one when none fits); ties go to the cheaper."""
        if not self.table:
            raise ConfigError("the compute-optimal policy is not fitted")
        tab = self.table[self.bin_of(difficulty)] or next(t for t in self.table if t)
        fits = [(k, v) for k, v in tab.items() if v[1] <= budget_tokens]
        if not fits:
            return min(tab.items(), key=lambda kv: kv[1][1])[0]
        return max(fits, key=lambda kv: (kv[1][0], -kv[1][1]))[0]


@dataclass
class ComputeOptimal:
    """Live strategy: a pilot of `pilot_n` samples estimates difficulty, the policy picks (strategy, N)
    within `budget_tokens` (pilot tokens included) and that strategy answers."""

    policy: ComputeOptimalPolicy
    budget_tokens: float = 1024.0
    pilot_n: int = 4
    sampling: Sampling = field(default_factory=Sampling)
    name: str = "compute_optimal"

    def run(self, problem: Problem, generator: Any, verifier: Any = None) -> StrategyResult:
        pilot, dt = sample_candidates(generator, problem, self.pilot_n, self.sampling)
        d = pilot_difficulty(pilot)
        spent = sum(c.n_tokens for c in pilot)
        name, n = self.policy.choose(d, max(self.budget_tokens - spent, 0.0))
        kw: dict[str, Any] = {"sampling": self.sampling}
        if name != "greedy":
            kw["n"] = n
        res = make_strategy(name, **kw).run(problem, generator, verifier)
        out = _result(None, pilot + res.candidates, dt + res.seconds, spent + res.n_tokens)
        out.answer, out.text = res.answer, res.text
        out.info = {"difficulty": d, "chosen": f"{name}@{n}", **res.info}
        return out
