"""The student's export: the ONNX graph, the smp folder, ``distill.json`` and the parity check
(the folder's contents: :mod:`distill.export`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

from distill._io import atomic_write_text, file_digest, swap_in_folder
from distill.config import ModelConfig, Recipe, recipe_to_yaml
from distill.data import DatasetInfo, build_dataset, dataset_info
from distill.models import ModelError, build_model, forward_padded, pad_multiple, pad_to_multiple  # noqa: F401
from distill.export.predict import CONFIG_NAME, load_export_config
from distill.progress import console
from distill.export.quantize import QuantizationError, export_int8
from distill.run_folder import ensure_writable_folder, exclusive_folder, export_dir
from distill.stage_weights import check_normalization, trained_weights

FORMATS = ("onnx", "safetensors", "onnx_int8")
FILES = {"onnx": "student.onnx", "safetensors": "student.safetensors",  # safetensors: factory students
         "onnx_int8": "student_int8.onnx"}
SMP_FILES = ("config.json", "model.safetensors", "README.md")  # smp's save_pretrained


class ExportError(ValueError):
    """The export cannot be written or does not match the eager student; the message says why."""


class PaddedSegmenter(nn.Module):
    """``forward_padded`` as a module, so that the pad and the crop are traced into the graph
    (always padded, by 0 rows where the sides divide already: the graph serves every size).
    With ``fixed_size`` (a graph for one size) sides that divide already are not padded at all.

    A model whose map is coarser than its input (SegFormer without its upsampling) has its map
    resized to the padded input before the crop: a crop of the coarse map by the input's rows
    would keep the whole map, padding included. The graph's logits are then at the input's size.
    """

    def __init__(self, model: nn.Module, fixed_size: bool = False) -> None:
        super().__init__()
        self.model = model
        self.multiple = pad_multiple(model)
        self.fixed_size = fixed_size
        self.coarse = _coarse_output(model, self.multiple)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if self.fixed_size and height % self.multiple == 0 and width % self.multiple == 0 and not self.coarse:
            return self.model(image)
        padded, _, _ = pad_to_multiple(image, self.multiple)
        logits = self.model(padded)
        if self.coarse:
            logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return logits[:, :, :height, :width]


@torch.no_grad()
def _coarse_output(model: nn.Module, multiple: int) -> bool:
    """Whether ``model``'s map is smaller than its input (one forward of a small blank image, in
    eval mode: batch norm statistics stay as they are)."""
    side = 2 * max(multiple, 16)
    parameter = next(model.parameters(), None)
    device, dtype = (parameter.device, parameter.dtype) if parameter is not None else ("cpu", torch.float32)
    was_training = model.training
    model.eval()
    try:
        return tuple(model(torch.zeros(1, 3, side, side, device=device, dtype=dtype)).shape[-2:]) != (side, side)
    except Exception:  # noqa: BLE001  (a model that cannot run at all: the exporter names its error)
        return False
    finally:
        model.train(was_training)


def json_text(value: Any) -> str:
    """``json.dumps(indent=2)`` with lists of plain values on one line (palettes, mean/std)."""
    text = json.dumps(value, indent=2)
    # Only whitespace runs that contain a newline are touched: JSON strings cannot contain one.
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]",
                  lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text) + "\n"


# --------------------------------------------------------------------------------------------
# Paths and checks done before any expensive work


def _parse_formats(formats: Any, recipe: Recipe) -> list[str]:
    if formats is None:
        formats = list(recipe.export.formats)
    if isinstance(formats, str):
        formats = [f for f in formats.replace(" ", "").split(",") if f]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"export format(s) {unknown or formats} not supported; choose from {list(FORMATS)}")
    if "onnx_int8" in formats:  # quantized from the FP32 graph, which it is compared with
        formats = [*formats, "onnx"]
    return [f for f in FORMATS if f in formats]


# --------------------------------------------------------------------------------------------
# Writing


def export_config(recipe: Recipe, spec: ModelConfig, info: DatasetInfo, checkpoint: Path,
                  formats: list[str], exporter: str | None, multiple: int = 32) -> dict[str, Any]:
    """The content of ``distill.json`` (``multiple``: the side multiple the ONNX graph pads to)."""
    import importlib.metadata as metadata

    data = recipe.data
    smp_reload = spec.factory is None
    config: dict[str, Any] = {
        "format_version": 1,
        "kind": "smp" if smp_reload else "factory",
        "arch": spec.arch if smp_reload else None,
        "encoder": spec.encoder if smp_reload else None,
        "arch_kwargs": dict(spec.arch_kwargs) if smp_reload else {},
        "factory": spec.factory,
        "factory_kwargs": dict(spec.factory_kwargs),
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "ignore_index": info.ignore_index,
        "palette": [list(c) for c in info.palette],
        "input": {
            "layout": "NCHW float32, RGB",
            "scale": "pixel values / 255 -> [0, 1], then (x - mean) / std per channel",
            "mean": list(data.mean),
            "std": list(data.std),
            "resize": list(data.resize) if data.resize else None,
            "train_crop_size": list(data.crop_size) if data.crop_size else None,
            "pad_multiple": multiple,
            "note": "images were resized to `resize` (H, W) for training and evaluation when set; "
                    "the ONNX graph pads to pad_multiple itself, the PyTorch model does not "
                    "(pad bottom/right with replicated edges, crop the logits back)",
        },
        "files": {fmt: ("model.safetensors" if fmt == "safetensors" and smp_reload else FILES[fmt])
                  for fmt in formats},
        "onnx": {"input": "image", "output": "logits", "opset": recipe.export.opset,
                 "dynamic_axes": ["batch"] if recipe.export.fixed_size else ["batch", "height", "width"],
                 "fixed_size": list(data.resize) if recipe.export.fixed_size else None, "exporter": exporter}
        if "onnx" in formats else None,
        "onnx_int8": {"file": FILES["onnx_int8"], "format": "QDQ, int8 weights per channel, uint8 activations",
                      "calibration_method": recipe.export.calibration_method,
                      "note": "same input, output and dynamic axes as student.onnx; parity.json has "
                              "its mIoU beside the FP32 student's"}
        if "onnx_int8" in formats else None,
        "smp_reload": smp_reload,
        "smp": {"create_model": {"arch": spec.arch, "encoder_name": spec.encoder, "encoder_weights": None,
                                 "classes": info.num_classes, **spec.arch_kwargs}} if smp_reload else None,
        "source": {"checkpoint": str(checkpoint), "checkpoint_sha256": file_digest(checkpoint),
                   "recipe_sha256": hashlib.sha256(recipe_to_yaml(recipe).encode()).hexdigest()},
        "versions": {name: _version(metadata, name) for name in
                     ("torch", "segmentation-models-pytorch", "timm", "onnx", "onnxruntime")},
    }
    if not smp_reload:
        config["smp_reload_note"] = (
            f"the student comes from the factory '{spec.factory}', not from segmentation-models-"
            "pytorch: smp alone cannot rebuild it. Use student.onnx, or call the factory with "
            "num_classes and factory_kwargs, then load_state_dict(student.safetensors)."
        )
    return config


def _version(metadata, name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def export_onnx(model: nn.Module, path: Path, sample: torch.Tensor, opset: int, *,
                fixed_size: bool = False) -> str:
    """Write ``model`` (wrapped in the pad/crop) as ONE ONNX file; returns the exporter used.

    With ``fixed_size`` the graph takes images of ``sample``'s height and width only (any batch).
    """
    wrapper = PaddedSegmenter(model, fixed_size).eval()
    names = {"input_names": ["image"], "output_names": ["logits"], "opset_version": opset}
    axes = {0: "batch"} if fixed_size else {0: "batch", 2: "height", 3: "width"}

    def torchscript() -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning, tracer notes
            torch.onnx.export(wrapper, (sample,), str(path), dynamo=False, do_constant_folding=True,
                              dynamic_axes={"image": axes, "logits": axes}, **names)

    def torch_export() -> None:
        from torch.export import Dim

        with contextlib.redirect_stdout(None):
            torch.onnx.export(wrapper, (sample,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes={"image": {axis: Dim(name) for axis, name in axes.items()}},
                              **names)

    # The TorchScript tracer records every size it reads as graph arithmetic as soon as any
    # dimension is dynamic, the batch included; torch.export reads a static height and width as
    # numbers, so a fixed graph's paddings (TF-"same", the pad to the stride) become constants.
    # For graphs of any size the TorchScript exporter is the long-proven one.
    exporters = {"torchscript": torchscript, "torch.export": torch_export}
    order = ["torch.export", "torchscript"] if fixed_size else ["torchscript", "torch.export"]
    failures = []
    for name in order:
        try:
            exporters[name]()
        except Exception as error:  # noqa: BLE001  (any failure: try the other exporter)
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            failures.append(f"{name} exporter: {message}")
            if len(failures) == 1:
                console.print(f"[yellow]{name} ONNX exporter failed ({message}); trying the other one")
            continue
        _check_onnx(path)
        return name
    raise ExportError(f"the student cannot be exported to ONNX (opset {opset}): {'; '.join(failures)}")


def _check_onnx(path: Path) -> None:
    import onnx

    side_files = [p.name for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path]
    if side_files:
        raise ExportError(f"the ONNX exporter wrote external data {side_files}: expected one file")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    # Name the output's dynamic axes like the input's (the torch.export path writes expressions).
    for dim, name in zip(model.graph.output[0].type.tensor_type.shape.dim, ("batch", None, "height", "width")):
        if name is not None and not dim.HasField("dim_value") and dim.dim_param != name:
            dim.dim_param = name
            onnx.save(model, str(path))


# --------------------------------------------------------------------------------------------
# Parity


def parity_samples(recipe: Recipe, count: int) -> tuple[list[torch.Tensor], list[str]]:
    """``count`` images spread over the recipe's val split, at the evaluation resolution."""
    dataset = build_dataset(recipe.data, recipe.data.val_split, train=False, seed=recipe.train.seed)
    picks = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, min(count, len(dataset)))})
    return [dataset[i]["image"][None] for i in picks], [dataset.sample_id(i) for i in picks]


