"""Resumable checkpoints as single safetensors files: model + optimizer state + loop state.

`checkpoint-{step:08d}.safetensors` holds the objective's state dict under `model/`, the optimizer's
per-parameter tensors under `optimizer/{index}/`, and, as JSON in the header metadata, the
optimizer's hyper-parameters, the loop state (step, seconds, history) and the run's settings
(checked on resume). Files are written to a temporary name and renamed, so a crash leaves either
the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from coopt_hub.errors import ConfigError

METADATA_KEY = "coopt_training"
_NAME = re.compile(r"^checkpoint-(\d{8})\.safetensors$")


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"checkpoint-{step:08d}.safetensors"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in `directory`, oldest step first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loop_state: dict[str, Any],
    settings: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write the checkpoint of `step` and delete all but the newest `keep`."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{name}": t.detach().contiguous() for name, t in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in optimizer_state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    metadata = {
        "loop": loop_state,
        "settings": settings,
        "param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
    }
    path = checkpoint_path(directory, step)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={METADATA_KEY: json.dumps(metadata)})
    os.replace(partial, path)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, settings: dict[str, Any]
) -> dict[str, Any]:
    """Restore `model` and `optimizer` in place from `path`; returns the loop state.

    `settings` are the current run's; any that differ from the checkpoint's raise ConfigError,
    because resuming a different run into this output directory would silently mix two trainings.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = json.loads(f.metadata()[METADATA_KEY])
    settings = json.loads(json.dumps(settings))  # compare as stored: tuples read back as lists
    changed = {k: (metadata["settings"].get(k), v) for k, v in settings.items() if metadata["settings"].get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(
            f"{path.parent} holds a checkpoint of a different run ({detail})",
            hint="Resume with the original settings, or pass another --output directory.",
        )
    tensors = load_file(str(path))
    model.load_state_dict({k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")})
    per_param: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            per_param.setdefault(int(index), {})[key] = value
    for index, values in metadata["optimizer_scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": metadata["param_groups"]})
    return metadata["loop"]
