"""Verifiers behind one protocol: score candidate solutions (outcome) and, for step-level
verifiers, each reasoning step (process). Every verifier states whether it reads the gold
answer (`uses_gold`): those are oracles for evaluation, not deployable selectors."""

from __future__ import annotations

import ast
import math
import operator
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

from testtime.errors import ConfigError
from testtime.scale.answers import extract_answer
from testtime.scale.types import Candidate, Problem

AGGREGATIONS = ("last", "min", "prod", "mean")


def split_steps(text: str) -> list[str]:
    """Reasoning steps: the non-empty lines of a solution."""
    return [s for s in (line.strip() for line in text.split("\n")) if s]


def aggregate(step_scores: Sequence[float], how: str = "last") -> float:
    """One score from per-step scores: the last step's, the minimum, the product or the mean."""
    if how not in AGGREGATIONS:
        raise ConfigError(f"unknown aggregation {how!r}; choose from {', '.join(AGGREGATIONS)}")
    if not step_scores:
        return 0.0
    if how == "last":
        return float(step_scores[-1])
    if how == "min":
        return float(min(step_scores))
    if how == "prod":
        return float(math.prod(step_scores))
    return float(sum(step_scores) / len(step_scores))


@runtime_checkable
class Verifier(Protocol):
    """Scores complete candidates for a problem; higher is better, in [0, 1]."""

    name: str
    uses_gold: bool

    def score(self, problem: Problem, candidates: Sequence[Candidate]) -> list[float]: ...


@runtime_checkable
class StepVerifier(Verifier, Protocol):
    """Also scores every step of (possibly unfinished) candidates: a process reward model."""

    def score_steps(self, problem: Problem, candidates: Sequence[Candidate]) -> list[list[float]]: ...


class ExactAnswerVerifier:
    """1 if the extracted answer is right by the problem's scorer (exact / numeric / sympy). Reads the gold
    answer: with it best-of-N equals pass@N, the ceiling."""

    name = "exact"
    uses_gold = True

    def score(self, problem: Problem, candidates: Sequence[Candidate]) -> list[float]:
        return [
            problem.score(c.answer if c.answer is not None else extract_answer(c.text)) for c in candidates
        ]


class SympyVerifier(ExactAnswerVerifier):
    """1 if the extracted answer is sympy-equivalent to the gold answer (reads the gold answer)."""

    name = "sympy"

    def score(self, problem: Problem, candidates: Sequence[Candidate]) -> list[float]:
        from testtime.scale.answers import answers_equal

        return [1.0 if answers_equal(c.answer if c.answer is not None else extract_answer(c.text), problem.answer)
                else 0.0 for c in candidates]  # fmt: skip


_BINOPS: dict[type, Any] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                            ast.Div: operator.truediv}  # fmt: skip
_EQUATION = re.compile(
    r"((?:\(?\s*-?\d+(?:\.\d+)?\s*\)?\s*[-+*/×x]\s*)+\(?\s*-?\d+(?:\.\d+)?\s*\)?)\s*=\s*(-?\d+(?:\.\d+)?)"
)


def _eval_arith(expr: str) -> Fraction | None:
    """Exact value of + - * / arithmetic on numbers, or None when it is anything else."""
    try:
        tree = ast.parse(expr.strip().replace("×", "*").replace("x", "*"), mode="eval")
    except SyntaxError:
        return None

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int | float)
            and not isinstance(node.value, bool)
        ):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError("not arithmetic")

    try:
        return ev(tree)
    except (ValueError, ZeroDivisionError):
        return None


