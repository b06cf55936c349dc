"""Models: one factory, ``build_model``, over segmentation-models-pytorch and timm encoders.

``arch`` is any smp architecture (``Unet``, ``FPN``, ``DeepLabV3Plus``, ``Segformer``, ...) and
``encoder`` any smp encoder name or a timm model as ``tu-<name>``. ``factory:
package.module:function`` is the escape hatch for models from elsewhere; the function is called as
``function(num_classes=N, **factory_kwargs)`` and must map images [B,3,H,W] to logits [B,N,H,W].
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import math
import os
import socket
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from distill.models import pretrained
from distill.models.weights import ModelError, load_weights, read_state_dict  # noqa: F401  (re-exported)
from distill.config import ModelConfig
from distill.progress import console

HUB_HOST = "huggingface.co"


def _smp():
    import segmentation_models_pytorch as smp  # imported late: heavy, and after the compat step

    return smp


def _suggest(name: str, choices: list[str], n: int = 3) -> str:
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    return f" Close names: {', '.join(close)}." if close else ""


def _check_names(spec: ModelConfig) -> None:
    smp = _smp()
    from segmentation_models_pytorch.encoders import get_encoder_names

    archs = [a for a in smp.__all__ if a[0].isupper()]
    if spec.arch not in archs:
        raise ModelError(
            f"unknown architecture '{spec.arch}'.{_suggest(spec.arch, archs)} "
            f"Available: {', '.join(archs)}."
        )
    if spec.encoder.startswith("tu-"):
        import timm

        name = spec.encoder[3:]
        if not timm.is_model(name.split(".")[0]):
            raise ModelError(
                f"unknown timm encoder '{spec.encoder}'."
                + _suggest(name, timm.list_models()).replace(", ", ", tu-").replace(": ", ": tu-")
            )
    elif spec.encoder not in get_encoder_names():
        hint = _suggest(spec.encoder, get_encoder_names())
        timm_hint = _suggest(spec.encoder, _timm_names()).replace(", ", ", tu-").replace(": ", ": tu-")
        raise ModelError(f"unknown encoder '{spec.encoder}'.{hint or timm_hint}")


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """True when ``host:443`` accepts a TCP connection within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_hub() -> Iterator[None]:
    """Make huggingface_hub use its local cache only, so a missing network fails at once.

    Without this, smp/timm retry each download five times with back-off (about 25-45 s per file
    measured here) before failing.
    """
    import huggingface_hub.constants as hub_constants

    saved = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved


def build_model(spec: ModelConfig, num_classes: int) -> nn.Module:
    """Build the model a recipe describes, with ``num_classes`` output channels.

    Loads ``spec.checkpoint`` when given. Raises :class:`ModelError` for unknown names, weights
    that cannot be downloaded, and checkpoints that do not fit.
    """
    if spec.factory is not None:
        model = _from_factory(spec, num_classes)
    else:
        _check_names(spec)
        # A checkpoint replaces every weight: the encoder's pretrained ones are not fetched.
        hub = not pretrained.is_local(spec.encoder_weights) and spec.checkpoint is None
        weights = spec.encoder_weights if hub else None
        if weights is not None and spec.encoder.startswith("tu-"):
            weights = True  # smp's timm bridge takes a bool; the tag is part of the timm name
        offline = weights is not None and (
            os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable()
        )
        context = _offline_hub() if offline else contextlib.nullcontext()
        try:
            with context:
                model = _smp().create_model(
                    spec.arch,
                    encoder_name=spec.encoder,
                    encoder_weights=weights,
                    classes=num_classes,
                    **spec.arch_kwargs,
                )
        except Exception as error:  # smp/timm/hub raise many types; all mean "not built"
            if weights is None:
                raise ModelError(f"could not build {spec.arch}/{spec.encoder}: {error}") from error
            reason = "no network (the hub is unreachable)" if offline else str(error)
            raise ModelError(
                f"pretrained weights '{spec.encoder_weights}' for encoder '{spec.encoder}' could "
                f"not be loaded: {reason}. Without a network, give a local weights file or an "
                f"installed weight package (README, Pretrained encoders), set encoder_weights: "
                f"null to train from scratch, or give a checkpoint."
            ) from error
        if weights is None and spec.encoder_weights is not None and spec.checkpoint is None:
            try:
                count = pretrained.load_encoder_weights(model, spec.encoder, spec.encoder_weights)
            except pretrained.PretrainedWeightsError as error:
                raise ModelError(str(error)) from None
            console.print(f"encoder {spec.encoder}: {count} pretrained tensors from {spec.encoder_weights}")
    if spec.checkpoint is not None:
        load_weights(model, spec.checkpoint)
    return model


