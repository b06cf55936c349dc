"""``distill predict EXPORT_DIR IMAGE... [--out DIR] [--int8]``: run an exported student without PyTorch.

This module is the proof that an export stands on its own: it reads ``distill.json`` and
``student.onnx`` (or ``student_int8.onnx``) written by :func:`distill.export.export_student` and
needs only numpy, Pillow and onnxruntime. It imports nothing from ``distill`` nor torch itself, so
it can be copied next to an export, or loaded by file path, and run where torch is not installed::

    import importlib.util
    spec = importlib.util.spec_from_file_location("distill_predict", "distill/export/predict.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    module.predict("runs/x/export", [Path("a.png")], Path("masks"))

Pre-processing is the evaluation transform of the recipe the student was trained with: RGB scaled
to [0, 1], resized (bilinear) to ``config["input"]["resize"]`` when the recipe resized its images,
normalised with ``mean``/``std``. The ONNX graph pads to its stride and crops back itself, so any
size works (an export with ``export.fixed_size`` takes ``resize`` only, which is what it gets).
The logits are resized (bilinear) to the image's own size and their argmax written as a palette
PNG ``<stem>_mask.png``, as ``distill eval`` scores at label resolution: pixel values are class
ids, the colours the dataset's palette.

All or nothing: the export folder, every image (exists, is a readable file, has a usable mode,
its header decodes) and ``--out`` (a writable folder, or one that can be created) are checked
before any work, and the masks are kept in memory (as PNG bytes) until every image has been
predicted. A refused or failed run creates nothing, not even ``--out``, and changes nothing.

Images, as the reader sees them:

- EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose`): the mask matches the image
  as viewers show it (a phone photo taken upright is predicted upright) and has the transposed
  size. Training and evaluation read images through this same function
  (:func:`distill.data.files.read_image`), so the student sees at use what it trained on.
- Modes ``1``, ``L``, ``LA``, ``La``, ``P``, ``PA``, ``RGB``, ``RGBA``, ``RGBa``, ``RGBX``, ``CMYK``,
  ``YCbCr``, ``LAB`` and ``HSV`` become RGB as Pillow converts them; alpha is dropped, not
  composited.
- 16-bit grayscale (``I;16*``) is scaled by its range to 8 bits (``round(v / 257)``: 65535 -> 255),
  then replicated to RGB; Pillow's plain ``RGB`` conversion would clip it to white. Mode ``I``
  (32-bit ints) is scaled by the range of the file's own sample type: 16 bits for PGM/PPM (Pillow
  rescales those to 0..65535), ``BitsPerSample``/``SampleFormat`` for TIFF (also for a 12-bit
  ``I;16`` TIFF), otherwise 0..2**31-1. Negative values are refused. Mode ``F`` (float) must hold
  finite values in [0, 1], scaled by 255; other values are refused.
- Any other mode is refused with :class:`PredictError` naming the file and its mode.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

CONFIG_NAME = "distill.json"  # distill's metadata; config.json beside it is smp's
# Modes Pillow converts to RGB meaningfully ("La" goes through "LA": Pillow has no direct path).
CONVERTED_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                             "YCbCr", "LAB", "HSV"})
# Modes scaled here by their sample type's range: Pillow's RGB conversion clips them instead.
SCALED_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


class PredictError(ValueError):
    """An export folder or an image cannot be used; the message names the file."""


def _stat(path: Path, what: str) -> os.stat_result:
    """``os.stat(path)``, or a :class:`PredictError` that says why it failed."""
    try:
        return path.stat()
    except FileNotFoundError:
        raise PredictError(f"{what} '{path}' does not exist") from None
    except NotADirectoryError:
        raise PredictError(f"{what} '{path}' does not exist: '{_file_above(path)}' is a file, "
                           "not a folder") from None
    except PermissionError:  # stat needs only search permission on the folders above
        raise PredictError(f"{what} '{path}' cannot be reached: permission denied on a folder "
                           "above it") from None
    except OSError as error:
        raise PredictError(f"{what} '{path}' cannot be read: {error.strerror or error}") from None


def _file_above(path: Path) -> Path:
    """The nearest ancestor of ``path`` that exists and is not a folder (why stat said ENOTDIR)."""
    for parent in path.parents:
        if os.path.exists(parent) and not os.path.isdir(parent):
            return parent
    return path.parent


def _check_file(path: Path, what: str) -> None:
    """Raise :class:`PredictError` unless ``path`` is an existing regular file this process may read."""
    mode = _stat(path, what).st_mode
    if stat.S_ISDIR(mode):
        raise PredictError(f"{what} '{path}' is a folder, not a file")
    if not stat.S_ISREG(mode):  # reading a pipe or a device could block or never end
        raise PredictError(f"{what} '{path}' is not a regular file (a pipe, socket or device)")
    if not os.access(path, os.R_OK):
        raise PredictError(f"{what} '{path}' cannot be read: permission denied")


def _check_folder(path: Path, what: str) -> None:
    """Raise :class:`PredictError` unless ``path`` is an existing folder whose files may be read."""
    if not stat.S_ISDIR(_stat(path, what).st_mode):
        raise PredictError(f"{what} '{path}' is a file, not a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PredictError(f"{what} '{path}' cannot be read: permission denied")


def load_export_config(export_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``<export_dir>/distill.json`` (raises :class:`PredictError` when missing or invalid)."""
    export_dir = Path(export_dir)
    _check_folder(export_dir, "export folder")
    path = export_dir / CONFIG_NAME
    if not os.path.lexists(path):
        older = " (an export of an older distill: export again)" if (export_dir / "config.json").is_file() else ""
        raise PredictError(
            f"{path} does not exist: not an export folder{older} (write one with `distill export RECIPE`)"
        )
    _check_file(path, "export metadata")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PredictError(f"{path} is not readable JSON: {error}") from None
    if not isinstance(config, dict):
        raise PredictError(f"{path} holds no JSON object: written by another tool or version?")
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


