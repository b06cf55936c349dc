"""The teacher logit cache: round trip, geometry replay, fingerprint, resume, 2 processes, top-k."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import distill.cache.writer as cache_module
from distill.cache import store as ops
from distill.cache import CacheError, CachedTeacher, load_cached_teacher, open_store, write_cache
from distill.data import build_dataset, collate_batch
from distill.teacher import load_teacher
from helpers import tiny_recipe

LAUNCH = [
    str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    "--main_process_port", "0",
]


def conv1x1(num_classes: int, gain: float = 3.0) -> torch.nn.Module:
    """A spatially equivariant, pointwise teacher (factory ``test_cache:conv1x1``)."""
    return _Pointwise(num_classes, gain)


class _Pointwise(torch.nn.Module):
    def __init__(self, num_classes: int, gain: float) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, num_classes, 1)
        self.gain = gain

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images) * self.gain


class _SlowPointwise(_Pointwise):
    """Sleeps in every forward, eval included, so a test can kill ``distill cache`` mid-write.

    With ``SLOW_TEACHER_CALLS`` set, each forward appends its batch size to that file: a rerun
    shows how many batches it recomputed.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        time.sleep(0.15)
        if os.environ.get("SLOW_TEACHER_CALLS"):
            with open(os.environ["SLOW_TEACHER_CALLS"], "a") as handle:
                handle.write(f"{images.shape[0]}\n")
        return super().forward(images)


def slow_conv1x1(num_classes: int, gain: float = 3.0) -> torch.nn.Module:
    return _SlowPointwise(num_classes, gain)


class _NaNOnOneRank(_Pointwise):
    """NaN logits from its second batch on, on process ``rank`` only: one rank failing mid-write."""

    def __init__(self, num_classes: int, rank: int) -> None:
        super().__init__(num_classes, 3.0)
        self.rank, self.calls = rank, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = super().forward(images)
        if os.environ.get("RANK", "0") == str(self.rank) and self.calls >= 2:
            return logits * float("nan")
        return logits


def nan_on_one_rank(num_classes: int, rank: int = 1) -> torch.nn.Module:
    return _NaNOnOneRank(num_classes, rank)


