"""Feature distillation: the teacher's intermediate features as a second target.

A feature term pairs a student layer with a teacher layer (``loss.feature.pairs``). Layers are
named as smp models expose them: an integer is an encoder stage (0 the first, stride 2; -1 the
deepest), ``"decoder"`` the decoder's output (the input of the segmentation head). Forward
hooks (:class:`FeatureTap`) record them during the forwards the step runs anyway, so the loop
stays one student forward and one teacher forward.

Student and teacher features differ in channels and resolution, so each pair has an adapter
on the student side (1x1 convolution and batch norm, then bilinear resizing to the teacher's
map). The adapters train with the student but are not part of it: they live in
:class:`FeatureDistillation`, which the loop prepares and checkpoints for resume beside the
student, while ``best``/``last.safetensors`` and the export hold the student's keys alone.

Two terms:

- ``hint``: FitNets (Romero et al., ICLR 2015): mean squared error between the adapted student
  feature and the teacher's, each standardized per channel over the batch and the positions.
  Standardizing makes the weight independent of the teacher's activation scale, which varies
  by orders of magnitude between layers and architectures.
- ``cwd``: channel-wise distillation (Shu et al., ICCV 2021) on features: per sample and
  channel a softmax over positions at temperature ``tau``, KL(teacher || student) summed over
  positions, ``tau^2 * sum / (N * C)``; positions whose pixels are all void are left out where
  a mask exists. The authors' released feature configs use ``tau = 1`` with weights 3-10.

Features are streamed only: a teacher's feature maps hold hundreds of channels per position
(2048 at ResNet-50's deepest stage), far more than the top-k logits the cache stores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses import cwd_loss

Layer = int | Literal["decoder"]
FeatureKind = Literal["hint", "cwd"]


class FeatureError(ValueError):
    """A feature pair names a layer the model does not have, or a model without layers."""


def _layers_of(model: nn.Module, role: str) -> tuple[nn.Module, nn.Module]:
    encoder, decoder = getattr(model, "encoder", None), getattr(model, "decoder", None)
    if not isinstance(encoder, nn.Module) or not isinstance(decoder, nn.Module):
        raise FeatureError(
            f"feature distillation reads the {role}'s encoder stages and decoder, as smp models "
            f"expose them (model.encoder, model.decoder); the {role}, a {type(model).__name__}, has "
            "none (transformers, torchvision and ONNX teachers and factory models are distilled "
            "through their logits only: set loss.feature.kind to none)"
        )
    return encoder, decoder


def layer_names(model: nn.Module, role: str = "model") -> list[str]:
    """The layers a pair may name: encoder stages ``0..n-1`` (or ``-1``) and ``decoder``."""
    encoder, _ = _layers_of(model, role)
    stages = len(getattr(encoder, "out_channels", ())) - 1  # smp's first "feature" is the input
    if stages < 1:
        raise FeatureError(f"the {role}'s encoder does not list its stages (encoder.out_channels)")
    return [str(i) for i in range(stages)] + ["decoder"]


def _stage_index(layer: Layer, names: list[str], role: str) -> int | None:
    """The layer's index in the encoder's output list (None: the decoder)."""
    stages = len(names) - 1
    if layer == "decoder":
        return None
    if isinstance(layer, bool) or not isinstance(layer, int) or not -stages <= layer < stages:
        raise FeatureError(f"the {role} has no layer {layer!r}: it has encoder stages 0..{stages - 1} "
                           f"(or -1 for the deepest) and 'decoder'")
    return 1 + (layer % stages)  # index 0 of smp's list is the input image itself


class FeatureTap:
    """Records chosen layers of an smp model during its forward (forward hooks, no re-run).

    ``take(height, width)`` returns the recorded features, cropped to the part of each map
    that covers an input of that size (the model may have been run on a padded image, see
    :func:`distill.models.forward_padded`), and forgets them.
    """

    def __init__(self, model: nn.Module, layers: Sequence[Layer], role: str, *, training_only: bool = False) -> None:
        names = layer_names(model, role)
        # A student tap ignores the forwards of validation (the model in eval mode): their maps
        # would otherwise be held until the next training step.
        self._training_only = training_only
        encoder, decoder = _layers_of(model, role)
        self._indices = [_stage_index(layer, names, role) for layer in layers]
        self._encoder_out: list[Tensor] | None = None
        self._decoder_out: Tensor | None = None
        self._input_size: tuple[int, int] | None = None
        self._handles = [model.register_forward_pre_hook(self._record_input)]
        if any(i is not None for i in self._indices):
            self._handles.append(encoder.register_forward_hook(self._record_encoder))
        if any(i is None for i in self._indices):
            self._handles.append(decoder.register_forward_hook(self._record_decoder))

    def _record_input(self, module: nn.Module, args: tuple) -> None:
        if self._training_only and not module.training:
            return
        self._input_size = tuple(args[0].shape[-2:])

    def _record_encoder(self, module: nn.Module, args: tuple, output: list[Tensor]) -> None:
        if self._training_only and not module.training:
            return
        self._encoder_out = list(output)

    def _record_decoder(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self._training_only and not module.training:
            return
        self._decoder_out = output

    def take(self, height: int, width: int) -> list[Tensor]:
        """The features of the last forward, for an (unpadded) input of ``height x width``: the
        cells that cover the image (the last one may reach into the padding)."""
        return [feature for feature, _ in self.take_with_cells(height, width)]

    def take_with_cells(self, height: int, width: int) -> list[tuple[Tensor, tuple[float, float]]]:
        """:meth:`take`, each map with its cell's size in input pixels (padded size / map size)."""
        if self._input_size is None:
            raise RuntimeError("FeatureTap.take() before the model's forward")
        padded_h, padded_w = self._input_size
        features = []
        for index in self._indices:
            feature = self._decoder_out if index is None else self._encoder_out[index]
            h, w = feature.shape[-2:]
            cut = feature[..., : math.ceil(height * h / padded_h), : math.ceil(width * w / padded_w)]
            features.append((cut, (padded_h / h, padded_w / w)))
        self._encoder_out = self._decoder_out = self._input_size = None  # free the maps
        return features

    def remove(self) -> None:
        """Detach the hooks (the model runs as before)."""
        for handle in self._handles:
            handle.remove()


