"""Helpers for the serve tests: engine copies with an edited manifest."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def copy_engine(tmp_path) -> Callable[[Path, Callable[[dict[str, Any]], None]], Path]:
    """``copy_engine(engine, edit)``: copy ``engine`` and its manifest (``<engine>.manifest.json``)
    into tmp_path, the manifest changed by ``edit(manifest_dict)``; returns the copy's path."""

    def copy(engine: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
        eng = tmp_path / engine.name
        shutil.copy(engine, eng)
        m = json.loads(Path(str(engine) + ".manifest.json").read_text())
        edit(m)
        Path(str(eng) + ".manifest.json").write_text(json.dumps(m))
        return eng

    return copy


@pytest.fixture
def set_image_size() -> Callable[[dict[str, Any], int], None]:
    """``set_image_size(manifest, size)``: make the manifest describe another image size,
    consistently (image_size, preprocessing crop and resize), as an export at that size would."""
    from rn50.preprocess import Preprocessing

    def edit(m: dict[str, Any], size: int) -> None:
        p = Preprocessing.from_dict(m["preprocessing"])
        resize = Preprocessing.for_image_size(size).resize_size
        m["preprocessing"] = dataclasses.replace(p, image_size=size, resize_size=resize).to_dict()
        m["image_size"] = size

    return edit
