"""OnnxDetector: an exported model run with onnxruntime, NumPy and Pillow only (no torch anywhere).

The same inputs, modes, thresholds and :class:`~visualad.result.AnomalyResult` as the torch detector: the
graphs compute the maps (head) or the unit patch features (references, batch) and the map's upsampling and
blur; the nearest-neighbour search runs in NumPy (:mod:`visualad.onnx.knn`); maps go back to each image's size
with a NumPy bilinear resize that matches OpenCV's.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np

from ..config import VisualADConfig
from ..data import images as imio
from ..data.files import iter_image_files
from ..errors import VisualADError, WeightsError
from ..modes.choice import ModeChooser, check_set_size
from ..result import AnomalyResult
from ..runtime.postprocess import Thresholds, finish
from ..runtime.readahead import Loaded, batched, paired, read_ahead
from ..types import PathLike
from . import knn
from .meta import read_meta

logger = logging.getLogger(__name__)


def resize_bilinear(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """A map [h, w] -> [height, width], bilinear with half-pixel centres and clamped edges (what
    ``cv2.resize(..., INTER_LINEAR)`` computes for float32), in NumPy."""
    m = np.asarray(m, dtype=np.float32)
    if m.shape == (height, width):
        return m.copy()

    def axis(n_out: int, n_in: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        x0 = np.floor(x).astype(np.int64)
        return x0, np.minimum(x0 + 1, n_in - 1), (x - x0).astype(np.float32)

    y0, y1, wy = axis(height, m.shape[0])
    x0, x1, wx = axis(width, m.shape[1])
    rows = m[y0] * (1 - wy)[:, None] + m[y1] * wy[:, None]
    return rows[:, x0] * (1 - wx)[None, :] + rows[:, x1] * wx[None, :]


class _Mode:
    """A scorer of the ONNX runtime: its ``name`` and what ``describe`` records with thresholds."""

    def __init__(self, name: str, compare_with: int = 64, seed: int = 0, fingerprint: Optional[str] = None,
                 shots: int = 0) -> None:
        self.name, self.compare_with, self.seed = name, int(compare_with), int(seed)
        self.fingerprint, self.shots = fingerprint, shots

    def describe(self) -> dict:
        if self.name == "references":
            return {"mode": "references", "shots": self.shots, "fingerprint": self.fingerprint}
        if self.name == "batch":
            return {"mode": "batch", "compare_with": self.compare_with, "seed": self.seed}
        return {"mode": "head"}


class OnnxDetector:
    """A directory written by ``visualad export`` / ``det.export_onnx``: ``predict`` like the torch detector."""

    def __init__(self, path: PathLike, providers: Optional[List[str]] = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.config = VisualADConfig.from_dict(self.meta["config"], self.path)
        self.image_size = int(self.meta["image_size"])
        self._mean = np.asarray(self.meta["pixel_mean"], np.float32).reshape(1, 3, 1, 1)
        self._std = np.asarray(self.meta["pixel_std"], np.float32).reshape(1, 3, 1, 1)
        self._providers = providers or ["CPUExecutionProvider"]
        self._ort = ort
        self._sessions: Dict[str, Any] = {}
        self._chooser = ModeChooser()
        self._thresholds = Thresholds()
        self.references: Optional[Dict[str, np.ndarray]] = None
        self._bank_info: Dict[str, Any] = self.meta.get("references") or {}
        if self.meta.get("references"):
            with np.load(self.path / "references.npz", allow_pickle=False) as npz:
                self.references = {k: npz[k].astype(np.float32) for k in self.meta["features"]}

    def __repr__(self) -> str:
        return (f"OnnxDetector(path={str(self.path)!r}, backbone={self.config.backbone!r}, "
                f"image_size={self.image_size}, references={self._bank_info.get('shots', 0)})")

    # --- graphs --------------------------------------------------------------------------------------
    def _session(self, name: str) -> Any:
        if name not in self._sessions:
            file = self.path / f"{name}.onnx"
            if not file.is_file():
                raise WeightsError(f"{file.name} is missing from this export", self.path)
            self._sessions[name] = self._ort.InferenceSession(str(file), providers=self._providers)
        return self._sessions[name]

    def _normalise(self, squares: List[np.ndarray]) -> np.ndarray:
        x = np.stack(squares).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        return (x - self._mean) / self._std

    def _features(self, squares: List[np.ndarray]) -> Dict[str, np.ndarray]:
        outs = self._session("features").run(None, {"images": self._normalise(squares)})
        return dict(zip(self.meta["features"], outs))

    def _grid_to_map(self, grid: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        g = int(self.meta["grid"])
        maps = self._session("grid_to_map").run(None, {"grid": grid.reshape(-1, g, g).astype(np.float32)})[0]
        return maps, maps.reshape(maps.shape[0], -1).max(axis=1)

    # --- modes ---------------------------------------------------------------------------------------
    def scoring_mode(self, mode: Any = "auto", n_images: Optional[int] = None, compare_with: int = 64,
                     seed: int = 0) -> Any:
        if not isinstance(mode, str):
            return mode
        name = self._chooser.choose(mode, self.references is not None, n_images, self.config.head_trained)
        return _Mode(name, compare_with, seed, self._bank_info.get("fingerprint"), self._bank_info.get("shots", 0))

    def set_references(self, images: Any, batch_size: int = 8) -> None:
        """References mode from normal images (an empty list turns it off)."""
        items = imio.expand_inputs(images)
        if not items:
            self.references, self._bank_info = None, {}
            return
        parts: Dict[str, List[np.ndarray]] = {k: [] for k in self.meta["features"]}
        digests: List[str] = []
        for chunk in batched(read_ahead(items, self.image_size, on_error="raise", label="reference"), batch_size):
            for k, v in self._features([x.square for x in chunk]).items():
                parts[k].append(v.reshape(-1, v.shape[-1]))
            digests += [imio.image_digest(x.square) for x in chunk]
        self.references = {k: np.concatenate(v) for k, v in parts.items()}
        import hashlib

        h = hashlib.sha1()
        for key in sorted(self.references):
            h.update(self.references[key].tobytes())
        self._bank_info = {"shots": len(digests), "digests": digests, "fingerprint": h.hexdigest()[:16]}

    # --- prediction ----------------------------------------------------------------------------------
    def predict(self, images: Any, batch_size: int = 8, threshold: Optional[float] = None,
                on_error: str = "raise", keep_image: bool = True, mode: str = "auto", compare_with: int = 64,
                seed: int = 0) -> Union[AnomalyResult, List[AnomalyResult]]:
        """Score one image, a list or a folder; same order; as ``AnomalyDetector.predict``."""
        single = not isinstance(images, (list, tuple)) and not (
            isinstance(images, (str, os.PathLike)) and Path(images).is_dir())
        items = (list(iter_image_files(images)) if isinstance(images, (str, os.PathLike)) and Path(images).is_dir()
                 else imio.expand_inputs(images))
        out = list(self.predict_iter(items, batch_size, threshold, on_error, keep_image, mode=mode,
                                     compare_with=compare_with, seed=seed))
        return out[0] if single and len(out) == 1 else out

    def predict_folder(self, folder: PathLike, batch_size: int = 8, **kwargs: Any) -> Iterator[AnomalyResult]:
        yield from self.predict_iter(list(iter_image_files(folder)), batch_size, **kwargs)

    def predict_iter(self, items: Iterable[Any], batch_size: int = 8, threshold: Optional[float] = None,
                     on_error: str = "return", keep_image: bool = False, progress: bool = False,
                     at_model_size: bool = False, mode: Any = "auto", compare_with: int = 64,
                     seed: int = 0) -> Iterator[AnomalyResult]:
        """One result per item, in order; head and references a batch at a time, batch mode per set."""
        if on_error not in ("raise", "return"):
            raise ValueError("on_error must be 'raise' or 'return'")
        if int(batch_size) < 1:
            raise ValueError("batch_size must be >= 1")
        n = len(items) if hasattr(items, "__len__") else None
        scorer = self.scoring_mode(mode, n, compare_with, seed)
        stream = batched(read_ahead(items, self.image_size, keep_image=keep_image, on_error=on_error,
                                    in_flight=2 * batch_size), batch_size)
        scored = self._set(stream, scorer) if scorer.name == "batch" else self._batches(stream, scorer)
        yield from finish(scored, scorer, self.config, self._thresholds, "fp32", threshold, at_model_size, on_error,
                          resize=resize_bilinear)

    def _batches(self, stream: Iterable[List[Loaded]], scorer: _Mode
                 ) -> Iterator[Tuple[Loaded, Optional[np.ndarray], float]]:
        for chunk in stream:
            good = [x for x in chunk if x.ok]
            maps = scores = None
            if good:
                squares = [x.square for x in good]
                if scorer.name == "head":
                    maps, scores = self._session("head").run(None, {"images": self._normalise(squares)})
                else:
                    feats = self._features(squares)
                    maps, scores = self._grid_to_map(knn.references_grid(feats, self.references))
            yield from paired(chunk, maps, scores)

    def _set(self, stream: Iterable[List[Loaded]], scorer: _Mode
             ) -> Iterator[Tuple[Loaded, Optional[np.ndarray], float]]:
        loaded: List[Loaded] = []
        parts: Dict[str, List[np.ndarray]] = {k: [] for k in self.meta["features"]}
        digests: List[str] = []
        for chunk in stream:
            good = [x for x in chunk if x.ok]
            if good:
                for k, v in self._features([x.square for x in good]).items():
                    parts[k].append(v)
                digests += [imio.image_digest(x.square) for x in good]
            for x in chunk:
                x.square = None
            loaded += chunk
        check_set_size(len(digests))
        feats = {k: np.concatenate(v) for k, v in parts.items()}
        order = knn.comparison_order(digests, scorer.seed)
        maps, scores = self._grid_to_map(knn.batch_grid(feats, order, scorer.compare_with,
                                                        float(self.meta["fraction"])))
        yield from paired(loaded, maps, scores)


def load(path: PathLike) -> OnnxDetector:
    """An export directory as a detector (raises :class:`VisualADError` subclasses for anything else)."""
    try:
        return OnnxDetector(path)
    except ImportError as exc:
        raise VisualADError(f"onnxruntime is needed to run an ONNX export: pip install onnxruntime ({exc})",
                            path) from None
