"""The GPU check: one self-contained script for a short GPU window (issue 19), ~6 min on one H200.

Measures, at full CamVid resolution (360x480, batch 16) on the GPU:

1. the distillation step in bf16 and fp16: student alone, from cached targets (a logit store
   written here), from the streamed teacher, and the teacher's forward alone; ratios to the
   student alone and to student + teacher forward (targets: both at most 1.05x);
2. the fused pixel KL and DIST against their autograd versions at Cityscapes-sized logits
   (8x19x512x1024): time and peak memory (``torch.cuda.max_memory_allocated``);
3. a short real run (``--steps`` optimizer steps, bf16) of the CamVid recipe's models, ending
   with the validation mIoU: on CamVid when ``--camvid-root`` exists, else on the built-in
   synthetic data at 360x480 (the GPU machine has no copy of CamVid);
4. the versions of torch and CUDA and the GPU's name.

It writes one JSON (``--out``, default ``bench/results/gpu.json``) and prints a table. The GPU
machine reaches no package registry and lacks segmentation-models-pytorch (and perhaps pydantic):
bring them as wheels (``pip download --no-deps -d wheels segmentation-models-pytorch==0.6.0``,
and pydantic's for Python 3.12 with ``--python-version 3.12 --only-binary=:all:``; ``wheels/`` is
git-ignored and travels with ``carry``), then from the repository root::

    pip install --no-deps wheels/*.whl && PYTHONPATH=. python bench/gpu_check.py

``--smoke`` runs the same code at tiny sizes on the CPU in well under a minute (a test runs it,
so the script cannot rot between GPU runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import distill  # first: lets torchvision import where its extension cannot load
import torch

from distill.cache import load_cached_teacher, write_cache
from distill.config import recipe_from_dict
from distill.launch import make_accelerator
from distill.losses import DistillLoss, dist_loss, dist_loss_reference, kd_loss, kd_loss_reference
from distill.models import build_model
from distill.teacher import load_teacher
from distill.training import build_optimizer, distillation_step

from benchlib import save_json

FULL = {"size": [360, 480], "batch": 16, "logits": [8, 19, 512, 1024], "teacher": "resnet50",
        "student": "tu-mobilenetv3_large_100", "steps": 10, "warmup": 3, "cache_samples": 64}
SMOKE = {"size": [48, 64], "batch": 2, "logits": [2, 19, 32, 64], "teacher": "resnet18",
         "student": "tu-mobilenetv3_small_050", "steps": 2, "warmup": 1, "cache_samples": 4}


def _recipe(sizes: dict, out: Path, precision: str, *, camvid: Path | None = None,
            mode: str = "cache", steps: int | None = None) -> Any:
    data: dict[str, Any] = {"resize": sizes["size"], "crop_size": sizes["size"],
                            "batch_size": sizes["batch"], "num_workers": 2}
    if camvid is not None:
        data.update(dataset="camvid", root=str(camvid), resize=[360, 480], crop_size=[352, 480],
                    scale_range=[0.75, 1.25])
    else:
        data.update(dataset="synthetic", synthetic={
            "num_train": sizes["cache_samples"], "num_val": max(2, sizes["cache_samples"] // 4),
            "size": sizes["size"], "num_classes": 11})
    return recipe_from_dict({
        "output_dir": str(out), "data": data,
        "teacher": {"arch": "DeepLabV3Plus", "encoder": sizes["teacher"], "mode": mode},
        "student": {"arch": "DeepLabV3Plus", "encoder": sizes["student"]},
        "loss": {"kind": "kl", "temperature": 1.0, "kd_weight": 1.0},
        "cache": {"splits": ["train"], "batch_size": sizes["batch"]},
        "train": {"mixed_precision": precision, "channels_last": True, "epochs": 1000,
                  "max_steps": steps, "warmup_steps": 0, "eval_every_epochs": 1000},
        "run": {"baseline": False},
    })


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_times(sizes: dict, work: Path, precision: str) -> dict[str, float]:
    """Median seconds per training step of each variant, the same batches, one process."""
    recipe = _recipe(sizes, work / f"steps_{precision}", precision)
    accelerator = make_accelerator(recipe)
    device = accelerator.device
    from distill.data import build_loader

    torch.manual_seed(0)
    teacher_model = build_model(recipe.teacher, 11)  # random weights: the timing is the same
    weights = work / "teacher.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in teacher_model.state_dict().items()}, str(weights))
    recipe.teacher.checkpoint = weights
    write_cache(recipe)
    streamed = load_teacher(recipe, 11).to(device)
    cached = load_cached_teacher(recipe, 11).to(device)
    student = build_model(recipe.student, 11).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(student, recipe)
    criterion = DistillLoss.from_config(recipe.loss, ignore_index=255)
    plain = DistillLoss(ce_weight=1.0, kd_weight=0.0, ignore_index=255)
    loader = build_loader(recipe.data, "train", train=True, seed=0)
    batch = next(iter(loader))
    batch = {k: (v.to(device) if torch.is_tensor(v) else {g: t.to(device) for g, t in v.items()}
                 if isinstance(v, dict) else v) for k, v in batch.items()}

    def step(teacher: torch.nn.Module | None, loss: DistillLoss) -> Callable[[], None]:
        def run() -> None:
            parts = distillation_step(batch, student, teacher, loss, accelerator, True)
            accelerator.backward(parts["loss"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    def teacher_forward() -> None:
        with accelerator.autocast():
            streamed(batch)

    n, w = sizes["steps"], sizes["warmup"]
    result = {"student_alone_s": _median_time(step(None, plain), device, n, w),
              "cached_s": _median_time(step(cached, criterion), device, n, w),
              "streamed_s": _median_time(step(streamed, criterion), device, n, w),
              "teacher_forward_s": _median_time(teacher_forward, device, n, w)}
    result["cached_over_student"] = result["cached_s"] / result["student_alone_s"]
    result["streamed_over_student_plus_teacher"] = result["streamed_s"] / (
        result["student_alone_s"] + result["teacher_forward_s"])
    return result


def loss_costs(sizes: dict, device: torch.device) -> dict[str, dict[str, float | None]]:
    """Fused vs autograd pixel KL and DIST: forward + backward time and peak memory."""
    shape = sizes["logits"]
    out: dict[str, dict[str, float | None]] = {}
    variants = {"kl_fused": kd_loss, "kl_autograd": kd_loss_reference,
                "dist_fused": dist_loss, "dist_autograd": dist_loss_reference}
    generator = torch.Generator(device="cpu").manual_seed(0)
    teacher = torch.randn(shape, generator=generator).to(device)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=generator).to(device)
    for name, fn in variants.items():
        student = torch.randn(shape, generator=generator).to(device).requires_grad_(True)

        def run(student: torch.Tensor = student, fn: Callable = fn) -> None:
            fn(student, teacher, temperature=1.0, target=target).backward()
            student.grad = None

        peak = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        seconds = _median_time(run, device, sizes["steps"], sizes["warmup"])
        out[name] = {"seconds": seconds, "peak_extra_mib": peak}
    return out


def short_run(sizes: dict, work: Path, steps: int, camvid: Path | None, precision: str) -> dict:
    """A short training run of the recipe's models, streamed teacher, ending with val mIoU."""
    recipe = _recipe(sizes, work / "short_run", precision, camvid=camvid, mode="stream", steps=steps)
    start = time.perf_counter()
    result = distill.train(recipe, "baseline")
    return {"steps": result.steps, "val_miou": result.final_miou, "seconds": time.perf_counter() - start,
            "data": "camvid" if camvid is not None else "synthetic", "precision": precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (a test runs it)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of the short run")
    parser.add_argument("--camvid-root", type=Path, default=Path("data/camvid"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("no CUDA device: run on the GPU machine, or pass --smoke for the CPU check")
    sizes = SMOKE if args.smoke else FULL
    precisions = ["bf16", "fp16"] if cuda else ["no"]
    device = torch.device("cuda" if cuda else "cpu")
    camvid = args.camvid_root if (args.camvid_root / "train").is_dir() else None
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "smoke": args.smoke,
        "sizes": sizes, "steps": {}, "losses": {}, "short_run": None}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for precision in precisions:
            report["steps"][precision] = step_times(sizes, work, precision)
            print(f"step {precision}: {json.dumps(report['steps'][precision])}", flush=True)
        report["losses"] = loss_costs(sizes, device)
        print(f"losses: {json.dumps(report['losses'])}", flush=True)
        report["short_run"] = short_run(sizes, work, 2 if args.smoke else args.steps, camvid, precisions[0])
    save_json(args.out, report)
    print(f"\n{report['gpu'] or 'CPU (smoke)'}, torch {report['torch']}, CUDA {report['cuda']}")
    print("| precision | student s/step | cached / student | streamed / (student + teacher fwd) |")
    print("| --- | --- | --- | --- |")
    for precision, row in report["steps"].items():
        print(f"| {precision} | {row['student_alone_s']:.4f} | {row['cached_over_student']:.3f}x | "
              f"{row['streamed_over_student_plus_teacher']:.3f}x |")
    print("| loss | seconds fwd+bwd | peak extra MiB |")
    print("| --- | --- | --- |")
    for name, row in report["losses"].items():
        peak = "" if row["peak_extra_mib"] is None else f"{row['peak_extra_mib']:.0f}"
        print(f"| {name} | {row['seconds']:.4f} | {peak} |")
    run = report["short_run"]
    print(f"short run ({run['data']}, {run['precision']}): {run['steps']} steps, val mIoU "
          f"{100 * run['val_miou']:.1f}, {run['seconds']:.0f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
