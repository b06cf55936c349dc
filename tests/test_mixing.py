"""CutMix of training batches (data.cutmix): boxes, masks, the streamed teacher's view, refusals."""

import pytest
import torch

import distill.training as loop
from distill.data.mixing import cutmix
from distill.config import RecipeError
from distill.training import train
from helpers import TinySegmenter, tiny_recipe


def numbered_batch(count: int = 4, size: tuple[int, int] = (12, 16)) -> dict:
    """Image i is all i, its mask i, its kd_mask 10 + i: every pixel says where it came from."""
    rows = torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1)
    images = rows.expand(count, 3, *size).clone()
    masks = rows[:, 0].long().expand(count, *size).clone()
    return {"image": images, "mask": masks, "kd_mask": masks + 10, "index": torch.arange(count)}


def test_cutmix_pastes_one_box_of_another_image_with_its_masks():
    batch = numbered_batch()
    original = {k: v.clone() for k, v in batch.items()}
    mixed = cutmix(batch, 1.0, torch.Generator().manual_seed(3))
    pasted_rows = 0
    for row in range(4):
        changed = mixed["image"][row, 0] != row
        # Image, mask and kd_mask were cut by the same box, from the same partner.
        assert torch.equal(mixed["mask"][row], mixed["image"][row, 0].long())
        assert torch.equal(mixed["kd_mask"][row], mixed["mask"][row] + 10)
        assert torch.equal(mixed["image"][row, 0], mixed["image"][row, 2])
        if not changed.any():
            continue
        pasted_rows += 1
        ys, xs = changed.nonzero(as_tuple=True)
        box = changed[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert box.all() and changed.sum() == box.numel()  # one axis-aligned box
        partners = mixed["image"][row, 0][changed].unique()
        assert partners.numel() == 1 and int(partners) != row
    assert pasted_rows >= 3  # a box of zero area is possible, but not in most rows
    for key, value in original.items():  # the caller's batch is left as it was
        assert torch.equal(batch[key], value), key


def test_cutmix_mixes_each_image_with_its_probability_and_repeats_with_its_seed():
    batch = numbered_batch(count=2000, size=(8, 8))
    mixed = cutmix(batch, 0.3, torch.Generator().manual_seed(0))
    share = (mixed["image"][:, 0] != batch["image"][:, 0]).flatten(1).any(1).float().mean()
    assert 0.25 < float(share) < 0.32  # a few chosen boxes are empty at 8x8
    again = cutmix(batch, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(mixed["image"], again["image"])
    assert cutmix(batch, 0.0, torch.Generator()) is batch
    single = numbered_batch(count=1)
    assert cutmix(single, 1.0, torch.Generator()) is single


def test_cutmix_refuses_masks_of_another_size():
    batch = numbered_batch()
    batch["mask"] = batch["mask"][:, :6]
    with pytest.raises(ValueError, match=r"batch\['mask'\] is \(6, 16\), its images \(12, 16\)"):
        cutmix(batch, 1.0, torch.Generator())


def test_a_cached_teacher_cannot_be_mixed():
    with pytest.raises(RecipeError, match="data.cutmix 0.5 needs teacher.mode 'stream'"):
        tiny_recipe("runs/unused", teacher=True, **{"data.cutmix": 0.5, "teacher.mode": "cache",
                                                   "data.resize": "[32, 32]"})


class RecordingTeacher(TinySegmenter):
    """A teacher that keeps every batch of images it is shown."""

    def __init__(self) -> None:
        super().__init__(4)
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.detach().clone())
        return super().forward(images)


def test_the_streamed_teacher_and_the_student_see_the_same_mixed_batch(tmp_path, monkeypatch):
    made: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording_cutmix(batch, probability, generator):
        mixed = cutmix(batch, probability, generator)
        made.append((batch["image"].clone(), mixed["image"].clone()))
        return mixed

    monkeypatch.setattr(loop, "cutmix", recording_cutmix)
    teacher = RecordingTeacher().eval()
    recipe = tiny_recipe(tmp_path, teacher=True, **{"data.cutmix": 1.0, "train.epochs": 1})
    train(recipe, "student", teacher=teacher)
    assert len(made) == len(teacher.seen) == 6  # 24 images, batches of 4
    for (before, after), seen in zip(made, teacher.seen):
        assert torch.equal(seen, after)
    assert any(not torch.equal(before, after) for before, after in made)
