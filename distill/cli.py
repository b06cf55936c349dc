"""``distill SUBCOMMAND RECIPE [key=value ...]`` (also ``python -m distill``).

Every subcommand takes a recipe and dotted overrides; bad input ends with one red message that
names the file, key or value, and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import traceback

from distill.config import RecipeError, load_recipe, recipe_to_yaml
from rich.text import Text

from distill.progress import console

STAGES = ("teacher", "baseline", "student")
# Bare `name=value` words each subcommand accepts as shorthands for recipe keys.
SHORTHANDS = {
    "eval": {"checkpoint": "eval.checkpoint", "split": "eval.split"},
    "compare": {"checkpoint": "eval.checkpoint", "split": "eval.split"},
    "export": {"format": "export.formats", "checkpoint": "eval.checkpoint"},
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Knowledge distillation for semantic segmentation.",
        epilog="Overrides are dotted recipe keys, e.g. train.epochs=3 data.root=/data/camvid.",
    )
    from distill import __version__

    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, *, stage_default: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("recipe", help="recipe YAML file")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
        if stage_default is not None:
            sub.add_argument(
                "--stage", choices=STAGES, default=stage_default,
                help=("teacher: train the teacher alone; baseline: the student without a teacher; "
                      "student: the student, distilled when the recipe has a teacher (default: %(default)s)"
                      if name == "train" else "whose weights to score: teacher, baseline or student "
                      "(default: %(default)s)"),
            )
        return sub

    add("train", "train a model, or distill the teacher into the student", stage_default="student")
    eval_parser = add("eval", "evaluate a checkpoint: per-class IoU, mIoU, JSON", stage_default="student")
    eval_parser.epilog = "Shorthands: checkpoint=PATH (eval.checkpoint), split=NAME (eval.split)."
    add("run", "every stage the recipe asks for: teacher, cache, baseline, student, compare, export")
    add("cache", "run the teacher once over the cached splits and store its logits")
    compare_parser = add("compare", "teacher vs student (vs baseline): mIoU, size, speed, per-class IoU")
    compare_parser.epilog = "Shorthands: checkpoint=PATH (eval.checkpoint: the student), split=NAME (eval.split)."
    export_parser = add("export", "export the student: ONNX + smp folder (safetensors) + distill.json, parity checked")
    export_parser.epilog = "Shorthands: format=onnx,safetensors (export.formats), checkpoint=PATH."
    predict = commands.add_parser(
        "predict", help="segment images with an exported student (onnxruntime only)",
        description="segment images with an exported student (onnxruntime only)",
    )
    predict.add_argument("export_dir", help="a folder written by `distill export`")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--out", default="predictions", help="folder for the colour masks")
    predict.add_argument("--int8", action="store_true",
                         help="run the INT8 student (student_int8.onnx, export format onnx_int8)")
    add("recipe", "print the fully resolved recipe (every default written out)")
    return parser


def _expand_shorthands(command: str, overrides: list[str]) -> list[str]:
    table = SHORTHANDS.get(command, {})
    expanded = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key == "format" and command == "export" and not value.lstrip().startswith("["):
            value = "[" + ", ".join(v.strip() for v in value.split(",") if v.strip()) + "]"
        expanded.append(f"{table[key]}={value}" if sep and key in table else item)
    return expanded


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distill`` console script."""
    parser = _parser()
    # Overrides may come before or after options (`--stage teacher train.epochs=3`): argparse
    # cannot intermix positionals with subcommands, so the words it leaves over are collected here.
    args, extra = parser.parse_known_args(argv)
    if args.command == "predict":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return _predict(args)
    unknown = [word for word in extra if "=" not in word or word.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    try:  # torch and the rest load here (seconds): a Ctrl-C then has stopped nothing yet
        expected = _input_errors()
    except KeyboardInterrupt:
        console.print(Text(_interrupted(args)), highlight=False)
        return 130
    from distill.launch import end_launched_process, in_process_group

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        stop_on_sigterm()
    try:
        code = _run_command(args, expected)
    except SystemExit as stopped:  # SIGTERM from the launcher: the clean-up has run
        if not in_process_group():
            raise
        code = stopped.code if isinstance(stopped.code, int) else 1
    except BaseException:
        if not in_process_group():
            raise
        traceback.print_exc()  # os._exit below would drop the interpreter's own report
        code = 1
    if in_process_group():
        end_launched_process(code)
    if argv is None:  # the command line's process, not a caller's
        _ignore_late_interrupts()
    return code


def stop_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit(143)``, so that clean-up code runs.

    When one launched process fails, torch's launcher stops the others with SIGTERM. Python
    ends on SIGTERM without unwinding, so a run into a finished run's folder would leave that
    run set aside in ``.previous_run`` and hidden. As an exception, the stop unwinds like any
    other error: the earlier run is put back and the locks are released.
    """
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _input_errors() -> tuple[type[Exception], ...]:
    """distill's errors that mean bad input (exit 2, no traceback). Imported here, not at the
    top: `distill predict` must run without torch."""
    from distill.cache import CacheError
    from distill.comparison import CompareError
    from distill.data import DataError
    from distill.export import ExportError
    from distill.launch import TrainingError
    from distill.models import ModelError
    from distill.preflight import InputError
    from distill.run_folder import FolderBusyError, UnwritableFolderError

    return (RecipeError, DataError, ModelError, TrainingError, CacheError, CompareError, ExportError,
            FolderBusyError, UnwritableFolderError, InputError)


def _ignore_late_interrupts() -> None:
    """The command is done and has said so: a Ctrl-C while the interpreter exits would only
    print an ``Exception ignored in atexit callback`` traceback over a finished run."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_command(args: argparse.Namespace, expected: tuple[type[Exception], ...]) -> int:
    from distill.launch import is_launch_main

    try:
        recipe = load_recipe(args.recipe, _expand_shorthands(args.command, args.overrides))
        if args.command == "recipe":
            print(recipe_to_yaml(recipe), end="")
        elif args.command == "train":
            from distill.training import train

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
        elif args.command == "cache":
            from distill.cache import write_cache

            store = write_cache(recipe)
            if is_launch_main():
                console.print(f"[green]done[/]: logit store in {store}")
        elif args.command == "compare":
            from distill.comparison import compare

            compare(recipe, recipe.eval_split)
        elif args.command == "export":
            from distill.export import export_student

            if is_launch_main():  # one export, not one per process
                export_student(recipe)  # prints where it wrote and the parity it measured
    except expected as error:
        # Only distill's own errors are the user's input: anything else is a bug and keeps its
        # traceback (exit 1), so that it is not mistaken for a bad recipe.
        if _debug():
            raise
        _print_error(error)
        return 2
    except KeyboardInterrupt as interrupt:
        if _debug():
            raise
        console.print(Text(_interrupted(args, interrupt)), highlight=False)
        return 130  # 128 + SIGINT, as shells report it
    return 0


def _debug() -> bool:
    """``DISTILL_DEBUG`` set to anything but empty, 0, false, no or off: tracebacks kept."""
    return os.environ.get("DISTILL_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


# What a Ctrl-C leaves, per command: every file is written to a temporary name and renamed, and
# checkpoint and export folders are swapped in whole, so what is on disk is whole.
_AFTER_INTERRUPT = {
    "train": "the last epoch's checkpoint is whole; resume this run with `{command}`",
    "run": "finished stages are kept and a killed training stage resumes: run `{command}` again",
    "cache": "samples already stored are kept: `{command}` again writes only the missing ones",
    "export": "the previous export (if any) is untouched: run `{command}` again",
}


def _interrupted(args: argparse.Namespace, interrupt: KeyboardInterrupt | None = None) -> str:
    """What a Ctrl-C left, and the command that carries on with exactly this run: the same
    recipe and overrides (its output_dir among them), plus ``train.resume`` for ``train`` once
    the run has a checkpoint (before it, the same command starts it again)."""
    advice = _AFTER_INTERRUPT.get(args.command, "nothing was written half-way; run the command again")
    words = ["distill", args.command, args.recipe]
    if args.command in ("train", "eval"):
        words += ["--stage", args.stage]
    overrides = list(args.overrides)
    # StoppedWithCheckpoint and StoppedBeforeCheckpoint (distill.training), read by their
    # attributes: no import of training here. Anything else stopped before the run began.
    resume_folder = getattr(interrupt, "resume_folder", None)
    if args.command == "train" and resume_folder is not None:
        overrides = [o for o in overrides if not o.startswith("train.resume=")]
        overrides.append(f"train.resume={resume_folder}")
    elif args.command == "train" and any(o.startswith("train.resume=") for o in overrides):
        advice = "the checkpoint it resumes from is untouched: resume it again with `{command}`"
    elif args.command == "train":
        restored = getattr(interrupt, "earlier_run_restored", False)
        advice = ("it had not been validated yet, so the folder's earlier run is back as it was "
                  "and there is nothing to resume" if restored else
                  "it had saved no checkpoint yet, so there is nothing to resume")
        advice += ": start it again with `{command}`"
    command = shlex.join(words + overrides)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        command += " (under the same `accelerate launch` options, with -m distill)"
    return f"interrupted: distill {args.command} stopped; " + advice.format(command=command)


def _print_error(error: BaseException) -> None:
    # Text, not markup: messages hold file names and values with brackets.
    console.print(Text.assemble(("error: ", "bold red"), error_message(error)), highlight=False)


def error_message(error: BaseException) -> str:
    """The error's own message, without a data-loader worker's re-raised traceback.

    PyTorch re-raises an exception from a loader worker with "Caught X in DataLoader worker
    process N. Original Traceback ..." in its message; the user needs only its last line.
    """
    text = str(error)
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.strerror or text}: '{error.filename}'"
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return text


def _predict(args: argparse.Namespace) -> int:
    from distill.export.predict import PredictError, predict

    try:
        written = predict(args.export_dir, args.images, args.out, int8=args.int8)
    except (PredictError, OSError) as error:
        _print_error(error)
        if isinstance(error, PredictError):  # predict checks all first and writes all or nothing
            console.print("nothing was written", highlight=False)
        return 2
    # Text, not markup: a folder name may hold brackets. An image named twice gives one mask.
    console.print(Text.assemble(("done", "green"), f": {len(set(written))} masks in {args.out}"),
                  highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
