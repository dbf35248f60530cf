"""visualad: zero-shot anomaly detection on images with VisualAD (CVPR 2026).

    from visualad import AnomalyDetector
    det = AnomalyDetector.from_pretrained()      # the offline default model
    res = det.predict("part.png")                # res.pred_score, res.anomaly_map (original H x W)

The package root is lazy (PEP 562): ``import visualad`` imports neither torch nor the model until a name
that needs them is used, so the CLI's ``--help`` and ``--version`` start at once.
"""
import logging
from typing import Any

from ._version import __version__

__all__ = ["AnomalyDetector", "AnomalyResult", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    if name == "AnomalyDetector":
        from .detector import AnomalyDetector

        return AnomalyDetector
    if name == "AnomalyResult":
        from .result import AnomalyResult

        return AnomalyResult
    raise AttributeError(f"module 'visualad' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(list(globals()) + ["AnomalyDetector", "AnomalyResult"])
