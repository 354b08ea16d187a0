"""One comparison of an artifact's logits with a reference's, and one table of bounds per precision.

Used by export's parity check (artifact vs the PyTorch checkpoint), the INT8 accuracy gate (INT8
vs FP32 ONNX) and ``serve.validate`` (engine vs the checkpoint), so all three measure and judge
the same way:

* ``max_rel_logit_diff``: the largest |logit difference| relative to the reference's logit scale
  ``max(1, max |logit|)``. fp32 (and fp32 AOTInductor): the same arithmetic up to reassociation,
  1e-3; fp16: a 10-bit mantissa through 50 layers, 2e-2; int8: not bounded (logits move by
  several percent), the accuracy bounds decide.
* ``min_top1_agreement``: the share of images (%) whose top-1 class is the reference's; the same
  accuracy is not enough, a different model can score the same.
* ``max_top1_drop``: the most points of top-1 the artifact may lose against the reference. One
  sided, as in MLPerf's "99 % of the reference": a gain on a finite sample is reported, not
  failed (the images int8 flips go both ways); divergence either way is what agreement catches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .metrics import topk_accuracy


@dataclass(frozen=True)
class Bounds:
    max_rel_logit_diff: float | None  # None: not bounded
    min_top1_agreement: float  # percent
    max_top1_drop: float | None  # points; None: not bounded


BOUNDS: dict[str, Bounds] = {
    "fp32": Bounds(max_rel_logit_diff=1e-3, min_top1_agreement=99.5, max_top1_drop=0.05),
    "fp16": Bounds(max_rel_logit_diff=2e-2, min_top1_agreement=99.0, max_top1_drop=0.1),
    "int8": Bounds(max_rel_logit_diff=None, min_top1_agreement=90.0, max_top1_drop=0.5),
}


def bounds_for(precision: str) -> Bounds:
    if precision not in BOUNDS:
        raise ValueError(f"no comparison bounds for precision {precision!r} (known: {', '.join(BOUNDS)})")
    return BOUNDS[precision]


def parity_bounds(precision: str) -> Bounds:
    """The bounds of export's parity check: the table's logit and agreement bounds, no accuracy
    bound. Parity runs on a few hundred images, where one image is 0.4 point of top-1 or more;
    accuracy is judged on larger samples, by the INT8 gate and by ``serve.validate``."""
    return replace(bounds_for(precision), max_top1_drop=None)


@dataclass(frozen=True)
class LogitComparison:
    """The candidate's logits against the reference's on the same images (labels known)."""

    images: int
    precision: str
    bounds: Bounds
    max_abs_logit_diff: float
    max_abs_logit: float  # the reference's logit scale
    rel_logit_diff: float  # max_abs_logit_diff / max(1, max_abs_logit)
    top1_agreement: float  # percent
    reference: dict[str, float] = field(default_factory=dict)  # top1, top5 (percent)
    candidate: dict[str, float] = field(default_factory=dict)
    problem: str | None = None  # the first bound missed, None when all are met

    @property
    def passed(self) -> bool:
        return self.problem is None

    @property
    def top1_drop(self) -> float:
        """Points of top-1 lost against the reference (negative: gained)."""
        return self.reference["top1"] - self.candidate["top1"]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "top1_drop": self.top1_drop}


def compare_logits(
    reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray, precision: str, bounds: Bounds | None = None
) -> LogitComparison:
    """Compare ``candidate`` logits (N, classes) with ``reference`` on images labelled ``labels``,
    judged by ``bounds`` (default: the table's for ``precision``)."""
    ref = np.asarray(reference, dtype=np.float32)
    got = np.asarray(candidate, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1)
    if ref.shape != got.shape or ref.ndim != 2 or ref.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {ref.shape} / {got.shape} and labels {labels.shape} do not match")
    b = bounds or bounds_for(precision)
    n = int(labels.shape[0])
    finite = np.isfinite(got).all(axis=1)  # NaN or inf compare false with every bound: judged first
    diff = float(np.abs(ref[finite] - got[finite]).max()) if finite.any() else 0.0
    scale = float(np.abs(ref).max()) if n else 0.0
    rel = diff / max(1.0, scale)
    agree = float((ref.argmax(1) == got.argmax(1)).mean() * 100) if n else 0.0
    r_acc, c_acc = topk_accuracy(ref, labels, (1, 5)), topk_accuracy(got, labels, (1, 5))
    reference_acc = {"top1": r_acc[1], "top5": r_acc[5]}
    candidate_acc = {"top1": c_acc[1], "top5": c_acc[5]}
    drop = reference_acc["top1"] - candidate_acc["top1"]
    problem = None
    if not finite.all():
        problem = f"{int((~finite).sum())} of {n} images have non-finite logits (NaN or inf)"
    elif b.max_rel_logit_diff is not None and rel > b.max_rel_logit_diff:
        problem = (
            f"max |logit difference| {diff:.3g} is {rel:.3g} of the logit scale {max(1.0, scale):.3g}, "
            f"above the {b.max_rel_logit_diff:g} allowed for {precision}"
        )
    elif agree < b.min_top1_agreement:
        problem = f"top-1 agreement {agree:.2f}% is below the {b.min_top1_agreement}% required for {precision}"
    elif b.max_top1_drop is not None and drop > b.max_top1_drop + 1e-9:
        problem = (
            f"top-1 {candidate_acc['top1']:.2f}% loses {drop:.2f} points against the reference's "
            f"{reference_acc['top1']:.2f}%, more than the {b.max_top1_drop} allowed for {precision}"
        )
    return LogitComparison(
        images=n,
        precision=precision,
        bounds=b,
        max_abs_logit_diff=diff,
        max_abs_logit=scale,
        rel_logit_diff=rel,
        top1_agreement=agree,
        reference=reference_acc,
        candidate=candidate_acc,
        problem=problem,
    )
