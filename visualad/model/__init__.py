"""The VisualAD network: backbone adapters, token insertion, SCA/SAF heads and scoring."""
from .backbones import Backbone, build_backbone, parse_backbone
from .visualad import VisualAD, VisualADOutput

__all__ = ["Backbone", "VisualAD", "VisualADOutput", "build_backbone", "parse_backbone"]
