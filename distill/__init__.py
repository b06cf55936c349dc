"""distill: knowledge distillation for semantic segmentation.

The names a script needs, imported on first use (so that ``import distill`` stays cheap and
``distill predict`` runs without torch)::

    import distill
    recipe = distill.load_recipe("recipes/quickstart.yaml", overrides=["train.epochs=2"])
    distill.run(recipe)                                  # every stage, as `distill run`
    result = distill.train(recipe, teacher=my_module)    # or one stage, with your own models

See the README ("From Python") for a teacher of your own distilled without a recipe file.
"""

from __future__ import annotations

import importlib
from typing import Any

from distill._compat import install_torchvision_hook

install_torchvision_hook()  # before anything imports torchvision (see distill/_compat.py)

__version__ = "0.1.0"

# name -> the module that defines it
_PUBLIC = {
    "Recipe": "distill.config",
    "RecipeError": "distill.config",
    "load_recipe": "distill.config",
    "recipe_from_dict": "distill.config",
    "train": "distill.training",
    "TrainResult": "distill.training",
    "run": "distill.pipeline",
    "evaluate": "distill.evaluation",
    "compare": "distill.comparison",
    "export_student": "distill.export",
    "load_exported": "distill.export",
    "build_model": "distill.models",
    "build_dataset": "distill.data",
    "Teacher": "distill.teacher",
    "DistillLoss": "distill.losses",
    "kd_loss": "distill.losses",
    "dist_loss": "distill.losses",
    "cwd_loss": "distill.losses",
    "end_launched_process": "distill.launch",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'distill' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), "run_pipeline" if name == "run" else name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
