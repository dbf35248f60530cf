"""visualad: zero-shot anomaly detection on images with VisualAD (CVPR 2026).

    from visualad import AnomalyDetector
    det = AnomalyDetector.from_pretrained()      # the offline default model
    res = det.predict("part.png")                # res.pred_score, res.anomaly_map (original H x W)
"""
import logging

from .detector import AnomalyDetector
from .result import AnomalyResult

__version__ = "0.1.0"
__all__ = ["AnomalyDetector", "AnomalyResult", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