def _from_factory(spec: ModelConfig, num_classes: int) -> nn.Module:
    module_name, _, function_name = str(spec.factory).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelError(f"factory '{spec.factory}': cannot import '{module_name}': {error}") from None
    function = getattr(module, function_name, None)
    if function is None or not callable(function):
        raise ModelError(f"factory '{spec.factory}': '{module_name}' has no function '{function_name}'")
    try:
        model = function(num_classes=num_classes, **spec.factory_kwargs)
    except TypeError as error:  # a function that takes other arguments (`os:getcwd`)
        raise ModelError(f"factory '{spec.factory}' cannot be called as "
                         f"{function_name}(num_classes={num_classes}, **factory_kwargs): {error}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory '{spec.factory}' returned {type(model).__name__}, not an nn.Module")
    return model


def model_identity(spec: ModelConfig, exclude: set[str] | None = None) -> dict[str, Any]:
    """``spec`` as a fingerprint sees it: local encoder weights by their sha256, so that changed
    weights behind the same path or package redo the stage."""
    fields = spec.model_dump(mode="json", exclude=exclude)
    if "encoder_weights" in fields and getattr(spec, "checkpoint", None) is not None:
        fields["encoder_weights"] = None  # the checkpoint replaces them: never read (build_model)
    elif "encoder_weights" in fields:
        try:
            fields["encoder_weights"] = pretrained.weights_identity(spec.encoder_weights)
        except pretrained.PretrainedWeightsError as error:
            raise ModelError(str(error)) from None
    return fields


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def pad_multiple(model: nn.Module) -> int:
    """The multiple a model's input sides are padded to: 32, or a multiple of 32 that its smp
    encoder's ``output_stride`` (what smp's own ``check_input_shape`` asks) divides.

    Not less than 32 even for a dilated encoder (DeepLabV3+'s reports 16), so that one image is
    padded, and so scored, alike whatever the encoder's dilation.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module  # prepared for several processes: the wrapper has no encoder
    stride = getattr(getattr(model, "encoder", None), "output_stride", None)
    # The least common multiple: a patch-14 ViT needs sides divisible by 14, 32 by itself does not.
    return math.lcm(32, stride) if isinstance(stride, int) and stride > 0 else 32


def pad_to_multiple(images: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    """``images`` padded bottom/right (replicated edge) to sides divisible by ``multiple``, and the
    rows and columns added. Written with the input's own sizes, so ONNX export traces it."""
    height, width = images.shape[-2], images.shape[-1]
    pad_h = (multiple - height % multiple) % multiple
    pad_w = (multiple - width % multiple) % multiple
    return torch.nn.functional.pad(images, (0, pad_w, 0, pad_h), mode="replicate"), pad_h, pad_w


