"""Batched image augmentations in plain torch (no torchvision), for teachers and consistency losses.

`TTAAugment` follows the test-time augmentation of CoTTA (Wang et al. 2022, after KATANA):
colour jitter with gamma in random order, edge-padded random affine, Gaussian blur, horizontal
flip, additive Gaussian noise, clipping. As in the original, one set of random parameters is
drawn per call and applied to the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as torchvision, shape (N, 1, H, W)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, f: float) -> torch.Tensor:
    return (x * f).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, f: float) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, f: float) -> torch.Tensor:
    return (f * x + (1 - f) * grayscale(x)).clamp(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    # hue sector i takes (r, g, b) from (v, q, p, p, t, v)[i], (t, v, v, q, p, p)[i], (p, p, t, v, v, q)[i]
    # (torchvision's table), picked by a gather from (v, q, p, t): the same values as torchvision's
    # masked sum over the six sectors, at a fraction of its cost
    pick = torch.tensor([[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]], device=x.device)
    return torch.stack((v, q, p, t), 1).gather(1, pick[i].permute(0, 3, 1, 2).contiguous()) + 0.0


def adjust_hue(x: torch.Tensor, f: float) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    hsv[:, 0] = torch.fmod(hsv[:, 0] + f + 1.0, 1.0)
    return hsv_to_rgb(hsv)


def adjust_gamma(x: torch.Tensor, gamma: float) -> torch.Tensor:
    return x.clamp(1e-8, 1.0).pow(gamma).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int = 5) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (as torchvision's tensor GaussianBlur)."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    pad = kernel_size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def random_affine(
    x: torch.Tensor, degrees: float, translate: float, scale: float, g: torch.Generator
) -> torch.Tensor:
    """Rotation/translation/scale about the centre, bilinear, edge ("border") padding."""
    n, _, h, w = x.shape
    angle = math.radians(_u(g, -degrees, degrees))
    tx = round(_u(g, -translate * w, translate * w))
    ty = round(_u(g, -translate * h, translate * h))
    s = _u(g, 1 - scale, 1 + scale)
    cos, sin = math.cos(angle) / s, math.sin(angle) / s
    # inverse map in normalised coordinates (align_corners=False)
    theta = torch.tensor(
        [
            [cos, -sin, -(cos * 2 * tx / w - sin * 2 * ty / h)],
            [sin, cos, -(sin * 2 * tx / w + cos * 2 * ty / h)],
        ],
        dtype=x.dtype,
        device=x.device,
    )
    grid = F.affine_grid(theta.expand(n, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class TTAAugment:
    """CoTTA's test-time augmentation for 32x32 images; `soft=True` gives its milder ranges."""

    soft: bool = False
    gaussian_std: float = 0.005
    hflip: float = 0.5

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        s = self.soft
        ranges = {
            "brightness": (0.8, 1.2) if s else (0.6, 1.4),
            "contrast": (0.85, 1.15) if s else (0.7, 1.3),
            "saturation": (0.75, 1.25) if s else (0.5, 1.5),
            "hue": (-0.03, 0.03) if s else (-0.06, 0.06),
            "gamma": (0.85, 1.15) if s else (0.7, 1.3),
        }
        ops = {
            "brightness": adjust_brightness,
            "contrast": adjust_contrast,
            "saturation": adjust_saturation,
            "hue": adjust_hue,
            "gamma": adjust_gamma,
        }
        x = x.clamp(0, 1)
        for i in torch.randperm(5, generator=g).tolist():
            name = list(ops)[i]
            x = ops[name](x, _u(g, *ranges[name]))
        x = random_affine(x, 8 if s else 15, 1 / 16, 0.05 if s else 0.1, g)
        x = gaussian_blur(x, _u(g, 0.001, 0.25 if s else 0.5))
        if float(torch.rand((), generator=g)) < self.hflip:
            x = x.flip(3)
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
        return (x + self.gaussian_std * noise).clamp(0, 1)
