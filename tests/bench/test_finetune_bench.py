"""python -m bench.finetune: the images each stage trains on, and reruns in one --work folder.

The training runs are replaced by a stand-in that selects the training images as the trainer does
(rn50.layout.load_dataset and balanced_subset with --limit-train) and records them, so these tests
check what the bench hands the trainer and what it reports, without training ResNet50 four times.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench import finetune
from rn50.fashion_mnist import CLASSES
from rn50.layout import balanced_subset, load_dataset

FMNIST = Path("/usr/share/datasets/fashion-mnist")
PRETRAIN, TARGET = CLASSES[:5], CLASSES[5:]


@pytest.fixture
def trained(monkeypatch) -> dict[str, Counter]:
    """Run name -> training images per class, as each run of the bench would select them."""
    runs: dict[str, Counter] = {}

    def run_train(args: list[str]) -> dict[str, Any]:
        data, out = Path(args[args.index("--data") + 1]), Path(args[args.index("--output") + 1])
        limit = int(args[args.index("--limit-train") + 1]) if "--limit-train" in args else None
        train, _ = load_dataset(data)
        _, labels = balanced_subset(train.files, train.labels, limit)  # train.loop's selection
        runs[out.name] = Counter(train.classes[i] for i in labels)
        return {
            "top1": 50.0,
            "top5": 90.0,
            "val_images": 10,
            "epochs": 1,
            "wall_s": 0.0,
            "lr": 0.01,
            "warmup_epochs": 0.3,
            "preset": "finetune",
        }

    monkeypatch.setattr(finetune, "run_train", run_train)
    return runs


def _bench(work: Path, pretrain: int, target: int, capsys) -> tuple[dict[str, Any], str]:
    argv = ["--source", str(FMNIST), "--work", str(work), "--val-per-class", "2"]
    argv += ["--pretrain-per-class", str(pretrain), "--target-per-class", str(target)]
    assert finetune.main(argv) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


def test_the_report_gives_the_images_each_stage_trained_on(tmp_path, trained, capsys):
    """More target images per class than pretraining ones: each run gets what was asked, and the
    report says so."""
    res, err = _bench(tmp_path / "work", pretrain=8, target=20, capsys=capsys)
    assert trained["pretrain"] == Counter({c: 8 for c in PRETRAIN})
    for run in ("finetune", "scratch", "scratch-recipe"):
        assert trained[run] == Counter({c: 20 for c in TARGET}), run
    assert res["pretrain"]["images"] == 40 and res["target"]["images"] == 100
    assert "pretrain 40 images x 3 epochs" in err and "target 100 images x 3 epochs" in err


def test_a_rerun_in_the_same_work_folder(tmp_path, trained, capsys):
    """A second run in the same --work folder, with other sizes, runs on what it asks for."""
    work = tmp_path / "work"
    res, _ = _bench(work, pretrain=12, target=6, capsys=capsys)
    assert res["pretrain"]["images"] == 60 and res["target"]["images"] == 30
    res, _ = _bench(work, pretrain=12, target=6, capsys=capsys)  # the same again
    assert trained["finetune"] == Counter({c: 6 for c in TARGET}) and res["target"]["images"] == 30
    res, _ = _bench(work, pretrain=4, target=10, capsys=capsys)  # other sizes: converted anew
    assert trained["pretrain"] == Counter({c: 4 for c in PRETRAIN})
    assert trained["scratch"] == Counter({c: 10 for c in TARGET})
    assert res["pretrain"]["images"] == 20 and res["target"]["images"] == 50
    assert sorted(p.name for p in (work / "target-classes" / "train").iterdir()) == sorted(TARGET)
