"""AugMix augmentations in plain torch (no PIL, no torchvision), as used by MEMO.

Hendrycks, Mu, Cubuk, Zoph, Gilmer, Lakshminarayanan. "AugMix: A Simple Data Processing Method
to Improve Robustness and Uncertainty." ICLR 2020; the CIFAR variant of MEMO (Zhang, Levine, Finn,
NeurIPS 2022, `cifar-10-exps/utils/third_party.py`).

One augmented view of an image: random crop (zero padding 4) and horizontal flip, then `width`
chains of 1 to `max_depth` operations drawn uniformly from the nine AugMix operations (autocontrast,
equalize, rotate, solarize, shear x/y, translate x/y, posterize; no operation overlaps the
ImageNet-C / CIFAR-10-C corruptions), mixed with Dirichlet(1, ..., 1) weights, and the mixture
blended with the (cropped, flipped) image with a Beta(1, 1) weight. Operation strengths follow
the official `rand_lvl(severity)` sampling. Images are handled as uint8 values (PIL semantics):
every operation works on 0..255 integer values, geometric ones sample bilinearly and truncate back
to integers; pixels mapped from outside the image take the official fill, which PIL reads as the
colour (128, 0, 0) for an RGB image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Op = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


def _rand(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g))


def _sign(g: torch.Generator) -> float:
    return -1.0 if _rand(g) > 0.5 else 1.0


def _level(severity: float, g: torch.Generator) -> float:
    """The official `rand_lvl`: uniform in [0.1, severity]."""
    return 0.1 + (severity - 0.1) * _rand(g)


def affine_pil(
    img: torch.Tensor, matrix: tuple[float, ...], fill: tuple[float, ...] = (128.0, 0.0, 0.0)
) -> torch.Tensor:
    """PIL `Image.transform(AFFINE, matrix, BILINEAR, fillcolor)` on a (C, H, W) uint8-valued image.

    `matrix` (a, b, c, d, e, f) maps output pixel coordinates (x, y) (origin at the top-left
    corner, pixel centres at +0.5) to input coordinates (a x + b y + c, d x + e y + f). As PIL,
    points outside the image take `fill` and points inside interpolate with edge replication.
    The default fill is what the official `fillcolor=128` gives on an RGB image: (128, 0, 0).
    """
    c_, h, w = img.shape
    a, b, c, d, e, f = matrix
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=img.dtype, device=img.device) + 0.5,
        torch.arange(w, dtype=img.dtype, device=img.device) + 0.5,
        indexing="ij",
    )
    xin, yin = a * xs + b * ys + c, d * xs + e * ys + f
    grid = torch.stack((2 * xin / w - 1, 2 * yin / h - 1), -1).unsqueeze(0)
    out = F.grid_sample(img[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out[0]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    fill_t = torch.tensor(
        fill[:c_] if len(fill) >= c_ else fill[:1] * c_, dtype=img.dtype, device=img.device
    ).view(-1, 1, 1)
    return torch.where(inside, out.floor().clamp(0, 255), fill_t)


def autocontrast(img: torch.Tensor, severity: float, g: torch.Generator) -> torch.Tensor:
    lo = img.amin(dim=(1, 2), keepdim=True)
    hi = img.amax(dim=(1, 2), keepdim=True)
    scale = 255.0 / (hi - lo).clamp_min(1)
    out = (img * scale - lo * scale).floor().clamp(0, 255)
    return torch.where(hi > lo, out, img)


def equalize(img: torch.Tensor, severity: float, g: torch.Generator) -> torch.Tensor:
    out = []
    for ch in img:
        v = ch.flatten().long()
        hist = torch.bincount(v, minlength=256)
        last = hist[hist.nonzero().max()]
        step = int((hist.sum() - last) // 255)
        if step == 0:
            out.append(ch)
            continue
        lut = ((step // 2 + torch.cumsum(hist, 0) - hist) // step).clamp(max=255)
        out.append(lut[v].view_as(ch).to(img.dtype))
    return torch.stack(out)


def rotate(img: torch.Tensor, severity: float, g: torch.Generator) -> torch.Tensor:
    degrees = int(_level(severity, g) * 30 / 10) * _sign(g)
    _, h, w = img.shape
    a = -math.radians(degrees)  # PIL: counter-clockwise rotation about the centre
    cos, sin = math.cos(a), math.sin(a)
    cx, cy = w / 2, h / 2
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return affine_pil(img, (cos, sin, c, -sin, cos, f))


def solarize(img: torch.Tensor, severity: float, g: torch.Generator) -> torch.Tensor:
    threshold = 256 - int(_level(severity, g) * 256 / 10)
    return torch.where(img >= threshold, 255 - img, img)


def shear_x(img: torch.Tensor, severity: float, g: torch.Generator) -> torch.Tensor:
    s = _level(severity, g) * 0.3 / 10 * _sign(g)
    return affine_pil(img, (1, s, 0, 0, 1, 0))


def shear_y(img: torch.Tensor, severity: float, g: torch.Generator) -> torch.Tensor:
    s = _level(severity, g) * 0.3 / 10 * _sign(g)
    return affine_pil(img, (1, 0, 0, s, 1, 0))


def translate_x(img: torch.Tensor, severity: float, g: torch.Generator) -> torch.Tensor:
    t = int(_level(severity, g) * (img.shape[2] / 3) / 10) * _sign(g)
    return affine_pil(img, (1, 0, t, 0, 1, 0))


def translate_y(img: torch.Tensor, severity: float, g: torch.Generator) -> torch.Tensor:
    t = int(_level(severity, g) * (img.shape[1] / 3) / 10) * _sign(g)
    return affine_pil(img, (1, 0, 0, 0, 1, t))


def posterize(img: torch.Tensor, severity: float, g: torch.Generator) -> torch.Tensor:
    bits = 4 - int(_level(severity, g) * 4 / 10)
    mask = 256 - 2 ** (8 - bits)
    return (img.long() & mask).to(img.dtype)


AUGMIX_OPS: tuple[Op, ...] = (
    autocontrast,
    equalize,
    rotate,
    solarize,
    shear_x,
    shear_y,
    translate_x,
    translate_y,
    posterize,
)


def random_crop_flip(img: torch.Tensor, padding: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Random crop of the original size from the zero-padded image, then a random horizontal flip."""
    _, h, w = img.shape
    if padding:
        padded = F.pad(img, (padding,) * 4)
        i = int(torch.randint(0, 2 * padding + 1, (), generator=g))
        j = int(torch.randint(0, 2 * padding + 1, (), generator=g))
        img = padded[:, i : i + h, j : j + w]
    return img.flip(2) if flip and _rand(g) < 0.5 else img


