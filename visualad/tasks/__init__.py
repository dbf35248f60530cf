"""Work over an Engine: reference banks, calibration, evaluation (finetune lives in :mod:`visualad.train`)."""
