"""A model directory's file names, in one place (read and written by :mod:`visualad.store`)."""
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
REFERENCES_NAME = "references.safetensors"
BACKBONE_WEIGHTS_NAME = "backbone.safetensors"
CARD_NAME = "README.md"
#: what a Hub snapshot of a model fetches (the first two are required)
MODEL_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, REFERENCES_NAME, BACKBONE_WEIGHTS_NAME]
