"""Prior backends by name: `open_clip` (the default), `timm`, and any a third party adds.

A prior's model string names its backend with a prefix, `BACKEND:NAME` (`timm:vit_small_patch14_dinov2`);
a name without one belongs to open_clip, whose own forms (`ViT-B-32`, `hf-hub:ORG/NAME`) stay as
they are (base.split_model). Backends come from the `coopt_hub.priors` entry-point group (the
built-in ones are declared there too), or from `register_backend` (tests register their fakes this
way). An entry point or a registration names either a Backend or just its load function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from coopt_hub.errors import ConfigError, PriorError
from coopt_hub.priors.base import Prior
from coopt_hub.priors.spec import DEFAULT_BACKEND, PriorSpec, split_model

__all__ = ["DEFAULT_BACKEND", "ENTRY_POINT_GROUP", "Backend", "backend", "backend_names", "check_spec",
           "load_prior", "register_backend", "split_model", "unregister_backend"]

ENTRY_POINT_GROUP = "coopt_hub.priors"

PriorFactory = Callable[[PriorSpec, str, str], Prior]  # (spec, device, precision) -> Prior


def _no_rules_of_its_own(spec: PriorSpec) -> None:
    """The check of a backend that accepts every spec PriorSpec accepts."""


@dataclass(frozen=True)
class Backend:
    """How one family of models becomes priors.

    `load(spec, device, precision)` builds the prior (PriorError when this machine cannot);
    `check(spec)` raises ConfigError for a spec the backend cannot mean, before anything is
    downloaded or built. Both see the whole spec: the name within the backend is
    `split_model(spec.model)[1]`.
    """

    load: PriorFactory
    check: Callable[[PriorSpec], None] = _no_rules_of_its_own


_registered: dict[str, Backend] = {}


def register_backend(name: str, backend: Backend | PriorFactory, *, replace: bool = False) -> None:
    """Make `NAME:...` model names load through `backend` (a Backend, or a load function)."""
    if not name.isidentifier():
        raise ConfigError(f"A prior backend name must be an identifier, got {name!r}.",
                          hint="Use letters, digits and underscores, e.g. my_models: it prefixes model names.")
    if name in _registered and not replace:
        raise ConfigError(f"Prior backend {name!r} is registered already.",
                          hint="Pass replace=True to swap it, or unregister_backend it first.")
    _registered[name] = _as_backend(backend, f"the backend registered as {name!r}")


def unregister_backend(name: str) -> None:
    _registered.pop(name, None)


def _entry_point_backends() -> dict[str, EntryPoint]:
    # Only identifiers can prefix a model name (split_model); other names could never be reached.
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name.isidentifier()}


def backend_names() -> list[str]:
    return sorted({*_registered, *_entry_point_backends()})


def backend(name: str) -> Backend:
    """The backend called `name`: a registered one first, else the entry point of that name."""
    if name in _registered:
        return _registered[name]
    found = _entry_point_backends().get(name)
    if found is None:
        raise PriorError(f"No prior backend {name!r}; known: {', '.join(backend_names()) or 'none'}.",
                         hint=f"Install the package that provides it (it declares a {ENTRY_POINT_GROUP!r} "
                         "entry point), or name a model of a known backend.")
    try:
        loaded = found.load()
    except Exception as err:  # a broken third-party package fails in any way its import can
        raise PriorError(f"The prior backend {name!r} ({found.value}) cannot be imported: {err}",
                         hint="Reinstall or fix the package that declares it.") from err
    return _as_backend(loaded, f"the entry point {name} = {found.value}")


def _as_backend(value: object, origin: str) -> Backend:
    if isinstance(value, Backend):
        return value
    if callable(value):
        return Backend(load=value)
    raise ConfigError(f"{origin} is neither a Backend nor a function (spec, device, precision) -> Prior.",
                      hint="Point it at a coopt_hub.priors.registry.Backend or at a load function.")


def check_spec(spec: PriorSpec) -> Backend:
    """The backend of `spec`, once it has accepted the spec: ConfigError now, before any download."""
    chosen = backend(split_model(spec.model)[0])
    chosen.check(spec)
    return chosen


def load_prior(spec: PriorSpec, device: str = "cpu", precision: str = "fp32") -> Prior:
    """Build the prior of `spec` on `device` with its backend; PriorError says why a model cannot be loaded."""
    return check_spec(spec).load(spec, device, precision)
