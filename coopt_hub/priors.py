"""Prior models: the image encoders psi_k whose outputs become a shard's targets.

A prior is one small interface: preprocess a PIL image the way the model was trained to see it, and
encode a batch of pixels to float32 features. OpenClipPrior is the implementation for open_clip
models (random init, pretrained tags, hf-hub repos, local checkpoints); tests may subclass Prior
with deterministic fakes. Only the image tower is kept.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import cached_property

import PIL.Image
import torch

from coopt_hub.errors import ConfigError, PriorError

PRECISIONS = ("fp32", "bf16", "fp16")
HF_HUB_PREFIX = "hf-hub:"
_LIST_MODELS = "python -c 'import open_clip; print(open_clip.list_models())'"


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


class OpenClipPrior(Prior):
    """The image tower of an open_clip model, in eval mode, weights in fp32 (autocast for bf16/fp16)."""

    def __init__(self, spec: PriorSpec, visual: torch.nn.Module, preprocessing: Preprocessing, output_dim: int,
                 fingerprint: str, device: torch.device, precision: str):
        self.spec = spec
        self.preprocessing = preprocessing
        self.output_dim = output_dim
        self.fingerprint = fingerprint
        self.random_init = spec.random_init
        self.device = device
        self.precision = precision
        self._visual = visual

    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = self.preprocessing.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, height, width):
            raise ValueError(f"Expected pixels of shape [B, 3, {height}, {width}], got {list(pixels.shape)}.")
        with torch.inference_mode(), _autocast(self.device, self.precision):
            features = self._visual(pixels.to(self.device, torch.float32))
        return features.float().cpu()


def load_prior(spec: PriorSpec, device: str = "cpu", precision: str = "fp32") -> Prior:
    """Build the prior of `spec` on `device`; PriorError says why a model cannot be loaded."""
    torch_device = _parse_device(device)
    _check_precision(precision, torch_device)
    model = _create_open_clip_model(spec)
    visual = model.visual
    del model  # the text tower is never used
    visual.eval().requires_grad_(False)
    config = visual.preprocess_cfg
    size = config["size"]
    preprocessing = Preprocessing(
        image_size=(size, size) if isinstance(size, int) else tuple(size),
        mean=tuple(config["mean"]), std=tuple(config["std"]), interpolation=config["interpolation"],
        resize_mode=config["resize_mode"], fill_color=config.get("fill_color", 0),
    )
    fingerprint = _fingerprint(visual)  # before the move, so fp32 CPU weights are hashed on every machine
    visual = visual.to(torch_device)
    try:
        # Not every open_clip tower exposes its output size (timm ones do not); one probe forward
        # finds it, and shows now rather than mid-shard that the model runs at this input size.
        with torch.inference_mode(), _autocast(torch_device, precision):
            probe = visual(torch.zeros(1, 3, *preprocessing.image_size, device=torch_device))
    except RuntimeError as err:
        raise PriorError(
            f"{spec.model} does not run on {preprocessing.image_size[0]}x{preprocessing.image_size[1]} images: "
            f"{_first_lines(err)}",
            hint="Pick another --image-size (at least the model's patch size), or leave it at the model's default.",
        ) from err
    return OpenClipPrior(spec, visual, preprocessing, probe.shape[-1], fingerprint, torch_device, precision)


def _create_open_clip_model(spec: PriorSpec) -> torch.nn.Module:
    import open_clip

    is_hub_model = spec.model.startswith(HF_HUB_PREFIX)
    if ":" not in spec.model and open_clip.get_model_config(spec.model) is None:
        close = difflib.get_close_matches(spec.model, open_clip.list_models(), n=3)
        raise PriorError(
            f"Unknown open_clip model {spec.model!r}." + (f" Did you mean {', '.join(close)}?" if close else ""),
            hint=f"List the valid names with: {_LIST_MODELS}",
        )
    if spec.pretrained and not open_clip.get_pretrained_cfg(spec.model, spec.pretrained):
        tags = open_clip.list_pretrained_tags_by_model(spec.model)
        raise PriorError(
            f"{spec.model} has no pretrained tag {spec.pretrained!r}; known tags: {', '.join(tags) or 'none'}.",
            hint="Pick one of the tags, or load your own weights with --checkpoint PATH.",
        )
    if spec.checkpoint and not os.path.isfile(spec.checkpoint):
        raise PriorError(f"The checkpoint {spec.checkpoint} does not exist.",
                         hint="Pass the path of a .safetensors, .bin or .pt state dict of the open_clip model.")
    weights = spec.checkpoint or spec.pretrained
    try:
        # Created on the CPU under a forked RNG: the seed alone fixes random weights, on any device,
        # without disturbing the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            return open_clip.create_model(spec.model, pretrained=weights, force_image_size=spec.image_size,
                                          device="cpu", precision="fp32")
    except Exception as err:  # open_clip reports every failure as RuntimeError/OSError/ValueError and kin
        reason = _first_lines(err)
        if spec.checkpoint:
            raise PriorError(
                f"The checkpoint {spec.checkpoint} does not fit {spec.model}: {reason}",
                hint=f"The file must hold a state dict of the whole open_clip {spec.model} model.",
            ) from err
        if spec.pretrained:
            hub_file = open_clip.get_pretrained_cfg(spec.model, spec.pretrained).get("hf_hub", "").rstrip("/")
            raise PriorError(
                f"The {spec.pretrained} weights of {spec.model} could not be downloaded: {reason}",
                hint=(f"On a machine with network access download them (`hf download {hub_file}`), "
                      if hub_file else "Download the weights on a machine with network access, ")
                + f"then pass the file with --model {spec.model} --checkpoint PATH.",
            ) from err
        if is_hub_model:
            raise PriorError(
                f"Could not load {spec.model} from the Hub: {reason}",
                hint="Check the repo id, HF_ENDPOINT and HF_TOKEN, or download the weights and use --checkpoint.",
            ) from err
        raise PriorError(f"open_clip could not build {spec.model}: {reason}",
                         hint="Try another --image-size, or rerun with --debug for the traceback.") from err


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


def _first_lines(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."