def _probe_channels(model: nn.Module, layers: Sequence[Layer], size: Sequence[int], role: str) -> list[int]:
    """Channels of each layer, from one forward pass on a small blank image."""
    tap = FeatureTap(model, layers, role)
    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        model.eval()  # batch norm statistics stay as they are
        with torch.no_grad():
            model(torch.zeros(1, 3, *size, device=device))
        channels = [int(f.shape[1]) for f in tap.take(*size)]
    finally:
        model.train(was_training)
        tap.remove()
    empty = [layer for layer, count in zip(layers, channels) if count == 0]
    if empty:  # MiT (SegFormer) encoders list a placeholder stage with no channels
        usable = [name for name, count in zip(layer_names(model, role)[:-1], _stage_channels(model))
                  if count > 0]
        raise FeatureError(f"the {role}'s layer {empty[0]!r} has no channels (a placeholder stage of "
                           f"its encoder): pair one of its stages {', '.join(usable)} or 'decoder'")
    return channels


def _stage_channels(model: nn.Module) -> list[int]:
    """Each encoder stage's channels as the encoder lists them (smp's first entry, the input,
    left out)."""
    return [int(c) for c in getattr(model.encoder, "out_channels", ())[1:]]


class _Adapter(nn.Sequential):
    """Student channels onto the teacher's: 1x1 convolution and batch norm."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__(nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                         nn.BatchNorm2d(teacher_channels))


def _standardized(x: Tensor) -> Tensor:
    """Per channel over the batch and the positions: zero mean, unit variance."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + 1e-5)


