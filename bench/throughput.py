"""Benchmark: training throughput on the CamVid CPU recipe, every variant side by side.

One command, one run, one table (rich) and ``bench/results/throughput.json``. The recipe's models,
batch and resolution: DeepLabV3+ ResNet-50 teacher, DeepLabV3+ MobileNetV3-Large student, batch 8,
192x256 crops of 240x320 base frames (random scale 0.75-1.25, flips), ``channels_last``, 2 torch
threads, AdamW. Data: ``data.root`` of the recipe (``data/camvid``, or ``--data-root``); when it is absent,
synthetic images of CamVid's shape (360x480, 11 classes), which the report says.

Measured, with targets:

1. Student alone (CE only; forward + backward + AdamW step): images/s, the reference (1.00).
2. Distillation with cached targets (a store written by ``distill.cache.write_cache`` for the first
   ``--cache-samples`` training images with the randomly initialised teacher; speed does not
   depend on its quality), through ``CachedTeacher``: ratio to the reference, target <= 1.05x.
3. Distillation with the streamed teacher (``Teacher``: eval, no_grad, channels_last): ratio to
   the reference, and the teacher's forward alone; target: the streamed step within 1.10x of
   ``student step + teacher forward``.
   When the recipe's ``loss.kind`` is not the pixel KL (DIST, say), the cached
   step is also measured with the pixel KL (same temperature and weights), in the same rounds.
   1-3 (and the parts: the cached targets' read + replay, the KD and the CE terms fwd+bwd, each
   alone) run interleaved on the same pre-loaded batches, in a fresh random order each round
   (so no variant always follows another); every ratio is the median over rounds of the ratio
   within a round (adjacent in time, so robust to other jobs on a shared machine), with its
   interquartile range.
   With a feature term too (``FEATURE``: the streamed step plus a FitNets hint between the
   deepest encoder stages through its adapter): step time as a ratio to the streamed step, and
   peak RSS.
4. The data loader alone: ``build_loader(..., train=True)`` with the recipe's ``num_workers``
   iterating real batches (PNG decode, resize, random scale/crop/flip, collate), one fresh loader
   per round (interleaved with 1-3): steady images/s after the first batch, as a multiple of
   the student's consumption in the same round, target >= 2x. Worker start-up is reported apart,
   and so is the student step that follows the workers' fork (untimed as a variant: forking
   leaves the parent's pages copy-on-write, so that step pays ~200k page faults; in training,
   the first step of every epoch). Also: the loader's single-process cost per image split into
   decode / resize / augmentation / collate, and the student alone fed by the live loader vs by
   pre-loaded batches (the loader's workers share the 2 cores with the step).
5. The CPU allocator setting (``distill.launch.tune_cpu_malloc``): ``mallopt`` cannot be undone
   in-process, so the student-alone measurement runs in fresh subprocesses, one calling
   ``tune_cpu_malloc()`` first and one not, alternated (ABBA) over several short runs; speed
   ratio (untuned / tuned step time) and peak RSS ratio (tuned / untuned). Peak RSS is the
   subprocess's VmHWM (the whole process: Python, torch, model, optimizer, activations). The
   distillation variants' peak RSS is measured the same way (tuned, as training runs).
6. The OpenMP wait policy: the student alone in fresh subprocesses with libgomp's default (its
   idle threads spin before sleeping) vs ``OMP_WAIT_POLICY=PASSIVE``, ABBA. On a shared 2-core
   machine another busy process makes 2 spinning OpenMP threads collapse (a student step went
   from ~1 s to ~13 s while a niced training ran; PASSIVE kept it at ~1 s), so by default this
   bench runs with PASSIVE (``--omp-wait-policy inherit`` measures the environment as is, as
   ``distill train`` runs without the variable) and records which was in effect. The price: on
   an idle machine PASSIVE made the student step ~1.3x slower (0.57 vs 0.43 s); the ratios
   (targets) came out the same within noise either way.

The training step is the one of ``distill.training.train`` (an Accelerator, ``DistillLoss``,
``accelerator.autocast``/``backward``, the finite-loss check (inlined: the private helper's
signature is in flux), AdamW and the scheduler), on batches from ``build_loader``. The main
process calls ``tune_cpu_malloc()`` as training does.

Usage: ``python bench/throughput.py [--quick]``: --quick about 4 minutes on 2 cores, the default
about 8 (both measured with other jobs taking half the CPUs; less on an idle machine). Load
averages before, during and after, and the CPU share other processes took in each phase, are
recorded: the machine may be shared, and the ratios (paired within rounds) are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchlib import save_json

REPO = Path(__file__).resolve().parents[1]
CACHED_TARGET = 1.05   # cached distillation step / student step
# The feature term measured beside the streamed step: FitNets hint on the deepest encoder stages
# (the README's example), its adapter trained by a second AdamW.
FEATURE = {"kind": "hint", "pairs": [(-1, -1)]}
STREAMED_TARGET = 1.10  # streamed / (student + teacher fwd)
LOADER_TARGET = 2.0    # loader images/s / student images/s
THREADS = 2
QUICK = dict(rounds=10, cache_samples=48, batches=3, loader_batches=8, malloc_pairs=2,
             worker_steps=5, live_pairs=1, live_steps=6, profile_images=24, rss_variants=True,
             omp_pairs=1, omp_steps=3)
SMOKE = dict(rounds=1, cache_samples=16, batches=1, loader_batches=2, malloc_pairs=1,
             worker_steps=2, live_pairs=1, live_steps=2, profile_images=2, rss_variants=False,
             omp_pairs=1, omp_steps=1)
FULL = dict(rounds=24, cache_samples=96, batches=4, loader_batches=12, malloc_pairs=4,
            worker_steps=8, live_pairs=2, live_steps=10, profile_images=48, rss_variants=True,
            omp_pairs=2, omp_steps=3)


# --------------------------------------------------------------------------------------------
# small helpers


_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.0f} s] {message}", flush=True)


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


class CpuMeter:
    """How much of the machine's CPU other processes used while this one measured.

    ``foreign_share``: (all CPU time busy, from /proc/stat) - (this process's and its reaped
    children's CPU time), over wall time x CPUs. ``steal_share``: the hypervisor's steal time.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float, float]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
        busy = (user + nice + system + irq + softirq) / tick
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return time.perf_counter(), busy, own, steal / tick

    def read(self) -> dict[str, float]:
        wall0, busy0, own0, steal0 = self.start
        wall1, busy1, own1, steal1 = self._sample()
        capacity = max(wall1 - wall0, 1e-9) * (os.cpu_count() or 1)
        return {"wall_s": wall1 - wall0, "own_share": (own1 - own0) / capacity,
                "foreign_share": max(0.0, (busy1 - busy0) - (own1 - own0)) / capacity,
                "steal_share": (steal1 - steal0) / capacity}


