"""Few-shot mode: a memory bank of normal reference patches fused with the zero-shot map.

Why: zero-shot transfer from a small auxiliary set is fragile, while almost every user has a few good
parts. A nearest-neighbour (NN) patch distance against K normal images of the same product, computed on the
same frozen backbone that the zero-shot head uses, is a strong and cheap complement.

What happens per test batch (:meth:`ReferenceBank.predict`):

1. ``out = model(batch)`` gives the zero-shot layer maps. The patch features come from the frozen backbone
   run alone on the same batch (no inserted tokens, its own final norm, only up to the deepest few-shot
   layer): in the model's forward the learned tokens share attention with the patches and shift their
   features, differently for every trained head, which measurably weakened the nearest-neighbour map.
2. Few-shot grid map: for every chosen layer, the cosine distance ``1 - cos`` of each test patch to its
   nearest reference patch (exact search: chunked matrix products on L2-normalised features, no new
   dependency), averaged over the chosen layers.
3. Fusion (affine, so it is done on the patch grid and upsampled/blurred once, like the zero-shot map)::

       fused = w_zs * (zero_shot - mean_zs) / std_zs + w_fs * (few_shot - mean_fs) / std_fs

   where the means and standard deviations are taken over all pixels of the smoothed model-size maps of
   the *reference images themselves* (their zero-shot maps; their few-shot maps computed leave-one-image-out
   against the other references when K >= 2; with K = 1 there is no other image, so each reference patch is
   compared with the patches of the same image outside its 3x3 grid neighbourhood). Each map is thus in
   "standard deviations above normal" units, which makes the two comparable without labels.
   Default weights ``w_zs = 0.1, w_fs = 0.9`` (:data:`DEFAULT_WEIGHTS`), measured on ``../shared/data``
   (``docs/few-shot.md``): with ViT-S heads trained without the test category, the mean of every metric
   rises with w_fs, and references alone (w_fs = 1) are 0.0005-0.009 better than the default over six
   head sets (within the test sets' bootstrap noise); more weight on the zero-shot map costs more (equal
   weights: about 0.06). The small zero-shot weight is kept for heads that do transfer; pass ``weights=``
   to ``set_references`` to change it.
   Few-shot features: the frozen backbone's own patch features (measured better than the model's pre-SAF or
   post-SAF patches), from the middle chosen layers (:func:`default_layers`).
4. The fused grid is upsampled and Gaussian-smoothed exactly as the zero-shot map; the image score is the
   model's top-k mean of the smoothed fused map.

With no references the detector never calls the bank, so K = 0 is exactly the zero-shot output.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .model import scoring

if TYPE_CHECKING:
    from .detector import AnomalyDetector
    from .model.visualad import VisualAD, VisualADOutput

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
# "backbone": the frozen backbone run alone (no inserted tokens, its own final norm; one extra partial
# forward); "patches": the model's own pre-SAF patch features (same forward, shifted by the learned tokens);
# "saf": those after the trained SAF.
FEATURES = ("backbone", "patches", "saf")
DEFAULT_FEATURE = "backbone"
DEFAULT_WEIGHTS = (0.1, 0.9)  # (zero-shot, few-shot) weights of the z-scored maps: measured, docs/few-shot.md
BANK_SCHEMA = "2"  # schema 1 named the model's own pre-SAF features "backbone" (now "patches")
_CHUNK_ELEMENTS = 1 << 24  # similarity-matrix elements per chunk (64 MB in float32)


# ------------------------------------------------------------------------------------------- NN search


def nn_distance(queries: torch.Tensor, bank: torch.Tensor, chunk_elements: int = _CHUNK_ELEMENTS) -> torch.Tensor:
    """Cosine distance ``1 - max cos`` of each query row to its nearest bank row; both L2-normalised.

    Exact: the similarity matrix is built in query chunks so memory stays bounded (about
    ``chunk_elements`` floats) whatever the bank size. A matrix product rather than ``torch.cdist`` because
    on unit vectors ``|a - b|^2 = 2 - 2 cos`` ranks identically and the product keeps an exact duplicate at
    distance 0 (cdist's sqrt of a rounding error does not).
    """
    q = queries.float()
    b = bank.float()
    rows = max(1, chunk_elements // max(1, b.shape[0]))
    out = torch.empty(q.shape[0], device=q.device, dtype=torch.float32)
    bt = b.t()
    for s in range(0, q.shape[0], rows):
        sim = q[s:s + rows] @ bt
        out[s:s + rows] = sim.max(dim=1).values
    return (1.0 - out).clamp_(min=0.0)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1, eps=1e-8)


def layer_features(model: "VisualAD", images: torch.Tensor, out: "VisualADOutput", layers: Sequence[int],
                   feature: str) -> List[torch.Tensor]:
    """Per layer [B, N, C] L2-normalised patch features of the kind ``feature`` (see :data:`FEATURES`)."""
    if feature == "backbone":
        return [_normalise(f) for f in model.backbone_features(images, layers)]
    feats = []
    for layer in layers:
        f = out.patch_features[model.config.layers.index(layer)]
        if feature == "saf":
            f = model.saf[f"layer_{layer}"](f)
        feats.append(_normalise(f))
    return feats


def coreset(features: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of a greedy k-centre coreset of ``n`` rows (PatchCore's subsampling), seeded start, torch only.

    Why: a large bank costs memory and search time linearly; the k-centre subset keeps the coverage of
    feature space (every dropped patch lies close to a kept one) far better than random sampling.
    """
    m = features.shape[0]
    if n >= m:
        return torch.arange(m, device=features.device)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    first = int(torch.randint(m, (1,), generator=g))
    f = features.float()
    chosen = torch.empty(n, dtype=torch.long, device=f.device)
    chosen[0] = first
    min_d = 1.0 - f @ f[first]
    for i in range(1, n):
        j = int(torch.argmax(min_d))
        chosen[i] = j
        min_d = torch.minimum(min_d, 1.0 - f @ f[j])
    return chosen


# ------------------------------------------------------------------------------------------- the bank


class ReferenceBank:
    """Normal reference patches per layer (L2-normalised, on the model's device) plus the fusion statistics."""

    def __init__(self, features: Dict[int, torch.Tensor], feature: str = DEFAULT_FEATURE, shots: int = 0,
                 image_size: Optional[int] = None, stats: Optional[Dict[str, float]] = None,
                 weights: Tuple[float, float] = DEFAULT_WEIGHTS, meta: Optional[Dict[str, Any]] = None) -> None:
        if feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
        if not features:
            raise ValueError("a reference bank needs at least one layer")
        self.features = {int(k): v for k, v in features.items()}
        self.layers = tuple(sorted(self.features))
        self.feature = feature
        self.shots = int(shots)
        self.image_size = image_size
        self.stats = dict(stats or {})
        self.weights = (float(weights[0]), float(weights[1]))
        self.meta = dict(meta or {})

    # --- bookkeeping -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(iter(self.features.values())).device

    @property
    def nbytes(self) -> int:
        """Bytes of the feature tensors (what the bank costs in memory and on disk)."""
        return int(sum(v.numel() * v.element_size() for v in self.features.values()))

    @property
    def n_patches(self) -> Dict[int, int]:
        return {k: int(v.shape[0]) for k, v in self.features.items()}

    def to(self, device: Union[str, torch.device]) -> "ReferenceBank":
        self.features = {k: v.to(device) for k, v in self.features.items()}
        return self

    def __repr__(self) -> str:
        return (f"ReferenceBank(shots={self.shots}, layers={self.layers}, feature={self.feature!r}, "
                f"patches={self.n_patches}, bytes={self.nbytes})")

    # --- scoring -----------------------------------------------------------------------------------
    def few_shot_grid(self, model: "VisualAD", images: torch.Tensor, out: "VisualADOutput") -> torch.Tensor:
        """Raw NN cosine distances on the patch grid, mean over the bank's layers: [B, g, g].

        ``images`` and ``out`` are the batch and the model's forward on it."""
        feats = layer_features(model, images, out, self.layers, self.feature)
        b, n = feats[0].shape[:2]
        g = int(round(math.sqrt(n)))
        total = torch.zeros(b * n, device=feats[0].device, dtype=torch.float32)
        for layer, f in zip(self.layers, feats):
            total += nn_distance(f.reshape(b * n, -1), self.features[layer])
        return (total / len(self.layers)).view(b, g, g)

    def _check(self, model: "VisualAD") -> None:
        missing = [l for l in self.layers if l not in model.config.layers]
        if missing:
            raise ValueError(f"reference bank layers {missing} are not layers of this model {model.config.layers}")
        if self.image_size is not None and self.image_size != model.config.image_size:
            raise ValueError(f"reference bank was built at {self.image_size} px, the model runs at "
                             f"{model.config.image_size} px: set the references again")

    def fuse_grid(self, zero_grid: torch.Tensor, few_grid: torch.Tensor) -> torch.Tensor:
        """The documented affine fusion rule on grids (z-score each map with reference statistics, add)."""
        s = self.stats
        wz, wf = self.weights
        return (wz * (zero_grid - s["zs_mean"]) / s["zs_std"] + wf * (few_grid - s["fs_mean"]) / s["fs_std"])

    def components(self, model: "VisualAD", batch: torch.Tensor) -> Dict[str, torch.Tensor]:
        """All maps of one batch, for tests and benchmarks: model-size [B, S, S] float32.

        ``zero_shot`` / ``few_shot`` / ``fused`` are smoothed (as predicted); ``few_shot_raw`` is the raw NN
        distance upsampled without smoothing; ``*_score`` are top-k means of the smoothed maps.
        """
        self._check(model)
        with torch.inference_mode():
            out = model(batch)
            zero_grid = out.layer_maps.float().sum(dim=1)
            few_grid = self.few_shot_grid(model, batch, out)
            fused_grid = self.fuse_grid(zero_grid, few_grid)
            res: Dict[str, torch.Tensor] = {"few_shot_grid": few_grid, "zero_shot_grid": zero_grid}
            for name, grid in (("zero_shot", zero_grid), ("few_shot", few_grid), ("fused", fused_grid)):
                up = model.grid_to_map(grid, smooth=False)
                if name == "few_shot":
                    res["few_shot_raw"] = up
                res[name] = scoring.gaussian_blur(up, model.config.sigma)
                res[f"{name}_score"] = model.image_score(res[name])
        return res

    def predict(self, model: "VisualAD", batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Smoothed fused maps [B, S, S] (float32) and image scores [B] of one batch."""
        self._check(model)
        with torch.inference_mode():
            out = model(batch)
            fused_grid = self.fuse_grid(out.layer_maps.float().sum(dim=1), self.few_shot_grid(model, batch, out))
            maps = model.grid_to_map(fused_grid)
            return maps, model.image_score(maps)

    # --- persistence -------------------------------------------------------------------------------
    def save(self, path: PathLike) -> Path:
        """One safetensors file (atomic): a tensor per layer plus a JSON metadata string (size in bytes)."""
        from .weights.safe import save_safetensors

        path = Path(path)
        meta = {"schema": BANK_SCHEMA, "shots": self.shots, "layers": list(self.layers), "feature": self.feature,
                "image_size": self.image_size, "stats": self.stats, "weights": list(self.weights),
                "n_patches": {str(k): v for k, v in self.n_patches.items()}, "bytes": self.nbytes,
                "dtype": str(next(iter(self.features.values())).dtype).replace("torch.", ""), "extra": self.meta}
        tensors = {f"layer_{k}": v.detach().cpu().contiguous() for k, v in self.features.items()}
        save_safetensors(tensors, path, metadata={"format": "pt", "visualad_references": json.dumps(meta)})
        logger.info("saved reference bank: %d shots, %d bytes (%.1f MB) -> %s", self.shots, self.nbytes,
                    self.nbytes / 2**20, path)
        return path

    @classmethod
    def load(cls, path: PathLike, device: Union[str, torch.device] = "cpu") -> "ReferenceBank":
        """Read a bank written by :meth:`save` onto ``device``."""
        from safetensors import safe_open

        from .errors import WeightsError
        from .weights.safe import load_safetensors

        tensors = load_safetensors(path)
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("visualad_references")
        if raw is None:
            raise WeightsError("not a visualad reference bank (no 'visualad_references' metadata)", path)
        meta = json.loads(raw)
        feature = meta["feature"]
        if str(meta.get("schema")) == "1" and feature == "backbone":
            feature = "patches"  # what schema 1 called "backbone": the features were taken from the model's forward
        elif str(meta.get("schema")) not in ("1", BANK_SCHEMA):
            raise WeightsError(f"reference bank schema {meta.get('schema')!r} is newer than this visualad "
                               f"understands ({BANK_SCHEMA}); upgrade visualad", path)
        features = {int(k.split("_", 1)[1]): v.to(device) for k, v in tensors.items()}
        bank = cls(features, feature=feature, shots=meta["shots"], image_size=meta.get("image_size"),
                   stats=meta["stats"], weights=tuple(meta.get("weights", DEFAULT_WEIGHTS)),
                   meta=meta.get("extra"))
        logger.info("loaded reference bank: %d shots, %d bytes from %s", bank.shots, bank.nbytes, path)
        return bank


# ------------------------------------------------------------------------------------------- building


def _self_distance_grid(feats: torch.Tensor, g: int) -> torch.Tensor:
    """K = 1 stand-in for leave-one-out: NN distance of each patch to the same image's patches outside its
    3x3 grid neighbourhood (a normal patch's distance to other normal texture). feats [N, C] -> [g, g]."""
    n = feats.shape[0]
    yy, xx = torch.meshgrid(torch.arange(g, device=feats.device), torch.arange(g, device=feats.device),
                            indexing="ij")
    yy, xx = yy.reshape(-1), xx.reshape(-1)
    out = torch.empty(n, device=feats.device)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for s in range(0, n, rows):
        sim = feats[s:s + rows] @ feats.t()
        near = ((yy[s:s + rows, None] - yy[None]).abs() <= 1) & ((xx[s:s + rows, None] - xx[None]).abs() <= 1)
        sim.masked_fill_(near, -2.0)
        out[s:s + rows] = sim.max(dim=1).values
    return (1.0 - out).clamp_(min=0.0).view(g, g)


def reference_stats(model: "VisualAD", per_image: List[List[torch.Tensor]], zero_grids: torch.Tensor,
                    layers: Sequence[int]) -> Dict[str, float]:
    """Mean and std over all pixels of the smoothed reference maps (zero-shot as is, few-shot leave-one-out).

    ``per_image``: per reference image, per layer [N, C] normalised features; ``zero_grids`` [K, g, g].
    """
    k = len(per_image)
    g = zero_grids.shape[-1]
    few = []
    for i in range(k):
        total = torch.zeros(g * g, device=zero_grids.device)
        for li in range(len(layers)):
            if k >= 2:
                others = torch.cat([per_image[j][li] for j in range(k) if j != i])
                total += nn_distance(per_image[i][li], others)
            else:
                total += _self_distance_grid(per_image[i][li], g).reshape(-1)
        few.append((total / len(layers)).view(g, g))
    few_grids = torch.stack(few)

    zs, fs = model.grid_to_map(zero_grids), model.grid_to_map(few_grids)
    eps = 1e-6
    return {"zs_mean": float(zs.mean()), "zs_std": max(float(zs.std()), eps),
            "fs_mean": float(fs.mean()), "fs_std": max(float(fs.std()), eps),
            "mode": "leave-one-image-out" if k >= 2 else "same-image-outside-3x3"}


def default_layers(model_layers: Sequence[int]) -> Tuple[int, ...]:
    """The layers whose NN distances form the few-shot map: all but the first and last chosen layer when
    there are at least three (3/6/9/12 -> 6/9), as PatchCore does: the first is too local, the last too
    semantic. Measured on ../shared/data (docs/few-shot.md): 6/9 beat 3/6/9/12, 3/6/9, 6 and 9 on average."""
    layers = tuple(model_layers)
    return layers[1:-1] if len(layers) >= 3 else layers


def build_bank(detector: "AnomalyDetector", items: Sequence[Any], batch_size: int = 8,
               max_patches: Optional[int] = None, seed: int = 0, feature: str = DEFAULT_FEATURE,
               layers: Optional[Sequence[int]] = None,
               weights: Tuple[float, float] = DEFAULT_WEIGHTS) -> ReferenceBank:
    """Patch features of normal reference images with the detector's own preprocessing and forward.

    ``max_patches``: optional greedy coreset subsampling to that many patches per layer (seeded); the fusion
    statistics are computed on the full set before subsampling. ``layers``: which of the model's layers
    feed the NN map (default :func:`default_layers`: the middle ones, measured best). ``feature``: one of
    :data:`FEATURES`; ``"backbone"`` (default) was measured best and is the same whatever the trained head.
    """
    from .data import images as imio

    model = detector.model
    size = model.config.image_size
    layers = tuple(default_layers(model.config.layers) if layers is None else layers)
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    bad = [l for l in layers if l not in model.config.layers]
    if not layers:
        raise ValueError(f"layers must name at least one of this model's layers {model.config.layers}")
    if bad:
        raise ValueError(f"layers {bad} are not layers of this model {model.config.layers}")
    if not items:
        raise ValueError("build_bank needs at least one reference image")
    per_image: List[List[torch.Tensor]] = []
    zero: List[torch.Tensor] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        arrays = [imio.resize_to_square(imio.load_image(it, name=None if isinstance(it, (str, Path))
                                                        else f"<reference {start + i}>").array, size)
                  for i, it in enumerate(chunk)]
        batch = detector._to_batch(arrays)
        with torch.inference_mode(), detector._autocast():
            out = model(batch)
            feats = layer_features(model, batch, out, layers, feature)
            zero.append(out.layer_maps.float().sum(dim=1))
        for i in range(len(chunk)):
            per_image.append([f[i].clone() for f in feats])
    with torch.inference_mode():
        stats = reference_stats(model, per_image, torch.cat(zero), layers)
        bank_feats: Dict[int, torch.Tensor] = {}
        for li, layer in enumerate(layers):
            full = torch.cat([p[li] for p in per_image])
            if max_patches is not None and max_patches < full.shape[0]:
                full = full[coreset(full, int(max_patches), seed=seed)]
            bank_feats[layer] = full.contiguous()
    bank = ReferenceBank(bank_feats, feature=feature, shots=len(items), image_size=size, stats=stats,
                         weights=weights, meta={"max_patches": max_patches, "seed": seed})
    logger.info("reference bank: %d images, layers %s, %s features, %d bytes (%.1f MB)", len(items), layers,
                feature, bank.nbytes, bank.nbytes / 2**20)
    return bank
