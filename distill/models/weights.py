"""Weights files: reading them without executing code, and loading them whole into a model."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch
from torch import nn


class ModelError(ValueError):
    """A model cannot be built or its weights cannot be loaded; the message says why."""


def check_weights_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a weights file that exists and can be read, without reading it; else ModelError."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"checkpoint '{path}' is a folder; give its weights file "
                         "(for a run folder: <stage>/best.safetensors)")
    if not path.is_file():
        raise ModelError(f"checkpoint '{path}' does not exist")
    if not os.access(path, os.R_OK):
        raise ModelError(f"checkpoint '{path}' cannot be read: permission denied")
    if path.suffix == ".onnx":
        raise ModelError(f"checkpoint '{path}' is an ONNX model: distill loads weights from "
                         ".safetensors or a torch state dict")
    return path


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read weights without executing code: safetensors, or ``torch.load(weights_only=True)``."""
    path = check_weights_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:
            raise ModelError(f"checkpoint '{path}' is not a readable safetensors file: {error}") from None
    import argparse

    try:
        # torchvision's reference scripts save their argparse.Namespace beside the weights:
        # plain data, allowed without allowing code.
        # (safe_globals is torch 2.5's; on 2.4 such a file is refused as holding an object)
        allowed = getattr(torch.serialization, "safe_globals", None)
        with allowed([argparse.Namespace]) if allowed else contextlib.nullcontext():
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # includes the UnpicklingError raised for pickles carrying code
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # torch's message carries terminal colours
        if text.startswith("Weights only load failed"):  # torch's advice runs to a page
            unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            what = f"a Python object ({unsupported.group(1)})" if unsupported else "Python objects"
            raise ModelError(
                f"checkpoint '{path}' could not be loaded safely (weights_only=True): it holds {what} "
                "besides its weights, and loading it could run code. If you trust the file, save "
                "its state dict alone (torch.save(torch.load(path, weights_only=False)['model'], "
                "'weights.pth'), or the key that holds it) and give that file") from None
        first = text.splitlines()[0] if text else type(error).__name__
        if "weights_only" not in first and "Unpickl" not in type(error).__name__:
            first = f"not a torch checkpoint ({first})"  # a text file, truncated bytes...
        raise ModelError(f"checkpoint '{path}' could not be loaded safely (weights_only=True): "
                         f"{first}") from None
    # A training checkpoint wraps the weights beside its epoch, optimizer...: under one of the
    # keys the common trainers use (Lightning and mmcv `state_dict`, torchvision's references
    # and timm `model`, EMA weights `state_dict_ema`/`model_ema` are not the trained model).
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint '{path}' does not hold a state dict of tensors")
    return state


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a state dict into ``model``; any missing, unexpected or mis-shaped key is an error."""
    state = read_state_dict(path)
    for prefix in ("module.", "_orig_mod."):  # DDP and torch.compile wrappers
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}")
        if mis_shaped:
            lines.append(f"different shapes ({len(mis_shaped)}): {'; '.join(mis_shaped[:4])}")
        raise ModelError(
            f"checkpoint '{path}' does not fit the model (another architecture or class count?):\n  "
            + "\n  ".join(lines)
        )
    model.load_state_dict(state)
