"""``distill export RECIPE [format=onnx,safetensors]``: the student alone, checked for parity.

Writes to ``<output_dir>/export/``:

- an smp student in smp's own hub format: ``config.json`` + ``model.safetensors`` (+ its
  ``README.md`` model card), so ``smp.from_pretrained(export_dir)`` rebuilds it and
  ``push_to_hub`` publishes it; a ``factory`` student as ``student.safetensors``. Either way the
  state dict alone: no teacher, optimizer or wrapper prefixes;
- ``distill.json``: what using the model elsewhere needs beyond the weights (classes and their
  names, palette, normalization, resolution, the files, versions, where it came from);
- ``student.onnx``: one self-contained file, input ``image`` float32 [N, 3, H, W] with dynamic
  N, H and W, output ``logits`` [N, C, H, W]. The pad to the encoder's output stride (bottom/right,
  replicated edge) and the crop back are part of the graph, exactly as
  :func:`distill.models.forward_padded` does at evaluation, so any H and W work (CamVid 360x480).
  With ``export.fixed_size`` only N is dynamic and H, W are ``data.resize``'s (``distill.json``:
  ``onnx.fixed_size``): the paddings are then constants onnxruntime folds into the convolutions;
- ``student_int8.onnx`` (format ``onnx_int8``): the same graph statically quantized to INT8 and
  calibrated on training images (:mod:`distill.export.quantize`), same input and output;
- ``parity.json``: onnxruntime and the reloaded safetensors vs the eager student on real images
  of the recipe's val split (max abs logit difference, argmax agreement); with INT8, both ONNX
  students' mIoU on the whole val split, their argmax agreement and the operators left in float.

The ONNX graph comes from the TorchScript-based exporter (``dynamo=False``): it writes one file
and took under a second here where the ``torch.export``-based one took about 30 s for the same
graph (with the same onnxruntime parity, 1e-7..1e-5). If it fails, the ``torch.export``-based
exporter is tried with ``external_data=False``; ``distill.json`` says which one was used. A
graph for one size (``export.fixed_size``) tries ``torch.export`` first: it reads the fixed height
and width as numbers, where the TorchScript tracer keeps every size it reads as graph arithmetic.

Every file is written into a staging folder first and renamed into ``export/`` only after the
parity check passed, so a failed export leaves the previous export (or nothing), never half files.
"""

# The export's public names. They load on first use: `distill predict` imports
# distill.export.predict, which must run where torch is not installed, and importing it runs this
# file first.
from __future__ import annotations

from distill._lazy import lazy_attributes

_PUBLIC = {
    "ExportError": "distill.export.student",
    "PaddedSegmenter": "distill.export.student",
    "export_config": "distill.export.student",
    "export_onnx": "distill.export.student",
    "export_student": "distill.export.student",
    "json_text": "distill.export.student",
    "load_exported": "distill.export.student",
    "CONFIG_NAME": "distill.export.predict",
    "PredictError": "distill.export.predict",
    "load_export_config": "distill.export.predict",
}
__all__ = list(_PUBLIC)

__getattr__ = lazy_attributes("distill.export", _PUBLIC)
