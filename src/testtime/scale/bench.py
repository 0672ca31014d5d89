"""`testtime scale bench`: accuracy vs compute of every strategy on seeded problems.

Per problem (cached, so an interrupted run resumes): one greedy solution, a pool of `max_n`
samples, and the search strategies at their N. Sampling strategies at N < max_n are estimated from
random size-N subsets of the pool (mean over `subsets` draws), which is the usual way to draw these
curves without re-sampling. Outputs: config.json, problems/<id>.json, per_problem.csv, curves.csv,
summary.md, accuracy_vs_n.png, accuracy_vs_tokens.png, accuracy_vs_seconds.png.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from testtime.errors import ConfigError, DataError
from testtime.scale.allocation import ComputeOptimalPolicy, pilot_difficulty
from testtime.scale.strategies import (
    DVTS,
    BeamSearch,
    IterativeDeepening,
    Sampling,
    first_finish_tokens,
    prompt_for,
    select_best,
    select_first_finish,
    select_majority,
    to_candidate,
)
from testtime.scale.types import Candidate, Problem
from testtime.utils import atomic_write_json, atomic_write_text

POOL_STRATEGIES = ("majority", "weighted_vote", "best_of_n", "first_finish", "pass@n")
SEARCH_STRATEGIES = ("beam_search", "dvts", "iterative_deepening")


@dataclass
class ScaleBenchConfig:
    """What a scale benchmark runs (recorded in config.json)."""

    problems: str = "gym:basic_arithmetic"
    n_problems: int = 100
    seed: int = 0
    max_n: int = 16
    subsets: int = 64
    search_ns: list[int] = field(default_factory=lambda: [4, 8, 16])
    search: list[str] = field(default_factory=lambda: ["beam_search"])
    width: int = 4
    max_steps: int = 10
    step_tokens: int = 64
    verifier: str = "arith_steps+logprob"
    sampling: dict[str, Any] = field(default_factory=lambda: asdict(Sampling()))
    generator: str = ""
    pilot_n: int = 4

    def check(self) -> None:
        if self.max_n < 1 or self.n_problems < 1 or self.subsets < 1:
            raise ConfigError("max_n, n_problems and subsets must be >= 1")
        bad = [s for s in self.search if s not in SEARCH_STRATEGIES]
        if bad:
            note = (
                " (compute_optimal is not a search: every bench evaluates it from the sampled pools and "
                "writes its policy to policy.json)"
                if "compute_optimal" in bad
                else ""
            )
            raise ConfigError(
                f"unknown search strategy {', '.join(bad)}; known: {', '.join(SEARCH_STRATEGIES)}{note}"
            )
        if any(n < 1 for n in self.search_ns):
            raise ConfigError("search N values must be >= 1")


def _cand_dict(c: Candidate, problem: Problem) -> dict[str, Any]:
    return {"text": c.text, "answer": c.answer, "n_tokens": c.n_tokens, "finished": c.finished,
            "correct": problem.score(c.answer),
            "confidence": (float(np.exp(np.mean(c.logprobs))) if c.logprobs else 0.0)}  # fmt: skip


def _solve_pools(problems: Sequence[Problem], generator: Any, cfg: ScaleBenchConfig,
                 sampling: Sampling) -> list[dict[str, Any]]:  # fmt: skip
    """Greedy + a pool of max_n samples for several problems in one batched call each."""
    prompts = [prompt_for(generator, p, sampling) for p in problems]
    t0 = time.perf_counter()
    greedy = generator.generate(prompts, 1, max_new_tokens=sampling.max_new_tokens, temperature=0.0)
    t_greedy = (time.perf_counter() - t0) / len(problems)
    t0 = time.perf_counter()
    pools = generator.generate(prompts, cfg.max_n, max_new_tokens=sampling.max_new_tokens,
                               temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)  # fmt: skip
    t_pool = (time.perf_counter() - t0) / len(problems)
    out = []
    for p, g, pool in zip(problems, greedy, pools):
        cands = [to_candidate(c) for c in pool]
        gc = to_candidate(g[0])
        out.append({"greedy": {**_cand_dict(gc, p), "seconds": t_greedy},
                    "pool": [_cand_dict(c, p) for c in cands], "pool_seconds": t_pool})  # fmt: skip
    return out


def _search_many(problems: Sequence[Problem], generator: Any, verifier: Any, cfg: ScaleBenchConfig,
                 sampling: Sampling, name: str, n: int) -> list[dict[str, Any]]:  # fmt: skip
    """One search strategy at one N for several problems searched together."""
    if name == "beam_search":
        strat: Any = BeamSearch(n=n, width=cfg.width, max_steps=cfg.max_steps, step_tokens=cfg.step_tokens,
                                sampling=sampling)  # fmt: skip
    elif name == "dvts":
        strat = DVTS(
            n=n, width=cfg.width, max_steps=cfg.max_steps, step_tokens=cfg.step_tokens, sampling=sampling
        )
    else:
        strat = IterativeDeepening(n=n, sampling=sampling)
    return [{"answer": r.answer, "correct": p.score(r.answer), "n_tokens": r.n_tokens, "seconds": r.seconds,
             "text": r.text} for p, r in zip(problems, strat.run_many(problems, generator, verifier))]  # fmt: skip


def run_problems(problems: Sequence[Problem], generator: Any, verifier: Any, cfg: ScaleBenchConfig, out_dir: Path,
                 progress: Callable[[int, int], None] | None = None, chunk: int = 4) -> list[dict[str, Any]]:  # fmt: skip
    """Solve every problem, reusing what the cache holds: first greedy + the sample pool of every problem,
    then each search strategy at each N over all problems (so a run with more search settings only adds
    those). Returns the per-problem records."""
    cache = out_dir / "problems"
    cache.mkdir(parents=True, exist_ok=True)
    sampling = Sampling(**cfg.sampling)
    records: dict[str, dict[str, Any]] = {}
    for p in problems:
        f = cache / f"{p.id}.json"
        if f.is_file():
            # a torn file cannot exist (atomic writes) but a hand-edited one might: then it is redone
            with contextlib.suppress(json.JSONDecodeError):
                records[p.id] = json.loads(f.read_text())
    keys = [(name, n) for name in cfg.search for n in cfg.search_ns]
    total = len(problems) * (1 + len(keys))

    def done() -> int:
        return sum(1 + sum(f"{k}@{n}" in r.get("search", {}) for k, n in keys) for r in records.values())

    if progress:
        progress(done(), total)
    todo = [p for p in problems if p.id not in records]
    for k in range(0, len(todo), chunk):
        batch = todo[k : k + chunk]
        for p, rec in zip(batch, _solve_pools(batch, generator, cfg, sampling)):
            rec.update({"id": p.id, "question": p.question, "gold": p.answer, "search": {}})
            atomic_write_json(cache / f"{p.id}.json", rec)
            records[p.id] = rec
        if progress:
            progress(done(), total)
    for name, n in keys:
        key = f"{name}@{n}"
        missing = [p for p in problems if key not in records[p.id].setdefault("search", {})]
        for k in range(0, len(missing), chunk):
            batch = missing[k : k + chunk]
            for p, res in zip(batch, _search_many(batch, generator, verifier, cfg, sampling, name, n)):
                records[p.id]["search"][key] = res
                atomic_write_json(cache / f"{p.id}.json", records[p.id])
            if progress:
                progress(done(), total)
    return [records[p.id] for p in problems]


# --------------------------------------------------------------------------------------------- curves
def _search_keys(keys: Any) -> list[str]:
    """Search settings `name@n` in a fixed order (by name, then N), whatever order the records hold."""
    return sorted(keys, key=lambda k: (k.split("@")[0], int(k.split("@")[1])))


def _pool_cands(rec: dict[str, Any], verifier: Any = None) -> list[Candidate]:
    """The pool as candidates; with a verifier, scored now (from the stored text and confidence), so a
    report always reflects the configured verifier."""
    out = []
    for d in rec["pool"]:
        conf = float(d.get("confidence", 0.0))
        lps = [float(np.log(conf))] if conf > 0 else None  # geometric-mean probability round-trips exactly
        c = Candidate(d["text"], d["answer"], d["n_tokens"], d["finished"], logprobs=lps)
        c.correct = d["correct"]  # type: ignore[attr-defined]
        out.append(c)
    if verifier is not None:
        prob = Problem(rec.get("id", ""), rec.get("question", ""), rec.get("gold", ""))
        for c, sc in zip(out, verifier.score(prob, out)):
            c.score = float(sc)
    return out


def pool_estimates(rec: dict[str, Any], n: int, subsets: int, seed: int, verifier: Any = None,
                   cands: list[Candidate] | None = None) -> dict[str, tuple[float, float, float]]:  # fmt: skip
    """Expected (correct, tokens, seconds) of each pool strategy at N, over random size-N subsets of the pool
    (verifier scores for weighted vote and best-of-N from `verifier`, default the logprob confidence)."""
    if cands is None:
        from testtime.scale.verifiers import LogprobVerifier

        cands = _pool_cands(rec, verifier or LogprobVerifier())
    m = len(cands)
    if n > m:
        raise DataError(f"pool of {m} samples cannot estimate N={n}")
    rng = np.random.default_rng(seed)
    draws = [list(range(m))] if n == m else [list(rng.choice(m, n, replace=False)) for _ in range(subsets)]
    per_sample_s = rec["pool_seconds"] / m
    acc: dict[str, list[tuple[float, float, float]]] = {s: [] for s in POOL_STRATEGIES}
    for idx in draws:
        sub = [cands[i] for i in idx]
        toks = float(sum(c.n_tokens for c in sub))
        secs = per_sample_s * n
        scores = [c.score or 0.0 for c in sub]
        picks = {"majority": select_majority(sub), "weighted_vote": select_majority(sub, scores),
                 "best_of_n": select_best(sub, scores), "first_finish": select_first_finish(sub)}  # fmt: skip
        for s, c in picks.items():
            t = float(first_finish_tokens(sub)) if s == "first_finish" else toks
            acc[s].append((c.correct if c is not None else 0.0, t, secs))  # type: ignore[attr-defined]
        acc["pass@n"].append((max(c.correct for c in sub), toks, secs))  # type: ignore[attr-defined]
    return {s: tuple(float(np.mean([v[j] for v in vals])) for j in range(3)) for s, vals in acc.items()}  # type: ignore[misc]


def ns_for(max_n: int) -> list[int]:
    """1, 2, 4, ... up to max_n (max_n included)."""
    ns, k = [], 1
    while k < max_n:
        ns.append(k)
        k *= 2
    return [*ns, max_n]


def curves(records: Sequence[dict[str, Any]], cfg: ScaleBenchConfig) -> list[dict[str, Any]]:
    """Rows (strategy, n, accuracy, stderr, tokens/problem, seconds/problem, problems)."""
    rows: list[dict[str, Any]] = []

    def add(strategy: str, n: int, vals: list[tuple[float, float, float]]) -> None:
        a = np.asarray(vals, dtype=float)
        se = float(a[:, 0].std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0
        rows.append({"strategy": strategy, "n": n, "accuracy": 100 * float(a[:, 0].mean()), "stderr": 100 * se,
                     "tokens_per_problem": float(a[:, 1].mean()), "seconds_per_problem": float(a[:, 2].mean()),
                     "problems": len(a)})  # fmt: skip

    add(
        "greedy",
        1,
        [(r["greedy"]["correct"], r["greedy"]["n_tokens"], r["greedy"]["seconds"]) for r in records],
    )
    from testtime.scale.verifiers import make_verifier

    verifier = make_verifier(cfg.verifier)
    pools = [_pool_cands(r, verifier) for r in records]
    ests = {n: [pool_estimates(r, n, cfg.subsets, cfg.seed + i, cands=pools[i]) for i, r in enumerate(records)]
            for n in ns_for(cfg.max_n)}  # fmt: skip
    for s in POOL_STRATEGIES:
        for n, per in ests.items():
            add(s, n, [e[s] for e in per])
    # a search setting enters the curves only when it ran on every problem (else it is listed as partial)
    keys = _search_keys(set.intersection(*(set(r["search"]) for r in records)) if records else set())
    for k in keys:
        name, n = k.split("@")
        add(name, int(n), [(r["search"][k]["correct"], r["search"][k]["n_tokens"], r["search"][k]["seconds"])
                           for r in records])  # fmt: skip
    rows.extend(compute_optimal_rows(records, cfg, ests, pools))
    return rows


def compute_optimal_rows(records: Sequence[dict[str, Any]], cfg: ScaleBenchConfig,
                         ests: dict[int, list[dict[str, tuple[float, float, float]]]],
                         pools: Sequence[list[Candidate]]) -> list[dict[str, Any]]:  # fmt: skip
    """Compute-optimal allocation evaluated by 2-fold cross-fitting over the problems: the policy is fitted
    on one half and chooses per question of the other half within a budget (the mean tokens of majority
    vote at each N); the pilot's tokens are charged on top."""
    if len(records) < 4 or cfg.pilot_n > cfg.max_n:
        return []
    diffs, pilot_tok, table = _allocation_table(records, cfg, ests, pools)
    folds = [list(range(0, len(records), 2)), list(range(1, len(records), 2))]
    budgets = sorted({float(np.mean([t[("majority", n)][1] for t in table])) for n in ests})
    rows = []
    for b in budgets:
        vals = []
        for fit_idx, test_idx in ((folds[0], folds[1]), (folds[1], folds[0])):
            pol = ComputeOptimalPolicy(n_bins=3).fit(_fit_rows(fit_idx, diffs, table))
            for i in test_idx:
                choice = pol.choose(diffs[i], b)  # the budget beyond the pilot
                c, t = table[i][choice]
                vals.append((c, t + pilot_tok[i], 0.0))
        a = np.asarray(vals)
        rows.append({"strategy": "compute_optimal", "n": round(b), "accuracy": 100 * float(a[:, 0].mean()),
                     "stderr": 100 * float(a[:, 0].std(ddof=1) / np.sqrt(len(a))),
                     "tokens_per_problem": float(a[:, 1].mean()), "seconds_per_problem": float("nan"),
                     "problems": len(a)})  # fmt: skip
    return rows


