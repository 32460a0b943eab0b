"""The suite's stand-ins, in one place: fake priors, a thread-backed process group, a recording progress.

Commands find a prior by its model name, so the fakes they must load are prior backends
(`--model pixel:net` reaches PixelPrior as `--model timm:NAME` reaches timm): tests/conftest.py
registers them for the test process (fixture `fake_backends`), and a `coopt-hub` process a test
starts registers them in its driver (`cli_command`). Nothing here replaces library code.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from PIL import Image

from coopt_hub.core.align import normalize
from coopt_hub.core.progress import Silent
from coopt_hub.priors import Preprocessing, Prior, PriorSpec
from coopt_hub.priors.registry import register_backend, unregister_backend

# Priors without a model: outputs made from a latent vector per sample ----------------------------

LATENT_DIM = 24


@dataclass(frozen=True)
class FakePrior:
    """A prior that sees only the first `rank` latent dimensions: fewer means a more collapsed, worse prior.

    It encodes latent vectors, not images: helpers_hub.Collaboration writes its shards directly.
    """

    name: str
    output_dim: int
    rank: int = LATENT_DIM
    seed: int = 0

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.name}:{self.output_dim}:{self.rank}:{self.seed}".encode()).hexdigest()

    def spec(self) -> dict:
        return {"model": self.name, "pretrained": None, "checkpoint": None, "seed": self.seed, "image_size": None}

    def encode(self, latent: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.output_dim, self.rank])
        mixing = rng.standard_normal((self.rank, self.output_dim))
        return normalize(latent[:, : self.rank] @ mixing)


# Priors of images that cost nothing to load -------------------------------------------------------


class PixelPrior(Prior):
    """A seeded random projection of 16x16 pixels: loads instantly in a fresh process and gives the
    very bytes it gives in this one, so a killed-and-rerun job can be compared with a clean run."""

    SIZE = 16

    def __init__(self, spec: PriorSpec):
        self.spec = spec
        self.preprocessing = Preprocessing(image_size=(self.SIZE, self.SIZE), mean=(0.0,) * 3, std=(1.0,) * 3,
                                           interpolation="bilinear", resize_mode="squash")
        self.output_dim = 24
        self.random_init = True
        generator = torch.Generator().manual_seed(spec.seed)
        self.weights = torch.randn(3 * self.SIZE * self.SIZE, self.output_dim, generator=generator,
                                   dtype=torch.float64)
        self.fingerprint = hashlib.sha256(self.weights.numpy().tobytes()).hexdigest()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        resized = image.convert("RGB").resize((self.SIZE, self.SIZE), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        # In float64, so that the summation order a thread count picks cannot reach the float32 result.
        return torch.tanh(pixels.reshape(len(pixels), -1).double() @ self.weights).float()


class NanPixelPrior(PixelPrior):
    """The pixel prior with NaN for the fourth image of every batch."""

    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        out = super().encode_batch(pixels)
        out[3] = float("nan")
        return out


class LinearPrior(Prior):
    """A fixed random linear map of 8x8 pixels; records the ids of every batch it encodes.

    It reads a sample's id from the first value of its pixels (red, top left, as id/255), where
    tests that use it put the id, so that `nan_ids` can target samples.
    """

    SIZE = 8

    def __init__(self, output_dim: int = 6, nan_ids: Sequence[int] = ()):
        self.spec = PriorSpec(model="linear-fake")
        self.preprocessing = Preprocessing(image_size=(self.SIZE, self.SIZE), mean=(0.5,) * 3, std=(0.5,) * 3,
                                           interpolation="bilinear", resize_mode="squash")
        self.output_dim = output_dim
        self.fingerprint = hashlib.sha256(b"linear-fake").hexdigest()
        self.random_init = True
        self.weights = torch.randn(3 * self.SIZE * self.SIZE, output_dim, generator=torch.Generator().manual_seed(0))
        self.nan_ids = set(nan_ids)
        self.batches: list[list[int]] = []
        self._lock = threading.Lock()

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        array = np.asarray(image.resize((self.SIZE, self.SIZE)), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        out = pixels.reshape(len(pixels), -1) @ self.weights
        ids = [round(float(v) * 255) for v in pixels[:, 0, 0, 0]]
        with self._lock:
            self.batches.append(ids)
        for row, sample_id in enumerate(ids):
            if sample_id in self.nan_ids:
                out[row] = float("nan")
        return out


# Real priors, changed -------------------------------------------------------------------------------


class Delegate(Prior):
    """Stands for `inner`: the same spec, preprocessing, output size, weights and precision."""

    def __init__(self, inner: Prior):
        self.inner = inner
        self.spec, self.preprocessing, self.output_dim = inner.spec, inner.preprocessing, inner.output_dim
        self.fingerprint, self.random_init = inner.fingerprint, inner.random_init
        self.precision = getattr(inner, "precision", "fp32")

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        return self.inner.preprocess(image)

    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_batch(pixels)

    def encode_fp32(self, pixels: torch.Tensor) -> torch.Tensor:
        # The reference the header's precision deviation is measured against: the inner prior's own.
        return self.inner.encode_fp32(pixels)


class Slow(Delegate):
    """The very prior it wraps, slowed down so that a test can kill its job half-way."""

    def __init__(self, inner: Prior, seconds_per_batch: float = 1.5):
        super().__init__(inner)
        self.seconds_per_batch = seconds_per_batch

    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds_per_batch)
        return self.inner.encode_batch(pixels)


class Wrapped(Delegate):
    """A real prior with its outputs changed by `alter`; a different prior as far as coopt-hub can tell."""

    def __init__(self, inner: Prior, tag: str):
        super().__init__(inner)
        self.fingerprint = f"{tag}-{inner.fingerprint}"

    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.alter(self.inner.encode_batch(pixels))

    def alter(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Collapsed(Wrapped):
    """Outputs pulled towards one direction: a clearly worse (higher-V) prior than the one it wraps."""

    def __init__(self, inner: Prior):
        super().__init__(inner, "collapsed")
        self.direction = torch.nn.functional.normalize(torch.ones(inner.output_dim), dim=0)

    def alter(self, out: torch.Tensor) -> torch.Tensor:
        return out + 2 * out.norm(dim=1, keepdim=True) * self.direction


class NanAt(Wrapped):
    """NaN for one row of every batch."""

    def __init__(self, inner: Prior, row: int):
        super().__init__(inner, "nan")
        self.row = row

    def alter(self, out: torch.Tensor) -> torch.Tensor:
        out[self.row] = float("nan")
        return out


# The fakes commands load by name ------------------------------------------------------------------

PIXEL_BACKEND = "pixel"
PIXEL_MODEL = f"{PIXEL_BACKEND}:net"


def _pixel_prior(spec: PriorSpec, device: str = "cpu", precision: str = "fp32") -> Prior:
    return PixelPrior(spec)


BACKENDS: dict[str, Callable[[PriorSpec, str, str], Prior]] = {PIXEL_BACKEND: _pixel_prior}


def register_backends() -> None:
    for name, factory in BACKENDS.items():
        register_backend(name, factory, replace=True)


def unregister_backends() -> None:
    for name in BACKENDS:
        unregister_backend(name)


# `coopt-hub` in a process of its own, with the fake backends registered first.
_CLI_DRIVER = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from fakes import register_backends
register_backends()
from coopt_hub.cli import main
main(sys.argv[1:])
"""


