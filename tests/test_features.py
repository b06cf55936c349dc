"""Feature distillation: the hooks, the adapters, the two terms and what a run saves."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from distill.config import RecipeError, recipe_from_dict
from distill.losses.features import FeatureDistillation, FeatureError, FeatureTap, hint_loss
from distill.launch import TrainingError
from distill.models import build_model, forward_padded
from distill.training import train
from helpers import TinySegmenter, tiny_recipe

# Small smp models: a ResNet-18 U-Net of three stages as teacher, a MobileNetV3 one as student.
TEACHER = {"source": "smp", "arch": "Unet", "encoder": "resnet18",
           "arch_kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}}
STUDENT = {"arch": "Unet", "encoder": "tu-mobilenetv3_small_050",
           "arch_kwargs": {"encoder_depth": 3, "decoder_channels": [8, 8, 4]}}


def smp_recipe(tmp_path, **overrides):
    tree = tiny_recipe(tmp_path, teacher=True).model_dump(mode="json", exclude_defaults=True)
    tree.update(teacher=copy.deepcopy(TEACHER), student=copy.deepcopy(STUDENT))
    tree["train"]["epochs"] = 1
    return recipe_from_dict(tree, [f"{k}={v}" for k, v in overrides.items()])


def models(seed: int = 0):
    recipe = smp_recipe("unused")
    torch.manual_seed(seed)
    return build_model(recipe.student_model, 4), build_model(recipe.teacher, 4).eval()


def test_hint_loss_matches_a_float64_reference_and_ignores_the_teachers_scale():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5) * 7 + 2

    def standardized(x):
        x = x.double().numpy()
        mean, var = x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5)

    reference = ((standardized(s) - standardized(t)) ** 2).mean()
    assert float(hint_loss(s, t)) == pytest.approx(reference, rel=1e-5)
    assert float(hint_loss(s, 100 * t - 3)) == pytest.approx(reference, rel=1e-4)
    assert float(hint_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_the_tap_reads_the_forward_it_rode_on_cropped_to_the_unpadded_image():
    student, _ = models()
    student.eval()
    tap = FeatureTap(student, [-1, 0, "decoder"], "student")
    images = torch.randn(2, 3, 40, 50)  # forward_padded runs the model on 64 x 64
    with torch.no_grad():
        forward_padded(student, images)
        deepest, first, decoder = tap.take(40, 50)
        padded = F.pad(images, (0, 14, 0, 24), mode="replicate")
        expected = student.encoder(padded)
        expected_decoder = student.decoder(expected)
    h, w = expected[-1].shape[-2:]  # 8 x 8 at stride 8
    assert torch.equal(deepest, expected[-1][..., : math.ceil(40 * h / 64), : math.ceil(50 * w / 64)])
    assert deepest.shape[-2:] == (5, 7)
    assert torch.equal(first, expected[1][..., :20, :25])
    assert torch.equal(decoder, expected_decoder[..., :40, :50])
    with pytest.raises(RuntimeError, match="before the model's forward"):
        tap.take(40, 50)  # the maps are freed once taken
    tap.remove()
    forward_padded(student, images)
    with pytest.raises(RuntimeError, match="before the model's forward"):
        tap.take(40, 50)


def test_feature_cwd_through_the_adapter_equals_a_float64_reference_without_void_positions():
    student, teacher = models()
    student.train()
    term = FeatureDistillation(student, teacher, [(-1, -1)], kind="cwd", tau=2.0)
    images = torch.randn(2, 3, 32, 32)
    mask = torch.randint(0, 4, (2, 32, 32))
    mask[0, :16] = 255  # the top half of the first image is void: its 2 top rows of 4 at stride 8
    with torch.no_grad():
        teacher(images)
    student(images)
    loss = term((32, 32), (32, 32), mask)

    with torch.no_grad():
        s = term.adapters[0](student.encoder(images)[-1])  # train mode: the same batch statistics
        t = teacher.encoder(images)[-1]
    assert s.shape == t.shape == (2, 128, 4, 4)
    s, t = s.double().flatten(2) / 2.0, t.double().flatten(2) / 2.0
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[0, :8] = False
    total = 0.0
    for n in range(2):
        ps, pt = s[n][:, keep[n]].log_softmax(-1), t[n][:, keep[n]].log_softmax(-1)
        total += float((pt.exp() * (pt - ps)).sum())
    assert float(loss.detach()) == pytest.approx(4.0 * total / (2 * 128), rel=1e-4)
    loss.backward()  # the adapter learns; the teacher stays frozen and without gradients
    assert term.adapters[0][0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def _scene(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.sin(y / 37.0) * torch.cos(x / 29.0) + 0.3 * torch.sin(x / 11.0)


class _SceneEncoder(torch.nn.Module):
    """One stage at ``stride`` whose feature is a smooth scene sampled at each cell's centre."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride, self.out_channels = stride, (3, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        n, _, height, width = x.shape
        ys = (torch.arange(height // self.stride) + 0.5) * self.stride
        xs = (torch.arange(width // self.stride) + 0.5) * self.stride
        return [x, _scene(ys.view(-1, 1), xs.view(1, -1)).expand(n, 1, -1, -1).clone()]


class _SceneModel(torch.nn.Module):
    def __init__(self, stride: int) -> None:
        super().__init__()
        self.encoder, self.decoder = _SceneEncoder(stride), torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.decoder(x)
        return self.encoder(x)[1]


@pytest.mark.parametrize("size", [256, 200, 232])
def test_layers_of_other_strides_are_compared_at_the_same_place_of_an_image_of_any_size(size):
    # A stride-32 student and a stride-16 teacher see one scene; images of 200 and 232 pixels are
    # padded to 224 and 256, and the two cut maps reach into the padding by different amounts.
    student, teacher = _SceneModel(32), _SceneModel(16)
    term = FeatureDistillation(student, teacher, [(0, 0)], kind="hint", probe_size=(64, 64))
    with torch.no_grad():
        term.adapters[0][0].weight.fill_(1.0)
    images = torch.zeros(2, 3, size, size)
    forward_padded(student, images)
    forward_padded(teacher, images)
    got = float(term((size, size), (size, size), None).detach())
    # Reference: the student's whole padded map resized onto the teacher's whole padded grid, then
    # the teacher cells that cover the image.
    padded = math.ceil(size / 32) * 32
    s_full = _SceneEncoder(32)(torch.zeros(2, 3, padded, padded))[1]
    t_full = _SceneEncoder(16)(torch.zeros(2, 3, padded, padded))[1]
    keep = math.ceil(size / 16)
    s_on_t = F.interpolate(s_full, size=t_full.shape[-2:], mode="bilinear", align_corners=False)[..., :keep, :keep]
    s_on_t = F.batch_norm(s_on_t, None, None, training=True)  # the adapter's batch norm, training mode
    assert got == pytest.approx(float(hint_loss(s_on_t, t_full[..., :keep, :keep])), rel=1e-5)


class _RampEncoder(torch.nn.Module):
    """A stride-32 stage whose feature is ``(x / 50)^2`` at each cell's centre, ``x`` in the
    original image's pixels (``shrink``: the model sees the image widened by 1 / shrink)."""

    def __init__(self, shrink: float = 1.0) -> None:
        super().__init__()
        self.shrink, self.out_channels = shrink, (3, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        n, _, height, width = x.shape
        xs = (torch.arange(width // 32) + 0.5) * 32 * self.shrink
        return [x, ((xs / 50) ** 2).view(1, 1, 1, -1).expand(n, 1, height // 32, -1).clone()]


def test_a_teacher_at_its_input_size_is_compared_where_its_cells_lie_in_the_image():
    # A 64x70 crop: the student pads it to 64x96, the teacher (teacher.input_size [64, 96]) sees
    # it stretched to 96. Both maps are 2x3 cells, on other grids of the image.
    student, teacher = _SceneModel(32), _SceneModel(32)
    student.encoder, teacher.encoder = _RampEncoder(), _RampEncoder(shrink=70 / 96)
    term = FeatureDistillation(student, teacher, [(0, 0)], kind="hint", probe_size=(64, 64))
    with torch.no_grad():
        term.adapters[0][0].weight.fill_(1.0)
    forward_padded(student, torch.zeros(2, 3, 64, 70))
    forward_padded(teacher, torch.zeros(2, 3, 64, 96))
    got = float(term((64, 70), (64, 96), None).detach())
    # Reference: the student's cells (centres 16, 48, 80 px) interpolated linearly at the teacher's
    # centres in image pixels, held at the end values beyond them.
    student_centres = np.array([16.0, 48.0, 80.0])
    teacher_centres = (np.arange(3) + 0.5) * 32 * 70 / 96
    at_teacher = np.interp(teacher_centres, student_centres, (student_centres / 50) ** 2)
    s_on_t = torch.tensor(at_teacher, dtype=torch.float32).view(1, 1, 1, 3).expand(2, 1, 2, 3)
    s_on_t = F.batch_norm(s_on_t, None, None, training=True)  # the adapter's batch norm, training mode
    t = torch.tensor((teacher_centres / 50) ** 2, dtype=torch.float32).view(1, 1, 1, 3).expand(2, 1, 2, 3)
    assert got == pytest.approx(float(hint_loss(s_on_t, t)), rel=1e-4)  # float32 batch norm


def test_a_feature_cell_is_void_only_when_every_pixel_under_it_is():
    from distill.losses.features import _any_in_cells

    valid = torch.zeros(1, 20, 20, dtype=torch.bool)
    valid[0, 9, 17] = True  # one valid pixel; 8-pixel cells over a 20-pixel image (padded to 24)
    cells = _any_in_cells(valid, (3, 3), (8.0, 8.0), (20, 20))
    assert cells.tolist() == [[[False, False, False], [False, False, True], [False, False, False]]]


def test_unknown_layers_and_models_without_layers_are_named():
    student, _ = models()
    with pytest.raises(FeatureError, match=r"the student has no layer 3: it has encoder stages 0\.\.2 "
                                           r"\(or -1 for the deepest\) and 'decoder'"):
        FeatureTap(student, [3], "student")
    with pytest.raises(FeatureError, match="the teacher, a TinySegmenter, has none"):
        FeatureTap(TinySegmenter(4), [-1], "teacher")


def test_a_placeholder_stage_without_channels_is_named_at_set_up():
    # MiT encoders (SegFormer) list a stage of 0 channels; pairing it failed at the first step.
    import segmentation_models_pytorch as smp

    student = smp.Segformer(encoder_name="mit_b0", encoder_weights=None, classes=4)
    _, teacher = models()
    with pytest.raises(FeatureError, match=r"the student's layer 0 has no channels \(a placeholder stage "
                                           r"of its encoder\): pair one of its stages 1, 2, 3, 4 or 'decoder'"):
        FeatureDistillation(student, teacher, [(0, 0)], kind="hint")


def test_a_feature_run_logs_the_term_and_saves_the_student_alone(tmp_path):
    recipe = smp_recipe(tmp_path, **{"loss.feature": "{kind: hint, weight: 0.5, pairs: [[-1, -1], [decoder, decoder]]}",
                                     "train.checkpoint_every_epochs": 1})
    train(recipe, "teacher")
    result = train(recipe, "student")
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and all(r["feature"] > 0 for r in steps)
    assert all(r["loss"] == pytest.approx(r["ce"] + r["kd"] + 0.5 * r["feature"], rel=1e-5) for r in steps)
    student_keys = set(build_model(recipe.student_model, 4).state_dict())
    for name in ("best.safetensors", "last.safetensors"):
        assert set(load_file(str(result.run_dir / name))) == student_keys
    # The checkpoint a resume reads holds the adapters too: a second model beside the student.
    saved = [load_file(str(p)) for p in sorted((result.run_dir / "checkpoints" / "latest").glob("model*.safetensors"))]
    assert [set(s) == student_keys for s in saved] == [True, False]
    assert {k.split(".")[0] for k in saved[1]} == {"adapters"} and "adapters.1.0.weight" in saved[1]


def test_a_resumed_feature_run_ends_where_the_straight_one_does(tmp_path, monkeypatch):
    overrides = {"loss.feature.kind": "hint", "train.epochs": 2}
    teacher_dir = tmp_path / "a"
    train(smp_recipe(teacher_dir, **overrides), "teacher")
    weights = teacher_dir / "teacher" / "last.safetensors"
    straight = train(smp_recipe(teacher_dir, **overrides), "student")

    import distill.training as loop

    save = loop.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    recipe = smp_recipe(tmp_path / "b", **overrides, **{"teacher.checkpoint": str(weights)})
    with pytest.raises(KeyboardInterrupt):
        train(recipe, "student")
    monkeypatch.setattr(loop, "save_checkpoint", save)
    checkpoint = tmp_path / "b" / "student" / "checkpoints" / "latest"
    resumed = train(smp_recipe(tmp_path / "b", **overrides, **{"teacher.checkpoint": str(weights),
                                                                  "train.resume": str(checkpoint)}), "student")
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name  # adapters restored: the same last steps


def test_features_need_a_streamed_smp_teacher_and_layers_the_models_have(tmp_path):
    with pytest.raises(RecipeError, match="loss.feature.kind 'hint' needs teacher.mode 'stream'"):
        smp_recipe(tmp_path, **{"loss.feature.kind": "hint", "teacher.mode": "cache", "data.resize": "[32, 32]",
                                "cache.splits": "[train]"})
    with pytest.raises(RecipeError, match="a teacher from source 'onnx' is distilled through its logits only"):
        smp_recipe(tmp_path, **{"loss.feature.kind": "cwd", "teacher": "{source: onnx, path: t.onnx}"})
    with pytest.raises(RecipeError, match="loss.feature.pairs"):
        smp_recipe(tmp_path, **{"loss.feature": "{kind: hint, pairs: [[-1, top]]}"})
    recipe = smp_recipe(tmp_path, **{"loss.feature": "{kind: hint, pairs: [[5, -1]]}"})
    train(recipe, "teacher")
    with pytest.raises(TrainingError, match="loss.feature.pairs: the student has no layer 5"):
        train(recipe, "student")
    assert not (tmp_path / "student").exists()  # refused before the run wrote anything
