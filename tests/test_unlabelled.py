"""Images without masks: the labelled fraction, unlabelled sources, mixed batches, the KD pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distill.config import DataConfig, RecipeError, recipe_from_dict
from distill.data import DataError, build_dataset, build_loader
from distill.losses import DistillLoss, ce_loss, kd_loss_reference
from distill.data.unlabelled import MixedBatchSampler
from helpers import tiny_recipe

SYNTH = {"num_train": 12, "num_val": 4, "size": [24, 24], "num_classes": 4}


def data(**values) -> DataConfig:
    return DataConfig(num_workers=0, synthetic=SYNTH, **values)


def test_labelled_fraction_keeps_every_kth_mask_and_the_rest_train_without_masks():
    cfg = data(labelled_fraction=0.25)
    baseline = build_dataset(cfg, "train", train=True)
    assert [baseline.sample_id(i) for i in range(len(baseline))] == [f"synthetic/train/{k:06d}" for k in (0, 4, 8)]
    # Scoring the training split (eval.split: train) scores every mask, not the students' share.
    scored = build_dataset(cfg, "train", train=False)
    assert len(scored) == 12 and all(bool((scored[i]["mask"] != 255).any()) for i in range(12))
    distilled = build_dataset(cfg, "train", train=False, unlabelled=True)
    assert len(distilled) == 12
    flags = [bool(distilled[i]["labelled"]) for i in range(12)]
    assert flags == [True] * 3 + [False] * 9
    assert distilled.sample_id(3) == "unlabelled/synthetic/train/000001"
    item = distilled[3]
    assert bool((item["mask"] == 255).all())  # no label reaches the CE
    assert bool((item["kd_mask"] == 0).all())  # every pixel reaches the KD term
    labelled = distilled[1]
    assert "kd_mask" not in labelled and int((labelled["mask"] != 255).sum()) > 0  # the KD term uses its mask


def test_unlabelled_sources_folder_split_and_synthetic(tmp_path):
    folder = tmp_path / "frames" / "cam1"
    folder.mkdir(parents=True)
    for k in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * k, dtype=np.uint8)).save(folder / f"f{k}.jpg")
    cfg = data(unlabelled=[{"folder": tmp_path / "frames"}, {"split": "test"}, {"synthetic": 5}])
    dataset = build_dataset(cfg, "train", train=False, unlabelled=True)
    ids = [dataset.sample_id(i) for i in range(len(dataset))]
    assert len(ids) == 12 + 3 + 4 + 5 and len(set(ids)) == len(ids)
    assert ids[12] == f"unlabelled/{(folder / 'f0.jpg').resolve().as_posix()}" and ids[15] == "unlabelled/synthetic/test/000000"
    assert ids[-1] == "unlabelled/synthetic/unlabelled/000004"  # a stream of its own
    assert dataset[12]["image"].shape == (3, 20, 30) and not bool(dataset[12]["labelled"])
    with pytest.raises(ValueError, match="exactly one of split, folder, synthetic"):
        data(unlabelled=[{"split": "val", "synthetic": 3}])
    # Validation (and training) images never come back as unlabelled ones.
    with pytest.raises(DataError, match="data.unlabelled split 'val' holds only training or validation images"):
        build_dataset(data(unlabelled=[{"split": "val"}]), "train", train=False, unlabelled=True)
    pooled = data(unlabelled=[{"split": "train+test"}])
    ids = [build_dataset(pooled, "train", train=False, unlabelled=True).sample_id(i) for i in range(12 + 4)]
    assert ids[12:] == [f"unlabelled/synthetic/test/{k:06d}" for k in range(4)]


def test_an_unlabelled_folder_never_brings_back_training_or_validation_images(tmp_path):
    # Footage given as a folder that also holds the dataset's images (its root, say): the
    # validation frames would be distilled on, the scenes validation measures leaking in.
    for split, count in (("train", 4), ("val", 2)):
        for folder in ("images", "masks"):
            (tmp_path / folder / split).mkdir(parents=True)
        for k in range(count):  # the dataset's images are links to files kept elsewhere
            (tmp_path / "store").mkdir(exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 30 * k, np.uint8)).save(tmp_path / "store" / f"{split}{k}.png")
            (tmp_path / "images" / split / f"{k}.png").symlink_to(tmp_path / "store" / f"{split}{k}.png")
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / split / f"{k}.png")
    (tmp_path / "images" / "extra").mkdir()
    for k in range(3):
        Image.fromarray(np.full((8, 8, 3), 99, np.uint8)).save(tmp_path / "images" / "extra" / f"e{k}.png")
    def cfg(folder):
        return DataConfig(dataset="folder", root=tmp_path, class_names=["a", "b"], num_workers=0,
                          unlabelled=[{"folder": folder}])

    dataset = build_dataset(cfg(tmp_path / "images"), "train", train=False, unlabelled=True)
    ids = [dataset.sample_id(k) for k in range(len(dataset))]
    assert len(ids) == 4 + 3 and all("/extra/" in i for i in ids[4:]) and ids[4].startswith("unlabelled//")
    with pytest.raises(DataError, match=r"data.unlabelled folder '.*val' holds only training or validation images \(2\)"):
        build_dataset(cfg(tmp_path / "images" / "val"), "train", train=False, unlabelled=True)


def test_a_training_crop_pads_an_unlabelled_image_outside_the_kd_pixels():
    cfg = data(labelled_fraction=0.5, crop_size=(32, 32), scale_range=(1.0, 1.0))
    item = build_dataset(cfg, "train", train=True, unlabelled=True)[6]  # the first unlabelled, 24x24 in 32x32
    assert not bool(item["labelled"]) and bool((item["mask"] == 255).all())
    assert int((item["kd_mask"] == 0).sum()) == 24 * 24 and int((item["kd_mask"] == 255).sum()) == 32 * 32 - 24 * 24


def test_mixed_batches_hold_the_ratio_take_the_baselines_steps_and_follow_the_epoch():
    class Epoch:
        epoch = 0

    sampler = MixedBatchSampler(list(range(8)), list(range(100, 106)), batch_size=4, ratio=0.5, seed=3,
                                dataset=Epoch)
    assert len(sampler) == 2  # 8 labelled // 4: the steps of plain training on them
    epochs = []
    for epoch in range(3):
        Epoch.epoch = epoch
        epochs.append(list(sampler))
        assert list(sampler) == epochs[-1]  # a pure function of the epoch
    batches = [b for e in epochs for b in e]
    assert all(len(b) == 4 and sum(i < 100 for i in b) == 2 for b in batches)
    labelled = [i for b in batches for i in b if i < 100]
    unlabelled = [i for b in batches for i in b if i >= 100]
    # Each kind: every sample once before any repeats, across epochs.
    assert sorted(labelled[:8]) == list(range(8)) and sorted(unlabelled[:6]) == list(range(100, 106))
    assert sorted(unlabelled[6:12]) == list(range(100, 106))
    Epoch.epoch = 1
    assert list(sampler) == epochs[1] != epochs[0]


@pytest.mark.parametrize("unlabelled", [False, True])
def test_starting_an_epoch_leaves_torchs_global_generator_alone(unlabelled):
    # A resumed process restores the global generator at a checkpoint; an iterator that drew its
    # workers' seed from it would shift every dropout mask after that point.
    recipe = tiny_recipe("unused", teacher=True, **{"data.labelled_fraction": 0.25, "data.synthetic.num_train": 16})
    loader = build_loader(recipe.data, recipe.data.train_split, train=True, unlabelled=unlabelled)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    iter(loader)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_repeated_source_is_drawn_that_many_times_per_pass():
    # 6 masks kept of 12, the other 6 frames once each and 2 generated images 3 times each:
    # 12 unlabelled draws a pass, one per batch of 2, 3 batches an epoch: 4 epochs a pass.
    cfg = data(labelled_fraction=0.5, unlabelled=[{"synthetic": 2, "repeat": 3}], batch_size=2)
    loader = build_loader(cfg, "train", train=True, unlabelled=True)
    ids = []
    for epoch in range(4):
        loader.dataset.set_epoch(epoch)
        ids += [loader.dataset.sample_id(k) for batch in loader.batch_sampler for k in batch[1:]]
    counts = {sample: ids.count(sample) for sample in set(ids)}
    assert len(ids) == 12 and len(counts) == 8 and len(loader.dataset) == 6 + 6 + 2  # stored once each
    assert {s: n for s, n in counts.items() if "unlabelled/synthetic/unlabelled" in s} == {
        "unlabelled/synthetic/unlabelled/000000": 3, "unlabelled/synthetic/unlabelled/000001": 3}
    assert all(n == 1 for s, n in counts.items() if "synthetic/train" in s)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        data(unlabelled=[{"synthetic": 2, "repeat": 0}])
    # Two generated sources: the next images of the stream, not the first ones again.
    two = build_dataset(data(unlabelled=[{"synthetic": 2}, {"synthetic": 3, "repeat": 2}]), "train",
                        train=False, unlabelled=True)
    ids = [two.sample_id(k) for k in range(12, 17)]
    assert ids == [f"unlabelled/synthetic/unlabelled/{k:06d}" for k in range(5)]
    assert not np.array_equal(two[12]["image"].numpy(), two[14]["image"].numpy())
    assert [two.source.repeat(k) for k in range(12, 17)] == [1, 1, 2, 2, 2]


def test_the_unlabelled_share_of_a_batch_rounds_halves_up():
    counts = {size: MixedBatchSampler(list(range(8)), [100], batch_size=size, ratio=0.5, seed=0,
                                      dataset=None).per_batch_unlabelled for size in (3, 5, 7)}
    assert counts == {3: 2, 5: 3, 7: 4}  # round() gave 2, 2 and 4


def test_mixed_batches_take_the_baselines_steps_under_several_processes():
    # 12 labelled images in batches of 4: 3 batches, so 1 round of 2 processes and a partial one.
    # The baseline's loader drops the partial round; Accelerate padded the mixed one instead.
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    class Epoch:
        epoch = 0

    mixed = MixedBatchSampler(list(range(12)), list(range(100, 106)), batch_size=4, ratio=0.5, seed=0, dataset=Epoch)
    plain = BatchSampler(range(12), batch_size=4, drop_last=True)
    for rank in (0, 1):
        shards = [BatchSamplerShard(s, num_processes=2, process_index=rank) for s in (mixed, plain)]
        assert [len(shard) for shard in shards] == [1, 1]
        assert len(list(shards[0])) == 1


def test_kd_covers_unlabelled_pixels_and_the_ce_only_labelled_ones():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 5))
    target[1] = 255  # the second image has no mask
    kd_mask = target.clone()
    kd_mask[1] = 0
    kd_mask[1, :, 4] = 255  # its last column is padding
    parts = DistillLoss(ce_weight=1.0, kd_weight=1.0, temperature=2.0)(student, target, teacher, kd_target=kd_mask)
    assert float(parts["ce"]) == pytest.approx(float(ce_loss(student[:1], target[:1])))
    # Independent reference: T^2 * mean over the KD pixels of KL(p_t || p_s).
    p_t = torch.softmax(teacher / 2, 1)
    kl = (p_t * (torch.log_softmax(teacher / 2, 1) - torch.log_softmax(student / 2, 1))).sum(1)
    expected = 4 * kl[kd_mask != 255].mean()
    assert float(parts["kd"]) == pytest.approx(float(expected), rel=1e-10)
    assert float(parts["kd"]) == pytest.approx(float(kd_loss_reference(student, teacher, temperature=2.0, target=kd_mask)))


def test_unlabelled_images_need_a_teacher():
    with pytest.raises(RecipeError, match="data.unlabelled needs a `teacher`"):
        recipe_from_dict({"model": {}, "data": {"unlabelled": [{"synthetic": 4}]}})


@pytest.mark.slow
def test_distilled_student_trains_on_mixed_batches_from_the_cache(tmp_path):
    from distill.cache import write_cache
    from distill.training import train

    recipe = tiny_recipe(tmp_path, teacher=True, **{
        "teacher.mode": "cache", "data.resize": "[32, 32]", "data.labelled_fraction": 0.5,
        "data.unlabelled": "[{synthetic: 8}]", "data.unlabelled_ratio": 0.5, "train.epochs": 1})
    train(recipe, "teacher")
    write_cache(recipe)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["fingerprint"]["num_samples"] == 24 + 8  # both kinds cached
    student = train(recipe, "student")
    baseline = train(recipe, "baseline")
    # 12 labelled images: 12 / 4 = 3 steps each (2 labelled + 2 unlabelled per distillation batch).
    assert student.steps == 3 and baseline.steps == 3
    loader = build_loader(recipe.data, "train", train=True, unlabelled=True)
    batch = next(iter(loader))
    assert batch["labelled"].tolist().count(False) == 2


@pytest.mark.slow
def test_one_logit_cache_serves_every_labelled_fraction(tmp_path):
    from distill.cache import cache_dataset, load_cached_teacher, write_cache
    from distill.training import train

    common = {"teacher.mode": "cache", "data.resize": "[32, 32]", "data.unlabelled": "[{synthetic: 4}]",
              "train.epochs": 1}
    every = tiny_recipe(tmp_path, teacher=True, **common)
    train(every, "teacher")
    write_cache(every)
    stored = tmp_path / "cache" / "train" / "values.npy"
    written_at = stored.stat().st_mtime_ns
    few = tiny_recipe(tmp_path, teacher=True, **common, **{"data.labelled_fraction": 0.25})
    write_cache(few)  # the same images: nothing to rewrite
    assert stored.stat().st_mtime_ns == written_at
    teacher = load_cached_teacher(few, 4)
    rows = cache_dataset(few, "train")
    training = build_dataset(few.data, "train", train=False, unlabelled=True)
    labelled = [bool(training[i]["labelled"]) for i in range(len(training))]
    assert 0 < sum(labelled) < len(training) - 4  # training images whose masks were dropped, too
    for index in range(len(training)):  # each sample is served its own image's logits
        assert torch.equal(training[index]["image"], rows[int(teacher.rows[index])]["image"])
    assert sorted(teacher.rows.tolist()) == list(range(len(rows)))


def test_folders_of_the_same_file_names_and_the_generator_seed_each_get_their_own_targets(tmp_path):
    from distill.cache import CacheError, cache_dataset, load_cached_teacher, open_store, write_cache
    from distill.training import train

    for name, shade in (("a", 30), ("b", 220)):  # the same file names, other images
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((32, 32, 3), shade, dtype=np.uint8)).save(tmp_path / name / "frame_0.png")
    both = tiny_recipe(tmp_path, teacher=True, **{  # masks dropped: rows found by sample id
        "teacher.mode": "cache", "data.resize": "[32, 32]", "train.epochs": 1, "data.labelled_fraction": 0.5,
        "data.unlabelled": f"[{{folder: {tmp_path / 'a'}}}, {{folder: {tmp_path / 'b'}}}, {{synthetic: 2}}]"})
    train(both, "teacher")
    write_cache(both)
    teacher, rows = load_cached_teacher(both, 4), cache_dataset(both, "train")
    training = build_dataset(both.data, "train", train=False, unlabelled=True)
    assert len(training) == 24 + 2 + 2 and len(rows) == len(training) and teacher.rows is not None
    for index in range(len(training)):  # each image is served its own targets
        assert torch.equal(training[index]["image"], rows[int(teacher.rows[index])]["image"])
    # Another folder, or another generator seed for the unlabelled stream: the store is stale.
    for changed, key in (({"data.unlabelled": f"[{{folder: {tmp_path / 'b'}}}, {{synthetic: 2}}]"},
                          "split_files_sha256"),
                         ({"data.synthetic.seed": 1}, "dataset_options")):
        other = tiny_recipe(tmp_path, teacher=True, **{
            "teacher.mode": "cache", "data.resize": "[32, 32]", "train.epochs": 1, "data.labelled_fraction": 0.5,
            "data.unlabelled": f"[{{folder: {tmp_path / 'a'}}}, {{folder: {tmp_path / 'b'}}}, {{synthetic: 2}}]",
            **changed})
        with pytest.raises(CacheError, match=key):
            open_store(other)


def test_pseudo_labels_are_the_teachers_confident_top_class_at_unlabelled_pixels():
    torch.manual_seed(1)
    student = torch.randn(1, 3, 2, 4, dtype=torch.float64)
    teacher = torch.zeros(1, 3, 2, 4, dtype=torch.float64)
    teacher[0, 2, 0, :] = 10.0  # row 0: class 2 at p ~ 1.0; row 1: uniform (p = 1/3)
    target = torch.full((1, 2, 4), 255)
    target[0, 0, 0] = 1  # one labelled pixel: its label, not the teacher's, counts
    kd_mask = torch.zeros(1, 2, 4, dtype=torch.long)
    kd_mask[0, 0, 0] = 1
    loss = DistillLoss(kd_weight=1.0, pseudo_label_weight=0.5, pseudo_label_threshold=0.9)
    parts = loss(student, target, teacher, kd_target=kd_mask)
    expected_pseudo = torch.nn.functional.cross_entropy(student[0, :, 0, 1:].T, torch.full((3,), 2))
    assert float(parts["pseudo"]) == pytest.approx(float(expected_pseudo), rel=1e-10)
    assert float(parts["loss"]) == pytest.approx(float(parts["ce"] + parts["kd"] + 0.5 * parts["pseudo"]))
    assert "pseudo" not in DistillLoss()(student, target, teacher, kd_target=kd_mask)  # off by default


def test_the_teacher_stage_trains_on_every_mask(tmp_path):
    from distill.training import train

    recipe = tiny_recipe(tmp_path, teacher=True, **{"data.labelled_fraction": 0.5, "train.epochs": 1})
    assert train(recipe, "teacher").steps == 24 // 4  # all 24 images, not the 12 with masks
    assert train(recipe, "baseline").steps == 12 // 4
    # The distilled student mixes in the 12 unlabelled ones at the baseline's steps per epoch.
    assert train(recipe, "student").steps == 12 // 4


def test_settings_that_would_silently_mislead_are_refused():
    with pytest.raises(ValueError, match=r"0.4 is not 1/k for a whole k"):
        data(labelled_fraction=0.4)
    with pytest.raises(RecipeError, match="pseudo_label_weight needs the teacher's targets: kd_weight is 0"):
        recipe_from_dict({"student": {}, "teacher": {}, "loss": {"kd_weight": 0, "pseudo_label_weight": 1}})
    with pytest.raises(RecipeError, match="teacher.class_names describes a teacher trained elsewhere"):
        recipe_from_dict({"student": {}, "teacher": {"class_names": ["a", "b"]}})
    with pytest.raises(DataError, match="data.batch_size 1 cannot hold both"):
        MixedBatchSampler([0, 1], [2], batch_size=1, ratio=0.5, seed=0, dataset=None)


def test_a_ratio_of_zero_distils_on_the_kept_masks_alone():
    cfg = data(labelled_fraction=0.25, unlabelled_ratio=0.0, batch_size=1)
    loader = build_loader(cfg, "train", train=True, unlabelled=True)
    assert [loader.dataset.sample_id(i) for i in range(len(loader.dataset))] == \
        [f"synthetic/train/{k:06d}" for k in (0, 4, 8)]
    batches = list(loader)
    assert sorted(int(b["index"]) for b in batches) == [0, 1, 2]
    assert all(bool(b["labelled"].all()) and "kd_mask" not in b for b in batches)
    # An unlabelled source with a ratio of 0 would never be drawn: refused.
    with pytest.raises(RecipeError, match="unlabelled_ratio is 0: the unlabelled images would never be drawn"):
        recipe_from_dict({"student": {}, "teacher": {},
                          "data": {"unlabelled": [{"synthetic": 8}], "unlabelled_ratio": 0}})
