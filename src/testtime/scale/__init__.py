"""Test-time scaling of language-model reasoning: generators, verifiers, strategies, benchmark.

from testtime.scale import load_generator, make_strategy, make_verifier, reasoning_gym_problems
gen = load_generator()                                   # SmolLM2-135M-Instruct, offline
problem = reasoning_gym_problems("basic_arithmetic", n=1)[0]
result = make_strategy("best_of_n", n=8).run(problem, gen, make_verifier("arith_steps+logprob"))
"""

from testtime.scale.allocation import ComputeOptimal, ComputeOptimalPolicy, pilot_difficulty
from testtime.scale.answers import answers_equal, extract_answer
from testtime.scale.generators import Generator, TransformersGenerator, load_generator
from testtime.scale.problems import gsm8k_problems, load_problems, math500_problems, reasoning_gym_problems
from testtime.scale.strategies import STRATEGIES, Sampling, make_strategy
from testtime.scale.types import Candidate, Completion, Problem, StrategyResult
from testtime.scale.verifiers import VERIFIERS, RewardModelVerifier, SelfEvalVerifier, make_verifier

__all__ = [
    "STRATEGIES",
    "VERIFIERS",
    "Candidate",
    "Completion",
    "ComputeOptimal",
    "ComputeOptimalPolicy",
    "Generator",
    "Problem",
    "RewardModelVerifier",
    "Sampling",
    "SelfEvalVerifier",
    "StrategyResult",
    "TransformersGenerator",
    "answers_equal",
    "extract_answer",
    "gsm8k_problems",
    "load_generator",
    "load_problems",
    "make_strategy",
    "make_verifier",
    "math500_problems",
    "pilot_difficulty",
    "reasoning_gym_problems",
]
