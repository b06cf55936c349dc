"""``distill SUBCOMMAND RECIPE [key=value ...]`` (also ``python -m distill``).

Every subcommand takes a recipe and dotted overrides; bad input ends with one red message that
names the file, key or value, and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from distill.config import RecipeError, load_recipe, recipe_to_yaml
from distill.progress import console

STAGES = ("teacher", "baseline", "student")
# Bare `name=value` words each subcommand accepts as shorthands for recipe keys.
SHORTHANDS = {"eval": {"checkpoint": "eval.checkpoint", "split": "eval.split"}}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Knowledge distillation for semantic segmentation.",
        epilog="Overrides are dotted recipe keys, e.g. train.epochs=3 data.root=/data/camvid.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, *, stage_default: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("recipe", help="recipe YAML file")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
        if stage_default is not None:
            sub.add_argument(
                "--stage", choices=STAGES, default=stage_default,
                help="teacher: train the teacher alone; baseline: the student without a teacher; "
                "student: the student, distilled when the recipe has a teacher (default: %(default)s)",
            )
        return sub

    add("train", "train a model, or distill the teacher into the student", stage_default="student")
    eval_parser = add("eval", "evaluate a checkpoint: per-class IoU, mIoU, JSON", stage_default="student")
    eval_parser.epilog = "Shorthands: checkpoint=PATH (eval.checkpoint), split=NAME (eval.split)."
    add("run", "every stage the recipe asks for: teacher, baseline, distilled student")
    add("recipe", "print the fully resolved recipe (every default written out)")
    return parser


def _expand_shorthands(command: str, overrides: list[str]) -> list[str]:
    table = SHORTHANDS.get(command, {})
    expanded = []
    for item in overrides:
        key, sep, value = item.partition("=")
        expanded.append(f"{table[key]}={value}" if sep and key in table else item)
    return expanded


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distill`` console script."""
    parser = _parser()
    # Overrides may come before or after options (`--stage teacher train.epochs=3`): argparse
    # cannot intermix positionals with subcommands, so the words it leaves over are collected here.
    args, extra = parser.parse_known_args(argv)
    unknown = [word for word in extra if "=" not in word or word.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    from distill.data import DataError
    from distill.models import ModelError
    from distill.train import TrainingError

    try:
        recipe = load_recipe(args.recipe, _expand_shorthands(args.command, args.overrides))
        if args.command == "recipe":
            print(recipe_to_yaml(recipe), end="")
        elif args.command == "train":
            from distill.train import train

            result = train(recipe, args.stage)
            console.print(
                f"[green]done[/]: {args.stage} best val mIoU {100 * result.best_miou:.1f} "
                f"(final {100 * result.final_miou:.1f}) after {result.steps} steps -> {result.run_dir}"
            )
        elif args.command == "run":
            from distill.pipeline import run_pipeline

            run_pipeline(recipe)
        elif args.command == "eval":
            from distill.evaluation import evaluate_checkpoint

            evaluate_checkpoint(recipe, args.stage)
    except (RecipeError, DataError, ModelError, TrainingError) as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False, markup=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
