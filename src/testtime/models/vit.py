"""A small Vision Transformer for 32x32 images (Dosovitskiy et al. 2021), pre-norm with LayerNorm.

Patches of `patch_size` x `patch_size` pixels (4: an 8 x 8 grid on CIFAR) are embedded by a
strided convolution, a learned position embedding is added, and `depth` pre-norm blocks
(`x + attn(norm1(x))`, `x + mlp(norm2(x))`, GELU MLP) follow; a final LayerNorm `norm` and the
linear classifier `head` close the network. Module names follow timm's `VisionTransformer`
(`patch_embed`, `pos_embed`, `blocks.i.norm1/attn/norm2/mlp`, `norm`, `head`), so the layer rules
of SAR/DeYO (which skip `blocks.9-11` and `norm` of ViT-Base) read the same here. Inputs are images
in [0, 1]; the CIFAR-10 normalisation is applied inside the model, as in `CifarResNet`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from testtime.models.resnet import CIFAR10_MEAN, CIFAR10_STD, Normalize


class Attention(nn.Module):
    """Multi-head self-attention (fused qkv projection, scaled dot-product attention)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"ViT dim {dim} must be a multiple of heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT for small images; `pool="mean"` averages the patch tokens, `"cls"` uses a class token.

    `forward_features` returns the pooled, normalised features and `head` is the linear
    classifier (registered last, so feature-space methods find it as the final nn.Linear).
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 2.0,
        num_classes: int = 10,
        pool: str = "mean",
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        self.image_size, self.patch_size, self.pool, self.num_classes = (
            image_size,
            patch_size,
            pool,
            num_classes,
        )
        n_tokens = (image_size // patch_size) ** 2 + (pool == "cls")
        self.normalize = Normalize(mean, std)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.feature_dim = dim
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"ViT built for {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}"
            )
        tokens = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2)  # (B, N, dim)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], 1)
        tokens = self.norm(self.blocks(tokens + self.pos_embed))
        return tokens[:, 0] if self.cls_token is not None else tokens.mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
