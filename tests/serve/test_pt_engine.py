"""The .pt engine's serving options: ``--pt-precision`` and ``--pt-compile`` (rn50.backends.pytorch).

On the CPU: the torch.compile'd checkpoint against eager FP32 (logits within the fp32 parity
bounds), short batches padded to the one compiled shape (no recompile, the padding sliced off),
serve.infer and serve.validate with ``--pt-compile``, and the refusals (fp16 on the CPU, the flags
with a non-.pt engine). All compiles here are of the same graph (32 px, batch 8, fp32), so after
the first one Inductor's FX graph cache serves the others. On a CUDA GPU (``gpu`` marker): FP16 +
torch.compile (CUDA graphs) against the eager FP32 reference, through serve.validate and through
serve.infer with DALI ``mixed`` and CPU decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serve import infer
from tests.serve_cli import run_validate
from tests.stderr import error_line

BATCH = 8  # the compiled batch of every compile here: one graph for the whole module


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _images(fmnist: Path, engine: Path, n: int) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """``n`` real validation images (every class), preprocessed for ``engine`` by DALI, and labels."""
    from rn50.batches import Preprocessor
    from rn50.layout import balanced_subset, load_dataset, read_encoded
    from rn50.manifest import preprocessing_of, read_manifest

    _, val = load_dataset(fmnist)
    files, labels = balanced_subset(val.files, val.labels, n, seed=0)
    files, labels = files[:n], labels[:n]
    p = preprocessing_of(read_manifest(engine))
    return files, Preprocessor(p, n)([read_encoded(f) for f in files]), np.asarray(labels)


def _eager(engine: Path, prefer_gpu: bool = False):
    from rn50.backends import load_engine

    return load_engine(engine, prefer_gpu=prefer_gpu)[0]


@pytest.fixture(scope="module")
def compiled_cpu(engine_checkpoint):
    """The checkpoint compiled on the CPU for batch 8: the module's first (and only cold) compile."""
    from rn50.backends import load_engine

    return load_engine(engine_checkpoint, prefer_gpu=False, pt_compile=True, pt_batch=BATCH)[0]


def _graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _check_against_eager(compiled, eager, x: np.ndarray, labels: np.ndarray, precision: str) -> None:
    """Batches of the compiled batch, shorter (one row too) and longer (chunked, last chunk short):
    as many logit rows as input rows, each within ``precision``'s parity bounds of eager FP32, and
    no new compile for any of them."""
    from rn50.compare import compare_logits, parity_bounds

    before = _graphs()
    for n in (BATCH, 5, 1, len(x)):
        got, ref = compiled.run(x[:n]), eager.run(x[:n])
        assert got.shape == ref.shape == (n, eager.num_classes), n
        c = compare_logits(ref, got, labels[:n], precision, parity_bounds(precision))
        assert c.passed, f"{n} rows: {c.problem}"
    assert _graphs() == before, "a batch of another size was compiled instead of padded to the compiled batch"


def test_compiled_pt_matches_eager_and_pads_short_batches(compiled_cpu, engine_checkpoint, fmnist_small):
    import torch

    _, x, labels = _images(fmnist_small, engine_checkpoint, 13)  # 13 = 8 + 5: a longer batch ends in a short chunk
    assert (
        compiled_cpu.provider
        == f"cpu (torch.compile fp32, channels_last, batch {BATCH}, {torch.get_num_threads()} threads)"
    )
    assert (compiled_cpu.device, compiled_cpu.input_dtype, compiled_cpu.batch) == ("cpu", "float32", BATCH)
    _check_against_eager(compiled_cpu, _eager(engine_checkpoint), x, labels, "fp32")


def test_infer_with_pt_compile(capsys, tmp_path, engine_checkpoint, trained_run, fmnist_small):
    """serve.infer --pt-compile: an undecodable file makes its batch short (7 images, padded to 8);
    every good image gets eager PyTorch's top-1, in input order, and the summary names the engine."""
    files, x, _ = _images(fmnist_small, engine_checkpoint, 12)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    inputs = [*files[:3], bad, *files[3:]]
    summ = tmp_path / "s.json"
    rc = infer.main(
        ["--engine", str(engine_checkpoint), *map(str, inputs), "--quiet", "--device", "cpu"]
        + ["--pt-compile", "--batch-size", str(BATCH), "--summary", str(summ)]
    )
    cap = capsys.readouterr()
    assert rc == 1, cap.err  # the bad file
    lines = [json.loads(ln) for ln in cap.out.splitlines()]
    assert [ln["path"] for ln in lines] == [str(p) for p in inputs]
    assert "error" in lines[3]
    eager = _eager(engine_checkpoint).run(x).argmax(1)
    assert [ln["topk"][0] for ln in lines if "topk" in ln] == eager.tolist()
    s = json.loads(summ.read_text())
    assert s["provider"].startswith(f"cpu (torch.compile fp32, channels_last, batch {BATCH},")
    assert (s["classified"], s["failed"], s["batch_size"]) == (12, 1, BATCH)


def test_validate_passes_compiled_pt(capsys, tmp_path, engine_checkpoint, trained_run, fmnist_small):
    """serve.validate of the compiled checkpoint against eager FP32: 100 images in batches of 8
    (the last one 4 images, padded), fp32 bounds, PASS."""
    prefix = tmp_path / "rep"
    rc = run_validate(
        engine_checkpoint,
        trained_run / "best.pt",
        fmnist_small / "val",
        *("--pt-compile", "--batch-size", str(BATCH), "--limit", "100", "--device", "cpu"),
        *("--report", str(prefix), "--quiet"),
    )
    out = capsys.readouterr().out
    r = json.loads(Path(f"{prefix}.json").read_text())
    assert rc == 0, out
    assert r["passed"] and r["images"] == 100 and r["precision"] == "fp32"
    assert r["backend"].startswith(f"pytorch (cpu (torch.compile fp32, channels_last, batch {BATCH},")
    assert r["rel_logit_diff"] <= 1e-3 and r["top1_agreement"] == 100


