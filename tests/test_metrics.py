"""mIoU from the confusion matrix, against hand-made cases and torchmetrics."""

import math

import pytest
import torch
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from distill.metrics import confusion_matrix, per_sample_confusion, scores_from_confusion


def test_hand_made_case():
    # 2x3 image, classes 0..2, one void pixel (255).
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    prediction = torch.tensor([[0, 1, 1], [1, 1, 0]])
    scores = scores_from_confusion(confusion_matrix(prediction, target, 3, 255))
    # class 0: tp 1, fp 0 (void pixel not counted), fn 1 -> 1/2
    # class 1: tp 2, fp 2 (one from 0, one from 2), fn 0 -> 2/4
    # class 2: tp 0, fn 1 -> 0
    assert scores.iou == pytest.approx([0.5, 0.5, 0.0])
    assert scores.miou == pytest.approx(1.0 / 3.0)
    assert scores.pixel_accuracy == pytest.approx(3 / 5)


def test_class_absent_from_labels_and_predictions_is_left_out():
    target = torch.tensor([0, 0, 1, 1])
    prediction = torch.tensor([0, 0, 1, 0])
    scores = scores_from_confusion(confusion_matrix(prediction, target, 4, 255))
    assert math.isnan(scores.iou[2]) and math.isnan(scores.iou[3])
    assert scores.miou == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_label_out_of_range_is_an_error_naming_the_value():
    with pytest.raises(ValueError, match=r"label values \[7\]"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 7, 255]), 3, 255)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchmetrics(seed):
    generator = torch.Generator().manual_seed(seed)
    num_classes, ignore = 6, 255
    target = torch.randint(0, num_classes - 1, (4, 17, 23), generator=generator)  # class 5 absent
    target[torch.rand(target.shape, generator=generator) < 0.2] = ignore
    prediction = torch.randint(0, num_classes - 1, (4, 17, 23), generator=generator)
    ours = confusion_matrix(prediction, target, num_classes, ignore)
    reference = MulticlassConfusionMatrix(num_classes, ignore_index=ignore)(prediction, target)
    assert torch.equal(ours, reference)
    scores = scores_from_confusion(ours)
    jaccard = MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore)(prediction, target)
    present = [i for i in range(num_classes) if not math.isnan(scores.iou[i])]
    assert present == [0, 1, 2, 3, 4]
    assert torch.allclose(torch.tensor([scores.iou[i] for i in present], dtype=torch.float64), jaccard[present].double())
    assert scores.miou == pytest.approx(float(jaccard[present].mean()), abs=1e-6)


def test_per_sample_confusion_sums_to_the_batch_matrix():
    generator = torch.Generator().manual_seed(3)
    target = torch.randint(0, 4, (5, 9, 9), generator=generator)
    target[:, :2] = 255
    prediction = torch.randint(0, 4, (5, 9, 9), generator=generator)
    per_sample = per_sample_confusion(prediction, target, 4, 255)
    assert per_sample.shape == (5, 16)
    assert torch.equal(per_sample.sum(0).reshape(4, 4), confusion_matrix(prediction, target, 4, 255))
    for i in range(5):
        assert torch.equal(per_sample[i].reshape(4, 4), confusion_matrix(prediction[i], target[i], 4, 255))


