"""DIST's loss and student gradient in two sweeps over the batch, a sample at a time.

The autograd version (:func:`distill.losses.dist_loss_reference`) runs about a hundred
logits-sized elementwise ops and reductions over the whole batch between forward and backward,
and put the cached distillation step at 1.25x the student's own step on CamVid. Here the same
quantities are computed in two sweeps over the batch, one sample (or a few small ones) at a time,
so that the working set stays in cache, with the gradient written in closed form rather than
taped: at 8x11x192x256 on 2 CPU cores, 0.57x the time and 0.35x the peak memory of the autograd
version (``bench/kd_loss.py --loss dist``), and the cached step at 1.07-1.12x over runs
(``bench/throughput.py``; README, "Measured").

Notation: u = softmax(s/T), v = softmax(t/T), w = 1 at labelled pixels, M = their number.
``a = (u - 1/C) w`` and ``b = (v - 1/C) w`` are centred over classes (a softmax sums to 1, so its
mean over classes is exactly 1/C). Inter-class term, per pixel i: ``r_i = <a_i, b_i> / D_i`` with
``D_i = |a_i| |b_i| + 1e-8``. Intra-class term, per class c, over labelled pixels:
``r_c = <α_c, β_c> / D_c`` with α, β the class-centred a and b. Loss: ``T^2 (M > 1) [(1 - sum_i
r_i / M) + (1 - mean_c r_c)]``.

Gradient of a Pearson r = <x, y> / (|x||y| + eps) in x (x, y already centred, so the centring's
projection leaves it unchanged): ``y / D - <x, y> |y| / (|x| D^2) x`` (0 where |x||y| = 0, as the
reference's guarded square root gives). Summing both terms gives dL/du, and the softmax's
backward gives ``dL/ds = u (g - sum_c u g) / T``.

Per-class sums are merged across sweeps with Chan et al.'s pairwise update in float64, each
sweep's sums taken over values centred at that sweep's own mean: a class the teacher never
predicts has a near-constant probability, and ``sum x^2 - (sum x)^2 / M`` would cancel away its
whole variance in float32 (as would ``p - 1/C``: the probabilities are kept, and centred once per
use).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Pixels per sweep (N*H*W): one CamVid sample at 192x256 is 49,152. Enough to amortise the per-op
# overhead, small enough that the sweep's few logits-sized buffers stay in a CPU's L2/L3.
_SWEEP_PIXELS = 65536
_EPS = 1e-8  # DIST's, in both denominators


def _pearson_coefficients(xy: Tensor, xx: Tensor, yy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """r, and the coefficients k1, k2 of dr/dx = k1 y - k2 x, from <x,y>, |x|^2 and |y|^2."""
    squares = xx * yy
    nonzero = squares > 0
    norms = torch.where(nonzero, squares, torch.ones_like(squares)).sqrt() * nonzero
    denominator = norms + _EPS
    r = xy / denominator
    k1 = 1 / denominator
    # |y| / |x| = sqrt(yy / xx); 0 where either norm is 0 (the reference's gradient there).
    ratio = torch.where(nonzero, yy / torch.where(nonzero, xx, torch.ones_like(xx)), torch.zeros_like(xx))
    k2 = xy * ratio.sqrt() / denominator.square()
    return r, k1, k2


def fused_dist_forward(
    student: Tensor, teacher: Tensor, valid: Tensor | None, temperature: float, need_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """DIST's loss and, if ``need_grad``, its gradient in ``student`` (its dtype and layout).

    ``teacher`` has the student's shape (resized by the caller); ``valid`` is ``[N, *spatial]``
    bool or None (every pixel). Computes in fp32, or fp64 for fp64 inputs.
    """
    n_total, n_classes, *spatial = student.shape
    cd = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    device = student.device
    step = max(1, _SWEEP_PIXELS // max(1, math.prod(spatial)))
    sweeps = [slice(start, start + step) for start in range(0, n_total, step)]
    uniform = 1.0 / n_classes
    # The merged per-class moments (see the module docstring); Apple's MPS has no float64.
    stat = torch.float32 if device.type == "mps" else torch.float64
    pixel_dims = (0, *range(2, student.ndim))
    class_shape = (1, n_classes, *(1,) * len(spatial))
    # Masks are float weights (1 at labelled pixels) applied by multiplication: over 11 classes
    # torch's CPU masked_fill and where are ~13x slower than a multiply (0.4 vs 0.03 ms per
    # 192x256 sample), and a sample needed seven of them.
    weights = None if valid is None else valid.unsqueeze(1).to(cd)

    def probabilities(logits: Tensor, sl: slice) -> Tensor:
        # Sweeps run on contiguous [n, C, ...] tensors whatever the logits' layout: over 11
        # classes, softmax and sums along a channels_last tensor's class axis are 1.5-4x slower.
        x = logits[sl].to(cd).contiguous()
        p = torch.softmax(x if temperature == 1 else x / temperature, dim=1)
        # A multiply lets inf/NaN on void pixels through: where some are (the sum shows it, and
        # is cheap on a sweep in cache), set void pixels to 1/C first. The check syncs with the
        # host, free on CPU; elsewhere `where` is cheap, so it always runs.
        if valid is not None and (device.type != "cpu" or not bool(p.sum().isfinite())):
            torch.where(valid[sl].unsqueeze(1), p, p.new_tensor(uniform), out=p)
        return p

    # The probabilities themselves are kept, not centred copies: a class's probability near 0
    # would lose its variation in (p - 1/C) to float32 rounding.
    us: list[Tensor] = []
    vs: list[Tensor] = []
    ab_i, aa_i, bb_i = (torch.empty((n_total, 1, *spatial), dtype=cd, device=device) for _ in range(3))
    count = torch.zeros((), dtype=stat, device=device)
    mean_u = torch.zeros(n_classes, dtype=stat, device=device)
    mean_v, m2_u, m2_v, co_uv = (torch.zeros_like(mean_u) for _ in range(4))

    # Sweep 1: probabilities, per-pixel inner products, per-class moments.
    for sl in sweeps:
        w = None if weights is None else weights[sl]
        u, v = probabilities(student, sl), probabilities(teacher, sl)
        us.append(u)
        vs.append(v)
        a, b = u - uniform, v - uniform
        if w is not None:
            a.mul_(w)
            b.mul_(w)
        product = a * b
        torch.sum(product, 1, keepdim=True, out=ab_i[sl])
        torch.sum(torch.mul(a, a, out=product), 1, keepdim=True, out=aa_i[sl])
        torch.sum(torch.mul(b, b, out=product), 1, keepdim=True, out=bb_i[sl])

        # a and b are scratch from here: the class means, then alpha and beta.
        if w is None:
            n_sweep = u.new_tensor(u.numel() // n_classes)
            sweep_mean_u, sweep_mean_v = u.sum(pixel_dims) / n_sweep, v.sum(pixel_dims) / n_sweep
        else:
            n_sweep = w.sum()
            sweep_mean_u = torch.mul(u, w, out=a).sum(pixel_dims) / n_sweep.clamp_min(1)
            sweep_mean_v = torch.mul(v, w, out=b).sum(pixel_dims) / n_sweep.clamp_min(1)
        alpha = torch.sub(u, sweep_mean_u.view(class_shape), out=a)
        beta = torch.sub(v, sweep_mean_v.view(class_shape), out=b)
        if w is not None:
            alpha.mul_(w)
            beta.mul_(w)
        sweep_m2_u = torch.mul(alpha, alpha, out=product).sum(pixel_dims).to(stat)
        sweep_m2_v = torch.mul(beta, beta, out=product).sum(pixel_dims).to(stat)
        sweep_co = torch.mul(alpha, beta, out=product).sum(pixel_dims).to(stat)
        # Chan et al.: merge (count, means, M2s, co-moment) of everything so far with this sweep.
        n_sweep = n_sweep.to(stat)
        merged = count + n_sweep
        delta_u = sweep_mean_u.to(stat) - mean_u
        delta_v = sweep_mean_v.to(stat) - mean_v
        cross = count * n_sweep / merged.clamp_min(1)
        m2_u += sweep_m2_u + delta_u.square() * cross
        m2_v += sweep_m2_v + delta_v.square() * cross
        co_uv += sweep_co + delta_u * delta_v * cross
        mean_u += delta_u * (n_sweep / merged.clamp_min(1))
        mean_v += delta_v * (n_sweep / merged.clamp_min(1))
        count = merged

    num_valid = count.to(cd)
    inv_valid = 1 / num_valid.clamp_min(1)
    active = (num_valid > 1).to(cd)  # fewer than 2 labelled pixels: loss 0, gradient 0
    r_i, k1_i, k2_i = _pearson_coefficients(ab_i, aa_i, bb_i)
    r_c, k1_c, k2_c = (x.to(cd) for x in _pearson_coefficients(co_uv, m2_u, m2_v))
    inter = 1 - r_i.sum() * inv_valid
    intra = 1 - r_c.mean()
    loss = (inter + intra) * temperature**2 * active
    if not need_grad:
        return loss, None

    # Sweep 2: g = dL/du up to the factor -T^2 (M > 1), then the softmax's backward, in place:
    # g = (b k1_i - a k2_i) / M + (beta k1_c - alpha k2_c) / C at labelled pixels, 0 elsewhere.
    k1_i.mul_(inv_valid)
    k2_i.mul_(-inv_valid)
    k1_c, k2_c = (k1_c / n_classes).view(class_shape), (-k2_c / n_classes).view(class_shape)
    mean_u, mean_v = mean_u.to(cd).view(class_shape), mean_v.to(cd).view(class_shape)
    scale = -temperature * active  # -T^2 from the loss, 1/T from the softmax
    # The gradient in the logits' own layout (a channels_last model's logits are channels_last),
    # written sweep by sweep while in cache; in the compute dtype (LossWithSavedGradient.backward).
    grad = torch.empty_like(student, dtype=cd)
    for sl, u, v in zip(sweeps, us, vs):
        centred = v - uniform
        g = centred * k1_i[sl]
        g.addcmul_(torch.sub(v, mean_v, out=centred), k1_c)
        g.addcmul_(torch.sub(u, uniform, out=centred), k2_i[sl])
        g.addcmul_(torch.sub(u, mean_u, out=centred), k2_c)
        if weights is not None:
            g.mul_(weights[sl])
        g.sub_(torch.mul(u, g, out=centred).sum(1, keepdim=True))
        grad[sl].copy_(u.mul_(g).mul_(scale))
    return loss, grad
