"""Prior models: the image encoders psi_k whose outputs become a shard's targets.

A prior is one small interface: preprocess a PIL image the way the model was trained to see it, and
encode a batch of pixels to float32 features. A backend (open_clip, timm, or a third party's, see
registry.py) builds one from a PriorSpec; most wrap a torch module in ModulePrior, whose device,
precision and fingerprint handling lives here so that every backend's targets are comparable.
Tests may subclass Prior with deterministic fakes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import PIL.Image
import torch

from coopt_hub.errors import ConfigError, PriorError
from coopt_hub.priors.spec import PRECISIONS, Preprocessing, PriorSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The CPU flags of native bf16 arithmetic; without them oneDNN emulates bf16, slower than fp32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


class Prior(ABC):
    spec: PriorSpec
    preprocessing: Preprocessing
    output_dim: int
    fingerprint: str  # sha256 of the image tower's weights
    random_init: bool
    precision: str = "fp32"  # what the forward pass computes in; fakes compute in fp32
    compiled: bool = False  # the forward pass runs through torch.compile
    channels_last: bool = False  # convolutions see NHWC pixels
    compile_fallback: str | None = None  # why --compile was asked for and the model runs eagerly

    @cached_property
    def _transform(self) -> Callable[[PIL.Image.Image], torch.Tensor]:
        return self.preprocessing.transform()

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        """One image as the model's input, [3, H, W] float32."""
        return self._transform(image)

    @abstractmethod
    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed pixels -> [B, output_dim] float32 features on the CPU, unnormalised."""

    def encode_fp32(self, pixels: torch.Tensor) -> torch.Tensor:
        """The same features from an eager fp32 forward: what a reduced-precision or compiled one is judged by."""
        return self.encode_batch(pixels)

    def compile(self) -> None:
        """Run the forward pass through torch.compile, or say in `compile_fallback` why it cannot."""
        self.compile_fallback = f"{type(self).__name__} is not a torch module: it runs as it is, uncompiled."


class ModulePrior(Prior):
    """A torch module as a prior, in eval mode.

    How it runs below fp32 depends on the device: on a GPU, fp32 weights under autocast; on the CPU,
    a copy of the weights in bf16, because CPU autocast casts every weight again at every call
    (measured for ViT-S-32 at batch 64 on 2 cores with avx512_bf16: autocast 13.5 img/s, bf16
    weights 47.6, fp32 22.0). The fp32 module is kept for `encode_fp32`, which judges the fast one.
    """

    def __init__(self, spec: PriorSpec, module: torch.nn.Module, preprocessing: Preprocessing, output_dim: int,
                 fingerprint: str, device: torch.device, precision: str, fast: Forward | None = None):
        self.spec = spec
        self.preprocessing = preprocessing
        self.output_dim = output_dim
        self.fingerprint = fingerprint
        self.random_init = spec.random_init
        self.device = device
        self.precision = precision
        self._module = module
        self._fast = fast or Forward(module, device, precision)
        self.channels_last = self._fast.channels_last

    def compile(self) -> None:
        self._fast.compile(self.preprocessing.image_size)
        self.compiled, self.compile_fallback = self._fast.compiled, self._fast.fallback

    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._fast(self._checked(pixels)).float().cpu()

    def encode_fp32(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            features = self._module(self._checked(pixels).to(self.device, torch.float32))
        return features.float().cpu()

    def _checked(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = self.preprocessing.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, height, width):
            raise ValueError(f"Expected pixels of shape [B, 3, {height}, {width}], got {list(pixels.shape)}.")
        return pixels


class Forward:
    """The fast forward pass of a module: its precision, memory layout and, if asked, compiled."""

    def __init__(self, module: torch.nn.Module, device: torch.device, precision: str):
        self.device, self.precision = device, precision
        self.dtype = torch.float32
        if precision != "fp32" and device.type == "cpu":
            self.dtype = DTYPES[precision]
            module = copy.deepcopy(module).to(self.dtype)
        self.autocast = precision if device.type != "cpu" else "fp32"
        # Convolutions run faster on NHWC in oneDNN and cuDNN; a transformer's patch embedding (a
        # convolution whose kernel is its stride) gains nothing.
        self.channels_last = any(isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != layer.stride
                                 for layer in module.modules())
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.compiled, self.fallback = False, None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        # Pinned batches travel while the host goes on (the output's .cpu() waits for the GPU).
        pixels = pixels.to(self.device, self.dtype, non_blocking=pixels.is_pinned())
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.autocast):
            return self.module(pixels)

    def compile(self, input_size: tuple[int, int]) -> None:
        """torch.compile, tried at once on a small batch: a model or platform that cannot compile runs eagerly."""
        eager = self.module
        use_compile_cache()
        try:
            self.module = torch.compile(eager, dynamic=True)
            self(torch.zeros(2, 3, *input_size))
        except Exception as err:  # noqa: BLE001 - dynamo and inductor fail in many ways; each one means eager
            self.module = eager
            self.fallback = (f"torch.compile cannot compile this model here ({first_lines(err, 200)}); it runs "
                             "uncompiled, as without --compile.")
            return
        self.compiled = True


def module_prior(spec: PriorSpec, module: torch.nn.Module, preprocessing: Preprocessing, device: torch.device,
                 precision: str) -> ModulePrior:
    """`module` (fp32, on the CPU) as the prior of `spec` on `device`; PriorError if it fails at its input size."""
    module.eval().requires_grad_(False)
    fingerprint = fingerprint_weights(module)  # before the move, so fp32 CPU weights are hashed on every machine
    module = module.to(device)
    fast = Forward(module, device, precision)
    try:
        # Not every model exposes its output size; one probe forward finds it, and shows now rather
        # than mid-shard that the model runs at this input size. Through the forward the job runs:
        # its first call sets up kernels (seconds on a CPU), which the first batch then need not.
        probe = fast(torch.zeros(1, 3, *preprocessing.image_size))
    except RuntimeError as err:
        raise PriorError(
            f"{spec.model} does not run on {preprocessing.image_size[0]}x{preprocessing.image_size[1]} images: "
            f"{first_lines(err)}",
            hint="Pick another --image-size (at least the model's patch size), or leave it at the model's default.",
        ) from err
    return ModulePrior(spec, module, preprocessing, probe.shape[-1], fingerprint, device, precision, fast)


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


def resolve_precision(device: str, precision: str) -> str:
    """`precision`, with "auto" made the fastest safe one of `device`: bf16 on a GPU that computes in it
    and on a CPU with native bf16 arithmetic (see ModulePrior: 2.2x fp32 for ViT-S-32), else fp32.
    Either way each shard records how far its anchor outputs are from fp32 (participant/job.py)."""
    if precision != "auto":
        return precision
    kind = run_device(device, "fp32").type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if kind == "cpu" and cpu_flags() & NATIVE_BF16_FLAGS else "fp32"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); none where they cannot be read, which keeps fp32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def use_compile_cache() -> None:
    """Keep torch.compile's kernels across runs (ViT-S-32 takes ~80 s to compile on 2 busy cores) in the
    user's cache folder rather than a temporary one; TORCHINDUCTOR_CACHE_DIR, if set, still wins."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "coopt-hub" / "torch-compile"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))


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


