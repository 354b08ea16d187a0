"""Engine vs PyTorch on a labelled split: ``python -m serve.validate --engine X --checkpoint CKPT VAL_DIR``.

One DALI preprocessing pass (``rn50.batches``, with the engine manifest's preprocessing) feeds
both the eager fp32 PyTorch model (the checkpoint through ``rn50.backends.pytorch``, as serve
runs a ``.pt`` engine) and the engine, so any
difference is the engine's. Reports top-1/top-5 of both, their difference, top-1 agreement and
the max abs logit difference, and passes when the engine meets the bounds for its precision (from
the engine's manifest, or ``--pt-precision`` for a ``.pt`` engine; one table for export's parity
check, the INT8 gate and this,
:data:`rn50.compare.BOUNDS`): it loses at most 0.05 (fp32), 0.1 (fp16) or 0.5 (int8) point of
PyTorch's top-1, picks PyTorch's top-1 class on at least 99.5 %, 99 % or 90 % of the images, and
(fp32, fp16) its logits stay within 1e-3 / 2e-2 of PyTorch's logit scale.

The accuracy bound is one-sided, as in MLPerf's "99 % of the reference" rule: an engine that
scores higher on the sample is reported (``diff``) but is not a failure, since on a finite sample
the images int8 flips go both ways. Divergence in either direction is what the agreement floor
catches.

An engine's manifest records the checkpoint it was exported from (``source``: path and sha256).
When that is not the ``--checkpoint`` given, one ``warning:`` line says so before the pass, and
the report records it (``source_check``): the pass then measures two different models, whose
low agreement would otherwise read like a broken export. A warning, not an error: comparing an
engine with a retrained checkpoint can be the point.

The report goes to ``PREFIX.json`` and ``PREFIX.md`` (default PREFIX ``<engine>.validate``),
written atomically; the Markdown table is printed. Per class it gives both top-1s, their
difference and the share of the class's images on which the two pick different classes
(``per_class``: ``reference_*`` is PyTorch), names the classes where they disagree most, and
draws ``PREFIX.confusion.png``: the engine's confusion matrix and engine minus PyTorch, embedded
in the Markdown. The JSON carries both confusion matrices up to 100 classes.

Exit status: 0 pass, 1 fail, 2 usage or engine error (missing engine / manifest / checkpoint, classes of the
engine and checkpoint differ, VAL_DIR not an ImageNet-layout folder with those classes, a --batch-size or
--limit below 1, report files that cannot be written: all checked before the engine loads). Images that
cannot be used (``serve.pipeline``: unreadable, unsupported format, corrupt, too large) are left out of the
scores and listed in the report's ``failed_images``; when they are more than ``--max-failed`` of the
split (default 1 %), the validation fails: its scores would describe another sample than the split
named, however well the engine agrees on what was left.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rn50.flags import AT_LEAST_1, Range

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


# Every numeric flag (rn50/flags.py): checked before the engine loads.
FLAG_RANGES = {"--limit": AT_LEAST_1, "--batch-size": AT_LEAST_1, "--max-failed": Range(lo=0, hi=1)}
MAX_FAILED = 0.01  # share of the split's images that may fail to decode before the validation fails


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_batch_size, add_device, add_engine, add_pt_options, new_parser

    ap = new_parser(
        "serve.validate",
        "Compare an engine with its PyTorch checkpoint on a labelled ImageNet-layout split "
        "(VAL_DIR/<class>/*.jpg), through one shared DALI preprocessing pass.",
        "pass: top-1(PyTorch) - top-1(engine) <= bound for the engine's precision "
        "(fp32 0.05, fp16 0.1, int8 0.5 points; a gain is reported, not failed), "
        "top-1 agreement >= 99.5/99/90 % and (fp32/fp16) max |logit difference| <= 1e-3/2e-2 of the "
        "logit scale; at most --max-failed of the images left out as undecodable.\n"
        "exit status: 0 pass; 1 fail; 2 usage or engine error.",
    )
    add_engine(
        ap,
        ".plan, .onnx, .pt2 or a .pt checkpoint (eager FP32 by default, the reference's own "
        "computation; --pt-precision and --pt-compile make it the served model to check) "
        "with its manifest beside it",
    )
    ap.add_argument("--checkpoint", required=True, help="the PyTorch checkpoint (best.pt) the engine was exported from")
    ap.add_argument("val_dir", metavar="VAL_DIR", help="labelled split: VAL_DIR/<class>/<images>")
    ap.add_argument("--limit", type=int, default=None, help="use N images, a deterministic class-balanced sample")
    add_batch_size(ap, 64, "images per batch (default 64; clipped to the engine's maximum)")
    add_device(ap, "DALI/engine device (default auto)")
    ap.add_argument(
        "--report",
        metavar="PREFIX",
        help="write PREFIX.json, PREFIX.md and PREFIX.confusion.png (default <engine>.validate); "
        "checked before any work: exit 2 if they cannot be written",
    )
    ap.add_argument(
        "--max-failed",
        type=float,
        default=MAX_FAILED,
        metavar="FRACTION",
        help=f"fail when more than this share of the images cannot be decoded (default {MAX_FAILED:g}; "
        "they are left out of the scores and listed in the report either way)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    add_pt_options(ap)
    return ap


def compare(ref_logits: np.ndarray, eng_logits: np.ndarray, labels: np.ndarray, precision: str) -> dict[str, Any]:
    """The engine's logits against PyTorch's (:func:`rn50.compare.compare_logits`, the bounds for
    ``precision``), as the report's fields."""
    from rn50.compare import compare_logits

    c = compare_logits(ref_logits, eng_logits, labels, precision)
    return {
        "images": c.images,
        "precision": precision,
        "pytorch": dict(c.reference),
        "engine": dict(c.candidate),
        "diff": {k: c.candidate[k] - c.reference[k] for k in ("top1", "top5")},
        "top1_agreement": c.top1_agreement,
        "max_abs_logit_diff": c.max_abs_logit_diff,
        "rel_logit_diff": c.rel_logit_diff,
        "bound_top1_points": c.bounds.max_top1_drop,
        "min_top1_agreement": c.bounds.min_top1_agreement,
        "max_rel_logit_diff": c.bounds.max_rel_logit_diff,
        "problem": c.problem,
        "passed": c.passed,
    }


