"""Beyond one machine: prediction with Ray Data (:mod:`visualad.scale.ray_predict`)."""
