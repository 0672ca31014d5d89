"""OpenAIGenerator against a real local HTTP server; LlamaCppGenerator with a fake `llama_cpp` module."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from testtime.errors import ConfigError, DataError, ModelError
from testtime.scale import generators
from testtime.scale.generators import Generator
from testtime.scale.remote import LlamaCppGenerator, OpenAIGenerator, resolve_chat_template

# --------------------------------------------------------------------------- fake OpenAI-compatible server


def fake_tokens(prompt: str, variant: str, max_tokens: int) -> tuple[list[str], str]:
    """Deterministic "model": tokens derived from the prompt's last word, and the finish reason.

    `<eos=N>` in the prompt ends after N tokens; `<end-at=N>` makes token N the word " END"."""
    words = [w for w in prompt.split() if not w.startswith("<")]
    word = words[-1] if words else "empty"
    eos_at = end_at = None
    for part in prompt.split():
        if part.startswith("<eos="):
            eos_at = int(part[5:-1])
        if part.startswith("<end-at="):
            end_at = int(part[8:-1])
    toks: list[str] = []
    for j in range(max_tokens):
        if eos_at is not None and j == eos_at:
            return toks, "stop"
        toks.append(" END" if j == end_at else f" {word}.{variant}.{j}")
    return toks, "length"


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, route: str = "") -> int:
        return sum(1 for r in self.requests if r["route"] == route)


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, payload: object, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        route = self.path.removesuffix("/v1/completions").strip("/")
        with self.server.lock:
            self.server.requests.append(
                {"route": route, "body": body, "auth": self.headers.get("Authorization")}
            )
        if not self.path.endswith("/v1/completions"):
            return self._send(404, {"detail": "Not Found"})
        if route == "err500":
            return self._send(500, {"error": {"message": "boom: out of KV cache", "code": 500}})
        if route == "auth" and self.headers.get("Authorization") != "Bearer sekret":
            return self._send(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
        if route == "garbage":
            return self._send(200, None, raw=b"<html>not json</html>")
        if route == "slow":
            time.sleep(1.5)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        n, stops = body.get("n", 1), body.get("stop") or []
        choices, total = [], 0
        for i, p in enumerate(prompts):
            for k in range(n):
                variant = "g" if body["temperature"] == 0 else f"s{body['seed']}k{k}"
                toks, reason = fake_tokens(p, variant, body["max_tokens"])
                text, used, matched = "", [], None
                for t in toks:
                    used.append(t)
                    text += t
                    hits = [(text.find(s), s) for s in stops if s in text]
                    if hits:
                        at, matched = min(hits)
                        text, reason = text[:at], "stop"
                        break
                total += len(used)
                lp = None
                if body.get("logprobs") is not None and route != "bare":
                    lp = {"tokens": used, "token_logprobs": [-0.1 * (j + 1) for j in range(len(used))]}
                ch = {"index": i * n + k, "text": text, "finish_reason": reason, "logprobs": lp}
                if route != "bare":
                    ch["stop_reason"] = matched
                choices.append(ch)
        if route == "one":
            choices = choices[:1]
        choices.reverse()  # grouping must follow `index`, not the order of the list
        usage = {"prompt_tokens": 7, "completion_tokens": total, "total_tokens": 7 + total}
        self._send(200, {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                         "choices": choices, "usage": usage})  # fmt: skip


@pytest.fixture(scope="module")
def server():
    srv = FakeServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def gen_for(server: FakeServer, route: str = "", **kw) -> OpenAIGenerator:
    base = f"{server.url}/{route}" if route else server.url
    return OpenAIGenerator(base, "tiny-model", **kw)


# --------------------------------------------------------------------------- OpenAIGenerator


def test_protocol_name_and_url(server):
    gen = gen_for(server)
    assert isinstance(gen, Generator)
    assert gen.name == "openai:tiny-model"
    assert gen.url == f"{server.url}/v1/completions"
    assert OpenAIGenerator(server.url + "/v1/", "m").url == gen.url


def test_request_body(server):
    before = len(server.requests)
    gen_for(server).generate(
        ["Q: alpha"], 2, max_new_tokens=3, temperature=0.7, top_p=0.9, stop=["xx"], seed=5
    )
    assert len(server.requests) == before + 1
    body = server.requests[-1]["body"]
    assert body == {"model": "tiny-model", "prompt": "Q: alpha", "n": 2, "max_tokens": 3, "temperature": 0.7,
                    "top_p": 0.9, "seed": 5, "logprobs": 1, "stop": ["xx"]}  # fmt: skip
    assert server.requests[-1]["auth"] is None


def test_groups_n_completions_per_prompt_by_index(server):
    before = server.count()
    out = gen_for(server, batch_size=2).generate(
        ["Q: alpha", "Q: beta", "Q: gamma"], 2, max_new_tokens=3, temperature=1.0, seed=3
    )
    assert server.count() == before + 2  # 2 prompts, then 1
    assert isinstance(server.requests[-2]["body"]["prompt"], list)
    assert isinstance(server.requests[-1]["body"]["prompt"], str)
    assert [len(g) for g in out] == [2, 2, 2]
    for word, group in zip(["alpha", "beta", "gamma"], out):
        for k, c in enumerate(group):
            assert c.text == f" {word}.s3k{k}.0 {word}.s3k{k}.1 {word}.s3k{k}.2"
            assert c.finish_reason == "length"
            assert c.n_tokens == 3
            assert c.logprobs == pytest.approx([-0.1, -0.2, -0.3])
            assert c.seconds >= 0


def test_greedy_asks_once_and_repeats(server):
    before = server.count()
    out = gen_for(server).generate(["Q: alpha", "Q: beta"], 3, max_new_tokens=2)
    assert server.count() == before + 1
    assert server.requests[-1]["body"]["n"] == 1
    assert [[c.text for c in g] for g in out] == [[" alpha.g.0 alpha.g.1"] * 3, [" beta.g.0 beta.g.1"] * 3]


def test_stop_string_and_eos_mapping(server):
    gen = gen_for(server)
    stopped, ended, long = gen.generate(
        ["Q: a <end-at=2>", "Q: b <eos=1>", "Q: c"], max_new_tokens=4, stop=["END", "never"]
    )
    assert stopped[0].text == " a.g.0 a.g.1 "
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].n_tokens == 3
    assert ended[0].text == " b.g.0"
    assert ended[0].finish_reason == "eos"
    assert long[0].finish_reason == "length"
    # without stop strings a server "stop" is the model's end of sequence
    (only,) = gen.generate(["Q: b <eos=2>"], max_new_tokens=4)
    assert only[0].finish_reason == "eos"
    assert "stop" not in server.requests[-1]["body"]


def test_server_without_stop_reason_or_logprobs(server):
    gen = gen_for(server, "bare")
    out = gen.generate(
        ["Q: a <end-at=1>", "Q: b <eos=1>"], 2, max_new_tokens=4, temperature=0.5, stop=["END"]
    )
    # no `stop_reason` echoed: "stop" cannot be told apart from EOS -> "eos"
    assert [c.finish_reason for g in out for c in g] == ["eos"] * 4
    assert all(c.logprobs is None and c.confidence is None for g in out for c in g)
    # usage.completion_tokens (2 + 2 + 1 + 1 = 6) split evenly over the 4 choices
    assert [c.n_tokens for g in out for c in g] == [2, 2, 1, 1]
    assert sum(c.n_tokens for g in out for c in g) == 6


def test_logprobs_and_token_counts_follow_the_text(server):
    (group,) = gen_for(server).generate(["Q: z <eos=3>"], 2, max_new_tokens=8, temperature=0.3)
    for c in group:
        assert c.n_tokens == 3
        assert c.logprobs == pytest.approx([-0.1, -0.2, -0.3])
        assert c.mean_logprob == pytest.approx(-0.2)


@pytest.mark.parametrize(
    ("prompts", "kw", "error"),
    [
        ([], {}, DataError),
        ("Q: one string", {}, ConfigError),
        (["ok", 3], {}, DataError),
        (["ok"], {"n": 0}, ConfigError),
        (["ok"], {"temperature": -0.1}, ConfigError),
        (["ok"], {"top_p": 0.0}, ConfigError),
        (["ok"], {"max_new_tokens": 0}, ConfigError),
        (["ok"], {"max_time": 0.0}, ConfigError),
    ],
)
def test_bad_args_fail_before_any_request(server, prompts, kw, error):
    before = len(server.requests)
    n = kw.pop("n", 1)
    with pytest.raises(error):
        gen_for(server).generate(prompts, n, **kw)
    assert len(server.requests) == before


def test_bad_constructor_args():
    with pytest.raises(ConfigError, match="http"):
        OpenAIGenerator("localhost:8000", "m")
    with pytest.raises(ConfigError, match="model"):
        OpenAIGenerator("http://localhost:8000", "")
    with pytest.raises(ConfigError, match="max_retries"):
        OpenAIGenerator("http://localhost:8000", "m", max_retries=-1)
    with pytest.raises(ConfigError, match="timeout"):
        OpenAIGenerator("http://localhost:8000", "m", timeout=0)


def test_http_500_is_retried_then_reported(server):
    before = server.count("err500")
    gen = gen_for(server, "err500", max_retries=2, retry_delay=0.0)
    with pytest.raises(ModelError, match=r"HTTP 500.*boom: out of KV cache") as info:
        gen.generate(["Q: a"])
    assert gen.url in str(info.value)
    assert server.count("err500") == before + 3


def test_http_401_carries_the_server_message(server, monkeypatch):
    before = server.count("auth")
    with pytest.raises(ModelError, match=r"HTTP 401: invalid api key"):
        gen_for(server, "auth", retry_delay=0.0).generate(["Q: a"])
    assert server.count("auth") == before + 1  # not retried
    monkeypatch.setenv("OPENAI_API_KEY", "sekret")
    (group,) = gen_for(server, "auth").generate(["Q: a"], max_new_tokens=1)
    assert group[0].text == " a.g.0"
    assert server.requests[-1]["auth"] == "Bearer sekret"


def test_non_json_and_wrong_choice_count(server):
    with pytest.raises(ModelError, match="JSON"):
        gen_for(server, "garbage").generate(["Q: a"])
    with pytest.raises(ModelError, match=r"1 choices, expected 4"):
        gen_for(server, "one").generate(["Q: a", "Q: b"], 2, temperature=1.0)


def test_connection_refused_names_the_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    gen = OpenAIGenerator(f"http://127.0.0.1:{port}", "m", max_retries=1, retry_delay=0.0)
    with pytest.raises(ModelError, match=rf"cannot reach http://127\.0\.0\.1:{port}/v1/completions"):
        gen.generate(["Q: a"])


def test_timeouts_raise_model_error(server):
    t0 = time.monotonic()
    with pytest.raises(ModelError, match=r"/slow/v1/completions did not answer within"):
        gen_for(server, "slow").generate(["Q: a"], max_time=0.3)
    with pytest.raises(ModelError, match="did not answer"):
        gen_for(server, "slow", timeout=0.3).generate(["Q: a"])
    assert time.monotonic() - t0 < 1.4


def test_format_chat_templates():
    gen = OpenAIGenerator("http://localhost:1", "m")
    assert gen.format_chat("2+2?", "Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "You are a helpful assistant." in gen.format_chat("{x}")
    custom = OpenAIGenerator("http://localhost:1", "m", chat_template="[{system}] {question} =>")
    assert custom.format_chat("q {braces}", "s") == "[s] q {braces} =>"
    assert resolve_chat_template("plain").endswith("Answer:")
    with pytest.raises(ConfigError, match="unknown chat template"):
        OpenAIGenerator("http://localhost:1", "m", chat_template="vicuna")
    with pytest.raises(ConfigError, match="bad chat template"):
        OpenAIGenerator("http://localhost:1", "m", chat_template="{question} {user}")


# --------------------------------------------------------------------------- LlamaCppGenerator (fake module)


class FakeLlama:
    """Mimics llama_cpp.Llama.create_completion's reply (and its logits_all rule)."""

    instances: ClassVar[list[FakeLlama]] = []

    def __init__(self, **kw) -> None:
        self.init = kw
        self.calls: list[dict] = []
        FakeLlama.instances.append(self)

    def tokenize(self, data: bytes, add_bos: bool = True) -> list[int]:
        return list(range(len(data.split())))

    def create_completion(self, prompt: str, **kw) -> dict:
        self.calls.append({"prompt": prompt, **kw})
        if kw.get("logprobs") is not None and not self.init.get("logits_all"):
            raise ValueError("logprobs is not supported for models created with logits_all=False")
        if "<too-long>" in prompt:
            raise ValueError("Requested tokens (5000) exceed context window of 2048")
        variant = "g" if kw["temperature"] == 0 else f"s{kw['seed']}"
        toks, reason = fake_tokens(prompt, variant, kw["max_tokens"])
        used, text = [], ""
        crit = kw.get("stopping_criteria")
        for t in toks:
            if crit is not None and crit(None, None):
                reason = "stop"
                break
            used.append(t)
            text += t
            hits = [text.find(s) for s in kw["stop"] or [] if s in text]
            if hits:
                text, reason = text[: min(hits)], "stop"
                break
        lp = {"tokens": used, "text_offset": [0] * len(used), "token_logprobs": [-0.5] * len(used),
              "top_logprobs": [None] * len(used)}  # fmt: skip
        return {"id": "cmpl-x", "object": "text_completion", "model": "m",
                "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": reason}],
                "usage": {"prompt_tokens": 4, "completion_tokens": len(used), "total_tokens": 4 + len(used)}}  # fmt: skip


