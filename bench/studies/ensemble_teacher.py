"""An ensemble of trained segmentation models as one teacher, through ``teacher.source: factory``.

Distilling an ensemble of independently trained models into one is the classic case where a
student trained on the same images as its teachers beats the same student trained on the masks
alone (Hinton et al. 2015; Allen-Zhu and Li 2020: each member learns some of the views of the
data, their average all). bench/studies/camvid_kd.py measures it on the held-out CamVid sequence.

The ensemble's logits are the log of its members' mean probability (at T=1), so its argmax is the
averaged prediction that scores the ensemble, and its softmax at the loss's T is that mean
sharpened or softened like any teacher's logits.

Build the ensemble's single weights file from the members' checkpoints (same order as
``members`` below), then point a recipe at it::

    python bench/studies/ensemble_teacher.py --out runs/ens/ensemble.safetensors \\
        runs/xseq/teacher/last.safetensors runs/ens/t2/teacher/last.safetensors
    PYTHONPATH=bench/studies distill eval recipe.yaml --stage teacher teacher.source=factory \\
        teacher.factory=ensemble_teacher:ensemble \\
        "teacher.factory_kwargs={members: [{arch: DeepLabV3Plus, encoder: resnet50}, {arch: FPN, encoder: resnet50}]}" \\
        teacher.checkpoint=runs/ens/ensemble.safetensors
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class Ensemble(nn.Module):
    """Models of images -> logits, averaged in probability: ``log(mean_i softmax(z_i))``."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Summed one member at a time: the members' logits are never all held at once.
        total = None
        for member in self.members:
            log_probs = F.log_softmax(member(images).float(), dim=1)
            total = log_probs if total is None else torch.logaddexp(total, log_probs)
        return total - math.log(len(self.members))


def ensemble(num_classes: int, members: list[dict[str, Any]]) -> Ensemble:
    """The factory: ``members`` lists each model's ``arch`` and ``encoder`` (and any other key of a
    recipe's model section), in the order of the weights file's ``members.<i>.`` prefixes."""
    from pydantic import ValidationError

    from distill.config import ModelConfig
    from distill.models import build_model

    models = []
    for index, member in enumerate(members):
        if not {"arch", "encoder"} <= set(member):  # ModelConfig would default them silently
            raise ValueError(f"ensemble member {index}: give arch and encoder, not {sorted(member)}")
        try:
            spec = ModelConfig(**member)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise ValueError(f"ensemble member {index}: {problems}") from None
        models.append(build_model(spec, num_classes))
    return Ensemble(models)


def combine(checkpoints: list[Path], out: Path) -> None:
    """Write the members' weights as one file, member ``i``'s keys under ``members.<i>.``
    (atomically: a kill leaves no half-written file under ``out``)."""
    from safetensors.torch import save

    from distill._io import atomic_write_bytes
    from distill.models import read_state_dict

    state = {f"members.{i}.{key}": value.contiguous()
             for i, path in enumerate(checkpoints) for key, value in read_state_dict(path).items()}
    atomic_write_bytes(out, save(state))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the ensemble's weights file (.safetensors)")
    parser.add_argument("checkpoints", nargs="+", type=Path, help="the members' weights, in order")
    args = parser.parse_args()
    combine(args.checkpoints, args.out)
    print(f"wrote {args.out} ({len(args.checkpoints)} members)")


if __name__ == "__main__":
    main()
