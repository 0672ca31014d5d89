"""Classification metrics for adapted models: error, NLL, ECE, Brier, per-batch traces."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

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


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (%) of `scores` for detecting `positive` samples (ties count half)."""
    from scipy.stats import rankdata

    pos = positive.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return 100.0 * float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def open_set_metrics(
    conf: np.ndarray, correct: np.ndarray, unknown: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Unknown detection by max-softmax confidence: AUROC, and H-score at `threshold`.

    A sample is rejected as unknown when its confidence is below `threshold`. Known accuracy counts a
    rejected known sample as wrong; unknown accuracy is the fraction of unknowns rejected; the H-score
    is their harmonic mean (%), as in universal domain adaptation.
    """
    unknown = unknown.astype(bool)
    rejected = conf < threshold
    acc_known = float((correct[~unknown] & ~rejected[~unknown]).mean()) if (~unknown).any() else float("nan")
    acc_unknown = float(rejected[unknown].mean()) if unknown.any() else float("nan")
    h = 2 * acc_known * acc_unknown / (acc_known + acc_unknown) if acc_known + acc_unknown > 0 else 0.0
    return {
        "auroc": auroc(-conf, unknown),
        "h_score": 100.0 * h,
        "known_acc_open": 100.0 * acc_known,
        "unknown_rejected": 100.0 * acc_unknown,
    }


_ARRAY_LISTS = ("conf", "correct", "open_conf", "open_correct", "open_unknown")


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
    open_conf: list[np.ndarray] = field(default_factory=list)  # confidences of all samples (open set)
    open_correct: list[np.ndarray] = field(default_factory=list)
    open_unknown: list[np.ndarray] = field(default_factory=list)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """Add a batch; returns its error (%) on known-class samples (labels >= 0).

        Samples labelled -1 are unknown-class (open set): they are excluded from the closed-set
        metrics and used for unknown-detection metrics. Every sample's confidence is kept for the
        latter (an all-known batch before the first unknown one counts too); they are reported
        only when some sample was unknown.
        """
        logits = logits.detach().float().cpu()
        labels = labels.detach().cpu().long()
        known = labels >= 0
        conf_all, pred_all = logits.softmax(1).max(1)
        self.open_conf.append(conf_all.numpy())
        self.open_correct.append((pred_all == labels).numpy())
        self.open_unknown.append((~known).numpy())
        if not bool(known.all()):
            logits, labels = logits[known], labels[known]
            if len(labels) == 0:
                return float("nan")
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

    def state(self) -> dict[str, Any]:
        """Plain data (tensors, numbers, lists) to rebuild this accumulator; loadable with
        `torch.load(..., weights_only=True)`."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = [torch.from_numpy(a) for a in v] if f.name in _ARRAY_LISTS else v
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MetricAccumulator:
        kw = {k: [t.numpy() for t in v] if k in _ARRAY_LISTS else v for k, v in state.items()}
        return cls(**kw)

    def merge(self, other: MetricAccumulator) -> None:
        self.n += other.n
        self.wrong += other.wrong
        self.nll_sum += other.nll_sum
        self.brier_sum += other.brier_sum
        self.conf += other.conf
        self.correct += other.correct
        self.batch_errors += other.batch_errors
        self.open_conf += other.open_conf
        self.open_correct += other.open_correct
        self.open_unknown += other.open_unknown

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
        out = {
            "error": 100.0 * self.wrong / self.n,
            "nll": self.nll_sum / self.n,
            "ece": expected_calibration_error(conf, correct),
            "brier": self.brier_sum / self.n,
            "n": self.n,
        }
        if any(u.any() for u in self.open_unknown):
            out.update(
                open_set_metrics(
                    np.concatenate(self.open_conf),
                    np.concatenate(self.open_correct),
                    np.concatenate(self.open_unknown),
                )
            )
        return out
