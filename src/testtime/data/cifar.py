"""CIFAR-10/100 and CIFAR-10/100-C loading: npz, the official python-pickle releases, and the `-C` `.npy` files."""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from testtime.errors import DataError

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TAR_MD5 = "c58f30108f718f92721af3b95e74349a"
ENV_DATA = "TESTTIME_DATA"
EMBEDDED_NAME = "cifar10_test_subset.npz"


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 NHWC RGB plus int64 labels, with where they came from."""

    x: np.ndarray
    y: np.ndarray
    source: str

    def __post_init__(self) -> None:
        validate_images(self.x, self.y, self.source)

    def __len__(self) -> int:
        return len(self.y)


def validate_images(x: np.ndarray, y: np.ndarray, source: str) -> None:
    """Raise DataError unless x is uint8 (N, H, W, 3) and y holds N labels."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        shape = getattr(x, "shape", None)
        dtype = getattr(x, "dtype", type(x).__name__)
        raise DataError(f"{source}: images must be uint8 (N, H, W, 3), got {dtype} {shape}")
    if not isinstance(y, np.ndarray) or y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{source}: expected {len(x)} labels, got shape {getattr(y, 'shape', None)}")
    if len(x) == 0:
        raise DataError(f"{source}: contains no images")


def shared_data_dirs() -> list[Path]:
    """Directories searched for datasets when no path is given: $TESTTIME_DATA, ../shared/data."""
    dirs = []
    if os.environ.get(ENV_DATA):
        dirs.append(Path(os.environ[ENV_DATA]).expanduser())
    cwd = Path.cwd()
    for base in (cwd, *cwd.parents[:3]):
        dirs.append(base / "shared" / "data")
    dirs.append(Path.home() / ".cache" / "testtime" / "data")
    return dirs


def find_cifar10(path: str | os.PathLike | None = None) -> Path | None:
    """Locate full CIFAR-10: an explicit path (npz file or directory), else the search dirs."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(f"CIFAR-10 data path does not exist: {p}")
        return p
    for d in shared_data_dirs():
        for name in ("cifar10_jpeg.npz", "cifar10.npz", "cifar-10-batches-py"):
            if (d / name).exists():
                return d / name
    return None


def _load_npz(path: Path, split: str) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as z:
            kx, ky = f"x_{split}", f"y_{split}"
            if kx not in z or ky not in z:
                raise DataError(
                    f"{path}: malformed CIFAR-10 npz, needs keys {kx!r} and {ky!r}, has {sorted(z.files)}"
                )
            x, y = z[kx], z[ky]
            if (
                y.ndim == 1
                and len(y)
                and not (np.issubdtype(y.dtype, np.integer) and y.min() >= 0 and y.max() < 10)
            ):
                raise DataError(
                    f"{path}: {ky} must hold integer CIFAR-10 class labels 0..9, got {y.dtype} "
                    f"values in [{y.min()}, {y.max()}]"
                )
            y = y.astype(np.int64)
    except DataError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError ...
        raise DataError(f"{path}: cannot read as npz ({type(e).__name__}: {e})") from e
    return ImageSet(x, y, str(path))


def _load_pickle_dir(root: Path, split: str) -> ImageSet:
    """The official python release (`cifar-10-batches-py`, as torchvision lays it out)."""
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        f = root / name
        if not f.exists():
            raise DataError(f"{root}: missing {name} (expected the official cifar-10-batches-py layout)")
        try:
            with open(f, "rb") as fh:
                d = pickle.load(fh, encoding="latin1")
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(d["labels"], dtype=np.int64))
        except Exception as e:
            raise DataError(f"{f}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    return ImageSet(np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), str(root))


def load_cifar10(split: str = "test", path: str | os.PathLike | None = None) -> ImageSet:
    """Load the full CIFAR-10 `train` or `test` split from an npz file or the official pickle directory."""
    if split not in ("train", "test"):
        raise DataError(f"unknown CIFAR-10 split {split!r}; use 'train' or 'test'")
    p = find_cifar10(path)
    if p is None:
        raise DataError(
            "full CIFAR-10 not found; pass --data PATH, set $TESTTIME_DATA, or download it with "
            "testtime.data.cifar.download_cifar10() (into ~/.cache/testtime/data, which is searched)"
        )
    return _load_npz(p, split) if p.is_file() else _load_pickle_dir(p, split)


def load_embedded_cifar10() -> ImageSet:
    """The class-balanced CIFAR-10 test subset shipped inside the package."""
    ref = resources.files("testtime.data") / "assets" / EMBEDDED_NAME
    with resources.as_file(ref) as p:
        s = _load_npz(Path(p), "test")
    return ImageSet(s.x, s.y, f"embedded:{EMBEDDED_NAME}")


def embedded_fallback_notice() -> str:
    """What `--data auto` says when it falls back to the shipped subset (terminal and config.json)."""
    return (
        "--data auto: the full CIFAR-10 was not found ($TESTTIME_DATA, shared/data, "
        "~/.cache/testtime/data); using the 2,000 CIFAR-10 test images shipped in the package instead, "
        "so the results are on that subset, not the 10,000-image test set"
    )


def load_cifar10_test(path: str | os.PathLike | None = None, embedded: bool | None = None) -> ImageSet:
    """The full test set when found (or given), else the embedded subset; `embedded=True` forces it."""
    if embedded:
        return load_embedded_cifar10()
    if path is not None or find_cifar10() is not None:
        return load_cifar10("test", path)
    if embedded is False:
        raise DataError("full CIFAR-10 test set not found and embedded=False")
    return load_embedded_cifar10()


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_release(
    root: str | os.PathLike | None, url: str, md5: str | None, folder: str, probe: str
) -> Path:
    root = Path(root) if root is not None else Path.home() / ".cache" / "testtime" / "data"
    root.mkdir(parents=True, exist_ok=True)
    out = root / folder
    if (out / probe).exists():
        return out
    tar = root / (Path(urllib.parse.urlparse(url).path).name or f"{folder}.tar.gz")
    tmp = tar.with_suffix(".part")
    try:
        urllib.request.urlretrieve(url, tmp)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"download of {url} failed ({type(e).__name__}: {e})") from e
    if md5 is not None and _md5(tmp) != md5:
        tmp.unlink(missing_ok=True)
        raise DataError(f"download of {url} has the wrong md5 checksum")
    os.replace(tmp, tar)
    with tarfile.open(tar) as t:
        t.extractall(root, filter="data")
    return out


def download_cifar10(
    root: str | os.PathLike | None = None, url: str = CIFAR10_URL, md5: str | None = CIFAR10_TAR_MD5
) -> Path:
    """Download and extract the official python release; returns the `cifar-10-batches-py` dir."""
    return _download_release(root, url, md5, "cifar-10-batches-py", "test_batch")


CIFAR10C_CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)


def load_cifar_c_npy(
    root: str | os.PathLike, corruption: str, severity: int, name: str = "CIFAR-10-C"
) -> ImageSet:
    """Read the official CIFAR-10-C / CIFAR-100-C layout: `<corruption>.npy` (5 severities x N) + `labels.npy`."""
    root = Path(root)
    f, fl = root / f"{corruption}.npy", root / "labels.npy"
    if not f.exists() or not fl.exists():
        raise DataError(f"{root}: {name} layout needs {corruption}.npy and labels.npy")
    if not 1 <= severity <= 5:
        raise DataError(f"severity must be in 1..5, got {severity}")
    try:
        x = np.load(f, mmap_mode="r", allow_pickle=False)
        y = np.load(fl, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{root}: cannot read {f.name} / labels.npy ({type(e).__name__}: {e})") from e
    n = len(x) // 5
    if len(x) % 5 or len(y) != len(x):
        raise DataError(f"{f}: expected 5 severities of equal size and matching labels.npy")
    sl = slice((severity - 1) * n, severity * n)
    return ImageSet(np.ascontiguousarray(x[sl]), y[sl].astype(np.int64), f"{f}[severity {severity}]")


def load_cifar10c_npy(root: str | os.PathLike, corruption: str, severity: int) -> ImageSet:
    """Read the official CIFAR-10-C layout: `<corruption>.npy` (50000 = 5 severities x 10k) + `labels.npy`."""
    return load_cifar_c_npy(root, corruption, severity, "CIFAR-10-C")


# ----------------------------------------------------------------------------- CIFAR-100
CIFAR100_DIR = "cifar-100-python"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_TAR_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
# the fine labels in index order (alphabetical, as in the release's `meta` file)
CIFAR100_CLASSES = (
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
)


def find_cifar100(path: str | os.PathLike | None = None) -> Path | None:
    """Locate the official `cifar-100-python` directory: an explicit path, else the search dirs."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(f"CIFAR-100 data path does not exist: {p}")
        return p
    for d in shared_data_dirs():
        if (d / CIFAR100_DIR).is_dir():
            return d / CIFAR100_DIR
    return None


