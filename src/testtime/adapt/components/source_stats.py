"""Statistics of penultimate features computed from labelled source (training) samples.

Used by methods that need the source feature distribution: CAFA (per-class Gaussians) and AdaNPC
(a memory of source features and labels). Features are computed with the source model as given
(source BatchNorm statistics), in chunks, without gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from testtime.adapt.components.features import FeatureTap
from testtime.errors import DataError
from testtime.utils import load_weights_only


@torch.no_grad()
def extract_features(
    model: nn.Module, tap: FeatureTap, x: torch.Tensor, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of every image in `x`, one forward pass per chunk of `batch_size`."""
    feats, logits = [], []
    device = next(iter(model.parameters()), x).device
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device).contiguous(memory_format=torch.channels_last)
        f, lg = tap(model, xb)
        feats.append(f.detach().float())
        logits.append(lg.detach().float())
    return torch.cat(feats), torch.cat(logits)


@dataclass
class ClassFeatureStats:
    """Per-class feature means (C, D) and covariances: (C, D, D) per class, or (D, D) shared."""

    means: torch.Tensor
    covs: torch.Tensor
    counts: torch.Tensor

    @property
    def shared(self) -> bool:
        return self.covs.dim() == 2

    def save(self, path: str | os.PathLike) -> None:
        torch.save({"means": self.means, "covs": self.covs, "counts": self.counts}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassFeatureStats:
        """Read statistics written by `save` (a dict of tensors; loaded with weights_only=True)."""
        d = load_weights_only(path, DataError, "not a source statistics file")
        try:
            return cls(d["means"].float(), d["covs"].float(), d["counts"])
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: not a source statistics file ({type(e).__name__}: {e})") from e


def class_feature_stats(
    feats: torch.Tensor, labels: torch.Tensor, num_classes: int, covariance: str = "class"
) -> ClassFeatureStats:
    """Class means and (biased) covariances of `feats`; `covariance` is "class" or "shared".

    The shared covariance pools the within-class scatter of all classes (the tied covariance of
    a linear discriminant). Raises DataError when a class has no sample.
    """
    if covariance not in ("class", "shared"):
        raise DataError(f"covariance must be 'class' or 'shared', got {covariance!r}")
    feats = feats.double()
    counts = torch.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes or bool((counts == 0).any()):
        missing = [c for c in range(num_classes) if c >= len(counts) or counts[c] == 0]
        raise DataError(f"source data must hold every class 0..{num_classes - 1}; missing {missing}")
    onehot = torch.nn.functional.one_hot(labels, num_classes).double()  # (N, C)
    means = (onehot.T @ feats) / counts[:, None]
    centred = feats - means[labels]
    if covariance == "shared":
        covs = centred.T @ centred / len(feats)
    else:
        covs = torch.stack(
            [centred[labels == c].T @ centred[labels == c] / counts[c] for c in range(num_classes)]
        )
    return ClassFeatureStats(means.float(), covs.float(), counts)


def regularised_inverse(covs: torch.Tensor, eps: float) -> torch.Tensor:
    """Inverse of (each) covariance after adding `eps` times the mean variance to its diagonal.

    Through a Cholesky factorisation (the regularised covariances are symmetric positive definite):
    the batched LU inverse, `torch.linalg.inv`, can fail on CPU with two threads for batches of
    192 x 192 matrices and larger in torch 2.13 with MKL ("Pivots given to lu_solve must all be
    greater or equal to 1"; seen on this project's machine for 192 and 256, not 64 or 128, and only
    after other linear-algebra calls in the process), e.g. CAFA's per-class covariances of a ViT's
    192-d features in the test suite. DataError when a covariance is not positive definite (a
    class whose samples span too few dimensions with `eps` 0, or non-finite features).
    """
    d = covs.shape[-1]
    eye = torch.eye(d, dtype=torch.float64, device=covs.device)
    c = covs.double()
    scale = torch.diagonal(c, dim1=-2, dim2=-1).mean(-1)[..., None, None]
    chol, info = torch.linalg.cholesky_ex(c + eps * scale * eye)
    bad = torch.nonzero(info.reshape(-1)).flatten().tolist()
    if bad or not bool(torch.isfinite(chol).all()):
        which = f"covariance(s) {bad}" if covs.dim() == 3 and bad else "the covariance"
        raise DataError(
            f"{which} of the source features not positive definite after a ridge of {eps} x the mean "
            "variance: raise the ridge (cafa: cov_eps) or give more source samples per class"
        )
    return torch.cholesky_inverse(chol).float()


def mahalanobis(feats: torch.Tensor, means: torch.Tensor, precisions: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance (N, C) of each feature to each class Gaussian.

    `precisions` is (C, D, D) (one per class) or (D, D) (shared).
    """
    diff = feats[:, None, :] - means[None]  # (N, C, D)
    if precisions.dim() == 2:
        return torch.einsum("ncd,de,nce->nc", diff, precisions, diff)
    return torch.einsum("ncd,cde,nce->nc", diff, precisions, diff)
