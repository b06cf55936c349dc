"""The teacher: a frozen model that turns a batch into per-pixel logits.

``teacher(batch) -> logits`` is the only interface the training loop sees, so where the targets
come from (a streamed forward pass here, a logit cache later) never branches the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from distill.models import forward_padded
from distill.run_folder import trained_weights

if TYPE_CHECKING:
    from distill.config import Recipe


class Teacher(nn.Module):
    """A frozen segmentation model serving logits for a batch.

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
    ) -> None:
        super().__init__()
        self.model = model
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
        images = batch["image"]
        if self._scale is not None:
            images = images * self._scale + self._shift
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return forward_padded(self.model, images)


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


class _Renormalized(nn.Module):
    """A model fed ``images * scale + shift``: the data's normalization turned into its own."""

    def __init__(self, model: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images * self.scale + self.shift)


def with_teacher_normalization(model: nn.Module, recipe: Recipe) -> nn.Module:
    """``model`` taking data-normalized images, re-normalized for a teacher that needs it.

    For callers that feed images rather than batches (compare); ``Teacher`` does the same itself.
    """
    assert recipe.teacher is not None
    scale, shift = _renormalization(recipe.data.mean, recipe.data.std, recipe.teacher.mean,
                                    recipe.teacher.std)
    return model if scale is None else _Renormalized(model, scale, shift)


def load_teacher(recipe: Recipe, num_classes: int) -> Teacher:
    """The recipe's teacher, frozen with its trained weights (streamed: run on every batch).

    Its cached counterpart, :func:`distill.cache.load_cached_teacher`, maps a batch to logits
    too, so the training loop has no branch on where the targets come from.
    """
    from distill.models import build_model

    assert recipe.teacher is not None
    spec = recipe.teacher.model_copy(update={"checkpoint": trained_weights(recipe, "teacher")})
    return Teacher(
        build_model(spec, num_classes),
        data_mean=recipe.data.mean,
        data_std=recipe.data.std,
        teacher_mean=recipe.teacher.mean,
        teacher_std=recipe.teacher.std,
        channels_last=recipe.train.channels_last,
        compile=recipe.teacher.compile,
    )
