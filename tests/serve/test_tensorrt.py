"""TensorRT backend: runs only where the TensorRT runtime and a CUDA GPU are present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _trt_reason() -> str | None:
    try:
        from rn50.backends.tensorrt import _import_trt

        _import_trt()
    except Exception as e:
        return f"TensorRT runtime not available: {e}"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU: TensorRT plans need one"
    return None


REASON = _trt_reason()
pytestmark = [pytest.mark.tensorrt, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


@pytest.fixture(scope="module")
def plan(tmp_path_factory, trained_run) -> Path:
    from tests.conftest import _export_engine

    return _export_engine(tmp_path_factory, trained_run, "fp32", ".plan")


def test_plan_matches_onnx(capsys, plan, engine_fp32_onnx, fmnist_small):
    from serve import infer

    imgs = [str(fmnist_small / "val")]
    assert infer.main(["--engine", str(plan), *imgs, "--quiet", "--device", "gpu"]) == 0
    trt_lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert infer.main(["--engine", str(engine_fp32_onnx), *imgs, "--quiet"]) == 0
    ort_lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    agree = sum(a["topk"][0] == b["topk"][0] for a, b in zip(trt_lines, ort_lines)) / len(ort_lines)
    assert agree >= 0.99


@pytest.fixture(scope="module", params=["fp16", "int8"])
def reduced_plan(request, tmp_path_factory, trained_run) -> Path:
    """An FP16 plan (FP16 ONNX inside) and an INT8 plan (the s8s8 Q/DQ ONNX), built by the export CLI."""
    from tests.conftest import _export_engine

    return _export_engine(tmp_path_factory, trained_run, request.param, ".plan")


def test_reduced_precision_plans_serve_and_match_onnx(capsys, reduced_plan, engine_fp32_onnx, fmnist_small):
    """The whole .plan path for FP16 and INT8: export builds it (parity and, for INT8, the gate
    passed), serve.infer runs it on the GPU, and its top-1 agrees with the FP32 ONNX's."""
    from rn50.manifest import read_manifest
    from serve import infer

    m = read_manifest(reduced_plan)
    assert m["kind"] == "tensorrt" and m["parity"]["passed"] and m["strongly_typed"]
    if m["precision"] == "int8":
        assert m["int8_flavour"] == "s8s8" and m["int8"]["gate"]["passed"]
    imgs = [str(fmnist_small / "val")]
    assert infer.main(["--engine", str(reduced_plan), *imgs, "--quiet", "--device", "gpu"]) == 0
    trt_lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert infer.main(["--engine", str(engine_fp32_onnx), *imgs, "--quiet"]) == 0
    ort_lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(trt_lines) == len(ort_lines) > 0
    agree = sum(a["topk"][0] == b["topk"][0] for a, b in zip(trt_lines, ort_lines)) / len(ort_lines)
    assert agree >= (0.9 if m["precision"] == "int8" else 0.98)


def test_fp32_plan_is_built_without_tf32(plan):
    """TensorRT turns TF32 on for FP32 layers by default; an fp32 plan must not use it."""
    from rn50.manifest import read_manifest

    assert read_manifest(plan)["tf32"] is False


def test_foreign_plan_is_a_clear_error(tmp_path, plan):
    from rn50.backends import load_engine
    from rn50.errors import EngineError

    bad = tmp_path / "other.plan"
    bad.write_bytes(plan.read_bytes()[:64] + b"\0" * 1024)
    m = json.loads(Path(str(plan) + ".manifest.json").read_text())
    del m["artifact"]  # the real plan's sha256: this tests the runtime's refusal, not that record
    Path(str(bad) + ".manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="cannot load this plan.*built with TensorRT"):
        load_engine(bad)
