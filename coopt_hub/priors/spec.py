"""Which prior, and how an image becomes its input: PriorSpec and Preprocessing, without torch.

Kept apart from the Prior interface (base.py) so that reading a header, a report or a card (status,
the card, the CLI's tables) never pays for importing torch; the transforms import their libraries
when they are built.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import PIL.Image
from PIL import Image, UnidentifiedImageError

from coopt_hub.core.shardfile import (
    PRECISIONS,  # noqa: F401 - the header's; priors.base imports it from here
    plain_text,
    public_prior,
)
from coopt_hub.errors import BadImageError, ConfigError

if TYPE_CHECKING:
    import torch

DEFAULT_BACKEND = "open_clip"


# open_clip and timm both read `hf-hub:ORG/NAME` as "this repo's architecture with its weights",
# and `local-dir:FOLDER` as the same from a folder holding the repo's files.
HF_HUB_PREFIX = "hf-hub:"


LOCAL_DIR_PREFIX = "local-dir:"


# The resize modes that can crop a margin (Preprocessing.crop_pct), by the name timm gives them.
TIMM_CROP_MODES = {"center": "shortest", "squash": "squash"}


def split_model(model: str) -> tuple[str, str]:
    """(backend, the model's name within it): `timm:x` -> ("timm", "x"); `ViT-B-32` -> ("open_clip", "ViT-B-32").

    A backend prefix is an identifier followed by a colon. open_clip's own names never are one
    (`hf-hub:` and `local-dir:` hold a dash), so they keep meaning what they always meant.
    """
    prefix, sep, rest = model.partition(":")
    if sep and prefix.isidentifier():
        return prefix, rest
    return DEFAULT_BACKEND, model


@dataclass(frozen=True)
class PriorSpec:
    """Which prior: a model name (`BACKEND:NAME`, or an open_clip name) and where its weights come from.

    No pretrained tag and no checkpoint means random weights drawn from `seed`. What a name and
    its weights may be is the backend's to check (registry.check_spec), when the prior is loaded.
    """

    model: str
    pretrained: str | None = None  # a pretrained tag of the backend, e.g. open_clip's "openai"
    checkpoint: str | None = None  # a local .safetensors/.bin/.pt state dict of the whole model
    seed: int = 0
    image_size: int | None = None  # overrides the model's input size

    def __post_init__(self) -> None:
        if not self.model or not split_model(self.model)[1]:
            raise ConfigError(f"A prior needs a model name, got {self.model!r}.",
                              hint="Pass --model NAME, e.g. ViT-B-32 (open_clip) or timm:vit_small_patch14_dinov2.")
        if self.pretrained and self.checkpoint:
            raise ConfigError("Give a pretrained tag or a checkpoint for the prior, not both.",
                              hint="Pass --pretrained TAG for published weights, or --checkpoint PATH for your own.")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"The prior image size must be at least 1 pixel, got {self.image_size}.")

    @property
    def random_init(self) -> bool:
        named_weights = split_model(self.model)[1].startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX))
        return not (self.pretrained or self.checkpoint or named_weights)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PriorSpec:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"Unknown prior settings {sorted(unknown)}.",
                              hint="The record may come from a newer coopt-hub; upgrade to read it.")
        return cls(**d)


def prior_label(prior: dict[str, Any], fingerprint: str | None = None) -> str:
    """A prior as cards, tables, commit titles and PR texts show it, in plain_text's characters:
    `model/pretrained` for released weights; `model (file name, weights FINGERPRINT)` for a local
    checkpoint, never its folder (the fingerprint, when given, says which weights); the name alone
    for weights that come with it (`hf-hub:`); random weights with their seed."""
    spec = PriorSpec.from_dict(public_prior(prior))
    if spec.random_init:
        text = f"{spec.model} (random init, seed {spec.seed})"
    elif spec.pretrained:
        text = f"{spec.model}/{spec.pretrained}"
    elif spec.checkpoint:
        weights = f", weights {fingerprint[:12]}" if fingerprint else ""
        text = f"{spec.model} ({spec.checkpoint}{weights})"  # public_prior left the file name only
    else:
        text = spec.model
    return plain_text(text, limit=200)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input, recorded so the targets can be reproduced."""

    image_size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # "bicubic" | "bilinear"
    resize_mode: str  # "shortest" (resize + centre crop) | "longest" (resize + pad) | "squash"
    fill_color: int = 0  # padding value of resize_mode "longest"
    # timm's crop_pct: resize to image_size / crop_pct, then centre-crop image_size ("shortest", "squash").
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"A crop fraction must lie in (0, 1], got {self.crop_pct}.")
        if self.crop_pct != 1 and self.resize_mode not in TIMM_CROP_MODES.values():
            raise ConfigError(f"Resize mode {self.resize_mode!r} takes no crop fraction; "
                              f"only {' and '.join(sorted(TIMM_CROP_MODES.values()))} crop a margin.")

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.crop_pct == 1:
            del data["crop_pct"]  # records of priors that do not crop stay as they were before the field
        return data

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(image_size=tuple(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   interpolation=d["interpolation"], resize_mode=d["resize_mode"],
                   fill_color=d.get("fill_color", 0), crop_pct=d.get("crop_pct", 1.0))

    def transform(self) -> Callable[[PIL.Image.Image], torch.Tensor]:
        """The evaluation transform for these settings (grayscale and RGBA become RGB).

        Without a crop fraction it is open_clip's, which timm's equals there; with one it is timm's,
        whose crop fraction open_clip does not know.
        """
        if self.crop_pct == 1:
            from open_clip.transform import PreprocessCfg, image_transform_v2

            config = PreprocessCfg(size=self.image_size, mean=self.mean, std=self.std,
                                   interpolation=self.interpolation, resize_mode=self.resize_mode,
                                   fill_color=self.fill_color)
            return image_transform_v2(config, is_train=False)
        from timm.data import create_transform
        from torchvision.transforms import Compose

        crop_mode = next(timm_mode for timm_mode, mode in TIMM_CROP_MODES.items() if mode == self.resize_mode)
        timm_transform = create_transform(input_size=(3, *self.image_size), crop_pct=self.crop_pct,
                                          crop_mode=crop_mode, interpolation=self.interpolation,
                                          mean=self.mean, std=self.std)
        return Compose([_to_rgb, timm_transform])


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    return image.convert("RGB")


def decode_image(value: Any, sample_id: int | None = None) -> Image.Image:
    """A PIL image (RGB) from a datasets Image cell ({"bytes", "path"}) or raw bytes."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if not data:
        raise BadImageError(
            f"Sample {sample_id} has no embedded image bytes.",
            ids=[sample_id] if sample_id is not None else [],
            hint="Publish the source with embedded images (datasets' Image feature does by default).",
        )
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BadImageError(
            f"Sample {sample_id} is not a decodable image ({err}).",
            ids=[sample_id] if sample_id is not None else [],
            hint="Fix or drop that row in the source, or pass --on-bad-image skip to record and leave it out.",
        ) from err
    return image.convert("RGB")
