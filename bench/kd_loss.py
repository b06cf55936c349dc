"""Benchmark: fused ``kd_loss`` vs the plain-autograd ``kd_loss_reference`` (``--loss dist``:
fused ``dist_loss`` vs ``dist_loss_reference``).

Measures forward+backward time (median over repeats, after a warm-up) and peak extra memory of
each variant, side by side in one run.

Time: one ``spawn`` subprocess runs the variants round-robin on the same inputs, so load from
other processes on a shared machine hits every variant alike (the median then compares fairly).

Memory: every variant runs in its own fresh ``spawn`` subprocess, so peaks cannot leak from one
variant into the next:

* CPU: peak RSS growth, ``getrusage(RUSAGE_SELF).ru_maxrss`` after the first fwd+bwd minus the
  resident size right after the inputs (and ``student.grad``) were allocated. ``student.grad`` is
  preallocated so neither variant is charged for it (as for a network's parameter grads).
* CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` after the inputs.

Peers, timed and measured beside them: the same loss as other toolkits compute it, written here
from their sources (``peer_kl_div``: mmrazor's ``KLDivergence`` and torchdistill's ``KDLoss``,
``F.kl_div(..., reduction="batchmean")`` on the 4-D logits; ``peer_dist``: mmrazor's
``DISTLoss`` on one row per pixel). Their values differ from distill's (no void mask, another
mean), so only their cost is compared.

Targets: peak memory <= 0.5x of the reference, time <= 1.0x of the reference and of the fastest peer.

Usage: ``python bench/kd_loss.py [--device cuda] [--dtype bf16] [--out bench/results/kd_loss.json]``
and ``python bench/kd_loss.py --loss dist --shape 8 11 192 256 --temperature 1 --channels-last
--out bench/results/dist_loss.json`` (DIST on the CamVid CPU recipe's logits' layout).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchlib import save_json

PEAK_TARGET = 0.5
TIME_TARGET = 1.0
# (row name, chunk_size). "reference" is the plain-autograd baseline (kd_loss_reference or
# dist_loss_reference); "peer_*" rows are other toolkits' losses as they compute them (their
# maths differs: they are here for speed), the fused rows' time target.
KL_VARIANTS: list[tuple[str, int | None]] = [
    ("reference", None),
    ("peer_kl_div", None),
    ("fused", None),
    ("fused_chunk1", 1),
    ("fused_chunk2", 2),
]
DIST_VARIANTS: list[tuple[str, int | None]] = [("reference", None), ("peer_dist", None), ("fused", None)]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _variants(cfg: dict[str, Any]) -> list[tuple[str, int | None]]:
    every = DIST_VARIANTS if cfg["loss"] == "dist" else KL_VARIANTS
    return [(name, chunk) for name, chunk in every if not cfg["variants"] or name in cfg["variants"]]


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux (bytes on macOS, where /proc is missing anyway).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _setup(cfg: dict[str, Any]) -> tuple[Any, ...]:
    """In the child: import torch and distill, build the inputs.

    Returns (torch, device, step, sync, (student, teacher, target)).
    """
    import torch

    import distill  # noqa: F401  (project convention: import distill before anything else)
    from distill.losses import dist_loss, dist_loss_reference, kd_loss, kd_loss_reference

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    dtype = getattr(torch, DTYPES[cfg["dtype"]])
    temperature = cfg["temperature"]

    def step(name: str, chunk_size: int | None, s: Any, t: Any, y: Any) -> Any:
        reference = name == "reference"
        if name == "peer_kl_div":
            loss = _peer_kl_div(torch, s, t, temperature)
        elif name == "peer_dist":
            loss = _peer_dist(torch, s, t, temperature)
        elif cfg["loss"] == "dist":
            fn = dist_loss_reference if reference else dist_loss
            loss = fn(s, t, temperature=temperature, target=y)
        elif reference:
            loss = kd_loss_reference(s, t, temperature=temperature, target=y)
        else:
            loss = kd_loss(s, t, temperature=temperature, target=y, chunk_size=chunk_size)
        loss.backward()
        return loss

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Tiny warm-up first: thread pools and kernels initialise without touching the peak.
    tiny = torch.randn(2, 3, 4, 4, device=device, dtype=dtype, requires_grad=True)
    for name, _ in _variants(cfg):
        step(name, 2, tiny, torch.randn_like(tiny), None)

    n, c, h, w = cfg["shape"]
    gen = torch.Generator(device="cpu").manual_seed(cfg["seed"])
    # Generated in place, in the final dtype: no freed temporaries left resident in the heap.
    student = torch.empty(n, c, h, w, dtype=dtype).normal_(0, 3, generator=gen).to(device)
    if cfg["channels_last"]:  # what a channels_last model's logits are
        student = student.contiguous(memory_format=torch.channels_last)
    teacher = torch.empty(n, c, h, w, dtype=dtype).normal_(0, 3, generator=gen).to(device)
    target = torch.randint(0, c, (n, h, w), generator=gen)
    target[torch.rand(n, h, w, generator=gen) < cfg["ignore_fraction"]] = 255
    target = target.to(device)
    student.requires_grad_(True)
    student.grad = torch.zeros_like(student)
    sync()
    return torch, device, step, sync, (student, teacher, target)


def _peer_kl_div(torch: Any, s: Any, t: Any, temperature: float) -> Any:
    """Pixel KL as mmrazor's ``KLDivergence`` and torchdistill's ``KDLoss`` compute it:
    ``F.kl_div(log_softmax(s / T), softmax(t / T), reduction="batchmean") * T^2`` over the 4-D
    logits (every pixel, void included, divided by the batch size: a value that grows with the
    image's area, so only its speed and memory are compared)."""
    import torch.nn.functional as F

    if s.dtype in (torch.float16, torch.bfloat16):  # as autocast runs them: the sum overflows fp16
        s, t = s.float(), t.float()
    t = t.detach()
    return F.kl_div(F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1),
                    reduction="batchmean") * temperature**2