def rss_kib() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process, KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def data_available(recipe_path: str, data_root: str | None) -> tuple[bool, str]:
    from distill.config import load_recipe

    # Every image with its mask: the step on plain labelled batches is what is timed.
    recipe = load_recipe(recipe_path, ["data.labelled_fraction=1",
                                       *([f"data.root={data_root}"] if data_root else [])])
    root = Path(recipe.data.root) if recipe.data.root is not None else None
    ok = root is not None and root.is_dir()
    return ok, str(root)


def build_recipes(args: argparse.Namespace, work: Path, synthetic: bool) -> tuple[Any, Any, str]:
    """(recipe with the cache subset and a random streamed teacher, same recipe on the full
    training split for the loader, teacher description). Reuses bench/cache.py's builder."""
    from bench.cache import build_recipe
    from distill.config import Recipe

    ns = argparse.Namespace(recipe=args.recipe, teacher_checkpoint=None, stride=4, topk=4,
                            cache_samples=args.cache_samples, data_root=args.data_root)
    recipe, described = build_recipe(ns, work)
    if synthetic and recipe.data.dataset != "synthetic":  # CamVid's shape: 360x480, 11 classes
        tree = recipe.model_dump(mode="json")
        # Plain splits: a held-out selector such as the recipe's train+val:prefix=0006R0 names
        # CamVid's file names, which synthetic samples do not have.
        tree["data"].update(dataset="synthetic", root=None, train_split="train", val_split="val")
        tree["cache"]["splits"] = ["train"]
        tree["data"]["synthetic"] = {"num_train": 367, "num_val": 101, "size": [360, 480],
                                     "num_classes": 11, "seed": 0}
        recipe = Recipe.model_validate(tree)
    full = recipe.model_copy(update={"data": recipe.data.model_copy(update={"max_samples": None})})
    return recipe, full, described


def preload(recipe: Any, count: int, seed: int) -> list[dict]:
    from distill.data import build_loader

    batches = []
    for batch in build_loader(recipe.data, recipe.data.train_split, train=True, seed=seed):
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


# --------------------------------------------------------------------------------------------
# the training step (the loop body of distill.training.train)


class Trainer:
    """The student, its optimizer and scheduler, prepared by an Accelerator as ``train`` does."""

    def __init__(self, recipe: Any, work: Path, seed: int) -> None:
        import torch

        from distill.data import dataset_info
        from distill.losses import DistillLoss
        from distill.models import build_model
        from distill.launch import make_accelerator
        from distill.training import build_optimizer, build_scheduler

        self.recipe = recipe
        info = dataset_info(recipe.data)
        self.info = info
        self.accelerator = make_accelerator(recipe, work / "accelerate")
        torch.manual_seed(seed)
        model = build_model(recipe.student_model, info.num_classes)
        self.channels_last = recipe.train.channels_last
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, recipe)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.model.train()
        self.scheduler = build_scheduler(self.optimizer, recipe, 10**6)
        self.distill = DistillLoss.from_config(recipe.loss, ignore_index=info.ignore_index)
        self.plain = DistillLoss.from_config(recipe.loss, ignore_index=info.ignore_index)
        self.plain.kd_weight = 0.0  # as train() does without a teacher
        # The pixel KL at the recipe's temperature and weights: a second cached variant when the
        # recipe's loss is another kind, so that both are measured in the same rounds.
        self.pixel_kl = DistillLoss.from_config(recipe.loss.model_copy(update={"kind": "kl"}),
                                                ignore_index=info.ignore_index)

    def feature_term(self, teacher: Any) -> Any:
        """The recipe's loss with the feature term of ``FEATURE`` between this student and a
        streamed ``teacher``, and the adapters' own AdamW (train() puts them in the student's
        optimizer)."""
        import torch

        from distill.losses import DistillLoss
        from distill.losses.features import FeatureDistillation

        term = FeatureDistillation(self.model, teacher.model, FEATURE["pairs"], kind=FEATURE["kind"],
                                   ignore_index=self.info.ignore_index)
        self.adapter_optimizer = torch.optim.AdamW(term.parameters(), lr=self.recipe.train.lr)
        criterion = DistillLoss.from_config(self.recipe.loss, ignore_index=self.info.ignore_index, features=term)
        criterion.feature_weight = 1.0  # FEATURE's weight, whatever the recipe's
        return criterion

    def step(self, batch: dict, teacher: Any = None, criterion: Any = None) -> float:
        """One optimizer step on ``batch`` through the library's own ``distillation_step``;
        returns its wall time in seconds. ``criterion``: the loss with a teacher (default: the
        recipe's; :meth:`feature_term`'s adds the feature term)."""
        import torch

        from distill.training import distillation_step

        acc, start = self.accelerator, time.perf_counter()
        if criterion is None:
            criterion = self.distill if teacher is not None else self.plain
        with acc.accumulate(self.model):
            parts = distillation_step(batch, self.model, teacher, criterion, acc, self.channels_last)
            # distill.training._check_finite: one host sync on the loss (reduced across processes
            # there; a single process here)
            if not torch.isfinite(parts["loss"].detach()).item():
                raise RuntimeError(f"non-finite loss: {parts}")
            acc.backward(parts["loss"])
            self.optimizer.step()
            if criterion.features is not None:
                self.adapter_optimizer.step()
                self.adapter_optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# subprocess worker: the malloc comparison and per-variant peak RSS


