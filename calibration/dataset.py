"""The INT8 calibration set.

Drawn from the *training* split (never the validation images the gate scores), deterministic
(seeded) and class-balanced (:func:`rn50.layout.balanced_subset`), and fed through
:func:`rn50.batches.iter_split`, i.e. exactly the validation preprocessing the engine sees at
serving time (calibrating with other preprocessing is a known way to lose all accuracy:
NVIDIA/TensorRT#2255).

Default size 512: TensorRT's documentation suggests about 500 images for ImageNet classifiers;
with 10 classes that is 51 or 52 per class, far more than the activation histograms need to settle,
and it calibrates in well under a minute on 2 CPU cores at 32 px.
"""

from __future__ import annotations

from collections.abc import Sequence

from rn50.layout import balanced_subset

DEFAULT_SIZE = 512


def calibration_set(files: Sequence[str], labels: Sequence[int], size: int = DEFAULT_SIZE, seed: int = 0) -> list[str]:
    """``size`` training files (all, if fewer), class-balanced, in a fixed shuffled order."""
    return balanced_subset(files, labels, size, seed=seed)[0]
