"""The authors' released checkpoints (``CLIP.pth``, a ``torch.save`` pickle) turned into our model directories.

This module is the only place in visualad that reads a pickle, and it does so only with
``torch.load(weights_only=True)``, never as a fallback to a full unpickle. The checkpoint layout and the key
variants of the authors' writers are described in the method doc §6.5; by default the checkpoint's ``ln_post``
is *not* loaded, which reproduces the authors' test script (method doc §9.1).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..atomic import staging_dir
from ..errors import WeightsError
from ..layout import CONFIG_NAME, WEIGHTS_NAME
from ..types import PathLike
from .hub import sha256_file
from .safe import is_lfs_pointer, load_safetensors

logger = logging.getLogger(__name__)

LICENSE_NOTE = (
    "converted from the authors' checkpoint (github.com/7HHHHH/VisualAD); that repository has no LICENSE file "
    "(its README badge says MIT), so check the terms before redistributing these weights"
)

# per-layer SCA parameters: our name -> the authors' name(s), first match wins
_SCA_KEYS: Dict[str, Tuple[str, ...]] = {
    "anchor_queries": ("anchor_queries",),
    "pos_encoding": ("pos_encoding",),
    "q_proj.weight": ("q_proj.weight",),
    "k_proj.weight": ("k_proj.weight",),
    "v_proj.weight": ("v_proj.weight",),
    "q_norm.weight": ("q_norm.weight",),
    "q_norm.bias": ("q_norm.bias",),
    "k_norm.weight": ("k_norm.weight",),
    "k_norm.bias": ("k_norm.bias",),
    "gate.weight": ("gate.0.weight", "gate.weight"),  # the authors' gate is Sequential(Linear, Sigmoid)
    "gate.bias": ("gate.0.bias", "gate.bias"),
    "out_proj.weight": ("out_proj.weight",),
    "out_proj.bias": ("out_proj.bias",),
    "res_scale": ("res_scale",),
}
_SAF_KEYS = ("mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias")


# --- reading ---------------------------------------------------------------------------------------------
def read_official_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Load the authors' ``.pth`` with ``torch.load(weights_only=True)`` on the CPU.

    A Git LFS pointer (a clone without git-lfs) is refused with an explanation; anything the restricted
    unpickler refuses is a WeightsError naming the file, never a retry with a full unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError("checkpoint file not found", path)
    if is_lfs_pointer(path):
        raise WeightsError(
            "this is a Git LFS pointer, not the checkpoint: the authors' .pth files are Git LFS objects that a "
            "plain clone or snapshot does not contain; fetch the real file (git lfs pull, or "
            "`visualad download clip-l`)",
            path,
        )
    logger.warning("reading a pickle checkpoint with torch.load(weights_only=True): %s", path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises many types; none of them may escape unexplained
        first_line = (str(exc).splitlines() or [""])[0]
        raise WeightsError(
            f"cannot read this checkpoint safely ({type(exc).__name__}: {first_line}); "
            "visualad only reads plain tensor checkpoints with torch.load(weights_only=True)",
            path,
        ) from None
    if not isinstance(ckpt, Mapping):
        raise WeightsError(f"expected a dict checkpoint, found {type(ckpt).__name__}", path)
    return dict(ckpt)


# --- mapping ---------------------------------------------------------------------------------------------
def _strip(key: str, prefixes: Tuple[str, ...] = ("module.",)) -> str:
    """Drop DataParallel's ``module.`` (possibly repeated) and the given prefixes from a key."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _layer_name(key: Any) -> Optional[str]:
    """``layer_6``, ``6`` or 6 -> ``layer_6``; anything else -> None."""
    s = str(key)
    s = s[len("layer_"):] if s.startswith("layer_") else s
    return f"layer_{int(s)}" if s.isdigit() else None


