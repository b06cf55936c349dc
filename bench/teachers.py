"""Benchmark: every teacher source's forward and cache-write time per image, side by side (CPU).

For each ``teacher.source`` a randomly initialised teacher of a realistic size is built and saved
the way a user receives it (weights are not downloadable here; speed does not depend on them):

- ``smp``: DeepLabV3+ ResNet-50 (the CamVid recipe's teacher), weights in a safetensors file;
- ``smp_hub``: the same network as an smp ``save_pretrained`` folder;
- ``onnx``: the same network exported to ONNX, run by onnxruntime: against ``smp``, ONNX Runtime
  against eager PyTorch on one network;
- ``torchvision``: ``deeplabv3_resnet50`` (``weights=None``), a state dict;
- ``transformers``: a SegFormer with MiT-B2's widths and depths, a ``save_pretrained`` folder
  with its image processor.

Measured, per source: the teacher's forward on a batch through :func:`distill.teacher.load_teacher`
(its normalization, padding and output resizing included), median of ``--repeats`` rounds in a
fresh random order each round (no source always follows another), as ms per image; and
``distill cache`` (:func:`distill.cache.write_cache`) over ``--images`` synthetic images at the
same size, once per source, as ms per image (forward, compression to top-k and the store's
writes). Every source has 11 classes at ``--size``; the logits' shape is recorded (SegFormer's
come at 1/4 of the input, resized by the loss like any teacher's).

Usage: ``python bench/teachers.py [--size 240 320] [--images 16] [--repeats 5]``; about 3 minutes
on 2 cores. Results: ``bench/results/teachers.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from benchlib import markdown_table, save_json  # noqa: E402

CLASSES = 11


def build_teachers(folder: Path, size: tuple[int, int], smoke: bool) -> dict[str, dict[str, Any]]:
    """Each source's teacher section, with the files it points to written under ``folder``."""
    import distill  # noqa: F401  (first: the torchvision compatibility step)
    import segmentation_models_pytorch as smp
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    encoder = "resnet18" if smoke else "resnet50"
    model = smp.create_model("DeepLabV3Plus", encoder_name=encoder, encoder_weights=None, classes=CLASSES).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "smp.safetensors"))
    model.save_pretrained(folder / "smp_hub")
    sample = torch.randn(1, 3, -(-size[0] // 32) * 32, -(-size[1] // 32) * 32)
    torch.onnx.export(model, (sample,), str(folder / "teacher.onnx"), input_names=["image"],
                      output_names=["logits"], opset_version=18, dynamo=False,
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}})
    builder = "fcn_resnet50" if smoke else "deeplabv3_resnet50"
    torchvision_model = torchvision.models.get_model(builder, weights=None, weights_backbone=None,
                                                     num_classes=CLASSES, aux_loss=False)
    torch.save(torchvision_model.state_dict(), folder / "torchvision.pt")

    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    from distill.data.synthetic import SyntheticShapes

    names = SyntheticShapes.class_names(CLASSES)
    widths, depths = ([16, 32, 40, 64], [1, 1, 1, 1]) if smoke else ([64, 128, 320, 512], [3, 4, 6, 3])
    config = SegformerConfig(num_labels=CLASSES, hidden_sizes=widths, depths=depths,
                             num_attention_heads=[1, 2, 5, 8], decoder_hidden_size=768 if not smoke else 64,
                             id2label=dict(enumerate(names)), label2id={n: k for k, n in enumerate(names)})
    SegformerForSemanticSegmentation(config).eval().save_pretrained(folder / "segformer")
    SegformerImageProcessor().save_pretrained(folder / "segformer")
    return {
        "smp": {"network": f"DeepLabV3+ {encoder}", "teacher": {
            "arch": "DeepLabV3Plus", "encoder": encoder, "checkpoint": str(folder / "smp.safetensors")}},
        "smp_hub": {"network": f"DeepLabV3+ {encoder}", "teacher": {
            "source": "smp_hub", "path": str(folder / "smp_hub")}},
        "onnx": {"network": f"DeepLabV3+ {encoder} (onnxruntime)", "teacher": {
            "source": "onnx", "path": str(folder / "teacher.onnx")}},
        "torchvision": {"network": builder, "teacher": {
            "source": "torchvision", "arch": builder, "checkpoint": str(folder / "torchvision.pt")}},
        "transformers": {"network": f"SegFormer, widths {widths}", "teacher": {
            "source": "transformers", "path": str(folder / "segformer")}},
    }


