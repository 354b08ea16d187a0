"""Exceptions with messages meant for the person at the terminal."""


class PipelineError(Exception):
    """Base class: the message names the file and what is wrong with it."""


class DataError(PipelineError):
    """A data set folder, image or label is missing or malformed."""


class CheckpointError(PipelineError):
    """A checkpoint is missing, corrupt or does not fit the model."""


class ManifestError(PipelineError):
    """A manifest is missing, unreadable or does not match its artifact."""


class EngineError(PipelineError):
    """An engine (ONNX, TensorRT plan, AOTInductor package) cannot be built or loaded."""


def first_line(e: BaseException, prefer: str | None = None) -> str:
    """One line of an exception's message for an ``error:`` line: the first non-empty one, or with
    ``prefer`` the first that contains it (case-insensitive) where one does; the exception's type
    name when the message is empty. torch, DALI and TensorRT messages run to many lines of context."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if prefer is not None:
        lines = [ln for ln in lines if prefer.lower() in ln.lower()] or lines
    return lines[0] if lines else type(e).__name__


def dali_message(e: BaseException) -> str:
    """The useful line of a DALI exception, at most 300 characters: DALI's messages start with
    pipeline boilerplate ("Critical error in pipeline:", the operator's traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if "encountered:" in lines[:-1]:  # DALI's own words follow the operator's traceback
        return lines[lines.index("encountered:") + 1][:300]
    for ln in lines:
        if ln.lower().startswith("failed to decode"):
            return ln.rstrip(" :")[:300]
    for ln in lines:
        low = ln.lower()
        if ("error" in low and "critical error in pipeline" not in low and "operator" not in low) or "decode" in low:
            return ln[:300]
    for ln in reversed(lines):
        if not ln.startswith(("File ", "which was used", "^")) and "pipeline" not in ln.lower():
            return ln[:300]
    return (lines[0] if lines else type(e).__name__)[:300]
