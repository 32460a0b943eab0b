"""Process-wide client settings that must be in place before huggingface_hub is imported."""

from __future__ import annotations

import os
from urllib.parse import urlparse

_HUGGINGFACE_HOSTS = {"huggingface.co", "hf.co"}


def endpoint_is_huggingface(endpoint: str | None) -> bool:
    if not endpoint:
        return True
    host = (urlparse(endpoint).hostname or "").lower()
    return host in _HUGGINGFACE_HOSTS or host.endswith(".huggingface.co") or host.endswith(".hf.co")


def configure_hub_environment() -> None:
    """Keep uploads on the plain LFS path for any endpoint that is not huggingface.co.

    huggingface_hub sends every LFS file through Xet when hf_xet is importable, and only the real Hub
    runs a Xet CAS. The switch is read when huggingface_hub is imported, so it is set here, at
    package import, rather than next to each call.
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if not endpoint_is_huggingface(os.environ.get("HF_ENDPOINT")):
        os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