def load_cifar100(split: str = "test", path: str | os.PathLike | None = None) -> ImageSet:
    """CIFAR-100 `train` or `test` (fine labels 0..99) from the official python release.

    `path` is the `cifar-100-python` directory (holding `train`, `test`, `meta`) or its parent.
    """
    if split not in ("train", "test"):
        raise DataError(f"unknown CIFAR-100 split {split!r}; use 'train' or 'test'")
    root = find_cifar100(path)
    if root is None:
        raise DataError(
            "CIFAR-100 not found; pass --data PATH (the cifar-100-python directory) or put "
            "cifar-100-python under $TESTTIME_DATA"
        )
    if root.is_dir() and (root / CIFAR100_DIR).is_dir():
        root = root / CIFAR100_DIR
    f = root / split
    if not root.is_dir() or not f.is_file():
        raise DataError(
            f"{root}: missing {split} (expected the official cifar-100-python layout: train, test, meta)"
        )
    try:
        with open(f, "rb") as fh:
            d = pickle.load(fh, encoding="latin1")
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.asarray(d["fine_labels"], dtype=np.int64)
    except Exception as e:
        raise DataError(f"{f}: not a CIFAR-100 python file ({type(e).__name__}: {e})") from e
    if len(y) and (y.min() < 0 or y.max() >= 100):
        raise DataError(f"{f}: fine labels must be in 0..99, got [{y.min()}, {y.max()}]")
    return ImageSet(np.ascontiguousarray(x), y, str(f))


def download_cifar100(
    root: str | os.PathLike | None = None, url: str = CIFAR100_URL, md5: str | None = CIFAR100_TAR_MD5
) -> Path:
    """Download and extract the official CIFAR-100 python release; returns the `cifar-100-python` dir."""
    return _download_release(root, url, md5, CIFAR100_DIR, "test")


def load_cifar100c_npy(root: str | os.PathLike, corruption: str, severity: int) -> ImageSet:
    """Read the official CIFAR-100-C layout (as CIFAR-10-C: `<corruption>.npy` + `labels.npy`)."""
    return load_cifar_c_npy(root, corruption, severity, "CIFAR-100-C")