def save_teacher(path: Path, num_classes: int = 4, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_file(conv1x1(num_classes).state_dict(), str(path))
    return path


def recipe_for(tmp_path: Path, checkpoint: Path | None = None, **overrides):
    """A tiny synthetic recipe whose teacher is the saved 1x1 convolution."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint or tmp_path / "teacher.safetensors"
    if not checkpoint.exists():
        save_teacher(checkpoint, int(overrides.get("data.synthetic.num_classes", 4)))
    settings = {
        "data.resize": "[32,32]", "teacher.factory": "test_cache:conv1x1",
        "teacher.factory_kwargs": "{}", "teacher.checkpoint": str(checkpoint),
        "cache.stride": 1, "cache.batch_size": 5, "data.crop_size": "[40,24]",
    }
    settings.update(overrides)
    return tiny_recipe(tmp_path / "run", teacher=True, **settings)


def store_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def eval_logits(recipe, indices) -> torch.Tensor:
    dataset = build_dataset(recipe.data, recipe.data.train_split, train=False)
    return load_teacher(recipe, dataset.info.num_classes)(collate_batch([dataset[i] for i in indices]))


def train_batch(recipe, count: int = 12, seed: int = 3) -> dict:
    dataset = build_dataset(recipe.data, recipe.data.train_split, train=True, seed=seed)
    return collate_batch([dataset[i] for i in range(count)], recipe.data.ignore_index)


# ------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("layout,dtype", [("topk", "fp16"), ("dense", "fp16"), ("topk", "int8"),
                                          ("dense", "int8")])
def test_round_trip_equals_teacher_within_dtype_precision(tmp_path, layout, dtype):
    recipe = recipe_for(tmp_path, **{"cache.layout": layout, "cache.dtype": dtype, "cache.topk": 4})
    folder = write_cache(recipe)
    assert (folder / "manifest.json").is_file() and folder == tmp_path / "run" / "cache"
    store = open_store(recipe)
    indices = [0, 7, 23]
    expected, rebuilt = eval_logits(recipe, indices), store.logits(indices)
    assert rebuilt.shape == expected.shape == (3, 4, 32, 32) and rebuilt.dtype == torch.float32
    if dtype == "fp16":
        torch.testing.assert_close(rebuilt, expected, rtol=1e-3, atol=2e-3)
    else:  # half a quantisation step of each pixel's [min, max] range
        span = expected.amax(1, keepdim=True) - expected.amin(1, keepdim=True)
        assert bool(((rebuilt - expected).abs() <= span / 255 * 0.51 + 2e-3).all())
    if layout == "topk":
        assert json.loads(store.folder.joinpath("train", "index.json").read_text())[7] == \
            "synthetic/train/000007"


def test_stride_stores_average_pooled_maps(tmp_path):
    recipe = recipe_for(tmp_path, **{"cache.stride": 4, "cache.layout": "dense"})
    write_cache(recipe)
    store = open_store(recipe)
    assert store.size == (8, 8)
    pooled = F.avg_pool2d(eval_logits(recipe, [1, 2]), 4)
    torch.testing.assert_close(store.logits([1, 2]), pooled, rtol=1e-3, atol=2e-3)


def test_more_than_256_classes_use_wide_indices():
    logits = torch.randn(2, 300, 3, 5) * 4
    assert ops.index_dtype(300) == np.uint16
    specs = ops.array_specs("topk", "fp16", 2, 300, 300, (3, 5))
    assert specs["indices"][1] == np.uint16
    packed = ops.compress(logits, "topk", "fp16", 300, 2.0)
    on_disk = packed["indices"].numpy().astype(np.uint16)
    packed["indices"] = torch.from_numpy(on_disk.astype(np.int32))
    torch.testing.assert_close(ops.rebuild(packed, "topk", 300), logits, rtol=1e-3, atol=4e-3)


# ------------------------------------------------------------------------------- geometry
def reference_replay(maps: torch.Tensor, geometry: dict, image_size: tuple[int, int]) -> torch.Tensor:
    """Per sample, the data module's recipe: resize to the scaled frame, crop (padding), flip."""
    out = torch.full((maps.shape[0], maps.shape[1], *image_size), float("nan"))
    for row in range(maps.shape[0]):
        scaled = tuple(geometry["scaled_size"][row].tolist())
        top, left, height, width = geometry["crop_box"][row].tolist()
        resized = F.interpolate(maps[row : row + 1], scaled, mode="bilinear", align_corners=False)
        crop = resized[0, :, top : top + height, left : left + width]
        canvas = torch.full((maps.shape[1], height, width), float("nan"))
        canvas[:, : crop.shape[1], : crop.shape[2]] = crop
        if geometry["flip"][row]:
            canvas = canvas.flip(-1)
        out[row, :, :height, :width] = canvas
    return out


@pytest.mark.parametrize("stored", [(32, 32), (8, 8), (11, 6)])
def test_replay_matches_resize_crop_flip_reference(tmp_path, stored):
    recipe = recipe_for(tmp_path, **{"data.scale_range": "[0.5,1.7]"})
    batch = train_batch(recipe, count=16)
    assert batch["geometry"]["flip"].any() and not batch["geometry"]["flip"].all()
    maps = torch.randn(16, 3, *stored)
    got = ops.replay(maps, batch["geometry"], tuple(batch["image"].shape[-2:]))
    want = reference_replay(maps, batch["geometry"], tuple(batch["image"].shape[-2:]))
    inside = ~want.isnan()
    assert inside.float().mean() > 0.5 and bool(got.isfinite().all())
    torch.testing.assert_close(got[inside], want[inside], rtol=1e-4, atol=1e-4)


def replay_errors(recipe, batch) -> tuple[torch.Tensor, float]:
    """|streamed - cached| on valid pixels, and the mean error of a replay with flips toggled."""
    streamed = load_teacher(recipe, 4)(batch)
    cached = CachedTeacher(open_store(recipe))
    valid = (batch["mask"] != recipe.data.ignore_index).unsqueeze(1).expand_as(streamed)
    wrong = cached({**batch, "geometry": {**batch["geometry"], "flip": ~batch["geometry"]["flip"]}})
    return (streamed - cached(batch)).abs()[valid], float((streamed - wrong).abs()[valid].mean())


def test_replay_equals_teacher_on_augmented_view_stride_1(tmp_path):
    # Upscaling only: PIL's bilinear resize of the image then matches the logits' bilinear
    # resampling up to the image's uint8 rounding (the teacher is affine per pixel).
    recipe = recipe_for(tmp_path, **{"data.scale_range": "[1.0,1.6]", "cache.layout": "dense"})
    write_cache(recipe)
    batch = train_batch(recipe)
    assert (batch["mask"] == 255).any()  # crops past the image: padded, ignored
    error, wrong = replay_errors(recipe, batch)
    assert float(error.max()) < 0.06 and wrong > 0.5
    # Downscaling too: PIL antialiases, the replay does not; only edges differ.
    recipe = recipe_for(tmp_path / "down", **{"data.scale_range": "[0.5,1.6]", "cache.layout": "dense"})
    write_cache(recipe)
    error, _ = replay_errors(recipe, train_batch(recipe))
    assert float(error.mean()) < 0.03


@pytest.mark.parametrize("stride", [2, 4])
def test_replay_equals_teacher_on_augmented_view_strided(tmp_path, stride):
    # A smooth base frame (32x32 upscaled to 96x96) so that 1/stride maps keep its content.
    recipe = recipe_for(tmp_path, **{"data.resize": "[96,96]", "data.crop_size": "[80,64]",
                                     "data.scale_range": "[0.6,1.4]", "cache.stride": stride})
    write_cache(recipe)
    error, wrong = replay_errors(recipe, train_batch(recipe))
    assert float(error.mean()) < 0.1 * stride and float(error.mean()) < 0.2 * wrong


def test_teacher_resize_stores_maps_of_the_teachers_frame_and_replays_them(tmp_path):
    # The teacher sees each image at 192x192 from its file; the student's frame is 96x96. The
    # maps (192/8 = 24 px) span the whole image, so the replay through the student's geometry
    # matches the teacher run on the student's view, as a 96x96 store at stride 4 does.
    recipe = recipe_for(tmp_path, **{"data.resize": "[96,96]", "data.crop_size": "[80,64]",
                                     "data.scale_range": "[0.6,1.4]", "cache.stride": 8,
                                     "cache.teacher_resize": "[192,192]"})
    folder = write_cache(recipe)
    manifest = json.loads((folder / "manifest.json").read_text())["splits"]["train"]
    assert manifest["info"]["stored_size"] == [24, 24]
    assert manifest["fingerprint"]["teacher_frame"] == [192, 192]
    assert open_store(recipe).logits([0]).shape[-2:] == (24, 24)
    error, wrong = replay_errors(recipe, train_batch(recipe))
    assert float(error.mean()) < 0.4 and float(error.mean()) < 0.2 * wrong
    # Another teacher frame is another store: refused, naming the field.
    other = recipe_for(tmp_path, **{"data.resize": "[96,96]", "cache.stride": 8, "cache.teacher_resize": "[96,96]"})
    with pytest.raises(CacheError, match="teacher_frame"):
        open_store(other)


# ------------------------------------------------------------------------------- fingerprint
@pytest.fixture
def written(tmp_path):
    recipe = recipe_for(tmp_path, **{"cache.topk": 2, "cache.stride": 2})
    write_cache(recipe)
    return tmp_path, recipe


@pytest.mark.parametrize("change,field,values", [
    ("teacher", "teacher_checkpoint_sha256", None),
    ("cache.topk=3", "topk", ("2", "3")),
    ("cache.stride=4", "stride", ("2", "4")),
    ("data.max_samples=20", "split_files_sha256", None),
    ("cache.layout=dense", "layout", ("'topk'", "'dense'")),
])
def test_stale_store_is_refused_naming_the_field(written, change, field, values):
    tmp_path, _ = written
    overrides = {"cache.topk": 2, "cache.stride": 2}
    checkpoint = None
    if change == "teacher":
        checkpoint = save_teacher(tmp_path / "other.safetensors", seed=1)
    else:
        key, value = change.split("=")
        overrides[key] = value
    recipe = recipe_for(tmp_path, checkpoint, **overrides)
    with pytest.raises(CacheError, match=field) as caught:
        open_store(recipe)
    if values:
        assert f"{field}: store {values[0]} vs recipe {values[1]}" in str(caught.value)
    # Writing with the new recipe rewrites the split; then it is served.
    write_cache(recipe)
    assert open_store(recipe).fingerprint[field] is not None


def test_teacher_keys_marked_as_changing_its_output_make_a_store_stale(written, tmp_path):
    # The store records the teacher keys whose schema metadata says they change its outputs
    # (distill.config.changes_output): another value of one is refused, naming it; a key that
    # changes how the run goes (mode, compile) or only the student's training reuses the store.
    base = {"cache.topk": 2, "cache.stride": 2}
    with pytest.raises(CacheError, match="teacher_model"):
        open_store(recipe_for(tmp_path, **base, **{"teacher.tta_flip": "true"}))
    with pytest.raises(CacheError, match="teacher_model"):
        open_store(recipe_for(tmp_path, **base, **{"teacher.input_size": "[32,32]"}))
    for key, value in [("teacher.compile", "true"), ("loss.kd_weight", "0.5")]:
        assert open_store(recipe_for(tmp_path, **base, **{key: value})).num_samples > 0


def test_uncached_split_missing_resize_and_no_store(written, tmp_path):
    _, recipe = written
    with pytest.raises(CacheError, match=r"split 'val' is not in the logit cache .*cached splits: train"):
        open_store(recipe, "val")
    with pytest.raises(CacheError, match="data.resize"):
        write_cache(recipe_for(tmp_path / "b", **{"data.resize": "null"}))
    with pytest.raises(CacheError, match="no logit cache at .*distill cache"):
        open_store(recipe_for(tmp_path / "c"))
    with pytest.raises(CacheError, match="holds 4 classes, the dataset has 5"):
        load_cached_teacher(recipe, 5)


def test_other_temperature_is_served_with_a_warning(written, tmp_path, caplog):
    recipe = recipe_for(tmp_path, **{"cache.topk": 2, "cache.stride": 2, "loss.temperature": 1.0})
    with caplog.at_level("WARNING", logger="distill.cache"):
        assert open_store(recipe).info["rest_temperature"] == 2.0
    assert "fitted at temperature 2.0, the recipe distils at 1.0" in caplog.text


def test_truncated_array_is_detected_and_rewritten(written):
    _, recipe = written
    values = open_store(recipe).folder / "train" / "values.npy"
    with values.open("r+b") as handle:
        handle.truncate(values.stat().st_size - 100)
    with pytest.raises(CacheError, match=r"values.npy' is truncated or damaged: \d+ bytes on disk, expected"):
        open_store(recipe)
    write_cache(recipe)
    open_store(recipe)


# ------------------------------------------------------------------------------- resume
def killed_at_the_third_batch(recipe, monkeypatch) -> None:
    """``write_cache(recipe)`` stopped as it compresses its third batch (two are stored)."""
    real, calls = ops.compress, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "compress", failing)
    with pytest.raises(KeyboardInterrupt):
        write_cache(recipe)
    monkeypatch.setattr(ops, "compress", real)


