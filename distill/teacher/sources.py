"""Teachers a user already has: how each source is loaded, and the class map onto the student's.

Each loader returns a module from (teacher-normalized) images to logits over the teacher's own
classes, and those classes' names when the source records them. :mod:`distill.teacher` wraps it
(normalization, channel order, input size, class map) behind the one ``teacher(batch)`` interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from distill.models import ModelError, build_model, read_state_dict


class _OutDict(nn.Module):
    """torchvision's segmentation models return ``{"out": logits, "aux": ...}``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["out"]


# Score outputs an ONNX teacher may have (read back as float32); anything else is labels.
_FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")


class OnnxTeacher(nn.Module):
    """An ONNX segmentation model (mmsegmentation, Paddle, TensorFlow exports...) run by
    onnxruntime on the CPU: ``[N, 3, H, W]`` float32 in, ``[N, C, h, w]`` logits out."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's own types for truncated or foreign files
            raise ModelError(f"teacher.path '{path}' cannot be loaded by onnxruntime: "
                             f"{str(error).strip().splitlines()[0] if str(error).strip() else error}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs[0].shape) != 4 or inputs[0].shape[1] not in (3, "3") or len(outputs[0].shape) != 4:
            raise ModelError(f"teacher.path '{path}': input {inputs[0].shape} and output "
                             f"{outputs[0].shape} are not [N, 3, H, W] and [N, C, h, w]")
        if outputs[0].type not in _FLOAT_TYPES or outputs[0].shape[1] in (1, "1"):
            raise ModelError(f"teacher.path '{path}' outputs {outputs[0].type} {outputs[0].shape}: not "
                             "per-class scores (a graph exported with its argmax, as mmdeploy's "
                             "with_argmax or PaddleSeg's default, gives labels): export the logits")
        self.input_name = inputs[0].name
        # The graph's own input type (a half-precision export takes float16): images are cast to
        # it, and its logits read back as float32.
        self.input_dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(inputs[0].type, np.float32)
        self.path = Path(path)
        # A graph exported for one size (torchvision's at 520x520...) takes that size only: it
        # is not padded to a stride (teacher.input_size must say the size), and a graph of a
        # fixed batch is run that many images at a time, the last run padded with copies.
        batch, _, height, width = inputs[0].shape
        self.fixed_size = (height, width) if isinstance(height, int) and isinstance(width, int) else None
        self.pads_itself = self.fixed_size is not None
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.classes = outputs[0].shape[1] if isinstance(outputs[0].shape[1], int) else None

    def parameter_count(self) -> int:
        """The graph's weights (initializers): onnxruntime's model has no torch parameters."""
        import onnx

        graph = onnx.load(str(self.path), load_external_data=False).graph
        return sum(int(np.prod(tensor.dims)) for tensor in graph.initializer)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.fixed_size is not None and tuple(images.shape[-2:]) != self.fixed_size:
            raise ModelError(f"teacher.path '{self.path}' takes {self.fixed_size[0]}x{self.fixed_size[1]} "
                             f"images only, not {images.shape[-2]}x{images.shape[-1]}: set "
                             f"teacher.input_size: [{self.fixed_size[0]}, {self.fixed_size[1]}]")
        array = images.detach().float().cpu().numpy().astype(self.input_dtype, copy=False)
        name = self.session.get_outputs()[0].name
        if self.fixed_batch is not None and len(array) != self.fixed_batch:
            runs, size = [], self.fixed_batch
            for start in range(0, len(array), size):
                chunk = array[start : start + size]
                short = size - len(chunk)  # the last run: filled with copies, their logits dropped
                padded = np.concatenate([chunk, np.repeat(chunk[-1:], short, axis=0)]) if short else chunk
                runs.append(self.session.run([name], {self.input_name: padded})[0][: len(chunk)])
            logits = np.concatenate(runs)
        else:
            (logits,) = self.session.run([name], {self.input_name: array})[:1]
        return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)).to(images.device)


class _HFLogits(nn.Module):
    """A ``transformers`` semantic-segmentation model: its ``.logits`` (SegFormer's at 1/4)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits


class MaskQueryTeacher(nn.Module):
    """A mask-query model (Mask2Former, MaskFormer) as per-pixel class scores.

    ``p(k | pixel) = sum_q softmax(class_logits_q)[k] * sigmoid(mask_logits_q(pixel))`` over the
    K real classes (the "no object" class dropped), renormalized at every pixel; returned as
    ``log p``, so the KD losses' ``softmax(z / T)`` gives ``p^(1/T)`` renormalized: T sharpens
    or flattens this distribution, as it does a per-pixel teacher's softmax.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=images)
        # In fp32 whatever autocast says: in fp16 the einsum's small probabilities and the clamps
        # below flush to 0, and log(0) = -inf.
        with torch.autocast(images.device.type, enabled=False):
            classes = torch.softmax(out.class_queries_logits.float(), dim=-1)[..., :-1]  # [B, Q, K]
            masks = torch.sigmoid(out.masks_queries_logits.float())                     # [B, Q, h, w]
            probs = torch.einsum("bqk,bqhw->bkhw", classes, masks)
            probs = probs / probs.sum(1, keepdim=True).clamp_min(1e-30)
            return torch.log(probs.clamp_min(1e-12))


def _transformers_teacher(path: str) -> tuple[nn.Module, list[str], tuple | None]:
    try:
        import transformers
    except ImportError:
        raise ModelError("teacher.source 'transformers' needs the transformers package: "
                         "pip install 'distill[transformers]'") from None
    from distill.stage_weights import hub_folder

    folder = Path(path) if Path(path).is_dir() else hub_folder(path)
    config = transformers.AutoConfig.from_pretrained(str(folder))
    names = [config.id2label[k] for k in sorted(config.id2label)] if getattr(config, "id2label", None) else []
    archs = list(getattr(config, "architectures", None) or [])
    if config.model_type == "oneformer":  # its forward needs task tokens beside the images
        raise ModelError(f"teacher.path '{path}' is a OneFormer model, which distill does not run (its "
                         "forward takes a task prompt): use a Mask2Former, MaskFormer or semantic "
                         "segmentation model")
    if any("UniversalSegmentation" in a for a in archs) or config.model_type in ("mask2former", "maskformer"):
        model: nn.Module = MaskQueryTeacher(
            transformers.AutoModelForUniversalSegmentation.from_pretrained(str(folder)).float())
    elif any("SemanticSegmentation" in a for a in archs):
        # float32 whatever dtype the upload was saved in (transformers 5 keeps it; mixed
        # precision is the recipe's autocast).
        model = _HFLogits(transformers.AutoModelForSemanticSegmentation.from_pretrained(str(folder)).float())
    else:
        raise ModelError(f"teacher.path '{path}' holds a {config.model_type} model for another task "
                         f"({', '.join(archs) or 'no architectures listed'}): distill needs a "
                         "semantic (per-pixel) or universal (mask-query) segmentation model")
    expects = None
    if (folder / "preprocessor_config.json").is_file():
        # The processor itself says what it does: some keep image_mean/std in their config but
        # never normalise (MobileViT's, which also hands the model BGR).
        processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if not getattr(processor, "do_normalize", False):
            mean, std = 0.0, 1.0  # the rescaled pixels as they are
        # The model sees (pixel * rescale - mean) / std for 0-255 pixels; distill's images are in
        # [0, 1], so that is (image - mean / g) / (std / g) with g = 255 * rescale: 1 for the
        # usual rescale_factor 1/255, 255 for a processor that normalizes 0-255 pixels itself.
        gain = 255.0 * (float(getattr(processor, "rescale_factor", 1 / 255))
                        if getattr(processor, "do_rescale", True) else 1.0)
        expects = SourceInput(_per_channel(mean, gain), _per_channel(std, gain),
                              bool(getattr(processor, "do_flip_channel_order", False)))
    return model, names, expects


def _per_channel(value: Any, gain: float) -> tuple[float, ...] | None:
    """A processor's mean or std (one number or one per channel) divided by ``gain``, per channel."""
    if value is None:
        return None
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    return tuple(v / gain for v in values)


class SourceInput(NamedTuple):
    """The input a teacher's own files say it takes (a transformers image processor)."""

    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    bgr: bool  # the processor hands the model BGR


def load_source(spec: Any, num_classes: int, weights: Path | None
                ) -> tuple[nn.Module, list[str] | None, SourceInput | None]:
    """The teacher of ``spec`` (a ``TeacherConfig``), its class names and the input it takes
    (normalization, channel order) where the source records them.

    ``num_classes`` is the teacher's own class count: ``len(teacher.class_names)`` when given,
    else the dataset's.
    """
    source = spec.source
    if source == "transformers":
        return _transformers_teacher(str(spec.path))
    if source in ("smp", "factory"):
        return build_model(spec.model_copy(update={"checkpoint": weights}), num_classes), None, None
    if source == "torchvision":
        import torchvision

        state = read_state_dict(str(weights))
        aux = any(k.startswith("aux_classifier.") for k in state)
        try:
            model = torchvision.models.get_model(spec.arch, weights=None, weights_backbone=None,
                                                 num_classes=num_classes, aux_loss=aux or None)
        except ValueError as error:
            names = ", ".join(torchvision.models.list_models(torchvision.models.segmentation))
            raise ModelError(f"teacher.arch '{spec.arch}' is not a torchvision segmentation "
                             f"builder ({names}): {error}") from None
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved under DDP
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # tensors of other shapes: another class count
            first = str(error).strip().splitlines()
            raise ModelError(f"teacher.checkpoint '{weights}' does not fit torchvision's {spec.arch} with "
                             f"{num_classes} classes ({' '.join(first[1:3]).strip()[:300]}): set "
                             "teacher.class_names to the teacher's own classes") from None
        if missing or unexpected:
            raise ModelError(f"teacher.checkpoint '{weights}' does not fit torchvision's "
                             f"{spec.arch} with {num_classes} classes: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return _OutDict(model), None, None
    if source == "smp_hub":
        import segmentation_models_pytorch as smp

        from distill.stage_weights import hub_folder

        path = Path(str(spec.path))
        # Every weight is in the folder: an `encoder_weights: imagenet` its config recorded at
        # creation must not send smp to the network for weights it then overwrites.
        folder = path if path.is_dir() else hub_folder(str(spec.path))
        return smp.from_pretrained(str(folder), encoder_weights=None), None, None
    if source == "onnx":
        return OnnxTeacher(Path(str(spec.path))), None, None
    raise ModelError(f"teacher.source '{source}' is not supported")


def class_map_matrix(class_map: dict[Any, Any], teacher_names: list[str], student_names: list[str]
                     ) -> torch.Tensor:
    """``[K_teacher, K_student]`` 0/1 matrix of ``class_map`` (keys and values names or ids).

    Raises:
        ModelError: a class the teacher or the student does not have (the valid ones listed), or
            a student class no teacher class maps to: its target probability would be 0, which
            teaches the student never to predict it.
    """
    matrix = torch.zeros(len(teacher_names), len(student_names))

    def index(key: Any, names: list[str], whose: str) -> int:
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit() and key not in names):
            k = int(key)
            if not 0 <= k < len(names):
                raise ModelError(f"teacher.class_map: {whose} class {k} is out of range 0..{len(names) - 1}")
            return k
        if key not in names:
            raise ModelError(f"teacher.class_map: the {whose} has no class '{key}'; its classes: "
                             f"{', '.join(names)}")
        return names.index(key)

    row_keys: dict[int, Any] = {}
    for key, value in class_map.items():
        row = index(key, teacher_names, "teacher")
        if row in row_keys:  # its probability would be counted twice, in two student classes
            raise ModelError(f"teacher.class_map maps the teacher's class '{teacher_names[row]}' twice "
                             f"(keys {row_keys[row]!r} and {key!r}): a teacher class goes to one student class")
        row_keys[row] = key
        matrix[row, index(value, student_names, "student")] = 1.0
    unmapped = [student_names[s] for s in range(len(student_names)) if not bool(matrix[:, s].any())]
    if unmapped:
        raise ModelError(f"teacher.class_map maps no teacher class onto the student's "
                         f"{', '.join(unmapped)}: the targets would say these never occur. Map a "
                         "teacher class to each, or train without that class")
    return matrix


def apply_class_map(logits: torch.Tensor, matrix: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher logits -> student-class logits whose softmax at ``temperature`` is the mapped,
    renormalized teacher distribution: ``T * log(normalize(M^T softmax(z / T)))``."""
    with torch.autocast(logits.device.type, enabled=False):  # fp16 would flush small probabilities to 0
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=1)
        mapped = torch.einsum("bkhw,ks->bshw", probs, matrix.to(probs.device, probs.dtype))
        mapped = mapped / mapped.sum(1, keepdim=True).clamp_min(1e-30)
        return temperature * torch.log(mapped.clamp_min(1e-12))
