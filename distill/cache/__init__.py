"""The teacher's logit cache: compress once, replay through every augmentation, reuse.

``distill cache RECIPE`` (:func:`write_cache`) runs the frozen teacher once over each split in
``cache.splits``, on the *un-augmented* base frame (the eval transform; ``data.resize`` is
required so that every map spans one frame), average-pools its logits to ``1/cache.stride`` and
stores them compressed. While a student trains with ``teacher.mode: cache``,
:class:`CachedTeacher` reads the maps of the batch's samples and replays the batch's recorded
geometry on them (rescale, crop with padding, flip: one bilinear ``grid_sample`` over the batch),
so the targets line up with the augmented view the student sees.

Choices (figures: ``bench/cache.py``):

- Average pooling, not bilinear downsampling: at stride 4 bilinear reads 2 of every 4 rows and
  aliases; the box filter keeps every teacher pixel, and the replay's bilinear upsampling then
  reconstructs a low-pass map. (DeepLabV3+ predicts at stride 4 anyway: the replay error barely
  moves between stride 1 and 4, while the store is 16x smaller.)
- The non-top-k classes share one logit per pixel, ``T * log(mean exp(z / T))`` over them at
  ``loss.temperature``: the only single value that keeps their probability mass, so the top-k
  probabilities come back exact; it minimises KL(teacher || rebuilt) at T, and still beats the
  tails' mean logit at other temperatures (a store is then served with a warning, not refused).
- A store of plain logits serves any ``loss.temperature``. One whose logits average the teacher's
  probabilities at it (``teacher.tta_*`` views, a ``teacher.class_map``) records it, and is
  refused at another (``distill cache`` rewrites it): replayed, it must equal the streamed teacher
  at the loss's temperature. So is ``train.mixed_precision`` (the teacher writes under it).
- Targets come back at the batch images' resolution (not 1/stride): sampling once is as cheap
  as sampling at 1/stride and letting ``kd_loss`` upsample (within 1% of a step), and sharper.
- ``int8``: per pixel an fp16 zero point (``rest``, or the minimum for ``dense``) and scale, and
  unsigned 8-bit codes over [zero, max]; ``fp16`` stores the logits themselves.
- Photometric augmentation (``data.color_jitter``) is not replayed: targets are the teacher's
  view of the original colours, the price of running the teacher once.
- Padding (the crop past the image, labels ``ignore_index``) repeats the edge values: finite,
  and skipped by the KD loss.

Layout of ``cache.dir`` (default ``<output_dir>/cache``)::

    manifest.json             format and layout version; per split its fingerprint, complete flag
    <split>/index.json        sample ids, in dataset order (row i = dataset index i)
    <split>/<array>.npy       one memory-mapped array per name, shaped [num_samples, ...]
    <split>/written.npy       uint8 [num_samples]: 1 once a sample's rows are on disk

Arrays (:func:`distill.cache.store.array_specs`): ``topk`` keeps the k largest logits per pixel
(``values`` fp16, or ``codes`` + ``scale``), their classes (``indices``, uint8; uint16 beyond 256
classes) and ``rest``; ``dense`` keeps every class (fp16 is the reference layout). Readers open
the files read-only with ``mmap`` and copy only a batch's rows, so any number of processes share
one store.

A store serves only the recipe that made it: its fingerprint (teacher weights' sha256, teacher
spec and input normalisation, dataset, root, the split's sample ids, base frame, stride, layout,
top-k, dtype, layout version) must match, else :class:`CacheError` names each differing field
with both values. An interrupted write is resumed by the next ``distill cache`` (missing samples
only) and refused by readers until then.
"""

from distill.cache import store as store_ops  # the store's array operations (bench/cache.py)
from distill.cache.reader import (
    CachedTeacher,
    LogitStore,
    cache_dataset,
    cache_dir,
    expected_fingerprint,
    load_cached_teacher,
    open_store,
)
from distill.cache.store import CacheError
from distill.cache.writer import write_cache

__all__ = ["CacheError", "CachedTeacher", "LogitStore", "cache_dataset", "cache_dir", "expected_fingerprint",
           "load_cached_teacher", "open_store", "store_ops", "write_cache"]
