"""Segmentation losses: cross entropy, pixel-wise KD, channel-wise KD (CWD), DIST, and their mix.

All KD losses treat the teacher's logits as constants: they are detached, so a teacher that
still requires grad never receives one. When the teacher's logits have a different spatial size,
they are resized to the student's with bilinear interpolation (``align_corners=False``) *before*
the softmax, so the student is distilled at its own resolution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from distill._checks import check_number
from distill.losses.fused_dist import fused_dist_forward
from distill.losses.fused_kl import compute_dtype as _compute_dtype
from distill.losses.fused_kl import fused_kd_forward
from distill.losses.fused_kl import resize_bilinear as _resize
from distill.losses.saved_gradient import LossWithSavedGradient

__all__ = ["DistillLoss", "ce_loss", "cwd_loss", "dist_loss", "dist_loss_reference", "kd_loss",
           "kd_loss_reference"]

KDKind = Literal["kl", "cwd", "dist"]
KDPixels = Literal["labelled", "teacher_correct"]
_KINDS = ("kl", "cwd", "dist")
_PIXELS = ("labelled", "teacher_correct")


# --------------------------------------------------------------------------- checks and helpers
def _check_chunk(chunk_size: Any) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_pair(student: Tensor, teacher: Tensor) -> bool:
    """Validate student/teacher logits; return True when the teacher must be resized."""
    if student.ndim < 2 or teacher.ndim != student.ndim:
        shapes = f"student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        raise ValueError(f"logits must both be [N, C, ...] of equal rank, got {shapes}")
    if not (student.is_floating_point() and teacher.is_floating_point()):
        raise TypeError(f"logits must be floating point, not {student.dtype}/{teacher.dtype}")
    (n_s, c_s), (n_t, c_t) = student.shape[:2], teacher.shape[:2]
    if c_s != c_t:
        raise ValueError(f"student has {c_s} classes but teacher has {c_t}")
    if n_s != n_t:
        raise ValueError(f"student batch size {n_s} != teacher batch size {n_t}")
    if teacher.shape[2:] == student.shape[2:]:
        return False
    if student.ndim != 4:
        raise ValueError(
            f"teacher logits {tuple(teacher.shape)} differ spatially from student's "
            f"{tuple(student.shape)}; only 4-D [N, C, H, W] logits are resized"
        )
    return True


def _valid_mask(student: Tensor, target: Tensor | None, ignore_index: int) -> Tensor | None:
    if target is None:
        return None
    if tuple(target.shape) != (expected := (student.shape[0], *student.shape[2:])):
        raise ValueError(f"target shape {tuple(target.shape)} does not match student logits "
                         f"shape {tuple(student.shape)} (expected target shape {expected})")
    return target != ignore_index


def _prepare(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Autograd-path inputs: both upcast to the compute dtype, teacher detached and resized."""
    resize = _check_pair(student, teacher)
    cd = _compute_dtype(student, teacher)
    t = teacher.detach().to(cd)
    return student.to(cd), (_resize(t, student.shape[2:], cd) if resize else t)


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float,
    target: Tensor | None = None, ignore_index: int = 255, chunk_size: int | None = None,
) -> Tensor:
    """Pixel-wise KD: ``T^2 *`` mean over valid pixels of KL(teacher || student) at temperature T.

    Memory-lean version of :func:`kd_loss_reference`: a custom autograd Function computes the
    loss and its gradient ``T * (p_s - p_t) * valid / num_valid`` together in forward, in place,
    and saves only that gradient (one student-sized tensor). The mean is over valid pixels, so
    the loss does not grow with image area.

    Args:
        student_logits: ``[N, C, H, W]`` (or ``[N, C]``). bf16/fp16 are computed in fp32; the
            gradient comes back in the student's dtype.
        teacher_logits: Same layout and class count; detached. Another spatial size is resized
            bilinearly (align_corners=False) before the softmax.
        temperature: Softmax temperature T > 0.
        target: Optional ``[N, H, W]`` (or ``[N]``) labels; pixels equal to ``ignore_index``
            (void) are not distilled. ``None`` distils every pixel.
        chunk_size: Samples per step, bounding the temporaries (resized teacher, fp32 copies of
            half-precision logits). ``None``: the whole batch at once.

    Returns: scalar loss (fp32; fp64 for fp64 inputs); 0 with zero gradient if nothing is valid.
    Raises: ValueError on bad temperature/chunk_size or class, batch or target-shape mismatch.
    """
    temperature = check_number("temperature", temperature, allow_zero=False)
    _check_chunk(chunk_size)
    _check_pair(student_logits, teacher_logits)
    valid = _valid_mask(student_logits, target, ignore_index)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return LossWithSavedGradient.apply(
        fused_kd_forward, student_logits, teacher_logits.detach(), valid, temperature, chunk_size,
        need_grad,
    )