def _flat_layers(obj: Any) -> Dict[str, Dict[str, Any]]:
    """A per-layer state, nested (``{"layer_6": {"mlp.0.weight": ...}}``) or flat (``"layer_6.mlp.0.weight"``)."""
    out: Dict[str, Dict[str, Any]] = {}
    if not isinstance(obj, Mapping):
        return out
    for raw_key, value in obj.items():
        key = _strip(str(raw_key), ("module.", "layer_attentions.", "layer_transforms.", "transforms."))
        if isinstance(value, Mapping):
            layer = _layer_name(key)
            if layer is not None:
                inner = out.setdefault(layer, {})
                for k, v in value.items():
                    inner[_strip(str(k))] = v
            continue
        head, sep, rest = key.partition(".")
        layer = _layer_name(head) if sep else None
        if layer is not None:
            out.setdefault(layer, {})[_strip(rest)] = value
    return out


def _tensor(value: Any) -> torch.Tensor:
    return value.detach().to("cpu", torch.float32).contiguous()


def official_to_head_state(ckpt: Mapping[str, Any],
                           load_final_norm: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Map an official checkpoint onto our head names; also return the config fields it implies.

    Every writer variant of method doc §6.5 is accepted (unknown keys are ignored, ``module.`` and
    ``layer_attentions.`` prefixes are stripped). Missing tensors are a WeightsError that names them.
    With ``load_final_norm=False`` (default, the authors' test script) the checkpoint's ``ln_post`` is
    not loaded and ``train_final_norm=False`` makes the model use the backbone's own final norm.
    """
    ckpt = {_strip(str(k)): v for k, v in ckpt.items()}
    transforms = _flat_layers(ckpt.get("layer_transforms"))
    cross = _flat_layers(ckpt.get("cross_attn"))
    missing: List[str] = []

    features = ckpt.get("features_list")
    if features is None:  # no writer omits it, but the tensors say which layers there are
        features = sorted({int(k[len("layer_"):]) for k in transforms} | {int(k[len("layer_"):]) for k in cross})
        if features:
            logger.warning("checkpoint has no features_list; using the layers of its tensors: %s", features)
    try:
        layers = tuple(int(x) for x in features)
    except (TypeError, ValueError):
        raise WeightsError(f"checkpoint features_list is not a list of layer numbers: {features!r}") from None
    if not layers:
        missing.append("features_list")
    transform_type = ckpt.get("transform_type", "mlp")
    if transform_type != "mlp":
        raise WeightsError(f"checkpoint transform_type {transform_type!r} is not supported (only 'mlp', the "
                           "one the authors use)")

    state: Dict[str, torch.Tensor] = {}

    def take(src: Mapping[str, Any], names: Tuple[str, ...], label: str, dest: str) -> None:
        for n in names:
            v = src.get(n)
            if isinstance(v, torch.Tensor):
                state[dest] = _tensor(v)
                return
        missing.append(label)

    take(ckpt, ("anomaly_token",), "anomaly_token", "encoder.anomaly_token")
    take(ckpt, ("normal_token",), "normal_token", "encoder.normal_token")
    if load_final_norm:
        take(ckpt, ("ln_post_weight", "ln_post.weight"), "ln_post_weight", "final_norm.weight")
        take(ckpt, ("ln_post_bias", "ln_post.bias"), "ln_post_bias", "final_norm.bias")
    for layer in layers:
        key = f"layer_{layer}"
        sca = cross.get(key, {})
        for ours, theirs in _SCA_KEYS.items():
            take(sca, theirs, f"cross_attn['layer_attentions.{key}.{theirs[0]}']", f"sca.{key}.{ours}")
        saf = transforms.get(key, {})
        for name in _SAF_KEYS:
            take(saf, (name,), f"layer_transforms['{key}']['{name}']", f"saf.{key}.{name}")
    if missing:
        raise WeightsError(f"the checkpoint lacks {len(missing)} required entries: {', '.join(missing)}")

    overrides = _derive_config(ckpt, state, layers, load_final_norm)
    ignored = sorted(set(ckpt) - _KNOWN_TOP)
    if ignored:
        logger.info("ignoring checkpoint entries visualad does not use: %s", ignored)
    return state, overrides


_KNOWN_TOP = {"anomaly_token", "normal_token", "ln_post_weight", "ln_post_bias", "features_list", "image_size",
              "epoch", "backbone", "layer_transforms", "transform_type", "cross_attn", "cross_attn_config"}


def _derive_config(ckpt: Mapping[str, Any], state: Mapping[str, torch.Tensor], layers: Tuple[int, ...],
                   load_final_norm: bool) -> Dict[str, Any]:
    """Config fields from the checkpoint's metadata and tensor shapes; inconsistent ones are errors."""
    d = state["encoder.anomaly_token"].shape[-1]
    first = f"layer_{layers[0]}"
    for name in ("encoder.normal_token", *[k for k in state if k.endswith(("anchor_queries", "pos_encoding"))]):
        if state[name].shape[-1] != d:
            raise WeightsError(f"checkpoint tensor {name} has width {state[name].shape[-1]}, the tokens have {d}")
    anchors = state[f"sca.{first}.anchor_queries"]
    pos = state[f"sca.{first}.pos_encoding"]
    hidden = state[f"saf.{first}.mlp.0.weight"].shape[0]
    if anchors.dim() != 2 or pos.dim() != 3:
        raise WeightsError(f"unexpected SCA shapes: anchor_queries {tuple(anchors.shape)}, "
                           f"pos_encoding {tuple(pos.shape)}")
    ca_cfg = ckpt.get("cross_attn_config") if isinstance(ckpt.get("cross_attn_config"), Mapping) else {}
    num_anchors = int(anchors.shape[0])
    if ca_cfg.get("num_anchors") is not None and int(ca_cfg["num_anchors"]) != num_anchors:
        raise WeightsError(f"cross_attn_config says num_anchors={ca_cfg['num_anchors']} but anchor_queries has "
                           f"{num_anchors} rows")
    overrides: Dict[str, Any] = {
        "layers": layers,
        "num_anchors": num_anchors,
        "sca_max_patches": int(pos.shape[1]),
        "saf_hidden_ratio": hidden / d,
        "train_final_norm": bool(load_final_norm),
    }
    if ckpt.get("image_size") is not None:
        overrides["image_size"] = int(ckpt["image_size"])
    if ca_cfg.get("dropout") is not None:
        overrides["sca_dropout"] = float(ca_cfg["dropout"])
    if ca_cfg.get("res_scale_init") is not None:
        overrides["sca_res_scale_init"] = float(ca_cfg["res_scale_init"])
    if int(round(d * overrides["saf_hidden_ratio"])) != hidden:  # float round trip must give the same size
        raise WeightsError(f"SAF hidden size {hidden} cannot be expressed for width {d}")
    return overrides


# --- conversion ------------------------------------------------------------------------------------------
def convert_official(checkpoint: PathLike, out_dir: PathLike, backbone: str = "clip-l",
                     backbone_weights: Optional[PathLike] = None, load_final_norm: bool = False,
                     **config_overrides: Any) -> Path:
    """Convert an official ``.pth`` into a model directory that ``AnomalyDetector.from_pretrained`` loads.

    ``backbone_weights`` (a safetensors file in the backbone library's naming) is checked by loading it
    and then stored as ``backbone.safetensors``, so the directory works without any network.
    ``config_overrides`` are VisualADConfig fields applied over those read from the checkpoint (for
    instance ``backbone_kwargs``, ``image_size`` or ``metadata``); ``layers`` must agree with it.
    The directory appears complete or not at all (built aside, then renamed).
    """
    from .._version import __version__
    from ..config import VisualADConfig
    from ..store import build_model, publish, save_model

    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir)
    ckpt = read_official_checkpoint(checkpoint)
    state, overrides = official_to_head_state(ckpt, load_final_norm=load_final_norm)
    config_overrides = {k: v for k, v in config_overrides.items() if v is not None}
    extra_meta = dict(config_overrides.pop("metadata", None) or {})
    if "layers" in config_overrides:
        wanted = tuple(int(x) for x in config_overrides["layers"])
        if wanted != overrides["layers"]:
            raise WeightsError(f"the checkpoint was trained on layers {list(overrides['layers'])}, "
                               f"not {list(wanted)}", checkpoint)
    config_overrides.pop("train_final_norm", None)  # decided by load_final_norm
    config_overrides.pop("backbone_pretrained", None)  # always the pretrained backbone (see below)
    asked_size = config_overrides.get("image_size")
    if asked_size is not None and overrides.get("image_size") not in (None, asked_size):
        logger.warning("checkpoint was trained at %s px; converting for %s px as asked", overrides["image_size"],
                       config_overrides["image_size"])
    overrides.update(config_overrides)
    overrides["metadata"] = {
        "source": "official VisualAD checkpoint",
        "source_file": checkpoint.name,
        "source_sha256": sha256_file(checkpoint),
        "source_backbone": ckpt.get("backbone"),
        "source_epoch": ckpt.get("epoch"),
        "source_image_size": ckpt.get("image_size"),
        "backbone": backbone,
        "ln_post": ("checkpoint: the trained ln_post saved in the checkpoint" if load_final_norm else
                    "pretrained: the backbone's own final norm, as the authors' test script does"),
        "license": LICENSE_NOTE,
        "converted_by": f"visualad {__version__}",
        **extra_meta,
    }

    model = build_model(VisualADConfig(backbone=backbone, backbone_pretrained=False, **overrides), seed=111)
    model.load_head_state_dict(state, source=str(checkpoint))
    # The head runs on the pretrained backbone: the directory must never carry the random weights it was
    # built with, only the real ones when given (otherwise they are fetched from their pin at load time).
    model.config = dataclasses.replace(model.config, backbone_pretrained=True)
    if backbone_weights is not None:
        sd = load_safetensors(backbone_weights)
        model.backbone.load_weights(sd)  # strict: names and shapes must match the built backbone
        del sd

    tmp = staging_dir(out_dir)
    try:
        save_model(tmp, model, backbone=backbone_weights is not None)
        publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s -> %s (ln_post from %s)", checkpoint, out_dir,
                "the checkpoint" if load_final_norm else "the backbone")
    return out_dir


