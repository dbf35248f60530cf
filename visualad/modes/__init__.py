"""Ways of scoring, one file each, over one nearest-neighbour core (:mod:`visualad.modes.knn`).

- ``head``: the trained tokens (the paper's zero-shot map);
- ``references``: nearest patches among a few normal images of the product;
- ``batch``: an unlabeled set of one product scored against itself (mutual scoring);
- ``auto``: references when set, else batch for 16 or more images given together, else the head.
"""
MODES = ("auto", "head", "references", "batch")