def forward_padded(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on images padded to the multiple it needs (:func:`pad_multiple`).

    smp encoders need sides divisible by their output stride (CamVid's 360 rows are not); the
    logits are cropped back to the input's area, so callers see the shape they passed (or, for a
    model that predicts at 1/4 like SegFormer, the part of its smaller map that covers the
    input). A module with ``pads_itself = True`` (a wrapped teacher) is called as it is.

    When the input ends inside an output pixel (a map at 1/4 of 50 rows), the whole map is
    upsampled to the padded input first and then cut, so the logits come at the input's size:
    a crop to whole output pixels would be stretched onto the input by whoever resizes it.
    """
    height, width = images.shape[-2:]
    logits, (padded_h, padded_w) = run_padded(model, images)
    if (padded_h, padded_w) == (height, width):
        return logits
    out_h, out_w = logits.shape[-2:]
    if (height * out_h) % padded_h or (width * out_w) % padded_w:
        logits = torch.nn.functional.interpolate(logits, size=(padded_h, padded_w), mode="bilinear",
                                                 align_corners=False)
        return logits[..., :height, :width]
    return logits[..., : height * out_h // padded_h, : width * out_w // padded_w]


def run_padded(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """``model``'s whole map for ``images`` padded to the multiple it needs, uncropped, and the
    (height, width) it ran at (the images' own for a module with ``pads_itself``)."""
    height, width = images.shape[-2:]
    multiple = pad_multiple(model)
    if (height % multiple == 0 and width % multiple == 0) or getattr(model, "pads_itself", False):
        return _logits_of(model, model(images)), (height, width)
    padded, _, _ = pad_to_multiple(images, multiple)
    return _logits_of(model, model(padded)), (padded.shape[-2], padded.shape[-1])


def _logits_of(model: nn.Module, output: object) -> torch.Tensor:
    """``output`` if it is the logits tensor distill expects; else a ModelError naming the model."""
    if isinstance(output, torch.Tensor) and output.ndim == 4:
        return output
    got = f"a {output.ndim}-d tensor" if isinstance(output, torch.Tensor) else f"a {type(output).__name__}"
    raise ModelError(f"{type(model).__name__} returned {got}, not logits [N, C, H, W]: wrap it so that it "
                     "returns them (torchvision's models: output['out']; transformers': output.logits)")


def recorded_classes(model: nn.Module) -> int | None:
    """The class count a model records: an ONNX graph's static output channels, an smp model's
    head; None where only running it would tell."""
    head = getattr(model, "segmentation_head", None)
    first = head[0] if isinstance(head, nn.Sequential) and len(head) else None
    if isinstance(first, nn.Conv2d):
        return first.out_channels
    return getattr(model, "classes", None)


def check_class_count(model: nn.Module, num_classes: int, what: str,
                      size: tuple[int, int] | None = None) -> None:
    """Refuse a model of the caller's whose logits have another class count than the dataset's
    (it would train or be scored without complaint, or fail deep in the loss): the count it
    records, else one forward pass of one image of ``size`` (default 64x64), in eval mode and
    without gradients, the model's mode restored. A model that cannot run it is left to the run,
    which says why."""
    predicts = recorded_classes(model)
    if predicts is not None:
        if predicts != num_classes:
            raise ModelError(f"{what} predicts {predicts} classes, the dataset has {num_classes} "
                             "(data.class_names, or data.synthetic.num_classes)")
        return
    model = getattr(model, "_orig_mod", model)  # compiled: its module, which a probe does not compile
    training = model.training
    try:
        with torch.no_grad():
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            logits = forward_padded(model.eval(), torch.zeros(1, 3, *(size or (64, 64)), device=device))
    except ModelError:
        raise  # its output is not logits: said by name
    except Exception:  # noqa: BLE001  (a model of one input size, a device it cannot run on...)
        return
    finally:
        model.train(training)
    if logits.shape[1] != num_classes:
        raise ModelError(f"{what} predicts {logits.shape[1]} classes, the dataset has {num_classes} "
                         "(data.class_names, or data.synthetic.num_classes)")


Stage = Literal["teacher", "baseline", "student"]
STAGES: tuple[Stage, ...] = ("teacher", "baseline", "student")


def stage_model(recipe: Any, stage: Stage) -> ModelConfig:
    """The model a stage trains."""
    if stage == "teacher":
        if recipe.teacher is None:
            raise ModelError("stage 'teacher' needs a `teacher` section in the recipe")
        return recipe.teacher
    return recipe.student_model
