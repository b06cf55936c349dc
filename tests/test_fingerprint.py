"""One fingerprint, read off the schema's field metadata: every key of a section a stage reads
says which stages' results it changes, and the fingerprint follows exactly that."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel

from distill.config import (CacheConfig, DataConfig, LossConfig, ModelConfig, TeacherConfig, TrainConfig,
                            changes)
from distill.fingerprint import stage_inputs
from distill.pipeline import stage_fingerprint
from helpers import tiny_recipe

FINGERPRINTED = (DataConfig, ModelConfig, TeacherConfig, CacheConfig, LossConfig, TrainConfig)
STAGES = {"teacher", "baseline", "student"}


@pytest.mark.parametrize("section", FINGERPRINTED, ids=lambda s: s.__name__)
def test_every_key_says_which_stages_it_changes(section: type[BaseModel]):
    missing = [name for name, field in section.model_fields.items() if changes(field) is None]
    assert not missing, (f"{section.__name__} keys without fingerprint metadata (json_schema_extra="
                         f"EVERY_STAGE, STUDENTS, DISTILLED or RUN_ONLY): {missing}")
    for name, field in section.model_fields.items():
        assert set(changes(field)) <= STAGES, name


def fingerprints(**overrides) -> dict[str, str]:
    recipe = tiny_recipe("/tmp/unused-run", teacher=True, **{"teacher.checkpoint": __file__, **overrides})
    return {stage: stage_fingerprint(recipe, stage) for stage in ("teacher", "baseline", "student")}


@pytest.mark.parametrize("override,changed", [
    ({"train.lr": 0.5}, {"teacher", "baseline", "student"}),
    ({"train.log_every_steps": 7, "train.checkpoint_every_epochs": 3, "data.num_workers": 1}, set()),
    ({"data.labelled_fraction": 0.5}, {"baseline", "student"}),
    ({"data.unlabelled_ratio": 0.25}, {"student"}),
    ({"loss.temperature": 4.0}, {"student"}),
    ({"loss.class_weights": [1, 2, 1, 1]}, {"teacher", "baseline", "student"}),
    ({"teacher.tta_flip": True}, {"student"}),
    ({"teacher.compile": True, "loss.chunk_size": 4}, set()),
    ({"teacher.factory_kwargs": "{width: 10}"}, {"teacher", "student"}),
    ({"student.factory_kwargs": "{width: 5}"}, {"baseline", "student"}),
    ({"eval.resolution": "frame"}, {"teacher", "baseline", "student"}),  # validation picks best
])
def test_a_key_changes_the_fingerprints_of_the_stages_it_names(override, changed):
    before, after = fingerprints(), fingerprints(**override)
    assert {stage for stage in before if before[stage] != after[stage]} == changed


def test_an_unlabelled_sources_repeat_counts_only_where_set():
    plain = {"data.unlabelled": "[{synthetic: 4}]"}
    # Left at 1, the key is not in the inputs: runs made before it existed keep their digest.
    recipe = tiny_recipe("/tmp/unused-run", teacher=True, **{"teacher.checkpoint": __file__, **plain})
    assert stage_inputs(recipe, "student")["data"]["unlabelled"] == [{"split": None, "folder": None, "synthetic": 4}]
    before, after = fingerprints(**plain), fingerprints(**{"data.unlabelled": "[{synthetic: 4, repeat: 3}]"})
    assert {stage for stage in before if before[stage] != after[stage]} == {"student"}


def test_the_teachers_weights_enter_by_their_bytes_not_their_path(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    first.write_bytes(b"same"), second.write_bytes(b"same")
    make = lambda path: tiny_recipe(tmp_path / "run", teacher=True, **{"teacher.checkpoint": str(path)})
    assert stage_inputs(make(first), "student") == stage_inputs(make(second), "student")
    second.write_bytes(b"other")
    assert stage_inputs(make(first), "student") != stage_inputs(make(second), "student")


def test_encoder_weights_a_checkpoint_replaces_are_neither_hashed_nor_required(tmp_path):
    # The teacher's checkpoint holds its whole model: its encoder_weights are never read, and the
    # recipe reused on a machine without them (or with other ones) is the same teacher.
    from safetensors.torch import save_file

    from distill.preflight import check_inputs

    encoder, checkpoint = tmp_path / "encoder.safetensors", tmp_path / "teacher.safetensors"
    encoder.write_bytes(b"one")
    save_file({"weight": torch.zeros(1)}, checkpoint)
    make = lambda: tiny_recipe(tmp_path / "run", teacher=True, **{
        "teacher.factory": "null", "teacher.factory_kwargs": "{}", "teacher.arch": "FPN", "teacher.encoder": "resnet18",
        "teacher.checkpoint": str(checkpoint), "teacher.encoder_weights": str(encoder)})
    before = stage_inputs(make(), "student")
    encoder.write_bytes(b"two")
    assert stage_inputs(make(), "student") == before
    encoder.unlink()
    assert stage_inputs(make(), "student") == before
    check_inputs(make(), "student")  # the encoder file is not asked for


def test_a_cached_student_reads_its_training_splits_store_alone(tmp_path):
    import json

    (tmp_path / "teacher.safetensors").write_bytes(b"weights")
    recipe = lambda splits: tiny_recipe(tmp_path / "run", teacher=True, **{
        "teacher.mode": "cache", "data.resize": "[32,32]", "cache.splits": splits,
        "teacher.checkpoint": str(tmp_path / "teacher.safetensors")})
    manifest = tmp_path / "run" / "cache" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    write = lambda splits: manifest.write_text(json.dumps({"format": "distill-logit-cache", "splits": splits}))
    write({"train": {"complete": True, "fingerprint": {"teacher": "a"}}})
    before = stage_inputs(recipe("[train]"), "student")
    write({"train": {"complete": True, "fingerprint": {"teacher": "a"}}, "val": {"complete": True}})
    assert stage_inputs(recipe("[train, val]"), "student") == before  # another split cached beside it
    write({"train": {"complete": True, "fingerprint": {"teacher": "b"}}, "val": {"complete": True}})
    assert stage_inputs(recipe("[train, val]"), "student") != before  # its own store rewritten


def test_class_names_a_class_map_numbers_are_labels_that_redo_nothing(tmp_path):
    from distill.cache.reader import expected_fingerprint

    (tmp_path / "teacher.safetensors").write_bytes(b"weights")
    base = {"teacher.checkpoint": str(tmp_path / "teacher.safetensors"), "teacher.mode": "cache",
            "data.resize": "[32,32]", "data.dataset": "folder", "data.root": str(tmp_path)}
    recipe = lambda class_map, teacher_names, names: tiny_recipe(tmp_path / "run", teacher=True, **base, **{
        "teacher.class_map": class_map, "teacher.class_names": teacher_names, "data.class_names": names})
    inputs = lambda r: (stage_inputs(r, "student"), expected_fingerprint(r, "train", ids=["a"], num_classes=4))
    by_ids = "{0: 0, 1: 1, 2: 2, 3: 3, 4: 3}"
    before = inputs(recipe(by_ids, "[road, car, tree, sky, cloud]", "[a, b, c, d]"))
    assert inputs(recipe(by_ids, "[road, vehicle, tree, sky, cloud]", "[a, b, c, e]")) == before
    by_names = "{road: a, car: b, tree: c, sky: d, cloud: d}"
    named = inputs(recipe(by_names, "[road, car, tree, sky, cloud]", "[a, b, c, d]"))
    renamed = inputs(recipe("{road: a, vehicle: b, tree: c, sky: d, cloud: d}", "[road, vehicle, tree, sky, cloud]", "[a, b, c, d]"))
    assert named[0] != renamed[0] and named[1] != renamed[1]  # the map by name changed with them


def test_a_list_selectors_file_enters_by_its_content(tmp_path):
    listing = tmp_path / "held_out.txt"
    listing.write_text("0001\n0002\n")
    split = {"data.val_split": f"train:list={listing}"}
    before = fingerprints(**split)
    assert fingerprints(**split) == before
    listing.write_text("0001\n0003\n")  # other validation samples, and so other training ones
    after = fingerprints(**split)
    assert all(before[stage] != after[stage] for stage in before)
