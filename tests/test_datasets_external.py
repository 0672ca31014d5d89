"""CIFAR-100 / CIFAR-100-C and ImageNet-C from user paths, as streams and through `testtime run`."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from testtime.cli import main
from testtime.data import cifar
from testtime.data.imagenet_c import ImageNetC, LazyImages, preprocess_image, read_list_file
from testtime.data.streams import Cifar100CFiles, Domain, StreamSpec, build_stream
from testtime.errors import DataError
from testtime.models import zoo
from testtime.models.robustbench import CifarResNeXt

WNIDS = ("n01440764", "n01443537", "n01484850")  # sorted: class indices 0, 1, 2
AUGMIX100 = "robustbench:cifar100:Hendrycks2020AugMix_ResNeXt"


# ----------------------------------------------------------------------------- CIFAR-100
def write_cifar100(root: Path, n_test: int = 20, n_train: int = 30, seed: int = 0) -> Path:
    """A fake `cifar-100-python` directory (official pickle layout), labels cycling over 0..99."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [(i * 7) % 100 for i in range(n)]
        with open(d / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": [c // 5 for c in fine]}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": list(cifar.CIFAR100_CLASSES)}, f)
    return d


def test_cifar100_pickle_layout(tmp_path):
    d = write_cifar100(tmp_path)
    s = cifar.load_cifar100("test", d)
    assert s.x.shape == (20, 32, 32, 3) and s.x.dtype == np.uint8
    assert s.y.tolist() == [(i * 7) % 100 for i in range(20)]
    with open(d / "test", "rb") as f:
        raw = pickle.load(f)["data"]
    assert np.array_equal(s.x[0, :, :, 0].ravel(), raw[0, :1024])  # R plane first, as in CIFAR-10
    assert len(cifar.load_cifar100("train", tmp_path)) == 30  # the parent directory works too
    with pytest.raises(DataError, match="does not exist"):
        cifar.load_cifar100("test", tmp_path / "nope")
    (d / "test").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a CIFAR-100 python file"):
        cifar.load_cifar100("test", d)
    (d / "test").unlink()
    with pytest.raises(DataError, match="missing test"):
        cifar.load_cifar100("test", d)