def test_fp16_is_refused_on_the_cpu(capsys, tmp_path, engine_checkpoint, fmnist_small):
    """On the CPU, fp16 convolutions are several times slower than fp32: refused before any work."""
    rc = infer.main(
        ["--engine", str(engine_checkpoint), str(fmnist_small / "val" / "bag"), "--quiet", "--device", "cpu"]
        + ["--pt-precision", "fp16", "--output", str(tmp_path / "p.jsonl")]
    )
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    assert error_line(cap.err).startswith(f"error: {engine_checkpoint}: fp16 needs a CUDA GPU"), cap.err
    assert cap.out == "" and not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("command", ["infer", "validate"])
@pytest.mark.parametrize(
    "flags", [["--pt-compile"], ["--pt-precision", "fp16"], ["--pt-precision", "fp32", "--pt-compile"]]
)
def test_pt_flags_are_refused_for_other_engines(
    capsys, tmp_path, command, flags, engine_fp32_onnx, trained_run, fmnist_small
):
    """An exported engine runs as exported: the --pt-* flags are an error naming the flags and the
    engine, exit 2, before any work (no predictions, no report)."""
    if command == "infer":
        rc = infer.main(["--engine", str(engine_fp32_onnx), str(fmnist_small / "val" / "bag"), "--quiet", *flags])
    else:
        rc = run_validate(
            engine_fp32_onnx, trained_run / "best.pt", fmnist_small / "val", "--report", str(tmp_path / "r"), *flags
        )
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    given = " and ".join(f for f in flags if f.startswith("--"))
    assert error_line(cap.err).startswith(
        f"error: {given} appl{'y' if ' and ' in given else 'ies'} to .pt checkpoint engines only, "
        f"not to {engine_fp32_onnx} (a .onnx engine"
    ), cap.err
    assert cap.out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["serve.infer", "serve.validate", "serve.triton"])
def test_help_says_pt_flags_are_for_pt_engines_only(capsys, command):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(command).main(["--help"])
    out = capsys.readouterr().out
    assert ".pt engines only:" in out and "--pt-precision {fp32,fp16}" in out and "--pt-compile" in out
    assert "With a .plan, .onnx or .pt2 engine\n  these flags are an error (exit 2)" in out


# --------------------------------------------------------------------------- on a CUDA GPU

CUDA_ONLY = "needs a CUDA GPU: fp16 and CUDA graphs run there only"


@pytest.fixture
def fp32_reference():
    """Eager FP32 without TF32, as serve.validate runs its reference."""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason=CUDA_ONLY)
@pytest.mark.usefixtures("fp32_reference")
def test_fp16_compiled_on_the_gpu(engine_checkpoint, fmnist_small):
    """FP16 + CUDA graphs against eager FP32 (no TF32) within the fp16 parity bounds, short and long
    batches without a recompile, and DALI's float16 GPU batch taken as is."""
    import torch

    from rn50.backends import load_engine

    b = load_engine(engine_checkpoint, pt_precision="fp16", pt_compile=True, pt_batch=BATCH)[0]
    assert b.provider == f"cuda:0 (torch.compile fp16, CUDA graphs, channels_last, batch {BATCH})"
    assert (b.device, b.input_dtype) == ("cuda", "float16")
    _, x, labels = _images(fmnist_small, engine_checkpoint, 13)
    eager = _eager(engine_checkpoint, prefer_gpu=True)
    _check_against_eager(b, eager, x, labels, "fp16")
    # a float16 batch already on the GPU, as DALI mixed hands it over for a float16 engine
    xg = torch.from_numpy(x).cuda().half()
    np.testing.assert_array_equal(b.run(xg[:5]), b.run(x[:5]))


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason=CUDA_ONLY)
def test_validate_and_infer_fp16_compiled_on_the_gpu(capsys, tmp_path, engine_checkpoint, trained_run, fmnist_small):
    """serve.validate PASSes the FP16 compiled .pt against eager FP32 with the fp16 bounds; serve.infer
    runs it fed by DALI mixed and by DALI on the CPU, with the same classes."""
    prefix = tmp_path / "rep"
    pt = ["--pt-precision", "fp16", "--pt-compile", "--batch-size", str(BATCH)]
    rc = run_validate(engine_checkpoint, trained_run / "best.pt", fmnist_small / "val", *pt, "--report", str(prefix))
    out = capsys.readouterr().out
    r = json.loads(Path(f"{prefix}.json").read_text())
    assert rc == 0 and r["passed"] and r["precision"] == "fp16", out
    assert r["backend"] == f"pytorch (cuda:0 (torch.compile fp16, CUDA graphs, channels_last, batch {BATCH}))"
    files, _, _ = _images(fmnist_small, engine_checkpoint, 40)
    top1 = {}
    for decode in ("auto", "cpu"):
        summ = tmp_path / f"{decode}.json"
        rc = infer.main(
            ["--engine", str(engine_checkpoint), *map(str, files), "--quiet", *pt]
            + ["--decode-on", decode, "--summary", str(summ)]
        )
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        s = json.loads(summ.read_text())
        assert (s["dali_device"], s["engine_device"]) == ("gpu" if decode == "auto" else "cpu", "cuda")
        top1[decode] = [json.loads(ln)["topk"][0] for ln in cap.out.splitlines()]
    assert sum(a == b for a, b in zip(top1["auto"], top1["cpu"])) >= 0.95 * len(files)
