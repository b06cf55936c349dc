"""Teachers users already have (torchvision, smp hub folders, ONNX files) and class maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill.cache import load_cached_teacher, write_cache
from distill.data import build_dataset, collate_batch
from distill.models import ModelError
from distill.teacher import load_teacher, teacher_from_recipe
from distill.teacher.sources import OnnxTeacher, apply_class_map, class_map_matrix
from distill.training import train
from helpers import onnx_teacher, tiny_recipe

STUDENT = ["background", "circle_stripes", "square_dots", "triangle_solid"]  # the synthetic 4


def test_class_map_against_a_float64_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 3, 4)) * 3
    temperature = 2.0
    # teacher classes t0..t4: t0 -> background, t1 + t2 -> circle_stripes, t3 -> square_dots,
    # t4 -> triangle_solid via its id; nothing dropped first, then t2 dropped.
    names = ["t0", "t1", "t2", "t3", "t4"]
    for mapping, groups in [({"t0": "background", "t1": "circle_stripes", "t2": "circle_stripes",
                              "t3": 2, "t4": "triangle_solid"}, [[0], [1, 2], [3], [4]]),
                            ({"t0": 0, "t1": 1, "t3": 2, "t4": 3}, [[0], [1], [3], [4]])]:
        matrix = class_map_matrix(mapping, names, STUDENT)
        got = apply_class_map(torch.from_numpy(logits), matrix.double(), temperature)
        p = np.exp(logits / temperature)
        p /= p.sum(1, keepdims=True)
        q = np.stack([p[:, g].sum(1) for g in groups], 1)
        q /= q.sum(1, keepdims=True)
        # The mapped logits' softmax at T is the grouped, renormalized teacher distribution.
        np.testing.assert_allclose(torch.softmax(got / temperature, 1).numpy(), q, rtol=1e-9, atol=1e-12)


def test_class_map_of_a_confident_teacher_stays_finite_under_fp16_autocast():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 8, 8) * 25  # gaps of tens of logits: probabilities below fp16's range
    matrix = torch.zeros(6, 3)
    matrix[[0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 2, 2]] = 1
    full = apply_class_map(logits, matrix, 1.0)
    with torch.autocast("cpu", dtype=torch.float16):
        half = apply_class_map(logits, matrix, 1.0)
    assert bool(full.isfinite().all()) and bool(half.isfinite().all())  # log(0) gave -inf in fp16
    torch.testing.assert_close(half, full)


def test_class_map_errors_name_the_class():
    with pytest.raises(ModelError, match="the teacher has no class 'dog'; its classes: t0, t1"):
        class_map_matrix({"dog": 0}, ["t0", "t1"], STUDENT)
    with pytest.raises(ModelError, match="student class 7 is out of range 0..3"):
        class_map_matrix({"t0": 7}, ["t0", "t1"], STUDENT)
    with pytest.raises(ModelError, match="maps no teacher class onto the student's square_dots, triangle_solid"):
        class_map_matrix({"t0": 0, "t1": 1}, ["t0", "t1"], STUDENT)
    # One teacher class by its name and its id: its probability would count in two student classes.
    with pytest.raises(ModelError, match=r"maps the teacher's class 't1' twice \(keys 't1' and 1\)"):
        class_map_matrix({"t0": 0, "t1": 1, 1: 2, "t2": 3}, ["t0", "t1", "t2"], STUDENT)


def _batch(recipe, count=2):
    dataset = build_dataset(recipe.data, "train", train=False)
    return collate_batch([dataset[i] for i in range(count)])


def test_torchvision_teacher_with_its_own_label_set_distils_and_caches(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None,
                                         num_classes=6)
    weights = tmp_path / "lraspp.pt"
    torch.save(model.state_dict(), weights)
    names = [f"t{k}" for k in range(6)]
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{
        "teacher.source": "torchvision", "teacher.arch": "lraspp_mobilenet_v3_large",
        "teacher.checkpoint": str(weights), "teacher.class_names": json.dumps(names),
        "teacher.class_map": "{t0: background, t1: background, t2: circle_stripes, t3: square_dots, t4: triangle_solid}",
        "teacher.mode": "cache", "data.resize": "[32, 32]", "train.epochs": 1, "train.max_steps": 2})
    batch = _batch(recipe)
    targets = load_teacher(recipe, 4)(batch)
    with torch.no_grad():
        raw = model.eval()(batch["image"])["out"]
    expected = apply_class_map(raw, class_map_matrix(recipe.teacher.class_map, names, STUDENT), 2.0)
    torch.testing.assert_close(targets, expected, rtol=1e-5, atol=1e-5)
    write_cache(recipe)
    assert train(recipe, "student").steps == 2
    from distill.pipeline import planned_stages

    assert "teacher" not in planned_stages(recipe)  # a given teacher is not trained


def test_smp_hub_folder_teacher_equals_the_model(tmp_path):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = smp.create_model("FPN", encoder_name="tu-mobilenetv3_small_050", encoder_weights=None, classes=4)
    model.save_pretrained(tmp_path / "hub")
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{
        "teacher.source": "smp_hub", "teacher.path": str(tmp_path / "hub")})
    batch = _batch(recipe)
    with torch.no_grad():
        from distill.models import forward_padded

        expected = forward_padded(model.eval(), batch["image"])
    torch.testing.assert_close(load_teacher(recipe, 4)(batch), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="nothing' is not a model folder"):
        load_teacher(tiny_recipe(tmp_path / "r2", teacher=True, **{
            "teacher.source": "smp_hub", "teacher.path": str(tmp_path / "nothing")}), 4)


def test_onnx_teacher_cached_targets_equal_the_torch_models(tmp_path):
    onnx_file = tmp_path / "teacher.onnx"
    model = onnx_teacher(onnx_file)
    weights = tmp_path / "teacher.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    common = {"data.resize": "[32, 32]", "teacher.mode": "cache", "cache.layout": "dense"}
    by_onnx = tiny_recipe(tmp_path / "onnx", teacher=True, **{"teacher.source": "onnx", "teacher.path": str(onnx_file), **common})
    by_torch = tiny_recipe(tmp_path / "torch", teacher=True, **{
        "teacher.arch": "FPN", "teacher.encoder": "tu-mobilenetv3_small_050", "teacher.factory": "null",
        "teacher.checkpoint": str(weights), **common})
    for recipe in (by_onnx, by_torch):
        write_cache(recipe)
    batch = _batch(by_onnx, 4)
    a, b = load_cached_teacher(by_onnx, 4)(batch), load_cached_teacher(by_torch, 4)(batch)
    assert float((a - b).abs().max()) < 1e-2  # fp16 store; the logits themselves agree to 1e-4:
    torch.testing.assert_close(load_teacher(by_onnx, 4)(batch), load_teacher(by_torch, 4)(batch), rtol=1e-4, atol=1e-4)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(onnx_file.read_bytes()[:100])
    with pytest.raises(ModelError, match="cannot be loaded by onnxruntime"):
        load_teacher(tiny_recipe(tmp_path / "bad", teacher=True, **{"teacher.source": "onnx", "teacher.path": str(bad)}), 4)


def test_a_changed_class_map_makes_the_store_stale(tmp_path):
    from distill.cache import CacheError, open_store

    recipe = tiny_recipe(tmp_path, teacher=True, **{"data.resize": "[32, 32]", "teacher.mode": "cache",
                                                     "train.epochs": 1})
    train(recipe, "teacher")
    mapped = recipe.model_copy(deep=True)
    mapped.teacher.class_map = {0: 0, 1: 1, 2: 2, 3: 3}
    write_cache(mapped)
    swapped = mapped.model_copy(deep=True)
    swapped.teacher.class_map = {0: 0, 1: 2, 2: 1, 3: 3}
    with pytest.raises(CacheError, match="teacher_model"):
        open_store(swapped)
    # A map by the student's names: the same map, the names reordered, is another map.
    named = mapped.model_copy(deep=True)
    named.data.class_names, named.teacher.class_map = ["a", "b", "c", "d"], {0: "a", 1: "b", 2: "c", 3: "d"}
    write_cache(named)
    reordered = named.model_copy(deep=True)
    reordered.data.class_names = ["b", "a", "c", "d"]
    with pytest.raises(CacheError, match="student_classes"):
        open_store(reordered)


def _tiny_segformer(folder, names, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), dtype=torch.float32):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(0)
    config = SegformerConfig(num_labels=len(names), hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                             num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16,
                             id2label=dict(enumerate(names)), label2id={n: k for k, n in enumerate(names)})
    model = SegformerForSemanticSegmentation(config).eval()
    model.to(dtype).save_pretrained(folder)
    SegformerImageProcessor(image_mean=list(mean), image_std=list(std)).save_pretrained(folder)
    return model


def test_transformers_segformer_with_its_labels_normalization_and_quarter_resolution(tmp_path):
    pytest.importorskip("transformers")
    names = ["bg", "circle", "square", "triangle", "sky"]
    model = _tiny_segformer(tmp_path / "segformer", names)
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{
        "teacher.source": "transformers", "teacher.path": str(tmp_path / "segformer"),
        "teacher.class_map": "{bg: background, sky: background, circle: circle_stripes, square: square_dots, triangle: triangle_solid}",
        "teacher.mode": "cache", "data.resize": "[32, 32]", "train.epochs": 1, "train.max_steps": 2})
    batch = _batch(recipe)
    # The preprocessor's normalization, not the data's: undo the data's, apply the teacher's.
    mean, std = torch.tensor(recipe.data.mean).view(1, 3, 1, 1), torch.tensor(recipe.data.std).view(1, 3, 1, 1)
    raw = batch["image"] * std + mean
    with torch.no_grad():
        logits = model(pixel_values=(raw - 0.5) / 0.25).logits
    assert logits.shape[-1] == 8  # SegFormer predicts at 1/4 of its 32x32 input
    expected = apply_class_map(logits, class_map_matrix(recipe.teacher.class_map, names, STUDENT), 2.0)
    torch.testing.assert_close(load_teacher(recipe, 4)(batch), expected, rtol=1e-4, atol=1e-4)
    write_cache(recipe)
    assert train(recipe, "student").steps == 2


def _mask_query_reference(out, k: int) -> torch.Tensor:
    """Independent float64 ``sum_q softmax(class_q)[:K] * sigmoid(mask_q)``, renormalized."""
    classes = torch.softmax(out.class_queries_logits.double(), -1)[..., :k]
    masks = torch.sigmoid(out.masks_queries_logits.double())
    probs = (classes[:, :, :, None, None] * masks[:, :, None]).sum(1)
    return probs / probs.sum(1, keepdim=True)


def test_transformers_mask2former_as_per_pixel_probabilities(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    torch.manual_seed(0)
    names = ["background", "circle_stripes", "square_dots", "triangle_solid"]
    config = Mask2FormerConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   out_features=["stage1", "stage2", "stage3", "stage4"]),
        num_labels=4, hidden_dim=32, num_queries=8, encoder_layers=1, decoder_layers=2,
        encoder_feedforward_dim=64, dim_feedforward=64, mask_feature_size=32, num_attention_heads=2,
        id2label=dict(enumerate(names)), label2id={n: k for k, n in enumerate(names)})
    model = Mask2FormerForUniversalSegmentation(config).eval()
    model.save_pretrained(tmp_path / "m2f")
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{
        "teacher.source": "transformers", "teacher.path": str(tmp_path / "m2f"), "train.epochs": 1,
        "train.max_steps": 2})
    batch = _batch(recipe)
    with torch.no_grad():
        out = model(pixel_values=batch["image"].double().float())
    probs = _mask_query_reference(out, 4)
    got = load_teacher(recipe, 4)(batch)
    torch.testing.assert_close(torch.softmax(got.double() / 2.0, 1),
                               torch.softmax(torch.log(probs) / 2.0, 1), rtol=1e-4, atol=1e-5)
    assert train(recipe, "student").steps == 2


def test_transformers_eomt_as_per_pixel_probabilities(tmp_path):
    # EoMT (a plain ViT whose last blocks take the queries): the same mask-query output as
    # Mask2Former's, found through AutoModelForUniversalSegmentation.
    pytest.importorskip("transformers")
    from transformers import EomtConfig, EomtForUniversalSegmentation

    torch.manual_seed(0)
    names = ["background", "circle_stripes", "square_dots", "triangle_solid"]
    config = EomtConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                        num_blocks=1, num_queries=6, num_upscale_blocks=1, num_labels=4,
                        id2label=dict(enumerate(names)), label2id={n: k for k, n in enumerate(names)})
    model = EomtForUniversalSegmentation(config).eval()
    model.save_pretrained(tmp_path / "eomt")
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{
        "teacher.source": "transformers", "teacher.path": str(tmp_path / "eomt"), "train.epochs": 1,
        "train.max_steps": 2})
    batch = _batch(recipe)
    with torch.no_grad():
        out = model(pixel_values=batch["image"])
    probs = _mask_query_reference(out, 4)
    got = load_teacher(recipe, 4)(batch)
    torch.testing.assert_close(torch.softmax(got.double(), 1), probs, rtol=1e-4, atol=1e-5)
    assert train(recipe, "student").steps == 2


def test_transformers_model_of_another_task_is_refused(tmp_path):
    pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTForImageClassification

    ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                        intermediate_size=16, image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{"teacher.source": "transformers",
                                                            "teacher.path": str(tmp_path / "vit")})
    with pytest.raises(ModelError, match=r"holds a vit model for another task \(ViTForImageClassification\)"):
        load_teacher(recipe, 4)
    offline = tiny_recipe(tmp_path / "run2", teacher=True, **{"teacher.source": "transformers",
                                                              "teacher.path": "nvidia/no-such-model-here"})
    with pytest.raises(ModelError, match="cannot be downloaded"):
        load_teacher(offline, 4)


def test_onnx_file_of_another_shape_is_refused(tmp_path):
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    path = tmp_path / "classifier.onnx"
    torch.onnx.export(classifier, torch.randn(1, 3, 8, 8), str(path), input_names=["x"], output_names=["y"],
                      opset_version=18, dynamo=False)
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{"teacher.source": "onnx", "teacher.path": str(path)})
    with pytest.raises(ModelError, match=r"are not \[N, 3, H, W\] and \[N, C, h, w\]"):
        load_teacher(recipe, 4)


def test_compare_counts_an_onnx_teachers_weights_and_leaves_its_gflops_unknown(tmp_path):
    # torch sees no parameters in an onnxruntime session (compare reported 0 and 0 GFLOPs).
    from distill.comparison import _size
    from distill.models import count_parameters
    from distill.teacher import scoring_teacher

    onnx_file = tmp_path / "teacher.onnx"
    model = onnx_teacher(onnx_file)
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{"teacher.source": "onnx", "teacher.path": str(onnx_file)})
    size = _size(scoring_teacher(recipe, 4, None), model, torch.rand(1, 3, 32, 32))
    # The graph's weights are the model's parameters, BatchNorm folded into the convolutions or
    # kept beside them with its running statistics: within a few percent.
    assert size["gflops"] is None
    assert 0.9 < size["parameters"] / count_parameters(model) < 1.1


def test_a_torchvision_checkpoint_of_another_class_count_is_named(tmp_path):
    import torchvision

    model = torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None,
                                         num_classes=21)
    weights = tmp_path / "lraspp21.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, weights)  # saved under DDP
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{
        "teacher.source": "torchvision", "teacher.arch": "lraspp_mobilenet_v3_large",
        "teacher.checkpoint": str(weights)})
    with pytest.raises(ModelError, match=r"does not fit torchvision's lraspp_mobilenet_v3_large with 4 classes "
                                         r"\(.*\): set teacher.class_names"):  # a RuntimeError traceback
        load_teacher(recipe, 4)
    names = [f"c{k}" for k in range(21)]
    mapped = tiny_recipe(tmp_path / "run", teacher=True, **{
        "teacher.source": "torchvision", "teacher.arch": "lraspp_mobilenet_v3_large",
        "teacher.checkpoint": str(weights), "teacher.class_names": json.dumps(names),
        "teacher.class_map": "{c0: 0, c1: 1, c2: 2, c3: 3}"})
    assert load_teacher(mapped, 4)(_batch(mapped)).shape[1] == 4


def test_an_onnx_teacher_of_half_precision_takes_and_gives_floats(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((4, 3, 1, 1), 0.5, np.float16), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4, "H", "W"])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "fp16.onnx")
    teacher = OnnxTeacher(tmp_path / "fp16.onnx")
    images = torch.rand(2, 3, 8, 8)
    out = teacher(images)  # onnxruntime refused float32 input
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, images.sum(1, keepdim=True).expand(-1, 4, -1, -1) * 0.5, atol=2e-3, rtol=2e-3)


def test_a_processor_that_does_not_normalise_and_flips_channels_is_followed(tmp_path):
    # MobileViT's processor keeps image_mean/std in its config but never normalises, and hands
    # the model BGR: the teacher got [-1, 1] RGB.
    from transformers import MobileViTConfig, MobileViTForSemanticSegmentation, MobileViTImageProcessor

    from distill.teacher.sources import load_source

    config = MobileViTConfig(num_labels=3, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16],
                             image_size=64, aspp_out_channels=16, id2label={0: "a", 1: "b", 2: "c"},
                             label2id={"a": 0, "b": 1, "c": 2}, architectures=["MobileViTForSemanticSegmentation"])
    MobileViTForSemanticSegmentation(config).save_pretrained(tmp_path / "mvit")
    MobileViTImageProcessor().save_pretrained(tmp_path / "mvit")
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{"teacher.source": "transformers",
                                                           "teacher.path": str(tmp_path / "mvit")})
    _, names, expects = load_source(recipe.teacher, 3, None)
    assert names == ["a", "b", "c"] and expects == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), True)
    # The teacher distill builds from it flips the channels and takes the image back to [0, 1].
    teacher = teacher_from_recipe(recipe, 3, temperature=1.0)
    assert teacher.bgr
    images = torch.rand(1, 3, 8, 8)
    raw = images * torch.tensor(recipe.data.std).view(1, 3, 1, 1) + torch.tensor(recipe.data.mean).view(1, 3, 1, 1)
    torch.testing.assert_close(images * teacher._scale + teacher._shift, raw)


def test_a_processor_of_0_255_statistics_without_rescaling_and_scalar_ones_are_followed(tmp_path):
    # mmseg-style statistics on 0-255 pixels (do_rescale false), and one number for every channel:
    # the model must see (255 * image - mean) / std and (image - 0.5) / 0.5 of distill's [0, 1] images.
    pytest.importorskip("transformers")
    from transformers import SegformerImageProcessor

    from distill.teacher.sources import load_source

    _tiny_segformer(tmp_path / "seg", ["a", "b"])
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{"teacher.source": "transformers",
                                                           "teacher.path": str(tmp_path / "seg")})
    image = torch.rand(1, 3, 4, 4)
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    for processor, want in [
        (SegformerImageProcessor(do_rescale=False, image_mean=mean, image_std=std),
         (255 * image - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)),
        (SegformerImageProcessor(image_mean=0.5, image_std=0.5), (image - 0.5) / 0.5),
    ]:
        processor.save_pretrained(tmp_path / "seg")
        _, _, expects = load_source(recipe.teacher, 2, None)
        got = (image - torch.tensor(expects.mean).view(1, 3, 1, 1)) / torch.tensor(expects.std).view(1, 3, 1, 1)
        torch.testing.assert_close(got, want)


def _export_onnx(model, path, size, dynamic, batch=1):
    torch.onnx.export(model.eval(), torch.randn(batch, 3, *size), str(path), input_names=["image"],
                      output_names=["logits"], opset_version=18, dynamo=False,
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}}
                      if dynamic else None)


def test_onnx_teacher_of_one_fixed_size_and_batch_runs_at_that_size(tmp_path):
    # torchvision-style export: [1, 3, 40, 40] fixed. It is neither padded to a stride (40 -> 64)
    # nor given a batch of several at once, and a recipe without its size is refused by name.
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = smp.create_model("FPN", encoder_name="tu-mobilenetv3_small_050", encoder_weights=None, classes=4).eval()
    path = tmp_path / "fixed.onnx"
    _export_onnx(torch.nn.Sequential(torch.nn.ZeroPad2d((0, 24, 0, 24)), model), path, (40, 40), dynamic=False)
    common = {"teacher.source": "onnx", "teacher.path": str(path), "data.resize": "[32, 32]"}
    with pytest.raises(ModelError, match=r"fixed.onnx' takes 40x40 images only: set teacher.input_size: \[40, 40\]"):
        load_teacher(tiny_recipe(tmp_path / "a", teacher=True, **common), 4)
    recipe = tiny_recipe(tmp_path / "b", teacher=True, **common, **{"teacher.input_size": "[40, 40]"})
    batch = _batch(recipe, 3)
    images = torch.nn.functional.interpolate(batch["image"], size=(40, 40), mode="bilinear", align_corners=False)
    with torch.no_grad():
        want = model(torch.nn.functional.pad(images, (0, 24, 0, 24)))
    torch.testing.assert_close(load_teacher(recipe, 4)(batch), want, rtol=1e-4, atol=1e-4)
    # A batch fixed at 2: 3 images run as 2 + (1 and a copy), the copy's logits dropped.
    _export_onnx(torch.nn.Sequential(torch.nn.ZeroPad2d((0, 24, 0, 24)), model), path, (40, 40), dynamic=False, batch=2)
    torch.testing.assert_close(load_teacher(recipe, 4)(batch), want, rtol=1e-4, atol=1e-4)


def test_onnx_teacher_of_labels_and_class_names_of_another_count_are_refused(tmp_path):
    class Argmax(torch.nn.Module):
        def forward(self, images):
            return images.sum(1, keepdim=True).round().long()  # [N, 1, H, W] labels, as with_argmax

    _export_onnx(Argmax(), tmp_path / "labels.onnx", (32, 32), dynamic=True)
    recipe = tiny_recipe(tmp_path / "a", teacher=True, **{"teacher.source": "onnx", "teacher.path": str(tmp_path / "labels.onnx")})
    with pytest.raises(ModelError, match=r"labels.onnx' outputs tensor\(int64\) .*not per-class scores"):
        load_teacher(recipe, 4)
    class DoubleScores(torch.nn.Module):  # float64 scores are scores: read back as float32
        def forward(self, images):
            return torch.cat([images, images[:, :1]], 1).double()

    _export_onnx(DoubleScores(), tmp_path / "double.onnx", (32, 32), dynamic=True)
    recipe = tiny_recipe(tmp_path / "c", teacher=True, **{"teacher.source": "onnx", "teacher.path": str(tmp_path / "double.onnx")})
    batch = _batch(recipe)
    torch.testing.assert_close(load_teacher(recipe, 4)(batch), DoubleScores()(batch["image"]).float())
    onnx_teacher(tmp_path / "four.onnx")  # 4 classes
    recipe = tiny_recipe(tmp_path / "b", teacher=True, **{
        "teacher.source": "onnx", "teacher.path": str(tmp_path / "four.onnx"),
        "teacher.class_names": "[a, b, c, d, e]", "teacher.class_map": "{a: 0, b: 1, c: 2, d: 3, e: 3}"})
    with pytest.raises(ModelError, match="teacher.class_names lists 5 classes, but the teacher .*four.onnx' predicts 4"):
        load_teacher(recipe, 4)


def test_oneformer_is_refused_by_name(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "oneformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "oneformer",
                                                    "architectures": ["OneFormerForUniversalSegmentation"]}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))  # refused before it is read
    assert transformers.AutoConfig.from_pretrained(str(folder)).model_type == "oneformer"
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{"teacher.source": "transformers", "teacher.path": str(folder)})
    with pytest.raises(ModelError, match="is a OneFormer model, which distill does not run"):
        load_teacher(recipe, 4)


def test_an_onnx_teacher_with_external_data_is_hashed_with_its_weights(tmp_path):
    # Large graphs (and torch's dynamo exporter) keep the weights in a file beside the graph:
    # new weights under the same graph must make the store and the student stale.
    import onnx

    from distill.stage_weights import teacher_digest

    graph = tmp_path / "teacher.onnx"
    onnx_teacher(tmp_path / "plain.onnx")
    model = onnx.load(str(tmp_path / "plain.onnx"))
    onnx.save_model(model, str(graph), save_as_external_data=True, location="teacher.onnx.data", size_threshold=0)
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{"teacher.source": "onnx", "teacher.path": str(graph)})
    before, graph_bytes = teacher_digest(recipe), graph.read_bytes()
    data = (tmp_path / "teacher.onnx.data").read_bytes()
    (tmp_path / "teacher.onnx.data").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # other weights, same graph
    assert graph.read_bytes() == graph_bytes and teacher_digest(recipe) != before
    (tmp_path / "teacher.onnx.data").unlink()
    with pytest.raises(ModelError, match=r"weights '.*teacher.onnx' cannot be read whole: .*teacher.onnx.data"):
        teacher_digest(recipe)


def test_a_teacher_of_another_class_count_without_a_class_map_is_refused_before_any_write(tmp_path):
    smp = pytest.importorskip("segmentation_models_pytorch")
    from distill.training import check_models

    torch.manual_seed(0)
    smp.create_model("FPN", encoder_name="tu-mobilenetv3_small_050", encoder_weights=None,
                     classes=5).save_pretrained(tmp_path / "hub")
    source = {"teacher.source": "smp_hub", "teacher.path": str(tmp_path / "hub"), "data.resize": "[32,32]"}
    cached = tiny_recipe(tmp_path / "cached", teacher=True, **source, **{"teacher.mode": "cache", "cache.topk": 2})
    # A dense store failed mid-write; a top-k one was written and its maps read back as 4 classes.
    with pytest.raises(ModelError, match=r"teacher '.*hub' predicts 5 classes and the student 4: map the "
                                         r"teacher's classes onto the student's with teacher.class_map"):
        write_cache(cached)
    assert not (tmp_path / "cached" / "cache" / "manifest.json").exists()
    # Streamed: refused by the set-up checks `distill run` makes before its first stage.
    streamed = tiny_recipe(tmp_path / "streamed", teacher=True, **source)
    with pytest.raises(ModelError, match="predicts 5 classes and the student 4"):
        check_models(streamed, "student")
    # A teacher of distill's own architectures, named by its file with classes of another count.
    own = tiny_recipe(tmp_path / "own", teacher=True, **{"teacher.checkpoint": str(tmp_path / "t.safetensors"),
                                                        "teacher.class_names": "[a, b, c, d, e, f]"})
    with pytest.raises(ModelError, match=r"predicts 6 classes \(teacher.class_names\) and the student 4"):
        check_models(own, "student")
    mapped = tiny_recipe(tmp_path / "mapped", teacher=True, **source, **{"teacher.class_map": "{0: 0, 1: 1, 2: 2, 3: 3, 4: 3}"})
    assert load_teacher(mapped, 4)(_batch(mapped)).shape[1] == 4


def test_a_half_precision_upload_and_a_hub_folder_created_with_imagenet_weights_load_offline(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    smp = pytest.importorskip("segmentation_models_pytorch")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    names = ["background", "circle_stripes", "square_dots", "triangle_solid"]
    _tiny_segformer(tmp_path / "half", names, dtype=torch.float16)  # config.json: dtype float16
    recipe = tiny_recipe(tmp_path / "a", teacher=True, **{"teacher.source": "transformers",
                                                           "teacher.path": str(tmp_path / "half")})
    logits = load_teacher(recipe, 4)(_batch(recipe))  # float16 weights met float32 images
    assert logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())
    # save_pretrained of a model created with ImageNet weights records them in its config.
    smp.create_model("FPN", encoder_name="tu-mobilenetv3_small_050", encoder_weights=None,
                     classes=4).save_pretrained(tmp_path / "hub")
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    (tmp_path / "hub" / "config.json").write_text(json.dumps({**config, "encoder_weights": "imagenet"}))
    recipe = tiny_recipe(tmp_path / "b", teacher=True, **{"teacher.source": "smp_hub", "teacher.path": str(tmp_path / "hub")})
    assert load_teacher(recipe, 4)(_batch(recipe)).shape[1] == 4
