"""AnomalyDetector: the facade users call. It holds an Engine (model, device, dtype), the current reference
bank and the thresholds, picks a scoring mode per call and turns engine output into AnomalyResults.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

import torch

from .config import VisualADConfig
from .data import images as imio
from .data.files import iter_image_files
from .model import VisualAD
from .modes.batch import BatchMode
from .modes.choice import ModeChooser
from .modes.head import HeadMode
from .modes.references import ReferenceBank, ReferencesMode
from .progress import progress_bar
from .result import AnomalyResult
from .runtime.engine import Engine
from .runtime.postprocess import Thresholds, finish
from .runtime.precision import dtype_name
from .types import PathLike

logger = logging.getLogger(__name__)



class AnomalyDetector:
    """A VisualAD model ready to predict: ``AnomalyDetector.from_pretrained()`` then ``predict(image)``."""

    def __init__(self, model: VisualAD, device: Union[str, torch.device] = "auto",
                 dtype: Union[str, torch.dtype] = "auto", references: Optional[ReferenceBank] = None) -> None:
        self.engine = Engine(model, device=device, dtype=dtype)
        self.references = references.to(self.engine.device) if references is not None else None
        self._thresholds = Thresholds()
        self._chooser = ModeChooser()

    # --- what it is ----------------------------------------------------------------------------------
    @property
    def model(self) -> VisualAD:
        return self.engine.model

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    @property
    def config(self) -> VisualADConfig:
        return self.model.config

    def __repr__(self) -> str:
        cfg = self.config
        name = cfg.metadata.get("name") or cfg.metadata.get("model") or cfg.backbone
        mode = "references" if self.references is not None else "auto"
        calibrated = (cfg.score_stats or {}).get("mode", "head") if cfg.image_threshold is not None else None
        return (f"AnomalyDetector(model={name!r}, backbone={cfg.backbone!r}, image_size={cfg.image_size}, "
                f"mode={mode!r}, device={str(self.device)!r}, dtype={dtype_name(self.dtype)!r}, "
                f"calibrated={calibrated!r})")

    def to(self, device: Union[str, torch.device], dtype: Union[str, torch.dtype] = "auto") -> "AnomalyDetector":
        """Move the model (its normalisation buffers too) and the references; dtype follows the "auto" rule."""
        self.engine.to(device, dtype)
        if self.references is not None:
            self.references.to(self.engine.device)
        return self

    # --- construction --------------------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone: str = "dinov2-s-imgfocus", device: Union[str, torch.device] = "auto",
                      dtype: Union[str, torch.dtype] = "auto", pretrained_backbone: bool = True,
                      seed: Optional[int] = 111, compile: bool = False, cache_dir: Optional[PathLike] = None,
                      local_files_only: Optional[bool] = None, token: Optional[str] = None,
                      **overrides: Any) -> "AnomalyDetector":
        """A backbone with a fresh, untrained head: a detector in references and batch mode as it is, and the
        starting point of finetune() for head mode.

        ``pretrained_backbone=False`` keeps random backbone weights (tests, shape checks); ``seed`` makes
        the head's initialisation reproducible (the paper seeds 111 before building the model);
        ``compile=True``: see :meth:`compile`. Pinned backbone weights are fetched once, then cached.
        """
        from .store import build_model

        config = VisualADConfig(backbone=backbone, backbone_pretrained=pretrained_backbone, head_trained=False,
                                **overrides)
        model = build_model(config, seed=seed, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        det = cls(model, device=device, dtype=dtype)
        return det.compile() if compile else det

    @classmethod
    def from_pretrained(cls, name_or_path: Optional[PathLike] = None, device: Union[str, torch.device] = "auto",
                        dtype: Union[str, torch.dtype] = "auto", image_size: Optional[int] = None,
                        cache_dir: Optional[PathLike] = None, revision: Optional[str] = None,
                        local_files_only: Optional[bool] = None, token: Optional[str] = None,
                        compile: bool = False) -> "AnomalyDetector":
        """Load a model: None (the offline default), an alias, ``org/repo[@rev]`` or a local directory.

        An alias with no published head (``"dinov2-l"``) is its pinned backbone alone: it works in references
        and batch mode. ``compile=True`` compiles the model's forward (:meth:`compile`): opt-in for servers.
        """
        from .weights.resolve import headless_backbone, resolve_model_dir

        fetch = dict(cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        backbone = headless_backbone(name_or_path)
        if backbone is not None:
            logger.info("%s has no trained head: the backbone %s alone, for references and batch mode",
                        name_or_path, backbone)
            overrides = {} if image_size is None else {"image_size": int(image_size)}
            return cls.from_backbone(backbone, device=device, dtype=dtype, compile=compile, **fetch, **overrides)
        model_dir = resolve_model_dir(name_or_path, revision=revision, **fetch)
        det = cls.load_dir(model_dir, device=device, dtype=dtype, image_size=image_size, **fetch)
        return det.compile() if compile else det

    @classmethod
    def load_dir(cls, model_dir: PathLike, device: Union[str, torch.device] = "auto",
                 dtype: Union[str, torch.dtype] = "auto", image_size: Optional[int] = None,
                 **fetch: Any) -> "AnomalyDetector":
        """Load a directory written by save_pretrained (strict: missing or unexpected keys are errors)."""
        from .store import load_model

        model, bank = load_model(model_dir, image_size=image_size, **fetch)
        return cls(model, device=device, dtype=dtype, references=bank)

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

    def export_onnx(self, out_dir: PathLike) -> Path:
        """Write an ONNX export that :class:`visualad.onnx.OnnxDetector` runs without torch (head, features
        and map graphs, config, thresholds, references); see :mod:`visualad.onnx.export`."""
        from .onnx.export import export_onnx

        return export_onnx(self, out_dir)

    def save_pretrained(self, save_directory: PathLike, model_card: bool = True) -> Path:
        """Write config.json + model.safetensors (only the trained parameters) and the references, atomically."""
        from .store import save_model

        return save_model(save_directory, self.model, self.references, model_card=model_card)

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

    # --- modes ---------------------------------------------------------------------------------------
    def scoring_mode(self, mode: Any = "auto", n_images: Optional[int] = None, compare_with: int = 64,
                     seed: int = 0) -> Any:
        """The scorer a call uses (the rule: :class:`visualad.modes.choice.ModeChooser`); a scorer object
        (what this returns) is used as it is."""
        if not isinstance(mode, str):
            return mode
        name = self._chooser.choose(mode, self.references is not None, n_images, self.config.head_trained)
        if name == "references":
            return ReferencesMode(self.references)
        if name == "batch":
            return BatchMode(compare_with=compare_with, seed=seed)
        return HeadMode()

    def set_references(self, images: Any, batch_size: int = 8, **kwargs: Any) -> None:
        """References mode: keep the patch features of normal images of the product (an empty list turns it
        off); ``save_pretrained`` persists them. Keyword arguments: ``blocks``, ``rs`` (see
        :func:`visualad.tasks.references.build_references`)."""
        from .tasks.references import build_references

        items = _expand(images)
        self.references = build_references(self.engine, items, batch_size=batch_size, **kwargs) if items else None

    def clear_references(self) -> None:
        self.references = None

    # --- prediction ----------------------------------------------------------------------------------
    def predict(self, images: Any, batch_size: int = 8, threshold: Optional[float] = None,
                on_error: str = "raise", keep_image: bool = True, progress: bool = False,
                references: Optional[Any] = None, mode: str = "auto", compare_with: int = 64,
                seed: int = 0) -> Union[AnomalyResult, List[AnomalyResult]]:
        """Score one image, a list of them or a folder (path, PIL image, NumPy array, tensor); same order.

        ``mode``: "auto" | "head" | "references" | "batch" (see :meth:`scoring_mode`); ``res.mode`` says which
        ran. Batch mode scores the images given together against each other, each against at most
        ``compare_with`` others (seeded). ``on_error="return"`` turns an unreadable input into a result with
        ``error`` set; ``threshold`` overrides the calibrated image threshold; ``references``: normal images
        for this call only.
        """
        single = not isinstance(images, (list, tuple)) and not (
            isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] > 1) and not (
            isinstance(images, (str, Path)) and Path(images).is_dir())
        items = _expand(images)
        saved = self.references
        try:
            if references is not None:
                self.set_references(references, batch_size=batch_size)
            results = list(self.predict_iter(items, batch_size, threshold, on_error, keep_image, progress,
                                             mode=mode, compare_with=compare_with, seed=seed))
        finally:
            self.references = saved
        return results[0] if single and len(results) == 1 else results

    def predict_folder(self, folder: PathLike, batch_size: int = 8, threshold: Optional[float] = None,
                       on_error: str = "return", recursive: bool = True, keep_image: bool = False,
                       progress: bool = False, mode: str = "auto", compare_with: int = 64,
                       seed: int = 0) -> Iterator[AnomalyResult]:
        """Yield one result per image file under ``folder`` (sorted), a batch at a time."""
        files = list(iter_image_files(folder, recursive=recursive))
        yield from self.predict_iter(files, batch_size, threshold, on_error, keep_image, progress, mode=mode,
                                     compare_with=compare_with, seed=seed)

    def predict_iter(self, items: Iterable[Any], batch_size: int = 8, threshold: Optional[float] = None,
                     on_error: str = "return", keep_image: bool = False, progress: bool = False,
                     at_model_size: bool = False, mode: Any = "auto", compare_with: int = 64,
                     seed: int = 0) -> Iterator[AnomalyResult]:
        """Yield one result per item, in order, a batch at a time, in constant memory for head and references.

        ``at_model_size`` keeps the maps at the model's square input size (the papers' evaluation protocol)
        instead of resizing them to each image's original size. ``mode`` may also be a scorer object.
        """
        if on_error not in ("raise", "return"):
            raise ValueError("on_error must be 'raise' or 'return'")
        if int(batch_size) < 1:
            raise ValueError("batch_size must be >= 1")
        n = len(items) if hasattr(items, "__len__") else None
        scorer = self.scoring_mode(mode, n, compare_with, seed)
        bar = progress_bar(n, progress, unit="img")
        scored = self.engine.run(items, scorer, batch_size, keep_image=keep_image, on_error=on_error)
        for res in finish(scored, scorer, self.config, self._thresholds, dtype_name(self.dtype), threshold,
                          at_model_size, on_error):
            bar.update(1)
            yield res
        bar.close()

    def stream(self, images: Iterable[Any], window: int = 64, warmup: int = 16, seed: int = 0,
               batch_size: int = 1, **kwargs: Any) -> Iterator[AnomalyResult]:
        """Score an unlabeled stream of one product (a line camera): each image against the last ``window``
        images (batch mode over a rolling window). The first ``warmup`` images come out together, scored
        against each other; then each image as soon as it is read. Other keyword arguments as
        :meth:`predict_iter`; see :mod:`visualad.modes.stream`."""
        from .modes.stream import StreamMode

        return self.predict_iter(images, batch_size=batch_size, mode=StreamMode(window, warmup, seed), **kwargs)

    # --- tasks ---------------------------------------------------------------------------------------
    def calibrate(self, normal_images: Any, anomalous_images: Any = None, masks: Any = None, method: str = "auto",
                  mode: Any = "auto", **kwargs: Any) -> Dict[str, Any]:
        """Set image and pixel thresholds for one mode (see :mod:`visualad.tasks.calibrate`); save_pretrained
        persists them. ``mode="auto"``: references when set, else batch for 16 or more normal images, else
        the head. Normal images only: a high percentile of their scores; with anomalous images: F1-max."""
        from .tasks.calibrate import calibrate

        normals = _expand(normal_images)
        scorer = self.scoring_mode(mode, len(normals), kwargs.pop("compare_with", 64), kwargs.pop("seed", 0))
        return calibrate(self.engine, scorer, self.config, normals,
                         None if anomalous_images is None else _expand(anomalous_images),
                         masks=masks, method=method, **kwargs)

    def finetune(self, aux: PathLike, **kwargs: Any) -> Dict[str, Any]:
        """Train the tokens, SCA and SAF on an auxiliary dataset; the backbone stays frozen.

        Keyword arguments: out_dir, resume, seed, progress, device, ``image_size`` (train and then predict at
        this size; the cost grows with the patches, ``(image_size / 14)^2``), and any
        :class:`visualad.train.TrainConfig` field (epochs, batch_size, lr, synthesize, ...); see
        :func:`visualad.train.loop.finetune`. Returns the training report.
        """
        from .store import resize_model
        from .train.loop import finetune

        if kwargs.get("device") is not None:
            self.to(kwargs.pop("device"))
        size = kwargs.pop("image_size", None)
        if size is not None and int(size) != self.config.image_size:
            self.engine = Engine(resize_model(self.model, int(size)), device=self.device, dtype=self.dtype)
            if self.references is not None:
                logger.warning("the references were set at the old size and are dropped: set them again")
                self.references = None
        return finetune(self.engine, aux, references=self.references, **kwargs)

    def evaluate(self, dataset_root: PathLike, out: Optional[PathLike] = None, **kwargs: Any) -> Dict[str, Any]:
        """Per-class and mean metrics on a labelled dataset (see :func:`visualad.tasks.evaluate.evaluate`);
        the detector's own references are left as they are."""
        from .tasks.evaluate import evaluate

        return evaluate(self.engine, dataset_root, out=out, **kwargs)


def _expand(images: Any) -> List[Any]:
    """A folder becomes its image files (sorted); anything else goes through ``expand_inputs``."""
    if isinstance(images, (str, Path)) and Path(images).is_dir():
        return list(iter_image_files(images))
    return imio.expand_inputs(images)
