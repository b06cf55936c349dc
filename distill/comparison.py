"""``distill compare RECIPE [split=val]``: what the student kept of the teacher.

Evaluates the teacher, the distilled student and, when ``<output_dir>/baseline/best.safetensors``
exists, the student trained without a teacher, on the same split with the same metric code
(:func:`distill.evaluation.evaluate_model`, across processes under ``accelerate launch``). Then, on the main
process only, it measures each model's size and speed and writes ``<output_dir>/compare/``:

- ``compare.json``: every number below, the resolved recipe's sha256 and each checkpoint's sha256;
- ``compare.png``: per-class IoU bars, and a few images with ground truth and each model's
  prediction in the dataset's palette;
- ``recipe.yaml``: the resolved recipe the numbers come from.

Conventions (also in the JSON): GFLOPs = 2 x multiply-accumulates (``FLOPS_CONVENTION``); latency
= median ms of batch-1 forward passes on the current device after warm-up, the models' timed runs
interleaved so that load from other processes hits each alike; ratios = model / teacher.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

from distill._io import atomic_write_bytes, atomic_write_text, file_digest
from distill.config import Recipe, recipe_to_yaml, save_resolved_recipe
from distill.data import DatasetInfo, build_dataset, build_loader, dataset_info
from distill.export import json_text
from distill.evaluation import evaluate_model
from distill.models import build_model, count_parameters, forward_padded
from distill.export.predict import CONFIG_NAME
from distill.progress import console
from distill.export.quantize import OnnxSegmenter
from distill.run_folder import StageFiles, compare_dir, ensure_writable_folder, exclusive_folder, export_dir
from distill.stage_weights import (baseline_weights, check_normalization, trained_weights, weights_digest,
                                   weights_files)
from distill.teacher import scoring_teacher
from distill.teacher.sources import OnnxTeacher
from distill.launch import is_launch_main, make_accelerator

IGNORE_COLOUR = (255, 255, 255)
MAX_BARS = 30  # classes shown in the IoU bar chart
FLOPS_CONVENTION = (
    "FLOPs per image = 2 x multiply-accumulates, counted by torch.utils.flop_counter.FlopCounterMode "
    "(convolutions and matrix products; element-wise ops, pooling and resizing not counted), one "
    "image at the evaluation resolution padded to a multiple of 32"
)


class CompareError(ValueError):
    """The comparison cannot run (a missing section, an unwritable folder); the message says why."""


def _checkpoints(recipe: Recipe) -> dict[str, Path]:
    if recipe.student is None:
        raise CompareError("the recipe has no `student` section: compare needs a teacher and a student "
                           "(for one model use `distill eval RECIPE`)")
    if recipe.teacher is None:
        raise CompareError("the recipe has no `teacher` section: compare needs a teacher and a student")
    found = {"teacher": trained_weights(recipe, "teacher"), "student": trained_weights(recipe, "student")}
    for stage, weights in found.items():
        check_normalization(recipe, weights, stage)
    baseline = baseline_weights(recipe)
    if baseline is not None and _baseline_is_current(recipe, baseline):
        found["baseline"] = baseline
    return found


def _baseline_is_current(recipe: Recipe, weights: Path) -> bool:
    """Whether the baseline folder's weights were trained from this recipe's baseline settings
    (its ``recipe.yaml`` says); a gain over a baseline of another student or schedule would
    describe nothing. A folder without that record is taken as it is."""
    from distill.config import RECIPE_FILE, RecipeError, load_recipe
    from distill._checkpoint import flat_config
    from distill.fingerprint import stage_inputs

    saved = weights.parent / RECIPE_FILE
    if not saved.is_file():
        return True
    try:
        trained = flat_config(stage_inputs(load_recipe(saved), "baseline"))
    except (RecipeError, OSError, ValueError) as error:  # e.g. written by another distill version
        if is_launch_main():
            console.print(f"[yellow]{saved} cannot be read ({str(error).splitlines()[0]}): the baseline "
                          "beside it is compared without knowing what trained it")
        return True
    wanted = flat_config(stage_inputs(recipe, "baseline"))
    differ = [key for key in sorted(set(trained) | set(wanted)) if trained.get(key) != wanted.get(key)]
    if differ and is_launch_main():
        shown = "; ".join(f"{key}: {trained.get(key)!r} there, {wanted.get(key)!r} here" for key in differ[:3])
        console.print(f"[yellow]{weights} was trained from other settings ({shown}"
                      f"{f'; {len(differ) - 3} more' if len(differ) > 3 else ''}): the baseline is not "
                      "compared (train it again: `distill train RECIPE --stage baseline`)")
    return not differ



def exported_students(recipe: Recipe, student: Path) -> dict[str, Path]:
    """The export's ONNX files when it holds an INT8 student made from ``student``'s weights.

    Rows ``student_onnx`` (FP32) and ``student_int8`` then join the comparison: the INT8 one is
    what its accuracy and speed are judged against. An export of other weights is left out (and
    said so), since its figures would not describe this student.
    """
    folder = export_dir(recipe)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return {}
    files = config.get("files", {})
    if "onnx_int8" not in files or "onnx" not in files:
        return {}
    if config.get("source", {}).get("checkpoint_sha256") != file_digest(student):
        console.print(f"[yellow]{folder} was exported from other weights than {student}: its INT8 "
                      "student is not compared (export again)")
        return {}
    fixed = (config.get("onnx") or {}).get("fixed_size")
    if fixed is not None and fixed != list(recipe.data.resize or []):
        console.print(f"[yellow]{folder} holds graphs for {fixed[0]}x{fixed[1]} images only (export.fixed_size), "
                      f"this comparison uses data.resize={recipe.data.resize}: its INT8 student is not "
                      "compared (export again)")
        return {}
    paths = {"student_onnx": folder / files["onnx"], "student_int8": folder / files["onnx_int8"]}
    return paths if all(p.is_file() for p in paths.values()) else {}


def _exported(path: Path, threads: int | None) -> OnnxSegmenter:
    """The export's ONNX student in onnxruntime; a file it cannot read stops the comparison
    before any model is scored, naming the file."""
    try:
        return OnnxSegmenter(path, threads)
    except Exception as error:  # onnxruntime raises its own types for truncated or foreign files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompareError(f"ONNX model '{path}' cannot be loaded (truncated or not an ONNX file?): "
                           f"{first}; export the student again") from None


def _build(recipe: Recipe, name: str, checkpoint: Path, info: DatasetInfo) -> nn.Module:
    if name == "teacher":  # from its source, through its class map (at T=1)
        return scoring_teacher(recipe, info.num_classes, checkpoint)
    model = build_model(recipe.student_model.model_copy(update={"checkpoint": checkpoint, "encoder_weights": None}),
                        info.num_classes)
    return model.eval()


@torch.no_grad()
def count_gflops(model: nn.Module, image: torch.Tensor) -> float:
    """GFLOPs of one forward pass (see the module doc for the convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        forward_padded(model, image)
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def measure_latency(models: dict[str, nn.Module], image: torch.Tensor, *, runs: int, warmup: int
                    ) -> dict[str, float]:
    """Median ms per batch-1 forward of each model, timed runs interleaved across models."""
    sync = torch.cuda.synchronize if image.device.type == "cuda" else (lambda: None)
    for model in models.values():
        for _ in range(warmup):
            forward_padded(model, image)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(max(1, runs)):
        for name, model in models.items():
            sync()
            start = time.perf_counter()
            forward_padded(model, image)
            sync()
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def _size(model: nn.Module, student: nn.Module, image: torch.Tensor) -> dict[str, float | None]:
    """``parameters`` and ``gflops`` of one compared model. An ONNX student is the student's
    network: its counts are the student's. An ONNX teacher runs in onnxruntime, where torch sees
    no parameters and no operations: its graph's weights are counted, its GFLOPs are unknown."""
    if isinstance(model, OnnxSegmenter):
        model = student
    graphs = [m for m in model.modules() if isinstance(m, OnnxTeacher)]
    if graphs:
        return {"parameters": sum(graph.parameter_count() for graph in graphs), "gflops": None}
    return {"parameters": count_parameters(model), "gflops": count_gflops(model, image)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def compare(recipe: Recipe, split: str | None = None, *, latency_runs: int = 20, warmup_runs: int = 3,
            num_examples: int = 4, threads: int | None = None) -> dict[str, Any]:
    """Compare teacher, student (and baseline) on ``split``; print tables, write JSON and PNG.

    Args:
        recipe: a resolved recipe with ``teacher`` and ``student`` sections.
        split: the split (or selector) evaluated and shown in the PNG; default
            ``recipe.eval_split`` (``eval.split``, else ``data.val_split``).
        latency_runs, warmup_runs: timed and untimed batch-1 forward passes per model.
        num_examples: images shown with their predictions in ``compare.png``.
        threads: CPU threads for the latency runs (``torch.set_num_threads``, restored after);
            None keeps the current setting. The count used is written into the JSON.

    Returns:
        The report written to ``compare.json`` (on the main process; other processes get the
        evaluation part only, without sizes, speeds or outputs).

    Raises:
        CompareError: no teacher or student section, or ``<output_dir>/compare`` not writable.
        ModelError: a missing checkpoint (the message names the command that writes it), or one
            that does not fit its model.
    """
    split = split or recipe.eval_split
    checkpoints = _checkpoints(recipe)
    out = compare_dir(recipe)
    ensure_writable_folder(out, "comparison", CompareError)
    accelerator = make_accelerator(recipe, out)
    with exclusive_folder(out, accelerator):  # one writer per comparison folder
        main = accelerator.is_main_process
        info = dataset_info(recipe.data)
        models = {name: _build(recipe, name, path, info).to(accelerator.device)
                  for name, path in checkpoints.items()}
        for name, path in exported_students(recipe, checkpoints["student"]).items():
            models[name], checkpoints[name] = _exported(path, threads), path
        loader = accelerator.prepare(build_loader(recipe.data, split, train=False, seed=recipe.train.seed,
                                                  label_resolution=recipe.eval.resolution == "label"))
        scores = {name: evaluate_model(model, loader, accelerator, num_classes=info.num_classes,
                                 ignore_index=info.ignore_index, progress_label=f"eval {name} on {split}")
                  for name, model in models.items()}
        report: dict[str, Any] = {
            "split": split,
            "teacher": {"source": recipe.teacher.source, "path": recipe.teacher.path,
                        "class_map": recipe.teacher.class_map is not None},
            "resolution": recipe.eval.resolution,
            "recipe_sha256": hashlib.sha256(recipe_to_yaml(recipe).encode()).hexdigest(),
            "processes": accelerator.num_processes,
            "models": {name: {"checkpoint": str(checkpoints[name]), "miou": _nan_to_none(s.miou),
                              "pixel_accuracy": _nan_to_none(s.pixel_accuracy),
                              "iou": {c: _nan_to_none(v) for c, v in zip(info.class_names, s.iou)}}
                       for name, s in scores.items()},
        }
        if main:
            _measure_and_write(recipe, split, info, models, checkpoints, report, out,
                               latency_runs=latency_runs, warmup_runs=warmup_runs, num_examples=num_examples,
                               device=accelerator.device, threads=threads)
        accelerator.wait_for_everyone()
    return report


def _measure_and_write(recipe: Recipe, split: str, info: DatasetInfo, models: dict[str, nn.Module],
                       checkpoints: dict[str, Path], report: dict[str, Any], out: Path, *,
                       latency_runs: int, warmup_runs: int, num_examples: int,
                       device: torch.device, threads: int | None) -> None:
    dataset = build_dataset(recipe.data, split, train=False, seed=recipe.train.seed)
    image = dataset[0]["image"][None].to(device)
    saved_threads = torch.get_num_threads()
    used_threads = threads or saved_threads
    try:
        torch.set_num_threads(used_threads)
        latency = measure_latency(models, image, runs=latency_runs, warmup=warmup_runs)
    finally:
        torch.set_num_threads(saved_threads)
    for name, model in models.items():
        report["models"][name].update(
            **_size(model, models["student"], image), latency_ms=latency[name],
            checkpoint_bytes=sum(f.stat().st_size for f in weights_files(checkpoints[name])),
            checkpoint_sha256=weights_digest(checkpoints[name]))
    metrics = ("miou", "pixel_accuracy", "parameters", "gflops", "checkpoint_bytes", "latency_ms")
    teacher = report["models"]["teacher"]
    report["ratios"] = {f"{name}/teacher": {m: _ratio(report["models"][name][m], teacher[m]) for m in metrics}
                        for name in models if name != "teacher"}
    if "student_int8" in models:
        report["ratios"]["student_int8/student_onnx"] = {
            m: _ratio(report["models"]["student_int8"][m], report["models"]["student_onnx"][m]) for m in metrics}
    if device.type != "cpu":  # the ONNX students run on the CPU: no latency ratio across devices
        for ratio in ("student_onnx/teacher", "student_int8/teacher"):
            if ratio in report["ratios"]:
                report["ratios"][ratio]["latency_ms"] = None
    scored = report["models"]
    if "baseline" in scored and None not in (scored["student"]["miou"], scored["baseline"]["miou"]):
        gain = scored["student"]["miou"] - scored["baseline"]["miou"]
        gap = None if scored["teacher"]["miou"] is None else scored["teacher"]["miou"] - scored["baseline"]["miou"]
        report["distillation"] = {"gain": gain, "gap": gap,
                                  "gap_recovered": gain / gap if gap is not None and gap > 0 else None}
    report["per_class"] = per_class_rows(report, info.class_names)
    report["eval_resolution"] = list(image.shape[-2:])
    report["num_images"] = len(dataset)
    report["conventions"] = {
        "gflops": FLOPS_CONVENTION,
        "latency_ms": f"median of {latency_runs} batch-1 forward passes on {device} after "
                      f"{warmup_runs} warm-up runs, interleaved across models",
        "latency_threads": used_threads,
        "checkpoint_bytes": "file size on disk",
        "onnx": "student_onnx and student_int8 are the export's ONNX files under onnxruntime (CPU); "
                "their parameters and GFLOPs are the student's",
        "ratios": "model / teacher",
    }
    png, json_path = out / "compare.png", out / "compare.json"
    report["outputs"] = {"json": str(json_path), "png": str(png)}
    console.print(summary_table(report))
    console.print(per_class_table(report))
    examples = example_predictions(dataset, models, num_examples, device)
    # Everything made before the first file is replaced: a stop (or a failure) while rendering
    # leaves the earlier report whole, never a picture of one split beside the numbers of another.
    png_bytes, text = render_png(report, info, examples), json_text(report)
    # `distill run` calls the folder up to date while its done.json holds the fingerprint it
    # wrote: a report written outside it (another split, other settings) is not that one.
    StageFiles(out).done.unlink(missing_ok=True)
    atomic_write_bytes(png, png_bytes)
    save_resolved_recipe(recipe, out)
    atomic_write_text(json_path, text)
    console.print(f"wrote {json_path} and {png}")


# --------------------------------------------------------------------------------------------
# Tables


def per_class_rows(report: dict[str, Any], class_names: list[str]) -> list[dict[str, Any]]:
    """One row per class, worst student-minus-teacher delta first (classes without IoU last)."""
    models = report["models"]
    rows = []
    for name in class_names:
        row: dict[str, Any] = {"class": name, **{model: models[model]["iou"][name] for model in models}}
        row["student_minus_teacher"] = _minus(row["student"], row["teacher"])
        if "baseline" in models:
            row["student_minus_baseline"] = _minus(row["student"], row["baseline"])
        rows.append(row)
    return sorted(rows, key=lambda r: (r["student_minus_teacher"] is None, r["student_minus_teacher"] or 0.0))


def _fmt(metric: str, value: float | None) -> str:
    if value is None or value != value:
        return "-"
    if metric in ("miou", "pixel_accuracy"):
        return f"{100 * value:.1f}"
    if metric == "parameters":
        return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{int(value):,}"
    if metric == "gflops":
        return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"
    if metric == "checkpoint_bytes":
        return f"{value / 1e6:.1f} MB" if value >= 1e5 else f"{value / 1e3:.1f} kB"
    return f"{value:.1f} ms" if value >= 1 else f"{value:.3f} ms"


LABELS = {"miou": "mIoU (%)", "pixel_accuracy": "pixel accuracy (%)", "parameters": "parameters",
          "gflops": "GFLOPs / image", "checkpoint_bytes": "checkpoint size", "latency_ms": "latency (batch 1)"}


# Models followed by a ratio column: (key in report["ratios"], column title).
RATIO_COLUMNS = {"student": ("student/teacher", "student / teacher"),
                 "student_int8": ("student_int8/student_onnx", "INT8 / FP32 ONNX")}


def summary_table(report: dict[str, Any]) -> Table:
    """Metrics of each model with the student/teacher ratio."""
    models = report["models"]
    height, width = report["eval_resolution"]
    table = Table(title=f"teacher vs student on {report['split']} ({report['num_images']} images, {height}x{width})")
    table.add_column("")
    for name in models:
        table.add_column(name, justify="right")
        if name in RATIO_COLUMNS:
            table.add_column(RATIO_COLUMNS[name][1], justify="right")
    for metric, label in LABELS.items():
        cells = []
        for name in models:
            cells.append(_fmt(metric, models[name][metric]))
            if name in RATIO_COLUMNS:
                ratio = report["ratios"][RATIO_COLUMNS[name][0]][metric]
                cells.append("-" if ratio is None else f"{ratio:.2f}x")
        table.add_row(label, *cells)
    conventions = report["conventions"]
    notes = [f"GFLOPs = 2 x multiply-accumulates (FlopCounterMode); latency: {conventions['latency_ms']}, "
             f"{conventions['latency_threads']} CPU threads"]
    if "baseline" in models and None not in (models["student"]["miou"], models["baseline"]["miou"]):
        gain = models["student"]["miou"] - models["baseline"]["miou"]
        notes.insert(0, f"distillation gain over the baseline: {100 * gain:+.1f} mIoU points")
    teacher = report.get("teacher", {})
    if teacher.get("class_map"):
        notes.append(f"teacher ({teacher['source']}) scored on the student's classes through teacher.class_map")
    scale = "the labels' own" if report.get("resolution") == "label" else "the data.resize frame's"
    notes.append(f"mIoU at {scale} resolution")
    table.caption = "\n".join(notes)
    return table


def per_class_table(report: dict[str, Any]) -> Table:
    """IoU per class, worst student-minus-teacher delta first."""
    baseline = "baseline" in report["models"]
    table = Table(title="IoU per class (%), worst student - teacher first")
    for column in ["class", "teacher", "student", "student - teacher"] + (
            ["baseline", "student - baseline"] if baseline else []):
        table.add_column(column, justify="left" if column == "class" else "right")

    def cell(value: float | None, delta: bool = False) -> str:
        if value is None or not delta:
            return "absent" if value is None else f"{100 * value:.1f}"
        return f"[{'red' if value < -0.005 else 'green' if value > 0.005 else 'white'}]{100 * value:+.1f}[/]"

    for row in report["per_class"]:
        cells = [row["class"], cell(row["teacher"]), cell(row["student"]), cell(row["student_minus_teacher"], True)]
        if baseline:
            cells += [cell(row["baseline"]), cell(row["student_minus_baseline"], True)]
        table.add_row(*cells)
    return table


# --------------------------------------------------------------------------------------------
# The figure


@torch.no_grad()
def example_predictions(dataset, models: dict[str, nn.Module], count: int, device: torch.device
                        ) -> list[dict[str, Any]]:
    """``count`` images spread over the split: RGB uint8, label map and each model's argmax."""
    picks = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, min(count, len(dataset)))})
    examples = []
    for index in picks:
        item = dataset[index]
        image = item["image"][None].to(device)
        size = item["mask"].shape[-2:]
        predictions = {}
        for name, model in models.items():
            logits = forward_padded(model, image)
            if logits.shape[-2:] != size:  # a map coarser than the frame: resized as evaluation does
                logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
            predictions[name] = logits.argmax(1)[0].cpu().numpy()
        examples.append({"id": dataset.sample_id(index), "image": dataset.load_raw(index)[0],
                         "mask": item["mask"].numpy(), "predictions": predictions})
    return examples


