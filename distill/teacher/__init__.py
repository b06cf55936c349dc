"""The teacher: a frozen model that turns a batch into per-pixel logits.

``teacher(batch) -> logits`` is the only interface the training loop sees, so where the targets
come from (a streamed forward pass here, a logit cache later) never branches the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from distill._checks import check_number
from distill.teacher.sources import apply_class_map, class_map_matrix, load_source
from distill.models import ModelError, forward_padded, recorded_classes
from distill.stage_weights import check_normalization, trained_weights

if TYPE_CHECKING:
    from distill.config import Recipe


class Teacher(nn.Module):
    """A frozen segmentation model serving logits for a batch: ``teacher({"image": images})``
    (distill's batch dict, as the training loop hands it; :class:`ImagesTeacher` takes images).

    Frozen means: no parameter requires grad, the model stays in eval mode even when a parent
    module calls ``.train()``, and the forward runs under ``torch.no_grad()``. It is moved to the
    device by the caller and is never passed to ``accelerator.prepare`` (no DDP wrapper, no
    gradient all-reduce for weights that never change) nor saved into the student's checkpoints.

    Args:
        model: maps normalized images ``[B, 3, H, W]`` to logits ``[B, C, H, W]``.
        data_mean, data_std: the normalization the data pipeline applied to ``batch["image"]``.
        teacher_mean, teacher_std: the normalization the teacher was trained with, when it
            differs; the batch is then re-normalized for the teacher alone.
        channels_last: run the teacher in channels-last memory format (faster convolutions).
        compile: ``torch.compile`` the model's forward (in place, so ``state_dict`` keys do not
            change). The first batches pay the compilation (tens of seconds on CPU, a C++
            compiler needed there); worth it for long streamed runs of a large teacher.
        class_map: ``[K_teacher, K_student]`` 0/1 matrix: the teacher's softmax at
            ``temperature``, summed within each student class and renormalized, comes back as
            logits whose softmax at ``temperature`` is that distribution
            (:func:`distill.teacher.sources.apply_class_map`).
        bgr: reverse the channels for a teacher trained on BGR images.
        input_size: run the teacher at this (height, width) (bilinear); its logits are resized
            to the student's by the loss, like any teacher output of another size.
        tta_scales, tta_flip: test-time augmentation. The teacher runs on every scale of its
            input (and its mirror image); the views' softmaxes at ``temperature`` are averaged
            and come back as logits whose softmax at ``temperature`` is that mean. Averaged
            probabilities, not logits: a view that is unsure must not be outvoted by the scale
            of another view's logits.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        data_mean: Sequence[float] | None = None,
        data_std: Sequence[float] | None = None,
        teacher_mean: Sequence[float] | None = None,
        teacher_std: Sequence[float] | None = None,
        channels_last: bool = False,
        compile: bool = False,
        class_map: torch.Tensor | None = None,
        temperature: float = 1.0,
        bgr: bool = False,
        input_size: Sequence[int] | None = None,
        tta_scales: Sequence[float] = (1.0,),
        tta_flip: bool = False,
    ) -> None:
        super().__init__()
        # inf or NaN would give NaN targets through a class map or test-time views.
        temperature = check_number("temperature", temperature, allow_zero=False)
        if not tta_scales or any(not scale > 0 for scale in tta_scales):
            raise ValueError(f"tta_scales must be one or more scales > 0, got {list(tta_scales)!r}")
        self.tta_scales, self.tta_flip = tuple(tta_scales), tta_flip
        self.model = model
        self.temperature, self.bgr = temperature, bgr
        self.input_size = tuple(input_size) if input_size is not None else None
        self.register_buffer("_class_map", class_map, persistent=False)
        self.model.requires_grad_(False)
        self.model.eval()
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model.compile()
        scale, shift = _renormalization(data_mean, data_std, teacher_mean, teacher_std)
        # Buffers so that .to(device) moves them; persistent=False keeps them out of state_dict.
        self.register_buffer("_scale", scale, persistent=False)
        self.register_buffer("_shift", shift, persistent=False)

    def train(self, mode: bool = True) -> Teacher:
        """Keep the wrapped model in eval mode whatever the parent asks (BN and dropout frozen)."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits for ``batch["image"]``; run it under the recipe's autocast for mixed precision."""
        if not isinstance(batch, dict):
            raise TypeError(f"a Teacher is called on a batch dict {{'image': images}}, not a "
                            f"{type(batch).__name__} (distill.teacher.ImagesTeacher takes images)")
        images = batch["image"]
        if self._scale is not None:
            images = images * self._scale + self._shift
        if self.bgr:
            images = images.flip(1)
        if self.input_size is not None and tuple(images.shape[-2:]) != self.input_size:
            images = _resized(images, self.input_size)
        if self.tta_scales == (1.0,) and not self.tta_flip:
            return self._logits(images)
        size = images.shape[-2:]
        mean_probs = None
        views = 0
        for scale in self.tta_scales:
            # To a whole size, by size: scale_factor would map coordinates by `scale` itself
            # while the output is floor(H * scale) pixels, shifting the view by up to a pixel.
            scaled = images if scale == 1.0 else _resized(
                images, (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))))
            for flip in (False, True) if self.tta_flip else (False,):
                logits = self._logits(scaled.flip(-1) if flip else scaled)
                logits = logits.flip(-1) if flip else logits
                logits = torch.nn.functional.interpolate(logits.float(), size=size, mode="bilinear",
                                                         align_corners=False)
                probs = torch.softmax(logits / self.temperature, dim=1)
                mean_probs = probs if mean_probs is None else mean_probs.add_(probs)
                views += 1
        assert mean_probs is not None
        return self.temperature * torch.log(mean_probs.div_(views).clamp_min_(1e-12))

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = forward_padded(self.model, images)
        if self._class_map is not None:
            logits = apply_class_map(logits, self._class_map, self.temperature)
        return logits