def dirichlet_ones(k: int, g: torch.Generator) -> torch.Tensor:
    """A draw from Dirichlet(1, ..., 1) (normalised exponentials)."""
    e = -torch.log(1 - torch.rand(k, generator=g, dtype=torch.float64))
    return (e / e.sum()).float()


@dataclass
class AugMix:
    """AugMix views of one image (MEMO's CIFAR augmentation); images are float (C, H, W) in [0, 1]."""

    severity: float = 1.0
    width: int = 3
    max_depth: int = 3
    crop_padding: int = 4  # 0 disables MEMO's random-crop + flip pre-augmentation
    flip: bool = True

    def view(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One augmented view (float, [0, 1])."""
        x = (img.clamp(0, 1) * 255).round()
        x = random_crop_flip(x, self.crop_padding, self.flip, g)
        w = dirichlet_ones(self.width, g)
        m = _rand(g)  # Beta(1, 1)
        mix = torch.zeros_like(x)
        for i in range(self.width):
            chain = x
            for _ in range(int(torch.randint(1, self.max_depth + 1, (), generator=g))):
                op = AUGMIX_OPS[int(torch.randint(len(AUGMIX_OPS), (), generator=g))]
                chain = op(chain, self.severity, g)
            mix = mix + float(w[i]) * chain
        return (m * x + (1 - m) * mix) / 255

    def __call__(self, img: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
        """`n` independent views of `img`, stacked (n, C, H, W)."""
        return torch.stack([self.view(img, g) for _ in range(n)])