@pytest.mark.parametrize("sizes", [[(12, 16)] * 3, [(12, 16), (9, 20), (15, 11)]])
def test_label_resolution_scores_each_mask_at_its_own_size(tmp_path, sizes):
    """evaluate() against a direct reference: logits of the resized image, resized (bilinear)
    to each file's own mask size, argmax, torchmetrics' confusion matrix over all pixels."""
    import numpy as np
    from PIL import Image

    from distill.config import DataConfig
    from distill.data import build_dataset, build_loader
    from distill.evaluation import evaluate_model as evaluate
    from distill.models import forward_padded
    from distill.launch import make_accelerator
    from helpers import TinySegmenter, tiny_recipe

    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate(sizes):
        for folder, array in (("images", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
                              ("masks", rng.choice([0, 1, 2, 255], (h, w)).astype(np.uint8))):
            (tmp_path / folder / "val").mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(tmp_path / folder / "val" / f"s{k}.png")
    data = DataConfig(dataset="folder", root=tmp_path, class_names=["a", "b", "c"], resize=(6, 8),
                      num_workers=0, batch_size=2)
    torch.manual_seed(0)
    model = TinySegmenter(3, batch_norm=False).eval()
    accelerator = make_accelerator(tiny_recipe(tmp_path / "run"))
    loader = build_loader(data, "val", train=False, label_resolution=True)
    scores = evaluate(model, loader, accelerator, num_classes=3, ignore_index=255)

    frame = build_dataset(data, "val", train=False)
    reference = MulticlassConfusionMatrix(num_classes=3, ignore_index=255)
    for k, (h, w) in enumerate(sizes):
        with torch.no_grad():
            logits = forward_padded(model, frame[k]["image"][None])  # as every distill eval runs
        logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        mask = torch.from_numpy(np.array(Image.open(tmp_path / "masks" / "val" / f"s{k}.png"))).long()
        reference.update(logits.argmax(1), mask[None])
    assert torch.equal(scores.confusion, reference.compute())
    assert (scores.confusion.sum(0) > 0).sum() >= 2  # the model predicts more than one class
    # The frame-resolution score counts 6x8 pixels per image instead.
    coarse = evaluate(model, build_loader(data, "val", train=False), accelerator, num_classes=3, ignore_index=255)
    assert int(coarse.confusion.sum()) <= 48 * len(sizes) < int(scores.confusion.sum())


@pytest.mark.parametrize("batch_size", [1, 3])
def test_images_of_different_sizes_with_a_strided_model_are_scored_one_by_one(tmp_path, batch_size):
    """No data.resize: a batch pads images of different sizes; a model predicting at 1/2 must be
    cut to each image's own area before the logits are resized to its mask, and its scores must
    not depend on data.eval_batch_size (each image is padded as predict pads it alone)."""
    import numpy as np
    from PIL import Image

    from distill.config import DataConfig
    from distill.data import build_dataset, build_loader
    from distill.evaluation import evaluate_model
    from distill.export.student import PaddedSegmenter
    from distill.launch import make_accelerator
    from helpers import tiny_recipe

    class HalfResolution(torch.nn.Module):
        # Per-pixel scores pooled 2x2, plus the whole map's mean (image-level context, as
        # DeepLabV3+'s pooling branch has): a batch's zero padding would shift every pixel's scores.
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv2d(3, 3, 1)

        def forward(self, images):
            scores = torch.nn.functional.avg_pool2d(self.body(images), 2)
            return scores + 4 * scores.mean((2, 3), keepdim=True)

    rng = np.random.default_rng(1)
    sizes = [(40, 24), (24, 56), (32, 30)]
    for k, (h, w) in enumerate(sizes):
        for folder, array in (("images", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
                              ("masks", rng.choice([0, 1, 2], (h, w)).astype(np.uint8))):
            (tmp_path / folder / "val").mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(tmp_path / folder / "val" / f"s{k}.png")
    data = DataConfig(dataset="folder", root=tmp_path, class_names=["a", "b", "c"], num_workers=0,
                      batch_size=batch_size)
    torch.manual_seed(0)
    model = HalfResolution().eval()
    scores = evaluate_model(model, build_loader(data, "val", train=False, label_resolution=True),
                            make_accelerator(tiny_recipe(tmp_path / "run")), num_classes=3, ignore_index=255)
    reference = MulticlassConfusionMatrix(num_classes=3, ignore_index=255)
    dataset = build_dataset(data, "val", train=False)
    for k, (h, w) in enumerate(sizes):  # each image alone, as the exported graph runs it
        with torch.no_grad():
            logits = PaddedSegmenter(model)(dataset[k]["image"][None])
        logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        reference.update(logits.argmax(1), dataset[k]["mask"][None])
    assert torch.equal(scores.confusion, reference.compute())


def test_a_model_at_a_quarter_of_a_padded_input_is_scored_without_stretching(tmp_path):
    """A map at 1/4 of the padded 64x96 input that a 50x70 image needs: reference = the whole map
    upsampled 4x, then cut at the image (the map was cut to whole output pixels, then resized
    to 50x70: a 13x18 crop spans 52x72 pixels, so its rows moved by up to 2 pixels)."""
    import numpy as np
    from PIL import Image

    from distill.config import DataConfig
    from distill.data import build_dataset, build_loader
    from distill.evaluation import evaluate_model
    from distill.launch import make_accelerator
    from helpers import tiny_recipe

    class QuarterResolution(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv2d(3, 3, 1)

        def forward(self, images):
            return torch.nn.functional.avg_pool2d(self.body(images), 4)

    rng = np.random.default_rng(2)
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "masks" / "val").mkdir(parents=True)
    rows = np.linspace(0, 255, 50, dtype=np.uint8)[:, None, None]  # smooth: the argmax follows geometry
    image = np.concatenate([np.repeat(rows, 70, 1), np.repeat(255 - rows, 70, 1),
                            rng.integers(0, 40, (50, 70, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(image).save(tmp_path / "images" / "val" / "s.png")
    Image.fromarray(rng.choice([0, 1, 2], (50, 70)).astype(np.uint8)).save(tmp_path / "masks" / "val" / "s.png")
    data = DataConfig(dataset="folder", root=tmp_path, class_names=["a", "b", "c"], num_workers=0,
                      mean=(0, 0, 0), std=(1, 1, 1))
    model = QuarterResolution().eval()
    with torch.no_grad():  # class scores = the channels: class 0 below the middle row, 1 above
        model.body.weight.copy_(torch.eye(3)[..., None, None])
        model.body.bias.zero_()
    scores = evaluate_model(model, build_loader(data, "val", train=False, label_resolution=True),
                            make_accelerator(tiny_recipe(tmp_path / "run")), num_classes=3, ignore_index=255)
    item = build_dataset(data, "val", train=False)[0]
    padded = torch.nn.functional.pad(item["image"][None], (0, 26, 0, 14), mode="replicate")  # to 64x96
    with torch.no_grad():
        full = torch.nn.functional.interpolate(model(padded), scale_factor=4, mode="bilinear", align_corners=False)
    reference = MulticlassConfusionMatrix(num_classes=3, ignore_index=255)
    reference.update(full[..., :50, :70].argmax(1), item["mask"][None])
    assert torch.equal(scores.confusion, reference.compute())
    assert (scores.confusion.sum(0) > 0).sum() >= 2  # more than one class predicted


def test_a_coarse_model_is_scored_as_its_exported_graph_predicts():
    # A map at 1/4 of a frame that is a multiple of 4, not of 32: the frame's last map cells sit
    # beside padding. Scored as the graph `distill export` ships (PaddedSegmenter) predicts.
    from distill.evaluation import _predictions
    from distill.export.student import PaddedSegmenter

    class Quarter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 5, 1))

        def forward(self, images):
            return self.body(images)

    model = Quarter().eval()
    images = torch.randn(2, 3, 52, 68, generator=torch.Generator().manual_seed(1))
    batch = {"image": images, "mask": torch.zeros(2, 52, 68, dtype=torch.long)}
    with torch.no_grad():
        scored = _predictions(model, batch)
        shipped = PaddedSegmenter(model)(images).argmax(1)
    assert torch.equal(scored, shipped)


def test_a_prediction_past_the_last_class_is_refused_not_counted_elsewhere():
    from distill.metrics import confusion_matrix, per_sample_confusion
    from distill.models import ModelError

    target = torch.zeros(2, 3, 3, dtype=torch.long)
    prediction = torch.full((2, 3, 3), 4)  # a 5-output head on 4 classes: it went to label 1's row
    for count in (confusion_matrix, per_sample_confusion):
        with pytest.raises(ModelError, match=r"predicts class 4, outside the dataset's 4 classes \(0..3\)"):
            count(prediction, target, 4, 255)


def test_a_compiled_models_class_count_is_checked_through_its_module():
    from distill.models import ModelError, check_class_count

    model = torch.nn.Conv2d(3, 5, 1)
    compiled = torch.compile(model, backend="eager")  # not run: the probe uses the module inside
    with pytest.raises(ModelError, match="the model predicts 5 classes, the dataset has 4"):
        check_class_count(compiled, 4, "the model")