def test_cifar100_download_code_path_offline(tmp_path):
    src = write_cifar100(tmp_path / "src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(src, arcname="cifar-100-python")
    tar = tmp_path / "c100.tar.gz"
    tar.write_bytes(buf.getvalue())
    out = cifar.download_cifar100(
        tmp_path / "dl", url=tar.as_uri(), md5=hashlib.md5(buf.getvalue()).hexdigest()
    )
    assert len(cifar.load_cifar100("test", out)) == 20
    with pytest.raises(DataError, match="download of"):
        cifar.download_cifar100(tmp_path / "dl2", url=(tmp_path / "missing.tgz").as_uri())


def write_cifar_c(root: Path, corruptions=("gaussian_noise", "fog"), n: int = 6, classes: int = 100) -> Path:
    """Fake CIFAR-100-C: `<corruption>.npy` of 5 severities x n images, `labels.npy`."""
    root.mkdir(parents=True, exist_ok=True)
    for k, c in enumerate(corruptions):
        x = np.stack([np.full((32, 32, 3), 10 * k + s, np.uint8) for s in range(1, 6) for _ in range(n)])
        np.save(root / f"{c}.npy", x)
    np.save(root / "labels.npy", np.tile((np.arange(n) * 13) % classes, 5).astype(np.uint8))
    return root


def test_cifar100c_npy_files(tmp_path):
    root = write_cifar_c(tmp_path / "CIFAR-100-C")
    s = cifar.load_cifar100c_npy(root, "fog", 3)
    assert s.x.shape == (6, 32, 32, 3) and (s.x == 13).all()  # corruption 1, severity 3
    assert s.y.tolist() == [(i * 13) % 100 for i in range(6)]
    data = Cifar100CFiles(root)
    assert data.num_samples() == 6 and "official CIFAR-100-C files" in data.describe()
    x, y = data.get(Domain("gaussian_noise", 5))
    assert (x == 5).all() and y.dtype == np.int64
    with pytest.raises(DataError, match=r"CIFAR-100-C layout needs snow\.npy"):
        data.get(Domain("snow", 5))
    with pytest.raises(DataError, match="not a CIFAR-100-C directory"):
        Cifar100CFiles(tmp_path)


# ----------------------------------------------------------------------------- ImageNet-C
def _image(rng: np.random.Generator, size=(224, 224)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_imagenet_c(
    root: Path, corruptions=("gaussian_noise", "fog"), severities=(3, 5), per_class: int = 2, fmt: str = "PNG"
) -> Path:
    """A fake ImageNet-C: <corruption>/<severity>/<wnid>/ILSVRC2012_val_*.JPEG (PNG inside: lossless)."""
    rng = np.random.default_rng(0)
    for c in corruptions:
        for s in severities:
            for j, w in enumerate(WNIDS):
                d = root / c / str(s) / w
                d.mkdir(parents=True)
                for i in range(per_class):
                    _image(rng).save(d / f"ILSVRC2012_val_{j * 10 + i:08d}.JPEG", format=fmt)
    return root


def test_preprocess_matches_resize_256_center_crop_224(tmp_path):
    rng = np.random.default_rng(1)
    im = _image(rng, (300, 200))  # landscape: short side 200 -> 256, long side int(256 * 300 / 200) = 384
    im.save(tmp_path / "a.png")
    out = preprocess_image(tmp_path / "a.png")
    ref = np.asarray(im.resize((384, 256), Image.BILINEAR).crop((80, 16, 304, 240)))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8 and np.array_equal(out, ref)
    sq = _image(rng)  # ImageNet-C images are 224 x 224: upsampled to 256, centre 224 kept
    sq.save(tmp_path / "b.png")
    ref = np.asarray(sq.resize((256, 256), Image.BILINEAR).crop((16, 16, 240, 240)))
    assert np.array_equal(preprocess_image(tmp_path / "b.png"), ref)
    small = _image(rng, (100, 120))  # no resize, smaller than the crop: zero padding as torchvision
    small.save(tmp_path / "c.png")
    out = preprocess_image(tmp_path / "c.png", resize=None, crop=224)
    assert np.array_equal(out[52:172, 62:162], np.asarray(small)) and out[:52].max() == 0
    (tmp_path / "bad.JPEG").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot decode image"):
        preprocess_image(tmp_path / "bad.JPEG")


def test_imagenet_c_shapes_labels_order(tmp_path):
    root = write_imagenet_c(tmp_path / "ImageNet-C")
    data = ImageNetC(root)
    assert data.num_samples() == 6 and data.domain_names()[:2] == ("gaussian_noise", "shot_noise")
    x, y = data.get(Domain("fog", 5))
    assert isinstance(x, LazyImages) and x.shape == (6, 224, 224, 3) and len(x) == 6
    assert y.tolist() == [0, 0, 1, 1, 2, 2]  # class index = position of the wnid among sorted folders
    files, _ = data.index(Domain("fog", 5))
    assert [f"{f.parent.name}/{f.name}" for f in files] == [
        f"{w}/ILSVRC2012_val_{j * 10 + i:08d}.JPEG" for j, w in enumerate(WNIDS) for i in range(2)
    ]
    batch = x[np.array([4, 1])]
    assert batch.shape == (2, 224, 224, 3) and batch.dtype == np.uint8
    assert np.array_equal(batch[0], preprocess_image(files[4])) and np.array_equal(x[1], batch[1])
    assert x[2:2].shape == (0, 224, 224, 3)
    with pytest.raises(DataError, match="decoded batch by batch"):
        np.asarray(x)
    # as a stream: every image once per domain, float NCHW in [0, 1], labels aligned with pixels
    stream = build_stream("continual", StreamSpec(data, corruptions=("gaussian_noise", "fog"), batch_size=4))
    batches = list(stream)
    assert [tuple(b.x.shape) for b in batches] == [(4, 3, 224, 224), (2, 3, 224, 224)] * 2
    seen = sorted(int(v) for b in batches[:2] for v in b.y)
    assert seen == [0, 0, 1, 1, 2, 2] and 0.0 <= float(batches[0].x.min()) <= float(batches[0].x.max()) <= 1.0


def test_imagenet_c_subset_list(tmp_path):
    root = write_imagenet_c(tmp_path / "ImageNet-C")
    lst = tmp_path / "imagenet_test_image_ids.txt"
    lst.write_text(
        f"# RobustBench-style list\n{WNIDS[2]}/ILSVRC2012_val_00000021.JPEG\n\n{WNIDS[0]}/ILSVRC2012_val_00000000.JPEG\n"
    )
    data = ImageNetC(root, subset=lst)
    assert data.num_samples() == 2 and str(lst) in data.describe()
    files, y = data.index(Domain("gaussian_noise", 3))
    assert y.tolist() == [2, 0] and [f.name for f in files] == [
        "ILSVRC2012_val_00000021.JPEG",
        "ILSVRC2012_val_00000000.JPEG",
    ]
    lst.write_text(f"{WNIDS[0]}/ILSVRC2012_val_00000099.JPEG\n")
    with pytest.raises(
        DataError, match=r"1 listed image\(s\) missing, e.g. n01440764/ILSVRC2012_val_00000099"
    ):
        ImageNetC(root, subset=lst).get(Domain("fog", 5))
    lst.write_text("n09999999/x.JPEG\n")
    with pytest.raises(DataError, match="names class folders not present"):
        ImageNetC(root, subset=lst).get(Domain("fog", 5))
    for bad in ("fog/5/n01440764/x.JPEG", "../x.JPEG", "x.JPEG"):
        lst.write_text(bad + "\n")
        with pytest.raises(DataError, match=r"imagenet_test_image_ids\.txt:1: expected a relative path"):
            read_list_file(lst)
    with pytest.raises(DataError, match="image list file not found"):
        ImageNetC(root, subset=tmp_path / "nope.txt")


def test_imagenet_c_layout_errors(tmp_path):
    root = write_imagenet_c(tmp_path / "ImageNet-C", severities=(5,))
    data = ImageNetC(root)
    with pytest.raises(DataError, match=r"no folder for corruption 'snow'.*present: gaussian_noise, fog"):
        data.get(Domain("snow", 5))
    with pytest.raises(DataError, match=r"no folder fog/3 .*severities present: 5"):
        data.get(Domain("fog", 3))
    with pytest.raises(DataError, match="no clean image folder"):
        data.get(Domain("clean", 0))
    with pytest.raises(DataError, match="ImageNet-C directory not found"):
        ImageNetC(tmp_path / "missing")
    (tmp_path / "flat" / "images").mkdir(parents=True)
    with pytest.raises(
        DataError, match=r"not an ImageNet-C directory \(layout <corruption>/<severity>/<wnid>/\*\.JPEG\)"
    ):
        ImageNetC(tmp_path / "flat")
    # images directly under the severity folder, no class folders
    flat = tmp_path / "noclass" / "fog" / "5"
    flat.mkdir(parents=True)
    _image(np.random.default_rng(0)).save(flat / "a.JPEG", format="PNG")
    with pytest.raises(DataError, match="no class folders"):
        ImageNetC(tmp_path / "noclass").get(Domain("fog", 5))
    # domains holding different images or class folders cannot share sample indices
    other = write_imagenet_c(tmp_path / "other", severities=(5,))
    extra = other / "fog" / "5" / "n09999999"
    extra.mkdir()
    next((other / "fog" / "5" / WNIDS[1]).iterdir()).rename(extra / "moved.JPEG")  # still 6 images
    data = ImageNetC(other)
    data.get(Domain("gaussian_noise", 5))
    with pytest.raises(
        DataError, match=r"class folders differ from the first domain's \(4 vs 3; e.g. n09999999\)"
    ):
        data.get(Domain("fog", 5))
    next((root / "fog" / "5" / WNIDS[1]).iterdir()).unlink()
    with pytest.raises(DataError, match="5 images, but other domains have 6"):
        ImageNetC(root).get(Domain("fog", 5))


# ----------------------------------------------------------------------------- testtime run
def _rows(out: Path) -> list[dict[str, str]]:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    with open(run / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def small_augmix(monkeypatch, tmp_path):
    """The CIFAR-100 AugMix ResNeXt entry with a small variant of the architecture, and its checkpoint."""
    spec = zoo.ROBUSTBENCH[AUGMIX100]
    build = lambda: CifarResNeXt(depth=11, cardinality=2, base_width=4, num_classes=100)  # noqa: E731
    monkeypatch.setitem(zoo.ROBUSTBENCH, AUGMIX100, dataclasses.replace(spec, build=build))
    torch.manual_seed(0)
    p = tmp_path / "Hendrycks2020AugMix_ResNeXt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in build().state_dict().items()}}, p)
    return p


def test_run_cifar100_generated_and_official_files(tmp_path, small_augmix, capsys):
    data = write_cifar100(tmp_path / "data", n_test=8)
    common = [
        "run",
        "-m",
        "source,bn",
        "--dataset",
        "cifar100",
        "--model",
        AUGMIX100,
        "--model-path",
        str(small_augmix),
    ]
    common += ["--corruptions", "gaussian_noise,fog", "-b", "4", "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--data", str(data), "--out", str(tmp_path / "gen")]) == 0
    rows = _rows(tmp_path / "gen")
    errs = {(r["method"], r["corruption"]) for r in rows if r["metric"] == "error"}
    assert {("source", "fog"), ("bn", "gaussian_noise"), ("source", "mean")} <= errs
    assert {r["dataset"] for r in rows} == {"cifar100"}
    cdir = write_cifar_c(tmp_path / "CIFAR-100-C")
    assert main([*common, "--corrupted", str(cdir), "--out", str(tmp_path / "files")]) == 0
    assert len(_rows(tmp_path / "files")) == len(rows)
    from testtime.cli import build_parser

    for flag in ("--corrupted", "--cifar100c", "--cifar10c"):  # one option, three spellings
        assert build_parser().parse_args(["run", flag, str(cdir)]).cifar10c == str(cdir)
    capsys.readouterr()


def test_run_imagenet_c(tmp_path, monkeypatch, capsys):
    """`--dataset imagenet_c --data DIR`; the model (torchvision's ResNet-50 by default) is replaced by
    a tiny 1000-class network, as torchvision is not installed in CI."""
    from testtime.bench import experiment

    root = write_imagenet_c(tmp_path / "ImageNet-C", severities=(5,), per_class=2)
    loaded = []

    def tiny(name, path=None, arch=None):
        loaded.append(name)
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 8, 8),
            torch.nn.BatchNorm2d(4),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(4, 1000),
        ).eval()

    monkeypatch.setattr(experiment, "load_model", tiny)
    lst = tmp_path / "ids.txt"
    lst.write_text("".join(f"{w}/ILSVRC2012_val_{j * 10:08d}.JPEG\n" for j, w in enumerate(WNIDS)))
    args = [
        "run",
        "-m",
        "source,tent",
        "--dataset",
        "imagenet_c",
        "--data",
        str(root),
        "--corruptions",
        "fog,gaussian_noise",
    ]
    args += ["-b", "3", "--out", str(tmp_path / "out"), "--subset", str(lst)]
    assert main(args) == 0
    assert loaded == ["torchvision:resnet50"]
    rows = [r for r in _rows(tmp_path / "out") if r["metric"] == "error" and r["corruption"] != "mean"]
    assert {(r["method"], r["corruption"], r["severity"]) for r in rows} == {
        (m, c, "5") for m in ("source", "tent") for c in ("fog", "gaussian_noise")
    }
    capsys.readouterr()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--dataset", "imagenet_c"], "imagenet_c needs the ImageNet-C directory"),
        (["--dataset", "imagenet_c", "--data", "{tmp}/none"], "ImageNet-C directory not found"),
        (
            ["--dataset", "imagenet_c", "--data", "{tmp}", "--corrupted", "{tmp}"],
            "pass the ImageNet-C directory as --data",
        ),
        (["--dataset", "cifar100"], "cifar100 needs the CIFAR-100 test set"),
        (
            ["--dataset", "cifar100", "--model", "cifar10_resnet26"],
            "was trained on cifar10; dataset cifar100 needs a model trained on cifar100",
        ),
        (["--dataset", "cifar10", "--subset", "{tmp}/ids.txt"], "applies to --dataset imagenet_c only"),
    ],
)
def test_run_errors_are_one_line(args, match, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TESTTIME_DATA", str(tmp_path / "empty"))  # no datasets to be found
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["run", *(a.replace("{tmp}", str(tmp_path)) for a in args)]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and err.startswith("testtime: error:")