def source_check(
    manifest: dict[str, Any], checkpoint: str | os.PathLike[str], weights: dict[str, Any]
) -> dict[str, Any] | None:
    """Whether ``checkpoint`` (whose model's state dict is ``weights``, already loaded) holds the
    model the engine's manifest names as its source:
    ``{"engine_source": {"path", "sha256"}, "checkpoint_sha256", "matches", "same_weights"}``, or
    None when the manifest records no source file (a ``.pt`` engine is its own). Compared by
    sha256, not by path: a checkpoint may have moved since the export, and a retrained one may
    have taken its place. Another file matches when its weights are the source's
    (``source_weights_sha256``, :func:`rn50.checkpoint.weights_sha256`): a ``last.pt`` holds the
    ``best.pt`` of its epoch and the training state besides. ``same_weights`` is None where the
    file matches or the manifest does not record the weights."""
    from rn50.manifest import sha256_file

    src = manifest.get("source")
    if not isinstance(src, dict) or not src.get("sha256"):
        return None
    ck = sha256_file(checkpoint)
    recorded = {"path": str(src.get("path")), "sha256": str(src["sha256"])}
    same_weights = None
    if ck != recorded["sha256"] and isinstance(manifest.get("source_weights_sha256"), str):
        from rn50.checkpoint import weights_sha256

        same_weights = weights_sha256(weights) == manifest["source_weights_sha256"]
    return {
        "engine_source": recorded,
        "checkpoint_sha256": ck,
        "matches": ck == recorded["sha256"] or bool(same_weights),
        "same_weights": same_weights,
    }


def source_mismatch(
    check: dict[str, Any] | None, engine: str, checkpoint: str, quote: Callable[[str], str] = str
) -> str | None:
    """What the warning line and the report say when the engine was exported from another
    checkpoint than ``checkpoint`` (None when it was, or its manifest does not say); ``quote``
    formats a path (Markdown code for the report)."""
    if check is None or check["matches"]:
        return None
    src = check["engine_source"]
    return (
        f"{quote(engine)} was exported from {quote(src['path'])} (sha256 {src['sha256'][:12]}…), "
        f"not from {quote(checkpoint)} (sha256 {check['checkpoint_sha256'][:12]}…): "
        "two different models, so expect disagreement"
    )


def markdown(r: dict[str, Any]) -> str:
    verdict = "PASS" if r["passed"] else "FAIL"
    other = source_mismatch(r.get("source_check"), r["engine"], r["checkpoint"], lambda s: f"`{s}`")
    return "\n".join(
        [
            f"Validation of `{r['engine']}` ({r['backend']}, {r['precision']}) against `{r['checkpoint']}` "
            f"on {r['images']} images of `{r['val_dir']}`",
            "",
            *([f"**warning:** {other}", ""] if other else []),
            "| | top-1 (%) | top-5 (%) |",
            "| --- | ---: | ---: |",
            f"| PyTorch (eager fp32) | {r['pytorch']['top1']:.2f} | {r['pytorch']['top5']:.2f} |",
            f"| engine | {r['engine_acc']['top1']:.2f} | {r['engine_acc']['top5']:.2f} |",
            f"| difference (engine - PyTorch) | {r['diff']['top1']:+.2f} | {r['diff']['top5']:+.2f} |",
            "",
            f"top-1 agreement {r['top1_agreement']:.2f} %, max abs logit difference {r['max_abs_logit_diff']:.4g}; "
            f"bounds for {r['precision']}: top-1 loss <= {r['bound_top1_points']} point and top-1 agreement "
            f">= {r['min_top1_agreement']} % -> **{verdict}**" + (f" ({r['problem']})" if r.get("problem") else ""),
            "",
        ]
    )


