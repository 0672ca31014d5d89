"""Test-time scaling strategies: spend more samples or search at inference, pick one answer.

Selectors work on a pool of sampled candidates (so a benchmark can reuse one pool for every N);
search strategies call the generator step by step. Each strategy's `run(problem, generator,
verifier)` returns a `StrategyResult` with the answer and the tokens and seconds it spent.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from testtime.errors import ConfigError
from testtime.scale.answers import extract_answer
from testtime.scale.types import Candidate, Completion, Problem, StrategyResult
from testtime.scale.verifiers import aggregate

INSTRUCTION = "Think step by step, then end with 'Answer: <number>'."


@dataclass
class Sampling:
    """How candidates are sampled (defaults used by every strategy unless overridden)."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    instruction: str = INSTRUCTION
    system: str | None = None


def prompt_for(generator: Any, problem: Problem, sampling: Sampling) -> str:
    q = f"{problem.question} {sampling.instruction}".strip()
    return generator.format_chat(q, sampling.system)


def to_candidate(c: Completion) -> Candidate:
    return Candidate(
        c.text, extract_answer(c.text), c.n_tokens, c.finish_reason != "length", logprobs=c.logprobs
    )


def sample_candidates(
    generator: Any, problem: Problem, n: int, sampling: Sampling
) -> tuple[list[Candidate], float]:
    """`n` sampled candidates and the wall time it took."""
    t0 = time.perf_counter()
    comps = generator.generate([prompt_for(generator, problem, sampling)], n, max_new_tokens=sampling.max_new_tokens,
                               temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)[0]  # fmt: skip
    return [to_candidate(c) for c in comps], time.perf_counter() - t0


# ----------------------------------------------------------------------------------------- selectors
def vote_counts(cands: Sequence[Candidate], weights: Sequence[float] | None = None) -> dict[str, float]:
    """Votes per extracted answer (1 per candidate, or its weight), in order of first appearance;
    candidates without an answer do not vote."""
    votes: dict[str, float] = defaultdict(float)
    for i, c in enumerate(cands):
        if c.answer is not None:
            votes[c.answer] += 1.0 if weights is None else float(weights[i])
    return dict(votes)


def select_majority(cands: Sequence[Candidate], weights: Sequence[float] | None = None) -> Candidate | None:
    """The candidate whose answer has the largest (weighted) vote; ties go to the answer seen first."""
    votes = vote_counts(cands, weights)
    first: dict[str, Candidate] = {}
    for c in cands:
        if c.answer is not None:
            first.setdefault(c.answer, c)
    if not votes:
        return cands[0] if cands else None
    best = max(votes, key=lambda a: votes[a])  # max keeps the first of equal keys (insertion order)
    return first[best]


def select_best(cands: Sequence[Candidate], scores: Sequence[float]) -> Candidate | None:
    """The highest-scoring candidate (first on ties)."""
    if not cands:
        return None
    i = max(range(len(cands)), key=lambda k: scores[k])
    return cands[i]


def select_first_finish(cands: Sequence[Candidate]) -> Candidate | None:
    """The candidate that finishes first when all are decoded in parallel: the fewest tokens among the
    finished ones."""
    done = [c for c in cands if c.finished] or list(cands)
    return min(done, key=lambda c: c.n_tokens) if done else None


def first_finish_tokens(cands: Sequence[Candidate]) -> int:
    """Tokens spent when every sample stops as soon as the first one finishes."""
    w = select_first_finish(cands)
    return 0 if w is None else sum(min(c.n_tokens, w.n_tokens) for c in cands)


def _result(chosen: Candidate | None, cands: Sequence[Candidate], seconds: float, n_tokens: int | None = None,
            **info: Any) -> StrategyResult:  # fmt: skip
    toks = sum(c.n_tokens for c in cands) if n_tokens is None else n_tokens
    if chosen is None:
        return StrategyResult(None, "", toks, seconds, len(cands), list(cands), info)
    return StrategyResult(chosen.answer, chosen.text, toks, seconds, len(cands), list(cands), info)


# ---------------------------------------------------------------------------------------- strategies
@dataclass
class Greedy:
    """One greedy (temperature 0) solution."""

    sampling: Sampling = field(default_factory=Sampling)
    name: str = "greedy"

    def run(self, problem: Problem, generator: Any, verifier: Any = None) -> StrategyResult:
        s = Sampling(**{**self.sampling.__dict__, "temperature": 0.0})
        cands, dt = sample_candidates(generator, problem, 1, s)
        return _result(cands[0], cands, dt)


