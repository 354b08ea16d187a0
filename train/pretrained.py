"""Starting a run from a weights file on disk (``python -m train --init-from PATH``).

Read, never downloaded (no hub access is assumed): the file is whatever the user copied here.
Layouts understood, all ResNet50 v1.5 (stride 2 on the 3x3 convolution of downsampling blocks):

* torchvision's ``resnet50`` state dicts (the ``IMAGENET1K_V1``/``V2`` ``.pth`` files) and timm's
  ``resnet50`` state dicts (``pytorch_model.bin`` or ``model.safetensors``): the same key names
  as this project's model (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``fc``);
* NVIDIA DeepLearningExamples / NGC ConvNets checkpoints: ``{"state_dict": ..., "optimizer": ...,
  "epoch": ...}`` (also a bare state dict), keys prefixed ``module.`` when trained under DDP, and
  the stages as one ``nn.Sequential`` (``layers.0`` ... ``layers.3`` for ``layer1`` ... ``layer4``;
  the NGC 20.06 files already use ``layer1`` ...);
* training checkpoints that wrap the state dict under ``"state_dict"`` (timm's, DLE's) or
  ``"model"`` (torchvision's reference scripts), next to their optimizer and scheduler states and
  the command line as an ``argparse.Namespace`` (``"args"``);
* this project's own ``best.pt`` / ``last.pt``.

Every tensor but the classifier must be there with this model's shape (BatchNorm's
``num_batches_tracked`` counters may be absent: files saved before PyTorch 0.4.1 lack them and
nothing reads them with a fixed BN momentum). The classifier is loaded when its class count is
the data's and replaced by a freshly initialised one otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rn50.checkpoint import FORMAT, clean_state_dict, load_checkpoint, state_dict_mismatch, torch_load
from rn50.errors import CheckpointError, first_line
from rn50.manifest import sha256_file
from rn50.model import HEAD, build_model, is_head

FEATURES = 2048  # ResNet50's pooled feature width: the classifier's input
_DLE_STAGE = re.compile(r"^layers\.(\d+)\.")
# The one class loaded beyond tensors and plain containers: training scripts (torchvision's
# references/classification, timm's train.py) pickle their parsed command line with the weights.
# The weights-only unpickler rebuilds it by filling its __dict__ (no code from the file runs) and
# holds its fields to the same rules as the rest of the file, so a field of any other class is
# still refused.
ALLOWED_CLASSES = [argparse.Namespace]
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


@dataclass(frozen=True)
class Weights:
    """A weights file read and mapped to this project's key names."""

    path: str
    sha256: str
    layout: str
    state: dict[str, torch.Tensor] = field(repr=False)
    classes: list[str] | None = None  # the class names, where the file says (this project's checkpoints)

    @property
    def num_classes(self) -> int:
        return int(self.state[f"{HEAD}.weight"].shape[0])


