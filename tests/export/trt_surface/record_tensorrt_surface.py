"""Record the TensorRT Python API this project uses, per release.

Reads NVIDIA's bindings source at each v10.x / v11.x tag of a local clone of
github.com/NVIDIA/TensorRT and writes beside this file:

* ``tensorrt_surface.json``: for each tag, the members of the enums export/tensorrt_engine.py
  looks up, each with the integer value the Python enum holds, and the IBuilderConfig properties
  it sets: member names from ``python/src/infer/pyCore.cpp`` (``.value("TF32", BuilderFlag::kTF32``),
  values from the C++ enum in ``include/NvInfer.h`` (``kTF32 = 6``), since releases renumber them
  (11.0 dropped ``kEXPLICIT_BATCH = 0``, so ``kSTRONGLY_TYPED`` went from 1 to 0);
* ``tensorrt_api_names.json``: for the ``tensorrt`` module and each class the TensorRT code uses
  (:func:`used_names`), every name it has at each tag (:func:`bound_names`: methods, properties,
  enum members and nested classes bound in ``BINDINGS``, inherited ones included; for the module,
  its classes, functions and attributes, and the names ``PACKAGE`` adds), so a test can refuse a
  name that some claimed release lacks. Names are kept with their class: TensorRT 11.0 removed
  ``BuilderFlag.INT8`` but kept ``DataType.INT8``.

``python tests/export/trt_surface/record_tensorrt_surface.py /path/to/TensorRT.git``
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

PATH = "python/src/infer/pyCore.cpp"
HEADER = "include/NvInfer.h"  # where the C++ enums those members stand for are defined
BINDINGS = (
    PATH,
    "python/src/infer/pyFoundationalTypes.cpp",
    "python/src/infer/pyGraph.cpp",
    "python/src/parsers/pyOnnx.cpp",
)
# the Python half of the module: __version__, helpers, names it attaches to bound classes
PACKAGE = "python/packaging/bindings_wheel/tensorrt/__init__.py"
MODULE = "tensorrt"  # the owner of a module-level name: tensorrt.Builder, tensorrt.__version__
ROOT = Path(__file__).resolve().parents[3]
CODE = ("export/tensorrt_engine.py", "rn50/backends/tensorrt.py")  # the modules that call TensorRT
STUBS = (  # the TensorRT stubs mypy reads (typings/README.md)
    "typings/tensorrt/__init__.pyi",
    "typings/tensorrt_bindings/__init__.pyi",
    "typings/tensorrt_bindings/tensorrt.pyi",
)
# Parameters that hold the tensorrt module itself, typed Any: build_options takes it as an argument
# so that tests can pass a namespace in its place.
MODULE_PARAMETERS = ("trt_mod",)
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


# ------------------------------------------------------------------ the names the code uses


def used_names() -> dict[str, str]:
    """Every TensorRT name the modules in :data:`CODE` read, as ``Class.member`` (``tensorrt.X`` for
    the module's own), each with the first place that reads it (``path:line``).

    The class of an attribute's object is the type mypy infers for it from the stubs in typings/
    (``config.set_flag`` is ``IBuilderConfig.set_flag``; ``trt.BuilderFlag.INT8`` is
    ``BuilderFlag.INT8``); for the Any-typed :data:`MODULE_PARAMETERS`, the class is the stub's
    class of that name. Names in annotations are not read at run time (both modules postpone
    annotations) and are not counted. An attribute whose object mypy leaves untyped (code it finds
    unreachable) raises RuntimeError: its class cannot be known, so its name could not be checked."""
    from mypy import build
    from mypy.main import process_options
    from mypy.nodes import Expression, MemberExpr, MypyFile, NameExpr, RefExpr, StrExpr, TypeInfo
    from mypy.traverser import NameAndMemberCollector
    from mypy.types import FunctionLike, Instance, TypeType, UnionType, get_proper_type

    files = [str(ROOT / p) for p in (*CODE, *STUBS)]
    # only the two modules and the stubs: every other import is Any, which no TensorRT object is
    sources, options = process_options(
        ["--config-file", str(ROOT / "pyproject.toml"), "--follow-imports=skip", "--no-incremental", *files]
    )
    options.export_types = True
    options.preserve_asts = True
    result = build.build(sources, options)
    stub_names = result.graph["tensorrt"].tree.names

    def qualname(info: TypeInfo) -> str | None:
        if info.module_name.split(".")[0] not in ("tensorrt", "tensorrt_bindings"):
            return None
        return info.fullname[len(info.module_name) + 1 :]

    def owners(e: Expression, where: str) -> list[str]:
        """The TensorRT classes (or MODULE) whose attribute ``e.name`` is, for ``e`` its object."""
        if isinstance(e, RefExpr) and isinstance(e.node, MypyFile):
            return [MODULE] if e.node.fullname.split(".")[0] in ("tensorrt", "tensorrt_bindings") else []
        if isinstance(e, RefExpr) and isinstance(e.node, TypeInfo):
            return [q] if (q := qualname(e.node)) else []
        if isinstance(e, NameExpr) and e.name in MODULE_PARAMETERS:
            return [MODULE]
        if isinstance(e, MemberExpr) and owners(e.expr, where) == [MODULE]:
            sym = stub_names.get(e.name)
            return [q] if sym and isinstance(sym.node, TypeInfo) and (q := qualname(sym.node)) else []
        if isinstance(e, StrExpr):  # f-strings are parsed into "".join / "{}".format calls
            return []
        t = result.types.get(e)
        if t is None:
            raise RuntimeError(
                f"{where}: mypy did not type this code (it holds it unreachable), so the TensorRT names "
                "it reads cannot be checked against each release"
            )
        found = []
        proper = get_proper_type(t)
        for item in map(get_proper_type, proper.items if isinstance(proper, UnionType) else [proper]):
            if isinstance(item, Instance):
                info = item.type
            elif isinstance(item, FunctionLike) and item.is_type_obj():
                info = item.type_object()
            elif isinstance(item, TypeType) and isinstance(item.item, Instance):
                info = item.item.type
            else:
                continue
            if q := qualname(info):
                found.append(q)
        return found

    used: dict[str, str] = {}
    for rel in CODE:
        (module,) = (s.module for s in sources if s.path == str(ROOT / rel))
        collector = NameAndMemberCollector()
        result.graph[module].tree.accept(collector)
        for e in sorted(collector.member_exprs, key=lambda m: (m.line, m.column)):
            where = f"{rel}:{e.line}"
            for owner in owners(e.expr, where):
                used.setdefault(f"{owner}.{e.name}", where)
    return dict(sorted(used.items()))


# ------------------------------------------------------------------ the names each release binds

_LEXEME = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|//[^\n]*|/\*.*?\*/', re.S)
_CLOSE = {"(": ")", "[": "]", "{": "}"}
# a class or enum binding: [var =] py::class_<T, Bases...> [var](scope, "Name" or {scope, "Name"
_HEAD = re.compile(r"(?:\b(\w+)\s*=\s*)?py::(?:class_|enum_)\s*<")
_HEAD_ARGS = re.compile(r'\s*(\w+)?\s*[({]\s*(\w+)\s*,\s*"(\w+)"')
_CALL = re.compile(r"\.\s*(\w+)\s*\(")
_MEMBER_CALLS = {
    "def",
    "def_static",
    "def_property",
    "def_property_readonly",
    "def_property_static",
    "def_property_readonly_static",
    "def_readwrite",
    "def_readonly",
    "def_readwrite_static",
    "def_readonly_static",
    "value",
}


# The preprocessor macros the bindings test, as set when pip's `tensorrt` module is built: all
# bindings, not the lean/dispatch runtime's subset (python/include/ForwardDeclarations.h). Any
# other macro is undefined (ENABLE_INETWORK_SERIALIZE: INetworkDefinition.serialize is not built).
MACROS = {"EXPORT_ALL_BINDINGS": 1}


def _preprocess(source: str) -> str:
    """``source`` without the lines its ``#if`` / ``#ifdef`` / ``#else`` ... blocks leave out under :data:`MACROS`."""

    def holds(keyword: str, expr: str) -> bool:
        if keyword in ("ifdef", "ifndef"):
            return (expr in MACROS) == (keyword == "ifdef")
        m = re.fullmatch(r"(!?)\s*(?:defined\s*\(\s*(\w+)\s*\)|(\w+))", expr)
        if m is None:
            raise SystemExit(f"cannot evaluate #{keyword} {expr}")
        name = m.group(3)
        value = m.group(2) in MACROS if m.group(2) else bool(int(name) if name.isdigit() else MACROS.get(name, 0))
        return value != bool(m.group(1))

    kept, stack = [], []  # stack: [this branch is kept, some branch of this block was taken]
    for line in source.splitlines():
        d = re.match(r"\s*#\s*(if|ifdef|ifndef|elif|else|endif)\b(.*?)(?://.*)?$", line)
        if d is None:
            kept.append(line if all(active for active, _ in stack) else "")
            continue
        keyword, expr = d.group(1), d.group(2).strip()
        if keyword in ("if", "ifdef", "ifndef"):
            taken = holds(keyword, expr)
            stack.append([all(active for active, _ in stack) and taken, taken])
        elif keyword in ("elif", "else"):
            outer = all(active for active, _ in stack[:-1])
            taken = not stack[-1][1] and (keyword == "else" or holds("if", expr))
            stack[-1] = [outer and taken, stack[-1][1] or taken]
        else:
            stack.pop()
        kept.append("")
    return "\n".join(kept)


def _skip(code: str, i: int) -> int:
    """The index just past the string literal or bracketed group that starts at ``code[i]``, else i + 1."""
    c = code[i]
    if c in "\"'":
        m = _LEXEME.match(code, i)
        return m.end() if m else i + 1
    if c in _CLOSE:
        j = i + 1
        while j < len(code) and code[j] != _CLOSE[c]:
            j = _skip(code, j)
        return j + 1
    return i + 1


def _statement(code: str, i: int) -> str:
    """The C++ statement that starts at ``code[i]``, up to its ``;``."""
    j = i
    while j < len(code) and code[j] != ";":
        j = _skip(code, j)
    return code[i:j]


def _calls(statement: str) -> Iterator[tuple[str, str]]:
    """(method, arguments) of each ``.method(...)`` the statement chains, not those nested inside
    its arguments (a lambda's body)."""
    j = 0
    while j < len(statement):
        m = _CALL.match(statement, j)
        if m:
            end = _skip(statement, m.end() - 1)
            yield m.group(1), statement[m.end() : end - 1]
            j = end
        else:
            j = _skip(statement, j)


def _template_args(code: str, i: int) -> tuple[list[str], int]:
    """The comma-separated arguments of the template whose ``<`` is ``code[i - 1]``, and the index past its ``>``."""
    args, depth, start, j = [], 0, i, i
    while True:
        c = code[j]
        if c == "<":
            depth += 1
        elif c == ">" and depth:
            depth -= 1
        elif c == ">" or (c == "," and not depth):
            args.append(code[start:j].strip())
            start = j + 1
            if c == ">":
                return args, j + 1
        j += 1


def _members(statement: str) -> tuple[set[str], bool]:
    """The names a binding statement defines, and whether it exports an enum's values to its scope."""
    names, exported = set(), False
    for method, args in _calls(statement):
        if method in _MEMBER_CALLS and (m := re.match(r'\s*"(\w+)"', args)):
            names.add(m.group(1))
        exported |= method == "export_values"
    return names, exported


def bound_names(sources: dict[str, str], package: str = "") -> dict[str, set[str]]:
    """Every name each class of the pybind11 ``sources`` (file name -> C++) has in Python, under its
    qualified name (``ILogger.Severity``), and the module's own names under :data:`MODULE`.

    A class has the names its binding statements define (``.def("x"``, ``.def_property("x"``,
    ``.value("X"``, ..., chained on ``py::class_<...>(m, "Name")`` or on a variable holding the
    binding), its nested classes and enums, the values of a nested enum it exports
    (``.export_values()``), and the names of its bases (the template arguments that are bound
    classes); what the preprocessor leaves out under :data:`MACROS` is not read. ``package`` is the
    Python ``__init__.py`` that wraps the bindings: its top-level definitions are module names,
    ``Class.attr = ...`` adds to a class (``Logger.Severity = ILogger.Severity`` also makes the one
    class the other)."""
    own: dict[str, set[str]] = {MODULE: set()}
    bases: dict[str, list[str]] = {}
    cpp_names: dict[str, dict[str, str]] = {}  # file -> C++ type -> qualified Python name
    pending: list[tuple[str, str, list[str]]] = []  # (file, qualified name, C++ template arguments)
    exported: list[str] = []
    for file, source in sources.items():
        code = _LEXEME.sub(lambda m: m.group() if m.group()[0] in "\"'" else " ", _preprocess(source))
        variables: dict[str, str] = {}
        cpp_names[file] = {}
        for head in _HEAD.finditer(code):
            targs, after = _template_args(code, head.end())
            m = _HEAD_ARGS.match(code, after)
            if m is None:
                raise SystemExit(f"{file}: cannot read the binding at {code[head.start() : head.start() + 80]!r}")
            var, scope, name = head.group(1) or m.group(1), m.group(2), m.group(3)
            if scope == "m":
                owner = MODULE
            elif scope in variables:
                owner = variables[scope]
            else:
                raise SystemExit(f"{file}: {name} is bound in {scope}, which is neither the module nor a bound class")
            qual = name if owner == MODULE else f"{owner}.{name}"
            own[owner].add(name)
            statements = [_statement(code, head.start())]
            if var:
                variables[var] = qual
                uses = re.compile(rf"(?<![\w.:>]){var}\s*\.").finditer(code, head.end())
                statements += [_statement(code, v.start()) for v in uses]
            own.setdefault(qual, set())
            for statement in statements:
                names, exports = _members(statement)
                own[qual] |= names
                if exports:
                    exported.append(qual)
            cpp_names[file][targs[0]] = qual
            pending.append((file, qual, targs[1:]))
        own[MODULE] |= set(re.findall(r'(?<![\w.])m\s*\.\s*(?:def|attr)\s*\(\s*"(\w+)"', code))
    everywhere = {cpp: qual for names in cpp_names.values() for cpp, qual in names.items()}
    for file, qual, others in pending:
        bases[qual] = [n for a in others if (n := cpp_names[file].get(a) or everywhere.get(a))]
    for qual in exported:
        own[qual.rsplit(".", 1)[0]] |= own[qual]
    for line in package.splitlines():
        if m := re.match(r"(?:def|class)\s+(\w+)|import\s+(\w+)\s*$|(\w+)\s*=", line):
            own[MODULE].add(next(filter(None, m.groups())))
        elif (m := re.match(r"\s*(\w+)\.(\w+)\s*=\s*([\w.]+)?", line)) and m.group(1) in own:
            own[m.group(1)].add(m.group(2))
            if m.group(3) in own:  # Logger.Severity = ILogger.Severity
                own[f"{m.group(1)}.{m.group(2)}"] = own[m.group(3)]

    def every(qual: str) -> set[str]:
        return own[qual].union(*(every(b) for b in bases.get(qual, ())))

    return {qual: every(qual) for qual in own}


def show(git_dir: str, tag: str, path: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", git_dir, "show", f"{tag}:{path}"], capture_output=True, text=True, check=True
    ).stdout


def _ranges(tags: list[str], present: list[str]) -> list[str]:
    """``present`` (a subset of ``tags``) as runs of consecutive tags: ``["v10.0.0..v10.16"]``."""
    runs: list[list[str]] = []
    for i, t in enumerate(tags):
        if t in present:
            if runs and tags[i - 1] == runs[-1][-1]:
                runs[-1].append(t)
            else:
                runs.append([t])
    return [r[0] if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs]


def main(git_dir: str) -> None:
    tags = subprocess.run(
        ["git", "--git-dir", git_dir, "tag"], capture_output=True, text=True, check=True
    ).stdout.split()
    tags = sorted(
        (t for t in tags if re.fullmatch(r"v1[01]\.\d+(\.\d+)?", t)),
        key=lambda t: tuple(int(x) for x in t[1:].split(".")),
    )
    out = {}
    bound = {}
    for t in tags:
        out[t] = {
            "version": t[1:],
            "source": f"github.com/NVIDIA/TensorRT {t}:{PATH}",
            "values_from": f"github.com/NVIDIA/TensorRT {t}:{HEADER}",
            **surface(show(git_dir, t, PATH), show(git_dir, t, HEADER)),
        }
        bound[t] = bound_names({p: show(git_dir, t, p) for p in BINDINGS}, show(git_dir, t, PACKAGE))
    # the module, the classes whose members the code reads, and the classes it names (trt.BuilderFlag)
    used = [name.rsplit(".", 1) for name in used_names()]
    named = {member for owner, member in used if owner == MODULE} & set().union(*bound.values())
    classes = sorted({owner for owner, _ in used} | named)
    names: dict[str, dict[str, list[str]]] = {c: {} for c in classes}
    for t in tags:
        for c in classes:
            for member in bound[t].get(c, ()):
                names[c].setdefault(member, []).append(t)
    dest = Path(__file__).with_name("tensorrt_surface.json")
    dest.write_text(json.dumps(out, indent=1) + "\n")
    api = {
        "sources": [f"github.com/NVIDIA/TensorRT <tag>:{p}" for p in (*BINDINGS, PACKAGE)],
        "tags": tags,
        # class (tensorrt: the module) -> name -> the tags that bind it
        "names": {c: {n: _ranges(tags, ts) for n, ts in sorted(members.items())} for c, members in names.items()},
    }
    path = Path(__file__).with_name("tensorrt_api_names.json")
    path.write_text(json.dumps(api, indent=1) + "\n")
    print(f"wrote {dest} and {path}: {', '.join(out)}")


if __name__ == "__main__":
    main(sys.argv[1])
