"""distill.export and distill.export.predict: the student alone, reloadable, checked for parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import CAMVID, REPO_ROOT, tiny, tiny_recipe
from PIL import Image
from safetensors.torch import save_file

from distill._io import file_digest
from distill.config import ModelConfig, recipe_from_dict
from distill.data import build_dataset, build_loader, dataset_info
from distill.export import ExportError, export_onnx, export_student, load_exported
from distill.evaluation import evaluate_model as evaluate
from distill.export.quantize import quantize_onnx
from distill.metrics import per_sample_confusion, scores_from_confusion
from distill.models import ModelError, build_model, forward_padded
from distill.launch import make_accelerator
from distill.training import train

PREDICT_PY = REPO_ROOT / "distill" / "export" / "predict.py"
EXPORT_FILES = {"distill.json", "parity.json", "student.onnx", "student.safetensors"}  # a factory student


def _save_untrained_student(recipe) -> Path:
    """A student checkpoint without training: export does not care how good the weights are."""
    info = dataset_info(recipe.data)
    path = Path(recipe.output_dir) / "student" / "best.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_model(recipe.student_model, info.num_classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def tiny_export(tmp_path):
    """A factory (`helpers:tiny`) student on the synthetic data, exported."""
    recipe = tiny_recipe(tmp_path / "run", teacher=True)
    _save_untrained_student(recipe)
    return recipe, export_student(recipe, parity_images=2)


@pytest.fixture(scope="module")
def camvid_export(tmp_path_factory):
    """An smp student (DeepLabV3+ / MobileNetV3-Small) trained 2 steps on CamVid, exported."""
    if not (CAMVID / "val").is_dir():
        pytest.skip(f"CamVid data not found at {CAMVID}")
    out = tmp_path_factory.mktemp("camvid") / "run"
    recipe = recipe_from_dict({
        "output_dir": str(out),
        "data": {"dataset": "camvid", "root": str(CAMVID), "resize": [120, 160], "crop_size": [96, 128],
                 "batch_size": 2, "eval_batch_size": 4, "num_workers": 0, "max_samples": 8},
        "model": {"arch": "DeepLabV3Plus", "encoder": "tu-mobilenetv3_small_100"},
        "train": {"epochs": 1, "max_steps": 2, "log_every_steps": 1},
    })
    train(recipe, "student")
    return recipe, export_student(recipe, parity_images=3)


# --------------------------------------------------------------------------------------------
# Files, config and parity


def test_factory_student_exports_onnx_safetensors_config_and_parity(tiny_export):
    recipe, out = tiny_export
    assert out == Path(recipe.output_dir) / "export"
    assert {p.name for p in out.iterdir()} == EXPORT_FILES  # no staging folder, no .onnx.data
    config = json.loads((out / "distill.json").read_text())
    assert config["kind"] == "factory" and config["smp_reload"] is False
    assert "smp alone cannot rebuild it" in config["smp_reload_note"]
    assert config["num_classes"] == 4 and len(config["class_names"]) == 4 and len(config["palette"]) == 4
    assert config["ignore_index"] == 255
    assert config["input"]["mean"] == list(recipe.data.mean) and config["input"]["std"] == list(recipe.data.std)
    assert config["input"]["train_crop_size"] == [32, 32]
    assert config["onnx"]["opset"] == recipe.export.opset
    checkpoint = Path(recipe.output_dir) / "student" / "best.safetensors"
    assert config["source"]["checkpoint_sha256"] == file_digest(checkpoint)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and set(parity["results"]) == {"onnx", "safetensors"}
    assert parity["results"]["onnx"]["max_abs_diff"] <= recipe.export.atol

    model = onnx.load(str(out / "student.onnx"))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 4, "height", "width"]
    # The export holds the student alone: exactly its keys, no teacher, no wrapper prefixes.
    reloaded = load_exported(out)
    assert set(reloaded.state_dict()) == set(tiny(4, width=6).state_dict())


def test_only_the_requested_formats_and_stale_files_are_removed(tiny_export):
    recipe, out = tiny_export
    export_student(recipe, "onnx", parity_images=1)
    assert {p.name for p in out.iterdir()} == {"distill.json", "parity.json", "student.onnx"}
    assert json.loads((out / "distill.json").read_text())["files"] == {"onnx": "student.onnx"}
    with pytest.raises(ExportError, match=r"holds no torch weights \(formats \['onnx'\]\): export with format=safetensors"):
        load_exported(out)
    export_student(recipe, ["safetensors"], parity_images=1)
    assert {p.name for p in out.iterdir()} == {"distill.json", "parity.json", "student.safetensors"}
    assert set(json.loads((out / "parity.json").read_text())["results"]) == {"safetensors"}
    with pytest.raises(ExportError, match=r"\['tflite'\] not supported"):
        export_student(recipe, "onnx,tflite")


def test_parity_beyond_tolerance_fails_loudly_and_keeps_the_previous_export(tiny_export):
    recipe, out = tiny_export
    before = {name: file_digest(out / name) for name in EXPORT_FILES}
    strict = recipe.model_copy(deep=True)
    strict.export.atol = 1e-12  # onnxruntime differs from eager by ~1e-7: must fail
    with pytest.raises(ExportError, match=r"onnx \d.*e-\d+ exceeds export.atol=1e-12"):
        export_student(strict, parity_images=1)
    assert {name: file_digest(out / name) for name in EXPORT_FILES} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_a_student_of_non_finite_logits_is_refused_not_passed(tmp_path):
    # NaN compares false to anything: the parity's largest difference read 0 and "passed".
    from safetensors.torch import load_file

    recipe = tiny_recipe(tmp_path / "run", teacher=True)
    path = _save_untrained_student(recipe)
    weights = load_file(str(path))
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.ndim == 4)
    weights[name].view(-1)[0] = float("inf")
    save_file(weights, str(path))
    with pytest.raises(ExportError, match=r"the eager student's logits are not finite \(NaN or inf\)"):
        export_student(recipe, parity_images=1)
    assert not (tmp_path / "run" / "export").exists()


def test_onnx_accepts_any_height_width_and_batch(tiny_export):
    recipe, out = tiny_export
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    eager = load_exported(out)
    for shape in [(1, 3, 33, 70), (3, 3, 64, 96), (2, 3, 17, 5)]:
        image = torch.randn(*shape)
        got = session.run(None, {"image": image.numpy()})[0]
        with torch.no_grad():
            expected = forward_padded(eager, image).numpy()
        assert got.shape == expected.shape == (shape[0], 4, *shape[2:])
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_int8_of_a_tf_same_padded_deeplabv3plus_runs_at_other_sizes(tmp_path):
    # A timm TF-"same" encoder (tu-tf_efficientnet_lite0 in recipes/camvid/effl2_to_effl0_cpu.yaml;
    # here its smallest kin) computes its paddings from the input's size in float. Quantized with
    # ranges from the calibration size, they came out wrong at any other size and the decoder's
    # QLinearConcat failed: "Non concat axis dimensions must match".
    spec = ModelConfig(arch="DeepLabV3Plus", encoder="tu-tf_mobilenetv3_small_minimal_100",
                       encoder_weights=None, arch_kwargs={"decoder_channels": 16})
    torch.manual_seed(0)
    fp32 = tmp_path / "student.onnx"
    export_onnx(build_model(spec, 4).eval(), fp32, torch.randn(1, 3, 64, 64), 18)
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for _ in range(2)]
    report = quantize_onnx(fp32, tmp_path / "student_int8.onnx", calibration, method="minmax")
    sessions = [ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
                for name in ("student.onnx", "student_int8.onnx")]
    for height, width in [(64, 64), (96, 128), (90, 120)]:
        image = rng.standard_normal((1, 3, height, width)).astype(np.float32)
        expected, got = (session.run(None, {"image": image})[0] for session in sessions)
        assert got.shape == expected.shape == (1, 4, height, width)
        assert (got.argmax(1) == expected.argmax(1)).mean() > 0.9
    # The size arithmetic stays in float and is not reported as an operator left in float; the
    # paddings it computes are (export.fixed_size folds them away: the next test).
    assert not {"Ceil", "Div", "Sub", "Unsqueeze"} & set(report["float_ops"]), report["float_ops"]
    assert report["float_ops"].get("Pad", 0) > 0


def test_fixed_size_export_folds_the_paddings_out_of_the_int8_graph(tmp_path):
    # The same TF-"same" student: in a graph for any size its paddings are computed at run time and
    # run in float between a dequantize and a quantize (the test above); fixed to data.resize they
    # are constants that onnxruntime folds into the convolutions (bench/export_latency.py: faster).
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{
        "student": "{arch: DeepLabV3Plus, encoder: tu-tf_mobilenetv3_small_minimal_100, encoder_weights: null, "
                   "arch_kwargs: {decoder_channels: 16}}",
        "data.resize": "[64,64]", "export.fixed_size": "true", "export.calibration_images": 2,
        "export.int8_max_miou_drop": 100})
    _save_untrained_student(recipe)
    out = export_student(recipe, "onnx,onnx_int8", parity_images=2)
    config = json.loads((out / "distill.json").read_text())
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["results"]["onnx"]["max_abs_diff"] <= recipe.export.atol
    assert config["onnx"]["dynamic_axes"] == ["batch"] and config["onnx"]["fixed_size"] == [64, 64]
    assert config["onnx"]["exporter"] == "torch.export"  # the one that folds the sizes
    for name in ("student.onnx", "student_int8.onnx"):
        dims = [d.dim_param or d.dim_value for d in onnx.load(str(out / name)).graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["batch", 3, 64, 64], name
    assert "Pad" not in parity["int8"]["float_ops"], parity["int8"]["float_ops"]
    # A fixed size the stride does not divide: padded and cropped inside the graph, as eager does.
    model = build_model(recipe.student_model, 4).eval()
    assert export_onnx(model, tmp_path / "odd.onnx", torch.randn(1, 3, 48, 80), 18, fixed_size=True) == "torch.export"
    image = torch.randn(2, 3, 48, 80)
    got = ort.InferenceSession(str(tmp_path / "odd.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": image.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, forward_padded(model, image).numpy(), atol=1e-4)
    # predict resizes every image to the fixed size, and the mask back to the image's own.
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(photo)
    written = _run_predict(out, [photo], tmp_path / "masks", tmp_path)
    assert Image.open(written[0]).size == (70, 50)


def test_an_unexportable_student_names_both_exporters_in_the_order_tried(tmp_path):
    class Unexportable(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no graph here")

    # Any size: TorchScript first; one size: torch.export first (it folds the paddings).
    for fixed, order in ((False, "torchscript exporter: no graph here; torch.export exporter: "),
                         (True, "torch.export exporter: .*; torchscript exporter: no graph here")):
        with pytest.raises(ExportError, match=f"cannot be exported to ONNX \\(opset 18\\): {order}"):
            export_onnx(Unexportable(), tmp_path / "student.onnx", torch.randn(1, 3, 32, 32), 18, fixed_size=fixed)
        assert not (tmp_path / "student.onnx").exists()


def test_fixed_size_needs_data_resize(tmp_path):
    with pytest.raises(ValueError, match="export.fixed_size needs data.resize"):
        tiny_recipe(tmp_path / "run", teacher=True, **{"export.fixed_size": "true"})


# --------------------------------------------------------------------------------------------
# CamVid with an smp student: parity on real images, mIoU through onnxruntime, smp-only reload


def test_camvid_round_trip_within_1e4(camvid_export):
    recipe, out = camvid_export
    # smp's hub format beside distill's metadata and the ONNX file.
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md",
                                               "distill.json", "parity.json", "student.onnx"}
    config = json.loads((out / "distill.json").read_text())
    assert config["kind"] == "smp" and config["smp_reload"] is True
    assert config["files"]["safetensors"] == "model.safetensors"
    assert config["smp"]["create_model"] == {"arch": "DeepLabV3Plus", "encoder_name": "tu-mobilenetv3_small_100",
                                             "encoder_weights": None, "classes": 11}
    assert config["input"]["resize"] == [120, 160] and config["class_names"][0] == "sky"
    parity = json.loads((out / "parity.json").read_text())
    assert parity["resolution"] == [120, 160] and len(parity["images"]) == 3
    for result in parity["results"].values():
        assert result["max_abs_diff"] <= 1e-4 and result["argmax_agreement"] == 1.0

    # At CamVid's own 360x480 too (360 is not a multiple of 32: the graph pads and crops).
    native = recipe.model_copy(deep=True)
    native.data.resize = None
    image = build_dataset(native.data, "val", train=False)[0]["image"][None]
    assert image.shape[-2:] == (360, 480)
    eager = load_exported(out)
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": image.numpy()})[0]
    with torch.no_grad():
        expected = forward_padded(eager, image).numpy()
    assert got.shape == (1, 11, 360, 480)
    assert np.abs(got - expected).max() <= 1e-4


def _assert_onnxruntime_miou_equals_eager(recipe, out: Path) -> None:
    info = dataset_info(recipe.data)
    accelerator = make_accelerator(recipe)
    loader = build_loader(recipe.data, "val", train=False)
    eager = evaluate(load_exported(out), loader, accelerator, num_classes=info.num_classes,
                     ignore_index=info.ignore_index)
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    total = torch.zeros(info.num_classes**2, dtype=torch.long)
    for batch in loader:  # batches of 4 (and a last partial one): the dynamic batch axis too
        logits = torch.from_numpy(session.run(None, {"image": batch["image"].numpy()})[0])
        total += per_sample_confusion(logits.argmax(1), batch["mask"], info.num_classes, info.ignore_index).sum(0)
    through_onnx = scores_from_confusion(total.reshape(info.num_classes, info.num_classes))
    assert eager.confusion.sum() == through_onnx.confusion.sum() > 0
    assert through_onnx.miou == pytest.approx(eager.miou, abs=1e-6)


def test_onnxruntime_miou_equals_eager_miou_on_camvid(camvid_export):
    _assert_onnxruntime_miou_equals_eager(*camvid_export)


def test_onnxruntime_miou_equals_eager_miou_on_synthetic(tiny_export):
    _assert_onnxruntime_miou_equals_eager(*tiny_export)


SMP_ONLY = textwrap.dedent('''
    import ctypes, glob, importlib.util, json, os, sys
    import numpy as np
    import torch

    # The workaround of distill/_compat.py, copied because this script must not import distill:
    # on this machine torchvision's C++ extension cannot load, so declare its nms/qnms schemas
    # before smp imports torchvision (elsewhere the extension loads and this does nothing).
    tv = os.path.dirname(importlib.util.find_spec("torchvision").origin)
    try:
        [ctypes.CDLL(p) for p in glob.glob(os.path.join(tv, "_C*.so"))]
    except OSError:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

    import segmentation_models_pytorch as smp
    from safetensors.torch import load_file

    export_dir = sys.argv[1]
    model = smp.from_pretrained(export_dir).eval()  # smp's own loader on the export folder
    config = json.load(open(os.path.join(export_dir, "distill.json")))
    rebuilt = smp.create_model(**config["smp"]["create_model"])  # or from distill.json's call
    rebuilt.load_state_dict(load_file(os.path.join(export_dir, config["files"]["safetensors"])))
    rebuilt.eval()
    image = torch.from_numpy(np.load(sys.argv[2]))
    with torch.no_grad():
        np.save(sys.argv[3], model(image).numpy())
        assert torch.equal(model(image), rebuilt(image))
    assert not [m for m in sys.modules if m == "distill" or m.startswith("distill.")]
    print("smp-only ok")
''')


def test_smp_alone_reloads_the_safetensors(camvid_export, tmp_path):
    recipe, out = camvid_export
    image = build_dataset(recipe.data, "val", train=False)[1]["image"][None][..., :96, :128]
    np.save(tmp_path / "image.npy", image.numpy())
    script = tmp_path / "smp_only.py"
    script.write_text(SMP_ONLY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DISTILL_NO_STARTUP_HOOK"] = "1"  # this process must not import distill, even at start-up
    result = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "image.npy"),
                             str(tmp_path / "logits.npy")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    with torch.no_grad():
        expected = load_exported(out)(image).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-5)


# --------------------------------------------------------------------------------------------
# predict: the export on its own, without torch


PREDICT_NO_TORCH = textwrap.dedent('''
    import importlib.util, sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("distill_predict", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.predict(sys.argv[2], [Path(p) for p in sys.argv[4:]], Path(sys.argv[3]))
    assert "torch" not in sys.modules, "predict imported torch"
    assert not [m for m in sys.modules if m.startswith("distill")], "predict imported distill"
    print("\\n".join(str(p) for p in written))
''')


def _run_predict(export_dir: Path, images: list[Path], out_dir: Path, tmp_path: Path) -> list[Path]:
    script = tmp_path / "predict_no_torch.py"
    script.write_text(PREDICT_NO_TORCH)
    env = {**os.environ, "DISTILL_NO_STARTUP_HOOK": "1"}  # not even distill's start-up hook
    result = subprocess.run([sys.executable, str(script), str(PREDICT_PY), str(export_dir), str(out_dir),
                             *map(str, images)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return [Path(line) for line in result.stdout.split()]


def test_predict_writes_palette_masks_without_torch(tiny_export, tmp_path):
    recipe, out = tiny_export
    dataset = build_dataset(recipe.data, "val", train=False)
    images = []
    for index in range(3):
        image, _ = dataset.load_raw(index)
        images.append(tmp_path / f"sample{index}.png")
        Image.fromarray(image).save(images[-1])
    written = _run_predict(out, images, tmp_path / "masks", tmp_path)
    assert written == [tmp_path / "masks" / f"sample{i}_mask.png" for i in range(3)]
    config = json.loads((out / "distill.json").read_text())
    eager = load_exported(out)
    for index, path in enumerate(written):
        mask = Image.open(path)
        assert mask.mode == "P" and mask.size == (32, 32)
        assert np.array(mask.getpalette()[: 3 * 4]).reshape(4, 3).tolist() == config["palette"]
        with torch.no_grad():
            expected = forward_padded(eager, dataset[index]["image"][None]).argmax(1)[0].numpy()
        assert (np.array(mask) == expected).mean() > 0.99


def test_predict_on_camvid_images_at_their_own_size(camvid_export, tmp_path):
    recipe, out = camvid_export
    images = sorted((Path(recipe.data.root) / "val").glob("*.png"))[:2]
    written = _run_predict(out, images, tmp_path / "masks", tmp_path)
    for path in written:
        mask = Image.open(path)
        assert mask.mode == "P" and mask.size == (480, 360)
        assert np.array(mask).max() < 11


def test_predict_errors_name_the_file(tiny_export, tmp_path):
    from distill.export.predict import PredictError, predict

    recipe, out = tiny_export
    with pytest.raises(PredictError, match="distill.json does not exist"):
        predict(tmp_path, [], tmp_path / "masks")
    with pytest.raises(PredictError, match="image '.*nope.png' does not exist"):
        predict(out, [tmp_path / "nope.png"], tmp_path / "masks")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(PredictError, match="bad.png' cannot be decoded"):
        predict(out, [tmp_path / "bad.png"], tmp_path / "masks")


# --------------------------------------------------------------------------------------------
# Bad input


def test_missing_student_checkpoint_names_the_command(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", teacher=True)
    with pytest.raises(ModelError, match=r"student/best.safetensors does not exist.*`distill train RECIPE`"):
        export_student(recipe)
    assert not (tmp_path / "run" / "export").exists()


def test_unwritable_export_folder_is_reported_before_any_work(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", teacher=True)
    checkpoint = _save_untrained_student(recipe)
    (tmp_path / "run" / "export").write_text("a file where the folder should be")
    with pytest.raises(ExportError, match=r"cannot write the export to .*export: '.*export' is a file"):
        export_student(recipe)

    if os.geteuid() == 0:  # root writes into read-only folders; /sys refuses even root
        locked = Path("/sys/distill-test-run")
    else:
        (tmp_path / "locked").mkdir(mode=0o555)
        locked = tmp_path / "locked" / "run"
    elsewhere = tiny_recipe(locked, teacher=True, **{"eval.checkpoint": str(checkpoint)})
    with pytest.raises(ExportError, match=f"cannot write the export to {locked}/export"):
        export_student(elsewhere)


def test_predict_command_imports_no_torch(tiny_export, tmp_path):
    # `python -m distill predict` goes through distill/__init__ and the CLI: neither may import torch.
    _, out = tiny_export
    image = tmp_path / "one.png"
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(image)
    script = textwrap.dedent('''
        import sys
        from distill.cli import main
        code = main(["predict", sys.argv[1], sys.argv[2], "--out", sys.argv[3]])
        assert "torch" not in sys.modules, "distill predict imported torch"
        sys.exit(code)
    ''')
    result = subprocess.run([sys.executable, "-c", script, str(out), str(image), str(tmp_path / "masks")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "masks" / "one_mask.png").is_file()


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(tiny_export):
    recipe, out = tiny_export
    stale = out.parent / ".export-staging-killed"
    stale.mkdir()
    (stale / "student.onnx").write_bytes(b"half an export")
    export_student(recipe, parity_images=1)
    assert not stale.exists() and not list(out.parent.glob(".export-staging-*"))
    assert (out / "student.onnx").stat().st_size > 100


def test_predict_refuses_mismatched_truncated_clashing_and_huge_inputs(tiny_export, tmp_path):
    import shutil as sh

    from distill.export.predict import PredictError, predict

    _, out = tiny_export
    image = tmp_path / "a" / "frame.png"
    image.parent.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    twin = tmp_path / "b" / "frame.png"
    twin.parent.mkdir()
    sh.copy(image, twin)
    with pytest.raises(PredictError, match=r"would both write 'frame_mask.png'"):
        predict(out, [image, twin], tmp_path / "masks")
    # An export whose distill.json says 11 classes but whose ONNX model gives 4.
    mixed = tmp_path / "mixed"
    sh.copytree(out, mixed)
    config = json.loads((mixed / "distill.json").read_text())
    (mixed / "distill.json").write_text(json.dumps({**config, "num_classes": 11}))
    with pytest.raises(PredictError, match=r"outputs 4 classes but .*distill.json says 11"):
        predict(mixed, [image], tmp_path / "masks")
    (mixed / "distill.json").write_text(json.dumps(config))
    data = (mixed / "student.onnx").read_bytes()
    (mixed / "student.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(PredictError, match=r"student.onnx' cannot be loaded \(truncated"):
        predict(mixed, [image], tmp_path / "masks")
    huge = tmp_path / "huge.png"
    Image.new("L", (20000, 10000)).save(huge)  # above twice PIL's MAX_IMAGE_PIXELS
    with pytest.raises(PredictError, match=r"huge.png' is too large to decode safely"):
        predict(out, [huge], tmp_path / "masks")


def test_every_export_file_has_the_usual_permissions(tiny_export):
    _, out = tiny_export
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes


class _Coarse(torch.nn.Module):
    """Logits at 1/4 of its input, as SegFormer without its upsampling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 4, stride=4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-1, 1, images.shape[-1] // 4, device=images.device)
        return self.conv(images) + ramp  # depends on where a cell is: a shifted map differs


