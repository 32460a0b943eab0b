"""Prior models: the image encoders whose outputs become a shard's targets (interface, backends, registry)."""

from coopt_hub.priors.base import Preprocessing, Prior, PriorSpec, decode_image
from coopt_hub.priors.registry import load_prior

__all__ = ["Preprocessing", "Prior", "PriorSpec", "decode_image", "load_prior"]
