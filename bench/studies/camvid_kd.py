"""Benchmark: what distillation gains on CamVid scenes no model trained on, one command, rerunnable.

The recipe validates on a held-out sequence (``data.val_split: train+val:prefix=0006R0``): the
teacher and every student train on the other two sequences, so each score below is on unseen
scenes, at the labels' own 360x480 (``eval.resolution: label``). Arms, all from scratch with the
recipe's schedule and augmentation (only the loss and where the targets come from differ):

- ``teacher``: the teacher checkpoint (trained first with the recipe's ``teacher_train``).
- ``baseline``: the student with CE alone (``distill train --stage baseline``).
- ``kd_cache`` / ``kd_stream``: the student distilled with the recipe's loss, from the logit
  cache (``distill cache`` first, timed apart; without the recipe's feature term, which a cache
  cannot hold) or from the teacher run on every augmented batch (feature term included).
- ``cache/NAME`` / ``stream/NAME``: the same with the settings ``SETTINGS[NAME]`` in place of the
  recipe's distillation terms (logits alone unless a setting such as ``hint`` adds features);
  ``NAME+NAME`` combines several (``cache/kl_T2_w1+epochs40``), and ``baseline/NAME`` changes the
  baseline's schedule (``baseline/epochs40``).

Every student arm runs once per seed of ``--seeds``, in ``<out>/<arm>/seed<N>``; an arm whose
``arm.json`` records the same command and recipe (sha256 of its parsed content, so an edited
comment reruns nothing) is reused, so an interrupted
benchmark picks up where it stopped. Each arm's last checkpoint is scored with ``distill eval``
(per-class IoU): no epoch is picked on the validation sequence. Gap recovered, per seed =
``(kd - baseline) / (teacher - baseline)`` against the baseline of the same seed.

Usage::

    python bench/studies/camvid_kd.py --data-root data/camvid --seeds 0,1 --arms baseline,kd_cache,cache/kl_T4_w1
    python bench/studies/camvid_kd.py --teacher-checkpoint runs/camvid_kd/teacher/last.safetensors ...
    # few labels: every 4th mask, the other training images unlabelled; same teacher and cache
    python bench/studies/camvid_kd.py --out runs/camvid_few --teacher-checkpoint runs/camvid_kd/teacher/last.safetensors \
        --cache-dir runs/camvid_kd/cache \
        --arms baseline,cache/kl_T2_w1 data.labelled_fraction=0.25 train.epochs=80 train.eval_every_epochs=4
    # images of the deployment scenes without masks: the first 45 frames of the held-out sequence
    # are distilled unlabelled, its last 51 scored (bench/studies/splits/); every training mask kept
    python bench/studies/camvid_kd.py --out runs/xseq_target --teacher-checkpoint runs/xseq/teacher/last.safetensors \
        --arms baseline,cache/kl_T2_w1 "data.train_split=train+val:prefix=0001TP,0016E5" \
        "cache.splits=['train+val:prefix=0001TP,0016E5']" \
        "data.val_split=train+val:list=bench/studies/splits/camvid_0006R0_last51.txt" \
        "data.unlabelled=[{split: 'train+val:list=bench/studies/splits/camvid_0006R0_first45.txt'}]" data.unlabelled_ratio=0.25
    # another teacher beside the first, sharing its baselines: an ensemble (bench/studies/ensemble_teacher.py)
    PYTHONPATH=bench/studies python bench/studies/camvid_kd.py --out runs/xseq --teacher-name ensemble \
        --teacher-checkpoint runs/ens/ensemble.safetensors --teacher-override teacher.source=factory \
        --teacher-override teacher.factory=ensemble_teacher:ensemble --teacher-override loss.feature.kind=none \
        --teacher-override "teacher.factory_kwargs={members: [{arch: DeepLabV3Plus, encoder: resnet50}, ...]}" \
        --arms baseline,cache/kl_T2_w1
    # feature terms beside the recipe's logit loss (streamed teacher); any recipe, here the quickstart's
    python bench/studies/camvid_kd.py --recipe recipes/quickstart.yaml --out runs/features_qs --arms baseline,kd_stream,stream/hint

Extra ``key=value`` words override the recipe for every arm (e.g. ``train.epochs=2``).
Results: ``<out>/[<teacher-name>/]camvid_kd.json`` (``--results`` to name another) and a
markdown table on stdout.
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

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for benchlib
from benchlib import save_json

from distill._io import file_digest  # noqa: E402  (the package's own digest of weights files)

RECIPE = Path("recipes/camvid/dlv3p-r50_to_dlv3p-mbv3_cpu.yaml")

# Loss settings an arm can name (``cache/NAME``, ``stream/NAME``).
SETTINGS: dict[str, list[str]] = {
    "kl_T1_w1": ["loss.kind=kl", "loss.temperature=1", "loss.kd_weight=1"],
    "kl_T2_w1": ["loss.kind=kl", "loss.temperature=2", "loss.kd_weight=1"],
    "kl_T4_w1": ["loss.kind=kl", "loss.temperature=4", "loss.kd_weight=1"],
    "kl_T4_w05": ["loss.kind=kl", "loss.temperature=4", "loss.kd_weight=0.5"],
    "kl_T1_w1_correct": ["loss.kind=kl", "loss.temperature=1", "loss.kd_weight=1",
                         "loss.kd_pixels=teacher_correct"],
    # The teacher alone (no CE): how much of it the student can take in at its own resolution.
    "kdonly_T1": ["loss.kind=kl", "loss.temperature=1", "loss.kd_weight=1", "loss.ce_weight=0"],
    "dist_T1_w1": ["loss.kind=dist", "loss.temperature=1", "loss.kd_weight=1"],
    "dist_T1_w2": ["loss.kind=dist", "loss.temperature=1", "loss.kd_weight=2"],
    # CWD at its paper's segmentation setting (T=4, weight 3; the Cityscapes/VOC recipes' too).
    "cwd_T4_w3": ["loss.kind=cwd", "loss.temperature=4", "loss.kd_weight=3"],
    # Schedules: distillation often needs a longer one than CE alone.
    "epochs40": ["train.epochs=40"],
    "epochs80": ["train.epochs=80"],
    "epochs160": ["train.epochs=160"],
    "epochs320": ["train.epochs=320"],
    # Function matching (Beyer et al. 2022) as far as a cache allows: teacher and student agree on
    # widely rescaled crops (the store is replayed through the same geometry) under colour jitter
    # (the targets are the teacher's on the unjittered image); with ``epochs40`` or ``epochs160``
    # for its longer schedule, and ``baseline/fm`` on the same augmentation. Its CutMix needs a
    # streamed teacher (``cutmix``).
    "fm": ["data.scale_range=[0.5,2.0]", "data.color_jitter=0.4"],
    # CutMix on half the training images (README, Mixed batches): a streamed teacher is run on
    # images no model trained on; ``baseline/cutmix`` is the baseline on the same mixed batches.
    # A recipe of a cached teacher is refused with CutMix, its baseline stage too: the teacher
    # streams, in one view (its store's test-time augmentation does not apply to a streamed one).
    "cutmix": ["data.cutmix=0.5", "teacher.mode=stream", "teacher.tta_flip=false", "teacher.tta_scales=[1.0]"],
    # With data.labelled_fraction: distil on the kept masks alone (the other images unused).
    "labelled_only": ["data.unlabelled_ratio=0"],
    # Feature terms beside the logits' (streamed arms only): FitNets hint and CWD on the deepest
    # encoder stages, and the hint on the decoders' outputs.
    "hint": ["loss.feature={kind: hint, weight: 1.0, pairs: [[-1, -1]]}"],
    "hint_decoder": ["loss.feature={kind: hint, weight: 1.0, pairs: [[decoder, decoder]]}"],
    "cwd_features": ["loss.feature={kind: cwd, weight: 3.0, tau: 1.0, pairs: [[-1, -1]]}"],
}


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


def _logged(metrics: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def _val_curve(metrics: Path) -> tuple[list[float], int]:
    """The validation mIoU of every evaluation, and the epochs trained (evaluations may be fewer)."""
    lines = _logged(metrics)
    return [line["val_miou"] for line in lines if "val_miou" in line], max(line["epoch"] for line in lines)


def _eval(recipe: Path, out: Path, stage: str, checkpoint: Path, overrides: list[str]) -> dict:
    """``distill eval`` of one checkpoint on the validation split: mIoU, accuracy, per-class IoU."""
    command = [sys.executable, "-m", "distill", "eval", str(recipe), "--stage", stage,
               f"checkpoint={checkpoint}", f"output_dir={out}", *overrides]
    _run(command, out / f"eval_{stage}.log")
    # The report this command wrote: the folder may hold others (other splits, other weights).
    return json.loads(max((out / stage).glob("eval_*.json"), key=lambda p: p.stat().st_mtime_ns).read_text())


def _recipe_digest(recipe: Path) -> str:
    """sha256 of the recipe's parsed content: comments and layout do not count."""
    content = json.dumps(yaml.safe_load(recipe.read_text()), sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()


def _arm(name: str, stage: str, recipe: Path, folder: Path, overrides: list[str], force: bool,
         teacher_sha256: str | None = None, teacher_mtime: float | None = None) -> dict:
    """Train one arm (or reuse it when its arm.json records the same command, recipe file and,
    for a distilled arm, teacher weights); score its end. A record from before the weights were
    recorded counts as theirs when the teacher file is older than it (and gets their sha256)."""
    command = [sys.executable, "-m", "distill", "train", str(recipe), "--stage", stage,
               f"output_dir={folder}", *overrides]
    record_path = folder / "arm.json"
    recipe_digest = _recipe_digest(recipe)
    if not force and record_path.is_file():
        record = json.loads(record_path.read_text())
        if ("teacher_sha256" not in record and teacher_sha256 is not None and teacher_mtime is not None
                and teacher_mtime < record_path.stat().st_mtime):
            record["teacher_sha256"] = teacher_sha256
            save_json(record_path, record)
        # Same command and same recipe file: an edited recipe (say, its loss) reruns the arm;
        # so does a teacher retrained into the same path (the command names only its path).
        if (record.get("command") == command[1:] and record.get("recipe_sha256") == recipe_digest
                and record.get("teacher_sha256") == teacher_sha256):
            print(f"{name}: reused {record_path}", flush=True)
            # Its seconds are the earlier run's: said so, not taken for this run's.
            return {**record, "reused": True,
                    "seconds_per_epoch": _seconds_per_epoch(record["seconds"], folder / stage)}
    seconds = _run(command, folder / "train.log")
    curve, _ = _val_curve(folder / stage / "metrics.jsonl")
    scores = _eval(recipe, folder, stage, folder / stage / "last.safetensors", overrides)
    record = {
        "name": name, "stage": stage, "command": command[1:], "recipe_sha256": recipe_digest,
        "teacher_sha256": teacher_sha256, "overrides": overrides,
        "seconds": seconds, "seconds_per_epoch": _seconds_per_epoch(seconds, folder / stage),
        "final_miou": scores["miou"], "best_miou": max(curve), "val_curve": curve,
        "pixel_accuracy": scores["pixel_accuracy"], "per_class_iou": scores["iou"],
    }
    save_json(record_path, record)
    return record


def _seconds_per_epoch(seconds: float, run_dir: Path) -> float:
    """Wall seconds per epoch trained, the epochs read from the run's metrics (a reused record's
    stored figure is not trusted: older ones divided by the evaluations)."""
    return seconds / _val_curve(run_dir / "metrics.jsonl")[1]


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


# Named settings start from the logits alone: ``stream/kl_T2_w1`` has no feature term even when
# the recipe has one, and only a setting such as ``hint`` adds it.
LOGITS_ONLY = ["loss.feature.kind=none"]


def _arm_overrides(arm: str, cached: list[str], streamed: list[str]) -> list[str]:
    """The overrides of an arm's name: where its targets come from, then its settings."""
    source, _, settings = arm.partition("/")
    extra = [o for name in settings.split("+") if name for o in SETTINGS[name]]
    if source == "baseline":
        return extra
    if source in ("cache", "kd_cache"):  # ``cached`` drops the feature term: a cache holds none
        return [*cached, *extra]
    if source == "kd_stream":  # the recipe's own loss, its feature term included
        return streamed
    return [*streamed, *LOGITS_ONLY, *extra]


def gap_share(gain: float, gap: float) -> float | None:
    """``gain`` as a share of the teacher/baseline ``gap``; None when the teacher is not above
    the baseline (there is no gap to recover, and a ratio's sign would say the opposite)."""
    return gain / gap if gap > 0 else None


def _summary(arms: dict, teacher: float, seeds: list[int], baseline_arm: str = "baseline") -> None:
    """Per arm: each seed's mIoU and gain over that seed's baseline, the gap recovered."""
    baseline = arms.get(baseline_arm, {})
    print("\n| arm | mIoU per seed | mean | gain per seed | gap recovered (mean) | beats baseline in every seed | s/epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, runs in arms.items():
        finals = [runs[str(s)]["final_miou"] for s in seeds if str(s) in runs]
        row = {"mean_miou": sum(finals) / len(finals)}
        gains = recovered = []
        if name != baseline_arm and baseline:
            # Over the seeds both arms ran: a seed without its baseline says nothing of a gain.
            paired = [s for s in seeds if str(s) in runs and str(s) in baseline]
            gains = [runs[str(s)]["final_miou"] - baseline[str(s)]["final_miou"] for s in paired]
            recovered = [gap_share(g, teacher - baseline[str(s)]["final_miou"]) for g, s in zip(gains, paired)]
            shares = [r for r in recovered if r is not None]
            row.update(gains=gains, gap_recovered=recovered, paired_seeds=len(paired),
                       mean_gap_recovered=sum(shares) / len(shares) if shares else None,
                       beats_baseline_every_seed=bool(gains) and len(paired) == len(finals) and min(gains) > 0)
            recovered = shares
        runs["summary"] = row
        epoch = [runs[str(s)]["seconds_per_epoch"] for s in seeds if str(s) in runs]
        print(f"| {name} | {', '.join(map(_pct, finals))} | {_pct(row['mean_miou'])} | "
              f"{', '.join(f'{100 * g:+.1f}' for g in gains)} | "
              f"{'' if not recovered else f'{100 * sum(recovered) / len(recovered):.0f}%'} | "
              f"{'' if not gains else ('yes' if row['beats_baseline_every_seed'] else 'no')} | "
              f"{sum(epoch) / len(epoch):.1f} |")


def _per_class_gains(arms: dict, seeds: list[int], reference: str) -> dict[str, dict[str, float]]:
    """Per arm: each class's IoU minus the reference arm's, averaged over the seeds both ran."""
    base = arms.get(reference, {})
    table: dict[str, dict[str, float]] = {}
    for name, runs in arms.items():
        paired = [str(s) for s in seeds if name != reference and str(s) in runs and str(s) in base]
        if not paired:
            continue
        # A class absent from a run's labels and predictions has no IoU (None): left out.
        classes = [c for c in runs[paired[0]]["per_class_iou"]
                   if all(r[s]["per_class_iou"][c] is not None for r in (runs, base) for s in paired)]
        table[name] = {c: sum(runs[s]["per_class_iou"][c] - base[s]["per_class_iou"][c] for s in paired)
                       / len(paired) for c in classes}
    if table:
        classes = list(next(iter(table.values())))
        print(f"\nper-class IoU minus {reference}'s (mean over paired seeds, points)\n")
        print("| arm | " + " | ".join(classes) + " |")
        print("| --- |" + " --- |" * len(classes))
        for name, gains in table.items():
            print(f"| {name} | " + " | ".join(f"{100 * gains[c]:+.1f}" for c in classes) + " |")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--out", type=Path, default=Path("runs/camvid_kd"))
    parser.add_argument("--data-root", type=Path, default=Path("data/camvid"),
                        help="the CamVid folder (SegNet layout)")
    parser.add_argument("--teacher-checkpoint", type=Path, default=None,
                        help="a trained teacher; without it the teacher is trained first "
                        "(the recipe's teacher_train schedule)")
    parser.add_argument("--arms", default="baseline,kd_cache",
                        help="comma-separated: baseline, kd_cache, kd_stream, cache/NAME, stream/NAME, "
                        f"baseline/NAME (NAME one of {', '.join(SETTINGS)}, or several joined by +)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="the logit cache (default <out>/cache); another run's to share it")
    parser.add_argument("--seeds", default="0,1", help="comma-separated train.seed of every student arm")
    parser.add_argument("--force", action="store_true", help="rerun arms already done")
    parser.add_argument("--results", type=Path, default=None,
                        help="the JSON written (default: <out>/[<teacher-name>/]camvid_kd.json, beside the "
                        "runs it describes)")
    parser.add_argument("--reference", default="baseline",
                        help="the arm whose per-class IoU every other arm's is compared with (for "
                        "example a logits-only arm, to see what a feature term adds)")
    parser.add_argument("--baseline", default="baseline",
                        help="the arm every gain and gap share is measured from (for example "
                        "baseline/cutmix, the baseline trained on the same mixed batches)")
    parser.add_argument("--teacher-override", action="append", default=[], metavar="key=value",
                        help="overrides for the teacher alone (its eval, the cache, the distilled arms), "
                        "e.g. teacher.source=factory for an ensemble (bench/studies/ensemble_teacher.py); "
                        "the baselines' commands stay the same, so their runs are reused")
    parser.add_argument("--teacher-eval-override", action="append", default=[], metavar="key=value",
                        help="overrides for the teacher's eval alone, e.g. data.resize=[360,480] for a "
                        "teacher that works at the full resolution (its cache: cache.teacher_resize)")
    parser.add_argument("--teacher-name", default="",
                        help="a folder under --out for this teacher's cache, eval and distilled arms, "
                        "so that several teachers share one set of baselines")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for arm in arms:
        source, _, settings = arm.partition("/")
        names = settings.split("+") if settings else []
        if (source not in ("baseline", "kd_cache", "kd_stream", "cache", "stream")
                or (source in ("cache", "stream") and not names)
                or (source in ("kd_cache", "kd_stream") and names)
                or any(name not in SETTINGS for name in names)):
            parser.error(f"unknown arm '{arm}' in --arms")
    for option, arm in (("--reference", args.reference), ("--baseline", args.baseline)):
        if arm not in arms and arm != "baseline":
            parser.error(f"{option} '{arm}' is not one of --arms")
    if not args.recipe.is_file():
        parser.error(f"recipe not found: {args.recipe}")
    out, common = args.out, [f"data.root={args.data_root}", *args.overrides]
    args.results = args.results or out / args.teacher_name / "camvid_kd.json"

    teacher = args.teacher_checkpoint
    teacher_trained_here = False
    if teacher is None:
        teacher = out / "teacher" / "last.safetensors"  # its last epoch: none picked on val
        command = [sys.executable, "-m", "distill", "train", str(args.recipe), "--stage", "teacher",
                   f"output_dir={out}", *common]
        # Reused only when this command finished it: a killed run's or another schedule's
        # last.safetensors is not this benchmark's teacher.
        done = out / "teacher_train.json"
        record = json.loads(done.read_text()) if done.is_file() else {}
        if not (teacher.is_file() and record.get("command") == command[1:]
                and record.get("recipe_sha256") == _recipe_digest(args.recipe)
                and record.get("teacher_sha256") == file_digest(teacher)):
            teacher_seconds = _run(command, out / "teacher_train.log")
            save_json(done, {"seconds": teacher_seconds, "command": command[1:],
                             "recipe_sha256": _recipe_digest(args.recipe), "teacher_sha256": file_digest(teacher)})
            teacher_trained_here = True
    elif not teacher.is_file():
        parser.error(f"--teacher-checkpoint not found: {teacher}")
    teacher_sha256 = file_digest(teacher)
    results: dict = {"recipe": str(args.recipe), "teacher_checkpoint": str(teacher), "seeds": seeds,
                     "overrides": common, "machine": f"{platform.processor() or platform.machine()}, "
                     f"{os.cpu_count()} CPUs (torch threads as distill sets them), no GPU", "arms": {}}
    taught = out / args.teacher_name  # this teacher's eval, cache and distilled arms
    teacher_scores = _eval(args.recipe, taught / "teacher_eval", "teacher", teacher,
                           [*common, *args.teacher_override, *args.teacher_eval_override])
    results["teacher"] = {**teacher_scores, "final_miou": teacher_scores["miou"]}
    if args.teacher_checkpoint is None:  # trained by this command, now or by an earlier run of it
        results["teacher"]["train_seconds"] = json.loads((out / "teacher_train.json").read_text())["seconds"]
        results["teacher"]["reused"] = not teacher_trained_here
    teacher_metrics = teacher.parent / "metrics.jsonl"
    if teacher_metrics.is_file():  # how its held-out score moved with its epochs
        results["teacher"]["val_curve"] = {line["epoch"]: line["val_miou"]
                                           for line in _logged(teacher_metrics) if "val_miou" in line}

    if args.teacher_override:
        results["teacher_overrides"] = args.teacher_override
    with_teacher = [f"teacher.checkpoint={teacher}", *args.teacher_override]
    cached = [*with_teacher, "teacher.mode=cache", f"cache.dir={args.cache_dir or taught / 'cache'}",
              *LOGITS_ONLY]
    streamed = [*with_teacher, "teacher.mode=stream"]
    if any(a.startswith(("kd_cache", "cache/")) for a in arms):
        seconds = _run([sys.executable, "-m", "distill", "cache", str(args.recipe), *cached,
                        f"output_dir={taught / 'cache_run'}", *common], taught / "cache.log")
        results["cache_seconds"] = seconds  # near 0 when the store was already complete
    # Seed by seed, so that a shortened benchmark still has every arm of its first seeds; the
    # JSON written after each names its baseline, so that a partial one is read as meant.
    results["baseline_arm"] = args.baseline
    for seed in seeds:
        for arm in arms:
            stage = "baseline" if arm.startswith("baseline") else "student"
            extra = _arm_overrides(arm, cached, streamed)
            folder = (out if stage == "baseline" else taught) / arm / f"seed{seed}"
            student = stage == "student"
            record = _arm(arm, stage, args.recipe, folder, [*extra, *common, f"train.seed={seed}"], args.force,
                          teacher_sha256 if student else None, teacher.stat().st_mtime if student else None)
            results["arms"].setdefault(arm, {})[str(seed)] = record
            save_json(args.results, results)

    print(f"\nteacher: {_pct(results['teacher']['final_miou'])} mIoU")
    _summary(results["arms"], results["teacher"]["final_miou"], seeds, args.baseline)
    results["per_class_gain"] = {"reference": args.reference,
                                 "arms": _per_class_gains(results["arms"], seeds, args.reference)}
    save_json(args.results, results)
    print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