def test_a_graph_of_a_coarse_student_gives_logits_at_the_input_size(tmp_path):
    # The crop by the input's rows kept the whole 1/4 map, padding included, stretched later.
    from distill.export.student import PaddedSegmenter

    model = _Coarse().eval()
    export_onnx(model, tmp_path / "s.onnx", torch.randn(1, 3, 64, 96), 18)
    image = torch.randn(1, 3, 70, 90)  # padded to 96x96: 24x24 cells, 17.5x22.5 of them the image
    got = torch.from_numpy(ort.InferenceSession(str(tmp_path / "s.onnx")).run(None, {"image": image.numpy()})[0])
    assert got.shape == (1, 3, 70, 90)
    with torch.no_grad():
        whole = model(torch.nn.functional.pad(image, (0, 6, 0, 26), mode="replicate"))  # pad and resize by hand
        expected = torch.nn.functional.interpolate(whole, size=(96, 96), mode="bilinear")[..., :70, :90]
        torch.testing.assert_close(PaddedSegmenter(model)(image), expected)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_graph_that_serves_one_size_only_fails_the_parity_check(tmp_path):
    from distill.export.student import check_parity

    model = tiny(4, width=6).eval()
    export_onnx(model, tmp_path / "s.onnx", torch.randn(1, 3, 32, 32), 18, fixed_size=True)  # 32x32 only
    images = [torch.randn(1, 3, 32, 32)]
    assert check_parity(model, images, onnx_path=tmp_path / "s.onnx", reloaded=None, fixed_size=True)
    with pytest.raises(ExportError, match=r"the ONNX graph fails on a batch of 2 35x37 images .*: it serves "
                                          r"one size only; set data.resize and export.fixed_size: true"):
        check_parity(model, images, onnx_path=tmp_path / "s.onnx", reloaded=None)


