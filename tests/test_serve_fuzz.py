"""`testtime serve` under hostile input and faults (issue 17): a bounded, seeded fuzzing client on
loopback. Every malformed request gets a 4xx with one line of JSON and leaves the model state as
it was; slow uploads are cut off at the body timeout; disconnects are not server errors; 16-bit and
palette PNGs decode correctly or are refused; a damaged or implausible state file is refused and
left byte-identical; one server per state file; stale snapshot temp files are removed; the
Prometheus scrape parses.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
import re
import socket
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")

from testtime.adapt import adapt  # noqa: E402
from testtime.adapt.state_file import state_sha256  # noqa: E402
from testtime.data.cifar import CIFAR10_CLASSES  # noqa: E402
from testtime.errors import ConfigError, ModelError  # noqa: E402
from testtime.models.zoo import build_model  # noqa: E402
from testtime.serve import BackgroundServer, create_app, decode_images, encode_npy  # noqa: E402
from testtime.utils import state_digest  # noqa: E402

NPY = {"Content-Type": "application/x-npy"}
SEED = 17


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("digitnet")


def fresh(model):
    return adapt(model, "tent")


@contextlib.contextmanager
def serving(adapted, **kw):
    kw.setdefault("class_names", CIFAR10_CLASSES)
    srv = BackgroundServer(create_app(adapted, model_name="tiny", **kw))
    with srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        client.port = srv.port
        yield client


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def assert_json_error(r, statuses=range(400, 500)):
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert "\n" not in r.text and "\n" not in body["error"]


# ------------------------------------------------------------------------------------ .npy bodies
def npy_with_header(header: str | bytes, data: bytes = b"", version=(1, 0), hlen: int | None = None) -> bytes:
    h = header.encode("latin1") if isinstance(header, str) else header
    n = len(h) if hlen is None else hlen
    version = (2, 0) if n > 0xFFFF else version
    size = struct.pack("<H", n) if version == (1, 0) else struct.pack("<I", n)
    return b"\x93NUMPY" + bytes(version) + size + h + data


GOOD_DATA = images(2).tobytes()
HOSTILE_HEADERS = [
    "{",
    "",
    "}",
    "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 32, 32, 3), ",
    "{'descr': '|u1', 'fortran_order': False, 'shape': (True, 32, 32, 3), }",
    "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 32, 32, False), }",
    "{'descr': '|u1', 'fortran_order': False, 'shape': " + "(" * 5000 + ")" * 5000 + ", }",
    "{'descr': '|u1', 'fortran_order': False, 'shape': (" + "1, " * 4000 + "), }",
    "{'descr': '|u1', 'fortran_order': False, 'shape': (" + "9" * 3000 + ", 32, 32, 3), }",
    "{'descr': '|u1', 'fortran_order': False, 'shape': (" + "9" * 19 + ", 32, 32, 3), }",
    "{'descr': '|u1', 'fortran_order': False, 'shape': (-2, 32, 32, 3), }",
    "{'descr': '|u1', 'fortran_order': False, 'shape': (2.0, 32, 32, 3), }",
    "{'descr': '|u1', 'fortran_order': False, 'shape': (2), }",
    "{'descr': '|u1', 'fortran_order': False, 'shape': [2, 32, 32, 3], }",
    "{'descr': '|u1', 'fortran_order': False, 'shape': 2, }",
    "{'descr': '|u1', 'fortran_order': 0, 'shape': (2, 32, 32, 3), }",
    "{'descr': [('a', '<u1')], 'fortran_order': False, 'shape': (2, 32, 32, 3), }",
    "{'descr': 1, 'fortran_order': False, 'shape': (2, 32, 32, 3), }",
    "{'descr': 'not a dtype', 'fortran_order': False, 'shape': (2, 32, 32, 3), }",
    "{'descr': 'q9999', 'fortran_order': False, 'shape': (2, 32, 32, 3), }",
    "{'descr': '|u1', 'descr': '|u1', 'fortran_order': False, 'shape': (2, 32, 32, 3), }",
    "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 32, 32, 3), 'extra': 1, }",
    "{'descr': '|u1', 'fortran_order': False, }",
    "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 32, 32, 3), '__import__(\"os\")': 1}",
    "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 32, 32, 3)} + [1] * 10**9",
    "[" * 100000,
    "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 32, 32, 3)\x00}",
    "{'descr': '\\x00', 'fortran_order': False, 'shape': (2, 32, 32, 3), }",
    "{'descr': '|u1', 'fortran_order': False, 'shape': (" + ", ".join(["1"] * 40) + "), }",
    "\xff\xfe{'descr': '|u1', 'fortran_order': False, 'shape': (2, 32, 32, 3), }",
    "{" + " " * 16000 + "}",
    "{'descr': '|u1', 'fortran_order': False, 'shape': (" + " " * 8000 + "2" + " " * 7000 + ",",
]
VALID_HEADER = "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 32, 32, 3), }".ljust(117) + "\n"
HOSTILE_BODIES = [
    *(npy_with_header(h, GOOD_DATA) for h in HOSTILE_HEADERS),
    npy_with_header(VALID_HEADER, GOOD_DATA, hlen=20),  # the length field is shorter than the header
    npy_with_header(VALID_HEADER, GOOD_DATA, hlen=0xFFFF),  # ... longer than the whole body
    npy_with_header(VALID_HEADER, GOOD_DATA, version=(2, 0), hlen=0xFFFFFFFF),
    npy_with_header(VALID_HEADER, GOOD_DATA, version=(3, 0)),
    npy_with_header(VALID_HEADER, GOOD_DATA, version=(1, 255)),
    b"\x93NUMPY\x01",
    b"\x93NUMPY\x01\x00\x05",
    b"\x93NUMPY",
]


def mutations(valid: bytes, count: int, rng: random.Random) -> list[bytes]:
    """Random byte mutations of a valid .npy: flips, overwrites, insertions, deletions, truncation,
    most of them in the first 128 bytes (magic, version, length, header)."""
    out = []
    for _ in range(count):
        b = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(min(128, len(b))) if rng.random() < 0.8 else rng.randrange(len(b))
            op = rng.choice(["flip", "set", "insert", "delete", "truncate", "punct"])
            if op == "flip":
                b[at] ^= 1 << rng.randrange(8)
            elif op == "set":
                b[at] = rng.randrange(256)
            elif op == "insert":
                b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif op == "delete":
                del b[at : at + rng.randint(1, 8)]
            elif op == "truncate":
                del b[at:]
            else:  # syntax characters where they hurt most
                b[at] = ord(rng.choice("(){}[],:'\"0123456789TF \n\\"))
            if not b:
                break
        out.append(bytes(b))
    return out


def test_hostile_npy_headers_and_mutations_get_400_and_leave_the_state_unchanged(tiny):
    adapted = fresh(tiny)
    rng = random.Random(SEED)
    valid = encode_npy(images(2, 1))
    bodies = HOSTILE_BODIES + mutations(valid, 120, rng)
    statuses = []
    with serving(adapted, max_batch=8) as c:
        for i, body in enumerate(bodies):
            before = state_digest(adapted)
            r = c.post("/predict", content=body, headers={**NPY, "X-Request-Id": f"fuzz-{i}"})
            statuses.append(r.status_code)
            assert r.status_code < 500, (i, body[:80], r.text[:300])
            if r.status_code != 200:
                assert_json_error(r)
                assert r.headers["X-Request-Id"] == f"fuzz-{i}"
                assert state_digest(adapted) == before, (i, body[:80])
        m = c.get("/metrics.json").json()
        # still serving normally
        assert c.post("/predict", content=valid, headers=NPY).status_code == 200
    assert all(s >= 400 for s in statuses[: len(HOSTILE_BODIES)])
    assert statuses.count(200) < len(statuses) // 2  # most mutations break the body
    assert m["server_errors"] == 0 and m["errors"] == len(bodies) - statuses.count(200)


def test_the_header_parser_agrees_with_numpy_on_valid_files():
    from testtime.serve import _npy_header

    rng = random.Random(SEED)
    for _ in range(100):
        shape = tuple(rng.randint(0, 3) for _ in range(rng.randint(0, 5)))
        a = np.zeros(shape, rng.choice(["u1", "<f4", ">f4", "<i8", "?", "<c8", ">u2"]))
        a = np.asfortranarray(a) if rng.random() < 0.5 else a
        for version in ((1, 0), (2, 0)):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, a, version=version, allow_pickle=False)
            f = io.BytesIO(buf.getvalue())
            np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            assert _npy_header(buf.getvalue()) == (*read(f), f.tell())


# ------------------------------------------------------------------------------------ raw HTTP
def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(10)
    return s


def read_until_closed(s: socket.socket, limit_s: float = 10) -> tuple[bytes, float]:
    """(everything the server sent, seconds until it closed the connection)."""
    t0, data = time.monotonic(), b""
    s.settimeout(limit_s)
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := s.recv(65536):
            data += chunk
    return data, time.monotonic() - t0


def status_and_json(data: bytes) -> tuple[int, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def post_head(port: int, extra: str) -> str:
    return (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-npy\r\n{extra}\r\n"
    )


def test_slow_bodies_are_cut_off_at_the_body_timeout_and_uploads_are_bounded(tiny):
    adapted = fresh(tiny)
    timeout = 0.6
    with serving(adapted, body_timeout_s=timeout, max_concurrent=3) as c:
        port = c.port
        slow = [
            post_head(port, "Content-Length: 1000\r\n").encode() + b"\x93NUMP",  # 5 of 1000 bytes
            post_head(port, "Transfer-Encoding: chunked\r\n").encode() + b"fffffffffffffff\r\nabc",
            post_head(port, "Transfer-Encoding: chunked\r\n").encode(),  # then a byte every 0.1 s
        ]
        socks = [connect(port) for _ in slow]
        t0 = time.monotonic()
        for s, head in zip(socks, slow):
            s.sendall(head)
        time.sleep(0.1)
        # all 3 upload slots are taken: a 4th request is refused at once, not queued
        t1 = time.monotonic()
        r = c.post("/predict", content=encode_npy(images(2)), headers=NPY)
        assert r.status_code == 503 and time.monotonic() - t1 < timeout, r.text
        assert_json_error(r, (503,))
        assert r.headers["Retry-After"] == "1"
        # the trickler keeps sending, but its upload still ends at the timeout
        for _ in range(4):
            socks[2].sendall(b"1\r\nx\r\n")
            time.sleep(0.1)
        for s in socks:
            data, _ = read_until_closed(s)
            elapsed = time.monotonic() - t0
            status, body = status_and_json(data)
            assert status == 408 and "not received within 0.6 s" in body["error"], data[:300]
            assert b"connection: close" in data.lower()
            assert elapsed < timeout + 2.0, elapsed  # closed by the server, within the timeout
            s.close()
        # the slots are free again
        assert c.post("/predict", content=encode_npy(images(2)), headers=NPY).status_code == 200
        m = c.get("/metrics.json").json()
    assert m["body_timeouts"] == 3 and m["rejected_busy"] == 1 and m["server_errors"] == 0
    assert m["in_progress"] == 0 and m["adapted_batches"] == 1


def test_disconnects_and_protocol_errors_are_not_server_errors(tiny, caplog):
    caplog.set_level(logging.INFO, logger="testtime.serve")
    adapted = fresh(tiny)
    before = state_digest(adapted)
    with serving(adapted) as c:
        port = c.port
        # an upload aborted halfway, twice
        for _ in range(2):
            s = connect(port)
            s.sendall(post_head(port, "Content-Length: 10000\r\n").encode() + encode_npy(images(2))[:500])
            time.sleep(0.05)
            s.close()
        # a bad chunk-size line: uvicorn answers 400 itself and drops the connection
        s = connect(port)
        s.sendall(post_head(port, "Transfer-Encoding: chunked\r\n").encode() + b"zz-not-hex\r\nabc\r\n")
        data, _ = read_until_closed(s)
        s.close()
        assert data.startswith(b"HTTP/1.1 400"), data[:200]
        # Content-Length forms h11 rejects (uvicorn's plain-text 400), and one our code sees: 413
        s = connect(port)
        s.sendall(post_head(port, "Content-Length: 1e30\r\n").encode())
        data, _ = read_until_closed(s)
        assert data.startswith(b"HTTP/1.1 400") and b"Invalid HTTP request" in data, data[:200]
        for raw in (
            post_head(port, "Content-Length: " + "9" * 21 + "\r\n").encode(),  # h11: at most 20 digits
            post_head(port, "X-Nul: a\x00b\r\nContent-Length: 3\r\n").encode() + b"abc",
            "POST /pr\u00e9dict HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode(),
        ):
            s = connect(port)
            s.sendall(raw)
            data = read_until_closed(s)[0]
            assert data.startswith(b"HTTP/1.1 400") and b"Invalid HTTP request" in data, (raw, data[:200])
        s = connect(port)
        s.sendall(post_head(port, "Content-Length: " + "9" * 20 + "\r\n").encode())
        status, body = status_and_json(read_until_closed(s)[0])
        assert status == 413 and "exceeds the limit" in body["error"]
        deadline = time.monotonic() + 10
        while c.get("/metrics.json").json()["client_disconnects"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        m = c.get("/metrics.json").json()
    assert m["client_disconnects"] == 3 and m["server_errors"] == 0 and m["adapted_batches"] == 0
    assert state_digest(adapted) == before
    ours = [r for r in caplog.records if r.name == "testtime.serve"]
    assert not [r for r in ours if r.levelno >= logging.ERROR or r.exc_info]
    assert sum("client disconnected" in r.getMessage() for r in ours) == 3


# ------------------------------------------------------------------------------------ PNG modes
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(rows: np.ndarray, depth: int, color_type: int, plte: bytes | None = None) -> bytes:
    """A PNG written by hand: rows (H, W*samples) of sample values, no filtering."""
    h = rows.shape[0]
    if depth == 16:
        lines = [r.astype(">u2").tobytes() for r in rows]
    elif depth == 8:
        lines = [r.astype(np.uint8).tobytes() for r in rows]
    else:  # 1, 2 or 4 bits per sample, packed big-endian
        per = 8 // depth
        v = rows.astype(np.uint8).reshape(h, -1, per)
        packed = sum(v[..., i] << (depth * (per - 1 - i)) for i in range(per)).astype(np.uint8)
        lines = [r.tobytes() for r in packed]
    ihdr = struct.pack(
        ">IIBBBBB", rows.shape[1] // {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type], h, depth, color_type, 0, 0, 0
    )
    idat = zlib.compress(b"".join(b"\x00" + line for line in lines))
    chunks = png_chunk(b"IHDR", ihdr) + (png_chunk(b"PLTE", plte) if plte is not None else b"")
    return b"\x89PNG\r\n\x1a\n" + chunks + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def test_png_modes_decode_exactly_or_are_refused(tiny):
    ramp16 = (np.arange(32 * 32, dtype=np.int64).reshape(32, 32) * 64 + 7).astype(np.uint16)  # 7..65479
    gray16 = torch.from_numpy(ramp16.astype(np.float32) / 65535)
    rgb16 = np.stack([ramp16, 65535 - ramp16, ramp16 // 2], -1)
    idx = np.arange(32 * 32).reshape(32, 32) % 4
    colours = np.array([[0, 0, 0], [255, 0, 0], [10, 200, 30], [255, 255, 255]], np.uint8)
    cases = {  # name: (png bytes, expected (3, 32, 32) in [0, 1] or None: refused, tolerance)
        "16-bit gray": (raw_png(ramp16, 16, 0), gray16.expand(3, -1, -1), 1e-6),
        "16-bit gray+alpha": (raw_png(np.stack([ramp16, ramp16], -1).reshape(32, 64), 16, 4), gray16.expand(3, -1, -1), 1 / 255),
        "16-bit RGB": (raw_png(rgb16.reshape(32, 96), 16, 2), torch.from_numpy(rgb16 / 65535).permute(2, 0, 1).float(), 1 / 255),
        "2-bit gray": (raw_png(idx, 2, 0), torch.from_numpy(idx / 3).float().expand(3, -1, -1), 1e-6),
        "1-bit gray": (raw_png(idx % 2, 1, 0), torch.from_numpy(idx % 2).float().expand(3, -1, -1), 0),
        "palette": (raw_png(idx, 8, 3, colours.tobytes()), torch.from_numpy(colours[idx] / 255).permute(2, 0, 1).float(), 1e-6),
        "palette without PLTE": (raw_png(idx, 8, 3), None, 0),
        "palette index beyond PLTE": (raw_png(idx, 8, 3, colours[:2].tobytes()), None, 0),
    }  # fmt: skip
    for name, (data, want, tol) in cases.items():
        if want is None:
            with pytest.raises(Exception, match="palette") as e:
                decode_images([(name, data)], (3, 32, 32))
            assert type(e.value).__name__ == "BadInput"
            continue
        got = decode_images([(name, data)], (3, 32, 32))[0]
        assert got.shape == (3, 32, 32) and float((got - want).abs().max()) <= tol + 1e-7, name
    # 16-bit gray on a 1-channel model: the plain ramp, not clipped at 1.0
    one = decode_images([("g", cases["16-bit gray"][0])], (1, 32, 32))[0, 0]
    assert float((one - gray16).abs().max()) < 1e-6 and float((one == 1).float().mean()) == 0
    # over HTTP: refused ones are a 400 and leave the state alone; decoded ones adapt
    adapted, replay = fresh(tiny), fresh(tiny)
    with serving(adapted) as c:
        for name, (data, want, _) in cases.items():
            before = state_digest(adapted)
            r = c.post("/predict", files=[("file", (f"{name}.png", data, "image/png"))] * 2)
            if want is None:
                assert_json_error(r, (400,))
                assert "palette" in r.json()["error"] and state_digest(adapted) == before
            else:
                assert r.status_code == 200, (name, r.text)
                x = decode_images([(name, data)] * 2, (3, 32, 32))
                assert replay(x).argmax(1).tolist() == [p["class"] for p in r.json()["predictions"]]
    assert state_digest(adapted) == state_digest(replay)


# ------------------------------------------------------------------------------------ state files
def saved_state(tiny, path, batches=2):
    a = fresh(tiny)
    for i in range(batches):
        a(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)))
    a.save_state(path)
    return a


def rewrite(path, edit):
    """Load the saved object, edit its state, write it back with a valid checksum."""
    obj = torch.load(path, weights_only=True)
    edit(obj["state"])
    obj["sha256"] = state_sha256(obj["state"])
    torch.save(obj, path)


def flip_tensor_byte(path):
    """Flip one bit inside the largest tensor's data in the zip (the CRC is not checked on load)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x01  # a low mantissa bit: still a finite weight
    path.write_bytes(bytes(data))


