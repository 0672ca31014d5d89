"""Shipped source model, weight loading safety, and source training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from testtime.errors import ConfigError, ModelError
from testtime.models import zoo
from testtime.models.train import TrainConfig, evaluate, train_source


def test_shipped_model_is_accurate_on_clean_embedded(source_model, embedded):
    err = evaluate(source_model, embedded.x, embedded.y)
    assert err < 12.0, err


def test_sha_mismatch_truncated_and_wrong_files(tmp_path):
    m = zoo.build_model("resnet26")
    p = tmp_path / "w.pt"
    torch.save(m.state_dict(), p)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        zoo.load_state(p, sha256="0" * 64)
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot load weights"):
        zoo.load_model(path=p, arch="resnet26")
    torch.save(zoo.build_model("resnet20").state_dict(), p)
    with pytest.raises(ModelError, match="do not fit"):
        zoo.load_model(path=p, arch="resnet26")
    with pytest.raises(ModelError, match="not found"):
        zoo.load_model(path=tmp_path / "missing.pt", arch="resnet26")
    with pytest.raises(ConfigError, match="unknown architecture"):
        zoo.build_model("vgg")


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, p)
    with pytest.raises(ModelError, match="cannot load weights"):
        zoo.load_state(p)


def test_train_source_resumes_identically(tmp_path, embedded):
    x, y = embedded.x[:256], embedded.y[:256]
    cfg = TrainConfig(arch="resnet20", epochs=2, batch_size=64, eval_every=1, bf16=False, warmup_epochs=1)
    a = train_source(cfg, (x, y), (x[:64], y[:64]), tmp_path / "a", progress=False)
    # interrupted after one epoch, then resumed
    b_dir = tmp_path / "b"
    train_source(cfg, (x, y), None, b_dir, progress=False, stop_after=1)
    ck = torch.load(b_dir / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1
    b = train_source(cfg, (x, y), None, b_dir, progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert np.isfinite(evaluate(a, x[:64], y[:64]))
