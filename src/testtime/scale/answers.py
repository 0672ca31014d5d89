"""Answer extraction from free text and answer equivalence (exact, numeric, sympy)."""

from __future__ import annotations

import re
from fractions import Fraction

_NUM = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_OP = r"\s*(?:[-+*/x×÷^]|\\times|\\cdot|\\div)\s*"
# "=" (not part of "==", "<=", ">=", "!="), or the words "equals" / "is equal to"
_EQ = r"(?:(?<![<>!=])=(?!=)|\bequals\b|\bis\s+equal\s+to\b)"
# 1. an explicitly stated final answer (the last one wins); an answer written as an equation
#    ("the answer is 17 + 25 = 42") gives its result
_STATED = [
    re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}"),
    re.compile(r"####\s*(" + _NUM + ")"),
    re.compile(
        r"(?:final answer|answer)\s*(?:is|:|=)?\s*:?\s*\$?\s*"
        r"(?:\(?" + _NUM + r"(?:" + _OP + r"\(?" + _NUM + r"\)?)+\)?\s*" + _EQ + r"\s*\$?\s*)?(" + _NUM + ")",
        re.IGNORECASE,
    ),
]
# 2. the result of the last equation: the number right of the last "=" (or "equals")
_EQUATION_RESULT = re.compile(_EQ + r"\s*\$?\s*(" + _NUM + ")", re.IGNORECASE)
# 3. the last number
_LAST_NUM = re.compile(_NUM)


def extract_answer(text: str) -> str | None:
    """The final answer of a solution text, by the first rule that finds one (normalised):

    1. an explicitly stated answer, the last one in the text: ``\\boxed{x}``, ``#### x``,
       ``Answer: x``, ``the answer is x``, ``final answer: x`` (an answer written as an equation,
       ``the answer is 17 + 25 = 42``, gives its result, 42);
    2. else the result of the last equation: the number right of the last ``=`` (or ``equals``),
       so ``17 + 25 = 32 ... it is indeed 17 + 25.`` gives 32, what the solution computed, not 25;
    3. else the last number in the text; None when there is none.
    """
    if not text:
        return None
    for pat in _STATED:
        found = pat.findall(text)
        if found:
            return normalise(found[-1])
    for pat in (_EQUATION_RESULT, _LAST_NUM):
        found = pat.findall(text)
        if found:
            return normalise(found[-1])
    return None


def normalise(ans: str) -> str:
    """Canonical text of an answer: trimmed, no thousands separators, no trailing '.', ',', '$' or '%'."""
    a = ans.strip()
    for _ in range(2):
        a = a.strip().strip("$").rstrip(".,").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", a):
        a = a.replace(",", "")
    a = a.rstrip("%").strip()
    if re.fullmatch(r"-?\d+\.0+", a):
        a = a.split(".")[0]
    if a == "-0":
        a = "0"
    return a


def _as_number(a: str) -> Fraction | None:
    try:
        return Fraction(a)
    except (ValueError, ZeroDivisionError):
        return None


def sympy_equal(a: str, b: str) -> bool:
    """True when the two expressions are mathematically equal (sympy; LaTeX-ish input tolerated)."""
    try:
        import sympy
        from sympy.parsing.sympy_parser import (
            implicit_multiplication_application,
            parse_expr,
            standard_transformations,
        )
    except ImportError:  # pragma: no cover - sympy is a dependency of the scale extra
        return False
    tr = (*standard_transformations, implicit_multiplication_application)

    def parse(s: str):
        s = s.replace("\\frac", "").replace("\\left", "").replace("\\right", "").replace("\\cdot", "*")
        s = re.sub(r"\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = s.replace("{", "(").replace("}", ")").replace("^", "**").replace("\\", "")
        return parse_expr(s, transformations=tr, evaluate=True)

    try:
        diff = sympy.simplify(parse(a) - parse(b))
        return bool(diff == 0)
    except Exception:  # parse failures of free text are "not equal", never an error
        return False


def answers_equal(predicted: str | None, gold: str, *, use_sympy: bool = True) -> bool:
    """Exact match after normalisation, then exact numeric match, then (optionally) sympy equivalence."""
    if predicted is None:
        return False
    p, g = normalise(predicted), normalise(gold)
    if p == g:
        return True
    pn, gn = _as_number(p), _as_number(g)
    if pn is not None and gn is not None:
        return pn == gn
    return use_sympy and sympy_equal(p, g)
