"""Benchmark: how OpenMP threads wait, on an idle and on a shared CPU (issue 8).

torch's CPU kernels run on libgomp threads. Between parallel regions libgomp's default makes
idle threads spin for a while before sleeping; with another busy process on a 2-core machine the
spinning threads steal each other's core and a training step can become several times slower.
``OMP_WAIT_POLICY=PASSIVE`` never spins (safe when shared, slower when idle); ``GOMP_SPINCOUNT``
bounds the spin. This bench times the CamVid CPU recipe's student step (DeepLabV3+
MobileNetV3-Large, batch 8 of 192x256, CE, AdamW, channels_last, 2 threads) in fresh
subprocesses (libgomp reads the variables once, at load) under each setting, in two
conditions: idle, and sharing the cores with a competing process (2 threads of fp32 matmuls, as
a second training job would). Settings are interleaved ABBA-style across repetitions; each
figure is the median step time over its runs.

Usage: ``python bench/omp_wait.py [--reps 2] [--steps 6] [--batch 8] [--size 192 256]
[--conditions idle,shared] [--settings NAME,...]``; about 4 minutes on 2 cores.
Results: ``bench/results/omp_wait.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import save_json

SETTINGS = {
    "libgomp default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=30000": {"GOMP_SPINCOUNT": "30000"},
}
_CLEARED = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _worker(steps: int, batch: int, size: tuple[int, int]) -> None:
    """A fresh process: warm-up step, then ``steps`` timed student steps; prints JSON."""
    import distill  # noqa: F401  (first: the torchvision compatibility step)
    import torch

    from distill.config import ModelConfig
    from distill.models import build_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="DeepLabV3Plus", encoder="tu-mobilenetv3_large_100"), 11)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, *size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 11, (batch, *size))
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    print("RESULT " + json.dumps(times))


def _competitor() -> None:
    """Busy until killed: 2 threads of matmuls, like a second training job on the machine."""
    import torch

    torch.set_num_threads(2)
    a = torch.randn(1024, 1024)
    while True:
        a = torch.tanh(a @ a) + 0.5


def _run_setting(name: str, steps: int, batch: int, size: tuple[int, int]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env.update(SETTINGS[name])
    proc = subprocess.run([sys.executable, __file__, "--worker", str(steps), "--batch", str(batch),
                           "--size", *map(str, size)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"worker for {name} failed:\n{proc.stderr[-2000:]}")
    times = json.loads(proc.stdout.split("RESULT ", 1)[1])
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2, help="runs per setting and condition")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--batch", type=int, default=8, help="images per step (at least 2: the "
                        "ASPP's pooled branch batch-normalizes one value per image)")
    parser.add_argument("--size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"),
                        help="image size (the recipe's crop)")
    parser.add_argument("--conditions", default="idle,shared",
                        help="comma-separated: idle, shared (beside a competing process)")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, the first is the reference (default: all: {', '.join(SETTINGS)})")
    parser.add_argument("--out", type=Path, default=Path("bench/results/omp_wait.json"))
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--competitor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch < 2:
        parser.error(f"--batch {args.batch}: at least 2 images per step (batch norm of the pooled branch)")
    if args.worker is not None:
        return _worker(args.worker, args.batch, tuple(args.size))
    if args.competitor:
        return _competitor()

    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    if not conditions or set(conditions) - {"idle", "shared"}:
        parser.error(f"--conditions {args.conditions!r}: give idle, shared or both")
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    if not names or set(names) - set(SETTINGS):
        parser.error(f"--settings {args.settings!r}: give names among {', '.join(SETTINGS)}")
    results: dict[str, dict[str, list[float]]] = {}
    for condition in conditions:
        competitor = None
        if condition == "shared":
            # libgomp's default for the competitor too: what a second job launched by hand does.
            env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
            competitor = subprocess.Popen([sys.executable, __file__, "--competitor"], env=env)
            time.sleep(3)
        try:
            runs: dict[str, list[float]] = {n: [] for n in names}
            for rep in range(args.reps):
                for name in names if rep % 2 == 0 else names[::-1]:  # ABBA across repetitions
                    runs[name].append(_run_setting(name, args.steps, args.batch, tuple(args.size)))
                    print(f"{condition:6s} {name:26s} {runs[name][-1]:.3f} s/step", flush=True)
            results[condition] = runs
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()

    header = " | ".join(f"{c} s/step" for c in conditions)
    ratios = " | ".join(f"{c} vs default" for c in conditions)
    print(f"\n| setting | {header} | {ratios} |")
    print("|" + " --- |" * (1 + 2 * len(conditions)))
    base = {c: statistics.median(results[c][names[0]]) for c in conditions}
    summary = {}
    for name in names:
        seconds = {c: statistics.median(results[c][name]) for c in conditions}
        summary[name] = {**{f"{c}_s": seconds[c] for c in conditions},
                         **{f"{c}_ratio": seconds[c] / base[c] for c in conditions}}
        print(f"| {name} | " + " | ".join(f"{seconds[c]:.3f}" for c in conditions) + " | "
              + " | ".join(f"{seconds[c] / base[c]:.2f}x" for c in conditions) + " |")
    save_json(args.out, {"runs": results, "summary": summary, "steps": args.steps,
                         "batch": args.batch, "size": list(args.size), "reps": args.reps, "cpus": os.cpu_count()})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
