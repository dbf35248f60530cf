"""OnnxDetector: an exported model run with onnxruntime, NumPy and Pillow only (no torch anywhere).

:class:`OnnxBackend` is the onnxruntime backend of the one pipeline (:mod:`visualad.runtime.pipeline`): the
graphs compute the maps (head) or the layer-normed patch rows (references, batch, stream) and the map's
upsampling and blur; the nearest-neighbour search runs in NumPy (:mod:`visualad.onnx.knn`) in the partner order
the torch core uses; maps go back to each image's size with a NumPy bilinear resize that matches OpenCV's.
:class:`OpenVinoBackend` runs the same graphs with OpenVINO (the ``openvino`` extra): everything but the graphs'
engine is shared. :class:`OnnxDetector` is the shared :class:`~visualad.predictor.Predictor` over either.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..config import VisualADConfig
from ..errors import ConfigError, VisualADError, WeightsError
from ..modes import partners
from ..modes.references import bank_grid
from ..predictor import Predictor
from ..runtime import pipeline
from ..types import PathLike
from . import knn
from .meta import META_NAME, read_meta

logger = logging.getLogger(__name__)

#: protobuf's limit: a bigger graph file is not one onnxruntime can read
MAX_GRAPH_BYTES = 2**31
#: each graph's input and output names (the features graph's outputs are listed in the metadata)
GRAPH_SIGNATURES = {"head": (["images"], ["maps", "scores"]), "features": (["images"], None),
                    "grid_to_map": (["grid"], ["maps"])}


def _one_line(exc: BaseException) -> str:
    """An engine's message on one line: without the source locations OpenVINO puts first ("Exception from
    src/...:132:"), at most 300 characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith("Exception from")]
    return (" ".join(lines) or type(exc).__name__)[:300]


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


class ArrayBank:
    """A reference bank as NumPy arrays: layer-normed rows [K * P, C] per block, scored at each of ``rs``."""

    def __init__(self, features: Dict[int, np.ndarray], digests: Sequence[str], rs: Sequence[int],
                 fingerprint: Optional[str] = None) -> None:
        self.features = features
        self.rs = tuple(rs)
        self.digests = list(digests)
        self.shots = len(self.digests)
        if fingerprint is None:
            h = hashlib.sha1()
            for key in sorted(features):
                h.update(repr(key).encode())
                h.update(np.ascontiguousarray(features[key], np.float32).tobytes())
            fingerprint = h.hexdigest()[:16]
        self.fingerprint = fingerprint

    def grid(self, queries: Dict[int, np.ndarray], exclude: Optional[int] = None) -> np.ndarray:
        """Mean nearest distance over blocks and r: {block: [B, P, C]} -> [B, P] (:func:`references.bank_grid`)."""
        return bank_grid(knn, self.features, self.shots, queries, self.rs, exclude)


@dataclass
class Graph:
    """One loaded graph, whatever runs it: its input and output names, and ``run(feed) -> outputs``."""

    inputs: List[str]
    outputs: List[str]
    run: Callable[[Dict[str, np.ndarray]], List[np.ndarray]]