def kd_loss_reference(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float,
    target: Tensor | None = None, ignore_index: int = 255,
) -> Tensor:
    """Plain-autograd reference for :func:`kd_loss`: same semantics, about 4x the memory.

    ``T^2 * masked_mean(F.kl_div(log_softmax(s/T), softmax(t/T), reduction='none').sum(1))``;
    the naive baseline for tests and the benchmark. Inputs are upcast and resized like kd_loss.
    """
    temperature = check_number("temperature", temperature, allow_zero=False)
    s, t = _prepare(student_logits, teacher_logits)
    valid = _valid_mask(student_logits, target, ignore_index)
    log_ps = F.log_softmax(s / temperature, dim=1)
    kl = F.kl_div(log_ps, F.softmax(t / temperature, dim=1), reduction="none").sum(1)
    if valid is None:
        return kl.mean() * temperature**2
    kl = torch.where(valid, kl, kl.new_zeros(()))
    return kl.sum() / valid.sum().clamp_min(1) * temperature**2


# --------------------------------------------------------------------------- CE and CWD
def ce_loss(
    logits: Tensor, target: Tensor, *, ignore_index: int = 255,
    class_weights: Tensor | None = None,
) -> Tensor:
    """Cross entropy with hard labels: mean over valid pixels, weighted as in F.cross_entropy.

    Returns 0 with a zero-gradient path (not NaN) when every pixel is ignored. Half-precision
    logits are upcast to fp32, as autocast would do for the log-softmax.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    target = target.long()
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights).to(logits.device, logits.dtype)
        if (k := class_weights.numel()) != (c := logits.shape[1]):
            raise ValueError(f"class_weights has {k} entries but logits have {c} classes")
    total = F.cross_entropy(
        logits, target, weight=class_weights, ignore_index=ignore_index, reduction="sum"
    )
    denom = _ce_denominator(target, ignore_index, class_weights).to(total.dtype)
    # All ignored: total is 0 with a zero gradient; dividing by 1 instead of 0 keeps it that way.
    return total / torch.where(denom > 0, denom, torch.ones_like(denom))


def _ce_denominator(target: Tensor, ignore_index: int, class_weights: Tensor | None) -> Tensor:
    """What :func:`ce_loss` divides by: the number of valid pixels, or their summed weights."""
    valid = target != ignore_index
    if class_weights is None:
        return valid.sum()
    weights = torch.as_tensor(class_weights).to(target.device)  # on the batch's device, as ce_loss's
    return (weights[target.long().masked_fill(~valid, 0)] * valid).sum()


def cwd_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float,
    target: Tensor | None = None, ignore_index: int = 255,
) -> Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021).

    Per sample and channel, softmax over the H*W positions of ``logits / T``; KL(teacher ||
    student) summed over positions, then ``T^2 * sum / (N * C)``. With ``target``, void
    positions are left out of every channel's softmax, so only labelled pixels are distilled.
    Teacher detached and resized like :func:`kd_loss`.
    """
    temperature = check_number("temperature", temperature, allow_zero=False)
    if student_logits.ndim < 3:
        raise ValueError(f"cwd_loss needs [N, C, H, W] logits, got {tuple(student_logits.shape)}")
    s, t = _prepare(student_logits, teacher_logits)
    s, t = s.flatten(2) / temperature, t.flatten(2) / temperature
    valid = _valid_mask(student_logits, target, ignore_index)
    if valid is not None:
        # A large finite fill, not -inf: exp() gives an exact 0 without the NaN that -inf - -inf
        # would put into the KL of an all-void sample (whose uniform rows then give KL 0).
        void = valid.flatten(1).logical_not().unsqueeze(1)
        fill = torch.finfo(s.dtype).min / 4  # below any logit / T, even a one-hot teacher's
        s, t = s.masked_fill(void, fill), t.masked_fill(void, fill)
    log_ps = F.log_softmax(s, dim=-1)
    log_pt = F.log_softmax(t, dim=-1)
    kl = F.kl_div(log_ps, log_pt, reduction="sum", log_target=True)
    return kl * (temperature**2 / (s.shape[0] * s.shape[1]))


