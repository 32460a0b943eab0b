"""Prior models: the image encoders psi_k whose outputs become a shard's targets.

A prior is one small interface: preprocess a PIL image the way the model was trained to see it, and
encode a batch of pixels to float32 features. A backend (open_clip, timm, or a third party's, see
registry.py) builds one from a PriorSpec; most wrap a torch module in ModulePrior, whose device,
precision and fingerprint handling lives here so that every backend's targets are comparable.
Tests may subclass Prior with deterministic fakes.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import cached_property

import PIL.Image
import torch

from coopt_hub.errors import ConfigError, PriorError
from coopt_hub.priors.spec import PRECISIONS, Preprocessing, PriorSpec


class Prior(ABC):
    spec: PriorSpec
    preprocessing: Preprocessing
    output_dim: int
    fingerprint: str  # sha256 of the image tower's weights
    random_init: bool
    precision: str = "fp32"  # what the forward pass computes in; fakes compute in fp32

    @cached_property
    def _transform(self) -> Callable[[PIL.Image.Image], torch.Tensor]:
        return self.preprocessing.transform()

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        """One image as the model's input, [3, H, W] float32."""
        return self._transform(image)

    @abstractmethod
    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed pixels -> [B, output_dim] float32 features on the CPU, unnormalised."""


class ModulePrior(Prior):
    """A torch module as a prior, in eval mode with fp32 weights (autocast for bf16/fp16)."""

    def __init__(self, spec: PriorSpec, module: torch.nn.Module, preprocessing: Preprocessing, output_dim: int,
                 fingerprint: str, device: torch.device, precision: str):
        self.spec = spec
        self.preprocessing = preprocessing
        self.output_dim = output_dim
        self.fingerprint = fingerprint
        self.random_init = spec.random_init
        self.device = device
        self.precision = precision
        self._module = module

    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = self.preprocessing.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, height, width):
            raise ValueError(f"Expected pixels of shape [B, 3, {height}, {width}], got {list(pixels.shape)}.")
        with torch.inference_mode(), autocast(self.device, self.precision):
            features = self._module(pixels.to(self.device, torch.float32))
        return features.float().cpu()


def module_prior(spec: PriorSpec, module: torch.nn.Module, preprocessing: Preprocessing, device: torch.device,
                 precision: str) -> ModulePrior:
    """`module` (fp32, on the CPU) as the prior of `spec` on `device`; PriorError if it fails at its input size."""
    module.eval().requires_grad_(False)
    fingerprint = fingerprint_weights(module)  # before the move, so fp32 CPU weights are hashed on every machine
    module = module.to(device)
    try:
        # Not every model exposes its output size; one probe forward finds it, and shows now rather
        # than mid-shard that the model runs at this input size.
        with torch.inference_mode(), autocast(device, precision):
            probe = module(torch.zeros(1, 3, *preprocessing.image_size, device=device))
    except RuntimeError as err:
        raise PriorError(
            f"{spec.model} does not run on {preprocessing.image_size[0]}x{preprocessing.image_size[1]} images: "
            f"{first_lines(err)}",
            hint="Pick another --image-size (at least the model's patch size), or leave it at the model's default.",
        ) from err
    return ModulePrior(spec, module, preprocessing, probe.shape[-1], fingerprint, device, precision)


def fingerprint_weights(module: torch.nn.Module) -> str:
    """sha256 over every weight and buffer: sorted names, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def run_device(device: str, precision: str) -> torch.device:
    """The device a prior runs on, checked with its precision before any model is built."""
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"Unknown device {device!r}.", hint="Use cpu, cuda or cuda:N.") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {device} was asked for but CUDA is not available.", hint="Use --device cpu.")
    if precision not in PRECISIONS:
        raise ConfigError(f"Unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}.")
    if precision == "fp16" and parsed.type != "cuda":
        raise ConfigError("fp16 needs a CUDA device.", hint="Use --precision bf16 or fp32 on the CPU.")
    return parsed


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def seeded(seed: int):
    """Random draws fixed by `seed` alone, on any device, without disturbing the caller's random state.

    Models are created on the CPU inside this, so random weights depend on nothing else.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def first_lines(err: BaseException, limit: int = 400) -> str:
    """A library's error message on one line, cut short: the reason part of our own messages."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


