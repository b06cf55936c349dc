"""Benchmark: the README's quickstart, end to end, timed (what ``make quickstart`` runs).

Runs ``python -m distill run recipes/quickstart.yaml output_dir=OUT`` in a fresh folder (every
stage from scratch: teacher, cache, baseline, student, compare, export), then reads what the
stages recorded: each stage's ``done.json`` (seconds, best val mIoU), the comparison's
``compare.json`` (val mIoU and parameters of teacher, baseline and distilled student) and the
export folder. Writes ``bench/results/quickstart.json`` and prints a markdown table.

Usage::

    python bench/quickstart.py [--seeds 3] [--out runs/bench_quickstart] [--results bench/results/quickstart.json]

The machine should be otherwise idle: the wall time is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchlib import save_json

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/quickstart.yaml"
STAGES = ("teacher", "cache", "baseline", "student", "compare", "export")
# What the quickstart promises, in every seed (on 2 idle CPU cores for the time).
TARGET_GAIN, TARGET_SHARE, TARGET_WALL_S = 0.03, 0.30, 180.0


def _curve(metrics: Path) -> list[float]:
    """Validation mIoU after each epoch, from a stage's metrics.jsonl."""
    if not metrics.is_file():
        return []
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [line["val_miou"] for line in lines if "val_miou" in line]


def run_once(out: Path, overrides: list[str]) -> dict:
    """``distill run`` of the quickstart in a fresh ``out``; what its stages recorded."""
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "distill", "run", RECIPE, f"output_dir={out}", *overrides]
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    completed = subprocess.run(command)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        sys.exit(f"distill run failed with exit code {completed.returncode}")
    stages = {}
    for stage in STAGES:
        done = out / stage / "done.json"
        if done.is_file():
            record = json.loads(done.read_text())
            stages[stage] = {"seconds": record.get("seconds"), "best_miou": record.get("best_miou")}
    models = json.loads((out / "compare" / "compare.json").read_text())["models"]
    teacher, student = models["teacher"]["miou"], models["student"]["miou"]
    baseline = models.get("baseline", {}).get("miou")
    return {
        "command": " ".join(command[1:]), "wall_s": wall, "stages": stages,
        "val_miou": {name: model["miou"] for name, model in models.items()},
        "parameters": {name: model["parameters"] for name, model in models.items()},
        "val_curves": {stage: _curve(out / stage / "metrics.jsonl") for stage in ("teacher", "baseline", "student")},
        "gain": None if baseline is None else student - baseline,
        "gap_recovered": (None if baseline is None or teacher <= baseline
                          else (student - baseline) / (teacher - baseline)),
        "export": sorted(p.name for p in (out / "export").iterdir()),
    }


def _usable_cpus() -> int:
    """The cores this process may run on (its affinity: `taskset`, a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_quickstart"),
                        help="run folder (one sub-folder per seed); emptied first, so that every stage runs")
    parser.add_argument("--seeds", type=int, default=1, help="runs with train.seed = 0 .. N-1")
    parser.add_argument("--results", type=Path, default=Path("bench/results/quickstart.json"))
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides (the smoke test shrinks the run with them)")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    load_before = os.getloadavg()
    runs = {seed: run_once(args.out / f"seed{seed}", [*args.overrides, f"train.seed={seed}"])
            for seed in range(args.seeds)}
    gains = [r["gain"] for r in runs.values() if r["gain"] is not None]
    shares = [r["gap_recovered"] for r in runs.values() if r["gap_recovered"] is not None]
    result = {
        "seeds": {str(seed): run for seed, run in runs.items()},
        "mean_gain": sum(gains) / len(gains) if gains else None,
        "min_gain": min(gains) if gains else None,
        "mean_gap_recovered": sum(shares) / len(shares) if shares else None,
        "max_wall_s": max(r["wall_s"] for r in runs.values()),
        "targets": {"gain": TARGET_GAIN, "gap_recovered": TARGET_SHARE, "wall_s": TARGET_WALL_S},
        "accuracy_target_met_every_seed": bool(runs) and all(
            r["gain"] is not None and r["gain"] >= TARGET_GAIN and r["gap_recovered"] is not None
            and r["gap_recovered"] >= TARGET_SHARE for r in runs.values()),
        # The target is for 2 cores: elsewhere (torch takes every core it may use) it is not checked.
        "time_target_met_every_seed": None if _usable_cpus() != 2 else
        bool(runs) and all(r["wall_s"] <= TARGET_WALL_S for r in runs.values()),
        "gap_recovered_seeds": len(shares),  # seeds whose teacher beat their baseline
        "load_before_after": [load_before, os.getloadavg()],
        "environment": {"python": platform.python_version(), "cpus": os.cpu_count(), "usable_cpus": _usable_cpus(),
                        "machine": platform.machine()},
    }
    save_json(args.results, result)
    for seed, run in runs.items():
        wall = run["wall_s"]
        print(f"\nseed {seed}: wall {wall:.0f} s for every stage ({wall // 60:.0f} min {wall % 60:.0f} s)")
        print("| stage | val mIoU | parameters | seconds | val mIoU by epoch |")
        print("| --- | --- | --- | --- | --- |")
        for stage in STAGES:
            miou, params = run["val_miou"].get(stage), run["parameters"].get(stage)
            seconds = run["stages"].get(stage, {}).get("seconds")
            if miou is None and seconds is None:  # the cache stage records no done.json
                continue
            curve = " ".join(f"{100 * v:.0f}" for v in run["val_curves"].get(stage, []))
            print(f"| {stage} | {'' if miou is None else f'{100 * miou:.1f}'} | "
                  f"{'' if params is None else f'{params / 1e6:.1f} M'} | "
                  f"{'' if seconds is None else f'{seconds:.0f}'} | {curve} |")
        if run["gain"] is not None:
            share = run["gap_recovered"]
            print(f"distilled student vs baseline: {100 * run['gain']:+.1f} mIoU points"
                  + ("" if share is None else f", {100 * share:.0f}% of the teacher/baseline gap"))
    if gains:
        share = ("none (no teacher above its baseline)" if not shares else
                 f"{100 * result['mean_gap_recovered']:.0f}% over {len(shares)} of {len(runs)} seeds")
        print(f"\nover {len(gains)} seed(s): mean gain {100 * result['mean_gain']:+.1f}, smallest "
              f"{100 * result['min_gain']:+.1f} mIoU points; mean share of the gap {share}")
        timed = result["time_target_met_every_seed"]
        busy = load_before[0] > 0.5
        print(f"target (every seed: +{100 * TARGET_GAIN:.0f} points and {100 * TARGET_SHARE:.0f}% of the gap): "
              f"{'met' if result['accuracy_target_met_every_seed'] else 'NOT met'}; "
              f"time (every seed at most {TARGET_WALL_S:.0f} s on 2 idle cores): "
              + (f"not checked ({_usable_cpus()} CPUs usable)" if timed is None else
                 f"{'met' if timed else 'NOT met'} (longest {result['max_wall_s']:.0f} s"
                 + (f"; the cores were busy before: load {load_before[0]:.1f})" if busy else ")")))
    print(f"wrote {args.results}")
    return result


if __name__ == "__main__":
    main()
