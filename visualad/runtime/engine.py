"""The Engine: a model on a device in a dtype, the torch backend of the one pipeline
(:mod:`visualad.runtime.pipeline`).

uint8 squares -> one normalised batch on the device (the model's ``pixel_mean``/``pixel_std`` buffers) -> the
head's maps, or the frozen backbone's layer-normed patch rows for the nearest-neighbour modes -> grids -> the
head's upsampling and blur -> host maps and scores. Tasks (calibrate, evaluate, reference banks, finetune)
take an Engine; none reaches back into the detector.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data import images as imio
from ..errors import ConfigError
from ..model import VisualAD
from ..modes import knn
from ..modes.bank import ReferenceBank, build_bank
from . import pipeline
from .precision import autocast, dtype_name, feature_dtype_for, resolve_device, resolve_dtype
from .readahead import Loaded

logger = logging.getLogger(__name__)


class Engine:
    """Owns the model, its device and its dtype; ``score`` is the tensor entry, ``run`` the stream entry."""

    def __init__(self, model: VisualAD, device: Union[str, torch.device] = "auto",
                 dtype: Union[str, torch.dtype] = "auto") -> None:
        self.model = model.eval()
        #: forwards run so far (batches through the model or the backbone): tests count work with it
        self.forwards = 0
        self.to(device, dtype)

    #: the nearest-neighbour primitives on this backend's arrays (the pipeline and the modes call them)
    knn = knn
    #: a map [h, w] back to an image's size (OpenCV's bilinear resize)
    resize_map = staticmethod(imio.resize_map)

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    platform = "pytorch"

    @property
    def device_name(self) -> str:
        return str(self.device)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def depth(self) -> int:
        return int(self.model.backbone.depth)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def to(self, device: Union[str, torch.device], dtype: Union[str, torch.dtype] = "auto") -> "Engine":
        """The model on ``device``, run in ``dtype`` (resolved there: "auto" is bf16 on CUDA and native-bf16 CPUs)."""
        self.device = resolve_device(device)
        # the dtype as asked ("auto", a name or a torch dtype): an engine rebuilt from this one asks the same
        self.requested_dtype = dtype
        self.dtype = resolve_dtype(dtype, self.device)
        # the dtype a set's layer-normed patch rows are kept in between the forward and the mutual scoring (batch and
        # stream mode): fp16 under "auto" and for a half engine (half the memory; fp16 products on CUDA), fp32 for
        # dtype="fp32", the exact function (:mod:`visualad.modes.knn`). References mode keeps fp32 rows (its bank
        # is small, and fp16 queries moved one metric by 0.0024: docs/modes.md, "Precision") and picks its
        # nearest candidates with a half product on CUDA unless this is fp32
        self.feature_dtype = feature_dtype_for(dtype, self.dtype)
        self.model.to(self.device)
        return self

    def autocast(self) -> Any:
        return autocast(self.device, self.dtype)

    def prepare(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Square-resized uint8 arrays [S, S, 3] -> one normalised float batch on the device (one transfer)."""
        x = torch.from_numpy(np.stack(arrays)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.model.pixel_mean) / self.model.pixel_std

    # --- the backend contract ------------------------------------------------------------------------
    def inference(self) -> Any:
        return torch.inference_mode()

    def score(self, batch: torch.Tensor, scorer: Any) -> Tuple[np.ndarray, np.ndarray]:
        """Host float32 model-size maps [B, S, S] and scores [B] of a prepared batch (``images`` scorers)."""
        with torch.inference_mode(), self.autocast():
            return scorer.score(self, batch)

    def head_maps(self, batch: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
        self.forwards += 1
        maps, scores = self.model.predict_maps(batch)
        return maps.float().cpu().numpy(), scores.float().cpu().numpy()

    def backbone_features(self, batch: torch.Tensor, blocks: Sequence[int]) -> List[torch.Tensor]:
        """The frozen backbone's patch features [B, N, C] at ``blocks`` (no inserted tokens; stops early)."""
        self.forwards += 1
        with torch.inference_mode(), self.autocast():
            return self.model.backbone_features(batch, blocks)

    def features(self, batch: torch.Tensor, blocks: Sequence[int]) -> Dict[int, torch.Tensor]:
        """Layer-normed patch rows per block of a prepared batch for a set or a stream, each [B, N, C] in
        ``feature_dtype`` (the kNN core derives every aggregation size r from them)."""
        feats = self.backbone_features(batch, blocks)
        with torch.inference_mode():
            return {b: knn.layer_normed(f).to(self.feature_dtype) for b, f in zip(blocks, feats)}

    def references_grid(self, batch: torch.Tensor, bank: ReferenceBank) -> torch.Tensor:
        if bank.image_size != self.image_size:
            raise ConfigError(f"the reference bank was built at {bank.image_size} px and the model runs at "
                              f"{self.image_size} px: set the references again")
        # candidates from a half product (on CUDA; the fp32 rows decide), the exact search under dtype="fp32"
        return bank.grid(bank.query(self.backbone_features(batch, bank.blocks)),
                         half_candidates=self.feature_dtype in knn.HALF)

    def grid_to_map(self, grids: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
        """Patch grids [B, P] or [B, g, g] -> host smoothed maps [B, S, S] and their maxima [B]."""
        g = int(self.model.grid)
        maps = self.model.grid_to_map(grids.reshape(-1, g, g))
        return maps.float().cpu().numpy(), maps.flatten(1).amax(dim=1).float().cpu().numpy()

    def build_references(self, items: Sequence[Any], batch_size: int = 8, blocks: Optional[Sequence[int]] = None,
                         rs: Sequence[int] = knn.DEFAULT_R) -> ReferenceBank:
        """The bank of these normal images: the frozen backbone's layer-normed rows at the mode's blocks."""
        if not items:
            raise ConfigError("references mode needs at least one reference image")
        blocks = tuple(blocks) if blocks else knn.blocks_for_depth(self.depth)
        bad = [b for b in blocks if not 1 <= b <= self.depth]
        if bad:
            raise ConfigError(f"blocks {bad} are outside the backbone's 1..{self.depth}")

        def features() -> Iterator[Tuple[str, List[torch.Tensor]]]:
            for chunk, digests in pipeline.references(self, items, batch_size):
                feats = self.backbone_features(self.prepare([x.square for x in chunk]), blocks)
                for i, digest in enumerate(digests):
                    yield digest, [f[i:i + 1].float() for f in feats]

        with torch.inference_mode():
            bank = build_bank(features(), blocks, rs, self.image_size)
        bank.to(self.device)
        logger.debug("reference bank: %d images, blocks %s, r %s, %.1f MB", bank.shots, blocks, tuple(rs),
                     bank.nbytes / 2**20)
        return bank

    # --- the pipeline, on this backend ---------------------------------------------------------------
    def score_arrays(self, arrays: Sequence[np.ndarray], scorer: Any) -> Tuple[np.ndarray, np.ndarray]:
        """Host float32 maps [B, S, S] and scores [B] for square-resized uint8 arrays."""
        return self.score(self.prepare(arrays), scorer)

    def read(self, items: Iterable[Any], batch_size: int, *, keep_image: bool = False, on_error: str = "return",
             label: str = "input") -> Iterator[List[Loaded]]:
        return pipeline.read(self, items, batch_size, keep_image=keep_image, on_error=on_error, label=label)

    def run(self, items: Iterable[Any], scorer: Any, batch_size: int = 8, *, keep_image: bool = False,
            on_error: str = "return") -> Iterator[Tuple[Loaded, Optional[np.ndarray], float]]:
        """(input, model-size map or None, score) per input, in order (:func:`visualad.runtime.pipeline.run`)."""
        return pipeline.run(self, items, scorer, batch_size, keep_image=keep_image, on_error=on_error)
