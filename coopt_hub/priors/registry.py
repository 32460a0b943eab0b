"""Prior backends by name: `open_clip` (the default), `timm`, and any a third party registers.

A prior's model string names its backend with a prefix, `BACKEND:NAME` (`timm:vit_small_patch14_dinov2`);
a name without a known prefix belongs to open_clip, whose own forms (`ViT-B-32`,
`hf-hub:ORG/NAME`) stay as they are. Backends come from the `coopt_hub.priors` entry-point group
(the built-in ones are declared there too), or from `register_backend` (tests register their fakes
this way).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from coopt_hub.errors import ConfigError
from coopt_hub.priors.base import Prior, PriorSpec

ENTRY_POINT_GROUP = "coopt_hub.priors"
DEFAULT_BACKEND = "open_clip"

PriorFactory = Callable[[PriorSpec, str, str], Prior]  # (spec, device, precision) -> Prior

_registered: dict[str, PriorFactory] = {}


def register_backend(name: str, factory: PriorFactory, *, replace: bool = False) -> None:
    """Make `BACKEND:...` model names load through `factory(spec, device, precision)`."""
    if not name.isidentifier():
        raise ConfigError(f"A prior backend name must be an identifier, got {name!r}.")
    if name in _registered and not replace:
        raise ConfigError(f"Prior backend {name!r} is registered already.")
    _registered[name] = factory


def unregister_backend(name: str) -> None:
    _registered.pop(name, None)


def _entry_point_backends() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> list[str]:
    return sorted({*_registered, *_entry_point_backends()})


def split_model(model: str) -> tuple[str, str]:
    """(backend, the model's name within it): `timm:x` -> ("timm", "x"); `ViT-B-32` -> ("open_clip", ...)."""
    prefix, sep, rest = model.partition(":")
    if sep and prefix in backend_names():
        return prefix, rest
    return DEFAULT_BACKEND, model


def backend(name: str) -> PriorFactory:
    if name in _registered:
        return _registered[name]
    found = _entry_point_backends().get(name)
    if found is None:
        raise ConfigError(f"No prior backend {name!r}; known: {', '.join(backend_names())}.",
                          hint="Install the package that provides it, or name a model of a known backend.")
    return found.load()


def load_prior(spec: PriorSpec, device: str = "cpu", precision: str = "fp32") -> Prior:
    """Build the prior of `spec` on `device` with its backend; PriorError says why a model cannot be loaded."""
    name, _ = split_model(spec.model)
    return backend(name)(spec, device, precision)
