"""A model repository for a stock ``tritonserver`` (the NGC container on a GPU machine).

``python -m serve.triton --engine X --write-repo DIR`` writes::

    DIR/rn50_preprocess/config.pbtxt   DALI backend; 1/model.dali is the serialized pipeline
    DIR/rn50_engine/config.pbtxt       tensorrt_plan (.plan) or onnxruntime_onnx (.onnx); 1/model.plan|onnx
    DIR/rn50_engine/labels.txt         the manifest's class names (Triton's classification extension)
    DIR/rn50/config.pbtxt              the ensemble: encoded image -> preprocess -> engine -> logits
    DIR/rn50/labels.txt                the same class names for the ensemble's output
    DIR/rn50_engine/manifest.json      the engine's manifest (source, preprocessing, precision,
                                       accuracy, versions, GPU): Triton ignores it, a reader of
                                       the repository need not find the export folder

The DALI model is the project's own preprocessing contract (``rn50.preprocess.dali_decode`` +
``dali_val`` with the engine manifest's :class:`~rn50.preprocess.Preprocessing`), serialized with
GPU (``mixed``, nvJPEG) decoding: the resize to ``resize_size`` then centre crop that training
used, where the reference DALI ensembles resize straight to the crop size. Its input is
``INPUT`` (UINT8, one encoded file per request row, the DALI backend's convention); the
ensemble's output ``logits`` carries ``labels.txt``, so a client asking for it with
``class_count=k`` gets the top k as ``"score:index:name"`` strings.

The engine model takes ``max_batch_size`` from the engine's optimisation profile (a plan's
manifest records it), else the manifest's ``max_batch``, else ``--max-batch``; dynamic batching
prefers the profile's ``opt`` batch and every model runs on the GPU (``KIND_GPU``). A plan runs
only on the GPU model and TensorRT version it was built for (the manifest names both): build
it in, or for, the container's TensorRT.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from rn50.errors import EngineError

ENSEMBLE, PREPROCESS, ENGINE = "rn50", "rn50_preprocess", "rn50_engine"
DALI_INPUT, DALI_OUTPUT = "INPUT", "PREPROCESSED"
LABELS = "labels.txt"
MANIFEST = "manifest.json"
_ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16"}  # onnx.TensorProto.FLOAT / FLOAT16


def dali_pipeline(p: Any, max_batch: int, decode: str = "mixed", fp16: bool = False, num_threads: int = 4) -> Any:
    """The serving preprocessing as a DALI pipeline fed by ``external_source`` ``INPUT``.

    ``decode="mixed"`` is what the repository serializes (nvJPEG on the GPU); ``decode="cpu"``
    builds the same graph for a machine without one. ``device_id`` is left unset: the DALI
    backend assigns each model instance its GPU when it loads the pipeline.
    """
    from nvidia.dali import fn, pipeline_def, types

    from rn50.preprocess import dali_decode, dali_val

    @pipeline_def(batch_size=max_batch, num_threads=num_threads, device_id=None)
    def pipe() -> Any:
        enc = fn.external_source(name=DALI_INPUT, dtype=types.UINT8, ndim=1)
        return dali_val(dali_decode(enc, device=decode), p, dtype=types.FLOAT16 if fp16 else types.FLOAT)

    return pipe()


def engine_io(engine: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Names, types and batch bounds of the engine's input and output, read without running it."""
    n = len(manifest["classes"])
    if engine.suffix.lower() == ".onnx":
        import onnx

        g = onnx.load(str(engine), load_external_data=False).graph
        init = {i.name for i in g.initializer}
        inputs = [i for i in g.input if i.name not in init]
        if len(inputs) != 1 or len(g.output) != 1:
            raise EngineError(f"{engine}: expected one input and one output, found {len(inputs)} and {len(g.output)}")
        i, o = inputs[0], g.output[0]
        types = [_ONNX_TYPES.get(t.type.tensor_type.elem_type) for t in (i, o)]
        if None in types:
            raise EngineError(f"{engine}: input/output must be float32 or float16")
        b = i.type.tensor_type.shape.dim[0]
        fixed = b.dim_value if b.HasField("dim_value") else None
        return {
            "platform": "onnxruntime_onnx",
            "file": "model.onnx",
            "input": i.name,
            "output": o.name,
            "input_type": types[0],
            "output_type": types[1],
            "max_batch": fixed or manifest.get("max_batch"),
            "opt_batch": None,
            "classes": n,
        }
    prof = manifest.get("profile") or {}
    return {
        "platform": "tensorrt_plan",
        "file": "model.plan",
        "input": prof.get("input", "input"),
        "output": manifest.get("output_name", "logits"),  # export names the ONNX output "logits"
        "input_type": "TYPE_FP16" if manifest.get("input_dtype") == "float16" else "TYPE_FP32",
        "output_type": "TYPE_FP32",
        "max_batch": (prof.get("max") or [None])[0] or manifest.get("max_batch"),
        "opt_batch": (prof.get("opt") or [None])[0],
        "classes": n,
    }


def _dims(d: list[int]) -> str:
    return "[ " + ", ".join(str(x) for x in d) + " ]"