def _peer_dist(torch: Any, s: Any, t: Any, temperature: float, eps: float = 1e-8) -> Any:
    """DIST as mmrazor's ``DISTLoss`` computes it (beta = gamma = 1) on the logits flattened to
    one row per pixel, void ones included: Pearson correlation between softmax rows (inter-class)
    and between class columns (intra-class)."""
    c = s.shape[1]
    if s.dtype in (torch.float16, torch.bfloat16):  # as autocast runs a softmax
        s, t = s.float(), t.float()
    y_s = (s.permute(0, 2, 3, 1).reshape(-1, c) / temperature).softmax(dim=1)
    y_t = (t.detach().permute(0, 2, 3, 1).reshape(-1, c) / temperature).softmax(dim=1)

    def pearson(a: Any, b: Any) -> Any:
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    inter = 1 - pearson(y_s, y_t).mean()
    intra = 1 - pearson(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean()
    return temperature**2 * (inter + intra)


def _malloc_trim() -> None:
    # Return freed heap pages to the OS so the RSS baseline holds only live memory.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure_memory(name: str, chunk_size: int | None, cfg: dict[str, Any]) -> dict[str, Any]:
    """Peak extra memory of one fwd+bwd of one variant (run in a fresh process)."""
    torch, device, step, sync, (student, teacher, target) = _setup(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _malloc_trim()
        base = _current_rss_bytes()
        stale = _max_rss_bytes() - base  # > 0 if something earlier peaked above the inputs
    loss = step(name, chunk_size, student, teacher, target)
    sync()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _max_rss_bytes() - base
    out = {
        "variant": name,
        "chunk_size": chunk_size,
        "loss": float(loss.detach().float()),
        "peak_bytes": int(peak),
        "logits_bytes": student.numel() * student.element_size(),
    }
    if device.type != "cuda" and stale > 16 * 2**20:
        out["warning"] = f"RSS had peaked {stale / 2**20:.0f} MiB above the baseline before the run"
    return out


def _measure_time(cfg: dict[str, Any]) -> dict[str, list[float]]:
    """Fwd+bwd seconds per variant, variants interleaved round-robin, after one warm-up each."""
    _, _, step, sync, inputs = _setup(cfg)
    times: dict[str, list[float]] = {name: [] for name, _ in _variants(cfg)}
    for rep in range(cfg["repeats"] + 1):
        for name, chunk_size in _variants(cfg):
            t0 = time.perf_counter()
            step(name, chunk_size, *inputs)
            sync()
            if rep > 0:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - t0)
    return times


def _run_isolated(fn: Any, *args: Any) -> Any:
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = result["config"]
    table = Table(
        title=f"{cfg['loss']} loss fwd+bwd, logits {'x'.join(map(str, cfg['shape']))} {cfg['dtype']} "
        f"{'channels_last ' if cfg['channels_last'] else ''}"
        f"on {cfg['device']}, T={cfg['temperature']}, {cfg['repeats']} repeats"
    )
    for col in ("variant", "chunk", "loss", "peak MiB", "x logits", "peak_ratio", "time s",
                "time_ratio", "vs peer", "targets"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for row in result["rows"]:
        ok = row.get("meets_targets")
        table.add_row(
            row["variant"],
            "-" if row["chunk_size"] is None else str(row["chunk_size"]),
            f"{row['loss']:.6f}",
            f"{row['peak_bytes'] / 2**20:.1f}",
            f"{row['peak_bytes'] / row['logits_bytes']:.2f}",
            f"{row['peak_ratio']:.2f}",
            f"{row['time_s']:.3f}",
            f"{row['time_ratio']:.2f}",
            f"{row['time_ratio_to_fastest_peer']:.2f}" if "time_ratio_to_fastest_peer" in row else "-",
            "-" if ok is None else ("[green]yes[/]" if ok else "[red]no[/]"),
        )
    console = Console(width=max(Console().width, 120))  # pipes default to 80 columns
    console.print(table)
    console.print(
        f"targets: peak_ratio <= {PEAK_TARGET} (to the reference row), time <= {TIME_TARGET}x the "
        "reference's and the fastest peer's (peer_*: other toolkits' formulas, timed side by side)"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape", type=int, nargs=4, default=[8, 19, 256, 512], metavar=("N", "C", "H", "W")
    )
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--ignore-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", choices=["kl", "dist"], default="kl",
                        help="kl: kd_loss (pixel KL); dist: dist_loss (DIST)")
    parser.add_argument("--variants", default="",
                        help="comma-separated rows to measure (default: all of the loss's); "
                             "the reference is always measured, first: every ratio is to it")
    parser.add_argument("--channels-last", action="store_true",
                        help="student logits in channels_last memory (as a channels_last model gives)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/kd_loss.json"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    known = [name for name, _ in (DIST_VARIANTS if args.loss == "dist" else KL_VARIANTS)]
    variants = {"reference", *filter(None, args.variants.split(","))} if args.variants else set()
    if variants - set(known):
        parser.error(f"--variants: no {', '.join(sorted(variants - set(known)))} for --loss {args.loss} "
                     f"(its rows: {', '.join(known)})")

    cfg = {
        "shape": args.shape,
        "temperature": args.temperature,
        "repeats": args.repeats,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "ignore_fraction": args.ignore_fraction,
        "seed": args.seed,
        "loss": args.loss,
        "variants": sorted(variants),
        "channels_last": args.channels_last,
    }
    load_before = os.getloadavg()[0]
    rows = [_run_isolated(_measure_memory, name, chunk, cfg) for name, chunk in _variants(cfg)]
    times = _run_isolated(_measure_time, cfg)
    for row in rows:
        row["times_s"] = times[row["variant"]]
        row["time_s"] = statistics.median(row["times_s"])
    ref = rows[0]
    fastest_peer = min((row["time_s"] for row in rows if row["variant"].startswith("peer_")), default=None)
    for row in rows:
        row["peak_ratio"] = row["peak_bytes"] / ref["peak_bytes"]
        row["time_ratio"] = row["time_s"] / ref["time_s"]
        if fastest_peer is not None:
            row["time_ratio_to_fastest_peer"] = row["time_s"] / fastest_peer
        if row["variant"].startswith("peer_"):
            continue  # another formula (no void mask, another mean): its value is not comparable
        row["loss_rel_diff"] = abs(row["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
        if row is not ref:  # memory against the autograd version; time against it and every peer
            # Unknown (None) without a peer measured beside it (--variants without one).
            row["meets_targets"] = None if fastest_peer is None else (
                row["peak_ratio"] <= PEAK_TARGET and row["time_ratio"] <= TIME_TARGET
                and row["time_ratio_to_fastest_peer"] <= TIME_TARGET
            )
    import torch

    result = {
        "config": cfg,
        "targets": {"peak_ratio_max": PEAK_TARGET, "time_ratio_max": TIME_TARGET,
                    "time_ratio_to_fastest_peer_max": TIME_TARGET},
        "env": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],  # other users' load
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
            "memory_method": "cuda max_memory_allocated" if args.device.startswith("cuda")
            else "ru_maxrss growth over RSS after inputs (malloc_trim), fresh process per variant",
            "time_method": "median of fwd+bwd, variants interleaved round-robin in one process",
        },
        "rows": rows,
    }
    save_json(args.out, result)
    _print_table(result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
