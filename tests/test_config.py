"""Recipes: loading, overrides, and a clear error for every kind of bad input."""

from pathlib import Path

import pytest
import yaml

from distill.cli import main
from distill.config import RecipeError, load_recipe, parse_overrides, save_resolved_recipe

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_overrides_are_typed_and_applied(tmp_path):
    path = write(tmp_path, {"model": {"encoder": "resnet18"}})
    recipe = load_recipe(path, ["train.epochs=3", "data.crop_size=[32, 48]", "model.encoder_weights=null",
                                "loss.temperature=2.5", "data.dataset=synthetic"])
    assert recipe.train.epochs == 3
    assert recipe.data.crop_size == (32, 48)
    assert recipe.loss.temperature == 2.5
    assert recipe.student_model.encoder == "resnet18"


def test_bare_no_means_no_mixed_precision(tmp_path):
    path = write(tmp_path, {"model": {}, "train": {"mixed_precision": False}})  # YAML's `no`
    assert load_recipe(path).train.mixed_precision == "no"
    assert load_recipe(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_parse_overrides_rejects_words_without_value():
    with pytest.raises(RecipeError, match="override 'epochs' must look like"):
        parse_overrides(["epochs"])


@pytest.mark.parametrize(
    ("tree", "overrides", "message"),
    [
        ({"model": {}, "data": {"crop_sizee": [8, 8]}}, [], r"unknown key 'data.crop_sizee'; did you mean 'data.crop_size'\?"),
        ({"model": {}}, ["train.epoch=3"], r"unknown key 'train.epoch' \(from override\); did you mean 'train.epochs'\?"),
        ({"model": {}, "trian": {}}, [], r"unknown key 'trian'; did you mean 'train'\?"),
        ({"model": {}}, ["train.epochs=many"], r"'train.epochs' \(from override\): input should be a valid integer.*'many'"),
        ({"model": {}}, ["loss.temperature=0"], r"'loss.temperature' \(from override\): input should be greater than 0"),
        ({"model": {}}, ["loss.kd_weight=-1"], r"'loss.kd_weight'.*greater than or equal to 0"),
        ({"model": {}}, ["data.batch_size=0"], r"'data.batch_size'.*greater than or equal to 1"),
        ({"model": {}}, ["train.optimizer=adam"], r"'train.optimizer'.*'adamw' or 'sgd'"),
        ({"model": {}}, ["data.dataset=camvid"], r"data.root is required for dataset 'camvid'"),
        ({"data": {}}, [], r"needs a `model` section"),
        ({"model": {}, "student": {}}, [], r"either `model`.*or `student`"),
        ({"model": {}}, ["data.scale_range=[2.0, 1.0]"], r"data.scale_range \[2.0, 1.0\] must satisfy"),
        ({"model": {}}, ["data.class_names=[road,car,car,sky,a,b]"], r"data.class_names names \['car'\] more than once"),
        ({"student": {}, "teacher": {"source": "onnx", "path": "t.onnx", "class_names": ["a", "a"]}}, [],
         r"teacher.class_names names \['a'\] more than once"),
        ({"student": {}, "teacher": {"tta_flip": True}}, ["loss.feature={kind: hint, pairs: [[-1, -1]]}"],
         r"reads the teacher's features of the student's own view; teacher.tta_flip"),
        ({"model": {}}, ["data.resize=[32]"], r"'data.resize' \(from override\): needs 2 values, got \[32\]"),
        ({"model": {}}, ["data.synthetic.size=[32]"], r"'data.synthetic.size' \(from override\): needs 2 values"),
        ({"student": {}, "teacher": {}}, ["teacher.input_size=[0, 5]"], r"teacher.input_size \[0, 5\] must be positive"),
        ({"student": {}, "teacher": {}}, ["cache.teacher_resize=[0, 5]"], r"cache.teacher_resize \[0, 5\] must be positive"),
        ({"model": {}, "train": {"epochs": 2}}, ["train.epochs.sub=1"], r"'train.epochs' is a value, not a section"),
        ({"teacher": {"mode": "cache"}, "student": {}, "data": {"resize": [8, 8]}}, ["cache.topk=7"],
         r"cache.topk 7 is larger than the dataset's 6 classes"),
        ({"model": {}}, ["loss.class_weights=[1, 2]"], r"loss.class_weights has 2 values but the dataset has 6 classes"),
        ({"student": {}, "teacher": {"mean": [0.5, 0.5, 0.5]}}, [], r"teacher.mean/teacher.std describe an external teacher checkpoint"),
        ({"model": {}}, ["train.epochs.sub=1"], r"'train.epochs' \(from override\): input should be a valid integer"),
        # A section or a list set whole by an override: the error inside it names the override too.
        ({"model": {}}, ["train={epochs: -1}"], r"'train.epochs' \(from override\): input should be greater than"),
        ({"model": {}}, ["export.formats=[bogus]"], r"'export.formats.0' \(from override\): input should be"),
        ({"model": {}}, ["data={dataset: synthetic, resize: [32]}"], r"'data.resize' \(from override\): needs 2 values"),
    ],
)
def test_bad_input_names_the_key(tmp_path, tree, overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, tree), overrides)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file '.*nope.yaml' does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_recipe_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping of sections"):
        load_recipe(path)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, {"model": {"arch": "FPN"}}), ["train.epochs=2"])
    saved = save_resolved_recipe(recipe, tmp_path / "run")
    tree = yaml.safe_load(saved.read_text())
    assert tree["train"]["epochs"] == 2 and tree["model"]["arch"] == "FPN"
    assert tree["loss"]["temperature"] == recipe.loss.temperature  # defaults written out
    assert load_recipe(saved) == recipe