class OnnxBackend:
    """An export directory's graphs on onnxruntime: the backend contract of :mod:`visualad.runtime.pipeline`.
    Subclasses change only :meth:`_compile` (the engine that runs a graph file)."""

    knn = knn
    dtype_name = "fp32"
    platform = "onnxruntime"
    resize_map = staticmethod(resize_bilinear)

    def __init__(self, path: PathLike, providers: Optional[List[str]] = None) -> None:
        self.path = Path(path)
        links = sorted(p.name for p in self.path.iterdir() if p.is_symlink()) if self.path.is_dir() else []
        if links:
            raise WeightsError(f"{links[0]} is a symbolic link: an export holds regular files only", self.path)
        self.meta = read_meta(self.path)
        self.config = VisualADConfig.from_dict(self.meta["config"], self.path)
        self.image_size = int(self.meta["image_size"])
        # the backbone's depth picks the feature blocks; exports before it was recorded: the depth of their blocks
        depth = self.meta.get("depth") or next(
            (d for d in range(1, 1000) if list(partners.blocks_for_depth(d)) == list(self.meta["blocks"])), None)
        if depth is None:
            raise ConfigError(f"{META_NAME}: no depth, and blocks {self.meta['blocks']} are not those of any depth",
                              self.path)
        self.depth = int(depth)
        self.blocks = [int(b) for b in self.meta["blocks"]]
        self.rs = tuple(int(r) for r in self.meta["rs"])
        self._mean = np.asarray(self.meta["pixel_mean"], np.float32).reshape(1, 3, 1, 1)
        self._std = np.asarray(self.meta["pixel_std"], np.float32).reshape(1, 3, 1, 1)
        self._providers = providers or ["CPUExecutionProvider"]
        self.device_name = ",".join(self._providers)
        self._graphs: Dict[str, Graph] = {}
        self.forwards = 0

    def _compile(self, file: Path) -> Graph:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # its refusals come back as our error, not as log lines
        session = ort.InferenceSession(str(file), options, providers=self._providers)
        return Graph([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()],
                     lambda feed: session.run(None, feed))

    def _graph(self, name: str) -> Graph:
        """The graph ``name``, from a regular file inside the export and no bigger than ONNX allows; whatever the
        engine refuses (random bytes, unknown ops, external data) is one typed error."""
        if name not in self._graphs:
            file = self.path / f"{name}.onnx"
            inside = self.path.resolve()
            if file.is_symlink() or not file.is_file() or inside not in file.resolve().parents:
                raise WeightsError(f"{file.name} is missing from this export or is not a regular file in it",
                                   self.path)
            if file.stat().st_size > MAX_GRAPH_BYTES:
                raise WeightsError(f"{file.name} is {file.stat().st_size} bytes, over ONNX's limit of "
                                   f"{MAX_GRAPH_BYTES}", self.path)
            try:
                graph = self._compile(file)
            except ImportError:
                raise
            except Exception as exc:  # noqa: BLE001 - each engine raises its own types for every bad graph
                raise WeightsError(f"{file.name}: {self.platform} cannot load it: {_one_line(exc)}",
                                   self.path) from None
            want_in, want_out = GRAPH_SIGNATURES.get(name, (None, None))
            want_out = self.meta.get("features") if name == "features" else want_out
            if graph.inputs != want_in or (want_out is not None and graph.outputs != list(want_out)):
                raise WeightsError(f"{file.name} takes {graph.inputs} and gives {graph.outputs}; this export's graph "
                                   f"takes {want_in} and gives {want_out}", self.path)
            self._graphs[name] = graph
        return self._graphs[name]

    def _run(self, name: str, feed: Dict[str, np.ndarray], shapes: Sequence[Tuple[int, ...]]) -> List[np.ndarray]:
        """Run a graph and check its outputs against the shapes the pipeline expects (-1: any size)."""
        try:
            outs = self._graph(name).run(feed)
        except VisualADError:
            raise
        except Exception as exc:  # noqa: BLE001 - a graph that fails on valid input is a broken export
            raise WeightsError(f"{name}.onnx failed: {_one_line(exc)}", self.path) from None
        if len(outs) != len(shapes):
            raise WeightsError(f"{name}.onnx gave {len(outs)} outputs, not {len(shapes)}", self.path)
        for out, shape in zip(outs, shapes):
            if out.ndim != len(shape) or any(w not in (-1, got) for w, got in zip(shape, out.shape)):
                raise WeightsError(f"{name}.onnx gave an output of shape {list(out.shape)}, not "
                                   f"{[w if w >= 0 else 'any' for w in shape]}", self.path)
        return [np.asarray(o, np.float32) for o in outs]

    def inference(self) -> Any:
        return contextlib.nullcontext()

    def prepare(self, squares: Sequence[np.ndarray]) -> np.ndarray:
        x = np.stack(squares).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        return (x - self._mean) / self._std

    def score(self, batch: np.ndarray, scorer: Any) -> Tuple[np.ndarray, np.ndarray]:
        return scorer.score(self, batch)

    def head_maps(self, batch: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        self.forwards += 1
        n, size = len(batch), self.image_size
        maps, scores = self._run("head", {"images": batch}, [(n, size, size), (n,)])
        return maps, scores

    def _current(self) -> None:
        """Exports of format 1 give unit rows per (block, r), which the NumPy core no longer takes."""
        if self.meta["format_version"] < 2:
            raise ConfigError(f"this export (format {self.meta['format_version']}) was made by an older visualad; "
                              "its head mode runs, its references, batch and stream modes need it exported "
                              "again (visualad export)", self.path)

    def features(self, batch: np.ndarray, blocks: Sequence[int]) -> Dict[int, np.ndarray]:
        self._current()
        missing = [int(b) for b in blocks if int(b) not in self.blocks]
        if missing:
            raise ConfigError(f"this export holds the features of blocks {self.blocks}, not {missing}", self.path)
        self.forwards += 1
        tokens = int(self.meta["grid"]) ** 2
        shapes = [(len(batch), tokens, -1)] * len(self.blocks)
        outs = dict(zip(self.blocks, self._run("features", {"images": batch}, shapes)))
        return {int(b): outs[int(b)] for b in blocks}

    def references_grid(self, batch: np.ndarray, bank: ArrayBank) -> np.ndarray:
        return bank.grid(self.features(batch, self.blocks))

    def grid_to_map(self, grids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        g = int(self.meta["grid"])
        grids = np.asarray(grids, np.float32).reshape(-1, g, g)
        size = self.image_size
        maps = self._run("grid_to_map", {"grid": grids}, [(len(grids), size, size)])[0]
        return maps, maps.reshape(maps.shape[0], -1).max(axis=1)

    def build_references(self, items: Sequence[Any], batch_size: int = 8) -> ArrayBank:
        """The bank of these normal images (the export's feature blocks)."""
        if not items:
            raise ConfigError("references mode needs at least one reference image")
        parts: Dict[int, List[np.ndarray]] = {b: [] for b in self.blocks}
        digests: List[str] = []
        for chunk, chunk_digests in pipeline.references(self, items, batch_size):
            for k, v in self.features(self.prepare([x.square for x in chunk]), self.blocks).items():
                parts[k].append(v.reshape(-1, v.shape[-1]))
            digests += chunk_digests
        return ArrayBank({k: np.concatenate(v) for k, v in parts.items()}, digests, self.rs)

    def load_references(self) -> Optional[ArrayBank]:
        """The bank saved with the export, if any: plain float arrays of the export's features, no pickles."""
        info = self.meta.get("references")
        if not info:
            return None
        self._current()
        file = self.path / "references.npz"
        shots, tokens = int(info["shots"]), int(self.meta["grid"]) ** 2
        feats: Dict[int, np.ndarray] = {}
        try:
            with np.load(file, allow_pickle=False) as npz:
                for b in self.blocks:
                    arr = npz[f"ln_{b}"]
                    if arr.dtype.kind != "f" or arr.ndim != 2 or arr.shape[0] != shots * tokens or arr.shape[1] < 1:
                        raise WeightsError(f"references.npz: ln_{b} is {arr.dtype} {list(arr.shape)}, not "
                                           f"float [{shots} x {tokens}, C]", self.path)
                    feats[b] = arr.astype(np.float32)
        except VisualADError:
            raise
        except (OSError, ValueError, KeyError, EOFError) as exc:  # random bytes, object arrays, missing arrays
            raise WeightsError(f"references.npz cannot be read: {_one_line(exc)}", self.path) from None
        if not all(np.isfinite(v).all() for v in feats.values()):
            raise WeightsError("references.npz holds values that are not finite", self.path)
        digests = info.get("digests") or [""] * shots
        if len(digests) != shots:
            raise WeightsError(f"{META_NAME}: references name {len(digests)} digests for {shots} shots", self.path)
        return ArrayBank(feats, digests, self.rs, info.get("fingerprint"))


class OpenVinoBackend(OnnxBackend):
    """The export's graphs compiled by OpenVINO (``pip install openvino``) for ``device`` ("CPU", "GPU", "AUTO"):
    what anomalib users deploy on. Everything else is :class:`OnnxBackend`'s."""

    platform = "openvino"

    def __init__(self, path: PathLike, device: str = "CPU") -> None:
        super().__init__(path)
        self.device_name = f"openvino:{device}"
        self._device = device

    def _compile(self, file: Path) -> Graph:
        import openvino as ov

        # f32: OpenVINO would run bf16 on CPUs that have it, and the thresholds were calibrated in fp32
        compiled = ov.Core().compile_model(str(file), self._device, {"INFERENCE_PRECISION_HINT": "f32"})
        ports = list(compiled.outputs)

        def run(feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
            out = compiled(feed)
            return [np.asarray(out[p]) for p in ports]

        return Graph([p.get_any_name() for p in compiled.inputs], [p.get_any_name() for p in ports], run)


RUNTIMES = ("onnxruntime", "openvino")


class OnnxDetector(Predictor):
    """A directory written by ``visualad export`` / ``det.export_onnx``: the same predictor surface as the
    torch detector (predict, predict_folder, predict_iter, stream, set_references, calibrate). ``runtime``:
    onnxruntime (``providers``) or openvino (``device``, default "CPU")."""

    def __init__(self, path: PathLike, providers: Optional[List[str]] = None, runtime: str = "onnxruntime",
                 device: str = "CPU") -> None:
        super().__init__()
        if runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        self.backend = OnnxBackend(path, providers) if runtime == "onnxruntime" else OpenVinoBackend(path, device)
        self.path = self.backend.path
        self.image_size = self.backend.image_size
        self.references = self.backend.load_references()

    def __repr__(self) -> str:
        shots = 0 if self.references is None else self.references.shots
        return (f"OnnxDetector(path={str(self.path)!r}, backbone={self.config.backbone!r}, "
                f"image_size={self.image_size}, references={shots})")


def load(path: PathLike, runtime: str = "onnxruntime") -> OnnxDetector:
    """An export directory as a detector (raises :class:`VisualADError` subclasses for anything else). Graphs load
    when a mode first needs them: head mode never holds the features graph."""
    try:
        return OnnxDetector(path, runtime=runtime)
    except ImportError as exc:
        raise VisualADError(f"{runtime} is needed to run an ONNX export: pip install {runtime} ({exc})",
                            path) from None
