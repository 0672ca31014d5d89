"""The README's Python snippets run as written (the API one on the embedded data), and the public
stream API (`testtime.data.cifar10c_stream`) gives what `testtime run` adapts on."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import testtime as tt
from testtime.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of README.md."""
    text = README.read_text()
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        out.append((text[: m.start()].count("\n") + 1, m.group(1)))
    return out


# snippets that need what unit tests do not load: the SmolLM2 model and reasoning-gym (the scale
# API is exercised by tests/test_scale.py and tests/test_scale_smollm2.py)
NEEDS_MODEL = ("load_generator()",)


def test_readme_has_the_api_snippet() -> None:
    snippets = python_snippets()
    assert any("tt.adapt(" in code and "cifar10c_stream(" in code for _, code in snippets)


@pytest.mark.parametrize(
    ("line", "code"), python_snippets(), ids=lambda v: f"line{v}" if isinstance(v, int) else ""
)
def test_readme_snippet_runs(line: int, code: str, tmp_path, monkeypatch) -> None:
    if any(k in code for k in NEEDS_MODEL):
        pytest.skip(f"README.md:{line} needs the SmolLM2 model (tested in test_scale_smollm2.py)")
    monkeypatch.setenv("TESTTIME_CACHE", str(tmp_path))  # corruptions generated afresh, not from a cache
    torch.set_num_threads(1)
    env: dict[str, object] = {"__name__": "__readme__"}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, f"README.md:{line}", "exec"), env)
    if "adapted" in env:  # the API snippet: every batch went through the adapted model, then reset
        adapted = env["adapted"]
        assert adapted.counters()["images"] == 1500 and adapted.counters()["batches"] == 15
        assert "tent" in buf.getvalue()


def test_cifar10c_stream_is_the_stream_testtime_run_builds(tmp_path) -> None:
    from testtime.bench.experiment import ExecOptions, build_cell_stream
    from testtime.bench.runner import Cell

    kw = {"severity": 3, "n_per_domain": 7, "batch_size": 4, "seed": 2, "cache_dir": tmp_path}
    s = tt.data.cifar10c_stream("long_horizon", corruptions=["fog", "gaussian_noise"], rounds=2, **kw)
    assert isinstance(s, tt.data.ImageStream) and tt.cifar10c_stream is tt.data.cifar10c_stream
    pairs = list(s)
    assert len(pairs) == len(s) == 8 and s.num_samples == 28
    assert [str(d) for d in s.domains] == ["fog@3", "gaussian_noise@3"]
    for x, y in pairs:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    cell = Cell("tent", "long_horizon", seed=2, severity=3, batch_size=4, n_per_domain=7,
                corruptions=("fog", "gaussian_noise"), scenario_options=(("rounds", "2"),))  # fmt: skip
    ref = list(build_cell_stream(cell, ExecOptions(cache_dir=str(tmp_path))))
    assert all(torch.equal(x, b.x) and torch.equal(y, b.y) for (x, y), b in zip(pairs, ref, strict=True))
    batches = list(s.batches())
    assert [b.new_segment for b in batches] == [True, False] * 4
    assert np.concatenate([b.domain_ids for b in batches]).tolist() == ([0] * 7 + [1] * 7) * 2


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"scenario": "nope"}, "unknown scenario"),
        ({"severity": 6}, "severity must be an integer in 1..5"),
        ({"n_per_domain": 0}, "n_per_domain must be in"),
        ({"corruptions": ["rain"]}, "unknown corruption"),
        ({"delta": 0.1}, "does not take option"),
        ({"batch_size": 0}, "batch size"),
    ],
)
def test_cifar10c_stream_bad_arguments(kw, match, tmp_path) -> None:
    with pytest.raises(ConfigError, match=match):
        tt.data.cifar10c_stream(**{"cache_dir": tmp_path, **kw})


def test_make_stream_other_datasets() -> None:
    s = tt.make_stream("continual", dataset="mnist_usps", n_per_domain=5, batch_size=5)
    (x, _), *_ = list(s)
    assert x.shape == (5, 3, 32, 32) and [d.corruption for d in s.domains] == ["usps"]
    with pytest.raises(ConfigError, match="unknown dataset"):
        tt.make_stream(dataset="imagenet")
