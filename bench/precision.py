"""Benchmark: bf16 autocast against fp32 on this CPU, for the recipe's teacher and student.

``train.mixed_precision: bf16`` (or ``teacher_train.mixed_precision: bf16`` for the teacher stage
alone) runs the forward under ``torch.autocast("cpu", torch.bfloat16)``, as Accelerate sets it up.
Whether that pays depends on the CPU: with native bf16 instructions (AVX512-BF16, AMX) oneDNN's
convolutions run faster; without them bf16 is emulated and can be slower than fp32. This measures
it instead of guessing, on the recipe's two models at its crop size and batch:

- a training step (forward, CE, backward, AdamW) of the teacher and of the student;
- the teacher's forward alone (what a streamed teacher or ``distill cache`` pays per batch).

Each round times every variant once, in a fresh random order, on the same random batch; a
variant's figure is the median over rounds, and each ratio (fp32 time / bf16 time, above 1 means
bf16 is faster) is the median of the ratios within a round, so that another job's load at one
moment hits both sides of a ratio alike. Run it on an idle machine all the same.

Usage: ``python bench/precision.py [--rounds 6] [--out bench/results/precision.json]``
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from benchlib import markdown_table, save_json
from distill import build_model, load_recipe
from distill.data.labels import dataset_info

RECIPE = Path("recipes/camvid/dlv3p-r50_to_dlv3p-mbv3_cpu.yaml")


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
          masks: torch.Tensor, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits.float(), masks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def _forward(model: torch.nn.Module, images: torch.Tensor, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (after one warm-up)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/precision.json"))
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    torch.manual_seed(0)
    num_classes = dataset_info(recipe.data).num_classes  # from the layout; reads no image
    height, width = recipe.data.crop_size or recipe.data.resize or (192, 256)
    images = torch.randn(recipe.data.batch_size, 3, height, width)
    masks = torch.randint(0, num_classes, (recipe.data.batch_size, height, width))
    if recipe.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    variants = {}
    for role, spec in (("teacher", recipe.teacher), ("student", recipe.student_model)):
        model = build_model(spec.model_copy(update={"checkpoint": None}), num_classes)
        if recipe.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for bf16 in (False, True):
            precision = "bf16" if bf16 else "fp32"
            variants[f"{role} step {precision}"] = (
                lambda m=model.train(), o=optimizer, b=bf16: _step(m, o, images, masks, b))
        for bf16 in (False, True):
            precision = "bf16" if bf16 else "fp32"
            variants[f"{role} forward {precision}"] = (
                lambda m=model, b=bf16: (m.eval(), _forward(m, images, b), m.train()))

    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds + 1):
        order = list(variants)
        random.Random(round_index).shuffle(order)
        for name in order:
            start = time.perf_counter()
            variants[name]()
            if round_index:  # the first round warms up oneDNN's kernels for each shape
                times[name].append(time.perf_counter() - start)

    rows, results = [], {}
    for role in ("teacher", "student"):
        for kind in ("step", "forward"):
            fp32, bf16 = times[f"{role} {kind} fp32"], times[f"{role} {kind} bf16"]
            speedup = statistics.median(a / b for a, b in zip(fp32, bf16))
            results[f"{role}_{kind}"] = {"fp32_s": statistics.median(fp32),
                                         "bf16_s": statistics.median(bf16), "speedup": speedup}
            rows.append([f"{role} {kind}", f"{statistics.median(fp32):.3f}",
                         f"{statistics.median(bf16):.3f}", f"{speedup:.2f}x"])
    print(markdown_table(["batch of " + str(recipe.data.batch_size) + f" at {height}x{width}",
                          "fp32 s", "bf16 s", "bf16 speed-up"], rows))
    save_json(args.out, {
        "recipe": str(args.recipe), "rounds": args.rounds, "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "load_average": os.getloadavg(), "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