TAMPER = {  # name: (damage, message fragment)
    "flipped tensor byte": (flip_tensor_byte, "checksum mismatch"),
    "NaN weight": (lambda p: rewrite(p, lambda s: s["model.conv1.weight"].view(-1).__setitem__(0, float("nan"))), "NaN or Inf"),
    "NaN counter": (lambda p: rewrite(p, lambda s: s.__setitem__("n_batches", torch.tensor(float("nan")))), "counter n_batches"),
    "negative counter": (lambda p: rewrite(p, lambda s: s.__setitem__("n_images", torch.tensor(-5))), "counter n_images"),
    "checksum edited": (lambda p: torch.save({**torch.load(p, weights_only=True), "sha256": "0" * 64}, p), "checksum mismatch"),
    "plain state dict": (lambda p: torch.save(torch.load(p, weights_only=True)["state"], p), "without an integrity checksum"),
    "pickled code": (lambda p: torch.save({"x": re.compile}, p), "refuses"),
}  # fmt: skip


def test_a_damaged_or_implausible_state_file_is_refused_and_left_untouched(tiny, tmp_path):
    good = tmp_path / "good.pt"
    a = saved_state(tiny, good)
    assert next(k for k in a.state_dict() if k.endswith("weight")) == "model.conv1.weight"  # the NaN case
    b = fresh(tiny)
    h = state_digest(b)
    for name, (damage, fragment) in TAMPER.items():
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        path.write_bytes(good.read_bytes())
        damage(path)
        data = path.read_bytes()
        with pytest.raises(ModelError, match=re.escape(fragment)) as e:
            create_app(b, state_path=path, snapshot_interval_s=0.05)
        msg = str(e.value)
        assert "\n" not in msg and "weights_only=False" not in msg and "will likely succeed" not in msg
        assert e.value.__cause__ is None or "weights_only" not in str(e.value.__cause__)
        assert state_digest(b) == h and path.read_bytes() == data, name  # nothing loaded, nothing written
        with pytest.raises(ModelError, match=re.escape(fragment)):
            b.load_state(path)
        assert path.read_bytes() == data and state_digest(b) == h
    # a refused start releases its lock: the good file at the same place serves
    path.write_bytes(good.read_bytes())
    with serving(b, state_path=path, snapshot_interval_s=0) as c:
        assert c.get("/metrics.json").json()["adapted_batches"] == a.counters()["batches"] == 2
        assert state_digest(b) == state_digest(a)


