"""AnomalyDetector: the small user-facing API over a loaded VisualAD model.

It turns any image input into a batch on the model's device, runs one forward per batch, and maps the
results back to each image's original size; thresholds from calibration turn scores into labels.
"""
from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from .config import VisualADConfig
from .data import images as imio
from .errors import ConfigError, VisualADError
from .model import VisualAD, build_backbone
from .progress import progress_bar
from .result import AnomalyResult

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
REFERENCES_NAME = "references.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """"auto" = cuda, then mps, then cpu."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has bf16 matrix instructions (x86 AVX512-BF16 or AMX-BF16, read from /proc/cpuinfo).

    Without them PyTorch emulates bf16 on the CPU, which is slower than fp32, so "auto" keeps fp32 there.
    """
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name the API takes ("fp32", "bf16", "fp16")."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def resolve_dtype(dtype: Union[str, torch.dtype], device: torch.device) -> torch.dtype:
    """"auto" = bf16 on CUDA; on the CPU bf16 where it has native bf16 instructions, else fp32.

    bf16 on such a CPU ran the default model 1.5-1.9x faster and moved every metric on shared/data by at most
    0.005 (benchmarks/precision.py, docs/speed.md); ``dtype="fp32"`` gives the exact fp32 maps.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class AnomalyDetector:
    """A VisualAD model ready to predict: ``AnomalyDetector.from_pretrained()`` then ``predict(image)``."""

    def __init__(self, model: VisualAD, device: Union[str, torch.device] = "auto",
                 dtype: Union[str, torch.dtype] = "auto") -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model.to(self.device).eval()
        bb = model.backbone
        self._mean = torch.tensor(bb.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(bb.std, device=self.device).view(1, 3, 1, 1)
        self._warned_uncalibrated = False
        self._warned_dtype = False
        self.references: Optional[Any] = None  # visualad.fewshot.ReferenceBank when few-shot mode is on

    @property
    def config(self) -> VisualADConfig:
        return self.model.config

    def to(self, device: Union[str, torch.device], dtype: Union[str, torch.dtype] = "auto") -> "AnomalyDetector":
        """Move the model (and its normalisation constants) to another device; dtype follows the "auto" rule."""
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model.to(self.device)
        self._mean, self._std = self._mean.to(self.device), self._std.to(self.device)
        if self.references is not None:
            self.references = self.references.to(self.device)
        return self

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone: str = "dinov2-s-imgfocus", device: Union[str, torch.device] = "auto",
                      dtype: Union[str, torch.dtype] = "auto", pretrained_backbone: bool = True,
                      seed: Optional[int] = 111, compile: bool = False, **overrides: Any) -> "AnomalyDetector":
        """A fresh, untrained head on a named backbone: the starting point of finetune().

        ``pretrained_backbone=False`` keeps random backbone weights (tests, shape checks); ``seed`` makes
        the head's initialisation reproducible (the paper seeds 111 before building the model);
        ``compile=True``: see :meth:`compile`.
        """
        config = VisualADConfig(backbone=backbone, backbone_pretrained=pretrained_backbone, **overrides)
        det = cls._build(config, device, dtype, seed=seed)
        return det.compile() if compile else det

    @classmethod
    def _build(cls, config: VisualADConfig, device: Union[str, torch.device], dtype: Union[str, torch.dtype],
               seed: Optional[int] = None, model_dir: Optional[Path] = None, **fetch: Any) -> "AnomalyDetector":
        from .model.backbones import parse_backbone
        from .weights.sources import backbone_state_dict

        backbone = build_backbone(config.backbone, config.backbone_kwargs)
        if config.backbone_pretrained or model_dir is not None:
            backbone.load_weights(backbone_state_dict(config.backbone, model_dir=model_dir,
                                                      pretrained=config.backbone_pretrained, **fetch))
        config = config.resolved(backbone.depth, backbone.patch_size, parse_backbone(config.backbone).default_image_size)
        with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            model = VisualAD(config, backbone)
        return cls(model, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, name_or_path: Optional[PathLike] = None, device: Union[str, torch.device] = "auto",
                        dtype: Union[str, torch.dtype] = "auto", image_size: Optional[int] = None,
                        cache_dir: Optional[PathLike] = None, revision: Optional[str] = None,
                        local_files_only: Optional[bool] = None, token: Optional[str] = None,
                        compile: bool = False) -> "AnomalyDetector":
        """Load a model: None (the offline default), an alias, ``org/repo[@rev]`` or a local directory.

        ``compile=True`` compiles the model's forward (:meth:`compile`): opt-in for long-running servers.
        """
        from .weights.resolve import resolve_model_dir

        fetch = dict(cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        model_dir = resolve_model_dir(name_or_path, revision=revision, **fetch)
        det = cls.load_dir(model_dir, device=device, dtype=dtype, image_size=image_size, **fetch)
        return det.compile() if compile else det

    def compile(self, **options: Any) -> "AnomalyDetector":
        """Compile the model's forward with ``torch.compile`` (keyword arguments passed through).

        Opt-in: the first batch of each new shape pays the compilation (tens of seconds), later batches run
        the fused kernels. Defaults: ``dynamic=False`` and, on the CPU, inductor's weight freezing (prepacked
        bf16 weights: measured +10% over plain compile at 224 px, docs/speed.md). Needs a C++ compiler on the
        CPU. Returns the detector.
        """
        options.setdefault("dynamic", False)
        if self.device.type == "cpu":
            options.setdefault("options", {"freezing": True})
        self.model.compile(**options)
        return self

    @classmethod
    def load_dir(cls, model_dir: PathLike, device: Union[str, torch.device] = "auto",
                 dtype: Union[str, torch.dtype] = "auto", image_size: Optional[int] = None,
                 **fetch: Any) -> "AnomalyDetector":
        """Load a directory written by save_pretrained (strict: missing or unexpected keys are errors)."""
        from .weights.safe import load_safetensors

        model_dir = Path(model_dir)
        config = VisualADConfig.load(model_dir / CONFIG_NAME)
        state = load_safetensors(model_dir / WEIGHTS_NAME)
        if image_size is not None and image_size != config.image_size:
            config = _with_image_size(config, image_size)
        det = cls._build(config, device, dtype, model_dir=model_dir, **fetch)
        det.model.load_head_state_dict(state, source=str(model_dir / WEIGHTS_NAME))
        det.model.eval()
        if (model_dir / REFERENCES_NAME).is_file():
            from .fewshot import ReferenceBank

            det.references = ReferenceBank.load(model_dir / REFERENCES_NAME, det.device)
        return det

    def save_pretrained(self, save_directory: PathLike, model_card: bool = True) -> Path:
        """Write config.json + model.safetensors (only the trained parameters), each atomically."""
        from .weights.safe import save_safetensors
        from .weights.sources import BACKBONE_WEIGHTS_NAME

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.model.head_state_dict().items()}
        save_safetensors(state, out / WEIGHTS_NAME, metadata={"format": "pt", "visualad_schema": "1"})
        if not self.config.backbone_pretrained:  # random weights exist nowhere else
            bb = {k: v.detach().cpu().contiguous() for k, v in self.model.backbone.library_state_dict().items()}
            save_safetensors(bb, out / BACKBONE_WEIGHTS_NAME)
        if self.references is not None:
            self.references.save(out / REFERENCES_NAME)
        elif (out / REFERENCES_NAME).exists():
            (out / REFERENCES_NAME).unlink()  # a stale bank must not come back with this model
        self.config.save(out / CONFIG_NAME)
        if model_card:
            from .weights.card import write_model_card

            write_model_card(out, self.config, n_params=sum(v.numel() for v in state.values()))
        return out

    def push_to_hub(self, repo_id: str, token: Optional[str] = None, private: bool = False,
                    commit_message: str = "Upload VisualAD model") -> str:
        """Upload what save_pretrained writes (config, trained weights, model card) to a Hub repo; returns the
        commit id to pin in ``from_pretrained("org/repo@<commit>")``."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(folder_path=tmp, repo_id=repo_id, commit_message=commit_message)
        logger.info("pushed to %s at %s", repo_id, info.oid)
        return info.oid

    # --- prediction --------------------------------------------------------------------------------
    def _autocast(self) -> Any:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _to_batch(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Square-resized uint8 arrays -> one normalised float batch on the device (one transfer)."""
        x = torch.from_numpy(np.stack(arrays)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean) / self._std

    def forward_images(self, arrays: Sequence[np.ndarray]) -> "tuple[np.ndarray, np.ndarray]":
        """Model-size smoothed maps [B, S, S] and scores [B] (host float32) for square-resized uint8 arrays."""
        batch = self._to_batch(arrays)
        with torch.inference_mode(), self._autocast():
            if self.references is not None:
                maps, scores = self.references.predict(self.model, batch)
            else:
                maps, scores = self.model.predict_maps(batch)
        return maps.float().cpu().numpy(), scores.float().cpu().numpy()

    def predict(self, images: Any, batch_size: int = 8, threshold: Optional[float] = None,
                on_error: str = "raise", keep_image: bool = True, progress: bool = False,
                references: Optional[Any] = None) -> Union[AnomalyResult, List[AnomalyResult]]:
        """Score one image or a list of them (path, PIL image, NumPy array, tensor); same order as given.

        ``on_error="return"`` turns an unreadable input into a result with ``error`` set and goes on;
        ``"raise"`` raises the typed error. ``threshold`` overrides the calibrated image threshold.
        ``references``: normal images of the same product for this call only (few-shot mode).
        """
        single = not isinstance(images, (list, tuple)) and not (
            isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] > 1)
        items = imio.expand_inputs(images)
        saved = self.references
        try:
            if references is not None:
                self.set_references(references, batch_size=batch_size)
            results = list(self.predict_iter(items, batch_size, threshold, on_error, keep_image, progress))
        finally:
            self.references = saved
        return results[0] if single and len(results) == 1 else results

    def set_references(self, images: Any, batch_size: int = 8, **kwargs: Any) -> None:
        """Few-shot mode: keep patch features of normal reference images and fuse their nearest-neighbour
        map with the zero-shot map (see :mod:`visualad.fewshot`); an empty list turns it off."""
        from .fewshot import build_bank

        items = imio.expand_inputs(images)
        self.references = build_bank(self, items, batch_size=batch_size, **kwargs) if items else None

    def clear_references(self) -> None:
        self.references = None

    def predict_folder(self, folder: PathLike, batch_size: int = 8, threshold: Optional[float] = None,
                       on_error: str = "return", recursive: bool = True, keep_image: bool = False,
                       progress: bool = False) -> Iterator[AnomalyResult]:
        """Yield one result per image file under ``folder`` (sorted), a batch at a time."""
        files = list(imio.iter_image_files(folder, recursive=recursive))
        yield from self.predict_iter(files, batch_size, threshold, on_error, keep_image, progress)

    def predict_iter(self, items: Sequence[Any], batch_size: int = 8, threshold: Optional[float] = None,
                     on_error: str = "return", keep_image: bool = False, progress: bool = False,
                     at_model_size: bool = False) -> Iterator[AnomalyResult]:
        """Yield one result per item, in order, a batch at a time (the engine of predict and the CLI).

        ``at_model_size`` keeps the maps at the model's square input size (the papers' evaluation protocol)
        instead of resizing them to each image's original size.
        """
        if on_error not in ("raise", "return"):
            raise ValueError("on_error must be 'raise' or 'return'")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        size = self.config.image_size
        bar = progress_bar(len(items), progress, unit="img")

        def load(index: int) -> Any:
            item = items[index]
            try:
                img = imio.load_image(item, name=None if isinstance(item, (str, Path)) else f"<input {index}>")
                return img, imio.resize_to_square(img.array, size)
            except VisualADError as exc:
                if on_error == "raise":
                    raise
                return exc, None

        # Decoding and resizing run in threads, overlapped with the forward of the previous batch.
        workers = max(1, min(4, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = pool.map(load, range(len(items)))
            for start in range(0, len(items), batch_size):
                chunk = [next(pending) for _ in items[start:start + batch_size]]
                good = [i for i, (img, arr) in enumerate(chunk) if arr is not None]
                maps = scores = None
                if good:
                    maps, scores = self.forward_images([chunk[i][1] for i in good])
                pos = {i: j for j, i in enumerate(good)}
                for i, (img, _) in enumerate(chunk):
                    if i in pos:
                        yield self._result(img, maps[pos[i]], float(scores[pos[i]]), threshold, keep_image,
                                           at_model_size)
                    else:
                        yield AnomalyResult(pred_score=math.nan, anomaly_map=None,
                                            image_path=getattr(img, "path", None), error=str(img))
                bar.update(len(chunk))
        bar.close()

    def _result(self, img: imio.LoadedImage, model_map: np.ndarray, score: float, threshold: Optional[float],
                keep_image: bool, at_model_size: bool = False) -> AnomalyResult:
        h, w = img.array.shape[:2]
        amap = model_map if at_model_size else imio.resize_map(model_map, h, w)
        res = AnomalyResult(pred_score=score, anomaly_map=amap, image_path=img.path,
                            image=img.array if keep_image else None)
        self._apply_thresholds(res, threshold)
        return res

    def calibrate(self, normal_images: Any, anomalous_images: Any = None, masks: Any = None, method: str = "auto",
                  **kwargs: Any) -> Dict[str, Any]:
        """Set image and pixel thresholds (see :mod:`visualad.calibrate`); save_pretrained persists them.

        Normal images only: a high percentile of their scores ("percentile"); with anomalous images: the
        F1-max threshold ("f1"). Uses the current references when few-shot mode is on.
        """
        from .calibrate import calibrate

        return calibrate(self, imio.expand_inputs(normal_images),
                         None if anomalous_images is None else imio.expand_inputs(anomalous_images),
                         masks=masks, method=method, **kwargs)

    def finetune(self, aux: PathLike, **kwargs: Any) -> Dict[str, Any]:
        """Train the tokens, SCA and SAF on an auxiliary dataset; the backbone stays frozen.

        Keyword arguments: out_dir, resume, seed, progress, device, and any
        :class:`visualad.train.TrainConfig` field (epochs, batch_size, lr, synthesize, ...); see
        :func:`visualad.train.loop.finetune`. Returns the training report.
        """
        from .train.loop import finetune

        return finetune(self, aux, **kwargs)

    def evaluate(self, dataset_root: PathLike, out: Optional[PathLike] = None, **kwargs: Any) -> Dict[str, Any]:
        """Per-class and mean metrics on a labelled dataset (see :func:`visualad.evaluate.evaluate`)."""
        from .evaluate import evaluate

        return evaluate(self, dataset_root, out=out, **kwargs)

    def _apply_thresholds(self, res: AnomalyResult, threshold: Optional[float]) -> None:
        cfg = self.config
        thr = threshold if threshold is not None else cfg.image_threshold
        stats = cfg.score_stats or {}
        if "map_min" in stats and "map_max" in stats:
            res.map_range = (stats["map_min"], stats["map_max"])
        if thr is None:
            if not self._warned_uncalibrated:
                logger.info("no threshold: pred_label stays None; call detector.calibrate(normal_images) "
                            "or pass threshold=")
                self._warned_uncalibrated = True
            return
        calibrated_in = stats.get("dtype")
        if threshold is None and calibrated_in and calibrated_in != dtype_name(self.dtype) and not self._warned_dtype:
            logger.warning("thresholds were calibrated in %s but the model runs in %s: scores differ slightly "
                           "between precisions; calibrate again in this dtype or load with dtype=%r",
                           calibrated_in, dtype_name(self.dtype), calibrated_in)
            self._warned_dtype = True
        res.threshold = float(thr)
        res.pred_label = bool(res.pred_score >= thr)
        lo, hi = stats.get("min"), stats.get("max")
        span = (hi - lo) if lo is not None and hi is not None and hi > lo else 1.0
        res.normalized_score = float(min(1.0, max(0.0, (res.pred_score - thr) / span + 0.5)))
        pix = cfg.pixel_threshold if threshold is None else None
        if pix is not None and res.anomaly_map is not None:
            res.pixel_threshold = float(pix)
            res.pred_mask = res.anomaly_map >= pix


def _with_image_size(config: VisualADConfig, image_size: int) -> VisualADConfig:
    """Override the input size; resolved() refuses sizes whose patches exceed the trained SCA table."""
    import dataclasses

    return dataclasses.replace(config, image_size=int(image_size))