def test_a_topk_split_resumed_or_kept_at_another_temperature_keeps_its_fit(tmp_path, monkeypatch):
    # Plain logits stay valid across temperatures, but a top-k tail is fitted at one: a store
    # begun at T=2, interrupted, then finished under T=4 (with a second split, new) must hold
    # T=2 tails throughout and say so, not a mix recorded as T=4.
    tail = {"cache.layout": "topk", "cache.topk": 2, "cache.splits": "[train]"}
    recipe = recipe_for(tmp_path / "a", **tail, **{"loss.temperature": 2.0})
    killed_at_the_third_batch(recipe, monkeypatch)
    hotter = recipe_for(tmp_path / "a", **{**tail, "cache.splits": "[train, val]"}, **{"loss.temperature": 4.0})
    write_cache(hotter)
    straight = recipe_for(tmp_path / "b", **tail, **{"loss.temperature": 2.0})
    write_cache(straight)
    train_files = {k: v for k, v in store_files(cache_module.cache_dir(recipe)).items() if k.startswith("train")}
    straight_files = {k: v for k, v in store_files(cache_module.cache_dir(straight)).items() if k.startswith("train")}
    assert train_files == straight_files  # every row fitted at T=2
    manifest = json.loads((cache_module.cache_dir(recipe) / "manifest.json").read_text())
    assert {split: entry["info"]["rest_temperature"] for split, entry in manifest["splits"].items()} == {
        "train": 2.0, "val": 4.0}


