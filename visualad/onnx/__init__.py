"""ONNX export (torch, :func:`visualad.onnx.export.export_onnx`) and a runtime with onnxruntime, NumPy and
Pillow only (:class:`OnnxDetector`). Importing this package does not import torch."""
from .meta import is_export, read_meta
from .runtime import OnnxDetector

__all__ = ["OnnxDetector", "is_export", "read_meta"]
