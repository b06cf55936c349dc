"""Benchmark: the teacher logit cache (``distill.cache``) on the CamVid CPU recipe.

One command, three measurements, printed as rich tables and written as JSON:

1. Size: bytes per image of the store ``distill cache`` writes for the recipe (files on disk,
   headers, index and manifest included) and, computed from the array shapes, of the other
   layouts, against dense fp32 logits at CamVid's full resolution (360x480x11x4 bytes).
   Target: at most 2%.
2. Fidelity: mean per-pixel KL(streamed || cached) at the recipe's temperature, on valid pixels
   (labels not void, not padding), where "streamed" is the teacher run on the augmented view and
   "cached" the store's maps rebuilt and replayed through that view's geometry (random scale,
   crop, flip from the recipe's train transform). Split into the replay error (stored maps
   uncompressed: the teacher is not scale/shift equivariant, plus the stride's low-pass) and the
   compression error (KL between the uncompressed and the rebuilt maps at the stored
   resolution); for top-k = 1, 2, 4, 8, int8, dense fp16. Also compared: the non-top-k value
   (mass at T vs the tails' mean logit), average-pooling vs bilinear downsampling, replay at the
   crop's resolution vs at 1/stride, and a rest fitted at one temperature used at another.
3. Speed: one distillation step (student fwd + CE + KD + bwd + AdamW) with cached targets,
   with streamed targets, and the student's plain step (CE, no teacher), interleaved
   round-robin on the same batches; the ratio is the median over rounds of each round's
   variant/plain (adjacent in time, so robust to other jobs on a shared machine). Also the
   cached path's parts alone, and its variant replaying at 1/stride (KD loss upsamples).
   Target: cached <= 1.10x the plain step.

The teacher is randomly initialised (seed 0) unless ``--teacher-checkpoint`` is given; a random
teacher's logits are nearly flat, so its KL figures are not representative of a trained one.

Usage: ``python bench/cache.py [--teacher-checkpoint PATH] [--out bench/results/cache.json]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import save_json

REPO = Path(__file__).resolve().parents[1]
SIZE_TARGET = 0.02
TIME_TARGET = 1.10
DENSE_FP32 = 360 * 480 * 11 * 4  # CamVid's full resolution, 11 classes, fp32
LAYOUTS = [("topk", "fp16", 1), ("topk", "fp16", 2), ("topk", "fp16", 4), ("topk", "fp16", 8),
           ("topk", "int8", 4), ("dense", "fp16", None), ("dense", "int8", None)]


def _name(layout: str, dtype: str, k: int | None) -> str:
    return f"top-{k} {dtype}" if layout == "topk" else f"dense {dtype}"


def build_recipe(args: argparse.Namespace, work: Path) -> tuple[Any, str]:
    import torch
    from safetensors.torch import save_file

    from distill.config import load_recipe
    from distill.data import dataset_info
    from distill.models import build_model

    overrides = [f"output_dir={work}", f"cache.dir={work / 'cache'}", f"cache.stride={args.stride}",
                 f"cache.topk={args.topk}", "cache.layout=topk", "cache.dtype=fp16",
                 "data.labelled_fraction=1"]  # every image with its mask: the cache itself is measured
    if getattr(args, "data_root", None):
        overrides.append(f"data.root={Path(args.data_root).resolve()}")
    if args.cache_samples:
        overrides.append(f"data.max_samples={args.cache_samples}")
    recipe = load_recipe(args.recipe, overrides)
    if args.teacher_checkpoint:
        checkpoint, described = Path(args.teacher_checkpoint).resolve(), str(args.teacher_checkpoint)
    else:
        torch.manual_seed(0)
        model = build_model(recipe.teacher, dataset_info(recipe.data).num_classes)
        checkpoint = work / "teacher_random.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
        described = "randomly initialised (seed 0): KL figures not representative of a trained teacher"
    teacher = recipe.teacher.model_copy(update={"checkpoint": checkpoint, "mode": "stream"})
    return recipe.model_copy(update={"teacher": teacher}), described


# --------------------------------------------------------------------------------------------
# 1. size


def measure_size(recipe: Any) -> dict[str, Any]:
    import numpy as np

    from distill.cache import store_ops as ops
    from distill.cache import open_store, write_cache

    start = time.perf_counter()
    folder = write_cache(recipe)
    seconds = time.perf_counter() - start
    store = open_store(recipe)
    n, classes = store.num_samples, store.num_classes
    on_disk = sum(p.stat().st_size for p in (folder / store.split).iterdir()) + (folder / "manifest.json").stat().st_size
    rows = []
    for layout, dtype, k in LAYOUTS:
        specs = ops.array_specs(layout, dtype, 1, classes, ops.effective_topk(layout, k or 0, classes),
                                store.size)
        per_image = sum(int(np.prod(shape)) * dt.itemsize for shape, dt in specs.values())
        written = (layout, dtype, k) == (recipe.cache.layout, recipe.cache.dtype, recipe.cache.topk)
        if written:
            per_image = on_disk / n
        rows.append({"layout": _name(layout, dtype, k), "bytes_per_image": per_image,
                     "ratio": per_image / DENSE_FP32, "measured_on_disk": written,
                     "meets_target": per_image / DENSE_FP32 <= SIZE_TARGET})
    return {"rows": rows, "num_samples": n, "stored_size": list(store.size),
            "write_seconds": seconds, "images_per_s": n / seconds, "store": str(folder)}


# --------------------------------------------------------------------------------------------
# 2. fidelity


def measure_fidelity(recipe: Any, samples: int, seed: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from distill.cache import store_ops as ops
    from distill.data import build_dataset, collate_batch, dataset_info
    from distill.teacher import load_teacher

    info = dataset_info(recipe.data)
    split, temp, stride = recipe.data.train_split, recipe.loss.temperature, recipe.cache.stride
    teacher = load_teacher(recipe, info.num_classes)
    plain = build_dataset(recipe.data, split, train=False)
    augmented = build_dataset(recipe.data, split, train=True, seed=seed)
    picks = torch.linspace(0, len(plain) - 1, min(samples, len(plain))).round().long().tolist()
    size = ops.stored_size(tuple(recipe.data.resize), stride)
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}

    def add(key: str, value: float, weight: float) -> None:
        sums[key] = sums.get(key, 0.0) + value * weight
        weights[key] = weights.get(key, 0.0) + weight

    for start in range(0, len(picks), 4):
        chunk = picks[start : start + 4]
        base = teacher(collate_batch([plain[i] for i in chunk])).float()
        batch = collate_batch([augmented[i] for i in chunk], recipe.data.ignore_index)
        stream = teacher(batch).float()
        valid = batch["mask"] != recipe.data.ignore_index
        n_valid = float(valid.sum())
        geometry, image_size = batch["geometry"], tuple(batch["image"].shape[-2:])

        def total(maps: torch.Tensor, resolution: str = "crop") -> float:
            if resolution == "crop":
                out = ops.replay(maps, geometry, image_size)
            else:
                low = (-(-image_size[0] // stride), -(-image_size[1] // stride))
                out = F.interpolate(ops.replay(maps, geometry, image_size, low), image_size,
                                    mode="bilinear", align_corners=False)
            return ops.softened_kl(stream, out, temp, valid)

        pooled = ops.downsample(base, size)
        add("replay stride 1 (fp32)", total(base), n_valid)
        add(f"replay stride {stride} (fp32, average pool)", total(pooled), n_valid)
        bilinear = F.interpolate(base, size, mode="bilinear", align_corners=False)
        add(f"replay stride {stride} (fp32, bilinear downsample)", total(bilinear), n_valid)
        add(f"replay stride {stride} (fp32, at 1/stride + upsample)", total(pooled, "stride"), n_valid)
        pixels = float(pooled.shape[0] * pooled.shape[2] * pooled.shape[3])
        for layout, dtype, k in LAYOUTS:
            k_eff = ops.effective_topk(layout, k or 0, info.num_classes)
            rebuilt = ops.rebuild(ops.compress(pooled, layout, dtype, k_eff, temp), layout, info.num_classes)
            name = _name(layout, dtype, k)
            add(f"{name}|compression", ops.softened_kl(pooled, rebuilt, temp), pixels)
            add(f"{name}|total", total(rebuilt), n_valid)
            if layout == "topk" and dtype == "fp16":
                arrays = ops.compress(pooled, layout, dtype, k_eff, temp)
                arrays["rest"] = ops.tail_mean_rest(pooled, k_eff).half()
                mean_rest = ops.rebuild(arrays, layout, info.num_classes)
                add(f"{name}|compression tail-mean rest", ops.softened_kl(pooled, mean_rest, temp), pixels)
                for other in (1.0, 4.0):  # rest fitted at T, distilled at another temperature
                    fitted = ops.rebuild(ops.compress(pooled, layout, dtype, k_eff, other), layout,
                                         info.num_classes)
                    add(f"{name}|at T={other:g}, rest fitted at T={temp:g}",
                        ops.softened_kl(pooled, rebuilt, other), pixels)
                    add(f"{name}|at T={other:g}, rest fitted at T={other:g}",
                        ops.softened_kl(pooled, fitted, other), pixels)
                    add(f"{name}|at T={other:g}, tail-mean rest",
                        ops.softened_kl(pooled, mean_rest, other), pixels)
    means = {key: sums[key] / max(weights[key], 1e-12) for key in sums}
    replay_key = f"replay stride {stride} (fp32, average pool)"
    rows = []
    for layout, dtype, k in LAYOUTS:
        name = _name(layout, dtype, k)
        row = {"layout": name, "replay_kl": means[replay_key],
               "compression_kl": means[f"{name}|compression"], "total_kl": means[f"{name}|total"]}
        if f"{name}|compression tail-mean rest" in means:
            row["compression_kl_tail_mean_rest"] = means[f"{name}|compression tail-mean rest"]
        rows.append(row)
    replay_rows = {k: v for k, v in means.items() if k.startswith("replay")}
    temperature_rows = {k: v for k, v in means.items() if "|at T=" in k}
    return {"samples": len(picks), "temperature": temp, "stride": stride, "rows": rows,
            "replay": replay_rows, "temperatures": temperature_rows}


# --------------------------------------------------------------------------------------------
# 3. speed


def measure_speed(recipe: Any, rounds: int, batches: int, seed: int) -> dict[str, Any]:
    import torch
    from accelerate import Accelerator

    from distill.cache import CachedTeacher, open_store
    from distill.data import build_loader, dataset_info
    from distill.losses import DistillLoss, kd_loss
    from distill.models import build_model
    from distill.teacher import load_teacher
    from distill.training import build_optimizer, distillation_step

    info = dataset_info(recipe.data)
    torch.manual_seed(seed)
    student = build_model(recipe.student_model, info.num_classes)
    channels_last = recipe.train.channels_last
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    student.train()
    optimizer = build_optimizer(student, recipe)
    distill_loss = DistillLoss.from_config(recipe.loss, ignore_index=info.ignore_index)
    plain_loss = DistillLoss.from_config(recipe.loss, ignore_index=info.ignore_index)
    plain_loss.kd_weight = 0.0
    store = open_store(recipe)
    cached, cached_low = CachedTeacher(store), CachedTeacher(store, resolution="stride")
    teachers = {"student alone (CE only)": None, "cached teacher": cached,
                "streamed teacher": load_teacher(recipe, info.num_classes)}
    loader = build_loader(recipe.data, recipe.data.train_split, train=True, seed=seed)
    data = []
    for batch in loader:
        data.append(batch)
        if len(data) == batches:
            break

    accelerator = Accelerator(cpu=True)

    def step(teacher: Any, batch: dict) -> float:
        """One optimizer step through the library's own ``distillation_step``."""
        start = time.perf_counter()
        criterion = distill_loss if teacher is not None else plain_loss
        parts = distillation_step(batch, student, teacher, criterion, accelerator, channels_last)
        parts["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    names = list(teachers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds + 1):
        batch = data[round_index % len(data)]
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:  # rotated, so no variant always runs right after another
            seconds = step(teachers[name], batch)
            if round_index > 0:  # round 0 warms every variant up
                times[name].append(seconds)
    plain = times[names[0]]
    rows = []
    for name in names:
        paired = [t / p for t, p in zip(times[name], plain)]
        rows.append({"variant": name, "best_s": min(times[name]),
                     "median_s": statistics.median(times[name]),
                     "vs_student_alone": statistics.median(paired),
                     "vs_student_alone_best": min(times[name]) / min(plain), "all_s": times[name]})

    # The cached path's parts, each repeated (small ops: many repeats are cheap).
    batch = data[0]
    grad_student = torch.randn(len(batch["index"]), info.num_classes, *batch["image"].shape[-2:],
                               requires_grad=True)
    temperature = recipe.loss.temperature

    def best_ms(fn: Any, repeats: int = 15) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return 1000 * min(samples)

    def kd(targets: torch.Tensor) -> None:
        kd_loss(grad_student, targets, temperature=temperature, target=batch["mask"]).backward()

    with torch.no_grad():
        full, low = cached(batch), cached_low(batch)
    parts = {
        "read + rebuild + replay at the crop's resolution": best_ms(lambda: cached(batch)),
        "read + rebuild + replay at 1/stride": best_ms(lambda: cached_low(batch)),
        "KD loss fwd+bwd, targets at the crop's resolution": best_ms(lambda: kd(full)),
        "KD loss fwd+bwd, targets at 1/stride (resized inside)": best_ms(lambda: kd(low)),
    }
    ratio = rows[1]["vs_student_alone"]
    return {"rows": rows, "parts_ms": parts, "rounds": rounds, "batch_size": recipe.data.batch_size,
            "crop_size": list(recipe.data.crop_size or recipe.data.resize),
            "cached_vs_student_alone": ratio, "meets_target": ratio <= TIME_TARGET,
            "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    size, fid, speed = result["size"], result["fidelity"], result["speed"]
    console.print(f"[bold]teacher[/]: {result['teacher']}")
    table = Table(title=f"1. size per image ({size['num_samples']} images, maps {size['stored_size']}"
                  f" at stride {fid['stride']}) vs dense fp32 360x480x11 = {DENSE_FP32:,} B; "
                  f"target <= {SIZE_TARGET:.0%}")
    for col in ("layout", "bytes/image", "ratio", "measured", "target"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for row in size["rows"]:
        table.add_row(row["layout"], f"{row['bytes_per_image']:,.0f}", f"{row['ratio']:.2%}",
                      "on disk" if row["measured_on_disk"] else "computed",
                      "[green]yes[/]" if row["meets_target"] else "[red]no[/]")
    console.print(table)
    console.print(f"writing the store: {size['write_seconds']:.1f} s, {size['images_per_s']:.1f} images/s")
    table = Table(title=f"2. fidelity: mean per-pixel KL at T={fid['temperature']:g} on "
                  f"{fid['samples']} augmented views (streamed target vs cached)")
    for col in ("layout", "replay KL", "compression KL", "total KL", "compression KL, tail-mean rest"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for row in fid["rows"]:
        alt = row.get("compression_kl_tail_mean_rest")
        table.add_row(row["layout"], f"{row['replay_kl']:.5f}", f"{row['compression_kl']:.6f}",
                      f"{row['total_kl']:.5f}", "-" if alt is None else f"{alt:.6f}")
    console.print(table)
    table = Table(title="replay alone (stored maps uncompressed, fp32)")
    table.add_column("variant")
    table.add_column("KL", justify="right")
    for key, value in fid["replay"].items():
        table.add_row(key, f"{value:.5f}")
    console.print(table)
    table = Table(title="non-top-k value at another temperature (compression KL)")
    table.add_column("case")
    table.add_column("KL", justify="right")
    for key, value in fid["temperatures"].items():
        table.add_row(key.replace("|", ": "), f"{value:.6f}")
    console.print(table)
    table = Table(title=f"3. speed: one training step, batch {speed['batch_size']} at "
                  f"{'x'.join(map(str, speed['crop_size']))}, {speed['rounds']} interleaved "
                  f"rounds, {speed['threads']} threads; target cached <= {TIME_TARGET}x")
    for col in ("variant", "best s", "median s", "vs student alone", "(best vs best)"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for row in speed["rows"]:
        table.add_row(row["variant"], f"{row['best_s']:.3f}", f"{row['median_s']:.3f}",
                      f"{row['vs_student_alone']:.3f}", f"{row['vs_student_alone_best']:.3f}")
    console.print(table)
    console.print("vs student alone: median over rounds of (variant's step / the plain step of "
                  "the same round), robust to other jobs on a shared machine")
    table = Table(title="the cached path's parts (best of 15)")
    table.add_column("part")
    table.add_column("ms", justify="right")
    for key, value in speed["parts_ms"].items():
        table.add_row(key, f"{value:.1f}")
    console.print(table)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/camvid/dlv3p-r50_to_dlv3p-mbv3_cpu.yaml")
    parser.add_argument("--teacher-checkpoint", default=None, help="default: a random teacher")
    parser.add_argument("--data-root", default=None, help="the dataset folder (default: the recipe's)")
    parser.add_argument("--cache-samples", type=int, default=128,
                        help="cache the first N training images (0: all 367; the teacher "
                        "takes about 0.3-0.6 s per image on 2 cores)")
    parser.add_argument("--fidelity-samples", type=int, default=16)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--topk", type=int, default=4, help="the layout written to disk")
    parser.add_argument("--rounds", type=int, default=24, help="timed rounds of the speed test")
    parser.add_argument("--batches", type=int, default=3, help="distinct batches the rounds cycle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cache.json")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # the recipe's data.root is relative to the repository
    sys.path.insert(0, str(REPO))
    import distill  # noqa: F401  (first: the torchvision compatibility step)
    import torch

    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        recipe, described = build_recipe(args, work)
        started = time.perf_counter()
        result: dict[str, Any] = {"recipe": args.recipe, "teacher": described}
        result["size"] = measure_size(recipe)
        with torch.no_grad():
            result["fidelity"] = measure_fidelity(recipe, args.fidelity_samples, args.seed)
        result["speed"] = measure_speed(recipe, args.rounds, args.batches, args.seed)
        result["seconds"] = time.perf_counter() - started
    result["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                             "machine": platform.machine(), "cpus": os.cpu_count()}
    print_tables(result)
    save_json(args.out, result)
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