@dataclass
class MajorityVote:
    """Self-consistency (Wang et al., 2023): N samples, the most frequent answer."""

    n: int = 8
    sampling: Sampling = field(default_factory=Sampling)
    name: str = "majority"

    def run(self, problem: Problem, generator: Any, verifier: Any = None) -> StrategyResult:
        cands, dt = sample_candidates(generator, problem, self.n, self.sampling)
        return _result(select_majority(cands), cands, dt, votes=vote_counts(cands))


@dataclass
class WeightedVote:
    """Verifier-weighted self-consistency: each sample votes for its answer with its verifier score."""

    n: int = 8
    sampling: Sampling = field(default_factory=Sampling)
    name: str = "weighted_vote"

    def run(self, problem: Problem, generator: Any, verifier: Any) -> StrategyResult:
        _need(verifier, self.name)
        cands, dt = sample_candidates(generator, problem, self.n, self.sampling)
        scores = verifier.score(problem, cands)
        for c, sc in zip(cands, scores):
            c.score = float(sc)
        return _result(select_majority(cands, scores), cands, dt, votes=vote_counts(cands, scores))


@dataclass
class BestOfN:
    """Best-of-N: N samples, the one the verifier scores highest; a step-level verifier's scores are
    aggregated by `aggregation` (last / min / prod / mean)."""

    n: int = 8
    aggregation: str = "last"
    sampling: Sampling = field(default_factory=Sampling)
    name: str = "best_of_n"

    def run(self, problem: Problem, generator: Any, verifier: Any) -> StrategyResult:
        _need(verifier, self.name)
        aggregate([], self.aggregation)
        cands, dt = sample_candidates(generator, problem, self.n, self.sampling)
        scores = score_candidates(verifier, problem, cands, self.aggregation)
        for c, sc in zip(cands, scores):
            c.score = float(sc)
        return _result(select_best(cands, scores), cands, dt)


@dataclass
class FirstFinish:
    """First-finish search (Agarwal et al., 2025): decode N samples in parallel, answer with the first to
    finish. Tokens are counted as if the others stopped then."""

    n: int = 8
    sampling: Sampling = field(default_factory=Sampling)
    name: str = "first_finish"

    def run(self, problem: Problem, generator: Any, verifier: Any = None) -> StrategyResult:
        cands, dt = sample_candidates(generator, problem, self.n, self.sampling)
        return _result(select_first_finish(cands), cands, dt, first_finish_tokens(cands))


def score_candidates(
    verifier: Any, problem: Problem, cands: Sequence[Candidate], aggregation: str
) -> list[float]:
    """Outcome scores; step-level verifiers aggregated with `aggregation`."""
    if hasattr(verifier, "score_steps"):
        return [aggregate(s, aggregation) for s in verifier.score_steps(problem, cands)]
    return list(verifier.score(problem, cands))


def _need(verifier: Any, name: str, steps: bool = False) -> None:
    if verifier is None:
        raise ConfigError(f"strategy {name!r} needs a verifier")
    if steps and not hasattr(verifier, "score_steps"):
        raise ConfigError(f"strategy {name!r} needs a step-level verifier (a PRM); {verifier.name!r} scores only "
                          "complete solutions")  # fmt: skip


@dataclass
class _Beam:
    prefix: str  # prompt + steps so far
    steps: list[str]
    step_logprobs: list[list[float]]
    group: int
    n_tokens: int = 0
    finished: bool = False

    def candidate(self, prompt: str) -> Candidate:
        text = self.prefix[len(prompt) :]
        lps = [x for s in self.step_logprobs for x in s]
        return Candidate(text, extract_answer(text), self.n_tokens, self.finished, logprobs=lps,
                         step_logprobs=[list(s) for s in self.step_logprobs])  # fmt: skip


