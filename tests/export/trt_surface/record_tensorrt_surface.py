"""Record the TensorRT Python API names the engine builder dispatches on, per release.

Reads NVIDIA's bindings source (``python/src/infer/pyCore.cpp``) at each v10.x / v11.x tag of a
local clone of github.com/NVIDIA/TensorRT and writes ``tensorrt_surface.json`` beside this file:
for each tag, the members of the enums export/tensorrt_engine.py looks up and the IBuilderConfig
properties it sets. ``python tests/export/trt_surface/record_tensorrt_surface.py /path/to/TensorRT.git``
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

PATH = "python/src/infer/pyCore.cpp"
ENUMS = ("BuilderFlag", "HardwareCompatibilityLevel", "NetworkDefinitionCreationFlag", "MemoryPoolType")
PROPERTIES = ("builder_optimization_level", "hardware_compatibility_level")


def surface(source: str) -> dict[str, object]:
    enums = {}
    for m in re.finditer(r"py::enum_<(\w+)>\((.*?);", source, re.S):
        if m.group(1) in ENUMS:
            enums[m.group(1)] = re.findall(r'\.value\(\s*"(\w+)"', m.group(2))
    props = sorted(set(re.findall(r'def_property(?:_readonly)?\(\s*"(\w+)"', source)) & set(PROPERTIES))
    return {"enums": enums, "builder_config_properties": props}


def main(git_dir: str) -> None:
    tags = subprocess.run(
        ["git", "--git-dir", git_dir, "tag"], capture_output=True, text=True, check=True
    ).stdout.split()
    tags = sorted(
        (t for t in tags if re.fullmatch(r"v1[01]\.\d+(\.\d+)?", t)),
        key=lambda t: tuple(int(x) for x in t[1:].split(".")),
    )
    out = {}
    for t in tags:
        src = subprocess.run(
            ["git", "--git-dir", git_dir, "show", f"{t}:{PATH}"], capture_output=True, text=True, check=True
        ).stdout
        out[t] = {"version": t[1:], "source": f"github.com/NVIDIA/TensorRT {t}:{PATH}", **surface(src)}
    dest = Path(__file__).with_name("tensorrt_surface.json")
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest}: {', '.join(out)}")


if __name__ == "__main__":
    main(sys.argv[1])
