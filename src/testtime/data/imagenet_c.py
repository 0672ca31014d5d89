"""ImageNet-C from a user directory: `<corruption>/<severity>/<wnid>/*.JPEG`, decoded per batch.

Labels follow torchvision's ImageFolder (and RobustBench's loader): the class index of an image is
the position of its `<wnid>` folder among the sorted class folders, which is the ImageNet-1k class
index when all 1,000 folders are present. Images are listed in ImageFolder order (sorted classes,
sorted file names), or taken from a list file of relative paths `<wnid>/<file>` (one per line),
e.g. RobustBench's `imagenet_test_image_ids.txt` for its 5,000-image subset.

Preprocessing is the standard "resize 256, center crop 224" (torchvision `Resize(256)` +
`CenterCrop(224)` on PIL images, RobustBench's `Res256Crop224`), done with Pillow alone: the short
side is resized to 256 with bilinear filtering (the long side to int(256 * long / short)), then the
central 224 x 224 is cut out (offsets rounded as torchvision does). ImageNet-C images are already
224 x 224, so this upsamples to 256 and crops the centre, exactly as those pipelines do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from testtime.data.cifar import CIFAR10C_CORRUPTIONS
from testtime.data.streams import Domain, DomainData
from testtime.errors import DataError

IMAGENET_C_CORRUPTIONS = CIFAR10C_CORRUPTIONS  # the same 15 names
IMAGENET_C_EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
LAYOUT = "<corruption>/<severity>/<wnid>/*.JPEG"


def preprocess_image(path: str | os.PathLike, resize: int | None = 256, crop: int = 224) -> np.ndarray:
    """Decode an image file as RGB, resize its short side to `resize` and center-crop `crop` x `crop`.

    Returns uint8 (crop, crop, 3). Matches torchvision's PIL path: `Resize(resize)` (bilinear, long
    side truncated) then `CenterCrop(crop)` (zero padding when the image is smaller).
    """
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except Exception as e:  # Pillow raises many types for undecodable data
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    if resize:
        w, h = img.size
        if w <= h:
            nw, nh = resize, int(resize * h / w)
        else:
            nw, nh = int(resize * w / h), resize
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BILINEAR)
    w, h = img.size
    if w < crop or h < crop:  # torchvision pads (zeros) before cropping
        pw, ph = max(crop - w, 0), max(crop - h, 0)
        canvas = Image.new("RGB", (w + pw, h + ph))
        canvas.paste(img, (pw // 2, ph // 2))
        img, (w, h) = canvas, canvas.size
    top, left = round((h - crop) / 2.0), round((w - crop) / 2.0)
    return np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


class LazyImages:
    """An image array decoded on indexing: `x[indices]` -> uint8 (n, crop, crop, 3).

    Streams index it per batch, so a domain of 50,000 ImageNet-C images never sits in memory.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(
        self, files: Sequence[Path], resize: int | None = 256, crop: int = 224, workers: int | None = None
    ) -> None:
        self.files = list(files)
        self.resize, self.crop = resize, crop
        self.workers = workers or min(8, os.cpu_count() or 1)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), self.crop, self.crop, 3)

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> np.ndarray:
        return preprocess_image(self.files[i], self.resize, self.crop)

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return self._load(int(np.arange(len(self))[idx]))
        ids = np.arange(len(self))[idx].reshape(-1).tolist()  # slices, int arrays, negative indices
        if not ids:
            return np.empty((0, self.crop, self.crop, 3), dtype=np.uint8)
        if self.workers > 1 and len(ids) > 1:
            with ThreadPoolExecutor(min(self.workers, len(ids))) as pool:  # Pillow releases the GIL
                out = list(pool.map(self._load, ids))
        else:
            out = [self._load(i) for i in ids]
        return np.stack(out)

    def __array__(self, dtype=None, copy=None):
        raise DataError(
            f"these {len(self)} images are decoded batch by batch; this operation needs them all in "
            "memory at once, which is not supported for image-folder datasets"
        )


def read_list_file(path: str | os.PathLike) -> list[str]:
    """Relative image paths `<wnid>/<file>`, one per line (blank lines and `#` comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image list file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        rel = line.strip().replace("\\", "/")
        if not rel or rel.startswith("#"):
            continue
        parts = rel.split("/")
        if len(parts) != 2 or not all(parts) or ".." in parts:
            raise DataError(f"{path}:{n}: expected a relative path <wnid>/<file>, got {rel!r}")
        out.append(rel)
    if not out:
        raise DataError(f"{path}: lists no images")
    if len(set(out)) != len(out):
        raise DataError(f"{path}: lists some images more than once")
    return out


def list_image_folder(folder: Path) -> tuple[list[str], list[str]]:
    """(sorted class folder names, relative image paths in ImageFolder order) of `folder`."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    rel = [
        f"{c}/{f.name}"
        for c in classes
        for f in sorted((folder / c).iterdir(), key=lambda p: p.name)
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return classes, rel