def test_one_server_per_state_file_and_stale_temp_files_are_removed(tiny, tmp_path):
    path = tmp_path / "state.pt"
    saved_state(tiny, path)
    stale = [tmp_path / ".state.pt.abc123_x.tmp", tmp_path / ".state.pt.q9z8y7w6.tmp"]
    others = [tmp_path / ".other.pt.abc123_x.tmp", tmp_path / "state.pt.tmp", tmp_path / ".state.pt.tmp"]
    for p in stale + others:
        p.write_bytes(b"half a snapshot")
    a = fresh(tiny)
    with serving(a, state_path=path, snapshot_interval_s=0) as c:
        assert not any(p.exists() for p in stale) and all(p.exists() for p in others)
        assert (tmp_path / "state.pt.lock").is_file()
        assert c.post("/predict", content=encode_npy(images(4)), headers=NPY).json()["seq"] == 3
        with pytest.raises(ConfigError, match=r"in use by another testtime serve \(pid \d+\)"):
            create_app(fresh(tiny), state_path=path)
        # and from another process (without importing torch: a bare flock attempt)
        probe = (
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n"
        )
        lock = str(tmp_path / "state.pt.lock")
        assert subprocess.run([sys.executable, "-c", probe, lock], timeout=60).returncode == 3
    # released on stop; the first server's batches are in the file
    b = fresh(tiny)
    with serving(b, state_path=path, snapshot_interval_s=0):
        assert b.counters()["batches"] == 3 and state_digest(b) == state_digest(a)


