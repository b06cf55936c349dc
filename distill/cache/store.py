"""Private helpers of ``distill.cache.writer``: the maths (downsample, compress, rebuild, replay a
batch's geometry, on torch tensors on any device) and the files of one split (manifest entries,
array checks). Conventions:

- A stored map of size ``(h, w)`` spans the whole base frame ``(H, W)`` with the same pixel-centre
  convention as every resize in ``distill.data`` (``align_corners=False``): stored pixel ``p``
  stands for base coordinate ``(p + 0.5) * H / h``.
- Compressed arrays are named as on disk (see :func:`array_specs`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill._io import atomic_write_text
from distill.data.splits import file_safe

logger = logging.getLogger("distill.cache")

FORMAT = "distill-logit-cache"
# Raised whenever what a store holds for the same fingerprint changes, so that stores written by
# an earlier distill are rewritten, not replayed.
LAYOUT_VERSION = 2
MANIFEST = "manifest.json"
Layout = Literal["topk", "dense"]
Dtype = Literal["fp16", "int8"]
FP16_MAX = 65504.0
CODE_MAX = 255  # int8 layout: unsigned 8-bit codes over [zero, max] (asymmetric, per pixel)


class CacheError(ValueError):
    """The logit store is missing, stale, incomplete or damaged; the message says what to do."""


def fingerprint_stored_size(fingerprint: dict) -> tuple[int, int]:
    """The stored maps' size of a store: 1/stride of the frame the teacher saw."""
    frame = fingerprint.get("teacher_frame") or fingerprint["base_size"]
    return stored_size(tuple(frame), fingerprint["stride"])


