"""The network: torchvision's ``resnet50``, which is ResNet50 v1.5.

v1.5 puts the stride-2 of a downsampling bottleneck on the 3x3 convolution (``conv2``), not on
the first 1x1; torchvision's ``Bottleneck`` does exactly that.  The recipe's initialisation is
Kaiming-normal (fan_out, ReLU) for every convolution, BatchNorm gamma=1 / beta=0, and gamma=0 on
the last BatchNorm of each residual block (``bn3``) so every block starts as the identity.
torchvision does the first two in its constructor and the third with ``zero_init_residual=True``;
``tests/core/test_core.py`` checks all three rather than assuming them.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.resnet import Bottleneck

ARCH = "resnet50_v1.5"
HEAD = "fc"  # the classifier: the one module a class count changes


def is_head(name: str) -> bool:
    """Whether a parameter or state-dict key belongs to the classifier."""
    return name == HEAD or name.startswith(HEAD + ".")


def build_model(num_classes: int) -> nn.Module:
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    model = resnet50(weights=None, num_classes=num_classes, zero_init_residual=True)
    return model


def check_v15(model: nn.Module) -> None:
    """Raise if ``model`` is not the v1.5 layout (stride on the 3x3 of downsampling blocks)."""
    for name, m in model.named_modules():
        if isinstance(m, Bottleneck) and m.downsample is not None:
            s1 = m.conv1.stride if isinstance(m.conv1, nn.Conv2d) else None
            s2 = m.conv2.stride if isinstance(m.conv2, nn.Conv2d) else None
            if s1 != (1, 1) or s2 not in ((1, 1), (2, 2)):
                raise AssertionError(f"{name}: not ResNet50 v1.5 (conv1 stride {s1}, conv2 stride {s2})")


def param_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    """Split parameters for the optimizer: weight decay on conv and fc *weights* only.

    The recipe says no weight decay on BatchNorm gamma/beta. We also leave the fc bias (the only
    bias in ResNet50: its convolutions have none) out of weight decay, as NVIDIA's
    DeepLearningExamples ConvNets do with ``--nesterov``-free SGD and ``bn_weight_decay=False``:
    every 1-D parameter (BN gamma, BN beta, biases) is undecayed.

    Frozen parameters (``requires_grad=False``) are left out. With ``backbone_lr_scale`` other
    than 1, backbone and classifier get separate groups, the backbone's with that ``lr_scale``
    (fine-tuning: the loaded features move more slowly than the new classifier).
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    split = backbone_lr_scale != 1.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((split and not is_head(name), p.ndim > 1), []).append(p)
    return [
        {
            "params": ps,
            "weight_decay": weight_decay if decays else 0.0,
            "lr_scale": backbone_lr_scale if backbone else 1.0,
        }
        for (backbone, decays), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], not kv[0][1]))
    ]


def num_classes_of(state_dict: dict[str, torch.Tensor]) -> int:
    w = state_dict.get("fc.weight")
    if w is None:
        raise KeyError("fc.weight")
    return int(w.shape[0])