def _source_pixels(out: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each output pixel's two source pixels and the weight of the second, as torch's bilinear
    resize with ``align_corners=False`` computes them."""
    source = np.maximum((np.arange(out) + 0.5) * (size / out) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), size - 1)
    return low, np.minimum(low + 1, size - 1), (source - low).astype(np.float32)[:, None]


def upsampled_labels(logits: np.ndarray, height: int, width: int, rows: int = 128) -> np.ndarray:
    """The class of each pixel of a ``height x width`` image from ``[C, h, w]`` logits: the
    logits resized bilinearly to the image, then the argmax, as ``distill eval`` scores them (the
    argmax first, enlarged, lost the boundaries between classes). Rows go a block at a time: a
    photo's full-size logits need not fit in memory at once."""
    if logits.shape[1:] == (height, width):
        return logits.argmax(0).astype(np.uint8)
    low, high, weight = _source_pixels(width, logits.shape[2])
    wide = logits[:, :, low] * (1 - weight[:, 0]) + logits[:, :, high] * weight[:, 0]  # [C, h, width]
    low, high, weight = _source_pixels(height, logits.shape[1])
    labels = np.empty((height, width), dtype=np.uint8)
    for start in range(0, height, rows):
        part = slice(start, start + rows)
        labels[part] = (wide[:, low[part]] * (1 - weight[part]) + wide[:, high[part]] * weight[part]).argmax(0)
    return labels


def palette_image(labels: np.ndarray, palette: list[list[int]]) -> Image.Image:
    """A class-id map [H, W] as a palette ("P") image coloured with ``palette``."""
    if len(palette) > 256:
        raise PredictError(f"{len(palette)} classes do not fit a 256-colour palette PNG")
    mask = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [channel for colour in palette for channel in colour]
    mask.putpalette(flat + [0, 0, 0] * (256 - len(palette)))
    return mask


def _unsupported_mode(path: Path, mode: str) -> PredictError:
    known = ", ".join(sorted(CONVERTED_MODES | SCALED_MODES))
    return PredictError(f"image '{path}' has PIL mode '{mode}', which predict cannot convert to RGB "
                        f"(it reads {known}): convert it to 8-bit RGB first")


def check_image(path: Path) -> None:
    """Refuse, before any work, an image that is missing, unreadable, undecodable or of an unusable mode.

    Only the header is decoded here (``Image.open`` + ``verify``, which also checks a PNG's chunk
    checksums): decoding every image twice would double the cost for large images, and keeping them
    all decoded could exhaust memory. What ``verify`` cannot see (a truncated JPEG) fails while
    predicting, which still writes nothing, as masks are written only once all are predicted.
    """
    _check_file(path, "image")
    with _decoding(path):
        with Image.open(path) as opened:
            mode = opened.mode
            opened.verify()
    if mode not in CONVERTED_MODES | SCALED_MODES:
        raise _unsupported_mode(path, mode)


def _white_level(image: Image.Image) -> int | None:
    """The integer value that means white for an ``I``/``I;16*`` image: its sample type's maximum."""
    if image.mode not in SCALED_MODES or image.mode == "F":
        return None
    tags = getattr(image, "tag_v2", None)
    if image.format == "TIFF" and tags is not None and 258 in tags:  # BitsPerSample, SampleFormat
        bits, kind = tags[258], tags.get(339, 1)
        bits = bits[0] if isinstance(bits, tuple) else bits
        kind = kind[0] if isinstance(kind, tuple) else kind
        return 2 ** (int(bits) - (kind == 2)) - 1  # signed: values above 0 use one bit less
    if image.mode.startswith("I;16") or image.format == "PPM":  # Pillow rescales PGM/PPM to 16 bits
        return 65535
    return 2**31 - 1  # Pillow's mode "I" holds signed 32-bit ints


def rgb_image(image: Image.Image, path: Path, white: int | None = None) -> Image.Image:
    """``image`` as 8-bit RGB; integer and float grayscale scaled by their range (see the module doc).

    ``white`` is the value that means white for ``I``/``I;16*`` images (default: the mode's range).
    """
    mode = image.mode
    if mode == "La":  # premultiplied alpha: Pillow un-premultiplies only on the way to "LA"
        image, mode = image.convert("LA"), "LA"
    if mode in CONVERTED_MODES:
        return image.convert("RGB")
    if mode not in SCALED_MODES:
        raise _unsupported_mode(path, mode)
    values = np.asarray(image)
    if mode == "F":
        finite = np.isfinite(values).all()
        if not finite or values.size and (values.min() < 0 or values.max() > 1):
            span = "non-finite values" if not finite else f"values in [{values.min():g}, {values.max():g}]"
            raise PredictError(f"image '{path}' (PIL mode 'F', float) holds {span}: predict reads float "
                               "images as intensities in [0, 1]")
        gray = np.rint(values.astype(np.float64) * 255)
    else:
        white = white or (65535 if mode.startswith("I;16") else 2**31 - 1)
        if values.size and values.min() < 0:
            raise PredictError(f"image '{path}' (PIL mode '{mode}') holds negative values "
                               f"(down to {values.min()}): no intensity to map them to")
        # Integer rounding of v * 255 / white: exact (white is odd, so no value falls on .5).
        gray = np.minimum((values.astype(np.int64) * 255 + white // 2) // white, 255)
    return Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")


def read_image(path: Path) -> Image.Image:
    """Decode ``path`` as 8-bit RGB the way viewers show it: EXIF orientation applied (see the module doc)."""
    return read_oriented_image(path)[0]


def read_oriented_image(path: Path) -> tuple[Image.Image, bool]:
    """:func:`read_image`, and whether an EXIF orientation turned or mirrored it (read in the same
    decode: reading a PNG's EXIF again costs about as much as decoding it)."""
    with _decoding(path):
        with Image.open(path) as opened:
            opened.load()
            white = _white_level(opened)  # from the file's tags: the transposed copy has none
            turned = exif_turned(opened)
            # Most images are upright: no copy for them (training reads every image through here).
            image = ImageOps.exif_transpose(opened) if turned else opened
    return rgb_image(image, path, white), turned


def exif_turned(image: Image.Image) -> bool:
    """True when ``image`` carries an EXIF orientation that turns or mirrors it (not upright)."""
    return image.getexif().get(0x0112, 1) not in (0, 1)


@contextlib.contextmanager
def _decoding(path: Path) -> Iterator[None]:
    """Pillow's errors while decoding ``path`` as one :class:`PredictError` naming the file."""
    try:
        yield
    except Image.DecompressionBombError as error:  # PIL's guard against huge images
        raise PredictError(f"image '{path}' is too large to decode safely: {error}") from None
    except PermissionError:
        raise PredictError(f"image '{path}' cannot be read: permission denied") from None
    except Exception as error:  # Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error...
        raise PredictError(f"image '{path}' cannot be decoded: {error}") from None


def _check_out(out_dir: Path, targets: list[Path]) -> list[Path]:
    """Refuse an ``--out`` that cannot take the masks; return the folders that must be created (deepest first)."""
    if os.path.lexists(out_dir) and not os.path.exists(out_dir):
        raise PredictError(f"--out '{out_dir}' is a broken symbolic link")
    try:
        mode = out_dir.stat().st_mode
    except PermissionError:
        raise PredictError(f"--out '{out_dir}' cannot be reached: permission denied on a folder above it") from None
    except (FileNotFoundError, NotADirectoryError):
        pass
    else:
        if not stat.S_ISDIR(mode):
            raise PredictError(f"--out '{out_dir}' is a file, not a folder")
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise PredictError(f"--out '{out_dir}' is not writable: permission denied")
        for target in targets:
            if os.path.isdir(target):
                raise PredictError(f"mask '{target}' cannot be written: a folder of that name is in --out")
        return []
    # --out will be made with its missing parents, inside the nearest folder that exists.
    missing = [out_dir]
    for parent in out_dir.parents:
        if not os.path.lexists(parent):
            missing.append(parent)
            continue
        if not os.path.isdir(parent):
            raise PredictError(f"--out '{out_dir}' cannot be created: '{parent}' is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PredictError(f"--out '{out_dir}' cannot be created in '{parent}': permission denied")
        break
    return missing


def _model_path(export_dir: Path, config: dict[str, Any], int8: bool) -> Path:
    """The export's (INT8) ONNX model, checked to be a readable file."""
    kind = "onnx_int8" if int8 else "onnx"
    name = config["files"].get(kind)
    model_path = export_dir / name if name else None
    if model_path is None or not os.path.lexists(model_path):
        raise PredictError(
            f"{export_dir} holds no {'INT8 ' if int8 else ''}ONNX model "
            f"({model_path or 'distill.json lists none'}); export with format={kind}"
        )
    _check_file(model_path, "ONNX model")
    return model_path


def _session(model_path: Path, config: dict[str, Any], threads: int | None):
    import onnxruntime as ort

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
                           f"{model_path.parent / CONFIG_NAME} says {config['num_classes']}: the files come "
                           "from different exports")
    return session


def _write_all(out_dir: Path, masks: dict[Path, bytes], missing: list[Path]) -> None:
    """Write every mask, or none: on a failure the files and folders made here are removed."""
    staged: list[tuple[Path, Path]] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for target, data in masks.items():
            tmp = target.with_name(f".{target.name}.tmp")
            staged.append((tmp, target))
            tmp.write_bytes(data)
    except OSError as error:  # a full disk, or a folder changed since it was checked
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for folder in missing:  # deepest first; those mkdir did not reach are absent
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError:  # not empty: something else writes there now
                break
        raise PredictError(f"the masks cannot be written to --out '{out_dir}': "
                           f"{error.strerror or error}") from None
    # A rename is atomic: no half-written PNG under a mask's name, even if the run is killed here.
    for tmp, target in staged:
        os.replace(tmp, target)


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

    Returns the written paths, in the order of ``images``. All or nothing: every input and
    ``out_dir`` are checked first, and the masks are written only once every image has been
    predicted (through temporary names and renames), so a refused or failed run creates nothing.

    Raises:
        PredictError: the export folder, its ONNX file, an image or ``out_dir`` cannot be used.
    """
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    config = load_export_config(export_dir)
    model_path = _model_path(export_dir, config, int8)
    paths = [Path(p) for p in images]
    by_stem: dict[str, Path] = {}
    for path in paths:  # masks are named after the image: two of one name would overwrite
        if path.stem in by_stem and by_stem[path.stem] != path:
            raise PredictError(f"images '{by_stem[path.stem]}' and '{path}' would both write "
                               f"'{path.stem}_mask.png': predict them into different --out folders")
        by_stem[path.stem] = path
    for path in by_stem.values():
        check_image(path)
    targets = [out_dir / f"{path.stem}_mask.png" for path in paths]
    inputs = {path.resolve(): path for path in paths}
    for source, target in zip(paths, targets):
        if target.resolve() in inputs:  # `scene_mask.png` given beside `scene.png`
            raise PredictError(f"the mask of '{source}' would be written over the input image "
                               f"'{inputs[target.resolve()]}': predict into another --out folder")
    missing = _check_out(out_dir, targets)
    session = _session(model_path, config, threads)
    input_name = config.get("onnx", {}).get("input", session.get_inputs()[0].name)
    # Encoded masks (palette PNGs, a small fraction of the images' size) wait in memory, so that a
    # failure on a later image leaves nothing written.
    masks: dict[Path, bytes] = {}
    for path, target in zip(paths, targets):
        if target in masks:  # the same image named twice
            continue
        image = read_image(path)
        logits = session.run(None, {input_name: preprocess(image, config)})[0]
        mask = palette_image(upsampled_labels(logits[0], image.height, image.width), config["palette"])
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
        masks[target] = buffer.getvalue()
    _write_all(out_dir, masks, missing)
    return targets
