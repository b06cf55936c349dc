"""INT8 export (distill.export.quantize): the file, its parity figures, the refusal, predict and compare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import tiny_recipe
from PIL import Image

import distill.export.quantize
from distill.cli import main as cli_main
from distill.comparison import CompareError, compare
from distill.config import RecipeError
from distill.data import build_dataset, build_loader, dataset_info
from distill.export import ExportError, export_onnx, export_student
from distill.metrics import per_sample_confusion, scores_from_confusion
from distill.pipeline import planned_stages
from distill.run_folder import compare_dir
from distill.export.predict import PredictError, predict
from distill.export.quantize import float_operators, quantize_onnx
from distill.training import train

INT8 = {"export.formats": "[onnx_int8]", "export.calibration_images": 8}


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    """A tiny teacher and distilled student (1 epoch each), exported with its INT8 student."""
    recipe = tiny_recipe(tmp_path_factory.mktemp("int8") / "run", teacher=True, **{"train.epochs": 1}, **INT8)
    for stage in ("teacher", "student"):
        train(recipe, stage)
    return recipe, export_student(recipe, parity_images=2)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_int8_file_has_the_fp32_interface_and_integer_weights(int8_export):
    _, out = int8_export
    assert {"student.onnx", "student_int8.onnx", "distill.json", "parity.json"} <= {p.name for p in out.iterdir()}
    fp32, int8 = _session(out / "student.onnx"), _session(out / "student_int8.onnx")
    for a, b in ((fp32.get_inputs(), int8.get_inputs()), (fp32.get_outputs(), int8.get_outputs())):
        assert [(x.name, x.shape) for x in a] == [(x.name, x.shape) for x in b]
    graph = onnx.load(str(out / "student_int8.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    conv_weights = {n.input[1] for n in graph.node if n.op_type == "Conv"}
    # Every Conv reads its weight through a DequantizeLinear of an int8 initializer.
    producers = {n.output[0]: n for n in graph.node}
    initializers = {t.name: t for t in graph.initializer}
    for name in conv_weights:
        node = producers[name]
        assert node.op_type == "DequantizeLinear"
        assert initializers[node.input[0]].data_type == onnx.TensorProto.INT8
    # Dynamic sizes: any batch and size, like the FP32 file.
    logits = int8.run(None, {"image": np.random.rand(2, 3, 40, 52).astype(np.float32)})[0]
    assert logits.shape == (2, 4, 40, 52)


def test_parity_json_int8_figures_match_an_independent_scoring(int8_export):
    recipe, out = int8_export
    report = json.loads((out / "parity.json").read_text())["int8"]
    info = dataset_info(recipe.data)
    loader = build_loader(recipe.data, recipe.data.val_split, train=False, label_resolution=True)
    sessions = {"fp32": _session(out / "student.onnx"), "int8": _session(out / "student_int8.onnx")}
    totals = {k: torch.zeros(info.num_classes ** 2, dtype=torch.long) for k in sessions}
    agree = pixels = 0
    for batch in loader:
        logits = {k: torch.from_numpy(s.run(None, {"image": batch["image"].numpy()})[0]) for k, s in sessions.items()}
        # The synthetic masks are at the frame's size: no resize needed before the argmax.
        assert logits["fp32"].shape[-2:] == batch["mask"].shape[-2:]
        for k in sessions:
            totals[k] += per_sample_confusion(logits[k].argmax(1), batch["mask"], info.num_classes,
                                              info.ignore_index).sum(0)
        agree += int((logits["fp32"].argmax(1) == logits["int8"].argmax(1)).sum())
        pixels += batch["mask"].numel()
    miou = {k: scores_from_confusion(t.reshape(info.num_classes, -1)).miou for k, t in totals.items()}
    assert report["fp32_miou"] == pytest.approx(miou["fp32"], abs=1e-9)
    assert report["int8_miou"] == pytest.approx(miou["int8"], abs=1e-9)
    assert report["argmax_agreement"] == pytest.approx(agree / pixels, abs=1e-9)
    assert report["calibration_images"] == 8 and report["calibration_method"] == "percentile"
    assert report["int8_bytes"] == (out / "student_int8.onnx").stat().st_size


def test_too_large_an_int8_drop_fails_and_keeps_the_previous_export(int8_export, monkeypatch, tmp_path):
    recipe, out = int8_export
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    lossy = {"fp32_miou": 0.50, "int8_miou": 0.47, "miou_drop": 0.03, "argmax_agreement": 0.9}
    monkeypatch.setattr(distill.export.quantize, "score_fp32_and_int8", lambda *a, **k: lossy)
    with pytest.raises(ExportError, match=r"47\.00 mIoU .* 50\.00: 3\.00 points lost, more than "
                                          r"export\.int8_max_miou_drop=1 .*nothing was written"):
        export_student(recipe, parity_images=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(out.parent.glob(".export-staging-*"))


def test_an_int8_graph_onnxruntime_cannot_run_is_a_clear_refusal(int8_export, monkeypatch):
    # As a TF-"same"-padded student's graph once did (quantized size arithmetic, now kept in
    # float: shape_arithmetic_nodes), a QLinearConcat of the decoder fails while scoring.
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    recipe, out = int8_export
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing(*args, **kwargs):
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : QLinearConcat node. Name:'/model/decoder/Concat'")

    monkeypatch.setattr(distill.export.quantize, "score_fp32_and_int8", failing)
    with pytest.raises(ExportError, match=r"onnxruntime cannot run the INT8 graph of this student .*"
                                          r"QLinearConcat.*export without onnx_int8"):
        export_student(recipe, parity_images=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_hard_swish_is_reported_as_left_in_float(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Hardswish(),
                                torch.nn.Conv2d(8, 4, 1)).eval()
    fp32 = tmp_path / "m.onnx"
    export_onnx(model, fp32, torch.randn(1, 3, 32, 32), 18)
    images = [np.random.default_rng(k).standard_normal((1, 3, 32, 32)).astype(np.float32) for k in range(4)]
    report = quantize_onnx(fp32, tmp_path / "m_int8.onnx", images)
    # Hard-swish is HardSigmoid x Mul in the graph: onnxruntime has an INT8 Mul, not a HardSigmoid.
    assert {"HardSwish", "HardSigmoid"} & set(report["float_ops"]), report["float_ops"]
    assert "Conv" not in report["float_ops"]
    assert report["float_ops"] == float_operators(tmp_path / "m_int8.onnx")
    assert report["calibration_images"] == 4


class _SqueezeExcite(torch.nn.Module):
    """A MobileNetV3 block's gate: the spatial mean (ReduceMean in ONNX), then a 1x1 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.gate = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return x * torch.sigmoid(self.gate(x.mean((2, 3), keepdim=True))) + x.mean(1, keepdim=True)