def official_model_dir(name: str, entry: Mapping[str, Any], cache_dir: Optional[PathLike] = None,
                       local_files_only: Optional[bool] = None) -> Path:
    """The converted directory of a manifest model whose head is an official checkpoint.

    Cached as ``<cache>/converted/<name>-<sha256[:12]>``; on a miss the pinned checkpoint is downloaded
    (verified by sha256 and size), converted with the entry's config, and renamed into place. The
    backbone is not stored there: it is fetched from its own pin when the model is loaded.
    """
    from ..paths import cache_dir as default_cache_dir

    head = entry.get("head") or {}
    sha = head.get("sha256")
    if not head.get("url") or not sha:
        raise WeightsError(f"model {name!r}: the manifest entry of an official checkpoint needs url and sha256")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / "converted" / f"{name}-{sha[:12]}"
    if (target / WEIGHTS_NAME).is_file() and (target / CONFIG_NAME).is_file():
        return target

    from .hub import url_download

    ckpt_path = url_download(head["url"], sha256=sha, size=head.get("size"), filename="CLIP.pth",
                             cache_dir=cache_dir, local_files_only=local_files_only,
                             fetch_hint=f"visualad download {name}")
    cfg = dict(entry.get("config") or {})
    backbone = cfg.pop("backbone", None) or entry.get("backbone") or "clip-l"
    load_final_norm = bool(cfg.pop("train_final_norm", False))
    meta = dict(cfg.pop("metadata", None) or {})
    meta.update({k: v for k, v in {
        "model": name,
        "source_url": head.get("url"),
        "source_repo": head.get("repo"),
        "source_commit": head.get("commit"),
        "source_path": head.get("path"),
        "training_data": entry.get("training_data"),
        "license": entry.get("license"),
    }.items() if v is not None})
    logger.info("converting the authors' checkpoint for %s (first use; cached in %s)", name, target)
    return convert_official(ckpt_path, target, backbone=backbone, load_final_norm=load_final_norm,
                            metadata=meta, **cfg)


__all__ = ["convert_official", "official_model_dir", "official_to_head_state", "read_official_checkpoint"]
