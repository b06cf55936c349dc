"""distill predict on bad inputs: everything checked first, all or nothing; image modes; EXIF orientation."""

from __future__ import annotations

import errno
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_recipe
from PIL import Image
from safetensors.torch import save_file

import distill.export.predict as predict_module
from distill.cli import main as cli_main
from distill.data import dataset_info
from distill.export import export_student
from distill.models import build_model
from distill.export.predict import PredictError, predict

as_root = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A factory student (`helpers:tiny`, untrained) exported as ONNX only: enough to predict with."""
    recipe = tiny_recipe(tmp_path_factory.mktemp("predict_inputs") / "run", teacher=True)
    # As test_export's _save_untrained_student, but with no last-layer bias and a sharper first
    # layer: random weights otherwise predict class 0 everywhere, and equal masks would prove nothing.
    torch.manual_seed(0)
    model = build_model(recipe.student_model, dataset_info(recipe.data).num_classes)
    with torch.no_grad():
        model.body[-1].bias.zero_()
        model.body[0].weight.mul_(4)
    path = Path(recipe.output_dir) / "student" / "best.safetensors"
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return export_student(recipe, "onnx", parity_images=1)


def _pattern(height: int = 24, width: int = 40, seed: int = 0) -> np.ndarray:
    """An 8-bit RGB image with structure: the untrained student predicts several classes on it."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(blocks.repeat(4, 0).repeat(4, 1)[:height, :width])