def test_snapshot_every_batch_survives_kill_9(tmp_path):
    """--snapshot-every-batches 1: every answered batch is on disk, even after SIGKILL."""
    state = tmp_path / "state.pt"
    cmd = [sys.executable, "-m", "testtime.cli", "serve", "--model", "mnist_digitnet", "--port", "0"]
    p = subprocess.Popen(
        [*cmd, "--state", str(state), "--snapshot-interval", "0", "--snapshot-every-batches", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url, seen, deadline = None, [], time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            seen.append(p.stdout.readline())
            m = re.search(r"http://127\.0\.0\.1:\d+", seen[-1])
            url = m.group(0) if m else None
        assert url, "".join(seen)
        with httpx.Client(base_url=url, timeout=30) as c:
            seqs = [
                c.post("/predict", content=encode_npy(images(2, i)), headers=NPY).json()["seq"]
                for i in range(3)
            ]
        assert seqs == [1, 2, 3]
        p.kill()  # SIGKILL: no shutdown snapshot
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    from testtime.models.zoo import load_model

    resumed = adapt(load_model("mnist_digitnet"), "tent")
    resumed.load_state(state)
    assert resumed.counters()["batches"] == 3


def test_snapshot_every_n_batches_writes_before_answering(tiny, tmp_path):
    path = tmp_path / "s.pt"
    a = fresh(tiny)
    with serving(a, state_path=path, snapshot_interval_s=0, snapshot_every_batches=2) as c:
        for i in range(1, 5):
            assert c.post("/predict", content=encode_npy(images(2, i)), headers=NPY).json()["seq"] == i
            if i % 2 == 0:  # on disk before the answer came back
                b = fresh(tiny)
                b.load_state(path)
                assert b.counters()["batches"] == i and state_digest(b) == state_digest(a)
            else:
                assert not path.exists() or fresh_batches(tiny, path) == i - 1
        assert c.get("/metrics.json").json()["snapshots"] == 2


def fresh_batches(tiny, path):
    b = fresh(tiny)
    b.load_state(path)
    return b.counters()["batches"]


# ------------------------------------------------------------------------------------ Prometheus
def test_prometheus_scrape_parses(tiny):
    adapted = fresh(tiny)
    with serving(adapted) as c:
        for i in range(3):
            assert c.post("/predict", content=encode_npy(images(2, i)), headers=NPY).status_code == 200
        assert c.post("/predict", content=b"junk", headers=NPY).status_code == 400
        r = c.get("/metrics")
        om = c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert om.headers["content-type"].startswith("application/openmetrics-text") and om.text.endswith(
        "# EOF\n"
    )
    fams = {f.name: f for f in parser.text_string_to_metric_families(r.text)}
    value = {s.name + json.dumps(s.labels, sort_keys=True): s.value for f in fams.values() for s in f.samples}
    assert fams["testtime_requests"].type == "counter" and value["testtime_requests_total{}"] == 4
    assert value["testtime_images_total{}"] == 6 and value["testtime_client_errors_total{}"] == 1
    assert value["testtime_server_errors_total{}"] == 0 and value["testtime_adapted_batches_total{}"] == 3
    assert value["testtime_client_disconnects_total{}"] == 0
    assert value['testtime_service_info{"method": "tent", "model": "tiny"}'] == 1
    hist = fams["testtime_request_duration_seconds"]
    assert hist.type == "histogram" and value["testtime_request_duration_seconds_count{}"] == 3
    assert value['testtime_request_duration_seconds_bucket{"le": "+Inf"}'] == 3
    assert value["testtime_model_duration_seconds_sum{}"] > 0
    assert sum(v for k, v in value.items() if k.startswith("testtime_recent_predictions{")) == 6
    assert fams["testtime_requests_in_progress"].type == "gauge"