@pytest.mark.parametrize("debug", ["", "0", "false", "off"])
def test_cli_reports_bad_input_without_traceback(tmp_path, capsys, monkeypatch, debug):
    monkeypatch.setenv("DISTILL_DEBUG", debug)  # set, but to a "no"
    code = main(["recipe", str(write(tmp_path, {"model": {}})), "train.epoch=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown key 'train.epoch'" in err and "train.epochs" in err
    assert "Traceback" not in err


def test_export_format_shorthand_takes_a_list_too():
    from distill.cli import _expand_shorthands

    assert _expand_shorthands("export", ["format=onnx,safetensors"]) == ["export.formats=[onnx, safetensors]"]
    assert _expand_shorthands("export", ["format=[onnx, onnx_int8]"]) == ["export.formats=[onnx, onnx_int8]"]


def test_every_shipped_recipe_validates():
    recipes = sorted((REPO / "recipes").rglob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        # Dataset roots may be absent on this machine; everything else must validate.
        tree = yaml.safe_load(path.read_text())
        if tree.get("data", {}).get("dataset", "synthetic") != "synthetic":
            tree["data"]["root"] = str(path.parent)
        from distill.config import recipe_from_dict

        recipe_from_dict(tree, source=str(path))


def test_loader_worker_errors_lose_the_worker_traceback():
    from distill.cli import error_message
    from distill.data import DataError

    wrapped = DataError(
        "Caught BadFileError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise\ndistill._datasets.BadFileError: image \'/d/a.png\' is corrupt\n'
    )
    assert error_message(wrapped) == "image '/d/a.png' is corrupt"
    assert error_message(DataError("plain message")) == "plain message"


def test_teacher_train_overrides_only_the_teacher_schedule(tmp_path):
    from distill.pipeline import stage_fingerprint

    tree = {"student": {}, "teacher": {}, "train": {"epochs": 3, "lr": 0.01}}
    path = write(tmp_path, tree)
    plain = load_recipe(path)
    longer = load_recipe(path, ["teacher_train.epochs=9"])
    assert longer.teacher_schedule().epochs == 9 and longer.teacher_schedule().lr == 0.01
    assert longer.train.epochs == 3  # the students keep theirs
    assert plain.teacher_schedule() == plain.train
    # A longer teacher is another teacher; the students' stages do not change.
    assert stage_fingerprint(longer, "teacher") != stage_fingerprint(plain, "teacher")
    assert stage_fingerprint(longer, "baseline") == stage_fingerprint(plain, "baseline")
    with pytest.raises(RecipeError, match="teacher_train: 'epoch' is not a `train` key; did you mean 'epochs'"):
        load_recipe(path, ["teacher_train.epoch=9"])
    with pytest.raises(RecipeError, match=r"teacher_train.epochs: input should be greater than or equal to 1 \(got 0\)"):
        load_recipe(path, ["teacher_train.epochs=0"])


def test_schema_checks_values_not_the_disk(tmp_path, monkeypatch):
    # A recipe whose data and weights are not there yet still loads (and prints); each path is
    # checked where it is read, with a message naming it and the absolute path tried.
    from distill.data import DataError, build_dataset
    from distill.models import ModelError, build_model

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(write(tmp_path, {"model": {"checkpoint": "no/such.safetensors"},
                                          "data": {"dataset": "camvid", "root": "data/camvid"}}))
    with pytest.raises(DataError, match=rf"data.root 'data/camvid' does not exist.*tried '{tmp_path}/data/camvid'"):
        build_dataset(recipe.data, "train", train=False)
    with pytest.raises(ModelError, match="checkpoint 'no/such.safetensors' does not exist"):
        build_model(recipe.student_model, 11)
    assert main(["recipe", str(tmp_path / "recipe.yaml")]) == 0


def test_a_bug_keeps_its_traceback_and_is_not_called_bad_input(tmp_path, monkeypatch):
    # Only distill's own errors are "bad input" (exit 2, one line); a ValueError from deeper code
    # is a bug: it propagates, so the console script prints its traceback and exits 1.
    import distill.training

    def broken(*args, **kwargs):
        raise ValueError("some internal invariant broke")

    monkeypatch.setattr(distill.training, "train", broken)
    path = write(tmp_path, {"model": {}, "output_dir": str(tmp_path / "run")})
    with pytest.raises(ValueError, match="internal invariant"):
        main(["train", str(path)])


@pytest.mark.parametrize(("text", "overrides", "message"), [
    ("model: {}\ntrain:\n  epochs: 2\n  epochs: 3\n", [], r"key 'epochs' appears twice \(lines 3 and 4\)"),
    ("model: {}\n", ["train.epochs=true"], r"train: 'epochs' is True, a boolean, not a number"),
    ("model: {}\n", ["loss.temperature=.inf"], r"'loss.temperature' \(from override\): input should be a finite number"),
    ("model: {}\n", ["output_dir="], r"override 'output_dir=': the value is empty; give one$"),
    ("model: {}\ncache: {dir: ' '}\n", [], r"cache: 'dir' is empty: give a path, or null for none"),
    ("model: {}\n", ["cache.dir="], r"give one, or `cache.dir=null` for none"),
    ("model: {}\n", ["model.encoder_weights="], r"give one, or `model.encoder_weights=null` for none"),
    ("model: {}\n", ["train.epochs=3 #x"], r"YAML reads '#x' as a comment, which an override cannot hold"),
    ("model: {}\n", ["data.class_names.0=bg"], r"give the whole list, e\.g\. `data\.class_names=\[\.\.\., \.\.\.\]`"),
    ("model: {}\n", ["data.mean.0=0.5"], r"give the whole list, e\.g\. `data\.mean=\[\.\.\., \.\.\.\]`"),
    ("model: {}\n", ["train={epochs: 3, lr: 0.1, epochs: 5}"], r"key 'epochs' appears twice"),
    ("model: {}\n", ["data.unlabelled[0].folder=x"], r"entries of a list cannot be set one by one; give the whole list, e\.g\. `data\.unlabelled="),
    ("model: {}\n", ["data.unlabelled.0.repeat=2"], r"cannot be set one by one; give the whole list, e\.g\. `data\.unlabelled="),
    ("model: {}\n", ["train.float=3"], r"unknown key 'train\.float' \(from override\)"),
    ("model: {}\n", ["export.formats=[]"], r"'export.formats' \(from override\): list should have at least 1 item"),
    ("model: {}\n", ["loss.class_weights=[-1,1,1,1]"], r"loss.class_weights: \[-1.0, 1.0, 1.0, 1.0\] must be >= 0"),
    ("model: {}\n", ["loss.class_weights=[0,0,0,0]"], r"with at least one above 0"),
    ("model: {}\n", ["train.seed=-1"], r"'train.seed' \(from override\): input should be greater than or equal to 0"),
    ("student: {}\nteacher: {checkpoint: t.safetensors, std: [0.2, 0, 0.2]}\n", [], r"teacher.std \[0.2, 0.0, 0.2\] must be positive"),
    ("student: {}\nteacher: {path: t.onnx}\n", [], r"teacher.path 't.onnx' is read by the sources transformers, smp_hub and onnx, not by 'smp'"),
    ("student: {}\nteacher: {}\ndata: {unlabelled: [{folder: u}, {folder: u}]}\n", [], r"lists the folder 'u' twice; to draw its images more often, give it once with `repeat`"),
    ("model: {}\nbatch_size: 4\n", [], r"unknown key 'batch_size'; it is a key of a section: did you mean 'data.batch_size'"),
    ("model: {}\n", ["data.synthetic.size=[0,0]"], r"data.synthetic.size: \[0, 0\] must be at least 8 pixels"),
])
def test_silently_accepted_values_are_refused(tmp_path, text, overrides, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, overrides)


def test_a_yaml_alias_is_a_copy_an_override_changes_alone(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("teacher: &net {arch: Unet, encoder: resnet18}\nstudent: *net\n"
                    "train: &schedule {epochs: 4}\nteacher_train: *schedule\n")
    recipe = load_recipe(path, ["student.encoder=resnet34", "train.lr=0.1"])
    assert (recipe.teacher.encoder, recipe.student.encoder) == ("resnet18", "resnet34")
    assert recipe.teacher_train == {"epochs": 4} and recipe.train.lr == 0.1


def test_a_path_or_text_override_is_taken_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "recipe.yaml"
    path.write_text("model: {}\n")
    recipe = load_recipe(path, ["output_dir=runs/exp #2", "data.val_split=train:list=held out #1.txt",
                                "cache.dir=~/stores/a", "train.resume=null"])
    assert recipe.output_dir == Path("runs/exp #2") and recipe.data.val_split == "train:list=held out #1.txt"
    assert recipe.cache.dir == tmp_path / "home" / "stores" / "a" and recipe.train.resume is None
    assert load_recipe(path, ["output_dir=007"]).output_dir == Path("007")  # not the number 7
    assert load_recipe(path, ["output_dir='007'", "data.root= ~/data "]).output_dir == Path("007")
    assert load_recipe(path, ["data.root= ~/data "]).data.root == tmp_path / "home" / "data"
    recipe = load_recipe(path, ["model.encoder_weights=~/w.pth", "data.val_split=train:list=~/ids.txt"])
    assert recipe.model.encoder_weights == str(tmp_path / "home" / "w.pth")
    from distill.data.splits import parse_split

    assert parse_split(recipe.data.val_split).list_file == tmp_path / "home" / "ids.txt"
    path.write_text("model: {}\noutput_dir: 007\n")  # YAML's 7: the text is gone
    with pytest.raises(RecipeError, match=r"'output_dir' is the number 7: quote a folder or file name made of digits"):
        load_recipe(path)
    path.write_text("model: {}\neval: {split: &r [*r]}\n")
    with pytest.raises(RecipeError, match="a YAML alias inside its own anchor"):
        load_recipe(path)


def test_recipe_that_is_binary_or_a_folder(tmp_path):
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x89\xff\xfe\x00binary")
    with pytest.raises(RecipeError, match="is not a text file"):
        load_recipe(binary)
    with pytest.raises(RecipeError, match="is a folder, not a YAML file"):
        load_recipe(tmp_path)
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    with pytest.raises(RecipeError, match="cannot be read"):
        load_recipe(loop)


def test_messages_name_no_python_types(tmp_path):
    path = write(tmp_path, {"model": {}})
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, ["train=3"])
    assert "'train' (from override): input should be a section (a mapping of keys) (got 3)" in str(caught.value)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, ["output_dir=[1, 2]"])
    assert "input is not a valid path (got [1, 2])" in str(caught.value) and "<class" not in str(caught.value)


def test_ctrl_c_says_what_is_safe_and_how_to_resume(tmp_path, monkeypatch, capfd):
    import distill.training

    def interrupted(*args, **kwargs):  # stopped once it had saved a checkpoint
        raise distill.training.StoppedWithCheckpoint(str(tmp_path / "run" / "baseline"))

    monkeypatch.setattr(distill.training, "train", interrupted)
    path = write(tmp_path, {"model": {}})
    assert main(["train", str(path), "--stage", "baseline", f"output_dir={tmp_path / 'run'}"]) == 130
    captured = capfd.readouterr()
    out = "".join((captured.out + captured.err).split())  # rich wraps long lines
    assert "interrupted:distilltrainstopped" in out and "Traceback" not in out
    assert f"train.resume={tmp_path / 'run'}/baseline" in out


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("distill ")


def test_recipes_read_as_their_authors_mean(tmp_path):
    from distill.config import recipe_from_dict

    # YAML merge keys, one schedule shared and partly overridden; a key given twice still refused.
    (tmp_path / "merge.yaml").write_text("data: {dataset: synthetic}\nmodel: {arch: FPN}\n"
                                         "train: &schedule {epochs: 3, lr: 0.01}\n"
                                         "teacher_train: {<<: *schedule, epochs: 40}\n")
    assert load_recipe(tmp_path / "merge.yaml").teacher_train == {"epochs": 40, "lr": 0.01}
    (tmp_path / "twice.yaml").write_text("data: {dataset: synthetic}\nmodel: {arch: FPN}\n"
                                         "train: {epochs: 3, epochs: 4}\n")
    with pytest.raises(RecipeError, match="key 'epochs' appears twice"):
        load_recipe(tmp_path / "twice.yaml")
    # 1e-1 is a number (YAML 1.1 read it as a string, which free-form kwargs passed on).
    tree = {"model": {"arch": "FPN"}}
    recipe = recipe_from_dict(tree, ["model.arch_kwargs={decoder_dropout: 1e-1, classes: 1E2}"])
    assert recipe.model.arch_kwargs == {"decoder_dropout": 0.1, "classes": 100.0}
    assert parse_overrides(["a.b=1e", "a.c=[5e-4, 3]"]) == {"a.b": "1e", "a.c": [0.0005, 3]}
    # The caller's dict is not changed by overrides, nor by a refused one.
    recipe_from_dict(tree, ["train.lr=0.1"])
    with pytest.raises(RecipeError):
        recipe_from_dict(tree, ["data.dataset=camvid"])
    assert tree == {"model": {"arch": "FPN"}} and recipe_from_dict(tree).train.lr == 0.001


@pytest.mark.parametrize("overrides,message", [
    # One mistake, one line, the user's key: not `pairs.0.1.int` and `pairs.0.1.literal['decoder']`.
    (["loss.feature.pairs=[[1, decodr]]"],
     "'loss.feature.pairs.0.1' (from override): input should be a valid integer, unable to parse string as an integer; "
     "or input should be 'decoder' (got 'decodr')"),
    (["teacher_train={epochs: true}"], "teacher_train: 'epochs' is True, a boolean, not a number\n"),
    # The suggested value is accepted (0.3333 was refused with the same advice).
    (["data.labelled_fraction=0.3"], "use e.g. 0.3333 (1/3)"),
    (["data.resize=[true, true]"], "data: 'resize' is [True, True]: a boolean is not a number"),  # was (1, 1)
])
def test_a_mistake_is_named_once_by_its_key(overrides, message):
    from distill.config import recipe_from_dict

    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"student": {"arch": "FPN"}, "teacher": {"arch": "FPN"}}, overrides)
    assert message in str(error.value) + "\n" and str(error.value).count("\n  - ") == 1
    if "0.3333" in message:
        assert recipe_from_dict({"model": {"arch": "FPN"}}, ["data.labelled_fraction=0.3333"])
