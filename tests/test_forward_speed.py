"""A forward faster than eager fp32: the precision chosen per device, bf16 weights on the CPU,
channels-last convolutions, torch.compile with its fallback, and the decode paths of the pipeline."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from coopt_hub.errors import ConfigError
from coopt_hub.participant.decode import GpuDecoder, choose_decode_path, decode_path
from coopt_hub.participant.labeling import Chunk, ChunkStore, label_chunks
from coopt_hub.priors import Preprocessing, PriorSpec, decode_image, load_prior
from coopt_hub.priors.base import NATIVE_BF16_FLAGS, cpu_flags, resolve_precision

SMALL = PriorSpec(model="ViT-S-32", image_size=32)
CONV = PriorSpec(model="timm:resnet10t", image_size=32)


@pytest.fixture(scope="module")
def fp32():
    return load_prior(SMALL)


@pytest.fixture(scope="module")
def bf16():
    return load_prior(SMALL, precision="bf16")


def jpeg(rng: np.random.Generator, width: int, height: int, mode: str = "RGB", format: str = "JPEG") -> bytes:
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).convert(mode).save(buffer, format=format)
    return buffer.getvalue()


def pixels_of(prior, images: list[bytes]) -> torch.Tensor:
    return torch.stack([prior.preprocess(decode_image(image)) for image in images])


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - torch.nn.functional.cosine_similarity(a, b)


def test_auto_precision_is_bf16_where_the_device_computes_in_it():
    native = bool(cpu_flags() & NATIVE_BF16_FLAGS)
    assert resolve_precision("cpu", "auto") == ("bf16" if native else "fp32"), "auto on this CPU"
    for given in ("fp32", "bf16"):
        assert resolve_precision("cpu", given) == given, "an explicit precision is kept"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_precision("cuda", "auto")


def test_bf16_on_the_cpu_runs_bf16_weights_close_to_the_kept_fp32_forward(fp32, bf16):
    assert bf16._fast.dtype == torch.bfloat16, "CPU bf16 must run bf16 weights, not autocast"
    assert next(bf16._module.parameters()).dtype == torch.float32, "the fp32 weights are kept for the reference"
    pixels = pixels_of(fp32, [jpeg(np.random.default_rng(i), 40, 30) for i in range(6)])
    fast, reference = bf16.encode_batch(pixels), bf16.encode_fp32(pixels)
    assert fast.dtype == torch.float32 and fast.shape == reference.shape == (6, 384)
    assert torch.equal(reference, fp32.encode_batch(pixels)), "encode_fp32 is the eager fp32 forward"
    distance = cosine_distance(fast, reference)
    assert 0 < distance.max() < 0.02, f"bf16 deviates {distance.max():.4f} from fp32 (tolerance 0.02)"


def test_convolutional_priors_run_channels_last_and_transformers_do_not(fp32):
    conv = load_prior(CONV)
    assert conv.channels_last and not fp32.channels_last
    pixels = pixels_of(conv, [jpeg(np.random.default_rng(i), 40, 30) for i in range(3)])
    nchw = conv.encode_fp32(pixels.contiguous())
    assert torch.allclose(conv.encode_batch(pixels), nchw, rtol=1e-4, atol=1e-5), "NHWC changes the features"


# The compile fallback: a platform without a C++ compiler cannot build inductor's CPU kernels.
NO_COMPILER = """
import torch
from coopt_hub.priors import PriorSpec, load_prior
prior = load_prior(PriorSpec(model="ViT-S-32", image_size=32))
prior.compile()
assert not prior.compiled, "compiled without a compiler"
print(prior.compile_fallback)
out = prior.encode_batch(torch.zeros(2, 3, 32, 32))
assert out.shape == (2, 384)
"""


@pytest.mark.slow
def test_compile_without_a_compiler_falls_back_to_eager_with_a_message(tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", NO_COMPILER], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.compile cannot compile this model here" in done.stdout
    assert "runs uncompiled" in done.stdout


@pytest.mark.slow
def test_compiled_forward_matches_eager_and_is_repeatable(fp32, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile-cache"))
    compiled = load_prior(SMALL)
    compiled.compile()
    assert compiled.compiled and compiled.compile_fallback is None
    pixels = pixels_of(fp32, [jpeg(np.random.default_rng(i), 40, 30) for i in range(5)])
    out = compiled.encode_batch(pixels)
    assert torch.equal(out, compiled.encode_batch(pixels)), "the compiled forward is not repeatable"
    assert cosine_distance(out, fp32.encode_batch(pixels)).max() < 1e-4, "compiled features differ from eager"


def test_a_prior_that_is_no_torch_module_says_why_it_stays_uncompiled(fake_backends):
    fake = load_prior(PriorSpec(model="pixel:net"))
    fake.compile()
    assert not fake.compiled and "not a torch module" in fake.compile_fallback


# Decode paths ---------------------------------------------------------------------------------


def test_decode_path_is_chosen_by_device_and_preprocessing(fp32):
    shortest = fp32.preprocessing
    squash = Preprocessing(image_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic",
                           resize_mode="squash")
    assert choose_decode_path("cuda", shortest, gpu_decoder=True) == "gpu"
    assert choose_decode_path("cuda", shortest, gpu_decoder=False) == "processes", "no nvjpeg: CPU processes"
    assert choose_decode_path("cuda", squash, gpu_decoder=True) == "processes", "a resize the GPU path lacks"
    assert choose_decode_path("cpu", shortest, gpu_decoder=True) == "threads"
    assert decode_path(fp32) == "threads", "a CPU prior decodes on threads"


def test_gpu_decoder_resamples_like_pil_and_leaves_other_batches_to_pil(fp32):
    # torchvision's decode_jpeg runs on the CPU as well: the GPU path's arithmetic, tested here.
    rng = np.random.default_rng(0)
    decoder = GpuDecoder(fp32.preprocessing, torch.device("cpu"))
    jpegs = [jpeg(rng, 40, 30), jpeg(rng, 33, 50), jpeg(rng, 36, 36, mode="L")]
    pixels, kept, bad = decoder(jpegs, np.arange(3))
    assert kept == [0, 1, 2] and bad == []
    assert (pixels - pixels_of(fp32, jpegs)).abs().max() < 0.05, "the GPU path resamples unlike PIL"
    mixed = [jpegs[0], jpeg(rng, 20, 20, format="PNG"), b"not an image"]
    pixels, kept, bad = decoder(mixed, np.array([5, 6, 7]))
    assert kept == [5, 6] and bad == [7], "a batch that is not all JPEGs goes through PIL, its bad rows reported"
    assert torch.equal(pixels, pixels_of(fp32, mixed[:2]))


@pytest.mark.slow
def test_decoding_in_processes_gives_the_bytes_of_decoding_on_threads(fp32, tmp_path):
    rng = np.random.default_rng(1)
    cells = [{"bytes": jpeg(rng, 40, 30), "path": None} for _ in range(10)] + [{"bytes": b"broken", "path": None}]
    chunks = [Chunk("unit-00000", np.arange(6), lambda: cells[:6]), Chunk("unit-00001", np.arange(6, 11),
                                                                         lambda: cells[6:])]
    stores = {}
    for path in ("threads", "processes"):
        stores[path] = ChunkStore(tmp_path / path)
        stats = label_chunks(fp32, chunks, stores[path], batch_size=4, workers=2, decode=path)
        assert stats.bad_ids == [10] and stats.first_batch_s > 0
    for chunk in chunks:
        assert stores["threads"].export(chunk.name) == stores["processes"].export(chunk.name), chunk.name


def test_the_gpu_decode_path_runs_through_the_pipeline(fp32, tmp_path):
    # On the CPU, decode_jpeg and the resize run there: the pipeline's plumbing of the GPU path, tested.
    rng = np.random.default_rng(2)
    cells = [{"bytes": jpeg(rng, 40, 30), "path": None} for _ in range(7)] + [{"bytes": b"broken", "path": None}]
    chunks = [Chunk("unit-00000", np.arange(8), lambda: cells)]
    outputs = {}
    for path in ("threads", "gpu"):
        store = ChunkStore(tmp_path / path)
        stats = label_chunks(fp32, chunks, store, batch_size=3, workers=2, decode=path)
        assert stats.bad_ids == [7], path
        outputs[path] = store.read("unit-00000")
    assert np.array_equal(outputs["gpu"].ids, outputs["threads"].ids)
    similarity = np.sum(outputs["gpu"].features * outputs["threads"].features, axis=1)
    assert similarity.min() > 0.99, "the GPU path's pixels give other features"