def test_interrupted_write_is_detected_and_resumed(tmp_path, monkeypatch):
    recipe = recipe_for(tmp_path / "a", **{"cache.splits": "[train, val]"})
    real, calls = ops.compress, []
    killed_at_the_third_batch(recipe, monkeypatch)
    with pytest.raises(CacheError, match=r"incomplete \(14 of 24 samples missing\).*Rerun `distill cache"):
        open_store(recipe)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "compress", counting)
    write_cache(recipe)
    assert len(calls) == 3 + 3  # train: the 3 missing batches of 5; val: all 3 batches of 13
    fresh = recipe_for(tmp_path / "b", **{"cache.splits": "[train, val]"})
    write_cache(fresh)
    assert store_files(cache_module.cache_dir(recipe)) == store_files(cache_module.cache_dir(fresh))
    assert open_store(recipe, "val").num_samples == 13
    calls.clear()
    before = store_files(cache_module.cache_dir(recipe))

    def not_needed(*args, **kwargs):
        raise AssertionError("the teacher was loaded for a store that is up to date")

    monkeypatch.setattr("distill.teacher.load_teacher", not_needed)
    write_cache(recipe)  # complete: nothing rewritten, and no teacher loaded to find that out
    assert not calls and store_files(cache_module.cache_dir(recipe)) == before


