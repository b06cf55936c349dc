"""Benchmark: what distillation gains on CamVid (issue 6's table), one command, rerunnable.

Arms, all from scratch with the recipe's seed, schedule and augmentation (only the loss and
where the teacher's targets come from differ):

- ``teacher``: the teacher checkpoint, evaluated on val.
- ``baseline``: the student with CE alone (``distill train --stage baseline``).
- ``kd_stream``: the student distilled from the teacher run on every augmented batch.
- ``kd_cache``: the same, from the teacher's logit cache (``distill cache`` first, timed apart).
- with ``--tune``: more cached KD arms, the loss settings tried before choosing the recipe's
  (``TUNING`` below; chosen on val, since CamVid here has only train and val).

Each arm runs ``python -m distill ...`` in its own folder under ``--out``; an arm whose
``arm.json`` records the same command and recipe file (sha256) is reused, so an interrupted
benchmark picks up where it stopped. Each arm's last checkpoint is then scored with ``distill
eval`` (per-class IoU). The headline number is the val mIoU after the last epoch (no checkpoint
picked on val); the best epoch's is given beside it. Gap recovered = ``(kd - baseline) / (teacher - baseline)``.

Usage::

    python bench/camvid_kd.py --teacher-checkpoint runs/camvid_cpu/teacher/best.safetensors
    python bench/camvid_kd.py --tune --arms baseline,tuning      # the tuning sweep, cached arms
    python bench/camvid_kd.py                                   # trains the teacher first

The README's table: ``--arms baseline,kd_cache,kd_stream,tuning --kd-loss dist_T1_w2`` (with the
teacher checkpoint); arms already run are reused, so the sweep and the final arms may be run in
separate calls.

Extra ``key=value`` words override the recipe for every arm (e.g. ``train.epochs=2``).
Results: ``bench/results/camvid_kd.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RECIPE = Path("recipes/camvid/dlv3p-r50_to_dlv3p-mbv3_cpu.yaml")

# Loss settings tried on val before fixing the recipe's (each a cached KD arm with --tune).
TUNING: dict[str, list[str]] = {
    "kl_T1_w1_correct": ["loss.kind=kl", "loss.temperature=1", "loss.kd_weight=1",
                         "loss.kd_pixels=teacher_correct"],
    "dist_T1_w2": ["loss.kind=dist", "loss.temperature=1", "loss.kd_weight=2"],
    # CWD at its paper's segmentation setting (T=4, weight 3; the Cityscapes/VOC recipes' too).
    "cwd_T4_w3": ["loss.kind=cwd", "loss.temperature=4", "loss.kd_weight=3"],
}
# Not rerun: plain KL at T=2, weight 1, the pilot's setting in ../shared/ENVIRONMENT.md (3 points
# below CE alone there); teacher_correct KL at T=1 above came out equal to CE alone.


def _run(command: list[str], log: Path) -> float:
    """Run a command with its output in ``log``; returns wall seconds; exits on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(command)}   (log: {log})", flush=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        sys.exit(f"command failed with exit code {code}: {' '.join(command)}\n{tail}")
    return time.perf_counter() - start


def _val_curve(metrics: Path) -> list[float]:
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [line["val_miou"] for line in lines if "val_miou" in line]


def _eval(recipe: Path, out: Path, stage: str, checkpoint: Path, overrides: list[str]) -> dict:
    """``distill eval`` of one checkpoint on val: mIoU, pixel accuracy and per-class IoU."""
    command = [sys.executable, "-m", "distill", "eval", str(recipe), "--stage", stage,
               f"checkpoint={checkpoint}", f"output_dir={out}", *overrides]
    _run(command, out / f"eval_{stage}.log")
    return json.loads((out / stage / "eval_val.json").read_text())