def _save(array: np.ndarray, path: Path, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def _tree(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with a hash of its bytes: "nothing changed" is equality."""
    return {str(p.relative_to(folder)): _digest(p) for p in sorted(folder.rglob("*"))}


def _digest(path: Path) -> str:
    if not path.is_file():  # a folder, or a pipe that reading would block on
        return "not a file"
    if not os.access(path, os.R_OK):  # a locked file: its size and time stand for its bytes
        return f"locked {path.stat().st_size} {path.stat().st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mask(export: Path, image: Path, out: Path) -> np.ndarray:
    (written,) = set(predict(export, [image], out))
    return np.array(Image.open(written))


def _refused(export: Path, images: list[Path], out: Path, match: str, root: Path) -> None:
    """``predict`` refuses with a message matching ``match``, and nothing under ``root`` changed."""
    before = _tree(root)
    with pytest.raises(PredictError, match=match):
        predict(export, images, out)
    assert _tree(root) == before


# --------------------------------------------------------------------------------------------
# All or nothing


def test_a_bad_image_after_good_ones_writes_no_mask_and_no_out_folder(export, tmp_path):
    good = [_save(_pattern(seed=k), tmp_path / f"good{k}.png") for k in range(2)]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    _refused(export, [*good, tmp_path / "bad.png"], tmp_path / "masks", r"image '.*bad.png' cannot be decoded",
             tmp_path)
    assert not (tmp_path / "masks").exists()
    # A PNG whose data is cut short: its header opens, verify() finds the missing chunks.
    data = (tmp_path / "good0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _refused(export, [*good, tmp_path / "cut.png"], tmp_path / "masks", r"cut.png' cannot be decoded", tmp_path)
    # An existing --out keeps its old masks untouched.
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "good0_mask.png").write_bytes(b"an earlier mask")
    _refused(export, [*good, tmp_path / "bad.png"], tmp_path / "masks", r"bad.png' cannot be decoded", tmp_path)


def test_a_truncated_jpeg_fails_while_predicting_and_still_writes_nothing(export, tmp_path):
    # verify() does not decode a JPEG's data: the failure comes after the first image was predicted.
    good = _save(_pattern(), tmp_path / "good.png")
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(noise).save(data, format="JPEG", quality=95)
    (tmp_path / "late.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    _refused(export, [good, tmp_path / "late.jpg"], tmp_path / "masks", r"late.jpg' cannot be decoded.*truncated",
             tmp_path)
    assert not (tmp_path / "masks").exists()


def test_a_failed_write_removes_the_masks_and_folders_it_made(export, tmp_path, monkeypatch):
    images = [_save(_pattern(seed=k), tmp_path / f"im{k}.png") for k in range(3)]
    real_write = Path.write_bytes
    calls = []

    def full_disk(self: Path, data: bytes) -> int:
        calls.append(self)
        if len(calls) == 2:
            real_write(self, data[:10])  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    _refused(export, images, tmp_path / "new" / "masks", r"cannot be written to --out '.*masks': No space left",
             tmp_path)
    assert len(calls) == 2 and not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------------
# Paths of the wrong kind


def test_paths_of_the_wrong_kind_are_named_for_what_they_are(export, tmp_path):
    image = _save(_pattern(), tmp_path / "frame.png")
    (tmp_path / "folder.png").mkdir()
    _refused(export, [image, tmp_path / "folder.png"], tmp_path / "masks",
             r"image '.*folder.png' is a folder, not a file", tmp_path)
    _refused(export, [image / "x.png"], tmp_path / "masks",
             r"image '.*frame.png/x.png' does not exist: '.*frame.png' is a file, not a folder", tmp_path)
    os.mkfifo(tmp_path / "pipe.png")  # opening a pipe to decode it would wait for a writer forever
    _refused(export, [tmp_path / "pipe.png"], tmp_path / "masks", r"'.*pipe.png' is not a regular file", tmp_path)
    os.unlink(tmp_path / "pipe.png")

    (tmp_path / "taken").write_text("a file")
    _refused(export, [image], tmp_path / "taken", r"--out '.*taken' is a file, not a folder", tmp_path)
    _refused(export, [image], tmp_path / "taken" / "masks",
             r"--out '.*taken/masks' cannot be created: '.*taken' is a file, not a folder", tmp_path)
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    _refused(export, [image], tmp_path / "dangling", r"--out '.*dangling' is a broken symbolic link", tmp_path)
    os.unlink(tmp_path / "dangling")
    (tmp_path / "masks" / "frame_mask.png").mkdir(parents=True)
    _refused(export, [image], tmp_path / "masks", r"mask '.*frame_mask.png' cannot be written: a folder", tmp_path)

    _refused(export / "student.onnx", [image], tmp_path / "out", r"export folder '.*student.onnx' is a file, not a "
             r"folder", tmp_path)
    _refused(tmp_path / "no-export", [image], tmp_path / "out", r"export folder '.*no-export' does not exist", tmp_path)
    broken = tmp_path / "export"
    broken.mkdir()
    (broken / "distill.json").mkdir()
    _refused(broken, [image], tmp_path / "out", r"'.*distill.json' is a folder, not a file", tmp_path)
    (broken / "distill.json").rmdir()
    (broken / "distill.json").write_text((export / "distill.json").read_text())
    (broken / "student.onnx").mkdir()
    _refused(broken, [image], tmp_path / "out", r"ONNX model '.*student.onnx' is a folder, not a file", tmp_path)


def test_the_command_says_what_is_wrong_and_that_nothing_was_written(export, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # short relative names: rich wraps long lines
    _save(_pattern(), tmp_path / "a.png")
    Path("taken").write_text("a file")
    assert cli_main(["predict", str(export), "a.png", "--out", "taken"]) == 2
    text = " ".join(capsys.readouterr().err.split())
    assert "--out 'taken' is a file, not a folder" in text and "nothing was written" in text
    assert cli_main(["predict", str(export), "a.png", "a.png", "--out", "m[1]"]) == 0
    assert "1 masks in m[1]" in " ".join(capsys.readouterr().err.split())
    assert sorted(p.name for p in Path("m[1]").iterdir()) == ["a_mask.png"]


@as_root
def test_unreadable_files_say_permission_denied(export, tmp_path):
    image = _save(_pattern(), tmp_path / "frame.png")
    locked = _save(_pattern(), tmp_path / "locked.png")
    locked.chmod(0)
    _refused(export, [image, locked], tmp_path / "masks", r"image '.*locked.png' cannot be read: permission denied",
             tmp_path)
    copy = tmp_path / "export"
    copy.mkdir()
    for name in ("distill.json", "student.onnx"):
        (copy / name).write_bytes((export / name).read_bytes())
    for name in ("distill.json", "student.onnx"):
        (copy / name).chmod(0)
        _refused(copy, [image], tmp_path / "masks", rf"'.*{name}' cannot be read: permission denied", tmp_path)
        (copy / name).chmod(0o644)
    (tmp_path / "readonly").mkdir(mode=0o555)
    _refused(export, [image], tmp_path / "readonly", r"--out '.*readonly' is not writable: permission denied",
             tmp_path)
    _refused(export, [image], tmp_path / "readonly" / "masks",
             r"--out '.*readonly/masks' cannot be created in '.*readonly': permission denied", tmp_path)


def test_permission_checks_run_even_as_root(export, tmp_path, monkeypatch):
    # Root passes every os.access check on a real file: deny one path to check the refusal itself.
    image = _save(_pattern(), tmp_path / "frame.png")
    locked = _save(_pattern(), tmp_path / "locked.png")
    real_access = os.access
    monkeypatch.setattr(predict_module.os, "access",
                        lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    _refused(export, [image, locked], tmp_path / "masks", r"image '.*locked.png' cannot be read: permission denied",
             tmp_path)
    assert not (tmp_path / "masks").exists()


# --------------------------------------------------------------------------------------------
# Image modes


def test_16_bit_and_32_bit_and_float_grayscale_predict_as_the_8_bit_image(export, tmp_path):
    gray8 = _pattern()[..., 0]
    expected = _mask(export, _save(gray8, tmp_path / "gray8.png"), tmp_path / "m8")
    assert len(np.unique(expected)) > 1  # several classes: an equality below means something
    white = _mask(export, _save(np.full_like(gray8, 255), tmp_path / "white.png"), tmp_path / "mw")
    assert not np.array_equal(expected, white)  # Pillow's own RGB conversion clips I;16 to white

    sixteen = gray8.astype(np.uint16) * 257  # 255 -> 65535
    png16 = _save(sixteen, tmp_path / "gray16.png")
    assert Image.open(png16).mode == "I;16"
    assert np.array_equal(_mask(export, png16, tmp_path / "m16"), expected)
    pgm = _save(sixteen, tmp_path / "gray16.pgm")  # Pillow reads a 16-bit PGM as mode "I"
    assert Image.open(pgm).mode == "I"
    assert np.array_equal(_mask(export, pgm, tmp_path / "mpgm"), expected)
    int32 = np.rint(gray8.astype(np.float64) * (2**31 - 1) / 255).astype(np.int32)
    tiff32 = _save(int32, tmp_path / "gray32.tif")
    assert Image.open(tiff32).mode == "I"
    assert np.array_equal(_mask(export, tiff32, tmp_path / "m32"), expected)
    floats = _save(gray8.astype(np.float32) / 255, tmp_path / "grayf.tif")
    assert Image.open(floats).mode == "F"
    assert np.array_equal(_mask(export, floats, tmp_path / "mf"), expected)
    # One pixel off by less than half a step still rounds to the 8-bit value.
    nudged = sixteen.copy()
    nudged[0, 0] = min(int(nudged[0, 0]) + 128, 65535)
    assert np.array_equal(_mask(export, _save(nudged, tmp_path / "nudged.png"), tmp_path / "mn"), expected)


def test_alpha_palette_cmyk_and_bilevel_images_predict_as_pillow_converts_them(export, tmp_path):
    rgb = _pattern()
    expected = _mask(export, _save(rgb, tmp_path / "rgb.png"), tmp_path / "m")
    assert len(np.unique(expected)) > 1
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=2)  # nearly transparent
    assert np.array_equal(_mask(export, _save(rgba, tmp_path / "rgba.png"), tmp_path / "ma"), expected)
    gray = rgb[..., 0]
    la = np.stack([gray, np.zeros_like(gray)], axis=2)
    gray_mask = _mask(export, _save(gray, tmp_path / "l.png"), tmp_path / "ml")
    assert np.array_equal(_mask(export, _save(la, tmp_path / "la.png"), tmp_path / "mla"), gray_mask)
    palette = Image.fromarray(rgb).quantize(16)
    palette.save(tmp_path / "p.png")
    assert np.array_equal(_mask(export, tmp_path / "p.png", tmp_path / "mp"),
                          _mask(export, _save(np.asarray(palette.convert("RGB")), tmp_path / "p_rgb.png"),
                                tmp_path / "mp2"))
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "c.tif")
    assert np.array_equal(_mask(export, tmp_path / "c.tif", tmp_path / "mc"),
                          _mask(export, _save(np.asarray(cmyk.convert("RGB")), tmp_path / "c_rgb.png"),
                                tmp_path / "mc2"))
    bilevel = gray > 127
    Image.fromarray(bilevel).save(tmp_path / "one.png")
    assert Image.open(tmp_path / "one.png").mode == "1"
    assert np.array_equal(_mask(export, tmp_path / "one.png", tmp_path / "m1"),
                          _mask(export, _save(bilevel.astype(np.uint8) * 255, tmp_path / "one_l.png"),
                                tmp_path / "m1l"))


def test_grayscale_without_a_meaning_in_8_bits_is_refused_naming_file_and_mode(export, tmp_path, monkeypatch):
    good = _save(_pattern(), tmp_path / "good.png")
    negative = np.full((8, 8), -5, np.int32)
    _save(negative, tmp_path / "signed.tif")
    _refused(export, [good, tmp_path / "signed.tif"], tmp_path / "masks",
             r"image '.*signed.tif' \(PIL mode 'I'\) holds negative values", tmp_path)
    _save(np.full((8, 8), 3.5, np.float32), tmp_path / "depth.tif")
    _refused(export, [good, tmp_path / "depth.tif"], tmp_path / "masks",
             r"image '.*depth.tif' \(PIL mode 'F', float\) holds values in \[3.5, 3.5\]: .* \[0, 1\]", tmp_path)
    _save(np.full((8, 8), np.nan, np.float32), tmp_path / "nan.tif")
    _refused(export, [good, tmp_path / "nan.tif"], tmp_path / "masks", r"nan.tif' .* holds non-finite values",
             tmp_path)
    # Pillow 13 converts every mode it opens; a mode outside predict's list is refused before any work.
    cmyk = tmp_path / "c.tif"
    Image.fromarray(_pattern()).convert("CMYK").save(cmyk)
    monkeypatch.setattr(predict_module, "CONVERTED_MODES", predict_module.CONVERTED_MODES - {"CMYK"})
    _refused(export, [good, cmyk], tmp_path / "masks", r"image '.*c.tif' has PIL mode 'CMYK', which predict cannot "
             r"convert", tmp_path)
    assert not (tmp_path / "masks").exists()


# --------------------------------------------------------------------------------------------
# EXIF orientation


def test_exif_orientation_is_applied_and_the_mask_has_the_transposed_size(export, tmp_path):
    array = _pattern(24, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; viewers rotate 90 degrees clockwise
    rotated = _save(array, tmp_path / "phone.png", exif=exif)
    upright = _save(np.ascontiguousarray(np.rot90(array, k=-1)), tmp_path / "upright.png")
    mask = _mask(export, rotated, tmp_path / "m")
    assert len(np.unique(mask)) > 1
    assert mask.shape == (40, 24)  # (height, width) as shown, not the stored 24 x 40
    assert np.array_equal(mask, _mask(export, upright, tmp_path / "mu"))


def test_a_mask_that_would_overwrite_an_input_image_is_refused(export, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    scene = _save(_pattern(seed=0), photos / "scene.png")
    named_like_a_mask = _save(_pattern(seed=1), photos / "scene_mask.png")
    _refused(export, [scene, named_like_a_mask], photos,
             r"the mask of '.*scene.png' would be written over the input image '.*scene_mask.png'", tmp_path)


@pytest.mark.parametrize("shape,size", [((5, 24, 36), (37, 53)), ((3, 16, 24), (100, 150)), ((4, 30, 40), (15, 21))])
def test_masks_are_the_argmax_of_logits_resized_as_evaluation_resizes_them(shape, size):
    # The argmax first, enlarged pixel by pixel, lost the class boundaries evaluation scores.
    from distill.export.predict import upsampled_labels

    torch.manual_seed(0)
    logits = torch.randn(1, *shape)
    expected = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0].argmax(0)
    got = upsampled_labels(logits[0].numpy(), *size, rows=7)  # several blocks of rows
    assert got.dtype == np.uint8 and np.array_equal(got, expected.numpy())
