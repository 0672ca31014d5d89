"""`testtime serve`: the HTTP service, run in-process by uvicorn on 127.0.0.1, over real HTTP (httpx)."""

from __future__ import annotations

import contextlib
import io
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest import state_hash  # noqa: E402
from testtime.adapt import adapt  # noqa: E402
from testtime.cli import main  # noqa: E402
from testtime.data.cifar import CIFAR10_CLASSES  # noqa: E402
from testtime.errors import ModelError  # noqa: E402
from testtime.models.zoo import build_model, load_model  # noqa: E402
from testtime.serve import BackgroundServer, create_app, encode_npy, uint8_to_batch  # noqa: E402
from testtime.utils import state_digest  # noqa: E402

NPY = {"Content-Type": "application/x-npy"}


@pytest.fixture(scope="module")
def tiny():
    """A small BatchNorm CNN for 32x32 RGB (random weights: fast, and enough for serving mechanics)."""
    torch.manual_seed(0)
    return build_model("digitnet")


def fresh(model, method="tent"):
    return adapt(model, method)


@contextlib.contextmanager
def serving(adapted, **kw):
    kw.setdefault("class_names", CIFAR10_CLASSES)
    srv = BackgroundServer(create_app(adapted, model_name="tiny", **kw))
    with srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        yield client


