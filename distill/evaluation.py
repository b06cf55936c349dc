"""Evaluation: the loop that scores a model on a loader, and ``distill eval`` around it.

``evaluate_model`` is the loop every stage uses (training's validation, eval, compare); it sums
per-sample confusion matrices across processes. ``evaluate`` builds the model and the split from
a recipe (or takes yours); ``evaluate_checkpoint`` is ``distill eval``: a table and a JSON file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from rich.table import Table
from torch.utils.data import Dataset

from distill.data.splits import file_safe
from distill.config import Recipe, atomic_write_text
from distill.launch import is_launch_main, make_accelerator
from distill.data import build_loader, dataset_info, loader_for_dataset
from distill.metrics import SegmentationScores, per_sample_confusion, scores_from_confusion
from distill.models import STAGES, ModelError, Stage, build_model, check_class_count, run_padded, stage_model
from distill.progress import console, track
from distill.run_folder import ensure_writable_folder, stage_dir
from distill.stage_weights import check_normalization, checkpoint_to_score
from distill.teacher import scoring_teacher


def evaluate(
    recipe: Recipe,
    stage: Stage = "student",
    *,
    model: torch.nn.Module | None = None,
    dataset: Dataset | None = None,
) -> SegmentationScores:
    """Score a model: mIoU, pixel accuracy and IoU per class (``scores.as_dict(names)``).

    Args:
        recipe: the settings; ``eval.split`` (default ``data.val_split``) is scored at the
            label's own resolution unless ``eval.resolution`` is ``frame``.
        stage: whose weights to load when ``model`` is not given: ``eval.checkpoint``, else the
            stage's ``best.safetensors`` in ``output_dir``.
        model: a model of your own to score (images -> logits), in place of a checkpoint.
        dataset: a dataset of your own in place of the split (see
            :func:`distill.data.loader_for_dataset`).
    """
    if stage not in STAGES:
        raise ModelError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    accelerator = make_accelerator(recipe)
    info = dataset_info(recipe.data)
    built = model is None
    if model is None and stage == "teacher":
        model = scoring_teacher(recipe, info.num_classes, checkpoint_to_score(recipe, stage))
    elif model is None:
        spec = stage_model(recipe, stage).model_copy(
            update={"checkpoint": checkpoint_to_score(recipe, stage), "encoder_weights": None})
        model = build_model(spec, info.num_classes)
    if dataset is not None:
        loader = loader_for_dataset(dataset, recipe.data, train=False, seed=recipe.train.seed)
    else:
        loader = build_loader(recipe.data, recipe.eval_split, train=False, seed=recipe.train.seed,
                              label_resolution=recipe.eval.resolution == "label")
    if not built:
        check_class_count(model, info.num_classes, "the model given to evaluate()", recipe.data.resize)
    # The model is only moved, not prepared: scoring needs no DDP wrapper, evaluate_model runs
    # under the recipe's autocast itself, and a model of the caller's keeps its own forward.
    device = next((p.device for p in model.parameters()), None)
    loader = accelerator.prepare(loader)
    try:
        return evaluate_model(model.to(accelerator.device), loader, accelerator, num_classes=info.num_classes,
                              ignore_index=info.ignore_index,
                              progress_label=f"eval {stage} on {recipe.eval_split}")
    finally:
        if not built and device is not None:  # the caller's model back where it was
            model.to(device)


def evaluate_checkpoint(recipe: Recipe, stage: Stage = "student") -> tuple[SegmentationScores, Path]:
    """``distill eval``: score a stage's checkpoint, print a table, write ``eval_<split>.json``
    (``eval_<split>@<file>.json`` for other weights than the stage's best: ``eval.checkpoint``, or
    a ``teacher.checkpoint`` outside the stage folder)."""
    from distill.data import build_dataset
    from distill.preflight import check_all

    found: dict[str, Path] = {}
    check_all(lambda: found.setdefault("weights", checkpoint_to_score(recipe, stage)),  # every problem at once
              lambda: build_dataset(recipe.data, recipe.eval_split, train=False),
              lambda: ensure_writable_folder(stage_dir(recipe, stage), "evaluation report"))
    checkpoint = found["weights"]
    check_normalization(recipe, checkpoint, stage)
    info = dataset_info(recipe.data)
    scores = evaluate(recipe, stage)
    out = stage_dir(recipe, stage) / f"eval_{file_safe(recipe.eval_split)}{_other_weights(recipe, stage, checkpoint)}.json"
    if is_launch_main():
        report = {"stage": stage, "split": recipe.eval_split, "checkpoint": str(Path(checkpoint).resolve()),
                  "resolution": recipe.eval.resolution, **scores.as_dict(info.class_names)}
        atomic_write_text(out, json.dumps(report, indent=2))
        console.print(scores_table(scores, info.class_names, f"{stage} on {recipe.eval_split}"))
        console.print(f"wrote {out}")
    return scores, out


def _other_weights(recipe: Recipe, stage: Stage, checkpoint: Path) -> str:
    """``""`` for the stage's own weights; else the report's name says which file it scored, so
    that ``eval_<split>.json`` always scores the weights beside it. ``@`` is the one separator
    :func:`file_safe` never leaves in a split's name: with ``_`` the split ``val`` scored on
    ``last.safetensors`` and the split ``val_last`` shared a report."""
    folder = stage_dir(recipe, stage).resolve()  # a teacher.checkpoint elsewhere is other weights too
    scored = Path(checkpoint).resolve()
    if scored == folder / "best.safetensors":
        return ""
    if scored.parent == folder:
        return f"@{file_safe(scored.stem)}"
    return f"@{file_safe(scored.stem)}-{hashlib.sha256(str(scored).encode()).hexdigest()[:8]}"


def scores_table(scores: SegmentationScores, class_names: list[str], title: str) -> Table:
    """A rich table: IoU per class, then mIoU and pixel accuracy."""
    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, value in zip(class_names, scores.iou):
        table.add_row(name, "absent" if value != value else f"{100 * value:.1f}")
    table.add_section()
    table.add_row("[bold]mIoU", f"[bold]{100 * scores.miou:.1f}")
    table.add_row("pixel accuracy", f"{100 * scores.pixel_accuracy:.1f}")
    return table


def model_logits(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[float, float]]:
    """The model's logits for a batch, and how many input pixels each of their pixels spans.

    A model that needs padding (:func:`distill.models.pad_multiple`) runs on the padded batch and
    its whole map is kept: cutting it to each image needs the exact span, which cropping the map to
    the batch's area first would round (a map at 1/4 of 501 rows is 125.25 output rows). A module
    that pads itself (``pads_itself``) returns its own crop; its span is read from the shapes.
    """
    logits, (height, width) = run_padded(model, images)
    return logits, (height / logits.shape[-2], width / logits.shape[-1])


def _predict_at_label_size(logits: torch.Tensor, batch: dict, span: tuple[float, float] = (1.0, 1.0)
                           ) -> torch.Tensor:
    """Argmax of the logits at each mask's own size, in a tensor shaped like the padded masks.

    Each sample's logits are first cut to its frame (the batch pads smaller images at the
    bottom/right): a map at 1/s (``span`` s) is upsampled whole to the padded input it covers
    and cut at the frame's edge, so that neither the padding nor a rounding stretches the
    prediction, exactly as the exported graph does; then resized to the mask.
    """
    mask = batch["mask"]
    sizes = batch.get("label_size", torch.tensor([mask.shape[-2:]] * mask.shape[0]))
    frames = batch["geometry"]["base_size"] if "geometry" in batch else sizes
    if bool((frames == frames[0]).all()) and bool((sizes == sizes[0]).all()):
        rows = [slice(None)]  # one frame and one label size: the whole batch at once
    else:
        rows = [slice(row, row + 1) for row in range(mask.shape[0])]
    prediction = torch.zeros_like(mask)
    for row in rows:
        first = row.start or 0
        h, w = (int(v) for v in frames[first])
        lh, lw = (int(v) for v in sizes[first])
        if span == (1.0, 1.0):
            part = logits[row, :, :h, :w]
        else:  # as the exported graph and `distill predict` do (export.student.PaddedSegmenter)
            covered = (round(logits.shape[-2] * span[0]), round(logits.shape[-1] * span[1]))
            part = torch.nn.functional.interpolate(logits[row].float(), size=covered, mode="bilinear",
                                                   align_corners=False)[..., :h, :w]
        if part.shape[-2:] != (lh, lw):
            part = torch.nn.functional.interpolate(part.float(), size=(lh, lw), mode="bilinear",
                                                   align_corners=False)
        prediction[row, :lh, :lw] = part.argmax(1)
    return prediction


def _predictions(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The argmax at each mask's size. Frames of one size run as one batch; frames of several
    sizes (no ``data.resize``) run one by one, each padded as ``distill predict`` pads a lone
    image: the batch's zero padding reaches into a frame through the model's context (and its
    image-level pooling), so the scores would depend on ``data.eval_batch_size``."""
    frames = batch["geometry"]["base_size"] if "geometry" in batch else None
    if frames is None or bool((frames == frames[0]).all()):
        logits, span = model_logits(model, batch["image"])
        return _predict_at_label_size(logits, batch, span)
    prediction = torch.zeros_like(batch["mask"])
    for row in range(frames.shape[0]):
        h, w = (int(v) for v in frames[row])
        one = {"mask": batch["mask"][row:row + 1], "geometry": {"base_size": frames[row:row + 1]}}
        if "label_size" in batch:
            one["label_size"] = batch["label_size"][row:row + 1]
        logits, span = model_logits(model, batch["image"][row:row + 1, :, :h, :w])
        prediction[row:row + 1] = _predict_at_label_size(logits, one, span)
    return prediction


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    accelerator=None,
    *,
    num_classes: int,
    ignore_index: int,
    progress_label: str | None = None,
) -> SegmentationScores:
    """Evaluate ``model`` on a prepared loader, summing confusion matrices across processes.

    Logits are resized (bilinear) to each label's own size before the argmax when they differ,
    so a model is scored at the label's resolution whatever its input size or output stride.
    Without an ``accelerator`` the loop runs in this process alone, on the CPU, as it is (an
    ONNX model scored by the export on the main process).
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    total = torch.zeros(num_classes**2, dtype=torch.long, device=device)
    main = accelerator is None or accelerator.is_main_process
    for batch in track(loader, progress_label, enabled=main):
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            prediction = _predictions(model, batch)
        counts = per_sample_confusion(prediction, batch["mask"], num_classes, ignore_index)
        total += (accelerator.gather_for_metrics(counts) if accelerator is not None else counts).sum(0)
    model.train(was_training)
    return scores_from_confusion(total.cpu().reshape(num_classes, num_classes))
