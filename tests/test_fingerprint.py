"""One fingerprint, read off the schema's field metadata: every key of a section a stage reads
says which stages' results it changes, and the fingerprint follows exactly that."""

from __future__ import annotations

import pytest
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


def test_a_list_selectors_file_enters_by_its_content(tmp_path):
    listing = tmp_path / "held_out.txt"
    listing.write_text("0001\n0002\n")
    split = {"data.val_split": f"train:list={listing}"}
    before = fingerprints(**split)
    assert fingerprints(**split) == before
    listing.write_text("0001\n0003\n")  # other validation samples, and so other training ones
    after = fingerprints(**split)
    assert all(before[stage] != after[stage] for stage in before)
