"""Benchmark: the README's quickstart, end to end, timed (what ``make quickstart`` runs).

Runs ``python -m distill run recipes/quickstart.yaml output_dir=OUT`` in a fresh folder (every
stage from scratch: teacher, cache, baseline, student, compare, export), then reads what the
stages recorded: each stage's ``done.json`` (seconds, best val mIoU), the comparison's
``compare.json`` (val mIoU and parameters of teacher, baseline and distilled student) and the
export folder. Writes ``bench/results/quickstart.json`` and prints a markdown table.

Usage::

    python bench/quickstart.py [--out runs/bench_quickstart] [--results bench/results/quickstart.json]

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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_quickstart"),
                        help="run folder; emptied first, so that every stage runs")
    parser.add_argument("--results", type=Path, default=Path("bench/results/quickstart.json"))
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides (the smoke test shrinks the run with them)")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    if args.out.exists():
        shutil.rmtree(args.out)
    command = [sys.executable, "-m", "distill", "run", RECIPE, f"output_dir={args.out}", *args.overrides]
    print("$", " ".join(command[1:]), flush=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    completed = subprocess.run(command)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        sys.exit(f"distill run failed with exit code {completed.returncode}")

    stages = {}
    for stage in STAGES:
        done = args.out / stage / "done.json"
        if done.is_file():
            record = json.loads(done.read_text())
            stages[stage] = {"seconds": record.get("seconds"), "best_miou": record.get("best_miou")}
    models = json.loads((args.out / "compare" / "compare.json").read_text())["models"]
    teacher, student = models["teacher"]["miou"], models["student"]["miou"]
    baseline = models.get("baseline", {}).get("miou")
    result = {
        "command": " ".join(command[1:]),
        "wall_s": wall,
        "stages": stages,
        "val_miou": {name: model["miou"] for name, model in models.items()},
        "parameters": {name: model["parameters"] for name, model in models.items()},
        "gain": None if baseline is None else student - baseline,
        "gap_recovered": (None if baseline is None or teacher <= baseline
                          else (student - baseline) / (teacher - baseline)),
        "export": sorted(p.name for p in (args.out / "export").iterdir()),
        "load_before_after": [load_before, os.getloadavg()],
        "environment": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "machine": platform.machine()},
    }
    save_json(args.results, result)

    print(f"\nwall {wall:.0f} s for every stage ({wall // 60:.0f} min {wall % 60:.0f} s)\n")
    print("| stage | val mIoU | parameters | seconds |")
    print("| --- | --- | --- | --- |")
    for stage in STAGES:
        miou = result["val_miou"].get(stage)
        params = result["parameters"].get(stage)
        seconds = stages.get(stage, {}).get("seconds")
        if miou is None and seconds is None:  # the cache stage records no done.json
            continue
        print(f"| {stage} | {'' if miou is None else f'{100 * miou:.1f}'} | "
              f"{'' if params is None else f'{params / 1e6:.1f} M'} | "
              f"{'' if seconds is None else f'{seconds:.0f}'} |")
    if result["gain"] is not None:
        print(f"\ndistilled student vs baseline: {100 * result['gain']:+.1f} mIoU points")
    print(f"wrote {args.results}")
    return result


if __name__ == "__main__":
    main()
