"""The Engine: a model on a device in a dtype, and the one way images travel through it.

input -> read-ahead (decode, validate, resize; bounded) -> one normalised batch on the device (the model's
``pixel_mean``/``pixel_std`` buffers) -> a scoring mode -> model-size maps and scores -> host.
Tasks (calibrate, evaluate, reference banks, finetune) take an Engine; none reaches back into the detector.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, Deque, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..model import VisualAD
from ..modes import knn
from ..modes.references import image_digest
from .precision import autocast, resolve_device, resolve_dtype
from .readahead import Loaded, batched, paired, read_ahead

logger = logging.getLogger(__name__)


class Engine:
    """Owns the model, its device and its dtype; ``score`` is the tensor entry, ``run`` the stream entry."""

    def __init__(self, model: VisualAD, device: Union[str, torch.device] = "auto",
                 dtype: Union[str, torch.dtype] = "auto") -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model.to(self.device).eval()
        #: forwards run so far (batches through the model or the backbone): tests count work with it
        self.forwards = 0

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    def to(self, device: Union[str, torch.device], dtype: Union[str, torch.dtype] = "auto") -> "Engine":
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model.to(self.device)
        return self

    def autocast(self) -> Any:
        return autocast(self.device, self.dtype)

    def to_batch(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Square-resized uint8 arrays [S, S, 3] -> one normalised float batch on the device (one transfer)."""
        x = torch.from_numpy(np.stack(arrays)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.model.pixel_mean) / self.model.pixel_std

    # --- the tensor entry ----------------------------------------------------------------------------
    def score(self, batch: torch.Tensor, mode: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """Model-size smoothed maps [B, S, S] and scores [B] (fp32, on the device) of a normalised batch."""
        self.forwards += 1
        with torch.inference_mode(), self.autocast():
            return mode.score(self.model, batch)

    def backbone_features(self, batch: torch.Tensor, blocks: Sequence[int]) -> List[torch.Tensor]:
        """The frozen backbone's patch features [B, N, C] at ``blocks`` (no inserted tokens; stops early)."""
        self.forwards += 1
        with torch.inference_mode(), self.autocast():
            return self.model.backbone_features(batch, blocks)

    def score_arrays(self, arrays: Sequence[np.ndarray], mode: Any) -> Tuple[np.ndarray, np.ndarray]:
        """Host float32 maps [B, S, S] and scores [B] for square-resized uint8 arrays."""
        maps, scores = self.score(self.to_batch(arrays), mode)
        return maps.float().cpu().numpy(), scores.float().cpu().numpy()

    # --- the stream entry ----------------------------------------------------------------------------
    def read(self, items: Iterable[Any], batch_size: int, *, keep_image: bool = False, on_error: str = "return",
             label: str = "input") -> Iterator[List[Loaded]]:
        """Batches of decoded inputs, with at most two batches in flight (constant memory)."""
        if int(batch_size) < 1:
            raise ValueError("batch_size must be >= 1")
        stream = read_ahead(items, self.image_size, keep_image=keep_image, on_error=on_error,
                            in_flight=2 * batch_size, label=label)
        return batched(stream, batch_size)

    def run(self, items: Iterable[Any], mode: Any, batch_size: int = 8, *, keep_image: bool = False,
            on_error: str = "return") -> Iterator[Tuple[Loaded, Optional[np.ndarray], float]]:
        """(input, model-size map or None, score) per input, in order, a batch at a time; a set mode
        (batch) first reads the whole set's features, then yields; a stream mode yields each input once it is
        scored against the recent ones."""
        if hasattr(mode, "score_set"):
            yield from self._run_set(items, mode, batch_size, keep_image=keep_image, on_error=on_error)
            return
        if hasattr(mode, "feed"):
            yield from self._run_stream(items, mode, batch_size, keep_image=keep_image, on_error=on_error)
            return
        for chunk in self.read(items, batch_size, keep_image=keep_image, on_error=on_error):
            good = [x for x in chunk if x.ok]
            maps = scores = None
            if good:
                maps, scores = self.score_arrays([x.square for x in good], mode)
            yield from paired(chunk, maps, scores)

    def _run_set(self, items: Iterable[Any], mode: Any, batch_size: int, *, keep_image: bool,
                 on_error: str) -> Iterator[Tuple[Loaded, Optional[np.ndarray], float]]:
        blocks = mode.blocks_for(self.model.backbone.depth)
        loaded: List[Loaded] = []
        parts: dict = {(b, r): [] for b in blocks for r in mode.rs}
        digests: List[str] = []
        for chunk in self.read(items, batch_size, keep_image=keep_image, on_error=on_error):
            good = [x for x in chunk if x.ok]
            if good:
                feats = self.backbone_features(self.to_batch([x.square for x in good]), blocks)
                for b, f in zip(blocks, feats):
                    for r in mode.rs:
                        parts[(b, r)].append(knn.lnamd(f, r))
                digests += [image_digest(x.square) for x in good]
            for x in chunk:
                x.square = None  # only the features are kept for the set
            loaded += chunk
        with torch.inference_mode():
            # one key at a time, so the per-batch pieces and the whole set never coexist
            grids = mode.score_set({k: torch.cat(parts.pop(k)) for k in list(parts) if parts[k]}, digests)
            done = 0
            for s in range(0, len(loaded), batch_size):
                chunk = loaded[s:s + batch_size]
                n_ok = sum(x.ok for x in chunk)
                if n_ok:
                    maps = self.model.grid_to_map(grids[done:done + n_ok])
                    scores = maps.flatten(1).amax(dim=1).cpu().numpy()
                    maps = maps.cpu().numpy()
                    done += n_ok
                yield from paired(chunk, maps, scores)

    def _run_stream(self, items: Iterable[Any], mode: Any, batch_size: int, *, keep_image: bool,
                    on_error: str) -> Iterator[Tuple[Loaded, Optional[np.ndarray], float]]:
        blocks = mode.blocks_for(self.model.backbone.depth)
        waiting: Deque[Loaded] = deque()  # inputs in arrival order whose result is not out yet (errors too)
        ready: Deque[torch.Tensor] = deque()  # grids of the first waiting inputs that are ok

        def emit() -> Iterator[Tuple[Loaded, Optional[np.ndarray], float]]:
            while waiting and (not waiting[0].ok or ready):
                x = waiting.popleft()
                if not x.ok:
                    yield x, None, float("nan")
                    continue
                with torch.inference_mode():
                    m = self.model.grid_to_map(ready.popleft()[None])[0]
                yield x, m.cpu().numpy(), float(m.max())

        for chunk in self.read(items, batch_size, keep_image=keep_image, on_error=on_error):
            good = [x for x in chunk if x.ok]
            waiting.extend(chunk)
            if good:
                feats = self.backbone_features(self.to_batch([x.square for x in good]), blocks)
                with torch.inference_mode():
                    unit = {(b, r): knn.lnamd(f, r) for b, f in zip(blocks, feats) for r in mode.rs}
                    for i, x in enumerate(good):
                        ready.extend(mode.feed({k: v[i] for k, v in unit.items()}, image_digest(x.square)))
                        x.square = None
            yield from emit()
        with torch.inference_mode():
            ready.extend(mode.flush())
        yield from emit()