def _fit_rows(idx: Sequence[int], diffs: Sequence[float], table: Sequence[dict[tuple[str, int], tuple[float, float]]]
              ) -> list[dict[str, Any]]:  # fmt: skip
    return [{"problem": i, "difficulty": diffs[i], "strategy": s, "n": n, "correct": v[0], "tokens": v[1]}
            for i in idx for (s, n), v in table[i].items()]  # fmt: skip


def _allocation_table(records: Sequence[dict[str, Any]], cfg: ScaleBenchConfig,
                      ests: dict[int, list[dict[str, tuple[float, float, float]]]], pools: Sequence[list[Candidate]]
                      ) -> tuple[list[float], list[float], list[dict[tuple[str, int], tuple[float, float]]]]:  # fmt: skip
    """Per problem: the pilot's difficulty, the pilot's tokens, and (correct, tokens) of every configuration."""
    complete = sorted(set.intersection(*(set(r["search"]) for r in records)))
    diffs, pilot_tok, table = [], [], []
    for i, r in enumerate(records):
        pilot = pools[i][: cfg.pilot_n]
        diffs.append(pilot_difficulty(pilot))
        pilot_tok.append(float(sum(c.n_tokens for c in pilot)))
        opts: dict[tuple[str, int], tuple[float, float]] = {
            ("greedy", 1): (r["greedy"]["correct"], r["greedy"]["n_tokens"])
        }
        for n, per in ests.items():
            for s in ("majority", "weighted_vote", "best_of_n"):
                opts[(s, n)] = per[i][s][:2]
        for k in complete:  # search settings run on every problem (a partial one cannot be chosen fairly)
            name, n = k.split("@")
            opts[(name, int(n))] = (r["search"][k]["correct"], r["search"][k]["n_tokens"])
        table.append(opts)
    return diffs, pilot_tok, table


