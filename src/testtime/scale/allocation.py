"""Compute-optimal allocation (Snell et al., 2024; Liu et al., 2025): pick the strategy and N per
question from an estimated difficulty, under a token budget.

Difficulty is predicted without the gold answer from a small pilot of samples: 1 - the share of the
pilot that agrees with its majority answer (0 = all agree, easy). Questions are binned by quantiles of
that estimate on a development set; for each bin the policy stores every configuration's accuracy and
mean tokens there and, at test time, picks the most accurate one whose mean cost fits the budget.
`testtime scale bench` evaluates this allocation (cross-fitted) and writes the policy fitted on all its
problems to `policy.json`, which `ComputeOptimal(policy="policy.json")` and
`testtime scale solve --strategy compute_optimal --policy policy.json` use.

Without a fitted policy, `ComputeOptimal` follows a fixed rule instead (adaptive consistency, cf.
Aggarwal et al., 2023): the pilot's answer when all pilot samples agree, else majority vote over the
pilot plus more samples, up to `n` in total and within the token budget.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from testtime.errors import ConfigError, DataError
from testtime.scale.strategies import (
    STRATEGIES,
    Sampling,
    _result,
    make_strategy,
    sample_candidates,
    select_majority,
    vote_counts,
)
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
    # options a strategy of the table runs with (e.g. beam_search: width, max_steps, step_tokens)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"n_bins": self.n_bins, "edges": list(self.edges), "options": self.options,
                "table": [[{"strategy": s, "n": n, "accuracy": a, "tokens": t} for (s, n), (a, t) in b.items()]
                          for b in self.table]}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Any) -> ComputeOptimalPolicy:
        """The policy `to_dict` wrote; DataError naming the problem for anything else."""
        try:
            table = [{(str(r["strategy"]), int(r["n"])): (float(r["accuracy"]), float(r["tokens"])) for r in b}
                     for b in d["table"]]  # fmt: skip
            pol = cls(int(d["n_bins"]), [float(e) for e in d["edges"]], table, dict(d.get("options", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"not a compute-optimal policy ({type(e).__name__}: {e})") from None
        unknown = sorted({s for b in table for s, _ in b} - set(STRATEGIES))
        if unknown:
            raise DataError(f"the policy names unknown strategies: {', '.join(unknown)}")
        if not any(table) or len(table) != len(pol.edges) + 1:
            raise DataError("the policy has no configurations or its bins do not match its edges")
        return pol

    def save(self, path: str | os.PathLike) -> None:
        from testtime.utils import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ComputeOptimalPolicy:
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise DataError(f"policy file not found: {path}") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the policy ({type(e).__name__}: {e})") from None
        try:
            return cls.from_dict(d)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None

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
    """Compute-optimal allocation (Snell et al., 2024): a pilot of `pilot_n` samples estimates the
    question's difficulty, a fitted policy (`policy`: a ComputeOptimalPolicy or the policy.json of
    `scale bench`) picks the strategy and N within `budget_tokens` (pilot included). Without a policy:
    the pilot's answer when the pilot agrees, else majority vote over up to `n` samples in all."""

    policy: ComputeOptimalPolicy | str | None = None
    budget_tokens: float = 1024.0
    pilot_n: int = 4
    n: int = 8  # most samples in all, pilot included (only without a policy)
    sampling: Sampling = field(default_factory=Sampling)
    name: str = "compute_optimal"

    def __post_init__(self) -> None:
        if isinstance(self.policy, (str, os.PathLike)):
            self.policy = ComputeOptimalPolicy.load(self.policy)
        elif self.policy is not None and not isinstance(self.policy, ComputeOptimalPolicy):
            raise ConfigError(f"policy must be a ComputeOptimalPolicy or a policy file, got {self.policy!r}")
        if not (isinstance(self.pilot_n, int) and self.pilot_n >= 1):
            raise ConfigError(f"pilot_n must be a positive integer, got {self.pilot_n!r}")
        if not (math.isfinite(float(self.budget_tokens)) and self.budget_tokens > 0):
            raise ConfigError(f"budget_tokens must be > 0, got {self.budget_tokens!r}")

    def run(self, problem: Problem, generator: Any, verifier: Any = None) -> StrategyResult:
        pilot, dt = sample_candidates(generator, problem, self.pilot_n, self.sampling)
        d = pilot_difficulty(pilot)
        spent = sum(c.n_tokens for c in pilot)
        if self.policy is None:
            return self._adaptive(problem, generator, pilot, d, spent, dt)
        assert isinstance(self.policy, ComputeOptimalPolicy)
        name, n = self.policy.choose(d, max(self.budget_tokens - spent, 0.0))
        kw: dict[str, Any] = {"sampling": self.sampling, **self.policy.options.get(name, {})}
        if name != "greedy":
            kw["n"] = n
        res = make_strategy(name, **kw).run(problem, generator, verifier)
        out = _result(None, pilot + res.candidates, dt + res.seconds, spent + res.n_tokens)
        out.answer, out.text = res.answer, res.text
        out.info = {"difficulty": d, "chosen": f"{name}@{n}", **res.info}
        return out

    def _adaptive(self, problem: Problem, generator: Any, pilot: list[Candidate], d: float, spent: int,
                  dt: float) -> StrategyResult:  # fmt: skip
        """The rule without a policy: stop when the pilot agrees, else sample more and vote."""
        extra = 0
        if d > 0 and self.n > len(pilot):
            per_sample = max(spent / len(pilot), 1.0)
            extra = min(self.n - len(pilot), int(max(self.budget_tokens - spent, 0.0) // per_sample))
        cands = list(pilot)
        if extra > 0:  # a new seed: the same seed would repeat the pilot's samples
            more, dt2 = sample_candidates(
                generator, problem, extra, replace(self.sampling, seed=self.sampling.seed + 1)
            )
            cands += more
            dt += dt2
        res = _result(select_majority(cands), cands, dt, votes=vote_counts(cands))
        res.info.update(difficulty=d, chosen=f"majority@{len(cands)}")
        return res


STRATEGIES[ComputeOptimal.name] = ComputeOptimal  # a named strategy: make_strategy("compute_optimal", ...)