def recipe_for(source: dict[str, Any], folder: Path, name: str, size: tuple[int, int], images: int) -> Any:
    from distill.config import recipe_from_dict

    return recipe_from_dict({
        "output_dir": str(folder / f"run_{name}"),
        "data": {"dataset": "synthetic", "synthetic": {"num_train": images, "num_val": 2, "size": list(size),
                                                       "num_classes": CLASSES, "seed": 0},
                 "resize": list(size), "crop_size": list(size), "batch_size": 8, "num_workers": 0},
        "teacher": {**source["teacher"], "mode": "cache"},
        "student": {"arch": "DeepLabV3Plus", "encoder": "tu-mobilenetv3_large_100"},
        "cache": {"splits": ["train"], "batch_size": 8},
    })


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(240, 320), metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=16, help="images cached per source")
    parser.add_argument("--batch", type=int, default=4, help="images per timed forward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="small networks and sizes (the test)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "teachers.json")
    args = parser.parse_args(argv)
    size = tuple(args.size)

    import torch

    from distill.cache import write_cache
    from distill.data import build_dataset, collate_batch
    from distill.teacher import load_teacher

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sources = build_teachers(folder, size, args.smoke)
        recipes = {name: recipe_for(source, folder, name, size, args.images) for name, source in sources.items()}
        first = next(iter(recipes.values()))
        dataset = build_dataset(first.data, "train", train=False)
        batch = collate_batch([dataset[i] for i in range(args.batch)])
        teachers = {name: load_teacher(recipe, CLASSES) for name, recipe in recipes.items()}
        times: dict[str, list[float]] = {name: [] for name in teachers}
        shapes: dict[str, list[int]] = {}
        shuffler = random.Random(0)
        for round_index in range(args.repeats + 1):  # round 0 warms every source up
            order = list(teachers)
            shuffler.shuffle(order)
            for name in order:
                start = time.perf_counter()
                logits = teachers[name](batch)
                seconds = time.perf_counter() - start
                shapes[name] = list(logits.shape)
                if round_index:
                    times[name].append(seconds)
            print(f"round {round_index}/{args.repeats}: " + ", ".join(
                f"{n} {1000 * times[n][-1] / args.batch:.0f} ms/img" for n in teachers if times[n]), flush=True)
        del teachers
        cache_ms = {}
        for name, recipe in recipes.items():
            start = time.perf_counter()
            write_cache(recipe)
            cache_ms[name] = 1000 * (time.perf_counter() - start) / args.images
            print(f"cache {name}: {cache_ms[name]:.0f} ms/img", flush=True)
    forward_ms = {name: 1000 * statistics.median(v) / args.batch for name, v in times.items()}
    rows = [{"source": name, "network": sources[name]["network"], "forward_ms_per_image": forward_ms[name],
             "cache_write_ms_per_image": cache_ms[name], "logits_shape": shapes[name]} for name in sources]
    onnx_vs_torch = forward_ms["onnx"] / forward_ms["smp"]
    result = {
        "size": list(size), "classes": CLASSES, "batch": args.batch, "images_cached": args.images,
        "repeats": args.repeats, "threads": torch.get_num_threads(), "smoke": args.smoke,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, no GPU",
        "rows": rows, "onnx_over_torch_forward": onnx_vs_torch,
        "onnx_over_torch_cache": cache_ms["onnx"] / cache_ms["smp"],
    }
    print(markdown_table(["source", "network", "forward, ms/img", "cache write, ms/img"],
                         [[r["source"], r["network"], f"{r['forward_ms_per_image']:.0f}",
                           f"{r['cache_write_ms_per_image']:.0f}"] for r in rows]))
    verdict = "faster: cache through the ONNX file" if onnx_vs_torch < 1 else "not faster than eager PyTorch"
    print(f"onnxruntime / eager PyTorch, same network: forward {onnx_vs_torch:.2f}x, cache "
          f"{result['onnx_over_torch_cache']:.2f}x ({verdict})")
    save_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
