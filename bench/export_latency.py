"""Benchmark: the exported student, FP32 and INT8, under onnxruntime vs eager PyTorch, CPU, batch 1.

The model is the CamVid CPU recipe's student (DeepLabV3+ / ``tu-mobilenetv3_large_100``, 11
classes), randomly initialised unless ``--checkpoint`` is given (latency does not depend on the
weights), at CamVid's own resolution 360x480. The ONNX file is written by
:func:`distill.export.export_onnx`, the same code ``distill export`` runs (pad to 32 and crop
back inside the graph); its INT8 version by :func:`distill.export.quantize.quantize_onnx`, as
``distill export format=onnx_int8`` does (QDQ, per-channel int8 weights, uint8 activations),
calibrated on ``--calibration`` images: random ones, or the recipe's training images with
``--data-root`` (latency does not depend on them; the ranges, and so the accuracy, do: the
accuracy figure is in ``parity.json`` of a real export). Eager runs
:func:`distill.models.forward_padded` under ``torch.inference_mode``.

The variants run on the same input, one timed call each per repeat in a fresh random order,
each after a pause of ``SETTLE_S`` (libgomp's and onnxruntime's idle threads spin a while after
a call; without the pause the next variant shares the cores with them), so load from other
processes on a shared machine hits every variant alike; each figure is the median over repeats. Both runtimes get the same thread count (``--threads``, default 2:
``torch.set_num_threads`` and onnxruntime's ``intra_op_num_threads``, ``inter_op_num_threads=1``).
Several counts (``--threads 2 1``) are measured one after the other. The 1-minute load average
is recorded before and after each count: on a loaded machine the figures move a lot.

Targets: onnxruntime at most 0.8x the eager latency; the INT8 model at most 0.5x the FP32
onnxruntime latency and 0.3x its file size.

With ``--fixed-size``, the graphs ``distill export`` writes with ``export.fixed_size: true`` (this
``--size`` only; paddings become constants that onnxruntime folds into the convolutions) are timed
too, FP32 and INT8, in the same interleaved runs.

Usage: ``python bench/export_latency.py [--checkpoint PATH] [--data-root data/camvid]
[--threads 2 1] [--repeats 30] [--fixed-size] [--out bench/results/export_latency.json]``
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import platform
import statistics
import tempfile
import time
from pathlib import Path

import distill  # noqa: F401  (first: lets torchvision import on this machine, see distill/_compat.py)
import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from rich.table import Table

from distill.config import ModelConfig
from distill.config import load_recipe
from distill.export import export_onnx
from distill.models import build_model, forward_padded
from distill.export.quantize import calibration_images, quantize_onnx

from benchlib import save_json

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "camvid" / "dlv3p-r50_to_dlv3p-mbv3_cpu.yaml"
TARGET = 0.8
SETTLE_S = 0.2  # pause before each timed run, so that no variant pays for the last one's spinning threads
INT8_TARGET = 0.5  # INT8 / FP32 onnxruntime latency (the project's figure)
INT8_SIZE_TARGET = 0.3
console = Console(width=None if Console().is_terminal else 140)


def student_spec(recipe: Path) -> ModelConfig:
    """The recipe's student section (read as YAML: the data folder need not exist here)."""
    tree = yaml.safe_load(recipe.read_text())
    return ModelConfig(**{k: v for k, v in tree["student"].items() if k != "checkpoint"})


