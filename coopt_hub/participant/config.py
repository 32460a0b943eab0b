"""A participant's saved choices: which collaboration it works on and with which prior.

`coopt-hub join REPO --model ...` writes them to `coopt-hub.json` in the working directory, so that
the later commands need only what changes between runs (`coopt-hub optimize --shard 3 --push`).
Command-line options and COOPT_HUB_REPO take precedence over the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coopt_hub.core.files import write_text_atomically
from coopt_hub.errors import ConfigError
from coopt_hub.priors import PriorSpec

CONFIG_FILE = "coopt-hub.json"
REPO_ENV = "COOPT_HUB_REPO"
CONFIG_VERSION = 1


@dataclass(frozen=True)
class ParticipantConfig:
    repo: str
    prior: PriorSpec
    name: str | None = None  # shown in the shard's report, so the platform knows whom to thank

    def to_dict(self) -> dict[str, Any]:
        return {"version": CONFIG_VERSION, "repo": self.repo, "prior": self.prior.to_dict(), "name": self.name}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParticipantConfig:
        if data.get("version") != CONFIG_VERSION:
            raise ValueError(f"unsupported config version {data.get('version')!r}")
        return cls(repo=str(data["repo"]), prior=PriorSpec.from_dict(data["prior"]), name=data.get("name"))


def config_path(directory: Path | None = None) -> Path:
    return Path(directory or Path.cwd()) / CONFIG_FILE


def save_config(config: ParticipantConfig, directory: Path | None = None) -> Path:
    path = config_path(directory)
    write_text_atomically(path, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def save_joined_config(config: ParticipantConfig, *, force: bool = False, directory: Path | None = None) -> bool:
    """Save `config`; False, and nothing written, when the directory holds exactly this config already.

    Another config, or a file that is not one, is replaced only with `force`: every later command
    would otherwise work on another collaboration, or with another prior, without a word.
    """
    path = config_path(directory)
    try:
        existing = load_config(directory)
    except ConfigError as err:
        held = f"is not a valid participant config ({err.__cause__})"
    else:
        if existing == config:
            return False
        held = None if existing is None else f"holds {_described(existing)}"
    if held is not None and not force:
        raise ConfigError(f"{path} {held}; this join asks for {_described(config)}.",
                          hint="Pass --force to replace it, or join from another directory.")
    save_config(config, directory)
    return True


def _described(config: ParticipantConfig) -> str:
    prior = config.prior
    weights = (f" --pretrained {prior.pretrained}" if prior.pretrained else "") + (
        f" --checkpoint {prior.checkpoint}" if prior.checkpoint else "")
    size = f" --image-size {prior.image_size}" if prior.image_size else ""
    name = f" as {config.name}" if config.name else ""
    return f"{config.repo} with --model {prior.model}{weights}{size}{name}"


def load_config(directory: Path | None = None) -> ParticipantConfig | None:
    """The saved config, None when there is none, ConfigError when it cannot be read."""
    path = config_path(directory)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return ParticipantConfig.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{path} is not a valid coopt-hub participant config ({err}).",
            hint="Write it again with `coopt-hub join REPO --model MODEL --force`, or delete it.",
        ) from err


def resolve_repo(repo: str | None, config: ParticipantConfig | None) -> str:
    """--repo, else COOPT_HUB_REPO, else the saved config's repo."""
    chosen = repo or os.environ.get(REPO_ENV) or (config.repo if config else None)
    if not chosen:
        raise ConfigError(
            "No CoOpt repo given.",
            hint=f"Pass --repo ORG/NAME, set {REPO_ENV}, or run `coopt-hub join ORG/NAME --model MODEL` "
            "in this directory first.",
        )
    return chosen


def resolve_prior(
    model: str | None,
    pretrained: str | None,
    checkpoint: str | None,
    image_size: int | None,
    config: ParticipantConfig | None,
) -> PriorSpec:
    """The prior named on the command line, else the saved one with any given option overriding it.

    A --model on the command line starts from scratch: weights or a checkpoint saved for another
    model must not be paired with it silently.
    """
    if model:
        return PriorSpec(model=model, pretrained=pretrained, checkpoint=checkpoint, image_size=image_size)
    if config is None:
        raise ConfigError(
            "No prior model given.",
            hint="Pass --model (and --pretrained or --checkpoint), or run `coopt-hub join REPO --model MODEL` "
            "in this directory first.",
        )
    saved = config.prior
    return PriorSpec(
        model=saved.model,
        pretrained=pretrained if pretrained is not None else saved.pretrained,
        checkpoint=checkpoint if checkpoint is not None else saved.checkpoint,
        seed=saved.seed,
        image_size=image_size if image_size is not None else saved.image_size,
    )
