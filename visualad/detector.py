"""AnomalyDetector: the torch predictor. It holds an Engine (model, device, dtype; the torch backend) and the
current reference bank; prediction, modes and thresholds are the shared :class:`~visualad.predictor.Predictor`.
This module adds what only torch does: construction, saving, finetune, evaluate and export.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from .config import VisualADConfig
from .model import VisualAD
from .modes.bank import ReferenceBank
from .predictor import Predictor
from .runtime.engine import Engine
from .types import PathLike

logger = logging.getLogger(__name__)


class AnomalyDetector(Predictor):
    """A VisualAD model ready to predict: ``AnomalyDetector.from_pretrained()`` then ``predict(image)``."""

    def __init__(self, model: VisualAD, device: Union[str, torch.device] = "auto",
                 dtype: Union[str, torch.dtype] = "auto", references: Optional[ReferenceBank] = None) -> None:
        super().__init__()
        self.engine = Engine(model, device=device, dtype=dtype)
        self.references = references.to(self.engine.device) if references is not None else None

    # --- what it is ----------------------------------------------------------------------------------
    @property
    def backend(self) -> Engine:
        return self.engine

    @property
    def model(self) -> VisualAD:
        return self.engine.model

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    def __repr__(self) -> str:
        cfg = self.config
        name = cfg.metadata.get("name") or cfg.metadata.get("model") or cfg.backbone
        mode = "references" if self.references is not None else "auto"
        calibrated = (cfg.score_stats or {}).get("mode", "head") if cfg.image_threshold is not None else None
        return (f"AnomalyDetector(model={name!r}, backbone={cfg.backbone!r}, image_size={cfg.image_size}, "
                f"mode={mode!r}, device={str(self.device)!r}, dtype={self.dtype_name!r}, "
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

    def with_fresh_head(self, seed: Optional[int] = 111) -> "AnomalyDetector":
        """The same backbone (shared, frozen) with a fresh, untrained head seeded by ``seed``: finetune from
        scratch rather than from this model's head."""
        from .store import fresh_head

        return type(self)(fresh_head(self.model, seed), device=self.device, dtype=self.engine.requested_dtype)

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

        return export_onnx(self.engine, out_dir, references=self.references)

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

    # --- tasks ---------------------------------------------------------------------------------------
    def finetune(self, aux: PathLike, **kwargs: Any) -> Dict[str, Any]:
        """Train the tokens, SCA and SAF on an auxiliary dataset; the backbone stays frozen. Training continues
        from this detector's head (:attr:`start`; a fresh one for :meth:`from_backbone`).

        Keyword arguments: out_dir, resume, seed, progress, device, ``image_size`` (train and then predict at
        this size; the cost grows with the patches, ``(image_size / 14)^2``), and any
        :class:`visualad.train.TrainConfig` field (epochs, batch_size, lr, synthesize, ...); see
        :func:`visualad.train.loop.finetune`. Returns the training report (its ``start`` says where it began).
        """
        from .store import resize_model
        from .train.loop import finetune

        if kwargs.get("device") is not None:
            self.to(kwargs.pop("device"))
        size = kwargs.pop("image_size", None)
        if size is not None and int(size) != self.config.image_size:
            self.engine = Engine(resize_model(self.model, int(size)), device=self.device,
                                 dtype=self.engine.requested_dtype)
            if self.references is not None:
                logger.warning("the references were set at the old size and are dropped: set them again")
                self.references = None
        logger.info("finetune starts from %s", self.start)
        return finetune(self.engine, aux, references=self.references, start=self.start, **kwargs)

    @property
    def start(self) -> str:
        """Where finetune begins: this model's trained head, or a fresh head on its backbone."""
        cfg = self.config
        name = cfg.metadata.get("name") or cfg.metadata.get("model") or cfg.backbone
        if cfg.head_trained:
            return f"the trained head of {name} ({cfg.backbone})"
        return f"a fresh, untrained head on {cfg.backbone}"

    def evaluate(self, dataset_root: PathLike, out: Optional[PathLike] = None, **kwargs: Any) -> Dict[str, Any]:
        """Per-class and mean metrics on a labelled dataset (see :func:`visualad.tasks.evaluate.evaluate`);
        the detector's own references are left as they are."""
        from .tasks.evaluate import evaluate

        return evaluate(self.engine, dataset_root, out=out, **kwargs)

