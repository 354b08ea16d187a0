"""rn50.compare: the one logits comparison and its table of bounds (export parity, INT8 gate, serve.validate)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rn50 import compare as cmp


def _logits(pred: list[int], n_classes: int = 4, value: float = 5.0) -> np.ndarray:
    out = np.zeros((len(pred), n_classes), np.float32)
    out[np.arange(len(pred)), pred] = value
    return out


def test_each_bound_decides() -> None:
    labels = np.zeros(200, np.int64)
    ref = _logits([0] * 200)
    same = cmp.compare_logits(ref, ref.copy(), labels, "fp32")
    assert same.passed and same.problem is None and same.top1_agreement == 100 and same.top1_drop == 0
    # logits 2e-3 of the scale apart: too far for fp32 (1e-3), fine for fp16 (2e-2)
    near = ref + np.float32(2e-3 * 5.0)
    r = cmp.compare_logits(ref, near, labels, "fp32")
    assert not r.passed and "logit scale" in (r.problem or "")
    assert cmp.compare_logits(ref, near, labels, "fp16").passed
    # int8: logits are not bounded, agreement and the one-sided top-1 drop are
    assert cmp.compare_logits(ref, ref * 1.5, labels, "int8").passed
    lose = _logits([0] * 198 + [1] * 2)  # 1 point lost, 99 % agreement
    r = cmp.compare_logits(ref, lose, labels, "int8")
    assert not r.passed and "loses 1.00 points" in (r.problem or "") and r.top1_drop == pytest.approx(1.0)
    r = cmp.compare_logits(lose, ref, labels, "int8")  # a gain is reported, not failed
    assert r.passed and r.top1_drop == pytest.approx(-1.0)
    other = _logits([1] * 30 + [0] * 170)
    ref_shift = _logits([0] * 170 + [1] * 30)  # same accuracy (85 %), 70 % agreement
    r = cmp.compare_logits(ref_shift, other, labels, "int8")
    assert r.top1_drop == 0 and not r.passed and "agreement" in (r.problem or "")


def test_bounds_can_be_overridden_and_unknown_precisions_refused() -> None:
    labels = np.zeros(100, np.int64)
    ref, lose = _logits([0] * 100), _logits([0] * 99 + [1])
    assert not cmp.compare_logits(
        ref, lose, labels, "int8", dataclasses.replace(cmp.BOUNDS["int8"], max_top1_drop=0.5)
    ).passed
    assert cmp.compare_logits(
        ref, lose, labels, "int8", dataclasses.replace(cmp.BOUNDS["int8"], max_top1_drop=1.0)
    ).passed
    assert set(cmp.BOUNDS) == {"fp32", "fp16", "int8"}  # the precisions export writes
    with pytest.raises(ValueError, match="bf16"):
        cmp.compare_logits(ref, ref, labels, "bf16")
    with pytest.raises(ValueError, match="do not match"):
        cmp.compare_logits(ref, ref[:5], labels, "fp32")


def test_serve_validate_judges_with_the_same_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve import validate

    labels = np.zeros(100, np.int64)
    ref, lose = _logits([0] * 100), _logits([0] * 99 + [1])
    assert validate.compare(ref, lose, labels, "fp32")["passed"] is False
    monkeypatch.setitem(
        cmp.BOUNDS, "fp32", cmp.Bounds(max_rel_logit_diff=None, min_top1_agreement=50.0, max_top1_drop=5.0)
    )
    r = validate.compare(ref, lose, labels, "fp32")
    assert r["passed"] is True and r["bound_top1_points"] == 5.0 and r["min_top1_agreement"] == 50.0


def test_to_dict_has_the_manifest_fields() -> None:
    labels = np.array([0, 1])
    d = cmp.compare_logits(_logits([0, 1]), _logits([0, 1]), labels, "fp16").to_dict()
    for k in (
        "images",
        "max_abs_logit_diff",
        "max_abs_logit",
        "rel_logit_diff",
        "top1_agreement",
        "reference",
        "candidate",
        "bounds",
        "problem",
        "passed",
        "top1_drop",
    ):
        assert k in d
    assert d["passed"] is True and d["bounds"]["max_rel_logit_diff"] == 2e-2


def test_non_finite_logits_never_pass() -> None:
    """NaN compares false with every bound, so it must be judged first: one NaN row fails fp32."""
    labels = np.zeros(4, dtype=np.int64)
    ref = np.tile(np.array([[3.0, 1.0, 0.0]], dtype=np.float32), (4, 1))
    got = ref.copy()
    got[1] = np.nan
    r = cmp.compare_logits(ref, got, labels, "fp32")
    assert not r.passed and "1 of 4 images have non-finite logits" in (r.problem or "")
    assert np.isfinite(r.max_abs_logit_diff)  # the report stays valid JSON
    got[1] = np.inf
    assert not cmp.compare_logits(ref, got, labels, "int8").passed


def test_parity_bounds_leave_accuracy_to_the_gate() -> None:
    """Export parity judges logits and agreement only: on 256 images one image is 0.4 point, so a
    top-1 bound there would fail an artifact the 2,000-image gate passes."""
    n = 256
    labels = np.zeros(n, dtype=np.int64)
    ref = np.tile(np.array([[2.0, 1.0]], dtype=np.float32), (n, 1))
    got = ref.copy()
    got[:2] = [1.0, 2.0]  # two images flip: 99.2 % agreement, 0.78 point lost
    table = cmp.compare_logits(ref, got, labels, "int8")
    assert not table.passed and "loses 0.78 points" in (table.problem or "")  # above the 0.5 of BOUNDS["int8"]
    p = cmp.compare_logits(ref, got, labels, "int8", cmp.parity_bounds("int8"))
    assert p.passed and p.bounds.max_top1_drop is None
    assert cmp.parity_bounds("fp16").max_rel_logit_diff == cmp.BOUNDS["fp16"].max_rel_logit_diff
