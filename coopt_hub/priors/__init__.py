"""Prior models: the image encoders whose outputs become a shard's targets (interface, backends, registry).

PriorSpec and Preprocessing (spec.py) load without torch; the rest is imported on first use, so code
that only reads what a prior was (status, cards, headers) starts without torch.
"""

from __future__ import annotations

import importlib

from coopt_hub.priors.spec import Preprocessing, PriorSpec, decode_image

_LAZY = {
    "Prior": "coopt_hub.priors.base",
    "Backend": "coopt_hub.priors.registry",
    "check_spec": "coopt_hub.priors.registry",
    "load_prior": "coopt_hub.priors.registry",
    "register_backend": "coopt_hub.priors.registry",
}

__all__ = ["Backend", "Preprocessing", "Prior", "PriorSpec", "check_spec", "decode_image", "load_prior",
           "register_backend"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
