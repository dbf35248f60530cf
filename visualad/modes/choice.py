"""Which way of scoring a call uses: one rule for the torch detector and the ONNX runtime (no torch here)."""
from __future__ import annotations

import logging
from typing import Any, Optional

from ..errors import ConfigError
from .base import Scorer, create, names

logger = logging.getLogger(__name__)

MIN_IMAGES = 4  # batch mode on fewer: a typed error
WARN_BELOW = 16  # below: quality drops by 0.03-0.10 image AUROC (docs/batch-zero-shot.md)
#: batch mode scores at most this many images as one set; a longer input is split into sets in input order, so
#: memory is bounded whatever its length (a set's features: about 0.4 MB an image for ViT-S at 224 px in fp16
#: under dtype="auto", 0.8 MB with dtype="fp32"). Each image meets at most ``compare_with`` (64) others, and
#: quality was saturated from 32 images (docs/batch-zero-shot.md), so a larger set would change only which
#: partners are drawn
MAX_SET = 1024
#: what to do when the head is untrained (a backbone alone, or from_backbone before finetune)
UNTRAINED_HEAD_HELP = (f"give a few normal images of the product (set_references / --references), or {MIN_IMAGES} or "
                       "more images of one product together (batch mode); head mode needs a trained head: "
                       "det.finetune('<auxiliary dataset with masks>', out_dir='my-model') or visualad finetune")


def check_set_size(n: int) -> None:
    """A batch-mode set: fewer than 4 images is a typed error, fewer than 16 a warning (both detectors)."""
    if n < MIN_IMAGES:
        raise ConfigError(f"batch mode scores a set against itself and needs at least {MIN_IMAGES} images "
                          f"of one product, got {n}; use mode='references' with a few normal images, or "
                          "mode='head'")
    if n < WARN_BELOW:
        logging.getLogger("visualad.modes.batch").warning(
            "batch mode on %d images: below %d images quality drops (0.03-0.10 image AUROC measured); give more "
            "images of the product at once", n, WARN_BELOW)


def uses_references(mode: str) -> bool:
    """Whether a call asking for ``mode`` scores by the references when they are set (auto or references)."""
    return mode in ("auto", "references")


class ModeChooser:
    """``choose`` names the mode of a call; it warns once per detector when it falls back to the head.

    ``"auto"``: references when set; else batch for a set of 16 or more images given together; else the head,
    with one warning (it transfers poorly to unseen products on small backbones). An untrained head is never
    chosen: "auto" takes batch mode from 4 images and otherwise raises :class:`ConfigError` saying what to give.
    """

    def __init__(self) -> None:
        self.warned = False

    def choose(self, mode: str, has_references: bool, n_images: Optional[int], head_trained: bool) -> str:
        if mode != "auto" and mode not in names():
            raise ConfigError(f"mode must be one of {('auto',) + names()}, got {mode!r}")
        if mode == "references" or (mode == "auto" and has_references):
            if not has_references:
                raise ConfigError("mode='references' needs reference images: det.set_references(normal_images) "
                                  "or predict(..., references=normal_images)")
            return "references"
        fewest = WARN_BELOW if head_trained else MIN_IMAGES
        if mode == "batch" or (mode == "auto" and n_images is not None and fewest <= n_images):
            return "batch"
        if not head_trained:
            if mode == "auto":
                raise ConfigError(f"this model's head is untrained, so there is no mode to pick for "
                                  f"{'a stream' if n_images is None else n_images} image(s): {UNTRAINED_HEAD_HELP}")
            self._warn_once("head mode on an untrained head: its maps mean nothing; %s", UNTRAINED_HEAD_HELP)
        elif mode == "auto":
            why = f"only {n_images} image(s) given together" if n_images is not None else "a stream of images"
            self._warn_once("scoring with the trained head (%s): on products it never saw the head transfers "
                            "poorly on small backbones; for reliable maps give %d or more images of one product "
                            "at once (batch mode) or a few normal images (set_references / --references)",
                            why, WARN_BELOW)
        return "head"

    def scorer(self, mode: str, references: Any, n_images: Optional[int], head_trained: bool,
               compare_with: int = 64, seed: int = 0) -> Scorer:
        """The scorer of a call: :meth:`choose`, then the registry builds it from the call's settings."""
        name = self.choose(mode, references is not None, n_images, head_trained)
        return create(name, references=references, compare_with=compare_with, seed=seed)

    def _warn_once(self, msg: str, *args: object) -> None:
        if not self.warned:
            self.warned = True
            logging.getLogger("visualad.detector").warning(msg, *args)