def images(n, seed=0, size=(32, 32)):
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def png(x: np.ndarray, fmt="PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(x).save(buf, fmt)
    return buf.getvalue()


def test_predict_png_jpeg_and_npy_match_a_direct_replay(tiny):
    adapted, replay = fresh(tiny), fresh(tiny)
    a, b = images(3, 1), images(5, 2)
    xf = np.random.default_rng(3).random((2, 3, 32, 32), dtype=np.float32)
    with serving(adapted) as c:
        files = [("file", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(a)]
        r1 = c.post("/predict", files=files, headers={"X-Request-Id": "png-1"})
        r2 = c.post("/predict", content=encode_npy(b), headers=NPY)
        r3 = c.post("/predict", content=encode_npy(xf), headers=NPY)
        jpegs = [("img", (f"{i}.jpg", png(im, "JPEG"), "image/jpeg")) for i, im in enumerate(a[:2])]
        r4 = c.post("/predict", files=jpegs)  # (DigitNet's BatchNorm1d cannot adapt on one image)
    assert [r.status_code for r in (r1, r2, r3, r4)] == [200] * 4
    j1 = r1.json()
    assert r1.headers["X-Request-Id"] == "png-1" and j1["request_id"] == "png-1"
    assert [j["seq"] for j in (j1, r2.json(), r3.json(), r4.json())] == [1, 2, 3, 4]
    assert j1["n"] == 3 and r2.json()["n"] == 5 and r4.json()["n"] == 2
    for p in j1["predictions"]:
        assert p["name"] == CIFAR10_CLASSES[p["class"]] and 0.1 <= p["confidence"] <= 1
    assert j1["latency_ms"] > 0
    # the service fed exactly these tensors, in this order (PNG is lossless)
    for x, r in ((uint8_to_batch(a), r1), (uint8_to_batch(b), r2), (torch.from_numpy(xf), r3)):
        assert replay(x).argmax(1).tolist() == [p["class"] for p in r.json()["predictions"]]
    assert adapted.counters()["batches"] == 4


def test_health_and_metrics(tiny):
    adapted = fresh(tiny)
    with serving(adapted, window=8) as c:
        assert c.get("/health").json() == {
            "status": "ok",
            "method": "tent",
            "model": "tiny",
            "input_shape": [3, 32, 32],
            "classes": list(CIFAR10_CLASSES),
        }
        for i in range(3):
            assert c.post("/predict", content=encode_npy(images(4, i)), headers=NPY).status_code == 200
        assert c.post("/predict", content=b"", headers=NPY).status_code == 400
        assert c.post("/reset").json() == {"status": "reset", "resets": 1}
        m = c.get("/metrics.json").json()
    assert m["requests"] == 4 and m["images"] == 12 and m["errors"] == 1 and m["server_errors"] == 0
    assert m["adapted_batches"] == 3 and m["adapted_images"] == 12  # counters survive reset()
    assert m["resets"] == 1 and m["restores"] == adapted.counters().get("restores", 0)
    assert m["skipped_updates"] == 0 and m["snapshots"] == 0
    assert len(m["entropy"]["recent_batch_means"]) == 3 and 0 < m["entropy"]["mean"] <= np.log(10) + 1e-6
    hist = m["class_histogram"]
    assert hist["window"] == 8 and sum(hist["counts"].values()) == 8  # the last 8 predictions
    assert set(hist["counts"]) == set(CIFAR10_CLASSES)
    lat = m["latency_ms"]
    assert lat["window"] == 3 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert m["model_ms"]["window"] == 3 and 0 < m["model_ms"]["p50"] <= lat["p99"]


def test_reset_restores_the_source_state(tiny):
    adapted = fresh(tiny)
    source = state_hash(adapted)
    with serving(adapted) as c:
        for i in range(2):
            c.post("/predict", content=encode_npy(images(8, i)), headers=NPY).raise_for_status()
        assert state_hash(adapted) != source
        assert c.post("/reset", headers={"X-Request-Id": "r"}).headers["X-Request-Id"] == "r"
        assert state_hash(adapted) == source
        assert c.post("/predict", content=encode_npy(images(8, 0)), headers=NPY).json()["seq"] == 3


def _npy_truncated() -> bytes:
    return encode_npy(images(2))[:-100]


def _npy_object() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _files(*items):
    return {"files": [("file", item) for item in items]}


BAD = [  # (name, request kwargs, status, message fragment)
    ("undecodable image", _files(("x.png", b"not an image", "image/png")), 400, "cannot decode image 1"),
    ("wrong image size", _files(("s.png", png(images(1, size=(28, 30))[0]), "image/png")), 400, "30x28"),
    ("unsupported format", _files(("g.gif", png(images(1)[0], "GIF"), "image/gif")), 400, "send PNG or JPEG"),
    ("empty image file", _files(("e.png", b"", "image/png")), 400, "is empty"),
    ("no files in form", {"files": {"note": (None, b"hi")}}, 400, "no image files"),
    ("too many images", _files(*[("i.png", png(images(1)[0]), "image/png")] * 5), 400, "limit 4"),
    ("empty body", {"content": b"", "headers": NPY}, 400, "empty request body"),
    ("not npy", {"content": b"\x00garbage bytes", "headers": NPY}, 400, "not a valid .npy"),
    ("truncated npy", {"content": _npy_truncated(), "headers": NPY}, 400, "truncated"),
    ("pickled npy", {"content": _npy_object(), "headers": NPY}, 400, "dtype object"),
    ("int64 npy", {"content": encode_npy(images(2).astype(np.int64)), "headers": NPY}, 400, "int64"),
    ("float64 npy", {"content": encode_npy(np.zeros((1, 3, 32, 32))), "headers": NPY}, 400, "float64"),
    ("npy rank 3", {"content": encode_npy(images(1)[0]), "headers": NPY}, 400, "(32, 32, 3)"),
    ("npy 1 channel", {"content": encode_npy(images(2)[..., :1]), "headers": NPY}, 400, "(N, 32, 32, 3)"),
    ("npy NHWC float", {"content": encode_npy(np.zeros((1, 32, 32, 3), np.float32)), "headers": NPY}, 400, "(N, 3, 32, 32)"),
    ("npy N=0", {"content": encode_npy(images(0)), "headers": NPY}, 400, "no images"),
    ("npy too many", {"content": encode_npy(images(5)), "headers": NPY}, 400, "limit 4"),
    ("npy NaN", {"content": encode_npy(np.full((1, 3, 32, 32), np.nan, np.float32)), "headers": NPY}, 400, "NaN"),
    ("npy out of range", {"content": encode_npy(np.full((1, 3, 32, 32), 2, np.float32)), "headers": NPY}, 400, "[0, 1]"),
    ("wrong content type", {"content": b"abc", "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type"),
    ("body too large", {"content": b"\x93NUMPY" + bytes(300_000), "headers": NPY}, 413, "exceeds the limit"),
]  # fmt: skip


def test_bad_inputs_give_one_clear_error_and_leave_the_state_unchanged(tiny):
    adapted = fresh(tiny)
    with serving(adapted, max_batch=4, max_body_bytes=200_000) as c:
        c.post("/predict", content=encode_npy(images(4)), headers=NPY).raise_for_status()
        before, counters = state_digest(adapted), adapted.counters()
        for name, kw, status, fragment in BAD:
            r = c.post("/predict", **{**kw, "headers": {**kw.get("headers", {}), "X-Request-Id": name}})
            assert r.status_code == status, (name, r.text)
            body = r.json()
            assert set(body) == {"error"} and fragment in body["error"], (name, body)
            assert "\n" not in body["error"] and r.headers["X-Request-Id"] == name
            assert state_digest(adapted) == before, name
        assert adapted.counters() == counters
        m = c.get("/metrics.json").json()
        assert m["errors"] == len(BAD) and m["adapted_batches"] == 1 and m["server_errors"] == 0
        # still serving, and the sequence continues without gaps
        assert c.post("/predict", content=encode_npy(images(2)), headers=NPY).json()["seq"] == 2


def test_model_data_error_is_a_400(tiny):
    adapted = fresh(tiny, "shot")  # SHOT needs batches of at least 2 images
    before = state_digest(adapted)
    with serving(adapted) as c:
        r = c.post("/predict", content=encode_npy(images(1)), headers=NPY)
    assert r.status_code == 400 and "at least 2" in r.json()["error"]
    assert state_digest(adapted) == before


def test_snapshot_on_shutdown_is_restored_on_the_next_start(tiny, tmp_path):
    path = tmp_path / "state.pt"
    first = fresh(tiny)
    with serving(first, state_path=path, snapshot_interval_s=0) as c:
        for i in range(3):
            c.post("/predict", content=encode_npy(images(4, i)), headers=NPY).raise_for_status()
        assert not path.exists()  # interval 0: only at shutdown
    assert path.is_file()
    second = fresh(tiny)
    assert state_digest(second) != state_digest(first)
    with serving(second, state_path=path) as c:
        assert state_digest(second) == state_digest(first)  # whole state, counters included
        assert c.post("/predict", content=encode_npy(images(4, 9)), headers=NPY).json()["seq"] == 4
    assert state_digest(second) != state_digest(first)
    third = fresh(tiny)
    third.load_state(path)
    assert state_digest(third) == state_digest(second)


def test_periodic_snapshots(tiny, tmp_path):
    path = tmp_path / "periodic.pt"
    adapted = fresh(tiny)
    with serving(adapted, state_path=path, snapshot_interval_s=0.2) as c:
        c.post("/predict", content=encode_npy(images(4)), headers=NPY).raise_for_status()
        deadline = time.monotonic() + 10
        while c.get("/metrics.json").json()["snapshots"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.is_file()
        copy = fresh(tiny)
        copy.load_state(path)
        assert state_digest(copy) == state_digest(adapted)
        m = c.get("/metrics.json").json()
        assert m["snapshots"] >= 1 and m["snapshot_errors"] == 0 and m["last_snapshot_unix"] > 0


def test_a_corrupt_or_mismatching_snapshot_refuses_to_start(tiny, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a torch file")
    with pytest.raises(ModelError, match="cannot read the adaptation state"):
        create_app(fresh(tiny), state_path=corrupt)
    other = tmp_path / "bn.pt"
    adapt(tiny, "bn").save_state(other)
    saved = other.read_bytes()
    with pytest.raises(ModelError, match="cannot load the state of method 'bn' into 'tent'"):
        create_app(fresh(tiny), state_path=other)
    assert other.read_bytes() == saved
    # the command line: one line, exit code 2, the file left as it was
    assert main(["serve", "--state", str(corrupt), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("testtime: error:") and "corrupt.pt" in err and "\n" not in err
    assert corrupt.read_bytes() == b"PK\x03\x04 this is not a torch file"


def test_concurrent_requests_are_serialised(tiny):
    """4 clients x 10 requests: one response each, seq 1..40, and a replay in seq order matches bit for bit."""
    adapted, replay = fresh(tiny), fresh(tiny)
    batches = {f"c{c}-{i}": images(3, 100 * c + i) for c in range(4) for i in range(10)}
    answers: dict[str, list] = {}

    def client(c: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(10):
                rid = f"c{c}-{i}"
                r = http.post(
                    "/predict", content=encode_npy(batches[rid]), headers={**NPY, "X-Request-Id": rid}
                )
                answers.setdefault(r.headers["X-Request-Id"], []).append(r.json())

    with BackgroundServer(create_app(adapted)) as srv:
        threads = [threading.Thread(target=client, args=(c, srv.url)) for c in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        metrics = httpx.get(f"{srv.url}/metrics.json").json()
    assert set(answers) == set(batches) and all(len(v) == 1 for v in answers.values())
    seq = {rid: v[0]["seq"] for rid, v in answers.items()}
    assert sorted(seq.values()) == list(range(1, 41))
    assert adapted.counters()["batches"] == 40 == metrics["adapted_batches"] == metrics["requests"]
    for rid in sorted(seq, key=seq.get):
        got = [p["class"] for p in answers[rid][0]["predictions"]]
        assert replay(uint8_to_batch(batches[rid])).argmax(1).tolist() == got
    assert state_digest(replay) == state_digest(adapted)


def test_serve_check_command(tmp_path, capsys):
    rc = main(
        ["serve-check", "--clients", "2", "--requests", "6", "--batch-size", "4", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    res = json.loads((tmp_path / "serve_check.json").read_text())
    assert res["passed"] and res["requests_ok"] == 6 and res["images"] == 24
    assert set(res["checks"]) >= {"seq_is_1_to_requests", "final_state_equals_replay"}
    assert res["throughput_images_per_s"] > 0 and res["client_latency_ms"]["p99"] > 0
    assert "final_state_equals_replay" in out and "FAIL" not in out


def test_cli_serve_runs_until_sigint_and_saves_the_state(tmp_path):
    """The real command in a subprocess: serve the shipped digit model, predict, Ctrl-C, state saved."""
    state = tmp_path / "state.pt"
    cmd = [sys.executable, "-m", "testtime.cli", "serve", "--model", "mnist_digitnet", "--port", "0"]
    p = subprocess.Popen(
        [*cmd, "--state", str(state), "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in p.stderr], daemon=True).start()
    try:
        deadline, url, seen = time.monotonic() + 60, None, []
        while url is None and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
                m = re.search(r"http://127\.0\.0\.1:\d+", seen[-1])
                url = m.group(0) if m else None
        assert url, "".join(seen)
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/health").json()["model"] == "mnist_digitnet"
            r = c.post("/predict", content=encode_npy(images(2)), headers=NPY).json()
            assert r["seq"] == 1 and r["predictions"][0]["name"] in [str(d) for d in range(10)]
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
    assert state.is_file()
    resumed = adapt(load_model("mnist_digitnet"), "tent")
    resumed.load_state(state)
    assert resumed.counters()["batches"] == 1


def test_cli_help(capsys):
    for cmd in ("serve", "serve-check"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "/predict" in out and "--snapshot-interval" in out and "--clients" in out
    assert "--snapshot-every-batches" in out and "--body-timeout" in out and "--max-concurrent" in out


def test_without_fastapi_core_imports_and_serve_says_what_to_install():
    code = (
        "import sys; sys.modules['fastapi'] = None\n"
        "import testtime, testtime.cli, testtime.adapt\n"
        "from testtime.cli import main\n"
        "sys.exit(main(['serve']))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'testtime[serve]'" in lines[0], p.stderr