def fit_allocation_policy(
    records: Sequence[dict[str, Any]], cfg: ScaleBenchConfig
) -> ComputeOptimalPolicy | None:
    """The compute-optimal policy fitted on every problem of the bench (None with fewer than 4 problems or
    a pilot larger than the pool), with the search options the bench used, for `ComputeOptimal(policy=...)`."""
    if len(records) < 4 or cfg.pilot_n > cfg.max_n:
        return None
    from testtime.scale.verifiers import make_verifier

    pools = [_pool_cands(r, make_verifier(cfg.verifier)) for r in records]
    ests = {n: [pool_estimates(r, n, cfg.subsets, cfg.seed + i, cands=pools[i]) for i, r in enumerate(records)]
            for n in ns_for(cfg.max_n)}  # fmt: skip
    diffs, _, table = _allocation_table(records, cfg, ests, pools)
    pol = ComputeOptimalPolicy(n_bins=3).fit(_fit_rows(range(len(records)), diffs, table))
    step = {"width": cfg.width, "max_steps": cfg.max_steps, "step_tokens": cfg.step_tokens}
    pol.options = {"beam_search": dict(step), "dvts": dict(step)}
    return pol


# -------------------------------------------------------------------------------------------- outputs
def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def _problem_description(spec: str) -> str:
    from testtime.scale.problems import DEFAULT_TASK, DEFAULT_TASK_OPTIONS

    kind, _, task = spec.partition(":")
    if kind == "gym":
        return f"reasoning-gym `{task or DEFAULT_TASK}` with {DEFAULT_TASK_OPTIONS.get(task or DEFAULT_TASK, {})}"
    return spec


