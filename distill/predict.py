"""``distill predict EXPORT_DIR IMAGE... [--out DIR] [--int8]``: run an exported student without PyTorch.

This module is the proof that an export stands on its own: it reads ``distill.json`` and
``student.onnx`` (or ``student_int8.onnx``) written by :func:`distill.export.export_student` and needs only numpy, Pillow
and onnxruntime. It imports nothing from ``distill`` nor torch
itself, so it can be copied next to an export, or loaded by file path, and run where torch is not
installed::

    import importlib.util
    spec = importlib.util.spec_from_file_location("distill_predict", "distill/predict.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    module.predict("runs/x/export", [Path("a.png")], Path("masks"))

Pre-processing is the evaluation transform of the recipe the student was trained with: RGB scaled
to [0, 1], resized (bilinear) to ``config["input"]["resize"]`` when the recipe resized its images,
normalised with ``mean``/``std``. The ONNX graph pads to its stride and crops back itself, so any
size works. The label map is resized back to the image's own size (nearest) and written as a
palette PNG ``<stem>_mask.png``: pixel values are class ids, the colours the dataset's palette.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CONFIG_NAME = "distill.json"  # distill's metadata; config.json beside it is smp's


class PredictError(ValueError):
    """An export folder or an image cannot be used; the message names the file."""


def load_export_config(export_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``<export_dir>/distill.json`` (raises :class:`PredictError` when missing or invalid)."""
    path = Path(export_dir) / CONFIG_NAME
    if not path.is_file():
        older = " (an export of an older distill: export again)" if (Path(export_dir) / "config.json").is_file() else ""
        raise PredictError(
            f"{path} does not exist: not an export folder{older} (write one with `distill export RECIPE`)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PredictError(f"{path} is not readable JSON: {error}") from None
    for key in ("num_classes", "palette", "input", "files"):
        if key not in config:
            raise PredictError(f"{path} has no key '{key}': written by another tool or version?")
    return config


def preprocess(image: Image.Image, config: dict[str, Any]) -> np.ndarray:
    """A PIL image -> float32 [1, 3, H, W], as the student saw images at evaluation."""
    spec = config["input"]
    image = image.convert("RGB")
    if spec.get("resize"):
        height, width = spec["resize"]
        image = image.resize((width, height), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


def palette_image(labels: np.ndarray, palette: list[list[int]]) -> Image.Image:
    """A class-id map [H, W] as a palette ("P") image coloured with ``palette``."""
    if len(palette) > 256:
        raise PredictError(f"{len(palette)} classes do not fit a 256-colour palette PNG")
    mask = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [channel for colour in palette for channel in colour]
    mask.putpalette(flat + [0, 0, 0] * (256 - len(palette)))
    return mask


def _session(export_dir: Path, config: dict[str, Any], threads: int | None, int8: bool = False):
    import onnxruntime as ort

    kind = "onnx_int8" if int8 else "onnx"
    name = config["files"].get(kind)
    model_path = export_dir / name if name else None
    if model_path is None or not model_path.is_file():
        raise PredictError(
            f"{export_dir} holds no {'INT8 ' if int8 else ''}ONNX model "
            f"({model_path or 'distill.json lists none'}); export with format={kind}"
        )
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types for truncated or foreign files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PredictError(f"ONNX model '{model_path}' cannot be loaded (truncated or not an "
                           f"ONNX file?): {first}") from None
    channels = session.get_outputs()[0].shape[1] if len(session.get_outputs()[0].shape) == 4 else None
    if isinstance(channels, int) and channels != config["num_classes"]:
        raise PredictError(f"ONNX model '{model_path}' outputs {channels} classes but "
                           f"{export_dir / CONFIG_NAME} says {config['num_classes']}: the files come "
                           "from different exports")
    return session


def predict(
    export_dir: str | os.PathLike[str],
    images: list[Path],
    out_dir: str | os.PathLike[str],
    *,
    threads: int | None = None,
    int8: bool = False,
) -> list[Path]:
    """Segment ``images`` with the exported ONNX student; write ``<out_dir>/<stem>_mask.png``.

    With ``int8`` the INT8 student (``student_int8.onnx``, export format ``onnx_int8``) runs
    instead of the FP32 one.

    Returns the written paths, in the order of ``images``. Each mask is written through a
    temporary name and a rename, so an interrupted run leaves no half-written PNG.

    Raises:
        PredictError: the export folder, its ONNX file, or an image cannot be read.
    """
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    config = load_export_config(export_dir)
    paths = [Path(p) for p in images]
    for path in paths:
        if not path.is_file():
            raise PredictError(f"image '{path}' does not exist")
    by_stem: dict[str, Path] = {}
    for path in paths:  # masks are named after the image: two of one name would overwrite
        if path.stem in by_stem and by_stem[path.stem] != path:
            raise PredictError(f"images '{by_stem[path.stem]}' and '{path}' would both write "
                               f"'{path.stem}_mask.png': predict them into different --out folders")
        by_stem[path.stem] = path
    session = _session(export_dir, config, threads, int8)
    input_name = config.get("onnx", {}).get("input", session.get_inputs()[0].name)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except Image.DecompressionBombError as error:  # PIL's guard against huge images
            raise PredictError(f"image '{path}' is too large to decode safely: {error}") from None
        except OSError as error:
            raise PredictError(f"image '{path}' cannot be decoded: {error}") from None
        logits = session.run(None, {input_name: preprocess(image, config)})[0]
        labels = logits[0].argmax(0).astype(np.uint8)
        mask = palette_image(labels, config["palette"])
        if mask.size != image.size:
            mask = mask.resize(image.size, Image.NEAREST)
        target = out_dir / f"{path.stem}_mask.png"
        tmp = target.with_name(f".{target.name}.tmp")
        mask.save(tmp, format="PNG")
        os.replace(tmp, target)
        written.append(target)
    return written