def make_session(path: Path, threads: int, spinning: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(model: torch.nn.Module, onnx_path: Path, int8_path: Path, image: torch.Tensor, threads: int,
            repeats: int, warmup: int, fixed: tuple[Path, Path] | None = None) -> dict:
    torch.set_num_threads(threads)
    session = make_session(onnx_path, threads)
    int8_session = make_session(int8_path, threads)
    array = image.numpy()
    # Eager in channels-last memory format too: often faster on CPU, so the ratio is also given
    # against the better of the two eager layouts.
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    image_cl = image.contiguous(memory_format=torch.channels_last)
    variants = {
        "eager": lambda: forward_padded(model, image),
        "eager_channels_last": lambda: forward_padded(model_cl, image_cl),
        "onnxruntime": lambda: session.run(None, {"image": array}),
        "onnxruntime_int8": lambda: int8_session.run(None, {"image": array}),
    }
    if fixed is not None:  # the graphs of export.fixed_size: paddings folded into the convolutions
        fixed_session, fixed_int8_session = (make_session(path, threads) for path in fixed)
        variants["onnxruntime_fixed"] = lambda: fixed_session.run(None, {"image": array})
        variants["onnxruntime_int8_fixed"] = lambda: fixed_int8_session.run(None, {"image": array})
    with torch.inference_mode():
        eager_out = forward_padded(model, image).numpy()
        onnx_out = session.run(None, {"image": array})[0]
        int8_out = int8_session.run(None, {"image": array})[0]
        for _ in range(warmup):
            for run in variants.values():
                run()
        load_before = os.getloadavg()[0]
        times: dict[str, list[float]] = {name: [] for name in variants}
        shuffler = random.Random(threads)
        for _ in range(repeats):
            order = list(variants)
            shuffler.shuffle(order)  # no variant always follows another
            for name in order:
                # The previous variant's idle threads (libgomp's, onnxruntime's pool) spin a while
                # after it returns; without a pause they take the cores from the next one.
                time.sleep(SETTLE_S)
                start = time.perf_counter()
                variants[name]()
                times[name].append(1000 * (time.perf_counter() - start))
        load_after = os.getloadavg()[0]
    medians = {name: statistics.median(values) for name, values in times.items()}
    quartiles = {name: [float(np.percentile(v, 25)), float(np.percentile(v, 75))] for name, v in times.items()}
    fixed_ratios = {}
    if fixed is not None:
        fixed_ratios = {
            "ratio_int8_fixed_to_onnxruntime_fixed": medians["onnxruntime_int8_fixed"] / medians["onnxruntime_fixed"],
            "ratio_int8_fixed_to_onnxruntime": medians["onnxruntime_int8_fixed"] / medians["onnxruntime"],
            "int8_fixed_meets_target": medians["onnxruntime_int8_fixed"] / medians["onnxruntime_fixed"] <= INT8_TARGET,
        }
    return {
        "threads": threads,
        "median_ms": medians,
        "iqr_ms": quartiles,
        "ratio_onnxruntime_to_eager": medians["onnxruntime"] / medians["eager"],
        "ratio_onnxruntime_to_best_eager": medians["onnxruntime"] / min(medians["eager"],
                                                                        medians["eager_channels_last"]),
        "ratio_int8_to_onnxruntime": medians["onnxruntime_int8"] / medians["onnxruntime"],
        "max_abs_diff": float(np.abs(onnx_out - eager_out).max()),
        "argmax_agreement": float((onnx_out.argmax(1) == eager_out.argmax(1)).mean()),
        "int8_argmax_agreement": float((int8_out.argmax(1) == onnx_out.argmax(1)).mean()),
        "load_average_1min": {"before": load_before, "after": load_after},
        "meets_target": medians["onnxruntime"] / medians["eager"] <= TARGET,
        "int8_meets_target": medians["onnxruntime_int8"] / medians["onnxruntime"] <= INT8_TARGET,
        **fixed_ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="recipe whose student is measured")
    parser.add_argument("--checkpoint", type=Path, default=None, help="student weights (default: random)")
    parser.add_argument("--classes", type=int, default=11, help="output classes (CamVid: 11)")
    parser.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--data-root", type=Path, default=None,
                        help="calibrate INT8 on the recipe's training images here (default: random images)")
    parser.add_argument("--calibration", type=int, default=32, help="INT8 calibration images")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--fixed-size", action="store_true",
                        help="also time the graphs of export.fixed_size (this --size only), FP32 and INT8")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "export_latency.json")
    args = parser.parse_args()

    spec = student_spec(args.recipe)
    if args.checkpoint is not None:
        spec = spec.model_copy(update={"checkpoint": args.checkpoint})
    torch.manual_seed(0)
    model = build_model(spec.model_copy(update={"encoder_weights": None}), args.classes).eval()
    image = torch.randn(1, 3, *args.size)
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = Path(folder) / "student.onnx"
        exporter = export_onnx(model, onnx_path, image, args.opset)
        onnx_bytes = onnx_path.stat().st_size
        int8_path = Path(folder) / "student_int8.onnx"
        if args.data_root is not None:
            recipe = load_recipe(args.recipe, [f"data.root={args.data_root}"])
            calibration = list(calibration_images(recipe, args.calibration))
        else:
            generator = torch.Generator().manual_seed(0)
            calibration = [torch.randn(1, 3, *args.size, generator=generator).numpy()
                           for _ in range(args.calibration)]
        quantized = quantize_onnx(onnx_path, int8_path, calibration)
        fixed, fixed_quantized = None, None
        if args.fixed_size:
            fixed = (Path(folder) / "student_fixed.onnx", Path(folder) / "student_int8_fixed.onnx")
            export_onnx(model, fixed[0], image, args.opset, fixed_size=True)
            # A fixed graph takes --size only: the recipe's frames are resized to it.
            sized = [F.interpolate(torch.from_numpy(a), size=tuple(args.size), mode="bilinear",
                                   align_corners=False).numpy() for a in calibration]
            fixed_quantized = quantize_onnx(fixed[0], fixed[1], sized)
        results = [measure(model, onnx_path, int8_path, image, t, args.repeats, args.warmup, fixed)
                   for t in args.threads]

    table = Table(title=f"{spec.arch} / {spec.encoder}, {args.classes} classes, batch 1, "
                        f"{args.size[0]}x{args.size[1]}, CPU, median of {args.repeats} interleaved runs")
    for column in ("threads", "eager", "eager channels_last", "onnxruntime", "ort / eager",
                   "ort / best eager", "ort INT8", "INT8 / ort", "max |diff|", "load 1 min"):
        table.add_column(column, justify="right")
    for r in results:
        ratio, best = r["ratio_onnxruntime_to_eager"], r["ratio_onnxruntime_to_best_eager"]
        load = r["load_average_1min"]
        ms, int8 = r["median_ms"], r["ratio_int8_to_onnxruntime"]
        table.add_row(str(r["threads"]), f"{ms['eager']:.1f} ms", f"{ms['eager_channels_last']:.1f} ms",
                      f"{ms['onnxruntime']:.1f} ms", f"[{'green' if ratio <= TARGET else 'red'}]{ratio:.2f}x",
                      f"[{'green' if best <= TARGET else 'red'}]{best:.2f}x", f"{ms['onnxruntime_int8']:.1f} ms",
                      f"[{'green' if int8 <= INT8_TARGET else 'red'}]{int8:.2f}x", f"{r['max_abs_diff']:.1e}",
                      f"{load['before']:.2f} -> {load['after']:.2f}")
        if fixed is not None:
            int8_fixed = r["ratio_int8_fixed_to_onnxruntime_fixed"]
            table.add_row(f"{r['threads']}, fixed size", "", "", f"{ms['onnxruntime_fixed']:.1f} ms", "", "",
                          f"{ms['onnxruntime_int8_fixed']:.1f} ms",
                          f"[{'green' if int8_fixed <= INT8_TARGET else 'red'}]{int8_fixed:.2f}x", "", "")
    size_ratio = quantized["int8_bytes"] / onnx_bytes
    floats = ", ".join(f"{op} x{n}" for op, n in quantized["float_ops"].items()) or "none"
    table.caption = (f"targets: onnxruntime <= {TARGET}x eager; INT8 <= {INT8_TARGET}x onnxruntime FP32 and "
                     f"<= {INT8_SIZE_TARGET}x its size (INT8 file {size_ratio:.2f}x: "
                     f"{quantized['int8_bytes'] / 1e6:.1f} MB vs {onnx_bytes / 1e6:.1f} MB)\n"
                     f"operators onnxruntime runs in float in the INT8 graph: {floats}")
    console.print(table)

    report = {
        "model": {"arch": spec.arch, "encoder": spec.encoder, "classes": args.classes,
                  "weights": str(args.checkpoint) if args.checkpoint else "random (seed 0)"},
        "input": {"batch": 1, "height": args.size[0], "width": args.size[1]},
        "onnx": {"exporter": exporter, "opset": args.opset, "bytes": onnx_bytes},
        "int8": {**quantized, "size_ratio": size_ratio, "size_target": INT8_SIZE_TARGET,
                 "latency_target": INT8_TARGET,
                 "calibration": str(args.data_root) if args.data_root else "random normal images"},
        "int8_fixed": {"float_ops": fixed_quantized["float_ops"], "int8_bytes": fixed_quantized["int8_bytes"]}
        if fixed_quantized else None,
        "repeats": args.repeats, "warmup": args.warmup, "target_ratio": TARGET,
        "results": results,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": ort.__version__},
    }
    save_json(args.out, report)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