def _masked_pearson(a: Tensor, b: Tensor, weight: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` over ``dims``, counting only entries where
    ``weight`` (0/1, broadcastable) is 1; the 1e-8 in the denominator is DIST's."""
    count = weight.expand_as(a).sum(dims, keepdim=True).clamp_min(1)
    a = (a - (a * weight).sum(dims, keepdim=True) / count) * weight
    b = (b - (b * weight).sum(dims, keepdim=True) / count) * weight
    squares = a.square().sum(dims) * b.square().sum(dims)
    # sqrt's gradient at 0 is infinite: rows with nothing counted (void pixels) take sqrt(1)*0.
    nonzero = squares > 0
    norms = torch.where(nonzero, squares, torch.ones_like(squares)).sqrt() * nonzero
    return (a * b).sum(dims) / (norms + 1e-8)


def dist_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float,
    target: Tensor | None = None, ignore_index: int = 255,
) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022): match relations, not exact probabilities.

    With p = softmax(logits / T) over classes at every labelled pixel: ``T^2 * [(1 - mean over
    pixels of pearson_c(p_s, p_t)) + (1 - mean over classes of pearson_pixels(p_s, p_t))]``,
    the inter-class and intra-class terms with equal weight. Pearson correlation ignores scale
    and shift, so a small student is not pushed to copy a stronger teacher's exact
    confidence, only the pattern of its class scores per pixel and of its pixels per class.

    Computed with its gradient in one custom autograd Function (:mod:`distill.losses.fused_dist`),
    sample by sample, and equal to :func:`dist_loss_reference` to float rounding; it saves only
    the gradient. Same arguments as :func:`kd_loss` (without ``chunk_size``); 0 with zero
    gradient when fewer than 2 pixels are labelled.
    """
    temperature = check_number("temperature", temperature, allow_zero=False)
    resize = _check_pair(student_logits, teacher_logits)
    valid = _valid_mask(student_logits, target, ignore_index)
    teacher = teacher_logits.detach()
    if resize:
        teacher = _resize(teacher, student_logits.shape[2:], _compute_dtype(student_logits, teacher))
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return LossWithSavedGradient.apply(
        fused_dist_forward, student_logits, teacher, valid, temperature, need_grad
    )


def dist_loss_reference(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float,
    target: Tensor | None = None, ignore_index: int = 255,
) -> Tensor:
    """:func:`dist_loss` taped by autograd: the readable definition, and the tests' reference."""
    temperature = check_number("temperature", temperature, allow_zero=False)
    s, t = _prepare(student_logits, teacher_logits)
    valid = _valid_mask(student_logits, target, ignore_index)
    if valid is None:
        valid = torch.ones((s.shape[0], *s.shape[2:]), dtype=torch.bool, device=s.device)
    num_valid = valid.sum()
    # Masks and weighted sums in the [N, C, ...] layout, not a gather of the labelled pixels:
    # no copies of the logits, and a cheap backward.
    weight = valid.unsqueeze(1).to(s.dtype)
    p_s = F.softmax(s / temperature, dim=1)
    p_t = F.softmax(t / temperature, dim=1)
    inter = 1 - (_masked_pearson(p_s, p_t, weight, (1,)) * valid).sum() / num_valid.clamp_min(1)
    pixel_dims = (0, *range(2, s.ndim))
    intra = 1 - _masked_pearson(p_s, p_t, weight, pixel_dims).mean()
    # Fewer than 2 labelled pixels: no relation to match, loss 0 with a zero gradient. A tensor
    # factor, not an `if`: no host sync in the training step.
    return (inter + intra) * temperature**2 * (num_valid > 1)


# --------------------------------------------------------------------------- module
class DistillLoss(torch.nn.Module):
    """``ce_weight * CE(student, target) + kd_weight * KD(student, teacher)``
    ``[+ pseudo_label_weight * CE(student, confident teacher labels)]``
    ``[+ feature_weight * feature term]``.

    ``kind`` picks the KD term: ``"kl"`` (pixel-wise :func:`kd_loss`), ``"cwd"``
    (:func:`cwd_loss`) or ``"dist"`` (:func:`dist_loss`); each sees only the pixels
    ``kd_pixels`` selects: ``"labelled"`` (not ``ignore_index``, as in the CE) or
    ``"teacher_correct"`` (labelled and the teacher's top class is the label: a teacher's mistakes
    are not taught, which matters when it is weak on rare classes). Weights are >= 0 and not both
    0; temperature > 0. ``class_weights`` (per-class CE weights) is a buffer, so ``.to()`` moves
    it; ``chunk_size`` goes to :func:`kd_loss`. ``features`` (a
    :class:`distill.losses.features.FeatureDistillation`, whose hooks read both forwards) adds the
    feature term at ``feature_weight``.
    """

    class_weights: Tensor | None

    def __init__(
        self, *, ce_weight: float = 1.0, kd_weight: float = 1.0, temperature: float = 1.0,
        kind: KDKind = "kl", kd_pixels: KDPixels = "labelled", ignore_index: int = 255,
        class_weights: Sequence[float] | None = None, chunk_size: int | None = None,
        pseudo_label_weight: float = 0.0, pseudo_label_threshold: float = 0.9,
        features: torch.nn.Module | None = None, feature_weight: float = 1.0,
    ) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the adapters are trained and checkpointed as the
        # training loop prepares them, never as part of the loss.
        self.__dict__["features"] = features
        self.feature_weight = check_number("feature_weight", feature_weight, allow_zero=True)
        self.pseudo_label_weight = check_number("pseudo_label_weight", pseudo_label_weight, allow_zero=True)
        self.pseudo_label_threshold = check_number("pseudo_label_threshold", pseudo_label_threshold,
                                                    allow_zero=False)
        if self.pseudo_label_threshold > 1:  # a probability: above 1 no pixel would ever pass
            raise ValueError(f"pseudo_label_threshold must be in (0, 1], got {pseudo_label_threshold!r}")
        self.ce_weight = check_number("ce_weight", ce_weight, allow_zero=True)
        self.kd_weight = check_number("kd_weight", kd_weight, allow_zero=True)
        if self.ce_weight == 0 and self.kd_weight == 0:
            raise ValueError("ce_weight and kd_weight are both 0: the loss would be constant")
        self.temperature = check_number("temperature", temperature, allow_zero=False)
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        if kd_pixels not in _PIXELS:
            raise ValueError(f"kd_pixels must be one of {_PIXELS}, got {kd_pixels!r}")
        _check_chunk(chunk_size)
        self.kind: KDKind = kind
        self.kd_pixels: KDPixels = kd_pixels
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(list(class_weights), dtype=torch.float32)
            if weights.ndim != 1 or not bool(weights.isfinite().all()) or bool((weights < 0).any()):
                raise ValueError(f"class_weights must be finite and >= 0, got {weights.tolist()}")
        self.register_buffer("class_weights", weights, persistent=False)

    @classmethod
    def from_config(cls, loss_config: Any, *, ignore_index: int,
                    features: torch.nn.Module | None = None) -> DistillLoss:
        """Build from any object with attributes ``ce_weight, kd_weight, temperature, kind,
        kd_pixels, class_weights, chunk_size`` (and ``feature.weight``); missing ones take the
        constructor defaults."""
        names = ("ce_weight", "kd_weight", "temperature", "kind", "kd_pixels", "class_weights",
                 "chunk_size", "pseudo_label_weight", "pseudo_label_threshold")
        kwargs = {n: getattr(loss_config, n) for n in names if hasattr(loss_config, n)}
        for name in ("kind", "kd_pixels"):  # accept str-valued enums from a config model
            if name in kwargs:
                kwargs[name] = getattr(kwargs[name], "value", kwargs[name])
        feature = getattr(loss_config, "feature", None)
        if features is not None and feature is not None:
            kwargs["feature_weight"] = feature.weight
        return cls(ignore_index=ignore_index, features=features, **kwargs)

    def forward(
        self, student_logits: Tensor, target: Tensor, teacher_logits: Tensor | None = None,
        *, share: Callable[[Tensor], Tensor] | None = None, kd_target: Tensor | None = None,
        feature_sizes: tuple[Sequence[int], Sequence[int]] | None = None,
    ) -> dict[str, Tensor]:
        """Return ``{"loss", "ce", "kd"}``, parts not detached (the caller decides). ``kd`` is a
        0 tensor, not computed, without a teacher or with ``kd_weight == 0`` (a feature term is
        still added then: CE plus features alone is a distillation of its own).

        ``share``: for data-parallel training, maps this process's pixel count (the CE's
        denominator, then the pixel KL's, then the pseudo-labels') to ``count * world_size /
        global count``; each of those terms is multiplied by it, so that averaging the
        processes' gradients (as DDP does) gives the gradient of one mean over every process's
        pixels, as one process with the whole batch would. Without it each process's mean counts
        equally, however many labelled pixels it had. (CWD and DIST are not pixel means and are
        left as they are.) Every process must call it equally often: it is a collective.

        ``kd_target``: the pixels the KD term sees (``ignore_index`` elsewhere), when they are
        not the CE's labelled ones: images without masks are distilled on every image pixel.
        Both terms are means over their own pixels, so their balance (``ce_weight`` against
        ``kd_weight``) does not drift with the share of unlabelled images in a batch.

        ``feature_sizes``: the (unpadded) image sizes the student and the teacher were given,
        for the feature term (with ``features``); it is added as ``parts["feature"]``.
        """
        teacher = teacher_logits if self.kd_weight > 0 else None
        feature_mask = target if kd_target is None else kd_target  # every pixel the teacher sees
        # With ce_weight 0 the CE is still reported, but kept out of the graph when KD drives it.
        ce_off = self.ce_weight == 0 and (teacher is not None or self.features is not None)
        with torch.no_grad() if ce_off else contextlib.nullcontext():
            ce = ce_loss(student_logits, target, ignore_index=self.ignore_index,
                         class_weights=self.class_weights)
            if share is not None:
                ce = ce * share(_ce_denominator(target, self.ignore_index, self.class_weights))
        kd = ce.new_zeros(())
        if teacher is None:
            parts = {"loss": self.ce_weight * ce, "ce": ce, "kd": kd}
            return self._add_features(parts, feature_sizes, feature_mask)
        kd_target = target if kd_target is None else kd_target
        if self.kd_pixels == "teacher_correct":
            if _check_pair(student_logits, teacher):  # resize once, here, for argmax and loss
                teacher = _resize(teacher.detach(), student_logits.shape[2:],
                                  _compute_dtype(student_logits, teacher))
            # Only a labelled pixel can show the teacher wrong; unlabelled ones stay distilled.
            wrong = (teacher.argmax(1) != target) & (target != self.ignore_index)
            kd_target = kd_target.masked_fill(wrong, self.ignore_index)
        args = {"temperature": self.temperature, "target": kd_target,
                "ignore_index": self.ignore_index}
        if self.kind == "kl":
            kd = kd_loss(student_logits, teacher, chunk_size=self.chunk_size, **args)
            if share is not None:
                kd = kd * share((kd_target != self.ignore_index).sum())
        elif self.kind == "cwd":
            kd = cwd_loss(student_logits, teacher, **args)
        else:
            kd = dist_loss(student_logits, teacher, **args)
        parts = {"loss": self.ce_weight * ce + self.kd_weight * kd, "ce": ce, "kd": kd}
        if self.pseudo_label_weight > 0:
            parts["pseudo"] = self._pseudo_label_ce(student_logits, teacher, target, kd_target, share)
            parts["loss"] = parts["loss"] + self.pseudo_label_weight * parts["pseudo"]
        return self._add_features(parts, feature_sizes, feature_mask)

    def _add_features(self, parts: dict[str, Tensor], feature_sizes: tuple[Sequence[int], Sequence[int]] | None,
                      feature_mask: Tensor) -> dict[str, Tensor]:
        """``parts`` with the feature term added (``parts["feature"]``), when the loss has one."""
        if self.features is None:
            return parts
        if feature_sizes is None:
            raise ValueError("a loss with a feature term needs feature_sizes")
        parts["feature"] = self.features(*feature_sizes, feature_mask)
        parts["loss"] = parts["loss"] + self.feature_weight * parts["feature"]
        return parts

    def _pseudo_label_ce(self, student: Tensor, teacher: Tensor, target: Tensor, kd_target: Tensor,
                         share: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """CE on the teacher's top class where there is no label and the teacher is confident
        (a mean over those pixels, weighted by ``share`` as the CE is)."""
        if _check_pair(student, teacher):
            teacher = _resize(teacher.detach(), student.shape[2:], _compute_dtype(student, teacher))
        # The teacher's distribution at the loss's T: with a class map, exactly the mapped one.
        confidence, top = torch.softmax(teacher.detach().float() / self.temperature, 1).max(1)
        unlabelled = (target == self.ignore_index) & (kd_target != self.ignore_index)
        pseudo = top.masked_fill(~(unlabelled & (confidence >= self.pseudo_label_threshold)),
                                 self.ignore_index)
        ce = ce_loss(student, pseudo, ignore_index=self.ignore_index)
        return ce if share is None else ce * share((pseudo != self.ignore_index).sum())
