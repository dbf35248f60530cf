"""Predictor: the one prediction surface over a backend (no torch here).

``predict`` / ``predict_folder`` / ``predict_iter`` / ``stream`` / ``scoring_mode`` / ``set_references`` /
``calibrate``, thresholds and progress are written once, here; :class:`~visualad.AnomalyDetector` (torch) and
:class:`~visualad.onnx.OnnxDetector` (onnxruntime) only say how they are built and which backend they run
(:mod:`visualad.runtime.pipeline` says what a backend provides). The HTTP service and Ray take any Predictor.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

from .config import VisualADConfig
from .data import images as imio
from .data.files import iter_image_files
from .errors import ConfigError
from .modes.base import Scorer, create
from .modes.choice import ModeChooser
from .progress import progress_bar
from .result import AnomalyResult
from .runtime import pipeline
from .runtime.postprocess import Thresholds, finish, mismatch
from .types import PathLike

logger = logging.getLogger(__name__)

#: the false-alarm rate references ask for when they set their own threshold (``set_references(calibrate=True)``)
SELF_CALIBRATION_RATE = 0.05
#: why a single reference sets no threshold of its own: its stand-in for a new part (itself, outside each patch's
#: 3x3 neighbourhood) is no new part; measured on shared/data (docs/modes.md, "One reference")
ONE_REFERENCE = ("one reference cannot set its own threshold: scored against itself it is no new part (on four "
                 "products its threshold flagged from 0% to 98% of good parts), so predictions stay unlabelled; "
                 "give two or more good parts as references, or calibrate on good parts")


class Predictor:
    """What every detector offers; a subclass sets ``backend`` (and may set ``references``) in ``__init__``."""

    backend: Any
    references: Any = None

    def __init__(self) -> None:
        self._thresholds = Thresholds()
        self._chooser = ModeChooser()

    @property
    def config(self) -> VisualADConfig:
        return self.backend.config

    @property
    def dtype_name(self) -> str:
        return self.backend.dtype_name

    # --- modes ---------------------------------------------------------------------------------------
    def scoring_mode(self, mode: Union[str, Scorer] = "auto", n_images: Optional[int] = None,
                     compare_with: int = 64, seed: int = 0) -> Scorer:
        """The scorer a call uses (the rule: :class:`visualad.modes.choice.ModeChooser`); a scorer object
        (what this returns) is used as it is."""
        if isinstance(mode, Scorer):
            return mode
        return self._chooser.scorer(mode, self.references, n_images, self.config.head_trained,
                                    compare_with=compare_with, seed=seed)

    def set_references(self, images: Any, batch_size: int = 8, calibrate: bool = False, **kwargs: Any) -> None:
        """References mode: keep the patch features of normal images of the product (an empty list turns it
        off). Keyword arguments go to the backend's bank builder (torch: ``blocks``, ``rs``).

        ``calibrate=True``: unless the model already holds thresholds for these references, the references set
        them themselves (each scored against the others from its features in the bank, leave-one-out, with no
        second forward; a threshold for :data:`SELF_CALIBRATION_RATE` false alarms, or above every reference when
        they are too few for it), so predictions are labelled with no extra step. This replaces the model's
        thresholds of another mode. A single reference sets none (:data:`ONE_REFERENCE`, logged)."""
        items = expand(images)
        self.references = self.backend.build_references(items, batch_size=batch_size, **kwargs) if items else None
        if calibrate and items and not self.has_thresholds("references"):
            if self.references.shots < 2:
                logger.warning(ONE_REFERENCE)
                return
            self.calibrate(items, mode="references", batch_size=batch_size, false_alarm_rate=SELF_CALIBRATION_RATE)

    def has_thresholds(self, mode: Union[str, Scorer]) -> bool:
        """Whether the model's calibrated thresholds hold for ``mode`` (a mode's name or a scorer: the same mode
        and, for references, the same reference images), so that predictions in it are labelled."""
        scorer = mode if isinstance(mode, Scorer) else create(mode, references=self.references)
        return self.config.image_threshold is not None and mismatch(self.config, scorer.describe()) is None

    def clear_references(self) -> None:
        self.references = None

    # --- prediction ----------------------------------------------------------------------------------
    def predict(self, images: Any, batch_size: int = 8, threshold: Optional[float] = None,
                on_error: str = "raise", keep_image: bool = True, progress: bool = False,
                references: Optional[Any] = None, mode: Union[str, Scorer] = "auto", compare_with: int = 64,
                seed: int = 0) -> Union[AnomalyResult, List[AnomalyResult]]:
        """Score one image, a list of them or a folder (path, PIL image, NumPy array, tensor); same order. One
        image gives one result; a list, tuple, iterator, 4-D batch or folder gives a list, also of one.

        ``mode``: "auto" | "head" | "references" | "batch" (see :meth:`scoring_mode`); ``res.mode`` says which
        ran. Batch mode scores the images given together against each other, each against at most
        ``compare_with`` others (seeded). ``on_error="return"`` turns an unreadable input into a result with
        ``error`` set; ``threshold`` overrides the calibrated image threshold; ``references``: normal images
        for this call only.
        """
        # the type follows the input's kind, never its length (a generator of one is still a collection)
        single = not isinstance(images, (list, tuple, Iterator)) and getattr(images, "ndim", 0) != 4 \
            and not _is_dir(images)
        items = expand(images)
        saved = self.references
        try:
            if references is not None:
                self.set_references(references, batch_size=batch_size)
            results = list(self.predict_iter(items, batch_size, threshold, on_error, keep_image, progress,
                                             mode=mode, compare_with=compare_with, seed=seed))
        finally:
            self.references = saved
        return results[0] if single else results

    def predict_folder(self, folder: PathLike, batch_size: int = 8, threshold: Optional[float] = None,
                       on_error: str = "return", recursive: bool = True, keep_image: bool = False,
                       progress: bool = False, mode: Union[str, Scorer] = "auto", compare_with: int = 64,
                       seed: int = 0) -> Iterator[AnomalyResult]:
        """Yield one result per image file under ``folder`` (sorted), a batch at a time."""
        files = list(iter_image_files(folder, recursive=recursive))
        yield from self.predict_iter(files, batch_size, threshold, on_error, keep_image, progress, mode=mode,
                                     compare_with=compare_with, seed=seed)

    def predict_iter(self, items: Iterable[Any], batch_size: int = 8, threshold: Optional[float] = None,
                     on_error: str = "return", keep_image: bool = False, progress: bool = False,
                     at_model_size: bool = False, mode: Union[str, Scorer] = "auto", compare_with: int = 64,
                     seed: int = 0) -> Iterator[AnomalyResult]:
        """Yield one result per item, in order, a batch at a time, in constant memory for head and references.

        ``at_model_size`` keeps the maps at the model's square input size (the papers' evaluation protocol)
        instead of resizing them to each image's original size. ``mode`` may also be a scorer object.
        """
        if on_error not in ("raise", "return"):
            raise ValueError("on_error must be 'raise' or 'return'")
        if int(batch_size) < 1:
            raise ValueError("batch_size must be >= 1")
        if threshold is not None and not math.isfinite(threshold):  # NaN would label every image normal
            raise ConfigError(f"threshold must be a finite number, got {threshold!r}")
        n = len(items) if hasattr(items, "__len__") else None
        scorer = self.scoring_mode(mode, n, compare_with, seed)
        return self._results(pipeline.run(self.backend, items, scorer, batch_size, keep_image=keep_image,
                                          on_error=on_error), scorer, n, progress, threshold, at_model_size,
                             on_error)

    def _results(self, scored: Iterable[Any], scorer: Scorer, n: Optional[int], progress: bool,
                 threshold: Optional[float], at_model_size: bool, on_error: str) -> Iterator[AnomalyResult]:
        bar = progress_bar(n, progress, unit="img")
        for res in finish(scored, scorer, self.config, self._thresholds, self.dtype_name, threshold,
                          at_model_size, on_error, resize=self.backend.resize_map):
            bar.update(1)
            yield res
        bar.close()

    def results(self, scored: Iterable[Any], scorer: Scorer, threshold: Optional[float] = None
                ) -> Iterator[AnomalyResult]:
        """Results with this predictor's thresholds from (input, model-size map, score) computed elsewhere
        (the service's shared forwards)."""
        return self._results(scored, scorer, None, False, threshold, False, "return")

    def stream(self, images: Iterable[Any], window: int = 64, warmup: int = 16, seed: int = 0,
               batch_size: int = 1, **kwargs: Any) -> Iterator[AnomalyResult]:
        """Score an unlabeled stream of one product (a line camera): each image against the last ``window``
        images (batch mode over a rolling window). The first ``warmup`` images come out together, scored
        against each other; then each image as soon as it is read. Other keyword arguments as
        :meth:`predict_iter`; see :mod:`visualad.modes.stream`."""
        from .modes.stream import StreamMode

        return self.predict_iter(images, batch_size=batch_size, mode=StreamMode(window, warmup, seed), **kwargs)

    # --- thresholds ----------------------------------------------------------------------------------
    def calibrate(self, normal_images: Any, anomalous_images: Any = None, masks: Any = None, method: str = "auto",
                  mode: Union[str, Scorer] = "auto", **kwargs: Any) -> Dict[str, Any]:
        """Set image and pixel thresholds for one mode (see :mod:`visualad.tasks.calibrate`); save_pretrained
        persists them. ``mode="auto"``: references when set, else batch for 16 or more normal images, else
        the head. Normal images only: a high percentile of their scores; with anomalous images: F1-max."""
        from .tasks.calibrate import calibrate

        normals = expand(normal_images)
        scorer = self.scoring_mode(mode, len(normals), kwargs.pop("compare_with", 64), kwargs.pop("seed", 0))
        return calibrate(self.backend, scorer, self.config, normals,
                         None if anomalous_images is None else expand(anomalous_images),
                         masks=masks, method=method, **kwargs)


def _is_dir(images: Any) -> bool:
    return isinstance(images, (str, os.PathLike)) and Path(images).is_dir()


def expand(images: Any) -> List[Any]:
    """A folder becomes its image files (sorted); anything else goes through ``expand_inputs``."""
    if _is_dir(images):
        return list(iter_image_files(images))
    return imio.expand_inputs(images)
