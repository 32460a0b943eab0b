"""Prior models: the image encoders psi_k whose outputs become a shard's targets.

A prior is one small interface: preprocess a PIL image the way the model was trained to see it, and
encode a batch of pixels to float32 features. OpenClipPrior is the implementation for open_clip
models (random init, pretrained tags, hf-hub repos, local checkpoints); tests may subclass Prior
with deterministic fakes. Only the image tower is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any

import PIL.Image
import torch
from PIL import Image, UnidentifiedImageError

from coopt_hub.errors import BadImageError, ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class PriorSpec:
    """Which prior: an open_clip model name (or hf-hub:ORG/NAME) and where its weights come from.

    No pretrained tag and no checkpoint means random weights drawn from `seed`.
    """

    model: str
    pretrained: str | None = None  # an open_clip pretrained tag, e.g. "openai"
    checkpoint: str | None = None  # a local .safetensors/.bin/.pt state dict of the whole open_clip model
    seed: int = 0
    image_size: int | None = None  # overrides the model's input size (open_clip force_image_size)

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("A prior needs a model name.", hint=f"List open_clip's models with: {_LIST_MODELS}")
        if self.pretrained and self.checkpoint:
            raise ConfigError("Give a pretrained tag or a checkpoint for the prior, not both.",
                              hint="Pass --pretrained TAG for published weights, or --checkpoint PATH for your own.")
        if self.model.startswith(HF_HUB_PREFIX) and (self.pretrained or self.checkpoint):
            raise ConfigError(f"{self.model} brings its own weights; it takes no --pretrained or --checkpoint.",
                              hint="Drop --pretrained and --checkpoint, or name an open_clip model instead.")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"The prior image size must be at least 1 pixel, got {self.image_size}.")

    @property
    def random_init(self) -> bool:
        return not (self.pretrained or self.checkpoint or self.model.startswith(HF_HUB_PREFIX))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PriorSpec:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"Unknown prior settings {sorted(unknown)}.",
                              hint="The record may come from a newer coopt-hub; upgrade to read it.")
        return cls(**d)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input, recorded so the targets can be reproduced."""

    image_size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # "bicubic" | "bilinear"
    resize_mode: str  # "shortest" (resize + centre crop) | "longest" (resize + pad) | "squash"
    fill_color: int = 0  # padding value of resize_mode "longest"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(image_size=tuple(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   interpolation=d["interpolation"], resize_mode=d["resize_mode"],
                   fill_color=d.get("fill_color", 0))

    def transform(self) -> Callable[[PIL.Image.Image], torch.Tensor]:
        """open_clip's evaluation transform for these settings (grayscale and RGBA become RGB)."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        config = PreprocessCfg(size=self.image_size, mean=self.mean, std=self.std, interpolation=self.interpolation,
                               resize_mode=self.resize_mode, fill_color=self.fill_color)
        return image_transform_v2(config, is_train=False)


class Prior(ABC):
    spec: PriorSpec
    preprocessing: Preprocessing
    output_dim: int
    fingerprint: str  # sha256 of the image tower's weights
    random_init: bool

    @cached_property
    def _transform(self) -> Callable[[PIL.Image.Image], torch.Tensor]:
        return self.preprocessing.transform()

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        """One image as the model's input, [3, H, W] float32."""
        return self._transform(image)

    @abstractmethod
    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed pixels -> [B, output_dim] float32 features on the CPU, unnormalised."""








def _fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every weight and buffer: sorted names, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _parse_device(device: str) -> torch.device:
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"Unknown device {device!r}.", hint="Use cpu, cuda or cuda:N.") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {device} was asked for but CUDA is not available.", hint="Use --device cpu.")
    return parsed


def _check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"Unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}.")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 needs a CUDA device.", hint="Use --precision bf16 or fp32 on the CPU.")


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)




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


HF_HUB_PREFIX = "hf-hub:"


_LIST_MODELS = "python -c 'import open_clip; print(open_clip.list_models())'"