def test_spatial_means_become_pooling_with_an_integer_kernel(tmp_path):
    fp32 = tmp_path / "se.onnx"
    export_onnx(_SqueezeExcite().eval(), fp32, torch.randn(1, 3, 32, 32), 18)
    rewritten = tmp_path / "rewritten.onnx"
    rewritten.write_bytes(fp32.read_bytes())
    assert distill.export.quantize.pool_spatial_means(rewritten) == 1  # the channel mean is not spatial
    ops = [node.op_type for node in onnx.load(str(rewritten)).graph.node]
    assert ops.count("GlobalAveragePool") == 1 and ops.count("ReduceMean") == 1
    image = np.random.default_rng(0).standard_normal((1, 3, 40, 24)).astype(np.float32)
    np.testing.assert_allclose(_session(rewritten).run(None, {"image": image})[0],
                               _session(fp32).run(None, {"image": image})[0], rtol=1e-5, atol=1e-6)
    images = [np.random.default_rng(k).standard_normal((1, 3, 32, 32)).astype(np.float32) for k in range(4)]
    report = quantize_onnx(fp32, tmp_path / "se_int8.onnx", images)
    assert "GlobalAveragePool" not in report["float_ops"]  # QLinearGlobalAveragePool, in integers


def test_predict_int8_runs_the_int8_model(int8_export, tmp_path):
    recipe, out = int8_export
    dataset = build_dataset(recipe.data, "val", train=False)
    image, _ = dataset.load_raw(0)
    path = tmp_path / "frame.png"
    Image.fromarray(image).save(path)
    assert cli_main(["predict", str(out), str(path), "--int8", "--out", str(tmp_path / "m")]) == 0
    mask = np.array(Image.open(tmp_path / "m" / "frame_mask.png"))
    expected = _session(out / "student_int8.onnx").run(None, {"image": dataset[0]["image"][None].numpy()})[0]
    assert (mask == expected[0].argmax(0)).all()


def test_predict_int8_without_an_int8_export_names_the_format(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "distill.json").write_text(json.dumps({"num_classes": 4, "palette": [[0, 0, 0]] * 4,
                                                     "input": {}, "files": {"onnx": "student.onnx"}}))
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(PredictError, match=r"no INT8 ONNX model .*format=onnx_int8"):
        predict(export, [tmp_path / "a.png"], tmp_path / "out", int8=True)