PER_CLASS_ROWS = 50  # the Markdown lists every class up to this many, else the ones that changed most
JSON_CONFUSION_MAX_CLASSES = 100


def per_class_report(
    ref_logits: np.ndarray, eng_logits: np.ndarray, labels: np.ndarray, classes: list[str], png: str | Path
) -> dict[str, Any]:
    """The per-class part of the report; draws the confusion matrices to ``png``."""
    from rn50.metrics import confusion_matrix, most_changed, per_class
    from rn50.plots import confusion_matrices

    rows = per_class(labels, ref_logits, eng_logits, classes)
    n = len(classes)
    cm_eng = confusion_matrix(labels, eng_logits.argmax(1), n)
    cm_ref = confusion_matrix(labels, ref_logits.argmax(1), n)
    confusion_matrices(cm_eng, cm_ref, classes, png)
    out: dict[str, Any] = {
        "per_class": rows,
        "most_disagreement": [r["class"] for r in most_changed(rows)],
        "confusion_png": str(png),
    }
    if n <= JSON_CONFUSION_MAX_CLASSES:
        out["confusion_matrix"] = {"engine": cm_eng.tolist(), "pytorch": cm_ref.tolist()}
    return out


def md_cell(text: str) -> str:
    """``text`` as one Markdown table cell: class names are folder names, which may hold ``|``."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def per_class_markdown(r: dict[str, Any]) -> str:
    from rn50.metrics import most_changed

    rows = r["per_class"]
    shown = rows if len(rows) <= PER_CLASS_ROWS else most_changed(rows, 20)
    head = (
        "Per class"
        if shown is rows
        else f"The {len(shown)} of {len(rows)} classes where they disagree most (all in the JSON report)"
    )

    def f(v: float | None, sign: str = "") -> str:
        return "-" if v is None else f"{v:{sign}.2f}"

    lines = [
        f"{head}: top-1 (%) of PyTorch and the engine, and disagreement (% of the class's images on which "
        "they pick different classes)",
        "",
        "| class | images | PyTorch | engine | difference | disagreement |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {md_cell(x['class'])} | {x['images']} | {f(x['reference_top1'])} | {f(x['top1'])} | {f(x['diff'], '+')} | "
        f"{f(x['disagreement'])} |"
        for x in shown
    ]
    by_name = {x["class"]: x for x in rows}
    worst = [by_name[c] for c in r["most_disagreement"]]
    lines += [
        "",
        "Where they disagree most: "
        + (
            ", ".join(f"{x['class']} ({x['disagreement']:.1f} % of its images, {x['diff']:+.2f} points)" for x in worst)
            if worst
            else "nowhere (the same top-1 class on every image)"
        ),
        "",
        f"![confusion matrices: the engine's, and engine minus PyTorch]({Path(r['confusion_png']).name})",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    # The reference is FP32: no TF32 convolutions or matmuls (PyTorch's default allows them in
    # cuDNN convolutions on Ampere and newer, which would move the reference by ~1e-3). Set before
    # the engine loads (a .pt engine reports it), and put back for in-process callers.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _run(args)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rn50.atomic import write_json, write_text
    from rn50.backends import load_engine
    from rn50.backends.pytorch import TorchBackend
    from rn50.compare import BOUNDS
    from rn50.errors import PipelineError
    from rn50.layout import scan_split
    from rn50.manifest import preprocessing_of

    from .cli import check_outputs, env_threads, pick_device, pt_options, usage_problem
    from .pipeline import BatchStream

    def err(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USAGE

    why = usage_problem(args, FLAG_RANGES)
    if why:
        return err(why)
    prefix = args.report or f"{args.engine}.validate"
    if args.report and (args.report.endswith(("/", os.sep)) or Path(args.report).is_dir()):
        return err(
            f"--report {args.report}: is a directory "
            "(PREFIX names the files PREFIX.json, PREFIX.md and PREFIX.confusion.png)"
        )
    # every report file, before any work (a bad path would otherwise lose a finished validation)
    from rn50.manifest import manifest_path

    read = [("the engine", str(args.engine)), ("the checkpoint", str(args.checkpoint))]
    read += [(f"the {what[4:]}'s manifest", str(manifest_path(p))) for what, p in read]
    for ext in (".json", ".md", ".confusion.png"):
        bad_output = check_outputs({"report": f"{prefix}{ext}"}, keep=read)
        if bad_output:
            return err(bad_output)
    try:
        pt = pt_options(args, args.batch_size)
        device = pick_device(args.device)
        backend, manifest = load_engine(args.engine, prefer_gpu=device == "gpu", **pt)
        if device == "gpu" and backend.device != "cuda":
            device = "cpu"
        # the reference: the checkpoint as serve runs a .pt engine, beside the engine
        reference = TorchBackend(Path(args.checkpoint), {}, prefer_gpu=device == "gpu")
        ck_classes = reference.manifest["classes"]
        if list(ck_classes) != list(manifest["classes"]):
            return err(
                f"{args.engine}: the engine's classes {manifest['classes']} differ from the checkpoint's "
                f"{ck_classes} ({args.checkpoint}): not exported from this checkpoint?"
            )
        # a .pt engine runs at the precision asked of it (--pt-precision), not its manifest's fp32
        precision = backend.precision if isinstance(backend, TorchBackend) else str(manifest.get("precision", "fp32"))
        if precision not in BOUNDS:
            return err(f"{args.engine}: its manifest gives precision {precision!r}, not one of {', '.join(BOUNDS)}")
        p = preprocessing_of(manifest)
        split = scan_split(args.val_dir, classes=manifest["classes"])
        checked = source_check(manifest, args.checkpoint, reference.model.state_dict())
    except PipelineError as e:
        return err(str(e))
    other = source_mismatch(checked, str(args.engine), str(args.checkpoint))
    if other:
        print(f"warning: {other} (recorded in the report)", file=sys.stderr)
    files, labels = split.files, split.labels
    if args.limit and args.limit < len(files):
        from rn50.layout import balanced_subset

        files, labels = balanced_subset(files, labels, args.limit)
    bs = min(args.batch_size, backend.max_batch)
    stream = BatchStream(files, p, bs, device=device, num_threads=env_threads())
    ref_l, eng_l, lab_l = [], [], []
    failed: list[dict[str, str]] = []
    t0 = time.perf_counter()
    with tqdm(total=len(files), unit="img", disable=args.quiet, file=sys.stderr, dynamic_ncols=True) as bar:
        for b in stream:
            failed += [{"path": pth, "error": c} for _, pth, c in b.errors]
            if b.x is not None and b.indices:
                ref_l.append(reference.run(b.x))
                eng_l.append(backend.run(b.x))
                lab_l.append(np.asarray([labels[i] for i in b.indices], np.int64))
            bar.update(len(b.indices) + len(b.errors))
    if not ref_l:
        return err(f"{args.val_dir}: no image could be decoded ({len(failed)} failed)")
    ref, eng, lab = np.concatenate(ref_l), np.concatenate(eng_l), np.concatenate(lab_l)
    r = compare(ref, eng, lab, precision)
    r["engine_acc"] = r.pop("engine")
    share = len(failed) / (len(failed) + len(lab))
    r.update(failed_share=share, max_failed=args.max_failed)
    if share > args.max_failed:
        too_many = (
            f"{len(failed)} of {len(failed) + len(lab)} images ({100 * share:.2g} %) could not be decoded, "
            f"more than --max-failed {args.max_failed:g}"
        )
        r.update(passed=False, problem="; ".join(filter(None, [r["problem"], too_many])))
    r.update(
        engine=str(args.engine),
        backend=f"{backend.name} ({backend.provider})",
        checkpoint=str(args.checkpoint),
        source_check=checked,
        val_dir=str(args.val_dir),
        failed_images=failed,
        seconds=round(time.perf_counter() - t0, 2),
    )
    r.update(per_class_report(ref, eng, lab, list(manifest["classes"]), f"{prefix}.confusion.png"))
    md = markdown(r) + "\n" + per_class_markdown(r)
    write_json(f"{prefix}.json", r)
    write_text(f"{prefix}.md", md)
    print(md)
    if failed:
        print(
            f"warning: {len(failed)} images could not be decoded and were left out (listed in {prefix}.json)",
            file=sys.stderr,
        )
    print(f"report: {prefix}.json, {prefix}.md, {prefix}.confusion.png", file=sys.stderr)
    return EXIT_PASS if r["passed"] else EXIT_FAIL


if __name__ == "__main__":
    from rn50.interrupt import run_command

    sys.exit(run_command(main, "no report was written (reports appear only when validation completes)"))
