"""The engine builder's TensorRT version and feature dispatch, against every release it claims.

``trt_surface/tensorrt_surface.json`` records, for each TensorRT tag from 10.0 to 11.x, the enum members
and IBuilderConfig properties NVIDIA's bindings define (``python/src/infer/pyCore.cpp`` at that
tag), each member with its value from the C++ enum (``include/NvInfer.h``; releases renumber them);
``trt_surface/record_tensorrt_surface.py`` regenerates it. Each test builds a plain namespace with
exactly those names and runs :func:`export.tensorrt_engine.build_options` on it. This checks our
dispatch logic (which names it looks up, what it does when one is missing); it does not run, and
does not pretend to be, TensorRT: building real engines is tests/export's ``tensorrt``-marked test.
``trt_surface/tensorrt_api_names.json`` records, per tag, every name the ``tensorrt`` module and each
class the TensorRT code uses have in the bindings, so every method, property and enum member the
code uses is checked, with its class, against every claimed release, and the GPU-support rule
(:func:`rn50.backends.tensorrt.unsupported_gpu`) against each release's number.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from export import tensorrt_engine as te
from rn50.errors import EngineError

SURFACES = json.loads((Path(__file__).parent / "trt_surface" / "tensorrt_surface.json").read_text())
API = json.loads((Path(__file__).parent / "trt_surface" / "tensorrt_api_names.json").read_text())


def _fake(tag: str) -> SimpleNamespace:
    """A namespace with the names the bindings at ``tag`` define (enum members with their values)."""
    s = SURFACES[tag]
    enums = {name: SimpleNamespace(**members) for name, members in s["enums"].items()}
    return SimpleNamespace(__version__=s["version"], **enums)


def _v(tag: str) -> tuple[int, int]:
    major, minor = SURFACES[tag]["version"].split(".")[:2]
    return int(major), int(minor)


def test_the_recorded_surfaces_cover_every_claimed_release() -> None:
    assert "v10.0.0" in SURFACES and "v10.8.0" in SURFACES and "v10.9.0" in SURFACES
    assert any(t.startswith("v11.") for t in SURFACES)
    for tag, s in SURFACES.items():
        assert s["source"].endswith(f"{tag}:python/src/infer/pyCore.cpp")
        assert set(s["enums"]) == {
            "BuilderFlag",
            "HardwareCompatibilityLevel",
            "NetworkDefinitionCreationFlag",
            "MemoryPoolType",
        }, tag
        assert all(isinstance(v, int) for members in s["enums"].values() for v in members.values()), tag
        # the config properties _build sets exist in every release
        assert set(s["builder_config_properties"]) == {"builder_optimization_level", "hardware_compatibility_level"}


@pytest.mark.parametrize("tag", sorted(SURFACES))
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_dispatch_on_each_release(tag: str, precision: str) -> None:
    trt = _fake(tag)
    s = SURFACES[tag]["enums"]
    for compat in te.HARDWARE_COMPAT:
        member = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}[compat]
        if compat == "same-cc" and _v(tag) < (10, 9):
            # the member appeared in 10.9: asking earlier is a clear error, not an AttributeError
            assert member not in s["HardwareCompatibilityLevel"]
            with pytest.raises(EngineError, match=r"same-cc needs TensorRT 10\.9 or newer"):
                te.build_options(trt, precision, compat)
            continue
        o = te.build_options(trt, precision, compat)
        assert o.version == SURFACES[tag]["version"]
        assert o.hardware_compatibility_level == s["HardwareCompatibilityLevel"][member]
        # strongly typed: precision comes from the ONNX, on every release; 11.x networks always
        # are, and there STRONGLY_TYPED (now 0) is deprecated and ignored, so no flag is passed
        if _v(tag) >= (11, 0):
            assert o.network_flags == 0
        else:
            assert o.network_flags == 1 << s["NetworkDefinitionCreationFlag"]["STRONGLY_TYPED"]
        assert o.workspace_pool == s["MemoryPoolType"]["WORKSPACE"]
        if precision == "fp32":  # TF32 off, so an fp32 plan meets the fp32 parity bound
            assert o.clear_flags == (s["BuilderFlag"]["TF32"],) and o.tf32 is False
        else:
            assert o.clear_flags == () and o.tf32 is True


def test_strongly_typed_without_the_flag_on_11_and_refused_on_10() -> None:
    """TensorRT 11 networks are always strongly typed: should the flag go, 0 is right; a 10.x
    without it could not build a Q/DQ or FP16 ONNX in its own precision."""
    eleven = _fake(max((t for t in SURFACES if t.startswith("v11.")), key=lambda t: _v(t)))
    eleven.NetworkDefinitionCreationFlag = SimpleNamespace()
    assert te.build_options(eleven, "int8", "none").network_flags == 0
    ten = _fake("v10.0.0")
    ten.NetworkDefinitionCreationFlag = SimpleNamespace(EXPLICIT_BATCH=0)
    with pytest.raises(EngineError, match="STRONGLY_TYPED"):
        te.build_options(ten, "int8", "none")


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", "12.0.0"])
def test_unclaimed_releases_are_refused(version: str) -> None:
    trt = _fake("v10.0.0")
    trt.__version__ = version
    with pytest.raises(EngineError, match=r"TensorRT .* is not supported: .*10\.0 to 11\.x"):
        te.build_options(trt, "fp16", "none")


def test_releases_after_the_newest_recorded_one_are_used_with_a_warning() -> None:
    """CHECKED_THROUGH is the newest recorded release: a re-recording with a new tag must move it,
    and only a supported release newer than it gets the warning."""
    from rn50.backends.tensorrt import CHECKED_THROUGH, unchecked_release

    assert CHECKED_THROUGH == max(_v(t) for t in SURFACES)
    for tag in SURFACES:
        assert unchecked_release(SURFACES[tag]["version"]) is None, tag
    last = ".".join(map(str, CHECKED_THROUGH))
    newer = f"{CHECKED_THROUGH[0]}.{CHECKED_THROUGH[1] + 1}.0"
    why = unchecked_release(newer)
    assert why is not None and why.startswith(f"TensorRT {newer} is newer than {last}")
    assert unchecked_release("12.0.0") is None and unchecked_release("9.3.0") is None  # refused instead
    trt = _fake(max(SURFACES, key=_v))
    trt.__version__ = newer
    assert te.build_options(trt, "int8", "none").network_flags == 0


def test_the_recorder_reads_cpp_enum_values() -> None:
    """Explicit, implicit and aliased values, deprecation macros and comments (NvInfer.h's forms)."""
    from tests.export.trt_surface.record_tensorrt_surface import cpp_enum

    header = """
    enum class BuilderFlag : int32_t;
    enum class BuilderFlag : int32_t
    {
        //! a comment, with = 9 in it
        kDEBUG = 2,
        kREFIT,  /* implicit */
        kSTRIP_PLAN TRT_DEPRECATED_ENUM = 18,
        kWEIGHTLESS TRT_DEPRECATED_ENUM = kSTRIP_PLAN,
        kNEXT
    };
    """
    assert cpp_enum(header, "BuilderFlag") == {
        "kDEBUG": 2,
        "kREFIT": 3,
        "kSTRIP_PLAN": 18,
        "kWEIGHTLESS": 18,
        "kNEXT": 19,
    }


@pytest.mark.parametrize("tag", sorted(SURFACES))
@pytest.mark.parametrize(
    "cc, name", [((6, 1), "Tesla P4"), ((7, 0), "Tesla V100"), ((7, 5), "Tesla T4"), ((9, 0), "H100")]
)
def test_gpu_support_per_release(tag: str, cc: tuple[int, int], name: str) -> None:
    """Every release runs Turing and newer; Volta only up to 10.4 (removed in 10.5); Pascal none.
    The build and the runtime refuse an unsupported GPU with this message before TensorRT is asked."""
    from rn50.backends.tensorrt import unsupported_gpu

    version = SURFACES[tag]["version"]
    why = unsupported_gpu(version, cc, name)
    if cc >= (7, 5):
        assert why is None
    elif cc == (7, 0) and _v(tag) <= (10, 4):
        assert why is None
    elif cc == (7, 0):
        assert why is not None and why.startswith(f"{name} (sm_70) is a Volta GPU, which TensorRT {version} no longer")
        assert "10.0 to 10.4" in why
    else:
        assert why is not None and why.startswith(f"{name} (sm_61) is older than Volta (sm_70)")


def _bound(tag: str) -> set[str]:
    """The names the recorded module and classes have at ``tag``, with their class (``BuilderFlag.TF32``)."""
    at = API["tags"].index(tag)
    names = set()
    for owner, members in API["names"].items():
        for name, runs in members.items():
            for run in runs:
                first, _, last = run.partition("..")
                if API["tags"].index(first) <= at <= API["tags"].index(last or first):
                    names.add(f"{owner}.{name}")
    return names


def test_the_recorded_names_agree_with_the_recorded_enums() -> None:
    """Both recordings come from the same bindings: at every tag, each enum of tensorrt_surface.json
    has the same members in tensorrt_api_names.json (where they are read by a different parser)."""
    assert API["tags"] == sorted(SURFACES, key=lambda t: tuple(int(x) for x in t[1:].split(".")))
    for tag in API["tags"]:
        bound = _bound(tag)
        for enum, members in SURFACES[tag]["enums"].items():
            assert {n.split(".", 1)[1] for n in bound if n.split(".", 1)[0] == enum} == set(members), (tag, enum)
            assert f"tensorrt.{enum}" in bound


def test_the_recorder_reads_class_qualified_names() -> None:
    """pybind11's forms in NVIDIA's bindings: chained and variable-held bindings, nested enums with
    exported values, bases among the template arguments, module functions and attributes, and the
    Python package's additions; a name inside a lambda, a comment or a block the preprocessor leaves
    out of pip's full `tensorrt` module is not the class's."""
    from tests.export.trt_surface.record_tensorrt_surface import bound_names

    core = """
    py::class_<ILogger, PyLogger> baseLoggerBinding{m, "ILogger", ILoggerDoc::descr, py::module_local()};
    py::enum_<ILogger::Severity>(baseLoggerBinding, "Severity", py::arithmetic())
        .value("ERROR", ILogger::Severity::kERROR)  // .value("COMMENTED", ...)
        .export_values();
    baseLoggerBinding.def(py::init<>()).def("log", &ILogger::log, "severity"_a, "msg"_a);
    py::class_<DefaultLogger, ILogger>(m, "Logger").def_readwrite("min_severity", &DefaultLogger::mMinSeverity);
    py::enum_<BuilderFlag>(m, "BuilderFlag", py::arithmetic{}).value("TF32", BuilderFlag::kTF32);
    py::class_<IBuilderConfig>(m, "IBuilderConfig", IBuilderConfigDoc::descr, py::module_local())
        .def("set_flag", [](IBuilderConfig& self, BuilderFlag f) { self.setFlag(f); py::object o; o.def("x"); })
#if ENABLE_INETWORK_SERIALIZE
        .def("serialize", &serialize)
#endif
#if EXPORT_ALL_BINDINGS
        .def_property("builder_optimization_level", &IBuilderConfig::getBuilderOptimizationLevel,
            &IBuilderConfig::setBuilderOptimizationLevel)
#endif // EXPORT_ALL_BINDINGS
        ;
    m.def("get_plugin_registry", &getPluginRegistry, py::return_value_policy::reference);
    """
    types = """
    py::enum_<DataType>(m, "DataType", DataTypeDoc::descr).value("INT8", DataType::kINT8);
    m.attr("int8") = DataType::kINT8;
    py::class_<ILayer, std::unique_ptr<ILayer, py::nodelete>>(m, "ILayer").def_property_readonly("name", &f);
    py::class_<IConvolutionLayer, ILayer, std::unique_ptr<IConvolutionLayer, py::nodelete>>(
        m, "IConvolutionLayer").def_property("num_output_maps", &g, &h);
    """
    package = """import os
__version__ = "##TENSORRT_PYTHON_VERSION##"
def volume(iterable):
    return 1
Logger.Severity = ILogger.Severity
DataType.itemsize = property(lambda this: _itemsize(this))
"""
    b = bound_names({"pyCore.cpp": core, "pyFoundationalTypes.cpp": types}, package)
    assert b["ILogger"] == {"Severity", "ERROR", "log"}
    assert b["ILogger.Severity"] == b["Logger.Severity"] == {"ERROR"}
    assert b["Logger"] == {"Severity", "ERROR", "log", "min_severity"}
    assert b["BuilderFlag"] == {"TF32"}
    assert b["DataType"] == {"INT8", "itemsize"}
    assert b["IBuilderConfig"] == {"set_flag", "builder_optimization_level"}
    assert b["IConvolutionLayer"] == {"name", "num_output_maps"}
    assert b["tensorrt"] == {
        "ILogger",
        "Logger",
        "BuilderFlag",
        "IBuilderConfig",
        "get_plugin_registry",
        "DataType",
        "int8",
        "ILayer",
        "IConvolutionLayer",
        "os",
        "__version__",
        "volume",
    }


def test_every_tensorrt_name_the_code_uses_is_bound_in_every_claimed_release() -> None:
    """mypy checks the TensorRT code against one release's stubs (10.13); this checks each name it
    reads, with its class, against NVIDIA's bindings source of every claimed release
    (trt_surface/tensorrt_api_names.json, regenerated by record_tensorrt_surface.py): a method or
    enum member that one release added or another removed fails here, before a user's engine build
    does, also where another class still has the name (11.0 removed BuilderFlag.INT8, not
    DataType.INT8)."""
    from tests.export.trt_surface.record_tensorrt_surface import used_names

    assert set(API["tags"]) == set(SURFACES)
    used = used_names()
    # calls the two modules are known to make, each with its class, so that a reading that finds
    # nothing, or not the class, cannot pass
    assert {
        "tensorrt.Builder",
        "Builder.build_serialized_network",
        "IBuilderConfig.set_timing_cache",
        "MemoryPoolType.WORKSPACE",
        "Logger.WARNING",
        "Runtime.deserialize_cuda_engine",
        "IExecutionContext.execute_async_v3",
        "IExecutionContext.set_input_shape",
        "ParserError.desc",
    } <= set(used)
    unrecorded = [f"{n} ({where})" for n, where in used.items() if n.rsplit(".", 1)[0] not in API["names"]]
    assert not unrecorded, (
        f"the TensorRT code reads {unrecorded}, of a class not recorded per release: run "
        "tests/export/trt_surface/record_tensorrt_surface.py on a clone of NVIDIA/TensorRT"
    )
    for tag in API["tags"]:
        missing = [f"{n} ({where})" for n, where in used.items() if n not in _bound(tag)]
        assert not missing, f"TensorRT {tag} does not bind {', '.join(missing)}"
