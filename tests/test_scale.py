"""testtime.scale: answers, problems, verifiers, strategies, allocation and the bench, on a scripted
generator (deterministic, no model) — the real SmolLM2 path is in test_scale_smollm2.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import pytest

from testtime.cli import main
from testtime.errors import ConfigError, DataError
from testtime.scale.allocation import ComputeOptimal, ComputeOptimalPolicy, pilot_difficulty
from testtime.scale.answers import answers_equal, extract_answer, normalise, sympy_equal
from testtime.scale.bench import ScaleBenchConfig, pool_estimates, prepare, run_problems, write_reports
from testtime.scale.generators import Generator, check_generate_args, cut_at_stop
from testtime.scale.problems import gsm8k_problems, load_problems, math500_problems, reasoning_gym_problems
from testtime.scale.strategies import (
    DVTS,
    BeamSearch,
    BestOfN,
    FirstFinish,
    Greedy,
    IterativeDeepening,
    MajorityVote,
    Sampling,
    WeightedVote,
    make_strategy,
    select_majority,
)
from testtime.scale.types import Candidate, Completion, Problem
from testtime.scale.verifiers import (
    ArithmeticStepVerifier,
    ExactAnswerVerifier,
    LogprobVerifier,
    MajorityVerifier,
    StepVerifier,
    Verifier,
    aggregate,
    make_verifier,
    split_steps,
)


class ScriptedGenerator:
    """Answers from a script: `script(prompt, k)` gives the full response of sample k; honours stop strings
    (one step per call when stop is given), max_new_tokens (1 token = 1 word) and greedy (k = 0 always)."""

    name = "scripted"

    def __init__(self, script: Callable[[str, int], str]) -> None:
        self.script = script
        self.calls: list[dict] = []

    def format_chat(self, question: str, system: str | None = None) -> str:
        return f"Q: {question}\nA:"

    def generate(self, prompts: Sequence[str], n: int = 1, *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] = (), seed: int = 0, max_time: float | None = None):  # fmt: skip
        check_generate_args(prompts, n, max_new_tokens, temperature, top_p, max_time)
        self.calls.append(
            {"prompts": list(prompts), "n": n, "stop": tuple(stop), "max_new_tokens": max_new_tokens}
        )
        out = []
        for p in prompts:
            base = p.split("\nA:", 1)[0] + "\nA:"
            done = p[len(base) :]
            row = []
            for k in range(n):
                kk = 0 if temperature == 0 else k + seed
                full = self.script(base, kk)
                if not full.startswith(done):  # continue the prefix like some other sample would
                    full = next(
                        (f for f in (self.script(base, kk + j) for j in range(16)) if f.startswith(done)),
                        done,
                    )
                rest = full[len(done) :]
                text, hit = cut_at_stop(rest, stop)
                words = text.split(" ")
                reason = "stop" if hit else "eos"
                if len(words) > max_new_tokens:
                    text, reason = " ".join(words[:max_new_tokens]), "length"
                ntok = max(1, len(text.split(" ")))
                row.append(Completion(text, ntok, reason, [-0.1 * (k % 3 + 1)] * ntok, 0.001))
            out.append(row)
        return out


def arithmetic_script(answers: dict[int, str]) -> Callable[[str, int], str]:
    """Sample k writes '2 + 3 = <v>' then 'Answer: <v>' with v = answers.get(k % 8, '5')."""

    def script(prompt: str, k: int) -> str:
        v = answers.get(k % 8, "5")
        return f"2 + 3 = {v}\nAnswer: {v}"

    return script


PROBLEM = Problem("p0", "Calculate 2 + 3.", "5")


# ---------------------------------------------------------------------------------------------- answers
@pytest.mark.parametrize(
    ("text", "want"),
    [
        # 1. an explicitly stated final answer wins (the last one stated)
        ("so \\boxed{42} done", "42"),
        ("\\boxed{\\frac{1}{2}} and later 7 = 7", "\\frac{1}{2}"),
        ("blah #### 1,234", "1234"),
        ("The answer is -7.", "-7"),
        ("Answer: 3.0", "3"),
        ("Final answer is: 11.", "11"),
        ("12 + 3 = 15, so the answer is 15. Check: 15 - 3 = 12", "15"),
        ("Answer: 4\nWait, 2 + 3 = 5.\nAnswer: 5", "5"),
        ("The answer is 17 + 25 = 42.", "42"),  # an answer written as an equation gives its result
        ("The answer is (2 + 3) * 2 = 10", "10"),
        # 2. else the result of the last equation, not a restated operand
        ("17 + 25 = 32. Let me double-check: it is indeed 17 + 25.", "32"),
        ("2 + 3 = 5 and then 6", "5"),
        ("8 + 3 = 11\n11 + 4 = 15\nso 3", "15"),
        ("5 + 33 equals 38, I think, from 5 and 33", "38"),
        ("x <= 3 and y == 4 give 9", "9"),  # comparisons are not equations: 3. applies
        # 3. else the last number
        ("I would add 5 to 58, which is 80, right", "80"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, want: str | None) -> None:
    assert extract_answer(text) == want


def test_extract_answer_on_the_issue_example() -> None:
    """`scale solve "Calculate 17 + 25."` once answered 25 from this sample (the last number)."""
    text = "To calculate 17 + 25, add them: 17 + 25 = 32. Let me double-check: 32 is the sum, it is indeed 17 + 25."
    assert extract_answer(text) == "32"
    assert normalise("80,") == "80"  # a number followed by a comma


def test_answer_equivalence() -> None:
    assert answers_equal("0.5", "1/2") and answers_equal("1,000", "1000") and answers_equal("-0", "0")
    assert not answers_equal("2", "3") and not answers_equal(None, "3")
    assert sympy_equal("2*x + x", "3*x") and sympy_equal("\\frac{1}{2}", "0.5")
    assert not sympy_equal("x +", "x")  # unparsable: not equal, no exception
    assert normalise(" $12$. ") == "12"


# --------------------------------------------------------------------------------------------- problems
def test_reasoning_gym_problems_are_seeded_and_scored() -> None:
    a = reasoning_gym_problems(n=5, seed=3)
    b = reasoning_gym_problems(n=5, seed=3)
    c = reasoning_gym_problems(n=5, seed=4)
    assert [p.question for p in a] == [p.question for p in b] != [p.question for p in c]
    for p in a:
        assert p.score(p.answer) == 1.0 and p.score(None) == 0.0
        assert p.score(str(int(p.answer) + 1)) == 0.0
    with pytest.raises(ConfigError, match="reasoning-gym task"):
        reasoning_gym_problems("no_such_task", n=2)
    with pytest.raises(ConfigError, match="at least one"):
        reasoning_gym_problems(n=0)


def test_jsonl_loaders(tmp_path) -> None:
    g = tmp_path / "gsm.jsonl"
    g.write_text(json.dumps({"question": "1+1?", "answer": "add\n#### 2"}) + "\n\n"
                 + json.dumps({"question": "q", "answer": "#### 1,000"}) + "\n")  # fmt: skip
    ps = gsm8k_problems(g)
    assert [p.answer for p in ps] == ["2", "1000"] and ps[0].score("2.0") == 1.0
    m = tmp_path / "math.jsonl"
    m.write_text(
        json.dumps({"problem": "half?", "answer": "\\frac{1}{2}", "level": 2, "unique_id": "u1"}) + "\n"
    )
    (p,) = math500_problems(m)
    assert p.id == "u1" and p.metadata["level"] == 2 and p.score("0.5") == 1.0 and p.score("2") == 0.0
    assert load_problems(f"gsm8k:{g}", n=1)[0].answer == "2"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: not valid JSON"):
        gsm8k_problems(bad)
    bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(DataError, match="####"):
        gsm8k_problems(bad)
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match="lacks 'problem'"):
        math500_problems(bad)
    with pytest.raises(DataError, match="not found"):
        gsm8k_problems(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="unknown problem source"):
        load_problems("csv:x")


# -------------------------------------------------------------------------------------------- verifiers
def test_arithmetic_step_verifier_never_reads_gold() -> None:
    v = ArithmeticStepVerifier()
    assert isinstance(v, StepVerifier) and not v.uses_gold
    good = Candidate("First 12 + 30 = 42\nthen 42 - 2 = 40\nAnswer: 40", "40", 10)
    wrong_step = Candidate("12 + 30 = 43\nAnswer: 43", "43", 5)
    inconsistent = Candidate("12 + 30 = 42\nAnswer: 41", "41", 5)
    no_math = Candidate("I think so\nAnswer: 40", "40", 5)
    no_answer = Candidate("I think so", None, 3)
    partial = Candidate("12 + 30 = 43", None, 3, finished=False)
    prob = Problem("x", "q", "999")
    scores = v.score_steps(prob, [good, wrong_step, inconsistent, no_math, no_answer, partial])
    assert scores[0] == [1.0, 1.0, 1.0, 1.0]  # three steps + the final consistency check
    assert scores[1] == [0.0, 1.0, 1.0] and scores[2][-1] == 0.0
    assert scores[3] == [1.0, 1.0, 0.5] and scores[4][-1] == 0.0 and scores[5] == [0.0]
    assert v.score(prob, [good, wrong_step, no_math]) == [1.0, 0.0, 0.5]  # min over steps
    # spaces, words around the equation, parentheses; text after the number does not hide an error
    assert v.step_score("1. Add 5 to 33: 5 + 33 = 35") == 0.0
    assert v.step_score("adding them: 84 + 67 = 15<number>") == 0.0
    assert v.step_score(" 3 * (2 + 1) = 9 ") == 1.0 and v.step_score("7 / 2 = 3") == 0.0
    assert v.step_score("no equations here") == 1.0 and v.equations("no equations here") == []


def test_other_verifiers_and_aggregation() -> None:
    cands = [Candidate("a", "5", 1, logprobs=[-0.1, -0.1]), Candidate("b", "5", 1, logprobs=[-2.0]),
             Candidate("c", "4", 1, logprobs=None)]  # fmt: skip
    assert ExactAnswerVerifier().score(PROBLEM, cands) == [1.0, 1.0, 0.0] and ExactAnswerVerifier.uses_gold
    lp = LogprobVerifier().score(PROBLEM, cands)
    assert lp[0] > lp[1] > lp[2] == 0.0
    assert MajorityVerifier().score(PROBLEM, cands) == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    assert isinstance(LogprobVerifier(), Verifier)
    assert aggregate([0.9, 0.2, 0.8], "last") == 0.8 and aggregate([0.9, 0.2, 0.8], "min") == 0.2
    assert aggregate([0.5, 0.5], "prod") == 0.25 and aggregate([], "min") == 0.0
    with pytest.raises(ConfigError, match="unknown aggregation"):
        aggregate([1.0], "max")
    combo = make_verifier("arith_steps+logprob")
    assert combo.name == "arith_steps+logprob" and not combo.uses_gold
    with pytest.raises(ConfigError, match="unknown verifier"):
        make_verifier("oracle")
    assert split_steps("a\n\n b \n") == ["a", "b"]


# ------------------------------------------------------------------------------------------- strategies
def test_selection_strategies_on_a_scripted_model() -> None:
    # samples 0..7 answer 5,5,5,7,7,7,7,9 -> majority 7 (wrong), best-of-N by the arithmetic checker 5
    gen = ScriptedGenerator(
        arithmetic_script({0: "5", 1: "5", 2: "5", 3: "7", 4: "7", 5: "7", 6: "7", 7: "9"})
    )
    assert isinstance(gen, Generator)
    v = ArithmeticStepVerifier()
    maj = MajorityVote(n=8).run(PROBLEM, gen)
    assert (
        maj.answer == "7" and maj.n_samples == 8 and maj.n_tokens == sum(c.n_tokens for c in maj.candidates)
    )
    assert BestOfN(n=8).run(PROBLEM, gen, v).answer == "5"
    assert WeightedVote(n=8).run(PROBLEM, gen, v).answer == "5"  # wrong arithmetic votes with weight 0
    g = Greedy().run(PROBLEM, gen)
    assert g.answer == "5" and g.n_samples == 1 and gen.calls[-1]["n"] == 1
    with pytest.raises(ConfigError, match="needs a verifier"):
        BestOfN(n=2).run(PROBLEM, gen, None)
    assert select_majority([]) is None


def test_first_finish_takes_the_shortest_and_charges_early_stop() -> None:
    texts = {0: "2 + 3 = 5 and a long long long detour\nAnswer: 5", 1: "Answer: 6", 2: "2 + 3 = 5\nAnswer: 5"}
    gen = ScriptedGenerator(lambda p, k: texts[k % 3])
    r = FirstFinish(n=3).run(PROBLEM, gen)
    assert r.answer == "6"
    shortest = min(c.n_tokens for c in r.candidates)
    assert r.n_tokens == 3 * shortest < sum(c.n_tokens for c in r.candidates)


def test_beam_search_and_dvts_search_steps_with_the_verifier() -> None:
    # step 1 is right for even samples, wrong for odd; a step-level verifier must keep the right prefix
    def script(prompt: str, k: int) -> str:
        return "2 + 3 = 5\n5 * 2 = 10\nAnswer: 10" if k % 2 == 0 else "2 + 3 = 6\n6 * 2 = 12\nAnswer: 12"

    prob = Problem("q", "Calculate (2 + 3) * 2.", "10")
    for strat in (BeamSearch(n=4, width=2, max_steps=5), DVTS(n=4, width=2, max_steps=5)):
        gen = ScriptedGenerator(script)
        r = strat.run(prob, gen, ArithmeticStepVerifier())
        assert r.answer == "10", strat.name
        assert all(c["stop"] == ("\n",) for c in gen.calls[:-1])  # steps end at a newline
        assert all(len(c["prompts"]) * c["n"] == 4 for c in gen.calls)  # N live expansions per round
        assert r.n_tokens > 0 and r.info["rounds"] >= 3
    with pytest.raises(ConfigError, match="step-level verifier"):
        BeamSearch(n=4).run(prob, ScriptedGenerator(script), MajorityVerifier())
    # several problems searched together (one generator call per round) give the same results as one by one
    probs = [prob, Problem("r", "Calculate 2 + 3, then double it.", "10")]
    for strat in (
        BeamSearch(n=4, width=2, max_steps=5),
        DVTS(n=4, width=2, max_steps=5),
        IterativeDeepening(n=2),
    ):
        gen = ScriptedGenerator(script)
        together = strat.run_many(probs, gen, ArithmeticStepVerifier())
        calls = len(gen.calls)
        alone = [strat.run(p, ScriptedGenerator(script), ArithmeticStepVerifier()) for p in probs]
        assert [(r.answer, r.n_tokens, r.text) for r in together] == [
            (r.answer, r.n_tokens, r.text) for r in alone
        ]
        assert calls == max(r.info["rounds"] for r in together)  # generator calls


def test_iterative_deepening_appends_triggers_with_growing_budgets() -> None:
    long = " ".join(["x"] * 50) + " 2 + 3 = 5 Answer: 5"
    gen = ScriptedGenerator(lambda p, k: long)
    r = IterativeDeepening(n=2, b0=8, gamma=2.0, sampling=Sampling(max_new_tokens=40)).run(PROBLEM, gen)
    budgets = [c["max_new_tokens"] for c in gen.calls]
    assert budgets == [8, 16, 16]  # 8, then 16, then what is left of 40
    assert r.candidates[0].text.count("Wait, let me check") == 2
    assert all(c.n_tokens <= 40 for c in r.candidates)
    with pytest.raises(ConfigError, match="b0"):
        IterativeDeepening(b0=0).run(PROBLEM, gen)


def test_make_strategy_errors() -> None:
    assert make_strategy("majority", n=3).n == 3
    with pytest.raises(ConfigError, match="unknown strategy"):
        make_strategy("mcts")
    with pytest.raises(ConfigError, match="no option"):
        make_strategy("majority", beams=3)
    with pytest.raises(ConfigError, match="positive integer"):
        make_strategy("best_of_n", n=0)


def test_generate_arguments_are_checked() -> None:
    gen = ScriptedGenerator(arithmetic_script({}))
    for kw, msg in [({"n": 0}, "n must be"), ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_time": 0.0}, "max_time")]:  # fmt: skip
        with pytest.raises(ConfigError, match=msg):
            gen.generate(["p"], **kw)
    with pytest.raises(DataError, match="no prompts"):
        gen.generate([])
    with pytest.raises(ConfigError, match="list of strings"):
        gen.generate("p")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="must be a string"):
        gen.generate([1])  # type: ignore[list-item]
    assert gen.calls == []


# ------------------------------------------------------------------------------------------- allocation
def test_compute_optimal_policy_spends_where_it_pays() -> None:
    rows = []
    for i in range(20):
        hard = i >= 10
        rows += [{"problem": i, "difficulty": 0.6 if hard else 0.0, "strategy": "greedy", "n": 1,
                  "correct": 0.0 if hard else 1.0, "tokens": 10},
                 {"problem": i, "difficulty": 0.6 if hard else 0.0, "strategy": "majority", "n": 8,
                  "correct": 1.0, "tokens": 80}]  # fmt: skip
    pol = ComputeOptimalPolicy(n_bins=2).fit(rows)
    assert pol.choose(0.0, 100) == ("greedy", 1)  # easy: equal accuracy, cheaper wins
    assert pol.choose(0.6, 100) == ("majority", 8)  # hard: worth the samples
    assert pol.choose(0.6, 20) == ("greedy", 1)  # over budget: best that fits
    assert pol.choose(0.6, 1) == ("greedy", 1)  # nothing fits: the cheapest
    with pytest.raises(ConfigError, match="not fitted"):
        ComputeOptimalPolicy().choose(0.1, 10)
    assert pilot_difficulty(
        [Candidate("", "1", 1), Candidate("", "1", 1), Candidate("", "2", 1)]
    ) == pytest.approx(1 / 3)
    assert pilot_difficulty([Candidate("", None, 1)]) == 1.0
    gen = ScriptedGenerator(arithmetic_script({0: "5", 1: "6", 2: "7", 3: "8"}))  # pilot disagrees: hard
    r = ComputeOptimal(pol, budget_tokens=500, pilot_n=4).run(PROBLEM, gen)
    assert r.info["chosen"] == "majority@8" and r.n_samples == 12


# ------------------------------------------------------------------------------------------------ bench
def _bench_cfg(**kw) -> ScaleBenchConfig:
    base = {"problems": "gym:basic_arithmetic", "n_problems": 6, "max_n": 4, "subsets": 8, "search_ns": [2, 4],
            "search": ["beam_search", "dvts", "iterative_deepening"], "width": 2, "max_steps": 4,
            "verifier": "arith_steps+logprob"}  # fmt: skip
    return ScaleBenchConfig(**{**base, **kw})


def test_bench_writes_curves_and_resumes_without_regenerating(tmp_path) -> None:
    problems = reasoning_gym_problems(n=6, seed=0)
    gold = {p.question.split("Calculate ")[1].split(" Think")[0]: p.answer for p in problems}

    def script(prompt: str, k: int) -> str:  # right for k even, off by one for k odd
        q = prompt.split("Q: Calculate ")[1].split(" Think")[0]
        expr = q.rstrip(".")
        v = int(gold[q]) + (k % 2)
        return f"{expr} = {v}\nAnswer: {v}"

    cfg = _bench_cfg()
    prepare(tmp_path, cfg, {"test": "1"})
    gen = ScriptedGenerator(script)
    recs = run_problems(problems, gen, make_verifier(cfg.verifier), cfg, tmp_path, chunk=4)
    assert len(recs) == 6 and len(list((tmp_path / "problems").glob("*.json"))) == 6
    rows = write_reports(recs, cfg, tmp_path)
    by = {(r["strategy"], r["n"]): r for r in rows}
    assert by[("greedy", 1)]["accuracy"] == 100.0  # greedy is sample 0
    assert by[("pass@n", 4)]["accuracy"] == 100.0
    assert by[("best_of_n", 4)]["accuracy"] == 100.0  # the arithmetic checker rejects the off-by-one samples
    assert 0.0 < by[("majority", 1)]["accuracy"] < 100.0
    assert by[("majority", 4)]["tokens_per_problem"] == pytest.approx(
        4 * by[("majority", 1)]["tokens_per_problem"]
    )
    for k in ("beam_search", "dvts", "iterative_deepening"):
        assert (k, 2) in by and (k, 4) in by
    assert any(r["strategy"] == "compute_optimal" for r in rows)
    # the policy fitted on all problems, for `scale solve --strategy compute_optimal --policy policy.json`
    pol = ComputeOptimalPolicy.load(tmp_path / "policy.json")
    assert any(("greedy", 1) in b for b in pol.table) and pol.options["beam_search"]["width"] == 2
    co = make_strategy("compute_optimal", policy=str(tmp_path / "policy.json"))
    assert (
        co.run(problems[0], ScriptedGenerator(script), make_verifier(cfg.verifier)).answer
        == problems[0].answer
    )
    for f in ("curves.csv", "per_problem.csv", "summary.md", "accuracy_vs_n.png", "accuracy_vs_tokens.png",
              "accuracy_vs_seconds.png"):  # fmt: skip
        assert (tmp_path / f).stat().st_size > 0
    assert "| majority |" in (tmp_path / "summary.md").read_text()
    # resume: nothing is generated again
    gen2 = ScriptedGenerator(script)
    recs2 = run_problems(problems, gen2, make_verifier(cfg.verifier), cfg, tmp_path)
    assert gen2.calls == [] and recs2 == recs
    # a different configuration refuses the directory
    with pytest.raises(ConfigError, match="different configuration"):
        prepare(tmp_path, _bench_cfg(seed=1), {})
    # more search settings only add those: the pools are reused
    more = _bench_cfg(search=["beam_search"], search_ns=[3])
    prepare(tmp_path, more, {})
    saved = json.loads((tmp_path / "config.json").read_text())["config"]
    assert saved["search_ns"] == [2, 3, 4] and saved["search"] == [
        "beam_search",
        "dvts",
        "iterative_deepening",
    ]
    gen3 = ScriptedGenerator(script)
    recs3 = run_problems(problems, gen3, make_verifier(cfg.verifier), more, tmp_path, chunk=6)
    assert gen3.calls and all(c["stop"] in ((), ("\n",)) for c in gen3.calls)  # only step-level search calls
    assert all("beam_search@3" in r["search"] and "dvts@2" in r["search"] for r in recs3)
    # a setting run on only some problems is left out of the curves and named in the summary
    del recs3[0]["search"]["beam_search@3"]
    rows3 = write_reports(recs3, more, tmp_path)
    assert ("beam_search", 3) not in {(r["strategy"], r["n"]) for r in rows3}
    assert "beam_search@3 (5)" in (tmp_path / "summary.md").read_text()


def test_pool_estimates_are_exact_at_full_pool() -> None:
    rec = {"pool": [{"text": "", "answer": a, "n_tokens": 10, "finished": True, "correct": float(a == "5"),
                     "confidence": s} for a, s in [("4", 0.1), ("5", 0.9), ("4", 0.2)]], "pool_seconds": 3.0}  # fmt: skip
    est = pool_estimates(rec, 3, subsets=5, seed=0)
    assert est["majority"] == (0.0, 30.0, 3.0) and est["best_of_n"][0] == 1.0 and est["pass@n"][0] == 1.0
    one = pool_estimates(rec, 1, subsets=200, seed=0)
    assert one["majority"][0] == pytest.approx(1 / 3, abs=0.1)  # mean over random single samples
    with pytest.raises(DataError, match="cannot estimate"):
        pool_estimates(rec, 4, subsets=1, seed=0)


def test_bench_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown search"):
        ScaleBenchConfig(search=["mcts"]).check()
    with pytest.raises(ConfigError, match="every bench evaluates it"):
        ScaleBenchConfig(search=["compute_optimal"]).check()
    with pytest.raises(ConfigError, match=">= 1"):
        ScaleBenchConfig(max_n=0).check()


def test_cli_scale_errors(capsys) -> None:
    assert main(["scale", "strategies"]) == 0
    assert "beam_search" in capsys.readouterr().out
    assert main(["scale", "bench", "--search", "mcts"]) == 2
    assert "unknown search strategy" in capsys.readouterr().err
    assert main(["scale", "solve", "   "]) == 2
    assert "question is empty" in capsys.readouterr().err
    assert main(["scale", "solve", "2+2?", "--strategy", "nope"]) == 2
    assert "unknown strategy" in capsys.readouterr().err
    assert main(["scale", "solve", "2+2?", "--backend", "openai"]) == 2
    assert "--base-url" in capsys.readouterr().err


# ------------------------------------------------------------------- scale solve output, compute_optimal
def _issue_script(prompt: str, k: int) -> str:
    """Even samples compute 17 + 25 right and state it; odd ones get it wrong and restate the operands."""
    if k % 2 == 0:
        return "17 + 25 = 42\nAnswer: 42"
    return "17 + 25 = 32. Let me double-check: it is indeed 17 + 25."


def test_solve_shows_every_sample_answer_and_the_votes(monkeypatch, capsys) -> None:
    import testtime.scale.cli as scale_cli

    monkeypatch.setattr(scale_cli, "_generator", lambda args: ScriptedGenerator(_issue_script))
    q = ["scale", "solve", "Calculate 17 + 25.", "--strategy", "majority", "-n", "3"]
    assert main([*q, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["answer"] for s in out["samples"]] == ["42", "32", "42"]  # 32, not the restated 25
    assert out["votes"] == {"42": 2.0, "32": 1.0} and out["answer"] == "42"
    assert main(q) == 0
    text = capsys.readouterr().out
    assert "votes (samples): 42: 2, 32: 1" in text and "answer: 42" in text
    assert "the last equation" in " ".join(text.split())  # the extraction rule is shown
    # weighted vote shows the verifier's weights; best-of-N each sample's score
    assert (
        main(["scale", "solve", "Calculate 17 + 25.", "--strategy", "weighted_vote", "-n", "3", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert set(out["votes"]) == {"42", "32"} and out["votes"]["42"] > out["votes"]["32"]
    assert main(["scale", "solve", "Calculate 17 + 25.", "--strategy", "best_of_n", "-n", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["votes"] is None and all(s["score"] is not None for s in out["samples"])
    assert main([*q, "--policy", "p.json"]) == 2
    assert "--policy applies to --strategy compute_optimal only" in capsys.readouterr().err


def test_compute_optimal_is_a_named_strategy(monkeypatch, capsys, tmp_path) -> None:
    import testtime.scale.cli as scale_cli
    from testtime.scale.strategies import STRATEGIES

    assert STRATEGIES["compute_optimal"] is ComputeOptimal
    # without a policy: the pilot's answer when the pilot agrees (no more samples) ...
    agree = make_strategy("compute_optimal", n=8).run(PROBLEM, ScriptedGenerator(arithmetic_script({})))
    assert agree.answer == "5" and agree.n_samples == 4 and agree.info["difficulty"] == 0.0
    # ... else majority vote over up to n samples in all, within the token budget
    gen = ScriptedGenerator(
        arithmetic_script({0: "5", 1: "6", 2: "5", 3: "7", 4: "5", 5: "5", 6: "5", 7: "5"})
    )
    hard = make_strategy("compute_optimal", n=8).run(PROBLEM, gen)
    assert hard.n_samples == 8 and hard.info["chosen"] == "majority@8" and hard.answer == "5"
    assert [c["n"] for c in gen.calls] == [
        4,
        4,
    ]  # the pilot, then 4 more with a new seed (not the pilot again)
    assert [c.answer for c in hard.candidates] == ["5", "6", "5", "7", "6", "5", "7", "5"]
    small = make_strategy("compute_optimal", n=8, budget_tokens=40).run(
        PROBLEM, ScriptedGenerator(gen.script)
    )
    per_sample = small.candidates[0].n_tokens
    assert small.n_samples == 4 + (40 - 4 * per_sample) // per_sample < 8
    # with a policy (object or file), the policy chooses
    rows = [{"problem": i, "difficulty": 0.6, "strategy": "majority", "n": 2, "correct": 1.0, "tokens": 10}
            for i in range(4)]  # fmt: skip
    pol = ComputeOptimalPolicy(n_bins=1).fit(rows)
    pol.save(tmp_path / "policy.json")
    assert ComputeOptimalPolicy.load(tmp_path / "policy.json") == pol
    r = make_strategy("compute_optimal", policy=str(tmp_path / "policy.json")).run(
        PROBLEM, ScriptedGenerator(gen.script)
    )
    assert r.info["chosen"] == "majority@2" and r.n_samples == 4 + 2
    for content, match in [("{", "cannot read the policy"), ('{"n_bins": 1}', "not a compute-optimal policy"),
                           ('{"n_bins": 1, "edges": [], "table": [[{"strategy": "mcts", "n": 1, "accuracy": 1, '
                            '"tokens": 1}]]}', "unknown strategies: mcts")]:  # fmt: skip
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(DataError, match=match):
            make_strategy("compute_optimal", policy=str(tmp_path / "bad.json"))
    with pytest.raises(DataError, match="policy file not found"):
        make_strategy("compute_optimal", policy=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="pilot_n"):
        make_strategy("compute_optimal", pilot_n=0)
    # on the command line
    assert main(["scale", "strategies"]) == 0
    assert "compute_optimal" in capsys.readouterr().out
    monkeypatch.setattr(scale_cli, "_generator", lambda args: ScriptedGenerator(_issue_script))
    assert (
        main(["scale", "solve", "Calculate 17 + 25.", "--strategy", "compute_optimal", "-n", "6", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["chosen"] == "majority@6" and out["votes"] == {"42": 3.0, "32": 3.0} and out["n_samples"] == 6
    pol_args = ["--policy", str(tmp_path / "policy.json")]
    assert main(["scale", "solve", "Calculate 17 + 25.", "--strategy", "compute_optimal", *pol_args]) == 0
    assert "chose majority@2" in capsys.readouterr().out
