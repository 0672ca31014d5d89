"""Re-score this benchmark's stored samples with the current answer extraction (no model run).

The committed run extracted answers with the earlier rule (the last number; a trailing comma kept).
This re-extracts the answer of every stored greedy and pool sample with `extract_answer`, re-scores it
against the gold answer with `answers_equal`, and recomputes the sampling curves with the bench's own
code. Beam search is not re-scored: its search used the extracted answers, so it would need a re-run.

    python benchmarks/scale_smollm2/rescore_answers.py
"""

import copy
import glob
import json
from pathlib import Path

from testtime.scale.answers import answers_equal, extract_answer
from testtime.scale.bench import ScaleBenchConfig, curves

d = Path(__file__).resolve().parent
saved = json.loads((d / "config.json").read_text())["config"]
cfg = ScaleBenchConfig(**{k: v for k, v in saved.items() if k in ScaleBenchConfig.__dataclass_fields__})
stored = [json.loads(Path(f).read_text()) for f in sorted(glob.glob(str(d / "problems" / "*.json")))]
new = copy.deepcopy(stored)
changed = total = 0
for r in new:
    for c in [*r["pool"], r["greedy"]]:
        a = extract_answer(c["text"])
        changed += a != c["answer"]
        total += 1
        c["answer"], c["correct"] = a, float(answers_equal(a, r["gold"]))
print(f"{len(stored)} problems; answers changed: {changed} of {total} samples (greedy + pools)")
before = {(x["strategy"], x["n"]): x for x in curves(stored, cfg)}
after = {(x["strategy"], x["n"]): x for x in curves(new, cfg)}
print("strategy        N   stored %   re-scored % (± s.e.)")
for k, x in before.items():
    if k[0] in ("greedy", "majority", "weighted_vote", "best_of_n", "first_finish", "pass@n") and k[1] in (
        1,
        16,
    ):
        if k[1] == 1 and k[0] != "greedy":
            continue  # N=1 of a pool strategy is an estimate over random subsets: N=16 is exact
        y = after[k]
        print(f"{k[0]:14s} {k[1]:2d}   {x['accuracy']:6.1f}   {y['accuracy']:6.1f} ± {y['stderr']:.1f}")
