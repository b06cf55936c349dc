"""INT8 ONNX students: static quantization with calibration, and their parity with FP32.

``distill export format=onnx_int8`` writes ``student_int8.onnx`` beside ``student.onnx``:

1. the FP32 graph is pre-processed (``onnxruntime.quantization.quant_pre_process``: shape
   inference and graph optimization, which folds what quantization would otherwise wrap), and
   spatial means rewritten as the pooling onnxruntime has an integer kernel for;
2. ``quantize_static`` in the QDQ format (the one onnxruntime's CPU kernels are optimized for),
   weights int8 per output channel, activations uint8 with ranges calibrated on
   ``export.calibration_images`` training images through the evaluation transform (the
   inputs the student meets in use, not its augmentations);
3. both graphs are scored on the validation split (:func:`score_fp32_and_int8`): mIoU of each and
   the INT8 argmax's agreement with the FP32 one. More than ``export.int8_max_miou_drop``
   points lost fails the export (its caller keeps the previous one).

We use onnxruntime's quantizer rather than PyTorch's (``torch.ao``): the export is the ONNX file,
and quantizing that file is what the deployed runtime executes, with no second export of a
PyTorch-quantized graph whose operators ONNX may not have.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.config import Recipe
from distill.data import build_dataset, build_loader, dataset_info
from distill.evaluation import evaluate_model

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
SHAPE_OPS = ("Shape", "Size")  # read a tensor's shape only: their outputs are integers


class QuantizationError(ValueError):
    """The INT8 model cannot be written or loses too much accuracy; the message says why."""


def ort_session(path: Path, threads: int | None = None):
    """A CPU onnxruntime session; ``threads`` intra-op threads (default: torch's count)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxSegmenter(nn.Module):
    """An exported ONNX student as a module (images -> logits), so the evaluation loop, the
    comparison's latency and its example images treat it like the eager student.

    The graph pads to its stride and crops back itself (``pads_itself``); tensors go to the CPU
    for onnxruntime and the logits come back on the images' device.
    """

    pads_itself = True

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = ort_session(self.path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().float().cpu().numpy()
        logits = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(logits).to(images.device)


class _Calibration:
    """onnxruntime's ``CalibrationDataReader`` protocol over an iterable of [1, 3, H, W] arrays."""

    def __init__(self, images: Iterable[np.ndarray], input_name: str) -> None:
        self._images: Iterator[np.ndarray] = iter(images)
        self._input_name = input_name
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._images, None)
        if image is None:
            return None
        self.count += 1
        return {self._input_name: np.ascontiguousarray(image, np.float32)}


def quantize_onnx(fp32_path: Path, int8_path: Path, calibration: Iterable[np.ndarray], *,
                  method: str = "percentile", per_channel: bool = True) -> dict[str, Any]:
    """Write ``int8_path``: the QDQ INT8 version of ``fp32_path``, calibrated on ``calibration``.

    Args:
        fp32_path: the FP32 ONNX student (input ``image`` [N, 3, H, W]; dynamic sizes, or a
            fixed H and W with ``export.fixed_size``).
        int8_path: where the INT8 model goes (same input and output names and dynamic axes).
        calibration: images [1, 3, H, W] float32, normalized as the model expects (of the
            graph's H and W when they are fixed).
        method: activation range calibration: ``minmax``, ``entropy`` or ``percentile``.
        per_channel: one weight scale per output channel (far more accurate for depthwise and
            narrow convolutions, such as a MobileNet's, at little cost on CPU).

    Returns:
        What was quantized: the method, the operator types left in float (with counts), and the
        sizes of both files in bytes.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise QuantizationError(f"calibration method '{method}' unknown; choose from {list(CALIBRATION_METHODS)}")
    prepared = int8_path.with_name(f".{int8_path.stem}-prepared.onnx")
    try:
        # The pad-to-32 in the graph has data-dependent shapes: symbolic inference must merge
        # the unknown dimensions (auto_merge) instead of giving up; it warns about each merge,
        # which says nothing to a user.
        shape_logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
        level = shape_logger.level
        shape_logger.setLevel(logging.ERROR)
        try:
            quant_pre_process(str(fp32_path), str(prepared), auto_merge=True, guess_output_rank=True)
        finally:
            shape_logger.setLevel(level)
        pool_spatial_means(prepared)
        shape_nodes = shape_arithmetic_nodes(prepared)
        input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
        reader = _Calibration(calibration, input_name)
        # onnxruntime's histogram calibrators print their progress; distill reports its own.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(prepared), str(int8_path), reader,
                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                # uint8 activations and int8 weights: onnxruntime's x86 kernels (VNNI or not) and
                # its ARM kernels all take this pair; no reduce_range, which costs accuracy.
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                  "percentile": CalibrationMethod.Percentile}[method],
                # Arithmetic on the input's sizes (TF-"same" padding amounts) is no activation:
                # quantized, it computes wrong paddings (see shape_arithmetic_nodes).
                nodes_to_exclude=shape_nodes,
            )
    finally:
        prepared.unlink(missing_ok=True)
        for side in int8_path.parent.glob("augmented_model*.onnx"):  # the calibrator's own copy
            side.unlink(missing_ok=True)
    if reader.count == 0:
        raise QuantizationError("no calibration images: INT8 ranges cannot be calibrated")
    _keep_interface(fp32_path, int8_path)
    return {"calibration_method": method, "calibration_images": reader.count, "per_channel": per_channel,
            "float_ops": float_operators(int8_path),
            "fp32_bytes": fp32_path.stat().st_size, "int8_bytes": int8_path.stat().st_size}


def pool_spatial_means(path: Path) -> int:
    """Rewrite each ReduceMean over the two spatial axes of a 4-D tensor (dimensions kept) as
    GlobalAveragePool, in place; returns how many were rewritten.

    The two compute the same thing, but onnxruntime has an integer kernel for the pooling
    (QLinearGlobalAveragePool) and none for the reduction, which then runs dequantized in float:
    a MobileNetV3's squeeze-and-excitation blocks pool this way, one per block.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = onnx.shape_inference.infer_shapes(model).graph  # the ranks; the rewrite edits `model`
    ranks = {value.name: len(value.type.tensor_type.shape.dim)
             for value in (*graph.value_info, *graph.input, *graph.output)
             if value.type.tensor_type.HasField("shape")}
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    rewritten, freed = 0, set()
    for node in graph.node:
        if node.op_type != "ReduceMean" or ranks.get(node.input[0]) != 4:
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axes = attributes.get("axes")
        if axes is None and len(node.input) > 1:  # opset 18: the axes are an input
            axes = constants.get(node.input[1])
        if axes is None or attributes.get("keepdims", 1) != 1 or sorted(int(a) % 4 for a in axes) != [2, 3]:
            continue
        freed.update(node.input[1:])
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
        rewritten += 1
    still_read = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name in freed - still_read]:
        graph.initializer.remove(init)
    if rewritten:
        onnx.save(model, str(path))
    return rewritten


