"""bench.gpu_check's rows for the checkpoint served compiled: the commands the infer and serve
stages run for it, and table 4's end-to-end against model-only ratios and the issue's goal line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import gpu_check as gc


def _args(tmp_path: Path) -> Any:
    (tmp_path / "data" / "val").mkdir(parents=True)
    return gc.build_parser().parse_args(["--results", str(tmp_path / "res"), "--data", str(tmp_path / "data")])


@pytest.fixture
def commands(monkeypatch) -> list[list[str]]:
    """The commands the stages run (nothing runs); serve.infer "writes" its summary and predictions."""
    seen: list[list[str]] = []

    def fake_run(results: gc.Results, name: str, args: list[Any], timeout: float | None = None) -> dict[str, Any]:
        a = [str(x) for x in args]
        seen.append(a)
        if a[:2] == ["-m", "serve.infer"]:
            Path(a[a.index("--summary") + 1]).write_text(json.dumps({"images_per_s": 1.0}))
            Path(a[a.index("--output") + 1]).write_text(json.dumps({"path": "x.jpg", "topk": [1]}) + "\n")
        return {"rc": 0, "wall_s": 0.0, "command": " ".join(a), "log": f"{name}.log", "timed_out": False}

    monkeypatch.setattr(gc, "run", fake_run)
    return seen


def _flags(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


@pytest.mark.parametrize("cuda", [True, False], ids=["gpu", "cpu-smoke"])
def test_serve_stage_serves_the_compiled_checkpoint_both_ways(tmp_path, commands, cuda):
    a = _args(tmp_path)
    res = gc.Results(a.results)
    (a.results / "train").mkdir()
    (a.results / "train" / "best.pt").write_bytes(b"")
    gc.stage_serve(a, res, cuda)
    infers = [c for c in commands if c[:2] == ["-m", "serve.infer"]]
    compiled = [c for c in infers if "--pt-compile" in c]
    decodings = ["auto", "cpu"] if cuda else ["cpu"]
    assert len(infers) == 2 * len(decodings) and len(compiled) == len(decodings)
    for c, decode in zip(compiled, decodings):
        assert _flags(c, "--engine") == str(a.results / "train" / "best.pt")
        assert _flags(c, "--pt-precision") == ("fp16" if cuda else "fp32")  # the CPU refuses fp16
        assert (_flags(c, "--decode-on"), _flags(c, "--batch-size")) == (decode, "256")
    # the first engine's rows keep their keys; the compiled one's are beside them
    assert res["serve/cpu"] and res[f"serve/{gc.PT_COMPILED}/cpu"]["images_per_s"] == 1.0
    assert (res[f"serve/{gc.PT_COMPILED}/agreement"] is not None) == cuda


def test_infer_stage_validates_the_compiled_checkpoint(tmp_path, commands):
    a = _args(tmp_path)
    res = gc.Results(a.results)
    (a.results / "train").mkdir()
    best = a.results / "train" / "best.pt"
    best.write_bytes(b"")
    gc.stage_infer(a, res, cuda=True)
    val = [c for c in commands if c[:2] == ["-m", "serve.validate"] and _flags(c, "--engine") == str(best)]
    assert len(val) == 1
    assert _flags(val[0], "--checkpoint") == str(best) and "--limit" not in val[0]  # the whole split on a GPU
    assert (_flags(val[0], "--pt-precision"), "--pt-compile" in val[0]) == ("fp16", True)
    assert res[f"validate/{gc.PT_COMPILED}"]["rc"] == 0


def _served(engine: str, backend: str, provider: str, ips: float, after: float, dali: str = "gpu") -> dict[str, Any]:
    return {
        "rc": 0,
        "log": "l",
        "engine": engine,
        "backend": backend,
        "provider": provider,
        "images": 10000,
        "images_per_s": ips,
        "images_per_s_after_first_batch": after,
        "batch_size": 256,
        "latency_ms": {"p50": 11.0},
        "dali_device": dali,
        "engine_device": "cuda",
    }


def test_table_compares_end_to_end_with_the_model_alone(tmp_path):
    res = gc.Results(tmp_path)
    res.put(
        "inference",
        {
            "rows": [
                {"engine": "pytorch eager fp32", "batch": 256, "images_per_s": 7466.0, "p50_ms": 34.3},
                {"engine": "torch.compile fp16 (reduce-overhead)", "batch": 32, "images_per_s": 17610.0},
                {"engine": "torch.compile fp16 (reduce-overhead)", "batch": 256, "images_per_s": 24000.0},
            ]
        },
    )
    compiled = "cuda:0 (torch.compile fp16, CUDA graphs, channels_last, batch 256)"
    res.put("serve/gpu", _served("runs/best.pt", "pytorch", "cuda:0 (eager fp32, channels_last)", 3733.0, 7000.0))
    res.put(f"serve/{gc.PT_COMPILED}/gpu", _served("runs/best.pt", "pytorch", compiled, 18000.0, 21600.0))
    res.put(f"serve/{gc.PT_COMPILED}/cpu", {"rc": 2, "log": "logs/serve-pt-compiled-cpu.log"})
    t = gc.table(gc.Results(tmp_path))
    assert (
        "| DALI mixed (nvJPEG + GPU resize) | best.pt (pytorch, cuda:0 (eager fp32, channels_last)) | 10000 | 3,733 "
        "| 7,000 | 7,466 (pytorch eager fp32) | 0.50x / 0.94x | 11.0 ms | 256 |"
    ) in t
    assert (
        f"| DALI mixed (nvJPEG + GPU resize) | best.pt (pytorch, {compiled}) | 10000 | 18,000 | 21,600 "
        "| 24,000 (torch.compile fp16 (reduce-overhead)) | 0.75x / 0.90x | 11.0 ms | 256 |"
    ) in t
    assert "| the checkpoint compiled | - | failed (logs/serve-pt-compiled-cpu.log) |" in t
    assert "at batch 256: 0.75x (0.90x after the first batch): not met." in t


def test_model_only_engine_names_match_bench_gpu_inference():
    assert gc.model_only_engine("pytorch", "cuda:0 (torch.compile fp16, CUDA graphs, channels_last, batch 256)") == (
        "torch.compile fp16 (reduce-overhead)"
    )
    assert gc.model_only_engine("pytorch", "cpu (torch.compile fp32, channels_last, batch 8, 2 threads)") == (
        "torch.compile fp32"
    )
    assert gc.model_only_engine("pytorch", "cuda:0 (eager fp32, TF32 convolutions, channels_last)") == (
        "pytorch eager fp32"
    )
    assert gc.model_only_engine("aoti", "cuda:0") == "aotinductor fp32 (.pt2)"
    assert gc.model_only_engine("onnxruntime", "CPUExecutionProvider") is None
    # each is a row name bench.gpu_inference writes
    src = (Path(gc.__file__).parent / "gpu_inference.py").read_text()
    for name in (
        "torch.compile fp16 (reduce-overhead)",
        "torch.compile fp32",
        "pytorch eager fp32",
        "pytorch eager fp16",
    ):
        assert f'"{name}"' in src, name
    assert '"aotinductor fp32 (.pt2)"' in src


def test_no_export_runs_the_checkpoint_rows_only(tmp_path, commands):
    """--no-export (a short GPU session): no export runs, and an earlier run's .pt2 is removed so the
    serve stage cannot serve it as this run's."""
    a = gc.build_parser().parse_args(
        ["--results", str(tmp_path / "res"), "--data", str(tmp_path / "data"), "--no-export"]
    )
    res = gc.Results(a.results)
    (a.results / "train").mkdir()
    (a.results / "train" / "best.pt").write_bytes(b"")
    stale = a.results / "rn50.pt2"
    stale.write_bytes(b"old")
    gc.stage_infer(a, res, cuda=True)
    assert [c[1] for c in commands] == ["bench.gpu_inference", "serve.validate"]
    assert "--pt2" not in commands[0] and "--pt-compile" in commands[1]
    assert not stale.exists() and res["export/pt2"] is None
