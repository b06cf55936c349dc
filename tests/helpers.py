"""Small recipes and models shared by the tests (fast on 2 CPU cores)."""

from __future__ import annotations

import os

import torch

from pathlib import Path

from distill.config import Recipe, recipe_from_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real CamVid folder: $DISTILL_CAMVID, else the recipes' data/camvid, else the shared data
# folder beside the checkout (where CI has it). Tests that need it take conftest's camvid_root.
CAMVID_PLACES = [Path(p) for p in filter(None, [os.environ.get("DISTILL_CAMVID")])] + [
    REPO_ROOT / "data" / "camvid", REPO_ROOT.parent / "shared" / "data" / "camvid"]
CAMVID = next((p for p in CAMVID_PLACES if (p / "train").is_dir()), CAMVID_PLACES[-1])


class TinySegmenter(torch.nn.Module):
    """A few convolutions: enough to learn the synthetic shapes a little, in seconds."""

    def __init__(self, num_classes: int, width: int = 8, batch_norm: bool = True) -> None:
        super().__init__()
        norm = torch.nn.BatchNorm2d(width) if batch_norm else torch.nn.Identity()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1), norm, torch.nn.ReLU(),
            torch.nn.Conv2d(width, width, 3, padding=2, dilation=2), torch.nn.ReLU(),
            torch.nn.Conv2d(width, num_classes, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


def tiny(num_classes: int, width: int = 8) -> torch.nn.Module:
    """Factory for recipes: ``factory: helpers:tiny``."""
    return TinySegmenter(num_classes, width)


def tiny_without_batch_norm(num_classes: int, width: int = 8) -> torch.nn.Module:
    """``tiny`` without its BatchNorm: a model whose gradient does not depend on how a batch is
    split over processes (BatchNorm normalises by each process's own samples)."""
    return TinySegmenter(num_classes, width, batch_norm=False)


class NaNSegmenter(TinySegmenter):
    """Outputs NaN logits: to check that a non-finite loss stops the run."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images) * float("nan")


def nan_model(num_classes: int) -> torch.nn.Module:
    return NaNSegmenter(num_classes)


def tiny_recipe(output_dir, *, teacher: bool = False, **sections) -> Recipe:
    """A synthetic-data recipe of tiny models; ``sections`` override whole keys (dotted allowed)."""
    tree: dict = {
        "output_dir": str(output_dir),
        "data": {
            "dataset": "synthetic",
            "synthetic": {"num_train": 24, "num_val": 13, "size": [32, 32], "num_classes": 4, "seed": 0},
            "scale_range": [0.75, 1.25], "crop_size": [32, 32], "batch_size": 4,
            "eval_batch_size": 4, "num_workers": 0,
        },
        "train": {"epochs": 2, "lr": 0.01, "log_every_steps": 2, "warmup_steps": 0},
    }
    if teacher:
        tree["teacher"] = {"factory": "helpers:tiny", "factory_kwargs": {"width": 12}}
        tree["student"] = {"factory": "helpers:tiny", "factory_kwargs": {"width": 6}}
        tree["loss"] = {"kd_weight": 1.0, "temperature": 2.0}
    else:
        tree["model"] = {"factory": "helpers:tiny"}
    overrides = [f"{k}={v}" for k, v in sections.items()]
    return recipe_from_dict(tree, overrides)


class SlowSegmenter(TinySegmenter):
    """A tiny model that sleeps in each training forward: gives a test time to kill a run mid-epoch."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training:
            import time

            time.sleep(0.05)
        return super().forward(images)


def slow_tiny(num_classes: int) -> torch.nn.Module:
    return SlowSegmenter(num_classes)


def onnx_teacher(path: Path) -> torch.nn.Module:
    """A small random smp FPN, exported to ``path`` as users receive ONNX teachers (dynamic
    batch and size, input ``image``, output ``logits``); returns the model in eval mode."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = smp.create_model("FPN", encoder_name="tu-mobilenetv3_small_050", encoder_weights=None, classes=4).eval()
    torch.onnx.export(model, torch.randn(1, 3, 32, 32), str(path), input_names=["image"],
                      output_names=["logits"], opset_version=18, dynamo=False,
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}})
    return model


def stopped_after_its_first_checkpoint(run, monkeypatch) -> None:
    """Call ``run`` (a training or ``distill run``), stopped by Ctrl-C right after the first
    checkpoint it saves."""
    import pytest

    import distill.training as loop

    save = loop.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(loop, "save_checkpoint", save)
