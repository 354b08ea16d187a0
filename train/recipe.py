"""NVIDIA's ResNet50 v1.5 recipe: optimizer, learning-rate schedule, loss, MixUp, presets.

* SGD, momentum 0.875, no Nesterov.
* Learning rate 0.256 per 256 images of *global* batch, scaled linearly.
* Cosine schedule stepped every iteration, after a linear warmup (on by default for a global
  batch of 512 and more; its length is in epochs).
* Weight decay 1/32768 on convolution and fc weights only: no decay on BatchNorm gamma/beta,
  nor on the fc bias (every 1-D parameter; see :func:`rn50.model.param_groups`).
* Label smoothing 0.1.
* Presets: 50, 90 and 250 epochs; MixUp (alpha 0.2) with the 250-epoch preset.

Fine-tuning from loaded weights (``--init-from``) has its own preset, ``finetune``:

* lr 0.0256 per 256 images, a tenth of the recipe's: the loaded features are already useful, and
  the from-scratch rate moves them far from where they were in the first steps;
* 10 epochs of the same cosine schedule (short: it starts from a good point, and long schedules
  on a small data set overfit it);
* a linear warmup over the first tenth of the schedule, whatever the batch: the new classifier
  starts random, and its first large gradients would otherwise flow into the loaded backbone;
* no re-initialisation of the loaded weights (only a classifier of another class count is new).
"""

from __future__ import annotations

import math

import torch
from torch import nn

BASE_LR = 0.256
BASE_BATCH = 256
MOMENTUM = 0.875
WEIGHT_DECAY = 1.0 / 32768
LABEL_SMOOTHING = 0.1
MIXUP_ALPHA = 0.2
# preset -> (epochs, warmup epochs at global batch >= WARMUP_MIN_GLOBAL_BATCH, mixup alpha)
PRESETS = {50: (50, 2, 0.0), 90: (90, 2, 0.0), 250: (250, 5, MIXUP_ALPHA)}
WARMUP_MIN_GLOBAL_BATCH = 512
FINETUNE_LR_PER_256 = BASE_LR / 10
FINETUNE_EPOCHS = 10
FINETUNE_WARMUP_FRACTION = 0.1


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 convolutions natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_amp(amp: object, dtype: str, cuda: bool) -> bool:
    """Whether autocast runs: "native-bf16" means on with CUDA, and on a CPU only where bf16 is
    native; True means on with CUDA, and on a CPU for bf16 only (CPU autocast has no fp16)."""
    if amp == "native-bf16":
        return cuda or (dtype == "bf16" and cpu_has_native_bf16())
    return bool(amp) and (cuda or dtype == "bf16")


def effective_lr(lr_per_256: float, global_batch: int) -> float:
    return lr_per_256 * global_batch / BASE_BATCH


def default_warmup(preset_warmup: int, global_batch: int) -> int:
    return preset_warmup if global_batch >= WARMUP_MIN_GLOBAL_BATCH else 0


def make_optimizer(
    model: nn.Module,
    lr: float,
    momentum: float = MOMENTUM,
    weight_decay: float = WEIGHT_DECAY,
    backbone_lr_scale: float = 1.0,
) -> torch.optim.SGD:
    """SGD over the trainable parameters; ``backbone_lr_scale`` multiplies the learning rate of
    everything but the classifier (each group's ``lr_scale``, applied by :class:`WarmupCosine`)."""
    from rn50.model import param_groups

    groups = param_groups(model, weight_decay, backbone_lr_scale)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False)


class WarmupCosine:
    """lr(step): linear from lr/warmup_steps up to lr over ``warmup_steps``, then cosine to 0.

    Stateless in the step, so resuming only needs the step counter.
    """

    def __init__(self, peak_lr: float, total_steps: int, warmup_steps: int = 0):
        if total_steps <= 0:
            raise ValueError("total_steps must be positive")
        self.peak, self.total, self.warmup = peak_lr, total_steps, min(warmup_steps, total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        t = min(step - self.warmup, span) / span
        return 0.5 * self.peak * (1.0 + math.cos(math.pi * t))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr to the schedule's, times the group's ``lr_scale`` (default 1);
        returns the schedule's lr."""
        lr = self(step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr


def mixup(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    alpha: float,
    smoothing: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp with label smoothing: returns mixed inputs and soft targets (rows sum to 1)."""
    t = smooth_one_hot(y, num_classes, smoothing)
    if alpha <= 0:
        return x, t
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * t + (1 - lam) * t[perm]


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    t = torch.full((y.shape[0], num_classes), off, device=y.device)
    t.scatter_(1, y.view(-1, 1), 1.0 - smoothing + off)
    return t


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
