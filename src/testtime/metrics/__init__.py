"""Classification metrics for adapted models: error, NLL, ECE, Brier, per-batch traces."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE (%) with equal-width confidence bins (Guo et al. 2017), 15 bins by default."""
    if len(conf) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(conf[m].mean() - correct[m].mean())
    return 100.0 * float(ece)


def reliability_bins(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin count, mean confidence and accuracy, for reliability diagrams."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    s_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    s_acc = np.bincount(idx, weights=correct.astype(float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"edges": edges, "count": count, "confidence": s_conf / count, "accuracy": s_acc / count}


@dataclass
class MetricAccumulator:
    """Accumulates predictions of one domain (or a whole stream) batch by batch."""

    num_classes: int | None = None
    n: int = 0
    wrong: int = 0
    nll_sum: float = 0.0
    brier_sum: float = 0.0
    conf: list[np.ndarray] = field(default_factory=list)
    correct: list[np.ndarray] = field(default_factory=list)
    batch_errors: list[float] = field(default_factory=list)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """Add a batch; returns its error (%)."""
        logits = logits.detach().float().cpu()
        labels = labels.detach().cpu().long()
        logp = logits.log_softmax(1)
        p = logp.exp()
        conf, pred = p.max(1)
        ok = pred == labels
        self.n += len(labels)
        self.wrong += int((~ok).sum())
        self.nll_sum += float(-logp.gather(1, labels[:, None]).sum())
        onehot = torch.nn.functional.one_hot(labels, logits.shape[1]).float()
        self.brier_sum += float(((p - onehot) ** 2).sum())
        self.conf.append(conf.numpy())
        self.correct.append(ok.numpy())
        err = 100.0 * float((~ok).float().mean())
        self.batch_errors.append(err)
        return err

    def merge(self, other: MetricAccumulator) -> None:
        self.n += other.n
        self.wrong += other.wrong
        self.nll_sum += other.nll_sum
        self.brier_sum += other.brier_sum
        self.conf += other.conf
        self.correct += other.correct
        self.batch_errors += other.batch_errors

    def summary(self) -> dict[str, float]:
        """error (%), nll, ece (%), brier (sum over classes, mean over samples), n."""
        if self.n == 0:
            return {
                "error": float("nan"),
                "nll": float("nan"),
                "ece": float("nan"),
                "brier": float("nan"),
                "n": 0,
            }
        conf = np.concatenate(self.conf)
        correct = np.concatenate(self.correct)
        return {
            "error": 100.0 * self.wrong / self.n,
            "nll": self.nll_sum / self.n,
            "ece": expected_calibration_error(conf, correct),
            "brier": self.brier_sum / self.n,
            "n": self.n,
        }
