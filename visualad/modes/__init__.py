"""Ways of scoring, one file each, over one nearest-neighbour core (:mod:`visualad.modes.knn` on torch, its
NumPy twin on onnxruntime), each a :class:`~visualad.modes.base.Scorer` in one registry.

- ``head``: the trained tokens (the paper's zero-shot map);
- ``references``: nearest patches among a few normal images of the product;
- ``batch``: an unlabeled set of one product scored against itself (mutual scoring);
- ``auto``: references when set, else batch for 16 or more images given together, else the head.

Importing this package imports no torch (the CLI reads ``MODES`` before it loads a model).
"""
from . import head, references, batch, stream  # noqa: F401,I001 - each registers its mode, in this order
from .base import names

MODES = ("auto",) + names()