def cli_command(*args: str) -> list[str]:
    """The command line that runs `coopt-hub ARGS` in a new process that knows the fake backends."""
    return [sys.executable, "-c", _CLI_DRIVER, *args]


# A process group of threads -------------------------------------------------------------------------


class ThreadGroup:
    """In-process ranks (threads) with the collective operations the library needs."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size)
        self._slots: list[Any] = [None] * world_size
        self.broadcasts = 0

    def member(self, rank: int) -> Member:
        return Member(self, rank)

    def run(self, work: Callable[[Member], Any]) -> list[Any]:
        results: list[Any] = [None] * self.world_size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = work(self.member(rank))
            except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
                errors.append(err)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


class Member:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def barrier(self) -> None:
        self.group._barrier.wait()

    def all_gather(self, value: Any) -> list[Any]:
        self.group._slots[self.rank] = value
        self.barrier()
        gathered = list(self.group._slots)
        self.barrier()
        return gathered

    def broadcast(self, value: Any, src: int) -> Any:
        if self.rank == src:
            self.group._slots[0] = value
            self.group.broadcasts += 1
        self.barrier()
        received = self.group._slots[0]
        self.barrier()
        return received


# Progress -------------------------------------------------------------------------------------------


class RecordingProgress(Silent):
    """Keeps every note and warning it is given; draws no bars."""

    def __init__(self) -> None:
        self.infos: list[str] = []
        self.warnings: list[str] = []

    def info(self, message: str) -> None:
        self.infos.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
