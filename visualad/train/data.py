"""The auxiliary set as training batches: images and masks at the model's size, synthetic anomalies for
normal-only sets (:mod:`visualad.train.synth`)."""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

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
        samples, splits = self._read(root, config)
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
        by_class: Dict[str, Dict[str, int]] = {}
        for smp in samples:
            row = by_class.setdefault(smp.category, {"normal": 0, "anomalous": 0})
            row["anomalous" if smp.label else "normal"] += 1
        self.stats = {
            "root": str(self.root), "format": self.format, "categories": sorted(by_class),
            "n_images": len(samples), "n_anomalous": n_anomalous, "n_normal": len(samples) - n_anomalous,
            "n_anomalous_with_mask": n_masked, "include_train_normals": bool(config.include_train_normals),
            "synthetic_anomalies": bool(self.synthetic), "splits": splits, "by_class": by_class,
        }
        if self.synthetic and len(by_class) == 1:
            logger.warning("training on the good images of one product with synthetic anomalies: measured on "
                           "shared/data, references mode with 16 good images of the product did better without "
                           "any training (mean image AUROC 0.930 against 0.679 for such a head; docs/user-guide.md"
                           "); compare both with `visualad eval ROOT --shots 16` and `visualad eval ROOT --model "
                           "<this output>`")

    def _read(self, root: PathLike, config: TrainConfig) -> Tuple[List[Sample], Dict[str, int]]:
        """The labelled images of every split the layout has: the test split (the paper's protocol: normal and
        anomalous images with masks), and the train split's normal images when asked, or when the test split is
        missing or has no anomalies (a product's good parts only: MVTec's train/good, a plain good/)."""
        splits: Dict[str, List[Sample]] = {}
        errors = []
        for split in ("test", "train"):
            try:
                ds = load_dataset(root, format=config.dataset_format, split=split)
            except DatasetError as exc:
                errors.append(exc)
                continue
            self.root, self.format = ds.root, ds.format
            splits[split] = list(ds.samples)
        if not splits:
            raise errors[0]
        samples = splits.get("test", [])
        if "train" in splits and (config.include_train_normals or not any(smp.label for smp in samples)):
            seen = {smp.image_path for smp in samples}
            samples = samples + [smp for smp in splits["train"] if smp.label == 0 and smp.image_path not in seen]
        test_paths = {smp.image_path for smp in splits.get("test", [])}
        counts = {"test": sum(smp.image_path in test_paths for smp in samples)}
        counts["train"] = len(samples) - counts["test"]
        return samples, counts

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
