"""The reference bank of references mode (torch): the patch features of a few normal images of the product.

The bank holds, per feature block, the reference patches layer-normed as the nearest-neighbour core takes them
(:mod:`visualad.modes.knn`, which derives each aggregation size r when it scores); a test image is scored by the
same core, the mean over blocks and r, upsampled and blurred like the head's map, and its maximum is the image
score. Measured on shared/data (docs/batch-zero-shot.md, docs/modes.md): references alone beat the old fusion
with the trained head. Banks of schema 3 (unit rows per block and r) are scored as they are, and those of schema
2 (the 0.1 few-shot mode) as references alone over their layers.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..data.images import image_digest  # noqa: F401 - part of this module's API
from ..errors import ConfigError, WeightsError
from ..types import PathLike
from . import knn

logger = logging.getLogger(__name__)

BANK_SCHEMA = "4"  # 3: unit rows per (block, r); 1 and 2: the fused few-shot bank (per-layer unit features)
#: what a bank's rows are: layer-normed per block (schema 4), or unit rows per (block, r) of schema 3, made by
#: LNAMD or (from schema 2) by plain normalisation; these are scored as they are, each key with r = 1
LAYERNORM, LNAMD, UNIT = "layernorm", "lnamd", "unit"
MAX_R = 99


class ReferenceBank:
    """Reference patches [K * P, C] per block (``rows`` = "layernorm"; the core derives each of ``rs``) or per
    (block, r) (``rows`` = "lnamd" or "unit": banks of schema 3); ``digests`` name the K images in order."""

    def __init__(self, features: Dict[Any, torch.Tensor], *, image_size: int, patches: int,
                 rs: Sequence[int] = knn.DEFAULT_R, digests: Sequence[str] = (), rows: str = LAYERNORM,
                 meta: Optional[Dict[str, Any]] = None) -> None:
        if not features:
            raise ConfigError("a reference bank needs at least one feature block")
        if rows not in (LAYERNORM, LNAMD, UNIT):
            raise ConfigError(f"reference bank rows must be {LAYERNORM!r}, {LNAMD!r} or {UNIT!r}, got {rows!r}")
        self.rows = rows
        if rows == LAYERNORM:
            self.features: Dict[Any, torch.Tensor] = {int(b): v for b, v in features.items()}
            self.blocks = tuple(sorted(self.features))
            self.rs = tuple(int(r) for r in rs)
        else:
            self.features = {(int(b), int(r)): v for (b, r), v in features.items()}
            self.blocks = tuple(sorted({b for b, _ in self.features}))
            self.rs = (1,)  # each key's rows are aggregated already
        self.image_size = int(image_size)
        self.patches = int(patches)
        self.digests = list(digests)
        self.meta = dict(meta or {})
        self._fingerprint: Optional[str] = None

    @property
    def shots(self) -> int:
        return next(iter(self.features.values())).shape[0] // self.patches

    @property
    def nbytes(self) -> int:
        return int(sum(v.numel() * v.element_size() for v in self.features.values()))

    @property
    def fingerprint(self) -> str:
        """A short digest of the bank's content: thresholds calibrated on one bank are not applied to another.
        Computed once: a bank's features never change after it is built."""
        if self._fingerprint is None:
            h = hashlib.sha1()
            for key in sorted(self.features):
                h.update(repr(key).encode())
                h.update(self.features[key].detach().cpu().float().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def to(self, device: torch.device) -> "ReferenceBank":
        self.features = {k: v.to(device) for k, v in self.features.items()}
        return self

    def __repr__(self) -> str:
        return (f"ReferenceBank(shots={self.shots}, blocks={self.blocks}, r={self.rs}, rows={self.rows!r}, "
                f"image_size={self.image_size}, bytes={self.nbytes})")

    # --- features ----------------------------------------------------------------------------------
    def query(self, block_features: Sequence[torch.Tensor]) -> Dict[Any, torch.Tensor]:
        """Backbone features of a batch, one [B, N, C] per bank block -> rows per key, as the bank's."""
        out: Dict[Any, torch.Tensor] = {}
        for block, f in zip(self.blocks, block_features):
            if self.rows == LAYERNORM:
                out[block] = knn.layer_normed(f)
                continue
            for b, r in self.features:
                if b == block:
                    out[(b, r)] = knn.lnamd(f, r) if self.rows == LNAMD else F.normalize(f.float(), dim=-1, eps=1e-8)
        return out

    def grid(self, queries: Dict[Any, torch.Tensor], exclude: Optional[int] = None,
             half_candidates: bool = False) -> torch.Tensor:
        """Mean nearest distance over keys and r on the patch grid [B, g, g] (:func:`references.bank_grid`)."""
        from .references import bank_grid

        total = bank_grid(knn, self.features, self.shots, queries, self.rs, exclude, half_candidates)
        g = knn.grid_side(total.shape[1])
        return total.view(-1, g, g)

    # --- persistence -------------------------------------------------------------------------------
    def save(self, path: PathLike) -> Path:
        """One safetensors file (atomic): a tensor per block (per (block, r) for a bank of schema 3, which is
        written back as it was read) plus JSON metadata."""
        from ..weights.safe import save_safetensors

        meta = {"schema": BANK_SCHEMA, "shots": self.shots, "blocks": list(self.blocks), "r": list(self.rs),
                "image_size": self.image_size, "patches": self.patches, "digests": self.digests,
                "bytes": self.nbytes, "extra": self.meta}
        if self.rows == LAYERNORM:
            tensors = {f"block_{b}": v.detach().cpu().contiguous() for b, v in self.features.items()}
        else:
            meta.update(schema="3", r=sorted({r for _, r in self.features}), layernorm=self.rows == LNAMD)
            tensors = {f"block_{b}_r_{r}": v.detach().cpu().contiguous() for (b, r), v in self.features.items()}
        save_safetensors(tensors, path, metadata={"format": "pt", "visualad_references": json.dumps(meta)})
        logger.info("saved reference bank: %d shots, %.1f MB -> %s", self.shots, self.nbytes / 2**20, path)
        return Path(path)

    @classmethod
    def load(cls, path: PathLike) -> "ReferenceBank":
        """Read a bank written by :meth:`save` (schemas 4 and 3) or by visualad 0.1 (schemas 1 and 2), on the CPU."""
        from safetensors import safe_open

        from ..weights.safe import load_safetensors

        tensors = load_safetensors(path)
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("visualad_references")
        if raw is None:
            raise WeightsError("not a visualad reference bank (no 'visualad_references' metadata)", path)
        try:
            meta = json.loads(raw)
            schema = str(meta.get("schema"))
            if schema in (BANK_SCHEMA, "3"):
                feats = {_parse_key(k): v for k, v in tensors.items()}
                rows = LAYERNORM if schema == BANK_SCHEMA else LNAMD if meta.get("layernorm", True) else UNIT
                bank = cls(feats, image_size=meta["image_size"], patches=meta["patches"], rs=meta["r"],
                           digests=meta.get("digests", ()), rows=rows, meta=meta.get("extra"))
            elif schema in ("1", "2"):
                bank = _read_legacy(meta, tensors, path)
            else:
                raise WeightsError(f"reference bank schema {schema!r} is newer than this visualad understands "
                                   f"({BANK_SCHEMA}); upgrade visualad", path)
        except (KeyError, TypeError, ValueError, IndexError, json.JSONDecodeError) as exc:
            raise WeightsError(f"malformed reference bank: {exc!r}", path) from None
        bank.check(path)
        return bank

    def check(self, source: Any = None, depth: Optional[int] = None, width: Optional[int] = None) -> None:
        """Refuse a bank that would fail or mislead later: non-float or non-finite values, ragged shapes, and
        (given the backbone's ``depth`` and ``width``) blocks or a feature width the backbone does not have."""
        shapes = set()
        for key, v in self.features.items():
            if not v.is_floating_point() or v.ndim != 2:
                raise WeightsError(f"malformed reference bank: {key} is {v.dtype} of shape {tuple(v.shape)}, "
                                   "expected float rows [images * patches, channels]", source)
            if not bool(torch.isfinite(v).all()):
                raise WeightsError(f"malformed reference bank: {key} holds NaN or infinite values", source)
            shapes.add(tuple(v.shape))
        if len(shapes) != 1 or self.patches < 1 or next(iter(shapes))[0] % self.patches:
            raise WeightsError(f"malformed reference bank: shapes {sorted(shapes)} are not the same whole number "
                               f"of images of {self.patches} patches", source)
        if not self.rs or not all(1 <= r <= MAX_R and r % 2 for r in self.rs):
            raise WeightsError(f"malformed reference bank: r {list(self.rs)} are not odd sizes in 1..{MAX_R}", source)
        if max(self.rs) > 1:
            try:
                knn.grid_side(self.patches)
            except ValueError as exc:
                raise WeightsError(f"malformed reference bank: {exc}", source) from None
        if depth is not None and not all(1 <= b <= depth for b in self.blocks):
            raise WeightsError(f"reference bank blocks {self.blocks} do not exist in a {depth}-block backbone",
                               source)
        if width is not None and next(iter(shapes))[1] != width:
            raise WeightsError(f"reference bank features are {next(iter(shapes))[1]} wide, the backbone's are "
                               f"{width}: it was built with another backbone", source)


def _parse_key(key: str) -> Any:
    """"block_7" (schema 4) -> 7; "block_7_r_3" (schema 3) -> (7, 3)."""
    parts = key.split("_")
    if len(parts) == 2 and parts[0] == "block":
        return int(parts[1])
    _, block, _, r = parts
    return int(block), int(r)


def _read_legacy(meta: Dict[str, Any], tensors: Dict[str, torch.Tensor], path: PathLike) -> ReferenceBank:
    feature = meta["feature"]
    if str(meta.get("schema")) == "1" or feature != "backbone":
        raise WeightsError(f"this reference bank (schema {meta.get('schema')}, {feature!r} features) holds "
                           "features of the old fused mode that depend on its head; set the references again "
                           "from the images (det.set_references(images); det.save_pretrained(dir))", path)
    feats = {(int(k.split("_", 1)[1]), 1): v for k, v in tensors.items()}
    size = int(meta["image_size"])
    first = next(iter(feats.values()))
    patches = first.shape[0] // int(meta["shots"])
    logger.warning("%s: a reference bank of visualad 0.1 (schema 2); scored as references alone over its "
                   "layers %s (the fusion with the head is gone); set the references again to use the new "
                   "features", path, sorted(b for b, _ in feats))
    return ReferenceBank(feats, image_size=size, patches=patches, rows=UNIT, meta={"legacy_schema": 2})


def build_bank(block_features: Iterable[Tuple[str, List[torch.Tensor]]], blocks: Sequence[int],
               rs: Sequence[int], image_size: int, meta: Optional[Dict[str, Any]] = None) -> ReferenceBank:
    """A bank from (digest, per-block [1, N, C] backbone features) of each reference image: layer-normed rows
    per block, scored at each of ``rs``."""
    parts: Dict[int, List[torch.Tensor]] = {b: [] for b in blocks}
    digests: List[str] = []
    patches = 0
    for digest, feats in block_features:
        digests.append(digest)
        for b, f in zip(blocks, feats):
            patches = f.shape[1]
            parts[b].append(knn.layer_normed(f)[0])
    if not digests:
        raise ConfigError("references mode needs at least one reference image")
    feats = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    return ReferenceBank(feats, image_size=image_size, patches=patches, rs=rs, digests=digests, meta=meta)