@pytest.mark.slow
def test_sigkill_mid_write_then_rerun_resumes_and_equals_an_uninterrupted_store(tmp_path):
    from distill.config import save_resolved_recipe

    # 12 batches of 2, each forward sleeping 0.15 s: about 2 s of writing to kill into.
    settings = {"teacher.factory": "test_cache:slow_conv1x1", "cache.batch_size": 2}
    recipe = recipe_for(tmp_path / "killed", tmp_path / "teacher.safetensors", **settings)
    path = save_resolved_recipe(recipe, tmp_path / "killed")
    flags_file = cache_module.cache_dir(recipe) / "train" / "written.npy"
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLOW_TEACHER_CALLS": str(calls)}
    command = [sys.executable, "-m", "distill", "cache", str(path)]

    def flags() -> np.ndarray:
        try:
            return np.load(flags_file)
        except (OSError, ValueError, EOFError):  # not created yet, or its header not yet written
            return np.zeros(24, np.uint8)

    with (tmp_path / "killed.log").open("w") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log,
                                   start_new_session=True)
        deadline = time.monotonic() + 60
        while flags().sum() < 8 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):  # ended early: the assert below says why
            os.killpg(process.pid, signal.SIGKILL)  # the whole group, as a scheduler would
        process.wait()
    at_kill = flags()
    assert 8 <= at_kill.sum() < 24, (tmp_path / "killed.log").read_text()[-3000:]
    assert not list(cache_module.cache_dir(recipe).rglob("*.tmp")), "a temporary file was left"
    missing = 24 - int(at_kill.sum())
    with pytest.raises(CacheError, match=rf"incomplete \({missing} of 24 samples missing\)"):
        open_store(recipe)

    calls.unlink()
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"cache train: resumed, {int(at_kill.sum())}/24 samples stored" in rerun.stderr
    # Only the batches not yet flagged were computed again (a kill between a batch's arrays and
    # its flags redoes that batch; its rows are rewritten with the same bytes).
    unfinished = sum(1 for start in range(0, 24, 2) if not at_kill[start : start + 2].all())
    assert calls.read_text().split() == ["2"] * unfinished
    open_store(recipe)

    # Uninterrupted, by the same command: in this process (other thread count) the convolution
    # sums in another order and some fp16 values differ by one unit in the last place.
    fresh = recipe_for(tmp_path / "straight", tmp_path / "teacher.safetensors", **settings)
    straight = [sys.executable, "-m", "distill", "cache",
                str(save_resolved_recipe(fresh, tmp_path / "straight"))]
    result = subprocess.run(straight, cwd=tmp_path, env={**env, "SLOW_TEACHER_CALLS": ""},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert store_files(cache_module.cache_dir(recipe)) == store_files(cache_module.cache_dir(fresh))


# ------------------------------------------------------------------------------- processes
SCRIPT = """
import sys
import distill
from distill.config import load_recipe
from distill.cache import write_cache
from distill.launch import end_launched_process
write_cache(load_recipe(sys.argv[1]))
end_launched_process()  # as `distill` does: the interpreter's teardown can race gloo's threads
"""


@pytest.mark.slow
def test_two_process_store_equals_one_process_store(tmp_path):
    from distill.config import save_resolved_recipe

    stores = {}
    for name, command in (("one", [sys.executable]), ("two", LAUNCH)):
        recipe = recipe_for(tmp_path / name, tmp_path / "teacher.safetensors",
                            **{"cache.splits": "[train, val]", "cache.stride": 2})
        path = save_resolved_recipe(recipe, tmp_path / name)
        (tmp_path / "write.py").write_text(SCRIPT)
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command + [str(tmp_path / "write.py"), str(path)], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        processes = 2 if name == "two" else 1
        assert f"cache train: new, 0/24 samples stored, {processes} process(es)" in result.stderr
        stores[name] = store_files(cache_module.cache_dir(recipe))
        open_store(recipe, "val")
    assert stores["one"].keys() == stores["two"].keys() and len(stores["one"]) == 11
    assert stores["one"] == stores["two"]


@pytest.mark.slow
def test_one_process_failing_stops_every_process_with_its_error(tmp_path):
    from distill.config import save_resolved_recipe

    # Process 1 gets non-finite logits at its second batch; process 0 has more batches to write.
    recipe = recipe_for(tmp_path, **{"teacher.factory": "test_cache:nan_on_one_rank",
                                     "cache.batch_size": 2})
    path = save_resolved_recipe(recipe, tmp_path)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    # A hang fails the test here (TimeoutExpired) instead of hanging the suite.
    result = subprocess.run(LAUNCH + ["-m", "distill", "cache", str(path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    output = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert result.returncode != 0 and time.monotonic() - started < 120, output[-3000:]
    error = ("the teacher produced non-finite logits for a batch of "
             "['synthetic/train/000006', 'synthetic/train/000007']")
    # Process 1 prints its own error; process 0 the same error, not gloo's "Connection closed by
    # peer" traceback from a barrier that process 1 never reached.
    assert f"error: {error}" in output, output[-3000:]
    survivor = f"error: process 1 of 2 failed, so this one stopped too: CacheError: {error}"
    assert survivor in output, output[-3000:]
    assert "Connection closed by peer" not in output
    # What was written before the failure stays, flagged: the store is refused until rerun.
    with pytest.raises(CacheError, match=r"incomplete \(\d+ of 24 samples missing\)"):
        open_store(recipe)


# ------------------------------------------------------------------------------- top-k fidelity
def test_topk_rebuild_kl_vs_dense_is_small_and_decreases_with_k(tmp_path):
    classes, temperature = 8, 2.0
    checkpoint = save_teacher(tmp_path / "teacher8.safetensors", classes)
    base = {"data.synthetic.num_classes": classes, "loss.temperature": temperature,
            "cache.stride": 2}
    dense = recipe_for(tmp_path / "dense", checkpoint, **base, **{"cache.layout": "dense"})
    write_cache(dense)
    reference = open_store(dense).logits(range(24))
    kls = []
    for k in (1, 2, 4, 8):
        recipe = recipe_for(tmp_path / f"k{k}", checkpoint, **base, **{"cache.topk": k})
        write_cache(recipe)
        kls.append(ops.softened_kl(reference, open_store(recipe).logits(range(24)), temperature))
    assert kls == sorted(kls, reverse=True) and kls[0] > kls[1] > kls[2]
    assert kls[2] < 0.05 and kls[3] < 1e-5
    # The non-top-k value keeping the tail's mass at T beats the tail's mean logit.
    packed = ops.compress(reference, "topk", "fp16", 2, temperature)
    mass = ops.softened_kl(reference, ops.rebuild(packed, "topk", classes), temperature)
    packed["rest"] = ops.tail_mean_rest(reference, 2).half()
    assert mass < ops.softened_kl(reference, ops.rebuild(packed, "topk", classes), temperature)


# ------------------------------------------------------------------------------- training
def test_student_distils_from_the_cache(tmp_path, monkeypatch):
    import distill.training as loop

    recipe = recipe_for(tmp_path, **{"train.epochs": 1, "teacher.mode": "cache", "cache.stride": 2})
    write_cache(recipe)
    monkeypatch.setattr(loop, "load_teacher", load_cached_teacher)
    loop.train(recipe, "student")
    records = [json.loads(line) for line in (tmp_path / "run" / "student" / "metrics.jsonl").open()]
    assert all(r["kd"] > 0 for r in records if "kd" in r)


def test_a_store_that_averages_probabilities_depends_on_the_temperature(tmp_path):
    # With test-time augmentation the stored logits are T * log(mean of the views' softmax at T):
    # a store written at T=2 is refused at T=1, naming the temperature, and rewritten by
    # `distill cache`; then it replays the teacher at T=1 (here its views are the identity and
    # its flip, through a 1x1 convolution: the replay at stride 1 matches the streamed teacher).
    views = {"teacher.tta_flip": "true", "cache.layout": "dense", "loss.temperature": 2.0}
    write_cache(recipe_for(tmp_path, **views))
    colder = recipe_for(tmp_path, **{**views, "loss.temperature": 1.0})
    with pytest.raises(CacheError, match="temperature: store 2.0 vs recipe 1.0"):
        open_store(colder)
    write_cache(colder)
    stored, streamed = open_store(colder).logits([0, 1, 2]), eval_logits(colder, [0, 1, 2])
    torch.testing.assert_close(torch.softmax(stored, 1), torch.softmax(streamed, 1), rtol=0, atol=2e-3)
    # Plain logits do not depend on it: one store serves a sweep of temperatures.
    plain = tmp_path / "plain"
    write_cache(recipe_for(plain, **{"cache.layout": "dense", "loss.temperature": 2.0}))
    assert open_store(recipe_for(plain, **{"cache.layout": "dense", "loss.temperature": 4.0})).num_samples > 0


def test_a_wrong_split_name_leaves_a_complete_store_as_it_was(written, tmp_path):
    _, recipe = written
    from distill.run_folder import cache_dir

    store = cache_dir(recipe)
    before = store_files(store)
    assert (store / "manifest.json").is_file()
    wrong = recipe.model_copy(update={"cache": recipe.cache.model_copy(update={"splits": ["train", "nosuch"],
                                                                               "stride": 1})})
    with pytest.raises(ValueError, match="'nosuch'"):
        write_cache(wrong)
    assert store_files(store) == before


def test_a_cache_dir_that_is_not_a_store_is_refused_before_anything_is_deleted(written, tmp_path):
    _, recipe = written
    user_data = tmp_path / "camvid"  # cache.dir mistyped onto a dataset root
    (user_data / "train").mkdir(parents=True)
    (user_data / "train" / "0001TP_006690.png").write_bytes(b"a frame")
    wrong = recipe.model_copy(update={"cache": recipe.cache.model_copy(update={"dir": user_data})})
    with pytest.raises(CacheError, match=r"train' holds '0001TP_006690.png', which a logit store never writes: "
                                         r"cache.dir '.*camvid' is not a logit store"):
        write_cache(wrong)
    assert (user_data / "train" / "0001TP_006690.png").read_bytes() == b"a frame"
    assert sorted(p.name for p in user_data.rglob("*")) == ["0001TP_006690.png", "train"]


def test_a_store_finer_than_the_teachers_map_holds_its_bilinear_upsampling(tmp_path):
    # An 8x8 teacher map stored at 32x32 (a 1/4-resolution teacher, a small input_size): the
    # replayed targets are what the streamed KD distils to, the map resized bilinearly.
    recipe = recipe_for(tmp_path, **{"cache.stride": 1, "cache.layout": "dense", "teacher.input_size": "[8,8]"})
    write_cache(recipe)
    dataset = build_dataset(recipe.data, recipe.data.train_split, train=False)
    batch = collate_batch([dataset[i] for i in range(4)])
    streamed = F.interpolate(eval_logits(recipe, range(4)), size=(32, 32), mode="bilinear", align_corners=False)
    assert eval_logits(recipe, range(1)).shape[-2:] == (8, 8)
    torch.testing.assert_close(CachedTeacher(open_store(recipe))(batch), streamed, atol=2e-2, rtol=0)


def test_a_store_names_every_problem_of_its_inputs_at_once(tmp_path):
    from distill.preflight import InputError

    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{
        "teacher.mode": "cache", "data.resize": "[32,32]", "data.dataset": "folder", "data.class_names": "[a, b, c, d]",
        "data.root": str(tmp_path / "no_data"), "teacher.checkpoint": str(tmp_path / "no_teacher.safetensors")})
    with pytest.raises(InputError, match=r"2 problems with the inputs") as caught:
        write_cache(recipe)
    assert "no_data" in str(caught.value) and "no_teacher.safetensors' does not exist" in str(caught.value)
    assert not (tmp_path / "run").exists()
    # The run folder's own teacher, not trained yet, is named before anything else happens.
    untrained = tiny_recipe(tmp_path / "run", teacher=True, **{"teacher.mode": "cache", "data.resize": "[32,32]"})
    with pytest.raises(Exception, match=r"the teacher has no weights: .*best.safetensors does not exist"):
        write_cache(untrained)
    assert not (tmp_path / "run").exists()


def test_a_store_does_not_ask_for_encoder_weights_its_trained_teacher_replaces(tmp_path):
    # The teacher was trained from a local pretrained file, since moved away: its stage's weights
    # hold every tensor, and the store never reads that file.
    import segmentation_models_pytorch as smp

    teacher = smp.create_model("Unet", encoder_name="resnet18", encoder_weights=None, classes=4)
    (tmp_path / "run" / "teacher").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, tmp_path / "run" / "teacher" / "best.safetensors")
    recipe = tiny_recipe(tmp_path / "run", teacher=True, **{
        "teacher.factory": "null", "teacher.factory_kwargs": "{}", "teacher.arch": "Unet", "teacher.encoder": "resnet18",
        "teacher.encoder_weights": str(tmp_path / "moved_away.safetensors"), "teacher.mode": "cache", "data.resize": "[32,32]"})
    assert (write_cache(recipe) / "manifest.json").is_file()