def hint_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """FitNets hint: mean squared error of the per-channel standardized features (same shape)."""
    if student.shape != teacher.shape:
        raise ValueError(f"hint_loss needs equal shapes, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    return F.mse_loss(_standardized(student.float()), _standardized(teacher.detach().float()))


def _on_teacher_cells(student: Tensor, student_cell: tuple[float, float], student_size: Sequence[int],
                      cells: Sequence[int], teacher_cell: tuple[float, float],
                      teacher_size: Sequence[int]) -> Tensor:
    """The student's map sampled (bilinearly) at the centre of each teacher cell.

    A plain resize of one cut map onto the other would stretch it whenever the two overshoot the
    image by different amounts (an image that is not a multiple of the padding, layers of other
    strides): the maps are aligned in image coordinates instead.
    """
    axes = []
    for axis in (0, 1):  # height, then width
        centres = (torch.arange(cells[axis], device=student.device, dtype=torch.float32) + 0.5) * teacher_cell[axis]
        in_student = centres * (student_size[axis] / teacher_size[axis]) / student_cell[axis]  # in student cells
        axes.append(2 * in_student / student.shape[-2 + axis] - 1)  # grid_sample's align_corners=False
    grid_y, grid_x = torch.meshgrid(axes[0], axes[1], indexing="ij")
    grid = torch.stack((grid_x, grid_y), dim=-1).expand(student.shape[0], -1, -1, -1)
    # In fp32: bf16 coordinates would be off by a fraction of a cell on wide maps.
    return F.grid_sample(student.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def _any_in_cells(valid: Tensor, cells: Sequence[int], teacher_cell: tuple[float, float],
                  teacher_size: Sequence[int]) -> Tensor:
    """``[N, h, w]``: whether any pixel of ``valid`` (``[N, H, W]``) lies under each teacher cell."""
    counts = valid.float()
    for axis in (0, 1):
        pixels = counts.shape[1 + axis]
        per_cell = teacher_cell[axis] * pixels / teacher_size[axis]  # mask pixels per cell
        j = torch.arange(cells[axis], dtype=torch.float64)  # on the CPU: MPS has no float64
        start = torch.floor(j * per_cell).long().clamp(max=pixels - 1)
        end = torch.maximum(torch.ceil((j + 1) * per_cell).long().clamp(max=pixels), start + 1)
        start, end = start.to(valid.device), end.to(valid.device)
        summed = F.pad(counts.cumsum(1 + axis), (0, 0, 1, 0) if axis == 0 else (1, 0))
        counts = summed.index_select(1 + axis, end) - summed.index_select(1 + axis, start)
    return counts > 0


class FeatureDistillation(nn.Module):
    """The trainable side of the feature term: one adapter per pair, and the term itself.

    Args:
        student, teacher: the two models (smp: ``encoder`` and ``decoder``); hooks are placed
            on them, nothing of theirs is registered here.
        pairs: (student layer, teacher layer) pairs, see the module docstring.
        kind: ``hint`` or ``cwd``.
        tau: the ``cwd`` temperature.
        probe_size: (height, width) of the image the channel counts are probed with.
        ignore_index: the mask's void value (``cwd`` leaves void positions out).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: Sequence[Sequence[Layer]], *,
                 kind: FeatureKind, tau: float = 1.0, probe_size: Sequence[int] = (64, 64),
                 ignore_index: int = 255) -> None:
        super().__init__()
        if kind not in ("hint", "cwd"):
            raise ValueError(f"feature kind must be 'hint' or 'cwd', got {kind!r}")
        student_layers, teacher_layers = [p[0] for p in pairs], [p[1] for p in pairs]
        student_channels = _probe_channels(student, student_layers, probe_size, "student")
        teacher_channels = _probe_channels(teacher, teacher_layers, probe_size, "teacher")
        self.adapters = nn.ModuleList(_Adapter(s, t) for s, t in zip(student_channels, teacher_channels))
        self.kind, self.tau, self.ignore_index = kind, tau, ignore_index
        # Plain attributes, not submodules: neither model belongs to this module's state.
        self._taps = (FeatureTap(student, student_layers, "student", training_only=True),
                      FeatureTap(teacher, teacher_layers, "teacher"))

    def forward(self, student_size: Sequence[int], teacher_size: Sequence[int], mask: Tensor | None) -> Tensor:
        """The mean over pairs of the term, from the features of the forwards just run.

        Args:
            student_size, teacher_size: the (unpadded) image sizes each model was given.
            mask: ``[N, H, W]`` pixels the term sees (``ignore_index`` elsewhere), for ``cwd``.
        """
        student_features = self._taps[0].take_with_cells(*student_size)
        teacher_features = self._taps[1].take_with_cells(*teacher_size)
        total = 0.0
        for adapter, (s, s_cell), (t, t_cell) in zip(self.adapters, student_features, teacher_features):
            s = adapter(s)  # under autocast where the step is
            # Maps of one shape may still lie on other grids (a teacher at teacher.input_size sees
            # the image stretched where the student's padding covers it): compare cells in image terms.
            same_grid = s.shape[-2:] == t.shape[-2:] and all(
                abs(s_cell[a] * teacher_size[a] / student_size[a] - t_cell[a]) <= 1e-6 * t_cell[a] for a in (0, 1))
            if not same_grid:
                s = _on_teacher_cells(s, s_cell, student_size, t.shape[-2:], t_cell, teacher_size)
            if self.kind == "hint":
                total = total + hint_loss(s, t)
            else:
                target = None
                if mask is not None:  # a position is void only when every pixel under it is
                    valid = _any_in_cells(mask != self.ignore_index, t.shape[-2:], t_cell, teacher_size)
                    target = torch.where(valid, 0, self.ignore_index)
                total = total + cwd_loss(s.float(), t.float(), temperature=self.tau, target=target,
                                         ignore_index=self.ignore_index)
        return total / len(self.adapters)

    def remove_hooks(self) -> None:
        """Detach the hooks from both models."""
        for tap in self._taps:
            tap.remove()
