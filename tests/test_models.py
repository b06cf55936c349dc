"""build_model: names, factories, checkpoints, and clear errors."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from distill.config import ModelConfig
from distill.models import ModelError, build_model, load_weights, read_state_dict


def tiny_factory(num_classes: int, width: int = 4) -> torch.nn.Module:
    """A factory for the `factory:` escape hatch (used by the tests)."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, width, 1), torch.nn.ReLU(), torch.nn.Conv2d(width, num_classes, 1))


def test_smp_and_timm_encoders_build_with_the_class_count():
    for encoder in ("resnet18", "tu-mobilenetv3_small_100"):
        model = build_model(ModelConfig(arch="FPN", encoder=encoder), num_classes=5).eval()
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5, 64, 64)


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ModelError, match="unknown architecture 'DeepLabV3plus'.*DeepLabV3Plus"):
        build_model(ModelConfig(arch="DeepLabV3plus"), 3)
    with pytest.raises(ModelError, match="unknown encoder 'resnet19'.*resnet18"):
        build_model(ModelConfig(encoder="resnet19"), 3)
    with pytest.raises(ModelError, match="unknown timm encoder 'tu-mobilenetv3_large_10'.*tu-mobilenetv3_large_100"):
        build_model(ModelConfig(encoder="tu-mobilenetv3_large_10"), 3)


def test_pretrained_weights_without_network_fail_fast(monkeypatch):
    monkeypatch.setattr("distill.models.hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-cache")  # nothing cached either
    import time

    start = time.perf_counter()
    with pytest.raises(ModelError, match="pretrained weights 'imagenet' for encoder 'resnet18'.*no network"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights="imagenet"), 3)
    assert time.perf_counter() - start < 20  # the hub's own retries take 25-45 s


def test_factory_escape_hatch(monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    spec = ModelConfig(factory="test_models:tiny_factory", factory_kwargs={"width": 3})
    model = build_model(spec, 4)
    assert model[0].out_channels == 3 and model[2].out_channels == 4
    with pytest.raises(ModelError, match="has no function 'nope'"):
        build_model(ModelConfig(factory="test_models:nope"), 4)
    with pytest.raises(ModelError, match="cannot import 'no_such_module'"):
        build_model(ModelConfig(factory="no_such_module:f"), 4)


def test_checkpoint_round_trip_and_wrapper_prefix(tmp_path):
    model = tiny_factory(4)
    path = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v for k, v in model.state_dict().items()}, str(path))
    other = tiny_factory(4)
    load_weights(other, path)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    pt = tmp_path / "w.pt"
    torch.save(model.state_dict(), pt)
    assert read_state_dict(pt).keys() == model.state_dict().keys()


def test_checkpoint_of_another_model_lists_the_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tiny_factory(4).state_dict(), str(path))
    with pytest.raises(ModelError, match=r"different shapes \(2\): .*2.weight: checkpoint \(4, 4, 1, 1\) vs model \(6, 4, 1, 1\)"):
        load_weights(tiny_factory(6), path)
    with pytest.raises(ModelError, match=r"(?s)missing keys \(151\): decoder.*unexpected keys \(4\): 0.bias"):
        load_weights(build_model(ModelConfig(arch="FPN", encoder="resnet18"), 4), path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_carrying_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump({"weight": _Exploit()}, handle)
    with pytest.raises(ModelError, match=r"evil.pt' could not be loaded safely \(weights_only=True\): it "
                                         r"holds Python objects besides its weights, and loading it could run code") as caught:
        read_state_dict(path)
    assert "\x1b" not in str(caught.value)  # none of torch's terminal colours


def test_torchvision_reference_checkpoint_with_its_arguments_is_read(tmp_path):
    # torchvision's references/segmentation/train.py saves {"model", "optimizer", "epoch", "args"},
    # "args" an argparse.Namespace: plain data, read without allowing code.
    import argparse

    weights = {"classifier.weight": torch.randn(3, 4)}
    torch.save({"model": weights, "epoch": 29, "args": argparse.Namespace(lr=0.02, model="fcn_resnet50")},
               tmp_path / "model_29.pth")
    assert torch.equal(read_state_dict(tmp_path / "model_29.pth")["classifier.weight"], weights["classifier.weight"])
    torch.save({"model": weights, "args": _Exploit}, tmp_path / "other.pth")  # any other object: named
    with pytest.raises(ModelError, match=r"other.pth' could not be loaded safely .* it holds a Python object "
                                         r"\(test_models._Exploit\) besides its weights"):
        read_state_dict(tmp_path / "other.pth")


def test_checkpoints_that_are_not_weights_are_named(tmp_path):
    from distill.config import ModelConfig
    from distill.models import ModelError, read_state_dict

    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    onnx_file = tmp_path / "student.onnx"
    onnx_file.write_bytes(b"\x08\x07")
    for path, message in [(text, r"notes.pt' could not be loaded safely .*not a torch checkpoint"),
                          (onnx_file, "is an ONNX model"), (tmp_path, "is a folder; give its weights file")]:
        with pytest.raises(ModelError, match=message):
            read_state_dict(path)
    with pytest.raises(ModelError, match=r"factory 'os:getcwd' cannot be called as getcwd\(num_classes=3"):
        build_model(ModelConfig(factory="os:getcwd"), 3)


def test_padding_asks_the_encoder_for_its_output_stride():
    from distill.models import forward_padded, pad_multiple

    unet = build_model(ModelConfig(arch="Unet", encoder="resnet18"), num_classes=3).eval()
    deeper = torch.nn.Module()
    deeper.encoder = torch.nn.Module()
    deeper.encoder.output_stride = 64  # an encoder that downsamples further asks for more
    assert (pad_multiple(unet), pad_multiple(deeper), pad_multiple(torch.nn.Conv2d(3, 3, 1))) == (32, 64, 32)
    images = torch.randn(1, 3, 40, 72)
    with torch.no_grad():
        padded = torch.nn.functional.pad(images, (0, 96 - 72, 0, 64 - 40), mode="replicate")
        assert torch.equal(forward_padded(unet, images), unet(padded)[..., :40, :72])


def test_a_quarter_resolution_map_is_cut_exactly_where_the_input_ends():
    from distill.models import forward_padded

    quarter = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.AvgPool2d(4)).eval()
    images = torch.randn(2, 3, 50, 72)  # padded to 64x96: 50 rows end inside the 13th output row
    with torch.no_grad():
        whole = quarter(torch.nn.functional.pad(images, (0, 24, 0, 14), mode="replicate"))
        reference = torch.nn.functional.interpolate(whole, size=(64, 96), mode="bilinear",
                                                    align_corners=False)[..., :50, :72]
        torch.testing.assert_close(forward_padded(quarter, images), reference)
        # Whole output pixels (52 rows: 13 of them) stay at 1/4.
        aligned = torch.randn(1, 3, 52, 72)
        expected = quarter(torch.nn.functional.pad(aligned, (0, 24, 0, 12), mode="replicate"))[..., :13, :18]
        assert torch.equal(forward_padded(quarter, aligned), expected)