class ImageFolderDomains(DomainData):
    """Corruption domains stored as image folders `<root>/<corruption>/<severity>/<class>/<image>`."""

    dataset_name = "image folders"
    standard = IMAGENET_C_CORRUPTIONS
    extra = IMAGENET_C_EXTRA

    def __init__(
        self,
        root: str | os.PathLike,
        subset: str | os.PathLike | Sequence[str] | None = None,
        clean: str | os.PathLike | None = None,
        resize: int | None = 256,
        crop: int = 224,
        workers: int | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{self.dataset_name} directory not found: {self.root}")
        self.present = [c for c in (*self.standard, *self.extra) if (self.root / c).is_dir()]
        if not self.present:
            found = sorted(p.name for p in self.root.iterdir() if p.is_dir())[:5]
            raise DataError(
                f"{self.root}: not an {self.dataset_name} directory (layout {LAYOUT}); no corruption "
                f"folder such as {self.standard[0]}/ found (subfolders: {', '.join(found) or 'none'})"
            )
        self.subset_file = None if subset is None or not isinstance(subset, (str, os.PathLike)) else subset
        if subset is None:
            self.subset = None
        elif isinstance(subset, (str, os.PathLike)):
            self.subset = read_list_file(subset)
        else:
            self.subset = list(subset)
        self.clean_root = Path(clean).expanduser() if clean is not None else None
        self.resize, self.crop, self.workers = resize, crop, workers
        self.classes: list[str] | None = None
        self._index: dict[Domain, tuple[list[Path], np.ndarray]] = {}
        self._n: int | None = None

    # -- indexing
    def _folder(self, domain: Domain) -> Path:
        if domain.corruption == "clean":
            if self.clean_root is None:
                raise DataError(f"clean images requested but no clean image folder was given for {self.root}")
            return self.clean_root
        d = self.root / domain.corruption / str(domain.severity)
        if not (self.root / domain.corruption).is_dir():
            raise DataError(
                f"{self.root}: no folder for corruption {domain.corruption!r} (layout {LAYOUT}); "
                f"present: {', '.join(self.present)}"
            )
        if not d.is_dir():
            sev = sorted(p.name for p in (self.root / domain.corruption).iterdir() if p.is_dir())
            raise DataError(
                f"{self.root}: no folder {domain.corruption}/{domain.severity} (layout {LAYOUT}); "
                f"severities present: {', '.join(sev) or 'none'}"
            )
        return d

    def index(self, domain: Domain) -> tuple[list[Path], np.ndarray]:
        """(image files, labels) of `domain`, in the order streams index them."""
        if domain in self._index:
            return self._index[domain]
        folder = self._folder(domain)
        classes, rel = list_image_folder(folder)
        if not classes:
            raise DataError(f"{folder}: no class folders (layout {LAYOUT})")
        if self.classes is None:
            self.classes = classes
        elif classes != self.classes:
            diff = sorted(set(classes) ^ set(self.classes))[:3]
            raise DataError(
                f"{folder}: its class folders differ from the first domain's ({len(classes)} vs "
                f"{len(self.classes)}; e.g. {', '.join(diff)}); labels would not be comparable"
            )
        cls = {c: i for i, c in enumerate(classes)}
        if self.subset is not None:
            bad = [r for r in self.subset if r.split("/")[0] not in cls]
            if bad:
                raise DataError(
                    f"{folder}: the image list names class folders not present here, e.g. {bad[0]}"
                )
            missing = [r for r in self.subset if not (folder / r).is_file()]
            if missing:
                raise DataError(
                    f"{folder}: {len(missing)} listed image(s) missing, e.g. {missing[0]} "
                    f"(the list file's paths are relative to <corruption>/<severity>/)"
                )
            rel = self.subset
        if not rel:
            raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
        if domain.corruption != "clean":
            n = self.num_samples()
            if len(rel) != n:
                raise DataError(
                    f"{folder}: {len(rel)} images, but other domains have {n}; every corruption/"
                    "severity must hold the same images (or pass a list file)"
                )
        files = [folder / r for r in rel]
        labels = np.asarray([cls[r.split("/")[0]] for r in rel], dtype=np.int64)
        self._index[domain] = (files, labels)
        return files, labels

    # -- DomainData
    def get(self, domain: Domain) -> tuple[LazyImages, np.ndarray]:
        files, labels = self.index(domain)
        return LazyImages(files, self.resize, self.crop, self.workers), labels

    def num_samples(self) -> int:
        if self.subset is not None:
            return len(self.subset)
        if self._n is None:
            c = self.present[0]
            sevs = sorted(p.name for p in (self.root / c).iterdir() if p.is_dir())
            if not sevs:
                raise DataError(f"{self.root / c}: no severity folders (layout {LAYOUT})")
            self._n = len(list_image_folder(self.root / c / sevs[-1])[1])
        return self._n

    def domain_names(self) -> tuple[str, ...]:
        return (*self.standard, *(c for c in self.extra if c in self.present))

    def describe(self) -> str:
        sub = f", images listed in {self.subset_file}" if self.subset_file else ""
        prep = f"resize {self.resize}, center crop {self.crop}" if self.resize else f"center crop {self.crop}"
        return f"{self.dataset_name} in {self.root} ({self.num_samples()} images per domain{sub}; {prep})"


class ImageNetC(ImageFolderDomains):
    """ImageNet-C (Hendrycks & Dietterich 2019) from a directory `<corruption>/<severity>/<wnid>/*.JPEG`.

    `subset`: a list file (or list) of relative paths `<wnid>/<file>` to use instead of every image,
    e.g. RobustBench's 5,000-image `imagenet_test_image_ids.txt`; `clean`: an optional ImageNet
    validation folder `<wnid>/*.JPEG` for the clean domain.
    """

    dataset_name = "ImageNet-C"
