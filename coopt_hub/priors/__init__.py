"""Prior models: the image encoders whose outputs become a shard's targets (interface, backends, registry)."""

from coopt_hub.priors.base import Preprocessing, Prior, PriorSpec, decode_image
from coopt_hub.priors.registry import Backend, check_spec, load_prior, register_backend

__all__ = ["Backend", "Preprocessing", "Prior", "PriorSpec", "check_spec", "decode_image", "load_prior",
           "register_backend"]
