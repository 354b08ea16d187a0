"""serve.infer under torchrun: each rank classifies its share of the inputs into its own file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from serve.infer import rank_file, rank_share

ROOT = Path(__file__).resolve().parents[2]


def test_rank_shares_partition_the_inputs_in_order():
    paths = [f"img{i}.jpg" for i in range(11)]
    for world in (1, 2, 3, 4, 16):
        shares = [rank_share(paths, r, world) for r in range(world)]
        assert [p for s in shares for p in s] == paths, world
        assert max(map(len, shares)) - min(map(len, shares)) <= 1, world
    assert rank_file("out/preds.jsonl", 3, 16) == "out/preds.rank03-of-16.jsonl"
    assert rank_file("preds.jsonl", 0, 2) == "preds.rank0-of-2.jsonl"


def test_torchrun_two_cpu_ranks(tmp_path, engine_fp32_onnx, fmnist_small, photos):
    imgs = sorted((fmnist_small / "val").rglob("*.jpg"))[::40][:12] + [photos["jpeg"]]
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    inputs = [*map(str, imgs), str(tmp_path / "bad.jpg")]
    (tmp_path / "tmp").mkdir()  # torchrun leaves a torchelastic_* log folder in the temporary folder
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path / "tmp"))
    out = tmp_path / "preds.jsonl"
    # the same serve.infer command under torchrun and, as the reference, in one process
    infer_cpu = ["-m", "serve.infer", "--engine", str(engine_fp32_onnx), "--device", "cpu", "--quiet"]
    infer_cpu += ["--batch-size", "4"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *infer_cpu,
            "--output",
            str(out),
            *inputs,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # The bad image makes rank 1 exit 1 and torchrun report a failure, but only after every rank has
    # written its file (a barrier): rank 0's file is complete.
    assert r.returncode != 0
    files = sorted(tmp_path.glob("preds.rank*-of-2.jsonl"))
    assert [f.name for f in files] == ["preds.rank0-of-2.jsonl", "preds.rank1-of-2.jsonl"], r.stderr[-2000:]
    assert not out.exists()
    lines = [json.loads(ln) for f in files for ln in f.read_text().splitlines()]
    per_rank = [len(f.read_text().splitlines()) for f in files]
    assert per_rank == [7, 7]
    # Concatenated in rank order: one line per input, in input order, the same as a single process.
    single = subprocess.run(
        [
            sys.executable,
            *infer_cpu,
            *inputs,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 1, single.stderr[-2000:]
    ref = [json.loads(ln) for ln in single.stdout.splitlines()]
    assert [ln["path"] for ln in lines] == inputs
    assert [ln.get("topk") for ln in lines] == [ln.get("topk") for ln in ref]
    assert "error" in lines[-1]


def test_torchrun_needs_output(capsys, engine_fp32_onnx, fmnist_small):
    from serve import infer

    img = next((fmnist_small / "val").rglob("*.jpg"))
    assert infer.classify(["--engine", str(engine_fp32_onnx), "--quiet", str(img)], rank=0, world=2) == 2
    assert "--output" in capsys.readouterr().err


def test_torchrun_refuses_a_list_on_stdin(capsys, tmp_path):
    """torchrun's processes share one standard input: each rank would read part of the list."""
    from serve import infer
    from tests.stderr import error_line

    argv = ["--engine", str(tmp_path / "x.onnx"), "--output", str(tmp_path / "p.jsonl"), "--files-from", "-"]
    assert infer.classify(argv, rank=1, world=2) == 2
    assert error_line(capsys.readouterr().err).startswith("error: --files-from -: under torchrun each rank needs")
    assert list(tmp_path.iterdir()) == []