class ArithmeticStepVerifier:
    """Programmatic process verifier that never reads the gold answer: re-computes every
    `a op b ... = c` equation written in a step. A step scores 0 if one of its equations is wrong, else 1
    (a step without equations cannot be wrong). A finished solution gets a final step: 1 if its stated
    answer equals the last computed result, 0 if it differs or no answer is stated, and `unchecked`
    when it wrote no equation at all (nothing could be verified)."""

    name = "arith_steps"
    uses_gold = False

    def __init__(self, unchecked: float = 0.5, aggregation: str = "min") -> None:
        aggregate([], aggregation)  # validates the name
        self.unchecked = float(unchecked)
        self.aggregation = aggregation

    @staticmethod
    def equations(step: str) -> list[tuple[Fraction, Fraction]]:
        """(computed left side, written right side) of every checkable equation in a step."""
        out = []
        for lhs, rhs in _EQUATION.findall(step):
            v = _eval_arith(lhs)
            if v is not None:
                out.append((v, Fraction(rhs)))
        return out

    def step_score(self, step: str) -> float:
        return 0.0 if any(v != r for v, r in self.equations(step)) else 1.0

    def _steps(self, c: Candidate) -> list[float]:
        steps = split_steps(c.text)
        scores = [self.step_score(s) for s in steps]
        if c.finished:
            results = [r for s in steps for _, r in self.equations(s)]
            ans = c.answer if c.answer is not None else extract_answer(c.text)
            if ans is None:
                scores.append(0.0)
            elif not results:
                scores.append(self.unchecked)
            else:
                try:
                    scores.append(1.0 if results[-1] == Fraction(ans) else 0.0)
                except (ValueError, ZeroDivisionError):
                    scores.append(0.0)
        return scores or [1.0]

    def score_steps(self, problem: Problem, candidates: Sequence[Candidate]) -> list[list[float]]:
        return [self._steps(c) for c in candidates]

    def score(self, problem: Problem, candidates: Sequence[Candidate]) -> list[float]:
        return [aggregate(s, self.aggregation) for s in self.score_steps(problem, candidates)]


class LogprobVerifier:
    """Self-evaluation by likelihood: the geometric-mean token probability of a solution (or step)."""

    name = "logprob"
    uses_gold = False

    def _conf(self, lps: Sequence[float] | None) -> float:
        if not lps:
            return 0.0
        return math.exp(sum(lps) / len(lps))

    def score(self, problem: Problem, candidates: Sequence[Candidate]) -> list[float]:
        return [self._conf(c.logprobs) for c in candidates]

    def score_steps(self, problem: Problem, candidates: Sequence[Candidate]) -> list[list[float]]:
        out = []
        for c in candidates:
            steps = c.step_logprobs if c.step_logprobs else [c.logprobs or []]
            out.append([self._conf(s) for s in steps])
        return out


class CombinedVerifier:
    """A primary verifier with ties broken by a secondary one: score = primary + eps * secondary."""

    uses_gold = False

    def __init__(self, primary: Any, secondary: Any, eps: float = 1e-3) -> None:
        self.primary, self.secondary, self.eps = primary, secondary, eps
        self.name = f"{primary.name}+{secondary.name}"
        self.uses_gold = bool(primary.uses_gold or secondary.uses_gold)

    def score(self, problem: Problem, candidates: Sequence[Candidate]) -> list[float]:
        a, b = self.primary.score(problem, candidates), self.secondary.score(problem, candidates)
        return [x + self.eps * y for x, y in zip(a, b)]

    def score_steps(self, problem: Problem, candidates: Sequence[Candidate]) -> list[list[float]]:
        a = self.primary.score_steps(problem, candidates)
        b = self.secondary.score_steps(problem, candidates)
        return [[x + self.eps * (sb[-1] if sb else 0.0) for x in sa] for sa, sb in zip(a, b)]


class MajorityVerifier:
    """Agreement: the share of the candidates that reach the same answer."""

    name = "majority"
    uses_gold = False

    def score(self, problem: Problem, candidates: Sequence[Candidate]) -> list[float]:
        counts = Counter(c.answer for c in candidates if c.answer is not None)
        n = max(len(candidates), 1)
        return [counts[c.answer] / n if c.answer is not None else 0.0 for c in candidates]