def stored_size(base_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """``(h, w)`` of the maps stored for a base frame at ``stride`` (rounded, at least 1)."""
    return tuple(max(1, (side + stride // 2) // stride) for side in base_size)  # type: ignore


def effective_topk(layout: Layout, topk: int, num_classes: int) -> int | None:
    """Logits kept per pixel: ``min(topk, num_classes)`` for ``topk``, ``None`` for ``dense``."""
    return min(topk, num_classes) if layout == "topk" else None


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.uint16)


def array_specs(layout: Layout, dtype: Dtype, num_samples: int, num_classes: int,
                topk: int | None, size: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, numpy dtype) of every array a split's store holds (besides ``written``).

    ``topk``: ``values`` (fp16) or ``codes`` (uint8) ``[N, k, h, w]``, the k largest logits per
    pixel in decreasing order; ``indices`` ``[N, k, h, w]`` their classes; ``rest`` ``[N, h, w]``
    the logit standing for each of the other classes. ``dense``: ``values``/``codes``
    ``[N, C, h, w]``. ``int8`` adds ``scale`` ``[N, h, w]`` and uses ``rest`` (topk) or ``zero``
    (dense) as the zero point: ``logit = zero + scale * code``.
    """
    n, (h, w) = num_samples, size
    channels = topk if layout == "topk" else num_classes
    assert channels is not None
    plane = (n, h, w)
    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    if dtype == "fp16":
        specs["values"] = ((n, channels, h, w), np.dtype(np.float16))
    else:
        specs["codes"] = ((n, channels, h, w), np.dtype(np.uint8))
        specs["scale"] = (plane, np.dtype(np.float16))
    if layout == "topk":
        specs["indices"] = ((n, channels, h, w), index_dtype(num_classes))
        specs["rest"] = (plane, np.dtype(np.float16))
    elif dtype == "int8":
        specs["zero"] = (plane, np.dtype(np.float16))
    return specs


def downsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Average-pool ``[B, C, H, W]`` logits to ``size`` (area / box filter).

    Averaging (rather than bilinear sampling, which at stride 4 reads 2 of every 4 rows and
    aliases) keeps every teacher pixel's contribution, so the replay's bilinear upsampling
    reconstructs a low-pass version of the map; ``bench/cache.py`` measures both.
    """
    height, width = logits.shape[-2:]
    if (height, width) == tuple(size):
        return logits
    if height % size[0] == 0 and width % size[1] == 0:
        kernel = (height // size[0], width // size[1])
        return F.avg_pool2d(logits, kernel, kernel)
    if size[0] <= height and size[1] <= width:
        return F.adaptive_avg_pool2d(logits, size)
    # A teacher map coarser than the store (a 1/4-resolution model, a small teacher.input_size):
    # bilinear, as the streamed KD resizes it; pooling would copy pixels and shift them.
    shrunk = (min(height, size[0]), min(width, size[1]))
    if shrunk != (height, width):
        logits = F.adaptive_avg_pool2d(logits, shrunk)
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def _to_fp16(x: Tensor) -> Tensor:
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def _quantize(values: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
    """uint8 codes and fp16 per-pixel scale with ``values ~ zero + scale * codes``."""
    span = (values.amax(1) - zero).clamp_min(0)
    scale = _to_fp16(span / CODE_MAX)
    scale32 = scale.float().unsqueeze(1)
    codes = torch.where(scale32 > 0, (values - zero.unsqueeze(1)) / scale32.clamp_min(1e-30),
                        torch.zeros_like(values))
    return codes.round_().clamp_(0, CODE_MAX).to(torch.uint8), scale


def compress(logits: Tensor, layout: Layout, dtype: Dtype, topk: int | None,
             temperature: float) -> dict[str, Tensor]:
    """Compress fp32 logits ``[B, C, h, w]`` into the arrays of :func:`array_specs`.

    ``rest`` (topk) is ``T * log(mean_{c not in top-k} exp(z_c / T))``: the one value that keeps
    the probability mass of the non-top-k classes at temperature ``T``; of all single values it
    minimises KL(teacher || rebuilt) at that temperature (the top-k probabilities come back
    exactly, the tail becomes uniform). ``bench/cache.py`` compares it with the tail's mean.
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    out: dict[str, Tensor] = {}
    if layout == "dense":
        if dtype == "fp16":
            return {"values": _to_fp16(logits)}
        zero = _to_fp16(logits.amin(1))
        out["codes"], out["scale"] = _quantize(logits, zero.float())
        out["zero"] = zero
        return out
    assert topk is not None
    values, indices = logits.topk(topk, dim=1)
    if topk < num_classes:
        tail = logits.scatter(1, indices, float("-inf")) / temperature
        rest = temperature * (torch.logsumexp(tail, dim=1) - math.log(num_classes - topk))
    else:  # no tail: the value is never used by the rebuild, only as the int8 zero point
        rest = values[:, -1]
    out["rest"] = _to_fp16(rest)
    out["indices"] = indices.to(torch.uint8 if num_classes <= 256 else torch.int32)
    if dtype == "fp16":
        out["values"] = _to_fp16(values)
    else:
        out["codes"], out["scale"] = _quantize(values, out["rest"].float())
    return out


def tail_mean_rest(logits: Tensor, topk: int) -> Tensor:
    """The alternative ``rest``: the plain mean of the non-top-k logits (for the benchmark)."""
    values, indices = logits.topk(topk, dim=1)
    tail_sum = logits.sum(1) - values.sum(1)
    return tail_sum / max(1, logits.shape[1] - topk)


def rebuild(arrays: dict[str, Tensor], layout: Layout, num_classes: int) -> Tensor:
    """Full fp32 logits ``[B, C, h, w]`` from compressed arrays (already on the target device)."""
    if "codes" in arrays:
        zero = arrays["rest" if layout == "topk" else "zero"].float().unsqueeze(1)
        values = zero + arrays["scale"].float().unsqueeze(1) * arrays["codes"].float()
    else:
        values = arrays["values"].float()
    if layout == "dense":
        return values
    rest = arrays["rest"].float().unsqueeze(1)
    batch, _, height, width = values.shape
    full = rest.expand(batch, num_classes, height, width).contiguous()
    return full.scatter_(1, arrays["indices"].long(), values)


def replay_theta(geometry: dict[str, Tensor], image_size: tuple[int, int]) -> Tensor:
    """Per-sample affine maps ``[B, 2, 3]`` from a batch's output grid to its stored maps.

    With ``u`` the output's normalised coordinate (``affine_grid``, ``align_corners=False``),
    the batch image's pixel coordinate is ``x = (u + 1) * W / 2``; the crop coordinate is ``x``
    or, flipped, ``width - x``; the scaled frame's ``left + crop``; and since the stored map
    spans the base frame as the scaled frame does, the map's normalised coordinate is
    ``2 * scaled / W_scaled - 1``. Each axis is affine in ``u``, so one ``affine_grid`` serves
    the whole batch.
    """
    height, width = image_size
    dtype = torch.float64 if geometry["crop_box"].device.type != "mps" else torch.float32
    scaled = geometry["scaled_size"].to(dtype)
    box = geometry["crop_box"].to(dtype)
    flip = geometry["flip"].to(torch.bool)
    top, left, crop_w = box[:, 0], box[:, 1], box[:, 3]
    sh, sw = scaled[:, 0], scaled[:, 1]
    a_y = height / sh
    b_y = (2 * top + height) / sh - 1
    a_x = torch.where(flip, -width / sw, width / sw)
    b_x = torch.where(flip, (2 * (left + crop_w) - width) / sw, (2 * left + width) / sw) - 1
    theta = torch.zeros(len(sh), 2, 3, dtype=dtype, device=sh.device)
    theta[:, 0, 0], theta[:, 0, 2] = a_x, b_x
    theta[:, 1, 1], theta[:, 1, 2] = a_y, b_y
    return theta.float()


def replay(maps: Tensor, geometry: dict[str, Tensor], image_size: tuple[int, int],
           out_size: tuple[int, int] | None = None) -> Tensor:
    """Resample stored base-frame maps ``[B, C, h, w]`` onto the batch's augmented views.

    One bilinear ``grid_sample`` for the whole batch. ``out_size`` defaults to ``image_size``;
    a smaller size covers the same extent (for a later bilinear upsampling). Outside the scaled
    image (padding, whose labels are ``ignore_index``) the edge values are repeated, so every
    output is finite; ``padding_mode='border'`` also keeps the half pixel along the image's edges
    from blending with zeros.
    """
    out_h, out_w = out_size or image_size
    theta = replay_theta(geometry, image_size).to(maps.device)
    grid = F.affine_grid(theta, [maps.shape[0], maps.shape[1], out_h, out_w], align_corners=False)
    return F.grid_sample(maps.float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def softened_kl(target: Tensor, approx: Tensor, temperature: float,
                valid: Tensor | None = None) -> float:
    """Mean per-pixel ``KL(softmax(target/T) || softmax(approx/T))`` over ``valid`` pixels."""
    log_p = torch.log_softmax(target.double() / temperature, dim=1)
    log_q = torch.log_softmax(approx.double() / temperature, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1)
    if valid is not None:
        return float(kl[valid].mean()) if bool(valid.any()) else 0.0
    return float(kl.mean())


# --------------------------------------------------------------------------------------------
# Files: the manifest and the arrays of one split


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CacheError(f"logit cache manifest '{path}' is unreadable ({error}); rerun "
                         "`distill cache RECIPE`") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"'{path}' is not a distill logit cache manifest")
    return manifest


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _check_array(path: Path, shape: Sequence[int], dtype: np.dtype) -> str | None:
    """None when ``path`` is a complete .npy of ``shape``/``dtype``, else what is wrong."""
    if not path.is_file():
        return f"'{path}' is missing"
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            found_shape, fortran, found_dtype = header(handle)
            offset = handle.tell()
    except (OSError, ValueError) as error:
        return f"'{path}' is not a readable .npy file ({error})"
    if tuple(found_shape) != tuple(shape) or found_dtype != dtype or fortran:
        return (f"'{path}' holds {found_dtype} {tuple(found_shape)}, expected {dtype} "
                f"{tuple(shape)}")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        return f"'{path}' is truncated or damaged: {size} bytes on disk, expected {expected}"
    return None


@dataclass
class _SplitFiles:
    folder: Path
    specs: dict[str, tuple[tuple[int, ...], np.dtype]]

    def problems(self) -> list[str]:
        every = {**self.specs, "written": ((self.specs_rows(),), np.dtype(np.uint8))}
        found = [_check_array(self.folder / f"{name}.npy", shape, dtype)
                 for name, (shape, dtype) in every.items()]
        return [p for p in found if p]

    def specs_rows(self) -> int:
        return next(iter(self.specs.values()))[0][0]

    def open(self, mode: Literal["r", "r+"]) -> dict[str, np.memmap]:
        names = [*self.specs, "written"]
        return {name: np.load(self.folder / f"{name}.npy", mmap_mode=mode) for name in names}


def _split_files(fingerprint: dict[str, Any], folder: Path) -> _SplitFiles:
    size = fingerprint_stored_size(fingerprint)
    specs = array_specs(fingerprint["layout"], fingerprint["dtype"],
                                   fingerprint["num_samples"], fingerprint["num_classes"],
                                   fingerprint["topk"], size)
    return _SplitFiles(folder, specs)


def split_folder(folder: Path, split: str) -> Path:
    """The store's sub-folder of ``split`` (a selector made file-name safe)."""
    return Path(folder) / file_safe(split)


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def _differences(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    keys = sorted(set(stored) | set(expected))
    return [f"{key}: store {stored.get(key)!r} vs recipe {expected.get(key)!r}"
            for key in keys if stored.get(key) != expected.get(key)]


def check_store_folder(folder: Path, splits: Sequence[str]) -> None:
    """Refuse to rewrite a split folder that holds files a store does not write.

    A split whose folder is not in the manifest is rewritten from scratch: were ``cache.dir``
    mistyped onto a dataset's root (which holds ``train/``), that would delete the user's files.

    Raises:
        CacheError: naming the folder and the first foreign file.
    """
    for split in splits:
        split_dir = split_folder(folder, split)
        if not split_dir.is_dir():
            continue
        foreign = sorted(p.name for p in split_dir.iterdir()
                         if not (p.is_file() and (p.suffix == ".npy" or p.name == "index.json"
                                                  or p.name.startswith("."))))
        if foreign:
            raise CacheError(f"'{split_dir}' holds '{foreign[0]}'{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, "
                             f"which a logit store never writes: cache.dir '{folder}' is not a logit store "
                             "(set cache.dir to a new or empty folder); nothing was changed")


def split_state(folder: Path, split: str, fingerprint: dict[str, Any]) -> str | None:
    """What the store holds of ``split`` for ``fingerprint``, read only: ``"up to date"``,
    ``"resumed"`` (an interrupted write of it), or None (nothing of it, or of other inputs)."""
    manifest = read_manifest(folder) or {}
    if manifest.get("layout_version") not in (None, LAYOUT_VERSION):
        return None  # another layout version: every split is rewritten
    entry = manifest.get("splits", {}).get(split)
    files = _split_files(fingerprint, split_folder(folder, split))
    if entry is None or entry.get("fingerprint") != fingerprint or files.problems():
        return None
    complete = entry.get("complete") and bool(np.all(np.load(files.folder / "written.npy")))
    return "up to date" if complete else "resumed"


def _prepare_split(rest_temperature: float, split: str, folder: Path, fingerprint: dict[str, Any],
                   ids: list[str]) -> str:
    """Main process: make the split's folder ready to (re)write; returns what it found."""
    split_dir = split_folder(folder, split)
    state = split_state(folder, split, fingerprint)
    if state is not None:
        return state
    manifest = read_manifest(folder) or {}
    if manifest.get("layout_version") not in (None, LAYOUT_VERSION):
        manifest = {}
    entry = manifest.get("splits", {}).get(split)
    files = _split_files(fingerprint, split_dir)
    state = "rewritten" if entry is not None else "new"
    if entry is not None:
        logger.warning("rewriting split '%s' of the logit cache '%s': %s", split, folder,
                       "; ".join(_differences(entry.get("fingerprint", {}), fingerprint))
                       or "damaged files")
    shutil.rmtree(split_dir, ignore_errors=True)
    (split_dir).mkdir(parents=True, exist_ok=True)
    specs = {**files.specs, "written": ((len(ids),), np.dtype(np.uint8))}
    for name, (shape, dtype) in specs.items():
        array = np.lib.format.open_memmap(split_dir / f"{name}.npy", mode="w+",
                                          dtype=dtype, shape=shape)
        array.flush()
        del array
    atomic_write_text(split_dir / "index.json", json.dumps(ids) + "\n")
    _set_entry(rest_temperature, folder, split, fingerprint, complete=False)
    return state


def _set_entry(rest_temperature: float, folder: Path, split: str, fingerprint: dict[str, Any], *,
               complete: bool) -> None:
    manifest = read_manifest(folder) or {}
    if manifest.get("layout_version") != LAYOUT_VERSION:
        manifest = {}
    manifest.update(format=FORMAT, layout_version=LAYOUT_VERSION)
    manifest.setdefault("splits", {})[split] = {
        "fingerprint": fingerprint,
        "complete": complete,
        "info": {
            "downsample": "area (average pooling); bilinear where the teacher's map is coarser",
            "rest_temperature": rest_temperature if fingerprint["layout"] == "topk" else None,
            "stored_size": list(fingerprint_stored_size(fingerprint)),
        },
    }
    _write_manifest(folder, manifest)
