"""Every command's numeric flags go through one range table (rn50/flags.py) before any work."""

from __future__ import annotations

import argparse
import importlib
import math

import pytest

from rn50.flags import Range, flag_problem
from tests.stderr import error_line

COMMANDS = ["train.__main__", "export.__main__", "serve.infer", "serve.validate", "serve.triton"]


def _tables(module: str) -> tuple[argparse.ArgumentParser, dict[str, Range]]:
    m = importlib.import_module(module)
    ranges = m.FLAG_RANGES if hasattr(m, "FLAG_RANGES") else importlib.import_module("train.config").FLAG_RANGES
    return m.build_parser(), ranges


@pytest.mark.parametrize("module", COMMANDS)
def test_every_numeric_flag_has_a_range_and_its_default_is_in_it(module: str) -> None:
    """A numeric flag added to a parser without a row would take any value (NaN, -1) again."""
    parser, ranges = _tables(module)
    numeric = {
        a.option_strings[0]: a.default
        for a in parser._actions
        if isinstance(a, argparse._StoreAction) and a.type in (int, float)
    }
    assert set(numeric) == set(ranges), set(numeric) ^ set(ranges)
    for flag, default in numeric.items():
        assert default is None or ranges[flag].problem(default) is None, (flag, default)


def test_range_bounds_and_non_finite_values() -> None:
    r = Range(lo=0, hi=1, hi_open=True, why="a fraction")
    assert r.problem(0) is None and r.problem(0.5) is None
    assert r.problem(1) == "must be at least 0 and below 1 (a fraction)"
    assert r.problem(-0.1) == "must be at least 0 and below 1 (a fraction)"
    assert r.problem(math.nan) == "must be a finite number at least 0 and below 1 (a fraction)"
    assert Range(lo=0).problem(math.inf) == "must be a finite number at least 0"
    assert Range(lo=0, lo_open=True).problem(0) == "must be above 0"
    assert Range(hi=2**32 - 1).problem(10**400) == "must be a finite number at most 4294967295"  # no OverflowError
    assert Range(lo=16, message="too small").problem(8) == "too small"
    args = argparse.Namespace(batch_size=0, limit=None)
    ranges = {"--limit": Range(lo=1), "--batch-size": Range(lo=1)}
    assert flag_problem(args, ranges) == "--batch-size 0: must be at least 1"  # None: not given
    assert flag_problem(argparse.Namespace(batch_size=2.0, limit=None), ranges) is None


def test_each_command_refuses_a_value_out_of_range_with_one_line(capsys, tmp_path) -> None:
    """Before any file is read: the engine, checkpoint and image paths here do not exist."""
    import export.__main__ as export
    from serve import infer, triton, validate

    missing = str(tmp_path / "missing")
    cases = [
        (
            export.main,
            [
                "--checkpoint",
                missing,
                "--precision",
                "int8",
                "--output",
                f"{tmp_path}/m.onnx",
                "--max-top1-drop",
                "nan",
            ],
            "--max-top1-drop nan: must be a finite number at least 0 and at most 100 (top-1 points)",
        ),
        (
            export.main,
            ["--checkpoint", missing, "--precision", "fp16", "--output", f"{tmp_path}/m.plan", "--opt-level", "6"],
            "--opt-level 6: must be at least 0 and at most 5 (TensorRT's builder optimisation levels)",
        ),
        (infer.main, ["--engine", missing, "--topk", "0", missing], "--topk 0: must be at least 1"),
        (
            validate.main,
            ["--engine", missing, "--checkpoint", missing, missing, "--limit", "-3"],
            "--limit -3: must be at least 1",
        ),
        (triton.main, ["--engine", missing, "--queue-delay-us", "-1"], "--queue-delay-us -1: must be at least 0"),
    ]
    for main, argv, line in cases:
        assert main(argv) == 2, argv
        assert error_line(capsys.readouterr().err) == f"error: {line}"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["four", "0", "-2", "1.5"])
def test_a_bad_thread_count_in_the_environment_is_one_line(value, capsys, tmp_path, monkeypatch) -> None:
    from serve import infer, triton, validate

    monkeypatch.setenv("RN50_DALI_THREADS", value)
    missing = str(tmp_path / "missing")
    for main, argv in (
        (infer.main, ["--engine", missing, missing]),
        (validate.main, ["--engine", missing, "--checkpoint", missing, missing]),
        (triton.main, ["--engine", missing]),
    ):
        assert main(argv) == 2, argv
        assert error_line(capsys.readouterr().err).startswith(f"error: RN50_DALI_THREADS={value!r}: must be a whole")