class SelfEvalVerifier:
    """Self-evaluation by logprob: P(Yes) / (P(Yes) + P(No)) when the model is asked whether the solution is
    correct. Needs a generator with `next_token_logprobs` (the transformers backend)."""

    name = "self_eval"
    uses_gold = False
    TEMPLATE = "Question: {question}\nProposed solution: {solution}\nIs the proposed solution correct? Answer Yes or No."

    def __init__(self, generator: Any) -> None:
        if not hasattr(generator, "next_token_logprobs"):
            raise ConfigError(f"generator {getattr(generator, 'name', generator)!r} cannot score next tokens")
        self.generator = generator

    def score(self, problem: Problem, candidates: Sequence[Candidate]) -> list[float]:
        prompts = [self.generator.format_chat(self.TEMPLATE.format(question=problem.question, solution=c.text))
                   for c in candidates]  # fmt: skip
        out = []
        for yes, no in self.generator.next_token_logprobs(prompts, ["Yes", "No"]):
            out.append(1.0 / (1.0 + math.exp(no - yes)))
        return out


class RewardModelVerifier:
    """An outcome (ORM) or process (PRM) reward model given as a Hugging Face sequence-classification
    model: the score of a text is sigmoid(logit) for one label, else softmax[positive_label]. As a PRM
    each step prefix `question + steps[:k]` is scored."""

    uses_gold = False

    def __init__(self, model: Any, tokenizer: Any, *, step_separator: str = "\n", positive_label: int = -1,
                 aggregation: str = "last", batch_size: int = 16, name: str = "reward_model") -> None:  # fmt: skip
        aggregate([], aggregation)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.sep, self.pos, self.aggregation, self.batch_size = (
            step_separator,
            positive_label,
            aggregation,
            batch_size,
        )
        self.name = name
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id

    def _score_texts(self, texts: list[str]) -> list[float]:
        import torch

        out: list[float] = []
        for b0 in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[b0 : b0 + self.batch_size], return_tensors="pt", padding=True, truncation=True
            )
            with torch.inference_mode():
                logits = self.model(**enc).logits.float()
            if logits.shape[-1] == 1:
                out.extend(torch.sigmoid(logits[:, 0]).tolist())
            else:
                out.extend(torch.softmax(logits, dim=-1)[:, self.pos].tolist())
        return out

    def score_steps(self, problem: Problem, candidates: Sequence[Candidate]) -> list[list[float]]:
        texts, owners = [], []
        for i, c in enumerate(candidates):
            steps = split_steps(c.text) or [""]
            for k in range(1, len(steps) + 1):
                texts.append(problem.question + self.sep + self.sep.join(steps[:k]))
                owners.append(i)
        scores = self._score_texts(texts) if texts else []
        out: list[list[float]] = [[] for _ in candidates]
        for i, s in zip(owners, scores):
            out[i].append(s)
        return out

    def score(self, problem: Problem, candidates: Sequence[Candidate]) -> list[float]:
        return [aggregate(s, self.aggregation) for s in self.score_steps(problem, candidates)]


VERIFIERS = {"exact": ExactAnswerVerifier, "sympy": SympyVerifier, "arith_steps": ArithmeticStepVerifier,
             "logprob": LogprobVerifier, "majority": MajorityVerifier}  # fmt: skip


def make_verifier(name: str, **kw: Any) -> Any:
    """A verifier by name (`exact`, `sympy`, `arith_steps`, `logprob`, `majority`, or `a+b` for a tie-break)."""
    if "+" in name:
        a, b = name.split("+", 1)
        return CombinedVerifier(make_verifier(a), make_verifier(b))
    if name not in VERIFIERS:
        raise ConfigError(f"unknown verifier {name!r}; known: {', '.join(VERIFIERS)} (or a+b)")
    return VERIFIERS[name](**kw)
