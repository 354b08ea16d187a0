"""Record the TensorRT Python API names this project uses, per release.

Reads NVIDIA's bindings source at each v10.x / v11.x tag of a local clone of
github.com/NVIDIA/TensorRT and writes beside this file:

* ``tensorrt_surface.json``: for each tag, the members of the enums export/tensorrt_engine.py
  looks up and the IBuilderConfig properties it sets (``python/src/infer/pyCore.cpp``);
* ``tensorrt_api_names.json``: which of the attribute names the TensorRT code uses (:func:`used_names`
  of :data:`CODE`) each tag's bindings define (``BINDINGS``: every method, property, enum value,
  class and enum name bound there), so a test can refuse a name that some claimed release lacks.

``python tests/export/trt_surface/record_tensorrt_surface.py /path/to/TensorRT.git``
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

PATH = "python/src/infer/pyCore.cpp"
BINDINGS = (
    PATH,
    "python/src/infer/pyFoundationalTypes.cpp",
    "python/src/infer/pyGraph.cpp",
    "python/src/parsers/pyOnnx.cpp",
)
ROOT = Path(__file__).resolve().parents[3]
CODE = ("export/tensorrt_engine.py", "rn50/backends/tensorrt.py")  # the modules that call TensorRT
# a name bound by pybind11: .def("x", .def_property("x", .value("x", py::class_<T>(m, "x", ...
BOUND = re.compile(
    r'(?:\.def(?:_static)?|\.def_property(?:_readonly)?|\.def_read(?:write|only)|\.value)\(\s*"(\w+)"'
    r'|py::(?:class_|enum_)<[^;{]*?>\s*[({]?\s*\w+,\s*"(\w+)"'
)
ENUMS = ("BuilderFlag", "HardwareCompatibilityLevel", "NetworkDefinitionCreationFlag", "MemoryPoolType")
PROPERTIES = ("builder_optimization_level", "hardware_compatibility_level")


def surface(source: str) -> dict[str, object]:
    enums = {}
    for m in re.finditer(r"py::enum_<(\w+)>\((.*?);", source, re.S):
        if m.group(1) in ENUMS:
            enums[m.group(1)] = re.findall(r'\.value\(\s*"(\w+)"', m.group(2))
    props = sorted(set(re.findall(r'def_property(?:_readonly)?\(\s*"(\w+)"', source)) & set(PROPERTIES))
    return {"enums": enums, "builder_config_properties": props}


def used_names() -> list[str]:
    """Every attribute name the TensorRT modules read (``x.name``), sorted: a superset of the
    TensorRT API they use, which the recorded bindings narrow down."""
    import ast

    names: set[str] = set()
    for rel in CODE:
        names |= {n.attr for n in ast.walk(ast.parse((ROOT / rel).read_text())) if isinstance(n, ast.Attribute)}
    return sorted(names)


def bound_names(source: str) -> set[str]:
    return {a or b for a, b in BOUND.findall(source)}


def show(git_dir: str, tag: str, path: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", git_dir, "show", f"{tag}:{path}"], capture_output=True, text=True, check=True
    ).stdout


def main(git_dir: str) -> None:
    tags = subprocess.run(
        ["git", "--git-dir", git_dir, "tag"], capture_output=True, text=True, check=True
    ).stdout.split()
    tags = sorted(
        (t for t in tags if re.fullmatch(r"v1[01]\.\d+(\.\d+)?", t)),
        key=lambda t: tuple(int(x) for x in t[1:].split(".")),
    )
    out = {}
    used = used_names()
    present = {}
    for t in tags:
        out[t] = {
            "version": t[1:],
            "source": f"github.com/NVIDIA/TensorRT {t}:{PATH}",
            **surface(show(git_dir, t, PATH)),
        }
        bound = set().union(*(bound_names(show(git_dir, t, path)) for path in BINDINGS))
        present[t] = sorted(set(used) & bound)
    dest = Path(__file__).with_name("tensorrt_surface.json")
    dest.write_text(json.dumps(out, indent=1) + "\n")
    names = Path(__file__).with_name("tensorrt_api_names.json")
    sources = [f"github.com/NVIDIA/TensorRT <tag>:{p}" for p in BINDINGS]
    names.write_text(json.dumps({"sources": sources, "checked": used, "bound": present}, indent=1) + "\n")
    print(f"wrote {dest} and {names}: {', '.join(out)}")


if __name__ == "__main__":
    main(sys.argv[1])
