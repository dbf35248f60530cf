"""The auxiliary set as training batches: images and masks at the model's size, synthetic anomalies for
normal-only sets (:mod:`visualad.train.synth`)."""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data import images as imio
from ..data.datasets import Sample, load_dataset, load_mask
from ..errors import DatasetError
from ..types import PathLike
from . import synth
from .distributed import World

from .recipe import TrainConfig

logger = logging.getLogger(__name__)



@dataclass
class TrainBatch:
    """One batch on the host: uint8 images [B, S, S, 3], bool masks [B, S, S], labels and mask flags [B]."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    has_mask: np.ndarray
    kinds: List[str] = field(default_factory=list)


class TrainingSet:
    """The auxiliary set's samples, loaded lazily at the model's size, with optional synthetic anomalies.

    Images: ``load_image`` + ``resize_to_square`` (PIL bicubic, as the authors); masks: ``load_mask`` at
    (S, S) (PIL bilinear then ``> 127``, the authors' ``Resize`` + ``> 0.5``).
    """

    def __init__(self, root: PathLike, image_size: int, config: TrainConfig) -> None:
        self.size = int(image_size)
        self.seed = config.seed
        self.normal_fraction = config.synth_normal_fraction
        ds = load_dataset(root, format=config.dataset_format, split="test")
        self.root, self.format = ds.root, ds.format
        samples: List[Sample] = list(ds.samples)
        if config.include_train_normals:
            try:
                seen = {s.image_path for s in samples}
                samples += [s for s in load_dataset(root, format=config.dataset_format, split="train").samples
                            if s.label == 0 and s.image_path not in seen]
            except DatasetError as exc:
                logger.warning("include_train_normals: no train split read (%s)", exc)
        self.samples = samples
        self.normals = [i for i, s in enumerate(samples) if s.label == 0]
        n_anomalous = sum(s.label == 1 for s in samples)
        n_masked = sum(s.label == 1 and s.mask_path is not None for s in samples)
        if config.synthesize == "never" and n_anomalous == 0:
            raise DatasetError("the auxiliary set has only normal images, and training needs anomalies with "
                               "masks; pass synthesize='auto' or 'always' (CLI: --synthesize auto) to train on "
                               "synthetic anomalies", self.root)
        self.synthetic = config.synthesize == "always" or (config.synthesize == "auto" and n_masked == 0)
        if self.synthetic and not self.normals:
            raise DatasetError("synthetic anomalies need normal images, and this set has none", self.root)
        if n_masked == 0 and not self.synthetic:
            logger.warning("no anomalous image has a mask: only the image loss and the hinge will train")
        if self.synthetic:
            logger.info("training on synthetic anomalies (CutPaste, Perlin blend) over %d normal images",
                        len(self.normals))
        self.stats = {
            "root": str(self.root), "format": self.format, "categories": sorted({s.category for s in samples}),
            "n_images": len(samples), "n_anomalous": n_anomalous, "n_normal": len(samples) - n_anomalous,
            "n_anomalous_with_mask": n_masked, "include_train_normals": bool(config.include_train_normals),
            "synthetic_anomalies": bool(self.synthetic),
        }

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, index: int) -> np.ndarray:
        img = imio.load_image(self.samples[index].image_path)
        return imio.resize_to_square(img.array, self.size)

    def load(self, index: int, epoch: int) -> Tuple[np.ndarray, np.ndarray, int, bool, str]:
        """(image uint8 [S, S, 3], mask bool [S, S], label, has_mask, kind) of one sample in one epoch."""
        s = self.samples[index]
        image = self._image(index)
        if s.label == 0 and self.synthetic:
            rng = synth.sample_rng(self.seed, epoch, index)
            image, mask, kind = synth.synthesize(image, rng, self._other_normal(index),
                                                 normal_fraction=self.normal_fraction)
            return image, mask, int(kind != "normal"), True, kind
        mask = load_mask(s, size=(self.size, self.size))
        return image, mask, int(s.label), not s.mask_missing, "real"

    def _other_normal(self, index: int) -> Optional[synth.TextureSource]:
        others = [i for i in self.normals if i != index]
        if not others:
            return None
        return lambda rng: self._image(others[int(rng.integers(len(others)))])

    def order(self, epoch: int) -> List[int]:
        """The epoch's shuffled order: depends on (seed, epoch) only."""
        g = torch.Generator().manual_seed(int(self.seed) + int(epoch))
        return torch.randperm(len(self.samples), generator=g).tolist()

    def batches(self, epoch: int, batch_size: int, num_workers: int = 0,
                world: Optional[World] = None) -> Iterator[TrainBatch]:
        """The epoch's batches (last one may be short); with workers, up to two batches are decoded ahead.
        Under torchrun, ``world`` keeps this process's share of each global batch."""
        order = self.order(epoch)
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if world is not None and world.size > 1:
            chunks = [world.share(c) for c in chunks]
        if num_workers <= 0:
            for chunk in chunks:
                yield self._collate([self.load(i, epoch) for i in chunk])
            return
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append([pool.submit(self.load, i, epoch) for i in chunk])
                if len(pending) > 2:
                    yield self._collate([f.result() for f in pending.popleft()])
            while pending:
                yield self._collate([f.result() for f in pending.popleft()])

    @staticmethod
    def _collate(items: Sequence[Tuple[np.ndarray, np.ndarray, int, bool, str]]) -> TrainBatch:
        return TrainBatch(images=np.stack([it[0] for it in items]), masks=np.stack([it[1] for it in items]),
                          labels=np.array([it[2] for it in items], dtype=np.float32),
                          has_mask=np.array([it[3] for it in items], dtype=np.float32),
                          kinds=[it[4] for it in items])