def summary_markdown(
    rows: Sequence[dict[str, Any]], cfg: ScaleBenchConfig, partial: dict[str, int] | None = None
) -> str:
    ns = ns_for(cfg.max_n)
    strategies = list(dict.fromkeys(r["strategy"] for r in rows if r["strategy"] != "compute_optimal"))
    by = {(r["strategy"], r["n"]): r for r in rows}
    lines = [f"# testtime scale bench: {cfg.problems}, {rows[0]['problems'] if rows else 0} problems, seed {cfg.seed}",
             "", f"Generator: {cfg.generator}. Verifier for weighted vote / best-of-N / search: `{cfg.verifier}`. "
             "pass@N (any sample right) is the ceiling; N for compute_optimal is its token budget.", "",
             f"Problems: {_problem_description(cfg.problems)}. Sampling: {cfg.sampling}. Search: width "
             f"{cfg.width}, at most {cfg.max_steps} steps of {cfg.step_tokens} tokens.", "",
             "Accuracy % (tokens per problem) by N:", "",
             "| strategy | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]  # fmt: skip
    for s in strategies:
        cells = []
        for n in ns:
            r = by.get((s, n))
            cells.append(f"{r['accuracy']:.1f} ({r['tokens_per_problem']:.0f})" if r else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    co = [r for r in rows if r["strategy"] == "compute_optimal"]
    if co:
        lines += ["", "Compute-optimal allocation (2-fold cross-fitted; a pilot of "
                  f"{cfg.pilot_n} samples estimates difficulty and its tokens are charged on top of the budget):",
                  "", "| budget tokens beyond the pilot | accuracy % | tokens used, pilot included |",
                  "|---|---|---|"]  # fmt: skip
        lines += [f"| {r['n']} | {r['accuracy']:.1f} | {r['tokens_per_problem']:.0f} |" for r in co]
    if partial:
        lines += [
            "",
            "Not in the table (run on only some problems): "
            + ", ".join(f"{k} ({v})" for k, v in partial.items()),
        ]
    secs = [r for r in rows if r["strategy"] in ("greedy", "majority") and r["n"] in (1, cfg.max_n)]
    if secs:
        lines += ["", "Seconds per problem: " + ", ".join(f"{r['strategy']}@{r['n']} {r['seconds_per_problem']:.2f} s"
                                                          for r in secs)]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_curves(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """accuracy_vs_n.png, accuracy_vs_tokens.png, accuracy_vs_seconds.png (matplotlib; skipped when it is
    missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    for xkey, fname, xlabel in (("n", "accuracy_vs_n.png", "N (samples / beams)"),
                                ("tokens_per_problem", "accuracy_vs_tokens.png", "generated tokens per problem"),
                                ("seconds_per_problem", "accuracy_vs_seconds.png", "seconds per problem")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for s in strategies:
            if xkey == "n" and s == "compute_optimal":
                continue
            pts = sorted((r[xkey], r["accuracy"]) for r in rows if r["strategy"] == s and r[xkey] == r[xkey])
            if not pts:
                continue
            style = "--" if s == "pass@n" else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=s)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        path = out_dir / fname
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths


def write_reports(
    records: Sequence[dict[str, Any]], cfg: ScaleBenchConfig, out_dir: Path
) -> list[dict[str, Any]]:
    rows = curves(records, cfg)
    per = [{"id": r["id"], "gold": r["gold"], "greedy_answer": r["greedy"]["answer"],
            "greedy_correct": r["greedy"]["correct"],
            "pool_correct_share": float(np.mean([c["correct"] for c in r["pool"]])),
            **{f"{k}_correct": r["search"][k]["correct"] for k in _search_keys(r["search"])}} for r in records]  # fmt: skip
    atomic_write_text(out_dir / "per_problem.csv", _csv(per))
    atomic_write_text(out_dir / "curves.csv", _csv(rows))
    counts: dict[str, int] = {}
    for r in records:
        for k in r["search"]:
            counts[k] = counts.get(k, 0) + 1
    partial = {k: v for k, v in sorted(counts.items()) if v < len(records)}
    atomic_write_text(out_dir / "summary.md", summary_markdown(rows, cfg, partial))
    plot_curves(rows, out_dir)
    policy = fit_allocation_policy(records, cfg)
    if policy is not None:  # for `scale solve --strategy compute_optimal --policy policy.json`
        policy.save(out_dir / "policy.json")
    return rows


def prepare(out_dir: Path, cfg: ScaleBenchConfig, env: dict[str, Any]) -> None:
    """Write config.json, or check that a resumed run has the same configuration; the search strategies
    and their N may differ (each is cached on its own), and config.json then lists all of them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    f = out_dir / "config.json"
    want = asdict(cfg)
    if f.is_file():
        saved = json.loads(f.read_text())
        have = saved.get("config") or {}
        free = {"search", "search_ns", "generator"}
        diff = sorted(k for k in (set(want) | set(have)) - free if have.get(k) != want.get(k))
        if diff:
            raise ConfigError(f"{out_dir} holds a run with a different configuration ({', '.join(diff)}); "
                              "use another --out")  # fmt: skip
        merged = {**have, "search": list(dict.fromkeys([*have.get("search", []), *cfg.search])),
                  "search_ns": sorted({*have.get("search_ns", []), *cfg.search_ns})}  # fmt: skip
        if merged != have:
            atomic_write_json(f, {**saved, "config": merged})
        return
    atomic_write_json(f, {"config": want, "env": env})
