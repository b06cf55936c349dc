"""The pixel-wise KD loss and its gradient in one pass (behind :func:`distill.losses.kd_loss`).

``fused_kd_forward`` computes ``T^2 * mean KL(p_t || p_s)`` over valid pixels and its gradient
``T * (p_s - p_t) / num_valid`` under no_grad, a chunk of samples at a time, writing the gradient
in place; :class:`distill.losses.saved_gradient.LossWithSavedGradient` saves only that gradient.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Chunks of at least this many pixels (N*H*W) use the per-class loop of _kd_chunk, whose
# temporaries are 1/C of the logits. Below it the loop's per-op overhead dominates and the
# vectorised _kd_chunk_dense is used (its chunk-sized temporaries are tiny at that size).
_LOOP_MIN_PIXELS = 16384


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Half-precision logits are computed in fp32 (exp/log in bf16 lose too much); fp64 stays."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def resize_bilinear(teacher: Tensor, size: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Teacher logits at the student's size (bilinear, align_corners=False), in ``dtype``."""
    return F.interpolate(teacher.to(dtype), size=tuple(size), mode="bilinear", align_corners=False)


def _kd_chunk(s: Tensor, t: Tensor, work: Tensor, temperature: float) -> Tensor:
    """Per-pixel KL(p_t || p_s) (without T^2) of one chunk; leaves ``p_s - p_t`` in ``work``.

    Only ``work`` is logits-sized: the teacher is processed one class at a time (temporaries
    1/C of the logits) and its softmax is never materialised. Uses, with lse = logsumexp(x/T),
    KL = sum_c p_t,c (t_c - s_c) / T + lse_s - lse_t   (since sum_c p_t,c = 1).
    """
    inv_t = 1.0 / temperature
    if s.dtype == work.dtype:
        torch.div(s, temperature, out=work)
    else:  # upcast first: `out=` of another dtype would still compute in the input's dtype
        work.copy_(s).div_(temperature)
    # Student softmax in place; subtracting the max keeps exp in (0, 1], so nothing overflows.
    lse_s = work.amax(1)
    work.sub_(lse_s.unsqueeze(1)).exp_()
    z_s = work.sum(1)
    work.div_(z_s.unsqueeze(1))  # work = p_s
    lse_s.add_(z_s.log_())
    del z_s

    neg_m = t.amax(1).to(work.dtype).mul_(-inv_t)  # -max_c t_c / T
    buf, lse_t = torch.empty_like(neg_m), torch.zeros_like(neg_m)
    for c in range(s.shape[1]):
        lse_t.add_(torch.add(neg_m, t[:, c], alpha=inv_t, out=buf).exp_())
    lse_t.log_().sub_(neg_m)
    neg_lse_t = torch.neg(lse_t, out=neg_m)
    kl = lse_s.sub_(lse_t)
    del lse_t
    diff, lowest = torch.empty_like(buf), torch.finfo(buf.dtype).min
    for c in range(s.shape[1]):
        p_t = torch.add(neg_lse_t, t[:, c], alpha=inv_t, out=buf).exp_()
        work[:, c].sub_(p_t)
        # A teacher logit of -inf (a class it masks out) has p_t = 0: its term is 0, not 0 * -inf.
        diff.copy_(t[:, c]).sub_(s[:, c]).clamp_(min=lowest)
        kl.addcmul_(p_t, diff, value=inv_t)
    return kl


def _kd_chunk_dense(s: Tensor, t: Tensor, work: Tensor, temperature: float) -> Tensor:
    """Same contract as :func:`_kd_chunk`, vectorised over classes (for small chunks)."""
    log_ps = torch.log_softmax(s.to(work.dtype) / temperature, dim=1)
    log_pt = torch.log_softmax(t.to(work.dtype) / temperature, dim=1)
    p_t = log_pt.exp()
    kl = torch.where(p_t == 0, 0.0, p_t * (log_pt - log_ps)).sum(1)  # 0, not 0 * -inf; NaN stays
    torch.exp(log_ps, out=work).sub_(p_t)
    return kl


def fused_kd_forward(
    student: Tensor, teacher: Tensor, valid: Tensor | None, temperature: float,
    chunk_size: int | None, need_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    n_total, n_classes, *spatial = student.shape
    cd = compute_dtype(student, teacher)
    resize = list(teacher.shape[2:]) != spatial
    step = max(1, n_total if chunk_size is None else min(chunk_size, n_total))
    # Tensor arithmetic (no .item()) keeps this free of host syncs on GPU; clamp avoids 0/0.
    n_pixels = float(n_total * math.prod(spatial))
    num_valid = student.new_tensor(n_pixels, dtype=cd) if valid is None else valid.sum().to(cd)
    inv_valid = 1.0 / num_valid.clamp_min(1)
    grad_scale = inv_valid * temperature  # d(T^2 * mean KL)/ds = T (p_s - p_t) / num_valid

    # In the compute dtype, not the logits' (see LossWithSavedGradient.backward).
    grad = torch.empty_like(student, dtype=cd) if need_grad else None
    # Compute straight into the saved gradient, unless it needs another layout: the per-class
    # loop reads a channels_last tensor's classes with a stride of C (1.7x slower at CamVid's
    # size), so such logits go through a contiguous scratch chunk and are copied back.
    direct = grad is not None and student.is_contiguous()
    scratch = None if direct else student.new_empty((step, n_classes, *spatial), dtype=cd)
    total = torch.zeros((), dtype=cd, device=student.device)
    for start in range(0, n_total, step):
        sl = slice(start, start + step)
        s = student[sl].contiguous()
        t = resize_bilinear(teacher[sl], spatial, cd) if resize else teacher[sl]
        work = grad[sl] if direct else scratch[: s.shape[0]]  # type: ignore[index]
        lean = s.numel() // n_classes >= _LOOP_MIN_PIXELS
        kl = (_kd_chunk if lean else _kd_chunk_dense)(s, t, work, temperature)
        void = None if valid is None else valid[sl].logical_not()
        if void is not None:
            kl.masked_fill_(void, 0)  # masked_fill, not multiply: void pixels may hold inf/NaN
        total += kl.sum()
        if grad is not None:
            work.mul_(grad_scale)
            if void is not None:
                work.masked_fill_(void.unsqueeze(1), 0)
            if not direct:
                grad[sl].copy_(work)
    return total * inv_valid * (temperature * temperature), grad
