"""Every distilled-vs-baseline pair measured on CamVid's held-out sequence, pooled in one table.

``bench/studies/camvid_kd.py`` writes one JSON per command; each holds a teacher, a baseline arm and
distilled arms, seed by seed. The held-out protocol (train on 0001TP + 0016E5, score sequence
0006R0 at label resolution, last epoch) is the same in all of ``bench/studies/results/camvid_kd_heldout*.json``,
so their pairs can be read together: one row per (distilled arm, seed) against the baseline of
the same JSON and seed. A pair stored in two JSONs (a later command reusing an arm) counts once.

The pooled mean gain and its standard deviation say whether distillation moves the held-out
score beyond what two seeds of one setting already differ by: the spread printed beside it is
how far apart the two seeds of each stored baseline (seeds 0 and 1 of one command) ended. Reads the stored results only;
trains nothing.

Usage: ``python bench/studies/heldout_gains.py [--results-dir bench/studies/results] [--pattern 'camvid_kd_heldout*.json'] [--out bench/studies/results/heldout_gains.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for benchlib
from benchlib import markdown_table, save_json


def _baseline_arm(result: dict) -> str:
    """The arm a result's gains are measured from; older results name none: their one baseline arm."""
    if "baseline_arm" in result:
        return result["baseline_arm"]
    candidates = [arm for arm in result["arms"] if arm.startswith("baseline")]
    return candidates[0] if len(candidates) == 1 else "baseline"


def paired_gains(result: dict) -> list[dict]:
    """The (distilled arm, seed) pairs of one camvid_kd.py result against its own baseline."""
    baseline = result["arms"].get(_baseline_arm(result), {})
    teacher = result["teacher"]["final_miou"]
    rows = []
    for arm, runs in result["arms"].items():
        if arm.startswith("baseline"):
            continue
        for seed, run in runs.items():
            if seed == "summary" or seed not in baseline:
                continue
            base = baseline[seed]["final_miou"]
            rows.append({"arm": arm, "seed": int(seed), "teacher": teacher, "baseline": base,
                         "distilled": run["final_miou"], "gain": run["final_miou"] - base,
                         "gap_share": (run["final_miou"] - base) / (teacher - base) if teacher > base else None})
    return rows


def baseline_seed_spread(result: dict) -> float | None:
    """How far apart seeds 0 and 1 of the result's baseline arm ended (None without both)."""
    runs = result["arms"].get(_baseline_arm(result), {})
    return abs(runs["0"]["final_miou"] - runs["1"]["final_miou"]) if {"0", "1"} <= set(runs) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=Path("bench/studies/results"))
    parser.add_argument("--pattern", default="camvid_kd_heldout*.json",
                        help="which results to pool (a glob in --results-dir), e.g. "
                        "'camvid_pretrained_r4_*.json' for the pretrained study's pairs")
    parser.add_argument("--out", type=Path, default=Path("bench/studies/results/heldout_gains.json"))
    args = parser.parse_args()

    pairs, seen, spreads = [], set(), {}
    for path in sorted(args.results_dir.glob(args.pattern)):
        result = json.loads(path.read_text())
        spread = baseline_seed_spread(result)
        if spread is not None:  # keyed by the two scores: a baseline reused by a later command counts once
            base = result["arms"][_baseline_arm(result)]
            spreads[(round(base["0"]["final_miou"], 6), round(base["1"]["final_miou"], 6))] = spread
        for row in paired_gains(result):
            key = (row["arm"], row["seed"], round(row["teacher"], 6), round(row["distilled"], 6))
            if key not in seen:  # the same trained arm, reused by a later command
                seen.add(key)
                pairs.append({"file": path.name, **row})
    if not pairs:
        raise SystemExit(f"no {args.pattern} with a distilled arm in {args.results_dir}")

    print(markdown_table(
        ["file", "arm", "seed", "teacher", "baseline", "distilled", "gain", "share of the gap"],
        [[p["file"], p["arm"], p["seed"], f"{100 * p['teacher']:.1f}", f"{100 * p['baseline']:.1f}",
          f"{100 * p['distilled']:.1f}", f"{100 * p['gain']:+.1f}",
          "no gap" if p["gap_share"] is None else f"{100 * p['gap_share']:.0f}%"]
         for p in pairs]))
    gains = [p["gain"] for p in pairs]
    summary = {"pairs": len(gains), "mean_gain": statistics.mean(gains),
               "stdev_gain": statistics.stdev(gains) if len(gains) > 1 else None,
               # Over the pairs whose teacher is above their baseline (a share of no gap is none).
               "mean_gap_share": statistics.mean(shares) if (shares := [p["gap_share"] for p in pairs
                                                                        if p["gap_share"] is not None]) else None,
               "pairs_above_baseline": sum(g > 0 for g in gains),
               "baseline_seed_spreads": sorted(spreads.values())}
    spread = "" if summary["stdev_gain"] is None else f", standard deviation {100 * summary['stdev_gain']:.1f}"
    print(f"\n{len(gains)} pairs: mean gain {100 * summary['mean_gain']:+.2f} points{spread}; "
          + ("" if summary["mean_gap_share"] is None else f"mean share of the gap {100 * summary['mean_gap_share']:.0f}%; ")
          + f"above the baseline in {summary['pairs_above_baseline']} of {len(gains)}")
    if spreads:
        print(f"seeds 0 and 1 of one baseline ended {100 * min(spreads.values()):.1f}-"
              f"{100 * max(spreads.values()):.1f} points apart ({len(spreads)} baselines)")
    save_json(args.out, {"results_dir": str(args.results_dir), "pattern": args.pattern,  # what it read
                         "summary": summary, "pairs": pairs})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
