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


def test_real_data_rows_full_or_not_and_ratio_to_synthetic(tmp_path: Path) -> None:
    """The data stage's table: per-epoch rates, the last epoch against the synthetic rate of the same
    configuration, the wait for data, and a row that says when its epochs were not full."""
    res = gc.Results(tmp_path)
    label = gc.SPEED_CONFIGS[3][0]
    loader = {"first_s": 0.02, "wait_s": 0.4, "end_s": 0.1, "built_ahead": True, "build_s": 0.35}
    res.put(
        "speed/real/dali-gpu",
        {
            "rc": 0,
            "log": "l",
            "config": label,
            "data": "Fashion-MNIST JPEGs via dali-gpu, full epochs of 59,904 images an epoch",
            "img_per_s": 5000.0,
            "backend": "dali-gpu",
            "epochs_planned": 2,
            "images_per_epoch": 59904,
            "train_images": 60000,
            "full_epochs": True,
            "epoch_img_per_s": [2500.0, 5000.0],
            "loader": [{**loader, "built_ahead": False}, loader],
            "synthetic_img_per_s": 5464.0,
            "vs_synthetic": 5000.0 / 5464.0,
        },
    )
    res.put(
        "speed/real/pytorch",
        {
            "rc": -9,
            "timed_out": True,
            "log": "logs/speed-real-pytorch.log",
            "config": label,
            "data": "Fashion-MNIST JPEGs via pytorch, NOT full: 19,968 of 60,000 images an epoch",
            "img_per_s": None,
            "backend": "pytorch",
            "epochs_planned": 2,
            "images_per_epoch": 19968,
            "train_images": 60000,
            "full_epochs": False,
            "epoch_img_per_s": [1800.0],
            "loader": [{"first_s": 2.5, "wait_s": 9.0, "end_s": 0.3}],
            "synthetic_img_per_s": 5464.0,
            "vs_synthetic": None,
        },
    )
    t = gc.table(gc.Results(tmp_path))
    assert "| dali-gpu | 59,904 (full) | 2/2 | 2,500, 5,000 | 0.92x of 5,464 | 0.40 s | 0.02 s | yes (350 ms) |" in t
    assert (
        "| pytorch | 19,968 of 60,000 (NOT full) | 1/2 (stopped by --data-timeout) | 1,800 | - | 9.00 s | 2.50 s "
        "| - (not DALI) |"
    ) in t
    # table 1 keeps one row per backend; a run without a second epoch has no training rate there
    assert "| Fashion-MNIST JPEGs via pytorch, NOT full: 19,968 of 60,000 images an epoch | failed (" in t
    assert f"| {label} | Fashion-MNIST JPEGs via dali-gpu, full epochs of 59,904 images an epoch | 5,000 |" in t


def test_data_stage_runs_full_epochs_and_caps_only_pytorch(tmp_path: Path, fmnist_tiny: Path, monkeypatch) -> None:
    """stage_data with the training runs faked: two epochs at least, every training image for DALI,
    --real-images-pytorch caps only the DataLoader, ratios against the fastest AMP synthetic row."""
    calls = {}

    def fake_run(results, name, args, timeout=None):
        args = [str(x) for x in args]
        calls[name] = (args, timeout)
        out = Path(args[args.index("--output") + 1])
        out.mkdir(parents=True, exist_ok=True)
        recs = [
            {"epoch": e + 1, "img_per_s": 1000.0 * (e + 1), "loader": {"first_s": 0.1, "wait_s": 0.5}} for e in range(3)
        ]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        return {"rc": 0, "wall_s": 1.0, "command": name, "log": name, "timed_out": False}

    monkeypatch.setattr(gc, "run", fake_run)
    res = gc.Results(tmp_path / "r")
    labels = [label for label, _ in gc.SPEED_CONFIGS]
    for label, ips in ((labels[1], 2000.0), (labels[3], 4000.0), (labels[2], 3000.0)):
        res.put("speed/synthetic/" + label, {"rc": 0, "config": label, "img_per_s": ips})
    a = gc.build_parser().parse_args(
        ["data", "--data", str(fmnist_tiny), "--batch-size", "16", "--data-epochs", "1", "--real-images-pytorch", "64"]
    )
    gc.stage_data(a, res, cuda=False)
    dali, _ = calls["speed-real-dali-cpu"]
    torch_args, timeout = calls["speed-real-pytorch"]
    assert timeout == a.data_timeout
    for args in (dali, torch_args):
        assert args[args.index("--epochs") + 1] == "2"  # at least two, whatever --data-epochs says
        assert "--compile" in args  # the fastest synthetic configuration's flags
    assert "--limit-train" not in dali and torch_args[torch_args.index("--limit-train") + 1] == "64"
    d, p = res["speed/real/dali-cpu"], res["speed/real/pytorch"]
    assert d["full_epochs"] and d["images_per_epoch"] == 192 and d["train_images"] == 200  # 12 batches of 16
    assert not p["full_epochs"] and p["images_per_epoch"] == 64
    assert d["epoch_img_per_s"] == [1000.0, 2000.0, 3000.0] and d["vs_synthetic"] == 3000.0 / 4000.0
    assert d["synthetic_img_per_s"] == 4000.0 and d["config"] == labels[3]


def test_speed_stage_command_lines_are_accepted_by_train(tmp_path: Path, monkeypatch) -> None:
    """Each synthetic-data run of the speed stage resolves with python -m train's own parser and
    resolver (a flag combination train refuses would cost the GPU session every speed row)."""
    import train.__main__ as train_main
    from train.config import resolve

    calls = []
    monkeypatch.setattr(gc, "run", lambda results, name, args, timeout=None: calls.append(args) or {"rc": 0})
    gc.stage_speed(gc.build_parser().parse_args(["speed"]), gc.Results(tmp_path), cuda=False)
    assert len(calls) == len(gc.SPEED_CONFIGS)
    for args in calls:
        assert [str(x) for x in args[:2]] == ["-m", "train"]
        cfg = resolve(train_main.build_parser().parse_args([str(x) for x in args[2:]]), 1, True)
        assert cfg.data_backend == "synthetic" and cfg.synthetic_without_data and cfg.num_classes == 1000


def test_table_without_results_is_an_error(tmp_path, capsys):
    """`gpu_check.sh table` before any stage ran: one error line, no table of 'None's."""
    from bench import gpu_check

    assert gpu_check.main(["table", "--results", str(tmp_path / "r")]) == 2
    assert "no results to tabulate" in capsys.readouterr().err
    assert not (tmp_path / "r" / "table.md").exists()