@pytest.fixture
def fake_llama(monkeypatch, tmp_path):
    FakeLlama.instances.clear()
    module = types.ModuleType("llama_cpp")
    module.Llama = FakeLlama
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    path = tmp_path / "tiny-q4.gguf"
    path.write_bytes(b"GGUF")
    return path


def test_llama_missing_module_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ConfigError, match="pip install llama-cpp-python"):
        LlamaCppGenerator(tmp_path / "x.gguf")


def test_llama_init_and_protocol(fake_llama):
    gen = LlamaCppGenerator(fake_llama, n_ctx=1024, n_threads=2, seed=9)
    assert isinstance(gen, Generator)
    assert gen.name == "llama.cpp:tiny-q4"
    init = FakeLlama.instances[-1].init
    assert init == {"model_path": str(fake_llama), "n_ctx": 1024, "n_threads": 2, "seed": 9, "logits_all": True,
                    "verbose": False}  # fmt: skip
    assert gen.format_chat("hi").startswith(f"<|im_start|>system\n{generators.DEFAULT_SYSTEM}<|im_end|>")
    assert gen.count_tokens("a b c") == 3
    with pytest.raises(ModelError, match="not found"):
        LlamaCppGenerator(fake_llama.parent / "missing.gguf")


def test_llama_sampling_seeds_and_arguments(fake_llama):
    gen = LlamaCppGenerator(fake_llama)
    out = gen.generate(["Q: a", "Q: b"], 3, max_new_tokens=2, temperature=0.8, top_p=0.95, seed=10)
    calls = FakeLlama.instances[-1].calls
    assert [c["seed"] for c in calls] == [10, 11, 12, 10, 11, 12]
    assert [c["prompt"] for c in calls] == ["Q: a"] * 3 + ["Q: b"] * 3
    first = calls[0]
    assert first["max_tokens"] == 2 and first["temperature"] == 0.8 and first["top_p"] == 0.95
    assert first["stop"] is None and first["logprobs"] == 1
    assert (first["top_k"], first["min_p"], first["repeat_penalty"]) == (0, 0.0, 1.0)
    assert "stopping_criteria" not in first
    assert [[c.text for c in g] for g in out] == [
        [f" a.s{s}.0 a.s{s}.1" for s in (10, 11, 12)],
        [f" b.s{s}.0 b.s{s}.1" for s in (10, 11, 12)],
    ]
    assert all(c.finish_reason == "length" and c.n_tokens == 2 for g in out for c in g)
    assert out[0][0].logprobs == [-0.5, -0.5]
    # runs reproduce
    again = gen.generate(["Q: a", "Q: b"], 3, max_new_tokens=2, temperature=0.8, top_p=0.95, seed=10)
    assert [[c.text for c in g] for g in again] == [[c.text for c in g] for g in out]