def worker(spec_path: str) -> None:
    """Run in a fresh process: optional tune_cpu_malloc, then warm-up + timed steps; JSON out."""
    spec = json.loads(Path(spec_path).read_text())
    import distill  # noqa: F401  (first: the torchvision compatibility step)
    from distill.launch import tune_cpu_malloc

    applied = tune_cpu_malloc() if spec["malloc"] else {}
    import torch

    from distill.config import Recipe
    from distill.data import dataset_info

    torch.set_num_threads(THREADS)
    recipe = Recipe.model_validate_json(Path(spec["recipe"]).read_text())
    work = Path(spec["work"])
    batches = torch.load(spec["batches"], weights_only=False)
    trainer = Trainer(recipe, work / f"worker_{os.getpid()}", spec["seed"])
    teacher = None
    if spec["variant"] == "cached":
        from distill.cache import CachedTeacher, open_store
        teacher = CachedTeacher(open_store(recipe))
    elif spec["variant"] in ("streamed", "streamed_feature"):
        from distill.teacher import load_teacher
        teacher = load_teacher(recipe, dataset_info(recipe.data).num_classes)
    criterion = trainer.feature_term(teacher) if spec["variant"] == "streamed_feature" else None
    before = rss_kib()
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        if i == spec["warmup"]:
            meter = CpuMeter()
        seconds = trainer.step(batches[i % len(batches)], teacher, criterion)
        if i >= spec["warmup"]:
            times.append(seconds)
    cpu = meter.read()
    after = rss_kib()
    print("RESULT " + json.dumps({"times": times, "rss_before_steps_kib": before["VmRSS"],
                                  "peak_rss_kib": after["VmHWM"], "rss_end_kib": after["VmRSS"],
                                  "malloc_applied": applied, "threads": torch.get_num_threads(),
                                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                                  "foreign_cpu_share": cpu["foreign_share"]}))


def run_worker(spec: dict, work: Path, index: int) -> dict:
    path = work / f"spec_{index}.json"
    path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if spec.get("omp") == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif spec.get("omp") == "default":  # libgomp's default: spin a while, then sleep
        env.pop("OMP_WAIT_POLICY", None)
        env.pop("GOMP_SPINCOUNT", None)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(path)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    result.update(variant=spec["variant"], malloc=spec["malloc"], omp=spec.get("omp", "inherit"),
                  median_s=statistics.median(result["times"]),
                  wall_s=time.perf_counter() - started)
    return result