def tree_search_many(problems: Sequence[Problem], generator: Any, verifier: Any, *, n: int, width: int, groups: int,
                     max_steps: int, step_tokens: int, sampling: Sampling, aggregation: str = "last",
                     step_stop: str = "\n") -> list[StrategyResult]:  # fmt: skip
    """Step-level search with a process verifier, for several problems at once (one generator call per round
    for all of them). `groups` independent subtrees share the budget of `n` live beams; each round every live
    beam proposes `width` next steps, the verifier scores them and each subtree keeps its best
    `n // groups // width` (at least 1). Beam search: groups = 1; DVTS: groups = n / width. A problem's
    seconds are the wall time shared equally among the problems searched together."""
    prompts = [prompt_for(generator, p, sampling) for p in problems]
    keep = max(1, n // groups // width)
    t0 = time.perf_counter()
    live: list[list[_Beam]] = [
        [_Beam(pr, [], [], g) for g in range(groups) for _ in range(keep)] for pr in prompts
    ]
    finished: list[list[_Beam]] = [[] for _ in problems]
    spent = [0] * len(problems)
    rounds = [0] * len(problems)
    for step in range(max_steps):
        active = [i for i in range(len(problems)) if live[i] and len(finished[i]) < n]
        if not active:
            break
        last = step == max_steps - 1
        flat = [b for i in active for b in live[i]]
        comps = generator.generate([b.prefix for b in flat], width, max_new_tokens=step_tokens,
                                   temperature=sampling.temperature, top_p=sampling.top_p,
                                   stop=() if last else (step_stop,), seed=sampling.seed + 1000 * step)  # fmt: skip
        by_beam = iter(comps)
        for i in active:
            rounds[i] = step + 1
            children: list[_Beam] = []
            for b in live[i]:
                for c in next(by_beam):
                    spent[i] += c.n_tokens
                    done = c.finish_reason in ("eos", "length") or last
                    sep = step_stop if c.finish_reason == "stop" else ""
                    children.append(_Beam(b.prefix + c.text + sep, [*b.steps, c.text],
                                          [*b.step_logprobs, c.logprobs or []], b.group, b.n_tokens + c.n_tokens,
                                          done))  # fmt: skip
            cands = [ch.candidate(prompts[i]) for ch in children]
            scores = [aggregate(sc, aggregation) for sc in verifier.score_steps(problems[i], cands)]
            ranked = sorted(zip(scores, range(len(children))), key=lambda t: -t[0])
            live[i] = []
            per_group: dict[int, int] = {}
            for _, k in ranked:
                ch = children[k]
                if ch.finished:
                    finished[i].append(ch)
                elif per_group.get(ch.group, 0) < keep:
                    per_group[ch.group] = per_group.get(ch.group, 0) + 1
                    live[i].append(ch)
    share = (time.perf_counter() - t0) / max(len(problems), 1)
    results = []
    for i, p in enumerate(problems):
        pool = finished[i] or live[i]
        cands = [b.candidate(prompts[i]) for b in pool]
        scores = [aggregate(sc, aggregation) for sc in verifier.score_steps(p, cands)] if cands else []
        for c, sc in zip(cands, scores):
            c.score = sc
        results.append(_result(select_best(cands, scores), cands, share, spent[i], rounds=rounds[i]))
    return results


@dataclass
class _StepSearch:
    """Shared options and driver of the step-level searches."""

    n: int = 8
    width: int = 4
    max_steps: int = 10
    step_tokens: int = 64
    aggregation: str = "last"
    sampling: Sampling = field(default_factory=Sampling)
    name: str = "step_search"

    def groups(self, width: int) -> int:
        return 1

    def run(self, problem: Problem, generator: Any, verifier: Any) -> StrategyResult:
        return self.run_many([problem], generator, verifier)[0]

    def run_many(self, problems: Sequence[Problem], generator: Any, verifier: Any) -> list[StrategyResult]:
        """Search several problems together (batched generator calls)."""
        _need(verifier, self.name, steps=True)
        width = min(self.width, self.n)
        return tree_search_many(problems, generator, verifier, n=self.n, width=width, groups=self.groups(width),
                                max_steps=self.max_steps, step_tokens=self.step_tokens, sampling=self.sampling,
                                aggregation=self.aggregation)  # fmt: skip


@dataclass
class BeamSearch(_StepSearch):
    """Beam search over reasoning steps with a process verifier (Snell et al., 2024): N beams, each round
    keep the top N / M and expand each with M sampled next steps; steps end at a newline."""

    name: str = "beam_search"


@dataclass
class DVTS(_StepSearch):
    """Diverse verifier tree search (Beeching et al., 2024): N / M independent subtrees, each greedily
    following its best step under the verifier and expanding it M ways; the best leaf overall wins."""

    name: str = "dvts"

    def groups(self, width: int) -> int:
        return max(1, self.n // width)


@dataclass
class IterativeDeepening:
    """Iterative deepening sampling (Chen, Koenig & Dilkina, 2025): each of N samples gets a budget of b0
    tokens, then a self-correction trigger is appended and it continues with a budget grown by `gamma`,
    until `max_new_tokens` are spent; the samples' final answers are combined by majority vote.
    Deviation: the trigger is appended after each budget whether or not the model had finished."""

    n: int = 4
    b0: int = 64
    gamma: float = 2.0
    trigger: str = "\nWait, let me check that again.\n"
    sampling: Sampling = field(default_factory=Sampling)
    name: str = "iterative_deepening"

    def run(self, problem: Problem, generator: Any, verifier: Any = None) -> StrategyResult:
        return self.run_many([problem], generator, verifier)[0]

    def run_many(
        self, problems: Sequence[Problem], generator: Any, verifier: Any = None
    ) -> list[StrategyResult]:
        """Several problems together (batched generator calls); seconds are shared equally."""
        if self.b0 < 1 or self.gamma < 1.0:
            raise ConfigError("iterative deepening needs b0 >= 1 and gamma >= 1")
        prompts = [prompt_for(generator, p, self.sampling) for p in problems]
        t0 = time.perf_counter()
        k = len(prompts) * self.n
        texts, spent = [""] * k, [0] * k
        lps: list[list[float]] = [[] for _ in range(k)]
        budget, rnd = float(self.b0), 0
        planned = self.b0  # budgets are planned b0, b0*gamma, ... until max_new_tokens, whatever is used
        first = generator.generate(prompts, self.n, max_new_tokens=self.b0, temperature=self.sampling.temperature,
                                   top_p=self.sampling.top_p, seed=self.sampling.seed)  # fmt: skip
        for i, c in enumerate(c for row in first for c in row):
            texts[i], spent[i], lps[i] = c.text, c.n_tokens, list(c.logprobs or [])
        while True:
            rnd += 1
            budget *= self.gamma
            step = int(min(budget, self.sampling.max_new_tokens - planned))
            if step < 1:
                break
            planned += step
            texts = [t + self.trigger for t in texts]
            outs = generator.generate([prompts[i // self.n] + t for i, t in enumerate(texts)], 1, max_new_tokens=step,
                                      temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                                      seed=self.sampling.seed + 7919 * rnd)  # fmt: skip
            for i, o in enumerate(outs):
                texts[i] += o[0].text
                spent[i] += o[0].n_tokens
                lps[i].extend(o[0].logprobs or [])
        share = (time.perf_counter() - t0) / len(problems)
        results = []
        for j in range(len(problems)):
            sl = slice(j * self.n, (j + 1) * self.n)
            cands = [Candidate(t, extract_answer(t), n_tok, True, logprobs=lp)
                     for t, n_tok, lp in zip(texts[sl], spent[sl], lps[sl])]  # fmt: skip
            results.append(_result(select_majority(cands), cands, share, rounds=rnd,  # = generator calls
                                   votes=vote_counts(cands)))  # fmt: skip
        return results


STRATEGIES: dict[str, type] = {c.name: c for c in (Greedy, MajorityVote, WeightedVote, BestOfN, FirstFinish,  # type: ignore[attr-defined]
                                                  BeamSearch, DVTS, IterativeDeepening)}  # fmt: skip


def make_strategy(name: str, **kw: Any) -> Any:
    """A strategy by name with options (e.g. `make_strategy("beam_search", n=16, width=4)`)."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    fields = set(cls.__dataclass_fields__)
    bad = [k for k in kw if k not in fields or k == "name"]
    if bad:
        raise ConfigError(f"strategy {name!r} has no option(s) {', '.join(bad)}; options: "
                          f"{', '.join(sorted(fields - {'name'}))}")  # fmt: skip
    if "n" in kw and (not isinstance(kw["n"], int) or kw["n"] < 1):
        raise ConfigError(f"n must be a positive integer, got {kw['n']!r}")
    return cls(**kw)