def test_llama_greedy_computes_once(fake_llama):
    gen = LlamaCppGenerator(fake_llama)
    (group,) = gen.generate(["Q: a"], 4, max_new_tokens=2)
    assert len(FakeLlama.instances[-1].calls) == 1
    assert len(group) == 4 and len({c.text for c in group}) == 1


def test_llama_finish_reasons(fake_llama):
    gen = LlamaCppGenerator(fake_llama)
    stopped, ended, long = gen.generate(["Q: a <end-at=1>", "Q: b <eos=2>", "Q: c"], max_new_tokens=3,
                                        stop=["END"])  # fmt: skip
    assert FakeLlama.instances[-1].calls[0]["stop"] == ["END"]
    assert (stopped[0].text, stopped[0].finish_reason, stopped[0].n_tokens) == (" a.g.0 ", "stop", 2)
    assert (ended[0].text, ended[0].finish_reason, ended[0].n_tokens) == (" b.g.0 b.g.1", "eos", 2)
    assert long[0].finish_reason == "length"
    (timed,) = gen.generate(["Q: d"], max_new_tokens=3, max_time=1e-6)
    assert callable(FakeLlama.instances[-1].calls[-1]["stopping_criteria"])
    assert (timed[0].text, timed[0].finish_reason, timed[0].n_tokens) == ("", "time", 0)