def _resized(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear, antialiased as PIL resizes the frames a model trains on (plain bilinear
    downscaling aliases fine texture the teacher never saw so); in float32 on the CPU, which has
    no antialiased kernel for half precision, and back in the images' dtype."""
    upcast = images.device.type == "cpu" and images.dtype in (torch.float16, torch.bfloat16)
    resized = torch.nn.functional.interpolate(images.float() if upcast else images, size=tuple(size),
                                              mode="bilinear", align_corners=False, antialias=True)
    return resized.to(images.dtype)


def _renormalization(
    data_mean: Sequence[float] | None,
    data_std: Sequence[float] | None,
    teacher_mean: Sequence[float] | None,
    teacher_std: Sequence[float] | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-channel ``scale, shift`` with ``teacher_input = image * scale + shift``, or ``None``.

    ``raw = image * data_std + data_mean`` and ``teacher_input = (raw - t_mean) / t_std`` fold into
    one affine map, so re-normalizing costs one fused multiply-add per pixel.
    """
    if teacher_mean is None and teacher_std is None:
        return None, None
    if data_mean is None or data_std is None:
        raise ValueError("teacher normalization given but the data normalization is unknown")
    t_mean = torch.tensor(teacher_mean if teacher_mean is not None else data_mean)
    t_std = torch.tensor(teacher_std if teacher_std is not None else data_std)
    d_mean, d_std = torch.tensor(data_mean), torch.tensor(data_std)
    if torch.equal(t_mean, d_mean) and torch.equal(t_std, d_std):
        return None, None
    scale = d_std / t_std
    shift = (d_mean - t_mean) / t_std
    return scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)


def load_teacher(recipe: Recipe, num_classes: int) -> Teacher:
    """The recipe's teacher, frozen with its trained weights (streamed: run on every batch).

    Its cached counterpart, :func:`distill.cache.load_cached_teacher`, maps a batch to logits
    too, so the training loop has no branch on where the targets come from.
    """
    return teacher_from_recipe(recipe, num_classes, temperature=recipe.loss.temperature)


def teacher_from_recipe(recipe: Recipe, num_classes: int, *, temperature: float) -> Teacher:
    """The recipe's teacher from its source, with its normalization and class map (the map's
    softmax is taken at ``temperature``: the loss's for targets, 1 for scoring)."""
    from distill.data import dataset_info

    spec = recipe.teacher
    assert spec is not None
    weights = trained_weights(recipe, "teacher")
    if weights is not None and spec.source in ("smp", "factory"):
        # A run folder's teacher (or a checkpoint with its recipe.yaml) fed images normalized
        # otherwise than it learnt would teach from wrong targets without a word.
        check_normalization(recipe, weights, "teacher")
    student_names = dataset_info(recipe.data).class_names
    teacher_classes = len(spec.class_names) if spec.class_names else num_classes
    model, source_names, expects = load_source(spec, teacher_classes, weights)
    fixed = getattr(model, "fixed_size", None)  # an ONNX graph exported for one size
    if fixed is not None and (spec.input_size is None or tuple(spec.input_size) != fixed
                              or list(spec.tta_scales) != [1.0]):
        raise ModelError(f"teacher.path '{spec.path}' takes {fixed[0]}x{fixed[1]} images only: set "
                         f"teacher.input_size: [{fixed[0]}, {fixed[1]}]"
                         + ("" if list(spec.tta_scales) == [1.0] else " and teacher.tta_scales: [1.0]"))
    if spec.class_names and spec.source in ("transformers", "onnx", "smp_hub"):
        # Sources whose class count is their own: names of another count would fail at the
        # first batch (or map the wrong classes). Read from the model where it says it, never
        # found by a forward pass here (a large teacher at its input size is costly to probe).
        predicts = len(source_names) if source_names else recorded_classes(model)
        if predicts is not None and predicts != len(spec.class_names):
            raise ModelError(f"teacher.class_names lists {len(spec.class_names)} classes, but the teacher "
                             f"'{spec.path}' predicts {predicts}: give its own classes, in its order")
    if spec.class_map is None:
        # Without a map the teacher's classes are the student's, one to one: another count would
        # be cut to the first classes of a top-k store, or fail at the first batch.
        predicts = len(spec.class_names) if spec.class_names else (
            len(source_names) if source_names else recorded_classes(model))
        if predicts is not None:
            refuse_unmapped_count(predicts, num_classes, spec.path)
    matrix = None
    if spec.class_map is not None:
        names = spec.class_names or source_names or [str(k) for k in range(_output_classes(model, spec))]
        matrix = class_map_matrix(spec.class_map, list(names), student_names)
    return Teacher(
        model,
        data_mean=recipe.data.mean,
        data_std=recipe.data.std,
        teacher_mean=spec.mean or (expects.mean if expects else None),
        teacher_std=spec.std or (expects.std if expects else None),
        channels_last=recipe.train.channels_last and spec.source != "onnx",
        compile=spec.compile,
        class_map=matrix,
        temperature=temperature,
        bgr=spec.bgr or (expects.bgr if expects else False),
        input_size=spec.input_size,
        tta_scales=spec.tta_scales,
        tta_flip=spec.tta_flip,
    )


def refuse_unmapped_count(predicts: int, num_classes: int, path: str | None = None,
                          counted_by: str | None = None) -> None:
    """Without a class map the teacher's classes are the student's, one to one: refuse another
    count (``counted_by``: the key that gave the teacher's, when not the model itself)."""
    if predicts != num_classes:
        named = f" '{path}'" if path else ""
        by = f" ({counted_by})" if counted_by else ""
        raise ModelError(f"the teacher{named} predicts {predicts} classes{by} and the student {num_classes}: "
                         "map the teacher's classes onto the student's with teacher.class_map "
                         "(docs/teachers.md)")


def _output_classes(model: nn.Module, spec: object) -> int:
    """The teacher's class count, from one small forward pass (sources that do not record it)."""
    size = getattr(spec, "input_size", None) or getattr(model, "fixed_size", None) or (64, 64)
    try:
        with torch.no_grad():
            return int(forward_padded(model.eval(), torch.zeros(1, 3, *size)).shape[1])
    except Exception as error:  # e.g. an ONNX model of a fixed input size
        raise ModelError(f"cannot tell the teacher's class count from a {size[0]}x{size[1]} forward "
                         f"pass ({str(error).strip().splitlines()[0][:200] if str(error).strip() else error}): "
                         "set teacher.class_names (and teacher.input_size for a fixed-size model)") from None


def scoring_teacher(recipe: Recipe, num_classes: int, weights: Path | None = None) -> nn.Module:
    """The teacher as a model of images, its class map at T=1: what eval and compare score
    (``weights``: other weights for a teacher built from a checkpoint, e.g. ``eval.checkpoint``)."""
    assert recipe.teacher is not None
    if weights is not None and recipe.teacher.source in ("smp", "factory", "torchvision"):
        recipe = recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"checkpoint": weights})})
    teacher = teacher_from_recipe(recipe, num_classes, temperature=1.0)
    teacher.channels_last = False  # scoring runs on whatever layout the caller gives
    return ImagesTeacher(teacher).eval()


class ImagesTeacher(nn.Module):
    """A :class:`Teacher` called on images (compare, eval): the same logits as in training."""

    pads_itself = True  # the Teacher pads (and resizes to teacher.input_size) itself

    def __init__(self, teacher: Teacher) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher({"image": images})
