"""Record the TensorRT Python API names this project uses, per release.

Reads NVIDIA's bindings source at each v10.x / v11.x tag of a local clone of
github.com/NVIDIA/TensorRT and writes beside this file:

* ``tensorrt_surface.json``: for each tag, the members of the enums export/tensorrt_engine.py
  looks up, each with the integer value the Python enum holds, and the IBuilderConfig properties
  it sets: member names from ``python/src/infer/pyCore.cpp`` (``.value("TF32", BuilderFlag::kTF32``),
  values from the C++ enum in ``include/NvInfer.h`` (``kTF32 = 6``), since releases renumber them
  (11.0 dropped ``kEXPLICIT_BATCH = 0``, so ``kSTRONGLY_TYPED`` went from 1 to 0);
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
HEADER = "include/NvInfer.h"  # where the C++ enums those members stand for are defined
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


def cpp_enum(header: str, name: str) -> dict[str, int]:
    """The enumerators of ``enum class name : int32_t { ... };`` in ``header`` with their values
    (explicit ``= N`` or ``= kOTHER``, else one more than the previous; deprecation macros dropped)."""
    m = re.search(rf"enum class {name}\s*:\s*\w+\s*\{{(.*?)\}};", header, re.S)
    if m is None:
        raise SystemExit(f"no definition of enum class {name} in {HEADER}")
    body = re.sub(r"//[^\n]*|/\*.*?\*/", "", m.group(1), flags=re.S)
    values: dict[str, int] = {}
    nxt = 0
    for item in filter(None, (x.strip() for x in body.split(","))):
        e = re.fullmatch(r"(k\w+)(?:\s+TRT_DEPRECATED\w*)*(?:\s*=\s*(-?\d+|k\w+))?", item)
        if e is None:
            raise SystemExit(f"cannot read the enumerator {item!r} of {name} in {HEADER}")
        if e.group(2) is not None:
            nxt = values[e.group(2)] if e.group(2).startswith("k") else int(e.group(2))
        values[e.group(1)] = nxt
        nxt += 1
    return values


def surface(source: str, header: str) -> dict[str, object]:
    """The members the bindings ``source`` give each of :data:`ENUMS`, with their C++ values."""
    enums = {}
    for m in re.finditer(r"py::enum_<(\w+)>\((.*?);", source, re.S):
        if m.group(1) in ENUMS:
            cpp = cpp_enum(header, m.group(1))
            pairs = re.findall(rf'\.value\(\s*"(\w+)",\s*{m.group(1)}::(k\w+)', m.group(2))
            if len(pairs) != len(re.findall(r"\.value\(", m.group(2))):
                raise SystemExit(f"cannot pair every Python member of {m.group(1)} with its C++ enumerator")
            enums[m.group(1)] = {py: cpp[c] for py, c in pairs}
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
            "values_from": f"github.com/NVIDIA/TensorRT {t}:{HEADER}",
            **surface(show(git_dir, t, PATH), show(git_dir, t, HEADER)),
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
