"""Fine-tuning VisualAD's head (tokens, SCA, SAF, final norm) on an auxiliary dataset (method doc §6).

Most users call :meth:`visualad.AnomalyDetector.finetune` or ``visualad finetune``; this package holds the
recipe (:class:`TrainConfig`), the losses, the loop with its pickle-free checkpoints, and the synthetic
anomalies used when an auxiliary set has normal images only.
"""
from .loop import TrainConfig, build_optimizer, finetune, train_step
from .losses import dice_loss, focal_loss, image_bce, token_hinge, visualad_loss

__all__ = ["TrainConfig", "build_optimizer", "finetune", "train_step", "dice_loss", "focal_loss", "image_bce",
           "token_hinge", "visualad_loss"]
