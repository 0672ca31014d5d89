"""Neighbourhood normalisation statistics: each sample is normalised with the statistics of the
batch samples that look most like it (optionally blended with the source statistics).

A batch that mixes domains (e.g. noise and blur corruptions) has statistics that fit none of its
samples. Here every sample i of a BatchNorm layer's input gets its own (mean, var): the pooled
statistics of its `k` nearest batch samples (itself included), where "near" is the Euclidean
distance between instance descriptors: the per-channel instance mean and log standard deviation,
both standardised by the source statistics. With `k >= batch size` this is exactly the
test-batch statistics (BN-adapt / Tent); with a `prior_n > 0` the result is blended with the
source statistics as in Schneider et al. (NeurIPS 2020): `a = prior_n / (prior_n + k)`, or with a
fixed source weight `a = source_weight` whatever the batch size (alpha-BN, You et al. 2021). With
`instance_alpha > 0` each sample's statistics are then corrected towards its own instance
statistics where these lie more than `instance_alpha` standard errors away (the instance-aware
BN of NOTE, Gong et al., NeurIPS 2022). With `test_momentum < 1` the test statistics are not the
current batch's but a running average over batches updated with it at that momentum (the
exponential moving average of RoTTA's robust BN, Yuan et al. CVPR 2023, and DELTA's test-time
batch renormalisation, Zhao et al. ICLR 2023), so a batch of few classes (label-correlated
streams) or few samples moves the statistics less. With a shift detector attached
(`components.shift`, `attach_detector`), each batch is normalised with either the running or the
batch statistics as the detector decides, and the running statistics restart from the batch that
showed a change of domain. With `class_balanced=K` the running statistics are class-balanced:
each of the K classes keeps its own running moments, updated after the forward pass from the
samples the model assigns to it (`commit`), and the test statistics are their equal-weight mixture,
so a run of one class, however long, moves only that class's share (the category-balanced idea
of RoTTA's memory, Yuan et al. CVPR 2023, applied to the normalisation statistics).
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from testtime.adapt.components.norm import AdaptiveNorm, fast_moments
from testtime.adapt.components.norm_mixture import affine_normalize
from testtime.adapt.components.shift import ShiftDetector
from testtime.errors import DataError, ModelError


class NeighbourStatsNorm(AdaptiveNorm):
    """Per-sample statistics from the `k` nearest samples of the batch, blended with the source's.

    Differentiable through the batch statistics (like BatchNorm in training mode), so the affine
    parameters can be trained through it. Works with any batch size when `prior_n > 0`.
    """

    def __init__(
        self,
        bn: _BatchNorm,
        neighbours: int = 0,
        prior_n: float = 0.0,
        instance_alpha: float = 0.0,
        source_weight: float = 0.0,
        test_momentum: float = 1.0,
        class_balanced: int = 0,
    ) -> None:
        super().__init__(bn)
        if not 0 < test_momentum <= 1:
            raise ModelError(
                f"test_momentum must be in (0, 1] (1: the current batch only), got {test_momentum}"
            )
        if test_momentum < 1 and (neighbours > 0 or instance_alpha > 0):
            raise ModelError(
                "test_momentum < 1 needs whole-batch statistics (neighbours=0, instance_alpha=0)"
            )
        if class_balanced < 0 or (class_balanced > 0 and test_momentum >= 1):
            raise ModelError(
                "class_balanced needs a number of classes >= 1 and running test statistics "
                f"(test_momentum < 1), got class_balanced={class_balanced}, test_momentum={test_momentum}"
            )
        if neighbours < 0:
            raise ModelError(f"neighbours must be >= 0 (0: the whole batch), got {neighbours}")
        if prior_n < 0:
            raise ModelError(f"prior_n must be >= 0, got {prior_n}")
        if not 0 <= source_weight <= 1:
            raise ModelError(f"source_weight must be in [0, 1], got {source_weight}")
        if source_weight > 0 and prior_n > 0:
            raise ModelError(
                "give either source_weight (a fixed blend) or prior_n (a pseudo-count), not both"
            )
        if instance_alpha < 0:
            raise ModelError(f"instance_alpha must be >= 0 (0: off), got {instance_alpha}")
        self.neighbours, self.prior_n, self.instance_alpha = (
            int(neighbours),
            float(prior_n),
            float(instance_alpha),
        )
        self.source_weight = float(source_weight)
        self.test_momentum = float(test_momentum)
        self.needs_batch = prior_n == 0 and source_weight == 0 and test_momentum == 1
        if self.test_momentum < 1:  # running test statistics, starting at the source's
            self.register_buffer("test_mean", self.running_mean.detach().clone())
            self.register_buffer("test_var", self.running_var.detach().clone())
        self.class_balanced = int(class_balanced)
        if self.class_balanced:  # per-class first and second moments, starting at the source's
            k = self.class_balanced
            self.register_buffer("class_mean", self.running_mean.detach().clone().repeat(k, 1))
            self.register_buffer(
                "class_sq", (self.running_var + self.running_mean**2).detach().clone().repeat(k, 1)
            )
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # per-sample moments to commit
        self._detector: ShiftDetector | None = None  # shared, not a submodule (see attach_detector)
        self._detect_index = -1

    def attach_detector(self, detector: ShiftDetector, index: int) -> None:
        """Share `detector` (held by the method, so its buffers are saved once) as the `index`-th
        layer in module order. Adds the buffers of a restart: the batch of the last restart and
        the last batch's moments (what a restart starts from)."""
        if self.test_momentum >= 1:
            raise ModelError("shift detection needs running test statistics (test_momentum < 1)")
        object.__setattr__(self, "_detector", detector)  # plain reference: no second registration
        self._detect_index = int(index)
        self.register_buffer("restarted_at", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_mean", self.running_mean.detach().clone())
        self.register_buffer("last_var", self.running_var.detach().clone())

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, neighbours={self.neighbours}, prior_n={self.prior_n}, "
            f"source_weight={self.source_weight}, instance_alpha={self.instance_alpha}, "
            f"test_momentum={self.test_momentum}, class_balanced={self.class_balanced}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ModelError(f"NeighbourStatsNorm needs inputs (N, C, ...), got shape {tuple(x.shape)}")
        xf = x.float()
        n = x.shape[0]
        k = n if self.neighbours == 0 else min(self.neighbours, n)
        if k == n and self.instance_alpha == 0:
            return self._blend_whole_batch(xf)
        if x.dim() > 2:
            inst_var, inst_mean = fast_moments(xf, list(range(2, x.dim())))  # (N, C)
        else:  # BatchNorm1d on (N, C): each sample is one value per channel
            inst_var, inst_mean = torch.zeros_like(xf), xf
        if k == n:  # the whole batch: plain test-batch statistics, one row for all samples
            mean = inst_mean.mean(0, keepdim=True)
            var = (inst_var + inst_mean**2).mean(0, keepdim=True) - mean**2
        else:
            with torch.no_grad():
                src_std = (self.running_var.float() + self.eps).sqrt()
                desc = torch.cat(
                    [
                        (inst_mean - self.running_mean.float()) / src_std,
                        0.5 * torch.log((inst_var + self.eps) / (src_std**2)),
                    ],
                    dim=1,
                )
                near = torch.cdist(desc, desc).topk(k, dim=1, largest=False).indices  # (N, k), self first
                w = torch.zeros(n, n, device=x.device).scatter_(1, near, 1.0 / k)
            mean = w @ inst_mean
            var = w @ (inst_var + inst_mean**2) - mean**2
        if self.needs_batch and x.numel() // x.shape[1] * k // n <= 1:
            raise DataError(
                f"test-batch statistics need more than one value per channel; got input {tuple(x.shape)}"
            )
        a = self.source_weight if self.source_weight > 0 else self.prior_n / (self.prior_n + k)
        mean = a * self.running_mean.float() + (1 - a) * mean
        var = (a * self.running_var.float() + (1 - a) * var).clamp_min(0)
        spatial = x.numel() // (x.shape[0] * x.shape[1])
        if self.instance_alpha > 0 and spatial > 1:
            # instance-aware correction (IABN of NOTE, Gong et al. 2022): a sample whose own statistics
            # lie further than alpha standard errors from the shared ones moves towards its own by
            # the excess (soft shrinkage), e.g. a sample of another domain in a mixed batch
            se_mean = (var / spatial).sqrt()
            se_var = (2 * var**2 / (spatial - 1)).sqrt()
            mean = mean + _shrink(inst_mean - mean, self.instance_alpha * se_mean)
            var = (var + _shrink(inst_var - var, self.instance_alpha * se_var)).clamp_min(0)
        if mean.shape[0] == 1:
            mean, var = mean[0], var[0]
        return affine_normalize(xf, mean, var, self)

    def _blend_whole_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The common case (whole batch, no instance correction), with a hand-written backward."""
        if x.numel() <= x.shape[1] and self.needs_batch:
            raise DataError(
                f"test-batch statistics need more than one value per channel; got input {tuple(x.shape)}"
            )
        a = self.source_weight if self.source_weight > 0 else self.prior_n / (self.prior_n + x.shape[0])
        w = self.weight if self.weight is not None else torch.ones_like(self.running_mean)
        b = self.bias if self.bias is not None else torch.zeros_like(self.running_mean)
        mean_s, var_s = self.running_mean.float(), self.running_var.float()
        m = self.test_momentum
        det = self._detector
        slow = True  # without a detector, running statistics normalise every batch
        if det is not None:
            if self._detect_index == 0:
                det.begin_batch(x.shape[0])
            if det.restart_due(int(self.restarted_at)):  # a new domain showed in the last batch
                self.test_mean.copy_(self.last_mean)
                self.test_var.copy_(self.last_var)
                if self.class_balanced:  # every class restarts from the batch's pooled moments
                    self.class_mean.copy_(self.last_mean.expand_as(self.class_mean))
                    self.class_sq.copy_((self.last_var + self.last_mean**2).expand_as(self.class_sq))
                self.restarted_at.copy_(det.reset_to)
            slow = bool(det.slow)
        if m < 1:
            anchor = a
            if slow:
                # a * source + (1 - a) * (running test statistics updated with this batch at momentum
                # m): the batch enters with weight (1 - a) m, the rest is a fixed anchor (no gradient)
                anchor = 1 - (1 - a) * m
                mean_s = (a * mean_s + (1 - a) * (1 - m) * self.test_mean.float()) / anchor
                var_s = (a * var_s + (1 - a) * (1 - m) * self.test_var.float()) / anchor
            y, mean_b, var_b = _BlendedBatchNorm.apply(x, w, b, mean_s, var_s, anchor, self.eps)
            with torch.no_grad():
                if det is not None:
                    i = self._detect_index
                    x_in = x if det.wants_input(i) else None
                    det.report(i, mean_b, var_b, self.test_mean, self.test_var, self.eps, x_in)
                    self.last_mean.copy_(mean_b)
                    self.last_var.copy_(var_b)
                if self.class_balanced:  # updated by `commit`, once the batch's classes are known
                    dims = list(range(2, x.dim()))
                    self._pending = (x.mean(dims), (x * x).mean(dims)) if dims else (x.clone(), x * x)
                else:
                    self.test_mean.lerp_(mean_b.to(self.test_mean.dtype), m)
                    self.test_var.lerp_(var_b.to(self.test_var.dtype), m)
            return y
        return _BlendedBatchNorm.apply(x, w, b, mean_s, var_s, a, self.eps)[0]

    @torch.no_grad()
    def commit(self, labels: torch.Tensor) -> None:
        """Class-balanced running statistics: move each class's moments towards those of the last
        forward's samples assigned to it (`labels`, e.g. the predicted classes), at momentum
        `test_momentum * K * n_k / n` for a class with n_k of the n samples (a batch moves the
        classes' equal-weight mixture by `test_momentum`, as the plain running average does), then
        set the test statistics to the mixture. No-op without a pending forward."""
        if not self.class_balanced or self._pending is None:
            return
        mean_x, sq_x = self._pending
        n, k = mean_x.shape[0], self.class_balanced
        if labels.shape != (n,):  # refused before anything changes: the pending batch stays
            raise DataError(
                f"commit needs one label per sample of the last batch ({n}), got {tuple(labels.shape)}"
            )
        self._pending = None
        onehot = torch.nn.functional.one_hot(labels.long().clamp(0, k - 1), k).float()  # (n, K)
        counts = onehot.sum(0)
        rate = (self.test_momentum * k * counts / n).clamp(max=1.0)[:, None]
        seen = counts[:, None].clamp_min(1)
        self.class_mean.add_(rate * (onehot.T @ mean_x / seen - self.class_mean))
        self.class_sq.add_(rate * (onehot.T @ sq_x / seen - self.class_sq))
        mean = self.class_mean.mean(0)
        self.test_mean.copy_(mean)
        self.test_var.copy_((self.class_sq.mean(0) - mean**2).clamp_min(0))


def commit_class_stats(model: torch.nn.Module, labels: torch.Tensor) -> None:
    """`commit` on every class-balanced NeighbourStatsNorm layer of `model`."""
    for m in model.modules():
        if isinstance(m, NeighbourStatsNorm) and m.class_balanced:
            m.commit(labels)


class _BlendedBatchNorm(torch.autograd.Function):
    """y = w (x - m) / sqrt(v + eps) + b with m = a mu_s + (1 - a) mu_b and v = a var_s + (1 - a)
    var_b (mu_b, var_b: the batch moments), differentiable in x, w and b like batch norm in
    training mode; the backward needs two reductions and one elementwise pass (autograd through the
    separate moment reductions costs about twice as much on CPU). Returns (y, mu_b, var_b): the batch
    moments come out without gradient, for callers that keep running statistics."""

    @staticmethod
    def forward(ctx, x, w, b, mean_s, var_s, a, eps):  # type: ignore[override]
        dims = [0, *range(2, x.dim())]
        shape = (1, -1, *([1] * (x.dim() - 2)))
        var_b, mean_b = fast_moments(x, dims)
        mean = a * mean_s + (1 - a) * mean_b
        inv = torch.rsqrt(a * var_s + (1 - a) * var_b + eps)
        scale = w * inv
        ctx.save_for_backward(x, w, inv, mean, mean_b)
        ctx.a, ctx.count = a, x.numel() // x.shape[1]
        ctx.mark_non_differentiable(mean_b, var_b)
        return torch.addcmul((b - mean * scale).reshape(shape), x, scale.reshape(shape)), mean_b, var_b

    @staticmethod
    def backward(ctx, g, _g_mean, _g_var):  # type: ignore[override]
        x, w, inv, mean, mean_b = ctx.saved_tensors
        a, count = ctx.a, ctx.count
        dims = [0, *range(2, x.dim())]
        shape = (1, -1, *([1] * (x.dim() - 2)))
        sum_g = g.sum(dims)
        sum_g_centred = (g * x).sum(dims) - mean * sum_g  # sum of g * (x - m)
        grad_w = sum_g_centred * inv
        c1 = w * inv
        c2 = -c1 * (1 - a) * inv**2 * sum_g_centred / count
        c3 = -c1 * (1 - a) * sum_g / count - c2 * mean_b
        grad_x = torch.addcmul((c3.reshape(shape) + g * c1.reshape(shape)), x, c2.reshape(shape))
        return grad_x, grad_w, sum_g, None, None, None, None


def _shrink(d: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Soft shrinkage: sign(d) * max(|d| - threshold, 0)."""
    return torch.sign(d) * torch.relu(d.abs() - threshold)
