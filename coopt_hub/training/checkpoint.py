"""Resumable checkpoints through accelerate's save_state/load_state, plus the loop's own state.

`checkpoint-{step:08d}/` holds what `Accelerator.save_state` writes (the model, the optimizer and
every process's RNG states, sharded as FSDP or DeepSpeed shard them) and `training_state.json`:
the loop state (step, seconds, history) and the run's settings, checked on resume. This is resume
state only; the trained student goes out in timm's format (training/export.py).

A checkpoint is written under a `.partial` name and renamed once complete, so a crash leaves the
previous checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from coopt_hub.errors import ConfigError

STATE_FILE = "training_state.json"
_NAME = re.compile(r"^checkpoint-(\d{8})$")
_OLD_FORMAT = re.compile(r"^checkpoint-\d{8}\.safetensors$")


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"checkpoint-{step:08d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest step first."""
    if not directory.is_dir():
        return []
    old = [p.name for p in directory.iterdir() if _OLD_FORMAT.match(p.name)]
    if old:
        raise ConfigError(
            f"{directory} holds checkpoints of an earlier coopt-hub ({old[0]}, one file each), which cannot resume here",
            hint="Pass a new --output directory (or resume with the release that wrote them).",
        )
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    accelerator, directory: Path, step: int, loop_state: dict[str, Any], settings: dict[str, Any], keep: int = 2
) -> Path:
    """Write the checkpoint of `step` (every process takes part) and delete all but the newest `keep`."""
    path = checkpoint_path(directory, step)
    partial = path.with_name(path.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # a torn one from a crash
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"loop": loop_state, "settings": settings}
        (partial / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator, path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Restore the prepared model, optimizer and RNG states from `path`; returns the loop state.

    `settings` are the current run's; any that differ from the checkpoint's raise ConfigError,
    because resuming a different run into this output directory would silently mix two trainings.
    """
    state = json.loads((path / STATE_FILE).read_text())
    settings = json.loads(json.dumps(settings))  # compare as stored: tuples read back as lists
    changed = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(
            f"{path.parent} holds a checkpoint of a different run ({detail})",
            hint="Resume with the original settings, or pass another --output directory.",
        )
    accelerator.load_state(str(path))
    return state["loop"]
