"""Dataset loaders: embedded subset, npz, official pickle and CIFAR-10-C layouts, download path."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest

from testtime.data import cifar
from testtime.errors import DataError


def test_embedded_subset_is_class_balanced(embedded):
    assert embedded.x.shape == (2000, 32, 32, 3) and embedded.x.dtype == np.uint8
    assert np.bincount(embedded.y, minlength=10).tolist() == [200] * 10


def test_embedded_matches_full_test_set(data_dir, embedded):
    full = cifar.load_cifar10("test", data_dir / "cifar10_jpeg.npz")
    with np.load(cifar.resources.files("testtime.data") / "assets" / cifar.EMBEDDED_NAME) as z:
        idx = z["index"]
    assert np.array_equal(full.x[idx], embedded.x) and np.array_equal(full.y[idx], embedded.y)


def test_full_npz_loads(data_dir):
    s = cifar.load_cifar10("train", data_dir / "cifar10_jpeg.npz")
    assert s.x.shape == (50000, 32, 32, 3) and s.y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]


def test_env_var_locates_data(data_dir, monkeypatch):
    monkeypatch.setenv("TESTTIME_DATA", str(data_dir))
    assert cifar.find_cifar10() == data_dir / "cifar10_jpeg.npz"


def test_missing_and_malformed_npz(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        cifar.load_cifar10("test", tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="malformed CIFAR-10 npz"):
        cifar.load_cifar10("test", bad)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read as npz"):
        cifar.load_cifar10("test", junk)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x_test=np.zeros((2, 32, 32), np.float32), y_test=np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="uint8"):
        cifar.load_cifar10("test", wrong)
    with pytest.raises(DataError, match="unknown CIFAR-10 split"):
        cifar.load_cifar10("val", wrong)


def _write_pickle_batches(root, n=4):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({"data": data, "labels": list(range(n))}, f)
    return d


def test_official_pickle_layout(tmp_path):
    d = _write_pickle_batches(tmp_path)
    with open(d / "test_batch", "rb") as f:
        raw = pickle.load(f)["data"]
    s = cifar.load_cifar10("test", tmp_path)
    assert s.x.shape == (4, 32, 32, 3)
    assert np.array_equal(s.x[0, :, :, 0].ravel(), raw[0, :1024])  # R plane first in the official format
    assert len(cifar.load_cifar10("train", d)) == 20


def test_download_code_path_offline(tmp_path):
    src = tmp_path / "src"
    _write_pickle_batches(src)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    tar = tmp_path / "c10.tar.gz"
    tar.write_bytes(buf.getvalue())
    md5 = hashlib.md5(buf.getvalue()).hexdigest()
    out = cifar.download_cifar10(tmp_path / "dl", url=tar.as_uri(), md5=md5)
    assert len(cifar.load_cifar10("test", out)) == 4
    with pytest.raises(DataError, match="wrong md5"):
        cifar.download_cifar10(tmp_path / "dl2", url=tar.as_uri(), md5="0" * 32)
    with pytest.raises(DataError, match="download of"):
        cifar.download_cifar10(tmp_path / "dl3", url=(tmp_path / "missing.tgz").as_uri())


def test_cifar10c_npy_layout(tmp_path):
    x = np.arange(5 * 3 * 32 * 32 * 3, dtype=np.int64).astype(np.uint8).reshape(15, 32, 32, 3)
    np.save(tmp_path / "fog.npy", x)
    np.save(tmp_path / "labels.npy", np.tile(np.arange(3), 5).astype(np.uint8))
    s = cifar.load_cifar10c_npy(tmp_path, "fog", 2)
    assert np.array_equal(s.x, x[3:6]) and s.y.tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="severity"):
        cifar.load_cifar10c_npy(tmp_path, "fog", 6)
    with pytest.raises(DataError, match=r"needs snow\.npy"):
        cifar.load_cifar10c_npy(tmp_path, "snow", 1)