def test_compare_sets_the_int8_student_beside_the_fp32_one(int8_export):
    recipe, out = int8_export
    report = compare(recipe, latency_runs=2, warmup_runs=1, num_examples=1)
    models = report["models"]
    assert {"teacher", "student", "student_onnx", "student_int8"} <= set(models)
    parity = json.loads((out / "parity.json").read_text())["int8"]
    assert models["student_int8"]["miou"] == pytest.approx(parity["int8_miou"], abs=1e-9)
    assert models["student_onnx"]["miou"] == pytest.approx(parity["fp32_miou"], abs=1e-9)
    assert models["student_int8"]["checkpoint_bytes"] == (out / "student_int8.onnx").stat().st_size
    assert models["student_int8"]["parameters"] == models["student"]["parameters"]
    ratio = report["ratios"]["student_int8/student_onnx"]["latency_ms"]
    assert ratio == pytest.approx(models["student_int8"]["latency_ms"] / models["student_onnx"]["latency_ms"])


def test_compare_leaves_out_an_export_of_other_weights(int8_export, capsys):
    recipe, out = int8_export
    config_path = out / "distill.json"
    original = config_path.read_text()
    config = json.loads(original)
    config["source"]["checkpoint_sha256"] = "0" * 64
    try:
        config_path.write_text(json.dumps(config))
        report = compare(recipe, latency_runs=1, warmup_runs=0, num_examples=1)
    finally:
        config_path.write_text(original)
    assert "student_int8" not in report["models"]
    assert "exported from other weights" in capsys.readouterr().err.replace("\n", " ")


def test_compare_leaves_out_an_export_for_another_fixed_size(int8_export, capsys):
    # A graph for one size (export.fixed_size) cannot take the comparison's images of another.
    recipe, out = int8_export
    config_path = out / "distill.json"
    original = config_path.read_text()
    config = json.loads(original)
    config["onnx"]["fixed_size"] = [16, 16]
    try:
        config_path.write_text(json.dumps(config))
        report = compare(recipe, latency_runs=1, warmup_runs=0, num_examples=1)
    finally:
        config_path.write_text(original)
    assert "student_int8" not in report["models"] and "student" in report["models"]
    assert "holds graphs for 16x16 images only" in capsys.readouterr().err.replace("\n", " ")


def test_compare_refuses_a_truncated_int8_student_by_name(int8_export):
    recipe, out = int8_export
    model = out / "student_int8.onnx"
    original = model.read_bytes()
    reports = {p: p.read_bytes() for p in compare_dir(recipe).glob("*") if p.is_file()}
    try:
        model.write_bytes(original[: len(original) // 2])  # a copy cut short
        with pytest.raises(CompareError, match=r"student_int8\.onnx' cannot be loaded .*export the student again"):
            compare(recipe, latency_runs=1, warmup_runs=0, num_examples=1)
    finally:
        model.write_bytes(original)
    assert {p: p.read_bytes() for p in compare_dir(recipe).glob("*") if p.is_file()} == reports


def test_int8_settings_are_validated_and_the_export_runs_before_compare(tmp_path):
    stages = planned_stages(tiny_recipe(tmp_path, teacher=True, **INT8))
    assert stages[-2:] == ["export", "compare"]
    assert planned_stages(tiny_recipe(tmp_path, teacher=True))[-2:] == ["compare", "export"]
    with pytest.raises(RecipeError, match="calibration_method"):
        tiny_recipe(tmp_path, **{"export.calibration_method": "kmeans"})
    with pytest.raises(RecipeError, match="calibration_images"):
        tiny_recipe(tmp_path, **{"export.calibration_images": 0})


def test_images_of_several_sizes_calibrate_at_one(tmp_path):
    # onnxruntime's histogram calibrators stack every image's activations: a numpy traceback.
    from distill.config import recipe_from_dict
    from distill.export.quantize import calibration_images
    from helpers import tiny

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, (h, w) in enumerate([(30, 40), (45, 65), (37, 53)]):
            for kind in ("images", "masks"):
                (tmp_path / kind / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "images" / split / f"{k}.png")
            Image.fromarray(rng.integers(0, 2, (h, w), dtype=np.uint8)).save(tmp_path / "masks" / split / f"{k}.png")
    recipe = recipe_from_dict({"model": {"factory": "helpers:tiny"}, "data": {
        "dataset": "folder", "root": str(tmp_path), "class_names": ["a", "b"], "num_workers": 0}})
    images = list(calibration_images(recipe, 3))
    assert [image.shape for image in images] == [(1, 3, 30, 40)] * 3
    export_onnx(tiny(2, width=6).eval(), tmp_path / "s.onnx", torch.from_numpy(images[0]), 18)
    quantize_onnx(tmp_path / "s.onnx", tmp_path / "s_int8.onnx", images, method="percentile")
    assert (tmp_path / "s_int8.onnx").is_file()
