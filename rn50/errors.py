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