def _ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def other_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """A size near three quarters of ``height`` x ``width`` that is not a multiple of the stride."""
    return max(multiple, height * 3 // 4) + 3, max(multiple, width * 3 // 4) + 5


def at_other_size(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """``image`` resized to :func:`other_size`, twice in a batch: a graph for any size must
    serve it (one traced for a single size would fail or differ)."""
    size = other_size(*image.shape[-2:], multiple)
    resized = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    return torch.cat([resized, resized.flip(-1)])


@torch.no_grad()
def check_parity(reference: nn.Module, images: list[torch.Tensor], *, onnx_path: Path | None,
                 reloaded: nn.Module | None, fixed_size: bool = False) -> dict[str, dict[str, float]]:
    """Max abs logit difference and argmax agreement of each runtime against ``reference``.

    The ONNX graph is compared with the module it was traced from (the pad and crop included),
    on ``images`` and, unless ``fixed_size``, on a batch of two at another size (:func:`at_other_size`).
    """
    session = _ort_session(onnx_path) if onnx_path is not None else None
    graph = PaddedSegmenter(reference, fixed_size).eval()
    totals: dict[str, dict[str, float]] = {}
    extra = [] if session is None or fixed_size else [at_other_size(images[0], graph.multiple)]
    for image in [*images, *extra]:
        # What each runtime is compared with: the traced module, or the evaluation's forward.
        expected = {"onnx": lambda: graph(image), "safetensors": lambda: forward_padded(reference, image)}
        outputs = {}
        if session is not None:
            try:
                outputs["onnx"] = torch.from_numpy(session.run(None, {"image": image.numpy()})[0])
            except Exception as error:  # noqa: BLE001  (onnxruntime's own error types)
                size = "x".join(str(n) for n in image.shape[-2:])
                message = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
                advice = (": it serves one size only; set data.resize and export.fixed_size: true"
                          if any(image is e for e in extra) else "")
                raise ExportError(f"the ONNX graph fails on a batch of {image.shape[0]} {size} images "
                                  f"({message}){advice}") from None
        if reloaded is not None and image.shape[0] == 1:
            outputs["safetensors"] = forward_padded(reloaded, image)
        for name, got in outputs.items():
            want = expected[name]()
            if got.shape != want.shape:
                raise ExportError(f"{name} logits have shape {tuple(got.shape)}, eager {tuple(want.shape)}")
            if not bool(torch.isfinite(want).all()):
                raise ExportError("the eager student's logits are not finite (NaN or inf) on the parity "
                                  f"images: its weights are broken, nothing to export ({name} compared)")
            entry = totals.setdefault(name, {"max_abs_diff": 0.0, "agree": 0.0, "pixels": 0.0})
            difference = float((got - want).abs().max())
            # NaN compares false to anything: max() and `<= atol` would both let it through.
            entry["max_abs_diff"] = max(entry["max_abs_diff"], difference if difference == difference else math.inf)
            entry["agree"] += float((got.argmax(1) == want.argmax(1)).sum())
            entry["pixels"] += float(want[:, 0].numel())
    return {name: {"max_abs_diff": e["max_abs_diff"], "argmax_agreement": e["agree"] / e["pixels"]}
            for name, e in totals.items()}


def parity_table(results: dict[str, dict[str, float]], atol: float, title: str) -> Table:
    table = Table(title=title)
    for column in ("runtime", "max |logit diff|", "argmax agreement", "tolerance", "status"):
        table.add_column(column, justify="left" if column == "runtime" else "right")
    for name, r in results.items():
        ok = r["max_abs_diff"] <= atol
        table.add_row(name, f"{r['max_abs_diff']:.2e}", f"{100 * r['argmax_agreement']:.4f}%",
                      f"{atol:.0e}", "[green]ok" if ok else "[bold red]FAIL")
    return table


def int8_line(report: dict[str, Any]) -> str:
    """One line on the INT8 student: both mIoU figures, agreement, size, float operators."""
    floats = ", ".join(f"{op} x{n}" for op, n in report["float_ops"].items()) or "none"
    return (f"INT8 student: mIoU {100 * report['int8_miou']:.2f} vs FP32 {100 * report['fp32_miou']:.2f} "
            f"on {report['split']} ({abs(100 * report['miou_drop']):.2f} points "
            f"{'lost' if report['miou_drop'] >= 0 else 'gained'}), argmax agreement "
            f"{100 * report['argmax_agreement']:.2f}%, {report['size_ratio']:.2f}x the FP32 file; "
            f"operators left in float: {floats}")


# --------------------------------------------------------------------------------------------
# The command


def load_exported(export_dir: str | os.PathLike[str]) -> nn.Module:
    """Rebuild an exported student with :func:`distill.models.build_model` (eval mode)."""
    export_dir = Path(export_dir)
    config = load_export_config(export_dir)
    if "safetensors" not in config["files"]:
        raise ExportError(f"export '{export_dir}' holds no torch weights (formats "
                          f"{sorted(config['files'])}): export with format=safetensors to reload it")
    weights = export_dir / config["files"]["safetensors"]
    if config["kind"] == "smp":
        spec = ModelConfig(arch=config["arch"], encoder=config["encoder"], arch_kwargs=config["arch_kwargs"],
                           checkpoint=weights)
    else:
        spec = ModelConfig(factory=config["factory"], factory_kwargs=config["factory_kwargs"],
                           checkpoint=weights)
    return build_model(spec, config["num_classes"]).eval()


def export_student(recipe: Recipe, formats: list[str] | str | None = None, *,
                   parity_images: int = 4) -> Path:
    """Export the recipe's student to ``<output_dir>/export/`` and check its parity.

    Args:
        recipe: the resolved recipe; the student is ``student`` (or ``model``), its weights
            ``eval.checkpoint`` or ``<output_dir>/student/best.safetensors``.
        formats: ``["onnx", "safetensors"]``, a comma-separated string, or None for
            ``recipe.export.formats``. ``distill.json`` and ``parity.json`` are always written.
        parity_images: how many val images the parity check runs on (batch 1 each).

    Returns:
        The export folder.

    Raises:
        ModelError: no student weights, or they do not fit the student.
        ExportError: an unknown format, an unwritable folder, or logits beyond ``export.atol``.
        DataError: the val split cannot be read (the parity check needs real images).
    """
    formats = _parse_formats(formats, recipe)
    checkpoint = trained_weights(recipe, "student")
    check_normalization(recipe, checkpoint)
    out = export_dir(recipe)
    ensure_writable_folder(out, "export", ExportError)
    info = dataset_info(recipe.data)
    spec = recipe.student_model.model_copy(update={"checkpoint": checkpoint, "encoder_weights": None})
    model = build_model(spec, info.num_classes).eval()
    images, sample_ids = parity_samples(recipe, parity_images)
    with exclusive_folder(out):
        # Holding the export's lock, any staging folder here is a killed export's: remove it.
        for stale in out.parent.glob(".export-staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _write_export(recipe, model, spec, info, checkpoint, formats, images, sample_ids, out)
    console.print(f"exported {', '.join(formats)} to {out}")
    return out


def _write_export(recipe: Recipe, model: nn.Module, spec: ModelConfig, info: DatasetInfo,
                  checkpoint: Path, formats: list[str], images: list[torch.Tensor],
                  sample_ids: list[str], out: Path) -> None:
    """Write the export into a staging folder, check its parity, then swap it in whole."""
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".export-staging-"))
    try:
        smp_format = spec.factory is None and hasattr(model, "save_pretrained")
        if smp_format:  # smp's hub format: smp.from_pretrained(folder) and push_to_hub work on it
            model.save_pretrained(staging, dataset=recipe.data.dataset)
        else:
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(staging / FILES["safetensors"]), metadata={"format": "pt"})
        exporter = None
        if "onnx" in formats:
            exporter = export_onnx(model, staging / FILES["onnx"], images[0], recipe.export.opset,
                                   fixed_size=recipe.export.fixed_size)
        config = export_config(recipe, spec, info, checkpoint, [*formats, "safetensors"], exporter,
                               pad_multiple(model))
        atomic_write_text(staging / CONFIG_NAME, json_text(config))
        reloaded = load_exported(staging)  # the parity check reads the weights back
        results = check_parity(model, images, onnx_path=staging / FILES["onnx"] if "onnx" in formats else None,
                               reloaded=reloaded, fixed_size=recipe.export.fixed_size)
        atol = recipe.export.atol
        sizes = sorted({tuple(image.shape[-2:]) for image in images})
        other = (None if "onnx" not in formats or recipe.export.fixed_size
                 else list(other_size(*images[0].shape[-2:], pad_multiple(model))))
        shown = ", ".join(f"{h}x{w}" for h, w in sizes) + (f"; ONNX also 2 at {other[0]}x{other[1]}" if other else "")
        console.print(parity_table(results, atol, f"export parity vs eager student ({len(images)} "
                                                  f"{recipe.data.val_split} images, {shown})"))
        parity = {"atol": atol, "split": recipe.data.val_split, "images": sample_ids,
                  "resolution": [list(size) for size in sizes] if len(sizes) > 1 else list(sizes[0]),
                  "other_size": other, "results": results,
                  "passed": all(r["max_abs_diff"] <= atol for r in results.values())}
        atomic_write_text(staging / "parity.json", json_text(parity))
        failed = {n: r["max_abs_diff"] for n, r in results.items() if r["max_abs_diff"] > atol}
        if failed:
            measured = ", ".join(f"{n} {v:.3g}" for n, v in failed.items())
            raise ExportError(
                f"export parity failed: max abs logit difference vs the eager student {measured} "
                f"exceeds export.atol={atol:g} (nothing was written to {out})"
            )
        if "onnx_int8" in formats:
            try:
                parity["int8"] = export_int8(recipe, staging / FILES["onnx"], staging / FILES["onnx_int8"])
            except QuantizationError as error:
                raise ExportError(f"{error} (nothing was written to {out})") from None
            console.print(int8_line(parity["int8"]))
            atomic_write_text(staging / "parity.json", json_text(parity))
        if "safetensors" not in formats:
            for name in (*SMP_FILES, FILES["safetensors"]):
                (staging / name).unlink(missing_ok=True)
            config["files"].pop("safetensors")
            atomic_write_text(staging / CONFIG_NAME, json_text(config))
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out: Path) -> None:
    """Swap the staged folder in for ``out`` as a whole (the folder belongs to distill).

    Two renames: a kill between them leaves ``.export-previous`` beside ``out``, never a mix of
    a new ONNX file with an old distill.json.
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(staging, 0o777 & ~mask)  # mkdtemp made it private
    for path in staging.iterdir():  # safetensors writes its files 0600: give the usual mode
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)
    swap_in_folder(staging, out, out.parent / ".export-previous")