def colourise(labels: np.ndarray, palette: list[tuple[int, int, int]], ignore_index: int) -> np.ndarray:
    """Class ids [H, W] -> RGB uint8 [H, W, 3]; ignore_index (and anything unknown) white."""
    table = np.array(list(palette) + [IGNORE_COLOUR], dtype=np.uint8)
    index = np.where((labels >= 0) & (labels < len(palette)), labels, len(palette))
    return table[index]


def render_png(report: dict[str, Any], info: DatasetInfo, examples: list[dict[str, Any]]) -> bytes:
    """Per-class IoU bars above a grid of examples (image, ground truth, each model), as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    # The FP32 ONNX student predicts what the eager one does (export parity): not drawn twice.
    names, rows = [n for n in report["models"] if n != "student_onnx"], len(examples)
    colours = {"teacher": "#4c72b0", "student": "#dd8452", "baseline": "#8c8c8c", "student_int8": "#55a868"}
    # The colour key lists the classes visible in the examples (all of them for small datasets).
    seen = sorted({int(c) for e in examples for m in [e["mask"], *e["predictions"].values()]
                   for c in np.unique(m) if 0 <= c < info.num_classes})
    columns, key_columns = 2 + len(names), 8
    height, width = examples[0]["image"].shape[:2] if examples else (1, 1)
    cell_h = 2.6 * height / width
    key_h = 0.3 + 0.2 * math.ceil((len(seen) + 1) / key_columns)
    ratios = [3.6, 0.7] + [cell_h] * rows + [key_h]  # bars, room for class names, examples, key
    fig = Figure(figsize=(2.6 * columns, sum(ratios) + 0.5), dpi=110)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(ratios), columns, height_ratios=ratios, hspace=0.25, wspace=0.03,
                            left=0.06, right=0.99, top=0.96, bottom=0.01)

    bars = fig.add_subplot(grid[0, :])
    shown = list(info.class_names)
    title = f"per-class IoU on {report['split']} ({report['num_images']} images)"
    if len(shown) > MAX_BARS:  # e.g. ADE20K's 150: the classes the student lost most on
        shown = [row["class"] for row in report["per_class"][:MAX_BARS]]
        title += f", the {MAX_BARS} classes with the lowest student - teacher"
    x, step = np.arange(len(shown)), 0.8 / len(names)
    for k, name in enumerate(names):
        heights = [100 * (report["models"][name]["iou"][c] or 0.0) for c in shown]
        miou = 100 * (report["models"][name]["miou"] or 0.0)
        bars.bar(x - 0.4 + step * (k + 0.5), heights, step, color=colours[name], label=f"{name} (mIoU {miou:.1f})")
    tilt = len(x) > 6
    bars.set_xticks(x, shown, rotation=30 if tilt else 0, ha="right" if tilt else "center", fontsize=8)
    bars.set(ylabel="IoU (%)", ylim=(0, 100), xlim=(-0.6, len(x) - 0.4))
    bars.grid(axis="y", alpha=0.3)
    bars.legend(loc="upper right", fontsize=8, ncol=len(names))
    bars.set_title(title, fontsize=10)

    for row, example in enumerate(examples):
        mask, valid = example["mask"], example["mask"] != info.ignore_index
        panels = {Path(example["id"]).name: example["image"],
                  "ground truth": colourise(mask, info.palette, info.ignore_index)}
        for name in names:
            prediction = example["predictions"][name]
            accuracy = 100 * float((prediction[valid] == mask[valid]).mean()) if valid.any() else float("nan")
            panels[f"{name}: {accuracy:.0f}% px acc"] = colourise(prediction, info.palette, info.ignore_index)
        for col, (caption, panel) in enumerate(panels.items()):
            axis = fig.add_subplot(grid[2 + row, col])
            axis.imshow(panel, interpolation="nearest")
            axis.set(xticks=[], yticks=[])
            axis.set_title(caption, fontsize=7, pad=2)

    key = fig.add_subplot(grid[2 + rows, :])
    key.axis("off")
    handles = [Patch(color=np.array(info.palette[c]) / 255, label=info.class_names[c]) for c in seen]
    handles.append(Patch(facecolor="white", edgecolor="black", label="ignored"))
    key.legend(handles=handles, loc="center", ncol=min(len(handles), key_columns), fontsize=8, frameon=False,
               title="colours (ground truth and predictions)", title_fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
