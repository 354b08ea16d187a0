"""INT8 calibration: a class-balanced calibration set through the shared preprocessing, Q/DQ
quantization with ONNX Runtime, and an accuracy gate against FP32."""

from .quantize import FLAVOURS, METHODS, calibrate  # noqa: F401