def _arm(name: str, stage: str, recipe: Path, out: Path, overrides: list[str], force: bool) -> dict:
    """Train one arm (or reuse it when its arm.json records the same command); score its end."""
    folder = out / name
    command = [sys.executable, "-m", "distill", "train", str(recipe), "--stage", stage,
               f"output_dir={folder}", *overrides]
    record_path = folder / "arm.json"
    recipe_digest = hashlib.sha256(recipe.read_bytes()).hexdigest()
    if not force and record_path.is_file():
        record = json.loads(record_path.read_text())
        # Same command and same recipe file: an edited recipe (say, its loss) reruns the arm.
        if record.get("command") == command[1:] and record.get("recipe_sha256") == recipe_digest:
            print(f"{name}: reused {record_path}", flush=True)
            return record
    seconds = _run(command, folder / "train.log")
    curve = _val_curve(folder / stage / "metrics.jsonl")
    scores = _eval(recipe, folder, stage, folder / stage / "last.safetensors", overrides)
    record = {
        "name": name, "stage": stage, "command": command[1:], "recipe_sha256": recipe_digest,
        "overrides": overrides,
        "seconds": seconds, "seconds_per_epoch": seconds / max(len(curve), 1),
        "final_miou": scores["miou"], "best_miou": max(curve), "val_curve": curve,
        "pixel_accuracy": scores["pixel_accuracy"], "per_class_iou": scores["iou"],
    }
    record_path.write_text(json.dumps(record, indent=2))
    return record


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _seconds(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--out", type=Path, default=Path("runs/camvid_kd"))
    parser.add_argument("--teacher-checkpoint", type=Path, default=None,
                        help="a trained teacher; without it the teacher is trained first")
    parser.add_argument("--teacher-epochs", type=int, default=30,
                        help="epochs of the teacher trained without --teacher-checkpoint")
    parser.add_argument("--arms", default="baseline,kd_cache,kd_stream",
                        help="comma-separated: baseline, kd_cache, kd_stream, tuning (every "
                        "TUNING arm) or tune/NAME (one of them)")
    parser.add_argument("--tune", action="store_true", help="same as adding 'tuning' to --arms")
    parser.add_argument("--kd-loss", choices=sorted(TUNING), default=None,
                        help="loss settings of kd_cache and kd_stream: a TUNING entry (default: "
                        "the recipe's). kd_cache is then the same run as tune/NAME, and reuses it")
    parser.add_argument("--force", action="store_true", help="rerun arms already done")
    parser.add_argument("--results", type=Path, default=Path("bench/results/camvid_kd.json"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] + (["tuning"] if args.tune else [])
    tuning = list(TUNING) if "tuning" in arms else [a[5:] for a in arms if a.startswith("tune/")]
    unknown = set(arms) - {"baseline", "kd_cache", "kd_stream", "tuning", *(f"tune/{n}" for n in TUNING)}
    if unknown:
        parser.error(f"unknown arm(s) {sorted(unknown)} in --arms")
    if not args.recipe.is_file():
        parser.error(f"recipe not found: {args.recipe}")
    out, common = args.out, list(args.overrides)

    teacher = args.teacher_checkpoint
    if teacher is None:
        teacher = out / "teacher" / "best.safetensors"
        if not teacher.is_file():
            _run([sys.executable, "-m", "distill", "train", str(args.recipe), "--stage", "teacher",
                  f"output_dir={out}", f"train.epochs={args.teacher_epochs}", *common],
                 out / "teacher_train.log")
    elif not teacher.is_file():
        parser.error(f"--teacher-checkpoint not found: {teacher}")
    results: dict = {"recipe": str(args.recipe), "teacher_checkpoint": str(teacher),
                     "overrides": common, "machine": f"{platform.processor() or platform.machine()}, "
                     f"{os.cpu_count()} CPUs (torch threads as distill sets them), no GPU", "arms": {}}
    results["arms"]["teacher"] = _eval(args.recipe, out / "teacher_eval", "teacher", teacher, common)
    results["arms"]["teacher"].update(final_miou=results["arms"]["teacher"]["miou"])

    with_teacher = [f"teacher.checkpoint={teacher}"]
    cache_dir = out / "cache"
    cached = [*with_teacher, "teacher.mode=cache", f"cache.dir={cache_dir}"]
    if "kd_cache" in arms or tuning:
        seconds = _run([sys.executable, "-m", "distill", "cache", str(args.recipe), *cached,
                        f"output_dir={out / 'kd_cache'}", *common], out / "cache.log")
        results["cache_seconds"] = seconds  # near 0 when the store was already complete
    if "baseline" in arms:
        results["arms"]["baseline"] = _arm("baseline", "baseline", args.recipe, out, common, args.force)
    kd_loss = TUNING[args.kd_loss] if args.kd_loss else []
    if "kd_cache" in arms:
        folder = f"tune/{args.kd_loss}" if args.kd_loss else "kd_cache"
        results["arms"]["kd_cache"] = _arm(folder, "student", args.recipe, out,
                                           [*cached, *kd_loss, *common], args.force)
    if "kd_stream" in arms:
        results["arms"]["kd_stream"] = _arm("kd_stream", "student", args.recipe, out,
                                            [*with_teacher, "teacher.mode=stream", *kd_loss, *common],
                                            args.force)
    for name in tuning:
        results["arms"][f"tune/{name}"] = _arm(f"tune/{name}", "student", args.recipe, out,
                                               [*cached, *TUNING[name], *common], args.force)

    t_miou = results["arms"]["teacher"]["final_miou"]
    b_miou = results["arms"].get("baseline", {}).get("final_miou")
    print("\n| arm | val mIoU (last epoch) | best epoch | gain vs baseline | gap recovered | s/epoch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, arm in results["arms"].items():
        gain = recovered = None
        if b_miou is not None and name not in ("teacher", "baseline"):
            gain = arm["final_miou"] - b_miou
            recovered = gain / (t_miou - b_miou) if t_miou > b_miou else None
            arm.update(gain=gain, gap_recovered=recovered)
        print(f"| {name} | {_pct(arm['final_miou'])} | {_pct(arm.get('best_miou'))} | "
              f"{'' if gain is None else f'{100 * gain:+.1f}'} | "
              f"{'' if recovered is None else f'{100 * recovered:.0f}%'} | "
              f"{_seconds(arm.get('seconds_per_epoch'))} |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
