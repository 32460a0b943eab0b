"""How a batch of image cells becomes the prior's pixels: the decode path, chosen by device and data.

- "threads": PIL decoding on threads of this process. On a CPU the forward pass needs the cores,
  and PIL and torch release the GIL, so threads cost least (labeling.py measures it).
- "processes": PIL decoding in worker processes, for a GPU prior fed from formats the GPU cannot
  decode: the forward leaves the cores free, and one process's GIL would cap the decoding rate.
- "gpu": nvjpeg on the GPU (torchvision.io.decode_jpeg, batched), resized, cropped and normalised
  there, for a GPU prior (measured on an H200 for ViT-B/32 and ~80 KB JPEGs: PIL in 16 processes
  2,900 img/s, nvjpeg 8,400 img/s). A batch that is not all JPEGs is decoded by PIL instead. The
  GPU resamples like PIL up to rounding (<= 0.015 per normalised value), so the path is part of a
  run's identity (workdir.prior_key) and is fixed by the device alone, before any image is read.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from coopt_hub.errors import BadImageError
from coopt_hub.priors import Preprocessing, Prior, decode_image

DECODE_PATHS = ("threads", "processes", "gpu")
JPEG_MAGIC = b"\xff\xd8\xff"


def cell_bytes(cell: Any) -> bytes | None:
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    return data if isinstance(data, bytes) else None


def choose_decode_path(device_type: str, preprocessing: Preprocessing, gpu_decoder: bool) -> str:
    """The decode path of a prior on `device_type`: the GPU's when torchvision decodes on it
    (`gpu_decoder`) and the preprocessing is a resize and centre crop it can reproduce."""
    if device_type != "cuda":
        return "threads"
    return "gpu" if gpu_decoder and preprocessing.resize_mode == "shortest" else "processes"


def decode_path(prior: Prior) -> str:
    """The decode path of `prior`'s jobs, fixed before any image is read (it is part of their identity)."""
    device = getattr(prior, "device", torch.device("cpu"))
    return choose_decode_path(device.type, prior.preprocessing, gpu_decoder_available(device))


@functools.cache
def gpu_decoder_available(device: torch.device) -> bool:
    """Whether torchvision decodes JPEGs on `device` (a CUDA build of torchvision with nvjpeg)."""
    if device.type != "cuda":
        return False
    try:
        from torchvision.io import decode_jpeg

        decode_jpeg([torch.frombuffer(bytearray(tiny_jpeg()), dtype=torch.uint8)], device=device)
    except Exception:  # noqa: BLE001 - a CPU-only torchvision or a missing nvjpeg fail in their own ways
        return False
    return True


def decode_batch(transform, cells: Sequence[Any], ids: np.ndarray) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """PIL decode + `transform` per cell: (pixels, kept ids, undecodable ids), in order."""
    tensors, kept, bad = [], [], []
    for cell, sample_id in zip(cells, ids):
        try:
            image = decode_image(cell, int(sample_id))
        except BadImageError:
            bad.append(int(sample_id))
            continue
        tensors.append(transform(image))
        kept.append(int(sample_id))
    return tensors, kept, bad


# "processes": one transform per worker process ------------------------------------------------

_WORKER: dict[str, Any] = {}


def init_worker(preprocessing: dict) -> None:
    torch.set_num_threads(1)  # one decoding process per core
    _WORKER["transform"] = Preprocessing.from_dict(preprocessing).transform()


def decode_in_worker(cells: Sequence[Any], ids: np.ndarray) -> tuple[torch.Tensor | None, list[int], list[int]]:
    tensors, kept, bad = decode_batch(_WORKER["transform"], cells, ids)
    return (torch.stack(tensors) if tensors else None), kept, bad


# "gpu": nvjpeg, then the resize and crop of open_clip's "shortest" mode on the GPU --------------


class GpuDecoder:
    """Decode a batch of JPEG cells on `device` and preprocess them there, on a stream of its own."""

    def __init__(self, preprocessing: Preprocessing, device: torch.device):
        from torchvision.transforms import InterpolationMode

        self.preprocessing = preprocessing
        self.device = device
        self.interpolation = InterpolationMode(preprocessing.interpolation)
        self.mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1)

    def __call__(self, cells: Sequence[Any], ids: np.ndarray) -> tuple[torch.Tensor | None, list[int], list[int]]:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            pixels, kept, bad = self._decode(cells, ids)
        if stream is not None and pixels is not None:
            # Ready before the encoder sees it; its memory not reused until the forward is done with it.
            stream.synchronize()
            pixels.record_stream(torch.cuda.current_stream(self.device))
        return pixels, kept, bad

    def _decode(self, cells: Sequence[Any], ids: np.ndarray) -> tuple[torch.Tensor | None, list[int], list[int]]:
        from torchvision.io import ImageReadMode, decode_jpeg

        files = [cell_bytes(cell) or b"" for cell in cells]
        if not all(data.startswith(JPEG_MAGIC) for data in files):
            return self._one_by_one(cells, ids)
        data = [torch.frombuffer(bytearray(file), dtype=torch.uint8) for file in files]
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            # One broken or CMYK file fails the whole batch: decode it image by image instead.
            return self._one_by_one(cells, ids)
        return self._preprocess(images), [int(i) for i in ids], []

    def _one_by_one(self, cells: Sequence[Any], ids: np.ndarray) -> tuple[torch.Tensor | None, list[int], list[int]]:
        transform = self.preprocessing.transform()
        tensors, kept, bad = decode_batch(transform, cells, ids)
        return (torch.stack(tensors).to(self.device) if tensors else None), kept, bad

    def _preprocess(self, images: list[torch.Tensor]) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        height, width = self.preprocessing.image_size
        shortest = math.floor(min(height, width) / self.preprocessing.crop_pct)
        resized = [F.center_crop(F.resize(image, shortest, interpolation=self.interpolation, antialias=True),
                                 [height, width]) for image in images]
        batch = torch.stack(resized).float().div_(255)
        return (batch - self.mean) / self.std


def tiny_jpeg() -> bytes:
    """A 1x1 JPEG: what gpu_decoder_available asks the GPU to decode."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (1, 1)).save(buffer, format="JPEG")
    return buffer.getvalue()
