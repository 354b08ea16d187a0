"""bench.gpu_check's arithmetic and table: time to accuracy, decode agreement, ratios, failed rows."""

from __future__ import annotations

import json
from pathlib import Path

from bench import gpu_check as gc


def test_time_to_is_the_first_epoch_reaching_the_bar() -> None:
    hist = [
        {"val_top1": 85.0, "elapsed": 30.0},
        {"val_top1": 90.5, "elapsed": 60.0},
        {"val_top1": 89.0, "elapsed": 90.0},
        {"val_top1": 94.2, "elapsed": 120.0},
    ]
    assert gc.time_to(hist, 90) == 60.0
    assert gc.time_to(hist, 94) == 120.0
    assert gc.time_to(hist, 95) is None
    assert gc._mmss(gc.time_to([{"val_top1": 96.0}], 95)) == "unknown"  # a record without "elapsed"
    assert gc._mmss(59.7) == "1 min 00 s" and gc._mmss(None) == "not reached"


def test_top1_agreement_by_path(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"path": "x.jpg", "topk": [3, 1]},
                {"path": "y.jpg", "topk": [2, 0]},
                {"path": "bad.jpg", "error": "e"},
                {"path": "z.jpg", "topk": [1, 4]},
            ]
        )
        + "\n"
    )
    b.write_text(
        "\n".join(
            json.dumps(r)
            for r in [  # another order, one class differs, one path missing
                {"path": "y.jpg", "topk": [2, 5]},
                {"path": "x.jpg", "topk": [4, 3]},
                {"path": "bad.jpg", "error": "e"},
            ]
        )
        + "\n"
    )
    assert gc.top1_agreement(a, b) == {"images": 2, "same_top1": 1, "percent": 50.0}


def test_table_ratios_and_failed_rows(tmp_path: Path) -> None:
    res = gc.Results(tmp_path)
    res.put("env", {"gpu": "Some GPU", "driver": "1.2", "torch": "2.x"})
    labels = [label for label, _ in gc.SPEED_CONFIGS]
    res.put(
        "speed/synthetic/" + labels[0],
        {"rc": 0, "config": labels[0], "data": "synthetic", "img_per_s": 1000.0, "log": "l0"},
    )
    res.put(
        "speed/synthetic/" + labels[3],
        {"rc": 0, "config": labels[3], "data": "synthetic", "img_per_s": 2940.0, "log": "l3"},
    )
    res.put(
        "speed/real/pytorch",
        {
            "rc": 1,
            "config": labels[3],
            "data": "JPEGs via pytorch",
            "img_per_s": None,
            "log": "logs/speed-real-pytorch.log",
        },
    )
    res.put(
        "train",
        {
            "rc": 0,
            "command": "python -m train",
            "epochs_done": 3,
            "epochs_planned": 3,
            "final_top1": 91.0,
            "final_top5": 99.5,
            "best_top1": 91.2,
            "best_epoch": 2,
            "wall_s": 130.0,
            "elapsed_s": 119.6,
            "img_per_s": 4000.0,
            "time_to": {"90": 61.0, "94": None, "95": None},
        },
    )
    res.put(
        "inference",
        {
            "rows": [
                {"engine": "pytorch eager fp32", "batch": 1, "images_per_s": 100.0, "p50_ms": 10.0},
                {"engine": "pytorch eager fp32", "batch": 256, "images_per_s": 1000.0, "p50_ms": 256.0},
                {"engine": "torch.compile fp16", "batch": 1, "images_per_s": 300.0, "p50_ms": 3.3},
                {"engine": "torch.compile fp16", "batch": 256, "images_per_s": 3250.0, "p50_ms": 78.8},
            ]
        },
    )
    t = gc.table(gc.Results(tmp_path))  # read back from results.json
    assert "Some GPU, driver 1.2" in t
    assert f"| {labels[0]} | synthetic | 1,000 | 1.00x |" in t
    assert f"| {labels[3]} | synthetic | 2,940 | 2.94x |" in t
    assert "| JPEGs via pytorch | failed (logs/speed-real-pytorch.log) | - |" in t
    assert (
        "| 3/3 | 91.00 | 99.50 | 91.20 (2) | 1 min 01 s | not reached | not reached | 2 min 00 s | 2 min 10 s | 4,000 |"
    ) in t
    assert "| torch.compile fp16 | 300 (3.30 ms) | 3,250 (78.80 ms) | 3.25x |" in t