def measure_malloc(recipe: Any, batches: list[dict], work: Path, cfg: dict, seed: int
                   ) -> dict[str, Any]:
    import torch

    recipe_path, batches_path = work / "recipe.json", work / "batches.pt"
    recipe_path.write_text(recipe.model_dump_json())
    torch.save(batches, batches_path)
    base = {"recipe": str(recipe_path), "work": str(work), "batches": str(batches_path),
            "seed": seed, "warmup": 2, "steps": cfg["worker_steps"]}
    runs: list[dict] = []
    order = []
    for pair in range(cfg["malloc_pairs"]):  # ABBA: on off off on on off ...
        order += [True, False] if pair % 2 == 0 else [False, True]
    for i, malloc in enumerate(order):
        runs.append(run_worker({**base, "variant": "student", "malloc": malloc}, work, i))
        r = runs[-1]
        log(f"  subprocess student alone, malloc {'tuned' if malloc else 'default'}: "
              f"{r['median_s']:.3f} s/step, peak RSS {r['peak_rss_kib'] / 1024:.0f} MiB")
    pairs = [(runs[i], runs[i + 1]) for i in range(0, len(runs), 2)]
    speed = [(p[0] if not p[0]["malloc"] else p[1])["median_s"]
             / (p[0] if p[0]["malloc"] else p[1])["median_s"] for p in pairs]
    rss = [(p[0] if p[0]["malloc"] else p[1])["peak_rss_kib"]
           / (p[0] if not p[0]["malloc"] else p[1])["peak_rss_kib"] for p in pairs]
    tuned = [r for r in runs if r["malloc"]]
    untuned = [r for r in runs if not r["malloc"]]
    variants = []
    if cfg["rss_variants"]:
        for j, variant in enumerate(("cached", "streamed", "streamed_feature")):
            variants.append(run_worker({**base, "variant": variant, "malloc": True,
                                        "steps": max(3, cfg["worker_steps"] // 2)},
                                       work, len(order) + j))
            r = variants[-1]
            log(f"  subprocess {variant}, malloc tuned: {r['median_s']:.3f} s/step, "
                  f"peak RSS {r['peak_rss_kib'] / 1024:.0f} MiB")
    return {
        "runs": runs, "variants": variants,
        "speed_ratio_untuned_over_tuned": statistics.median(speed), "speed_ratios": speed,
        "rss_ratio_tuned_over_untuned": statistics.median(rss), "rss_ratios": rss,
        "tuned_median_s": statistics.median([r["median_s"] for r in tuned]),
        "untuned_median_s": statistics.median([r["median_s"] for r in untuned]),
        "tuned_peak_rss_mib": statistics.median([r["peak_rss_kib"] for r in tuned]) / 1024,
        "untuned_peak_rss_mib": statistics.median([r["peak_rss_kib"] for r in untuned]) / 1024,
        "malloc_applied": tuned[0]["malloc_applied"],
    }


def measure_omp(work: Path, cfg: dict, seed: int) -> dict[str, Any]:
    """Student alone in fresh subprocesses (malloc tuned, as training): OpenMP threads waiting
    with libgomp's default policy (spin, then sleep) vs ``OMP_WAIT_POLICY=PASSIVE``, ABBA."""
    base = {"recipe": str(work / "recipe.json"), "work": str(work),
            "batches": str(work / "batches.pt"), "seed": seed, "warmup": 1,
            "steps": cfg["omp_steps"], "variant": "student", "malloc": True}
    order: list[str] = []
    for pair in range(cfg["omp_pairs"]):
        order += ["passive", "default"] if pair % 2 == 0 else ["default", "passive"]
    runs = []
    for i, omp in enumerate(order):
        runs.append(run_worker({**base, "omp": omp}, work, 100 + i))
        r = runs[-1]
        log(f"  subprocess student alone, OpenMP wait {omp}: {r['median_s']:.3f} s/step "
            f"(other processes {r['foreign_cpu_share']:.0%} of the CPUs)")
    pairs = [(runs[i], runs[i + 1]) for i in range(0, len(runs), 2)]
    ratios = []
    for a, b in pairs:
        default, passive = (a, b) if a["omp"] == "default" else (b, a)
        ratios.append(default["median_s"] / passive["median_s"])
    return {"runs": runs, "ratios": ratios,
            "default_over_passive": statistics.median(ratios),
            "default_median_s": statistics.median(
                r["median_s"] for r in runs if r["omp"] == "default"),
            "passive_median_s": statistics.median(
                r["median_s"] for r in runs if r["omp"] == "passive"),
            "foreign_cpu_share": statistics.median(r["foreign_cpu_share"] for r in runs)}


# --------------------------------------------------------------------------------------------
# the loader


def loader_pass(recipe: Any, epoch: int, batches: int, seed: int) -> dict[str, float]:
    """A fresh train loader (workers start), ``batches`` batches; steady rate after the first."""
    from distill.data import build_loader

    loader = build_loader(recipe.data, recipe.data.train_split, train=True, seed=seed)
    loader.dataset.set_epoch(epoch)
    start = time.perf_counter()
    first = None
    images = 0
    last = start
    for i, batch in enumerate(loader):
        last = time.perf_counter()
        if i == 0:
            first = last
        else:
            images += batch["image"].shape[0]
        if i + 1 == batches:
            break  # (the workers' shutdown that follows is not timed)
    del loader
    return {"startup_s": first - start, "steady_images_per_s": images / max(last - first, 1e-9),
            "seconds": last - start}


def profile_loader(recipe: Any, count: int, seed: int) -> dict[str, Any]:
    """Single-process cost per image of each stage of the train transform (no workers)."""
    import numpy as np

    from distill.data import build_dataset, collate_batch, resize_image, resize_nearest

    ds = build_dataset(recipe.data, recipe.data.train_split, train=True, seed=seed)
    source, data = ds.source, recipe.data
    stages = {"decode (PNG image + label, label map)": 0.0, "resize to the base frame": 0.0,
              "augment (scale, crop, normalise, pad, flip)": 0.0, "collate (per image)": 0.0}
    names = list(stages)
    items = []
    for index in range(count):
        t0 = time.perf_counter()
        image, mask = source.load(index)
        t1 = time.perf_counter()
        if data.resize is not None:
            image = resize_image(image, data.resize)
            mask = resize_nearest(mask, data.resize)
        t2 = time.perf_counter()
        rng = np.random.default_rng([ds.seed, 0, index])
        items.append(ds._train_item(image, mask, index, rng))
        t3 = time.perf_counter()
        stages[names[0]] += t1 - t0
        stages[names[1]] += t2 - t1
        stages[names[2]] += t3 - t2
    bs = data.batch_size
    for start in range(0, count - bs + 1, bs):
        stages[names[3]] += timed(lambda: collate_batch(items[start:start + bs], data.ignore_index))
    ms = {k: 1000 * v / count for k, v in stages.items()}
    total = sum(ms.values())
    return {"images": count, "ms_per_image": ms, "total_ms_per_image": total,
            "share": {k: v / total for k, v in ms.items()},
            "images_per_s_one_core": 1000 / total}


def measure_live_loader(trainer: Trainer, full: Any, batches: list[dict], cfg: dict, seed: int
                        ) -> dict[str, Any]:
    """Student alone fed by the live loader (workers sharing the cores) vs pre-loaded batches."""
    from distill.data import build_loader

    pairs = []
    for p in range(cfg["live_pairs"]):
        n = cfg["live_steps"]
        pre = [trainer.step(batches[i % len(batches)]) for i in range(n)]
        loader = build_loader(full.data, full.data.train_split, train=True, seed=seed)
        loader.dataset.set_epoch(100 + p)
        live, start = [], time.perf_counter()
        startup = None
        for i, batch in enumerate(loader):
            t = trainer.step(batch)
            now = time.perf_counter()
            if i == 0:
                startup, first_step = now - start - t, t
            else:
                live.append(now - start)  # wait for the batch + the step
            start = now
            if i == n:
                break
        del loader
        pairs.append({"preloaded_s": statistics.median(pre[1:]), "live_s": statistics.median(live),
                      "startup_s": startup, "first_step_s": first_step})
    ratios = [p["live_s"] / p["preloaded_s"] for p in pairs]
    return {"pairs": pairs, "live_over_preloaded": statistics.median(ratios),
            "first_step_s": statistics.median(p["first_step_s"] for p in pairs),
            "preloaded_s": statistics.median(p["preloaded_s"] for p in pairs),
            "live_s": statistics.median(p["live_s"] for p in pairs)}


# --------------------------------------------------------------------------------------------
# the interleaved rounds


def measure_rounds(trainer: Trainer, recipe: Any, full: Any, batches: list[dict], cfg: dict,
                   seed: int) -> dict[str, Any]:
    import torch

    from distill.cache import CachedTeacher, open_store
    from distill.losses import ce_loss, cwd_loss, dist_loss, kd_loss
    from distill.teacher import load_teacher

    info = trainer.info
    cached = CachedTeacher(open_store(recipe))
    streamed = load_teacher(recipe, info.num_classes)
    with_features = trainer.feature_term(streamed)
    temperature = recipe.loss.temperature
    logits = {}

    kind = recipe.loss.kind
    kd_term = {"kl": kd_loss, "cwd": cwd_loss, "dist": dist_loss}[kind]

    def kd_part(batch: dict) -> None:
        s, t = logits[id(batch)]
        kd_term(s, t, temperature=temperature, target=batch["mask"],
                ignore_index=info.ignore_index).backward()
        s.grad = None

    def ce_part(batch: dict) -> None:
        s, _ = logits[id(batch)]
        ce_loss(s, batch["mask"], ignore_index=info.ignore_index).backward()
        s.grad = None

    for batch in batches:  # student-shaped logits and the cached targets for the loss parts
        shape = (batch["image"].shape[0], info.num_classes, *batch["image"].shape[-2:])
        student_logits = torch.randn(shape)
        if trainer.channels_last:  # what the channels_last student gives the loss
            student_logits = student_logits.contiguous(memory_format=torch.channels_last)
        logits[id(batch)] = (student_logits.requires_grad_(True), cached(batch).clone())

    variants: dict[str, Callable[[dict], float]] = {
        "student": lambda b: trainer.step(b),
        "cached": lambda b: trainer.step(b, cached),
        **({"cached_kl": lambda b: trainer.step(b, cached, trainer.pixel_kl)} if kind != "kl" else {}),
        "streamed": lambda b: trainer.step(b, streamed),
        "streamed_feature": lambda b: trainer.step(b, streamed, with_features),
        "teacher_forward": lambda b: timed(lambda: streamed(b)),
        "cached_targets": lambda b: timed(lambda: cached(b)),
        "kd_loss": lambda b: timed(lambda: kd_part(b)),
        "ce_loss": lambda b: timed(lambda: ce_part(b)),
    }
    names = list(variants) + ["loader"]
    times: dict[str, list[float]] = {n: [] for n in variants}
    minor_faults: dict[str, list[int]] = {n: [] for n in variants}
    loader_runs: list[dict] = []
    loads = []
    shuffler = random.Random(seed)
    for r in range(cfg["rounds"] + 1):  # round 0 warms every variant up
        batch = batches[r % len(batches)]
        order = names[:]
        shuffler.shuffle(order)  # a fresh order each round: no variant always follows another
        for name in order:
            if name == "loader":
                result = loader_pass(full, r, cfg["loader_batches"], seed)
                # Forking the workers left the parent's pages copy-on-write: its next step
                # pays the page faults (in training: once per epoch). Absorbed here, untimed
                # as a variant, so that it does not land on whichever variant comes next.
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                result["step_after_fork_s"] = trainer.step(batch)
                result["step_after_fork_minor_faults"] = (
                    resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
                if r > 0:
                    loader_runs.append(result)
                continue
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            seconds = variants[name](batch)
            if r > 0:
                times[name].append(seconds)
                minor_faults[name].append(
                    resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        loads.append(load_average()[0])
        if r > 0:
            log(f"  round {r}/{cfg['rounds']}: student {times['student'][-1]:.3f} s, cached "
                  f"{times['cached'][-1]:.3f} s, streamed {times['streamed'][-1]:.3f} s, loader "
                  f"{loader_runs[-1]['steady_images_per_s']:.0f} img/s, load {loads[-1]:.2f}")
    bs = recipe.data.batch_size
    student = times["student"]
    paired = {
        "cached_vs_student": [c / s for c, s in zip(times["cached"], student)],
        "streamed_vs_student": [c / s for c, s in zip(times["streamed"], student)],
        "streamed_feature_vs_streamed": [f / c for f, c in zip(times["streamed_feature"], times["streamed"])],
        "streamed_vs_student_plus_teacher": [
            c / (s + t) for c, s, t in zip(times["streamed"], student, times["teacher_forward"])],
        "loader_vs_student_consumption": [
            run["steady_images_per_s"] / (bs / s) for run, s in zip(loader_runs, student)],
        "cached_extra_vs_student": [(c - s) / s for c, s in zip(times["cached"], student)],
    }
    if "cached_kl" in times:
        paired["cached_kl_vs_student"] = [c / s for c, s in zip(times["cached_kl"], student)]
    return {
        "times": times, "loader_runs": loader_runs, "paired": paired,
        "minor_faults_median": {k: statistics.median(v) for k, v in minor_faults.items()},
        "step_after_fork_minor_faults": statistics.median(
            run["step_after_fork_minor_faults"] for run in loader_runs),
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "ratio": {k: quartiles(v) for k, v in paired.items()},
        "loader_steady_images_per_s": statistics.median(
            run["steady_images_per_s"] for run in loader_runs),
        "loader_startup_s": statistics.median(run["startup_s"] for run in loader_runs),
        "step_after_fork_s": statistics.median(run["step_after_fork_s"] for run in loader_runs),
        "step_after_fork_vs_student": statistics.median(
            run["step_after_fork_s"] / s for run, s in zip(loader_runs, student)),
        "load_during": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
        "batches": len(batches),
    }


# --------------------------------------------------------------------------------------------
# report


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    rounds, malloc = result["rounds"], result["malloc"]
    bs = result["batch_size"]
    med = rounds["median_s"]
    ratio = rounds["ratio"]
    student_ips = bs / med["student"]
    rss = {"student": malloc["tuned_peak_rss_mib"]}
    for v in malloc["variants"]:
        rss[v["variant"]] = v["peak_rss_kib"] / 1024
    rows = [
        {"name": "student alone (CE; fwd+bwd+AdamW)", "s_per_step": med["student"],
         "images_per_s": student_ips, "peak_rss_mib": rss["student"], "ratio": 1.0,
         "iqr": None, "target": "reference", "met": None},
        {"name": f"distillation, cached targets ({result.get('loss_kind', 'kl')})",
         "s_per_step": med["cached"],
         "images_per_s": bs / med["cached"], "peak_rss_mib": rss.get("cached"),
         "ratio": ratio["cached_vs_student"][1],
         "iqr": [ratio["cached_vs_student"][0], ratio["cached_vs_student"][2]],
         "target": f"<= {CACHED_TARGET:.2f}x",
         "met": ratio["cached_vs_student"][1] <= CACHED_TARGET},
        *([{"name": "distillation, cached targets (pixel KL)", "s_per_step": med["cached_kl"],
            "images_per_s": bs / med["cached_kl"], "peak_rss_mib": None,
            "ratio": ratio["cached_kl_vs_student"][1],
            "iqr": [ratio["cached_kl_vs_student"][0], ratio["cached_kl_vs_student"][2]],
            "target": f"<= {CACHED_TARGET:.2f}x",
            "met": ratio["cached_kl_vs_student"][1] <= CACHED_TARGET}]
          if "cached_kl_vs_student" in ratio else []),
        {"name": "distillation, streamed teacher", "s_per_step": med["streamed"],
         "images_per_s": bs / med["streamed"], "peak_rss_mib": rss.get("streamed"),
         "ratio": ratio["streamed_vs_student"][1],
         "iqr": [ratio["streamed_vs_student"][0], ratio["streamed_vs_student"][2]],
         "target": "-", "met": None},
        {"name": f"streamed + feature term ({FEATURE['kind']}, pairs {FEATURE['pairs']})",
         "s_per_step": med["streamed_feature"], "images_per_s": bs / med["streamed_feature"],
         "peak_rss_mib": rss.get("streamed_feature"),
         "ratio": ratio["streamed_feature_vs_streamed"][1],
         "iqr": [ratio["streamed_feature_vs_streamed"][0], ratio["streamed_feature_vs_streamed"][2]],
         "target": "step time / streamed", "met": None},
        {"name": "teacher forward alone",
         "s_per_step": med["teacher_forward"], "images_per_s": bs / med["teacher_forward"],
         "peak_rss_mib": None, "ratio": med["teacher_forward"] / med["student"], "iqr": None,
         "target": "-", "met": None},
        {"name": "streamed / (student + teacher fwd)", "s_per_step": None,
         "images_per_s": None, "peak_rss_mib": None,
         "ratio": ratio["streamed_vs_student_plus_teacher"][1],
         "iqr": [ratio["streamed_vs_student_plus_teacher"][0],
                 ratio["streamed_vs_student_plus_teacher"][2]],
         "target": f"<= {STREAMED_TARGET:.2f}x",
         "met": ratio["streamed_vs_student_plus_teacher"][1] <= STREAMED_TARGET},
        {"name": f"data loader alone ({result['num_workers']} workers)",
         "s_per_step": bs / rounds["loader_steady_images_per_s"],
         "images_per_s": rounds["loader_steady_images_per_s"], "peak_rss_mib": None,
         "ratio": ratio["loader_vs_student_consumption"][1],
         "iqr": [ratio["loader_vs_student_consumption"][0],
                 ratio["loader_vs_student_consumption"][2]],
         "target": f">= {LOADER_TARGET:.1f}x student rate",
         "met": ratio["loader_vs_student_consumption"][1] >= LOADER_TARGET},
        {"name": "student, glibc malloc default (subproc.)",
         "s_per_step": malloc["untuned_median_s"], "images_per_s": bs / malloc["untuned_median_s"],
         "peak_rss_mib": malloc["untuned_peak_rss_mib"],
         "ratio": malloc["speed_ratio_untuned_over_tuned"],
         "iqr": [min(malloc["speed_ratios"]), max(malloc["speed_ratios"])],
         "target": "step time default/tuned", "met": None},
        {"name": "student, malloc tuned (subproc.)",
         "s_per_step": malloc["tuned_median_s"], "images_per_s": bs / malloc["tuned_median_s"],
         "peak_rss_mib": malloc["tuned_peak_rss_mib"],
         "ratio": malloc["rss_ratio_tuned_over_untuned"],
         "iqr": [min(malloc["rss_ratios"]), max(malloc["rss_ratios"])],
         "target": "peak RSS tuned/default", "met": None},
    ]
    omp = result.get("omp")
    if omp:
        rows.append({"name": "student, OpenMP wait default (subproc.)",
                     "s_per_step": omp["default_median_s"],
                     "images_per_s": bs / omp["default_median_s"], "peak_rss_mib": None,
                     "ratio": omp["default_over_passive"],
                     "iqr": [min(omp["ratios"]), max(omp["ratios"])],
                     "target": "step time default/PASSIVE", "met": None})
    return rows


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))
    env, rounds = result["environment"], result["rounds"]

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    console.print(f"[bold]data[/]: {result['data']}   [bold]teacher[/]: {result['teacher']}")
    table = Table(title=(
        f"throughput, CamVid CPU recipe: batch {result['batch_size']} at "
        f"{'x'.join(map(str, result['crop_size']))}, {env['torch_threads']} threads, "
        f"{result['config']['rounds']} interleaved rounds, OMP_WAIT_POLICY="
        f"{result['omp_wait_policy']['in_effect'] or '(libgomp default)'}; load avg "
        f"{result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}"))
    for col in ("measurement", "s/step", "images/s", "peak RSS MiB", "ratio", "IQR / range",
                "target", "met"):
        table.add_column(col, justify="left" if col in ("measurement", "target") else "right")
    for row in result["summary"]:
        met = {None: "", True: "[green]yes[/]", False: "[red]no[/]"}[row["met"]]
        iqr = "-" if row["iqr"] is None else f"{row['iqr'][0]:.2f}-{row['iqr'][1]:.2f}"
        table.add_row(row["name"], f(row["s_per_step"], ".3f"), f(row["images_per_s"], ".1f"),
                      f(row["peak_rss_mib"], ".0f"), f"{row['ratio']:.2f}x", iqr, row["target"],
                      met)
    console.print(table)
    console.print("ratios: median over rounds of the ratio within a round (IQR over rounds); the "
                  "subprocess rows: median over ABBA pairs of fresh processes (range over pairs). "
                  "Peak RSS: VmHWM of a fresh subprocess (malloc tuned unless said).")
    if result.get("omp"):
        o = result["omp"]
        console.print(f"OpenMP wait policy (student alone, subprocesses): libgomp default "
                      f"{o['default_median_s']:.3f} s/step vs PASSIVE {o['passive_median_s']:.3f} "
                      f"({o['default_over_passive']:.2f}x) while other processes used "
                      f"{o['foreign_cpu_share']:.0%} of the CPUs")

    med, bs = rounds["median_s"], result["batch_size"]
    table = Table(title="parts, each alone in the same rounds (median ms)")
    table.add_column("part")
    table.add_column("ms", justify="right")
    table.add_column("share of the student step", justify="right")
    for key, label in (("cached_targets", "cached targets: read + rebuild + replay"),
                       ("kd_loss", f"KD term fwd+bwd ({result.get('loss_kind', 'kl')}, fused)"),
                       ("ce_loss", "CE term fwd+bwd"),
                       ("teacher_forward", "teacher forward")):
        table.add_row(label, f"{1000 * med[key]:.1f}", f"{med[key] / med['student']:.1%}")
    extra = statistics.median(rounds["paired"]["cached_extra_vs_student"])
    table.add_row("cached step - student step (paired)", f"{1000 * extra * med['student']:.1f}",
                  f"{extra:.1%}")
    console.print(table)

    prof = result["loader_profile"]
    table = Table(title=f"loader, one process, per image ({prof['images']} images; the workers "
                  "run this)")
    table.add_column("stage")
    table.add_column("ms/image", justify="right")
    table.add_column("share", justify="right")
    for key, value in prof["ms_per_image"].items():
        table.add_row(key, f"{value:.1f}", f"{prof['share'][key]:.0%}")
    table.add_row("total", f"{prof['total_ms_per_image']:.1f}",
                  f"{prof['images_per_s_one_core']:.0f} img/s on one core")
    need = bs / med["student"] * prof["total_ms_per_image"] / 1000
    table.add_row("CPU the loader needs at the student's rate", f"{need:.2f} core",
                  f"{need / env['cpus']:.0%} of {env['cpus']}")
    console.print(table)
    live = result["live_loader"]
    console.print(
        f"student alone fed by the live loader: {live['live_s']:.3f} s/step vs "
        f"{live['preloaded_s']:.3f} pre-loaded ({live['live_over_preloaded']:.2f}x, steady); per "
        f"epoch (fresh workers each epoch): worker start-up {rounds['loader_startup_s']:.2f} s, "
        f"and the first step after the fork {rounds['step_after_fork_s']:.3f} s = "
        f"{rounds['step_after_fork_vs_student']:.2f}x a normal step, "
        f"{rounds['step_after_fork_minor_faults']:,.0f} minor page faults vs "
        f"{rounds['minor_faults_median']['student']:,.0f} (copy-on-write after the fork; the "
        f"live loader's first step {live['first_step_s']:.3f} s)")
    table = Table(title="the machine while measuring (shares of all CPUs)")
    for col in ("phase", "wall s", "this bench", "other processes", "steal"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for phase, c in result["cpu"].items():
        table.add_row(phase, f"{c['wall_s']:.0f}", f"{c['own_share']:.0%}",
                      f"{c['foreign_share']:.0%}", f"{c['steal_share']:.0%}")
    console.print(table)
    console.print(f"load average before {result['load_before']}, during the rounds "
                  f"{rounds['load_during']}, after {result['load_after']}")
    console.print(f"environment: {env}")


def environment(args: argparse.Namespace, applied: dict) -> dict[str, Any]:
    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    import numpy
    import PIL
    import segmentation_models_pytorch as smp
    import timm
    return {"torch": torch.__version__, "timm": timm.__version__, "smp": smp.__version__,
            "numpy": numpy.__version__, "pillow": PIL.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "malloc_tuned_in_main": applied,
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "commit": commit, "quick": args.quick}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about 3-4 minutes)")
    parser.add_argument("--smoke", action="store_true",
                        help="one round of everything, to check that the script runs (a test runs "
                        "it with --recipe recipes/quickstart.yaml); its figures mean nothing")
    parser.add_argument("--data-root", default=None, help="the dataset folder (default: the recipe's)")
    parser.add_argument("--recipe", default="recipes/camvid/dlv3p-r50_to_dlv3p-mbv3_cpu.yaml")
    parser.add_argument("--rounds", type=int, default=None, help="timed interleaved rounds")
    parser.add_argument("--cache-samples", type=int, default=None,
                        help="training images in the logit store (and the pre-loaded batches)")
    parser.add_argument("--omp-wait-policy", choices=["passive", "inherit"], default="passive",
                        help="passive (default): OMP_WAIT_POLICY=PASSIVE in this process and its "
                        "subprocesses, so that other jobs on the cores do not make the 2 OpenMP "
                        "threads spin against them; inherit: the environment as is (as `distill "
                        "train` runs today). Either way the student is also measured both ways "
                        "in subprocesses.")
    parser.add_argument("--skip-omp", action="store_true",
                        help="skip the OpenMP wait-policy subprocesses (slow on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "throughput.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.chdir(REPO)  # the recipe's data.root is relative to the repository
    sys.path.insert(0, str(REPO))
    if args.worker:
        worker(args.worker)
        return {}
    cfg = dict(SMOKE if args.smoke else QUICK if args.quick else FULL)
    if args.rounds:
        cfg["rounds"] = args.rounds
    if args.cache_samples:
        cfg["cache_samples"] = args.cache_samples
    args.cache_samples = cfg["cache_samples"]
    omp_before = os.environ.get("OMP_WAIT_POLICY")
    if args.omp_wait_policy == "passive":  # before torch (libgomp reads it once, at load)
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    load_before = load_average()
    started = time.perf_counter()
    whole = CpuMeter()
    import distill  # noqa: F401  (first: the torchvision compatibility step)
    from distill.launch import tune_cpu_malloc

    applied = tune_cpu_malloc()  # as distill.training.train does on CPU (train.cpu_malloc_tuning)
    import torch

    torch.set_num_threads(THREADS)
    from distill.cache import write_cache

    real, root = data_available(args.recipe, args.data_root)
    data_note = (f"CamVid at {root}" if real else
                 f"SYNTHETIC: {root} not found; synthetic 360x480 images, 11 classes (CamVid's "
                 "shape); decode costs differ from PNG")
    log(f"data: {data_note}; load average {load_before}")
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        work = Path(tmp).resolve()
        recipe, full, described = build_recipes(args, work, synthetic=not real)
        t0 = time.perf_counter()
        write_cache(recipe)
        cache_s = time.perf_counter() - t0
        log(f"logit store: {cfg['cache_samples']} images in {cache_s:.1f} s")
        batches = preload(recipe, cfg["batches"], args.seed)
        trainer = Trainer(recipe, work, args.seed)
        cpu: dict[str, dict[str, float]] = {}
        log(f"interleaved rounds ({cfg['rounds']} + 1 warm-up)")
        meter = CpuMeter()
        rounds = measure_rounds(trainer, recipe, full, batches, cfg, args.seed)
        cpu["rounds"] = meter.read()
        log("student fed by the live loader")
        meter = CpuMeter()
        live = measure_live_loader(trainer, full, batches, cfg, args.seed)
        cpu["live_loader"] = meter.read()
        log("loader profile (one process)")
        profile = profile_loader(full, cfg["profile_images"], args.seed)
        del trainer
        log("subprocesses: malloc tuned vs default (ABBA), then the distillation variants' RSS")
        meter = CpuMeter()
        malloc = measure_malloc(recipe, batches, work, cfg, args.seed)
        cpu["subprocesses (malloc, RSS)"] = meter.read()
        omp = None
        if not args.skip_omp:
            log("subprocesses: OpenMP wait policy default vs PASSIVE (ABBA)")
            meter = CpuMeter()
            omp = measure_omp(work, cfg, args.seed)
            cpu["subprocesses (OpenMP)"] = meter.read()
        cpu["whole run"] = whole.read()
    result: dict[str, Any] = {
        "recipe": args.recipe, "loss_kind": recipe.loss.kind, "data": data_note, "real_data": real,
        "teacher": described,
        "batch_size": recipe.data.batch_size, "crop_size": list(recipe.data.crop_size),
        "base_size": list(recipe.data.resize), "num_workers": recipe.data.num_workers,
        "cache": {"samples": cfg["cache_samples"], "write_s": cache_s,
                  "layout": f"{recipe.cache.layout} k={recipe.cache.topk} {recipe.cache.dtype} "
                            f"stride {recipe.cache.stride}"},
        "config": cfg, "targets": {"cached_vs_student": CACHED_TARGET,
                                   "streamed_vs_student_plus_teacher": STREAMED_TARGET,
                                   "loader_vs_student": LOADER_TARGET},
        "rounds": rounds, "live_loader": live, "loader_profile": profile, "malloc": malloc,
        "omp": omp, "omp_wait_policy": {"option": args.omp_wait_policy,
                                        "inherited": omp_before,
                                        "in_effect": os.environ.get("OMP_WAIT_POLICY")},
        "load_before": load_before, "load_after": load_average(), "cpu": cpu,
        "environment": environment(args, applied),
        "seconds": time.perf_counter() - started,
    }
    result["summary"] = summarize(result)
    print_report(result)
    save_json(args.out, result)
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