def test_llama_errors(fake_llama):
    gen = LlamaCppGenerator(fake_llama)
    with pytest.raises(ModelError, match="exceed context window"):
        gen.generate(["Q: <too-long>"])
    with pytest.raises(ConfigError):
        gen.generate(["Q: a"], 0)
    assert len(FakeLlama.instances[-1].calls) == 1
    with pytest.raises(ConfigError, match="unknown chat template"):
        LlamaCppGenerator(fake_llama, chat_format="nope")


def test_llama_smollm2_uses_the_packaged_gguf(fake_llama, monkeypatch):
    monkeypatch.setattr(generators, "smollm2_gguf_path", lambda: fake_llama)
    gen = LlamaCppGenerator.smollm2(n_ctx=512)
    assert FakeLlama.instances[-1].init["model_path"] == str(fake_llama)
    assert FakeLlama.instances[-1].init["n_ctx"] == 512
    assert gen.name == "llama.cpp:tiny-q4"


def test_logprobs_accept_numpy_floats_as_llama_cpp_returns_them():
    import numpy as np

    from testtime.scale.remote import _float_logprobs

    assert _float_logprobs({"token_logprobs": [np.float32(-0.5), -1.0]}) == [-0.5, -1.0]
    assert _float_logprobs({"token_logprobs": [None, -1.0]}) is None
    assert _float_logprobs({"token_logprobs": [True]}) is None
    assert _float_logprobs(None) is None


def test_a_single_stop_string_is_not_split_into_characters(server):
    (group,) = gen_for(server).generate(["Q: hello world"], 1, max_new_tokens=8, stop="ld")
    assert server.requests[-1]["body"]["stop"] == ["ld"]
    assert "ld" not in group[0].text