def _model_head(name: str, kind: str, max_batch: int, input: str, output: str) -> str:
    """How every model's config.pbtxt starts: its name, ``platform``/``backend`` line, batch bound,
    and its one input and one output tensor."""
    return f"""name: "{name}"
{kind}
max_batch_size: {max_batch}
input [
  {{ {input} }}
]
output [
  {{ {output} }}
]
"""


def _logits_tensor(name: str, io: dict[str, Any]) -> str:
    """A model's output tensor: the engine's logits, with the class names that label them."""
    return f'name: "{name}" data_type: {io["output_type"]} dims: {_dims([io["classes"]])} label_filename: "{LABELS}"'


def engine_config(io: dict[str, Any], size: int, max_batch: int, queue_delay_us: int) -> str:
    # Triton refuses a preferred batch above max_batch_size (a --max-batch below the profile's opt)
    opt = min(io["opt_batch"], max_batch) if io["opt_batch"] else None
    pref = f"\n  preferred_batch_size: [ {opt} ]" if opt else ""
    head = _model_head(
        ENGINE,
        f'platform: "{io["platform"]}"',
        max_batch,
        f'name: "{io["input"]}" data_type: {io["input_type"]} dims: {_dims([3, size, size])}',
        _logits_tensor(io["output"], io),
    )
    return (
        head
        + f"""dynamic_batching {{{pref}
  max_queue_delay_microseconds: {queue_delay_us}
}}
instance_group [ {{ kind: KIND_GPU count: 1 }} ]
"""
    )


def preprocess_config(io: dict[str, Any], size: int, max_batch: int) -> str:
    head = _model_head(
        PREPROCESS,
        'backend: "dali"',
        max_batch,
        f'name: "{DALI_INPUT}" data_type: TYPE_UINT8 dims: [ -1 ]',
        f'name: "{DALI_OUTPUT}" data_type: {io["input_type"]} dims: {_dims([3, size, size])}',
    )
    return head + "instance_group [ { kind: KIND_GPU count: 1 } ]\n"


def ensemble_config(io: dict[str, Any], max_batch: int) -> str:
    head = _model_head(
        ENSEMBLE,
        'platform: "ensemble"',
        max_batch,
        f'name: "{DALI_INPUT}" data_type: TYPE_UINT8 dims: [ -1 ]',
        _logits_tensor("logits", io),
    )
    return (
        head
        + f"""ensemble_scheduling {{
  step [
    {{
      model_name: "{PREPROCESS}"
      model_version: -1
      input_map {{ key: "{DALI_INPUT}" value: "{DALI_INPUT}" }}
      output_map {{ key: "{DALI_OUTPUT}" value: "preprocessed" }}
    }},
    {{
      model_name: "{ENGINE}"
      model_version: -1
      input_map {{ key: "{io["input"]}" value: "preprocessed" }}
      output_map {{ key: "{io["output"]}" value: "logits" }}
    }}
  ]
}}
"""
    )


def write_repo(
    engine: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    max_batch: int | None = None,
    queue_delay_us: int = 2000,
    version: int | None = None,
) -> Path:
    """Write the repository for ``engine`` to ``dest`` (a new or empty folder); returns ``dest``.

    Everything is written to a temporary folder beside ``dest`` and renamed onto it at the end,
    so a failure leaves no half-written repository.
    """
    from rn50.manifest import manifest_path, preprocessing_of, read_manifest

    engine, dest = Path(engine), Path(dest)
    if engine.suffix.lower() not in (".plan", ".engine", ".onnx"):
        raise EngineError(
            f"{engine}: a stock Triton repository takes a TensorRT plan (.plan) or an ONNX model "
            f"(.onnx), not '{engine.suffix}' (export one with `python -m export`)"
        )
    if not engine.is_file():
        raise EngineError(f"{engine}: engine not found")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise EngineError(f"{dest}: exists and is not an empty folder (choose a new folder for the repository)")
    m = read_manifest(engine)
    p = preprocessing_of(m)
    io = engine_io(engine, m)
    bound = io["max_batch"]
    if max_batch is not None and bound and max_batch > bound:
        raise EngineError(f"--max-batch {max_batch} exceeds the engine's maximum batch {bound} ({engine})")
    mb = int(max_batch or bound or 64)
    ver = str(version or m.get("model_version") or 1)
    fp16 = io["input_type"] == "TYPE_FP16"
    serialized = dali_pipeline(p, mb, decode="mixed", fp16=fp16).serialize()
    labels = "".join(c + "\n" for c in m["classes"])

    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for model in (ENSEMBLE, PREPROCESS, ENGINE):
            (tmp / model / ver).mkdir(parents=True)
        (tmp / PREPROCESS / ver / "model.dali").write_bytes(serialized)
        (tmp / PREPROCESS / "config.pbtxt").write_text(preprocess_config(io, p.image_size, mb))
        shutil.copyfile(engine, tmp / ENGINE / ver / io["file"])
        (tmp / ENGINE / "config.pbtxt").write_text(engine_config(io, p.image_size, mb, queue_delay_us))
        (tmp / ENSEMBLE / "config.pbtxt").write_text(ensemble_config(io, mb))
        for model in (ENGINE, ENSEMBLE):
            (tmp / model / LABELS).write_text(labels)
        shutil.copyfile(manifest_path(engine), tmp / ENGINE / MANIFEST)
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