def to_project_keys(state: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Map a state dict's keys to this project's names; returns it and what was mapped
    (``module.``/``_orig_mod.`` prefixes, DLE's ``layers.N`` stages)."""
    notes = []
    if any(k.startswith("module.") for k in state):
        notes.append("module. prefix")
    state = clean_state_dict(state)
    if any(_DLE_STAGE.match(k) for k in state):
        notes.append("layers.N stages")
        state = {_DLE_STAGE.sub(lambda m: f"layer{int(m.group(1)) + 1}.", k): v for k, v in state.items()}
    return state, notes


def _load_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file: {first_line(e)}") from e
    try:
        with torch.serialization.safe_globals(ALLOWED_CLASSES):
            return torch_load(path, "weights file")
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a refused class: garbage or a truncated file
            raise CheckpointError(f"{path}: not a readable weights file (truncated or corrupt?)") from e
        m = _REFUSED_GLOBAL.search(str(e))
        raise CheckpointError(
            f"{path}: pickles {m.group(1) if m else 'an object'}, which is not loaded: weights files are "
            f"read without running code from them (weights_only), so only tensors, plain containers and "
            f"argparse.Namespace. If you trust the file, save its state dict alone (then --init-from "
            f"weights.pth) with: {extract_command(path)}"
        ) from e


def extract_command(path: Path) -> str:
    """A shell command that writes ``weights.pth``, the state dict alone, from a file that pickles
    more than this loader reads: a training checkpoint (state dict under ``"state_dict"`` or
    ``"model"``), a bare state dict or a whole pickled model. It runs the file's code (full
    unpickling), so it is for files the user trusts, which only they can judge."""
    code = (
        f'import torch; ck = torch.load({json.dumps(str(path))}, map_location="cpu", weights_only=False); '
        'sd = ck.get("state_dict", ck.get("model", ck)) if isinstance(ck, dict) else ck; '
        'torch.save(sd.state_dict() if hasattr(sd, "state_dict") else sd, "weights.pth")'
    )
    return f"python -c {shlex.quote(code)}"


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Any], str]:
    """The state dict inside a loaded file, and where it was."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return load_checkpoint(path)["model"], "rn50 checkpoint"  # checks the format, version and manifest
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner, f'state dict under "{key}"'
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, "state dict"
    raise CheckpointError(
        f"{path}: no state dict found (neither a dict of tensors nor one under 'state_dict' or 'model')"
    )


def read_weights(path: str | os.PathLike[str]) -> Weights:
    """Read ``path``, map its keys and check that it is ResNet50 v1.5 up to the classifier;
    CheckpointError names the file and the first key that does not fit."""
    from rn50.checkpoint import not_weights

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a weights file")
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    other = not_weights(path, "weights file")
    if other:
        raise CheckpointError(other)
    raw, where = _unwrap(_load_file(path), path)
    state, notes = to_project_keys(raw)
    layout = where + (f" ({', '.join(notes)})" if notes else "")
    ref = build_model(2).state_dict()
    # the classifier is checked on its own below: its row count is the file's class count
    expected = {
        k: v for k, v in ref.items() if not is_head(k) and not (k.endswith("num_batches_tracked") and k not in state)
    }
    why = state_dict_mismatch(expected, {k: v for k, v in state.items() if not is_head(k)})
    if why is None:
        w, b = state.get(f"{HEAD}.weight"), state.get(f"{HEAD}.bias")
        if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
            why = f"tensor {HEAD}.weight or {HEAD}.bias is missing"
        elif w.dim() != 2 or w.shape[1] != FEATURES or tuple(b.shape) != (w.shape[0],):
            why = (
                f"{HEAD}.weight has shape {tuple(w.shape)} and {HEAD}.bias {tuple(b.shape)}; "
                f"ResNet50's classifier is (classes, {FEATURES}) and (classes,)"
            )
    if why is not None:
        raise CheckpointError(f"{path}: not ResNet50 v1.5 weights ({layout}): {why}")
    obj_classes = None
    if where == "rn50 checkpoint":
        obj_classes = list(load_checkpoint(path)["manifest"]["classes"])
    return Weights(str(path), sha256_file(path), layout, state, obj_classes)


def apply_weights(model: nn.Module, w: Weights, classes: list[str] | None = None) -> dict[str, Any]:
    """Load ``w`` into ``model``; its classifier only when it classifies the same classes: the
    same count, and the same names where the file records them (a checkpoint of this project
    trained on other classes gets a new classifier even with as many of them). Returns the record
    for the manifest: source path and sha256, layout, and what was loaded, skipped and newly
    initialised."""
    own = model.state_dict()
    n_model = int(own[f"{HEAD}.weight"].shape[0])
    keep_head = w.num_classes == n_model and (w.classes is None or classes is None or w.classes == list(classes))
    load = {k: v for k, v in w.state.items() if keep_head or not is_head(k)}
    result = model.load_state_dict(load, strict=False)
    if result.unexpected_keys:  # read_weights has checked every key; this would be a bug
        raise CheckpointError(f"{w.path}: unexpected tensors {result.unexpected_keys[:3]}")
    skipped = [] if keep_head else sorted(k for k in w.state if is_head(k))
    return {
        "path": w.path,
        "sha256": w.sha256,
        "layout": w.layout,
        "classes_in_file": w.num_classes,
        "same_classes": keep_head,
        "loaded": len(load),
        "skipped": skipped,
        "new": sorted(k for k in result.missing_keys if is_head(k)),
        # BatchNorm fills these in itself when a file lacks them (torch < 0.4.1 saved none)
        "absent_counters": sum(k.endswith("num_batches_tracked") and k not in w.state for k in own),
    }


def describe(rec: dict[str, Any], n_classes: int) -> str:
    """One line for the log: what was loaded, skipped and newly initialised."""
    s = f"init-from {rec['path']} ({rec['layout']}, sha256 {rec['sha256'][:12]}): loaded {rec['loaded']} tensors"
    if rec["skipped"]:
        why = (
            f"the file's classifier has {rec['classes_in_file']} classes, the data {n_classes}"
            if rec["classes_in_file"] != n_classes
            else "the file's classes are other ones than the data's"
        )
        s += f"; skipped {', '.join(rec['skipped'])} ({why})"
    s += f"; newly initialised: {', '.join(rec['new']) or 'nothing'}"
    if rec["absent_counters"]:
        s += f"; {rec['absent_counters']} BatchNorm num_batches_tracked counters not in the file (start at 0)"
    return s


def freeze_backbone(model: nn.Module) -> None:
    """Train the classifier only: every other parameter stops taking gradients."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_head(name))


def hold_backbone_statistics(model: nn.Module) -> None:
    """Keep a frozen backbone's BatchNorm layers in eval mode (call after ``model.train()``), so
    its running statistics stay the loaded ones and the features match what the head trains on."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not is_head(name):
            m.eval()