def test_wrapping_a_model_for_export_leaves_its_weights_and_mode_as_they_were():
    from distill.export.student import PaddedSegmenter

    model = tiny(4, width=6).train()  # batch norm in training mode: a forward would move its statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    PaddedSegmenter(model)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weights_trained_on_other_normalization_are_refused_by_eval_export_and_compare(tmp_path):
    from distill.comparison import compare
    from distill.evaluation import evaluate_checkpoint

    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{"train.epochs": 1, "data.mean": "[0.2, 0.5, 0.7]"})
    for stage in ("teacher", "student"):
        train(recipe, stage)
    now = tiny_recipe(tmp_path / "run", teacher=True, **{"train.epochs": 1})  # the default mean
    message = r"best.safetensors' was trained on images normalized with data.mean \[0.2, 0.5, 0.7\]"
    for call in (lambda: evaluate_checkpoint(now, "student"), lambda: export_student(now),
                 lambda: compare(now, latency_runs=1, warmup_runs=0, num_examples=1)):
        with pytest.raises(ModelError, match=message):
            call()
    assert not (tmp_path / "run" / "export").exists() and not (tmp_path / "run" / "compare").exists()
    evaluate_checkpoint(recipe, "student")  # the trained normalization: scored
    # The run folder's own teacher, met by a student stage or a store of another normalization.
    from distill.cache import write_cache

    retrain = r"set data.mean to the trained values, or give the file as teacher.checkpoint with teacher.mean, or retrain"
    for call in (lambda: train(now, "student"), lambda: write_cache(tiny_recipe(
            tmp_path / "run", teacher=True, **{"teacher.mode": "cache", "data.resize": "[32,32]"}))):
        with pytest.raises(ModelError, match=retrain):
            call()
    assert not (tmp_path / "run" / "cache").exists()
    # That teacher given to another recipe: refused before a student learns from it, naming the
    # teacher's own key (the data's normalizes the student's inputs); with it, accepted.
    other = {"teacher.checkpoint": str(tmp_path / "run" / "teacher" / "best.safetensors"), "train.epochs": 1}
    given = tiny_recipe(tmp_path / "other", teacher=True, **other)
    with pytest.raises(ModelError, match=r"this recipe gives it \[0.485, 0.456, 0.406\]: set teacher.mean"):
        train(given, "student")
    from distill.preflight import check_inputs

    with pytest.raises(ModelError, match=r"set teacher.mean"):  # `distill run`'s, before its baseline trains
        check_inputs(given, needs_teacher_weights=False, planned=["baseline", "student"])
    assert not (tmp_path / "other").exists()
    train(tiny_recipe(tmp_path / "other", teacher=True, **other, **{"teacher.mean": "[0.2, 0.5, 0.7]"}), "student")
    # Another tool's recipe.yaml beside weights is no record of how they were trained.
    from distill.stage_weights import check_normalization

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "best.safetensors").write_bytes((tmp_path / "run" / "teacher" / "best.safetensors").read_bytes())
    for text in ("data: coco\n", "data: {mean: [a, b, c]}\n", "[1, 2]\n"):
        (tmp_path / "foreign" / "recipe.yaml").write_text(text)
        check_normalization(now, tmp_path / "foreign" / "best.safetensors", "teacher")