def shape_arithmetic_nodes(path: Path) -> list[str]:
    """Names of the nodes that compute on tensor sizes only, which quantization must leave alone;
    nodes without a name in ``path`` are named (in place) so that they can be listed.

    A timm encoder with TF-"same" padding (``tu-tf_efficientnet_lite0``) computes each padding
    from its input's height and width at run time, in float (Cast, Div, Ceil, Sub, Mul, Add,
    Clip, Unsqueeze, Concat, then a Cast to int64 for the Pad). ``quantize_static`` quantizes
    every float Add, Mul, Concat... it meets, these included, with ranges calibrated on the
    calibration images' sizes: in uint8 the sizes are rounded to steps of about a side / 255 and
    clipped to the calibrated range, so at any other size (evaluation at 360x480, padded to
    384x480, after calibration at 240x320) the paddings come out wrong, the feature maps a row
    short, and the decoder's concatenation of the upsampled
    ASPP output with the stride-4 skip fails in onnxruntime ("Non concat axis dimensions must
    match"). These nodes read no activation: in float they cost nothing and compute exactly.

    A node is listed when none of its inputs depends on the graph's inputs' values and at least
    one depends on a Shape or Size output; the Pad, Resize or Slice that reads such a tensor
    beside an activation is quantized as before.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    data = {value.name for value in graph.input if value.name not in initializers}
    sizes: set[str] = set()
    names = {node.name for node in graph.node if node.name}
    listed, renamed = [], False
    for index, node in enumerate(graph.node):  # topological order
        inputs = [name for name in node.input if name]
        if node.op_type in SHAPE_OPS:
            sizes.update(node.output)
        elif any(name in data for name in inputs):
            data.update(node.output)
        elif any(name in sizes for name in inputs):
            sizes.update(node.output)
            if not node.name:
                node.name = f"{node.op_type}_shape_arithmetic_{index}"
                while node.name in names:
                    node.name += "_"
                names.add(node.name)
                renamed = True
            listed.append(node.name)
    if renamed:
        onnx.save(model, str(path))
    return listed


def _keep_interface(fp32_path: Path, int8_path: Path) -> None:
    """Give the INT8 graph's inputs and outputs the FP32 graph's types and dimension names.

    Shape inference renames the dynamic output axes after internal tensors ('Pad_51_o0__d2');
    a user's code written against ``student.onnx`` should read the INT8 file the same way.
    """
    import onnx

    fp32 = onnx.load(str(fp32_path), load_external_data=False).graph
    model = onnx.load(str(int8_path))
    for ours, theirs in ((model.graph.input, fp32.input), (model.graph.output, fp32.output)):
        by_name = {value.name: value for value in theirs}
        for value in ours:
            if value.name in by_name:
                value.type.CopyFrom(by_name[value.name].type)
    onnx.save(model, str(int8_path))


def float_operators(path: Path) -> dict[str, int]:
    """Operator types that onnxruntime's CPU provider runs in float in an INT8 graph, with counts.

    A QDQ graph wraps every operator it quantized in DequantizeLinear/QuantizeLinear; at load
    onnxruntime fuses the ones it has integer kernels for (QLinearConv, QLinearAdd...). What is
    left reads dequantized float activations: a MobileNet's hard-sigmoid, say, which costs a
    dequantize, a float pass and a quantize. So the count comes from the graph onnxruntime
    actually runs (its extended optimizations, saved to a temporary file), not from the QDQ
    file. Shape arithmetic (the pad-to-32's Shape, Mod, Concat...) reads no activation and is
    not counted.
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    float_tensors = {value.name for value in graph.input}
    # A DequantizeLinear of a constant (a shared 0 that Pad and Clip read) is no activation: the
    # shape arithmetic that reads it is not counted.
    constants = {init.name for init in graph.initializer}
    float_tensors |= {node.output[0] for node in graph.node
                      if node.op_type == "DequantizeLinear" and node.input[0] not in constants}
    counts: collections.Counter[str] = collections.Counter()
    for node in graph.node:  # topological order: float tensors are known before their readers
        if node.op_type in (*QDQ_OPS, *SHAPE_OPS) or not any(name in float_tensors for name in node.input):
            continue
        counts[node.op_type] += 1
        float_tensors.update(node.output)
    return dict(counts.most_common())


@torch.no_grad()
def score_fp32_and_int8(fp32: nn.Module, int8: nn.Module, loader, *, num_classes: int,
                        ignore_index: int) -> dict[str, Any]:
    """mIoU of both models on ``loader`` and the INT8 argmax's agreement with the FP32 one.

    ``loader`` must keep its order (an evaluation loader does): the FP32 pass keeps each
    batch's argmax, and the INT8 pass compares its own with them in the same order.
    """
    fp32_labels: list[torch.Tensor] = []
    agree = pixels = 0

    class _Recorded(nn.Module):
        pads_itself = True

        def __init__(self, model: nn.Module, record: bool) -> None:
            super().__init__()
            self.model, self.record = model, record

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            nonlocal agree, pixels
            logits = self.model(images)
            labels = logits.argmax(1).to(torch.uint8)
            if self.record:
                fp32_labels.append(labels)
            else:
                reference = fp32_labels.pop(0)
                agree += int((labels == reference).sum())
                pixels += reference.numel()
            return logits

    scores = {name: evaluate_model(_Recorded(model, name == "fp32"), loader, None, num_classes=num_classes,
                                   ignore_index=ignore_index, progress_label=f"score {name} ONNX")
              for name, model in (("fp32", fp32), ("int8", int8))}
    return {"fp32_miou": scores["fp32"].miou, "int8_miou": scores["int8"].miou,
            "miou_drop": scores["fp32"].miou - scores["int8"].miou,
            "argmax_agreement": agree / max(pixels, 1)}


def calibration_images(recipe: Recipe, count: int) -> Iterator[np.ndarray]:
    """``count`` training images spread over the split, through the evaluation transform, all
    at the first one's size: onnxruntime's histogram calibrators stack every image's activations
    and fail on images of several sizes (no ``data.resize``); a resize keeps the value ranges that
    calibration measures."""
    dataset = build_dataset(recipe.data, recipe.data.train_split, train=False, seed=recipe.train.seed)
    size = None
    for index in sorted({int(i) for i in np.linspace(0, len(dataset) - 1, min(count, len(dataset)))}):
        image = dataset[index]["image"][None]
        size = size or tuple(image.shape[-2:])
        if tuple(image.shape[-2:]) != size:
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        yield image.numpy()


def export_int8(recipe: Recipe, fp32_path: Path, int8_path: Path) -> dict[str, Any]:
    """Quantize the exported FP32 student, score both on the validation split, check the drop.

    Returns the ``int8`` part of ``parity.json``: how it was quantized, both mIoU figures,
    the argmax agreement, and the operators left in float.

    Raises:
        QuantizationError: the INT8 model loses more than ``export.int8_max_miou_drop`` points.
    """
    settings = recipe.export
    count = settings.calibration_images
    quantized = quantize_onnx(fp32_path, int8_path, calibration_images(recipe, count),
                              method=settings.calibration_method)
    info = dataset_info(recipe.data)
    split = recipe.data.val_split
    loader = build_loader(recipe.data, split, train=False, seed=recipe.train.seed,
                          label_resolution=recipe.eval.resolution == "label")
    try:
        scores = score_fp32_and_int8(OnnxSegmenter(fp32_path), OnnxSegmenter(int8_path), loader,
                                     num_classes=info.num_classes, ignore_index=info.ignore_index)
    except Exception as error:  # onnxruntime's own Fail/RuntimeException: the graph, not the input
        if "onnxruntime" not in type(error).__module__:
            raise
        first = str(error).splitlines()[0][:300]
        raise QuantizationError(
            f"onnxruntime cannot run the INT8 graph of this student ({first}); the FP32 export is "
            "unaffected: export without onnx_int8 (format=onnx,safetensors)") from None
    report = {**quantized, "calibration_split": recipe.data.train_split, "split": split,
              "resolution": recipe.eval.resolution, **scores, "max_miou_drop": settings.int8_max_miou_drop,
              "size_ratio": quantized["int8_bytes"] / quantized["fp32_bytes"]}
    drop = 100 * scores["miou_drop"]
    if drop > settings.int8_max_miou_drop:
        raise QuantizationError(
            f"the INT8 student scores {100 * scores['int8_miou']:.2f} mIoU on {split} against the FP32 "
            f"student's {100 * scores['fp32_miou']:.2f}: {drop:.2f} points lost, more than "
            f"export.int8_max_miou_drop={settings.int8_max_miou_drop:g} (calibration "
            f"'{settings.calibration_method}' on {count} images; try another export.calibration_method "
            "(minmax, entropy, percentile) or more export.calibration_images)"
        )
    return report
