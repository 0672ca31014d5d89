"""Problem sets: seeded procedural problems from reasoning-gym, GSM8K and MATH-500 JSONL files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testtime.errors import ConfigError, DataError
from testtime.scale.answers import answers_equal, extract_answer
from testtime.scale.types import Problem

# the offline default: adding two numbers of 1-2 digits, which the 135M model gets right in about one
# sample of five when it reasons step by step (harder settings leave it near zero)
DEFAULT_TASK = "basic_arithmetic"
DEFAULT_TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2,
                         "operators": ("+",), "allow_parentheses": False, "allow_negation": False},
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
}  # fmt: skip


def reasoning_gym_problems(
    task: str = DEFAULT_TASK, n: int = 100, seed: int = 0, **options: Any
) -> list[Problem]:
    """`n` seeded problems of a reasoning-gym task, scored right (1) or wrong (0) by the task's own scorer."""
    try:
        import reasoning_gym
    except ImportError as e:
        raise ConfigError("reasoning-gym is not installed: pip install 'testtime[scale]'") from e
    if n < 1:
        raise ConfigError(f"need at least one problem, got n={n}")
    opts = {**DEFAULT_TASK_OPTIONS.get(task, {}), **options}
    try:
        ds = reasoning_gym.create_dataset(task, size=n, seed=seed, **opts)
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"cannot build reasoning-gym task {task!r} with {opts}: {e}") from e

    def scorer(pred: str | None, prob: Problem) -> float:
        # binary: the task's scorer gives partial credit when the gold answer is a substring of the
        # prediction ("14" for gold "4" scores 0.5); we count a prediction right only at full score
        # or when it is numerically equal to the gold answer
        entry = prob.metadata["entry"]
        return 1.0 if ds.score_answer(pred, entry) >= 1.0 or answers_equal(pred, prob.answer) else 0.0

    out = []
    for i, entry in enumerate(ds):
        out.append(Problem(f"{task}-{seed}-{i}", entry["question"], str(entry["answer"]), f"reasoning_gym:{task}",
                           {"entry": entry}, scorer))  # fmt: skip
    return out


def _read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"problem file not found: {p}")
    rows = []
    with p.open(encoding="utf-8") as f:
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{k}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{p}:{k}: each line must be a JSON object")
            rows.append(row)
    if not rows:
        raise DataError(f"{p} holds no problems")
    return rows


def gsm8k_problems(path: str | Path, n: int | None = None) -> list[Problem]:
    """GSM8K JSONL (`question`, `answer` ending in '#### <number>')."""
    out = []
    for k, row in enumerate(_read_jsonl(path)):
        if "question" not in row or "answer" not in row:
            raise DataError(f"{path}: line {k + 1} lacks 'question' or 'answer' (GSM8K format)")
        gold = extract_answer(str(row["answer"]).split("####")[-1]) if "####" in str(row["answer"]) else None
        if gold is None:
            raise DataError(f"{path}: line {k + 1}: answer has no '#### <number>' final answer")
        out.append(Problem(f"gsm8k-{k}", row["question"], gold, "gsm8k"))
    return out[:n] if n else out


def math500_problems(path: str | Path, n: int | None = None) -> list[Problem]:
    """MATH-500 JSONL (`problem`, `answer`; optional `unique_id`, `level`, `subject`), sympy-scored."""

    def scorer(pred: str | None, prob: Problem) -> float:
        return 1.0 if answers_equal(pred, prob.answer, use_sympy=True) else 0.0

    out = []
    for k, row in enumerate(_read_jsonl(path)):
        if "problem" not in row or "answer" not in row:
            raise DataError(f"{path}: line {k + 1} lacks 'problem' or 'answer' (MATH-500 format)")
        meta = {m: row[m] for m in ("level", "subject") if m in row}
        pid = str(row.get("unique_id", f"math500-{k}"))
        out.append(Problem(pid, row["problem"], str(row["answer"]), "math500", meta, scorer))
    return out[:n] if n else out


def load_problems(spec: str, n: int = 100, seed: int = 0) -> list[Problem]:
    """`gym:<task>` (reasoning-gym), `gsm8k:<path>` or `math500:<path>`."""
    kind, _, arg = spec.partition(":")
    if kind == "gym":
        return reasoning_gym_problems(arg or DEFAULT_TASK, n=n, seed=seed)
    if kind == "gsm8k":
        return gsm8k_problems(arg, n)
    if kind == "math500":
        return math500_problems(arg, n)
    raise ConfigError(f"unknown problem source {spec!r}; use gym:<task>, gsm8k:<path> or math500:<path>")
