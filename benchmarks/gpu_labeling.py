"""GPU labeling throughput: ViT-B-32 at bf16 on synthetic 500x375 JPEGs (~80 KB each).

    python benchmarks/gpu_labeling.py [--images 8192] [--batch-size 256] [--workers N] [--device cuda]

on a CUDA machine where coopt-hub is installed (not merely on the path: its prior backends are entry
points). On one that has PyTorch, torchvision, timm, pyarrow and safetensors but no package index
(Python 3.12), bring the rest as wheels made where pip works,
    pip wheel --no-deps -w WHEELS . && pip download --no-deps --only-binary=:all: --python-version 3.12 \
        -d WHEELS open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
and run it there with one command from the repository's root:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site WHEELS/*.whl && \
        PYTHONPATH=/tmp/site python3 benchmarks/gpu_labeling.py

Measured, each in images/s, in one run:
- encode ceiling: the bf16 encoder alone on pre-decoded batches of 256 already on the GPU;
- decode ceiling: the GPU decode path alone (participant/decode.py: batched torchvision.io.decode_jpeg
  on the GPU, resize, crop and normalise there);
- CPU decode ceiling: PIL decoding + the prior's own preprocessing in N worker processes, nothing else;
- the labeling pipeline (coopt_hub.participant.labeling: read, decode, encode, chunk writes, gather)
  with CPU decoding in N processes, then with the decode path the library chooses for this device
  (the GPU's: decoding on a side stream per preparing thread, pinned buffers, a bounded prefetch queue).
Goal: the pipeline on the chosen path reaches >= 80% of min(its decode ceiling, encode ceiling).
`--compile` runs the prior through torch.compile.

Without CUDA it says so and exits 0. The last line is `pipeline/ceiling ratio: <x>` for the labeling
pipeline (`skipped` without CUDA).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from labeling import synthetic_jpeg  # benchmarks/labeling.py, next to this file

from coopt_hub.participant.collective import SingleProcess
from coopt_hub.participant.decode import GpuDecoder, decode_path
from coopt_hub.participant.job import load_job_prior
from coopt_hub.participant.labeling import Chunk, ChunkStore, collect_chunks, label_chunks
from coopt_hub.priors import Preprocessing, PriorSpec, decode_image

UNIQUE_IMAGES = 1024  # generating JPEGs is slow; the measured streams cycle through these
CHUNK_ROWS = 1024  # rows per chunk, like a storage unit of the source


def make_jpegs(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [synthetic_jpeg(rng, 500, 375, noise=13.0) for _ in range(count)]


# CPU decode ceiling: worker processes ----------------------------------------------------------

_WORKER: dict = {}


def _init_worker(path: str, preprocessing: dict) -> None:
    torch.set_num_threads(1)  # one process per core: each must stay on its own
    _WORKER["jpegs"] = pq.read_table(path).column("bytes").to_pylist()
    _WORKER["transform"] = Preprocessing.from_dict(preprocessing).transform()


def _decode_range(bounds: tuple[int, int]) -> int:
    jpegs, transform = _WORKER["jpegs"], _WORKER["transform"]
    for i in range(*bounds):
        transform(decode_image(jpegs[i % len(jpegs)]))
    return bounds[1] - bounds[0]


def cpu_decode_ceiling(jpegs_path: Path, preprocessing: Preprocessing, images: int, workers: int) -> float:
    # spawn, not fork: the parent has initialised CUDA.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, _init_worker, (str(jpegs_path), preprocessing.to_dict())) as pool:
        pool.map(_decode_range, [(0, 8)] * workers)  # start-up and first-call costs stay out of the timing
        step = 64
        started = time.perf_counter()
        done = sum(pool.imap_unordered(_decode_range, [(i, min(i + step, images)) for i in range(0, images, step)]))
        return done / (time.perf_counter() - started)


# GPU decoding: the library's decoder (participant/decode.py) ---------------------------------


def gpu_decode_ceiling(jpegs: list[bytes], decoder: GpuDecoder, images: int, batch_size: int) -> float:
    """Decode + resize + crop + normalise on the GPU alone, batch after batch."""
    decoder(jpegs[:batch_size], np.arange(batch_size))
    torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, images, batch_size):
        rows = range(start, min(start + batch_size, images))
        decoder([jpegs[i % len(jpegs)] for i in rows], np.asarray(rows))
    torch.cuda.synchronize()
    return images / (time.perf_counter() - started)


# Forward ceiling and the labeling pipeline -----------------------------------------------------


def forward_ceiling(prior, jpegs: list[bytes], device: torch.device, batch_size: int, repeats: int = 8) -> float:
    """The encoder alone on a pre-decoded batch already on the GPU."""
    pixels = torch.stack([prior.preprocess(decode_image(jpegs[i % len(jpegs)])) for i in range(batch_size)])
    pixels = pixels.to(device)
    prior.encode_batch(pixels)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        prior.encode_batch(pixels)  # returns on the CPU: every batch is synchronised, as in the pipeline
    return repeats * batch_size / (time.perf_counter() - started)


def labeling_pipeline(prior, jpegs: list[bytes], images: int, batch_size: int, workers: int, directory: Path,
                      decode: str) -> float:
    """coopt_hub's labeling (read, decode by the path `decode`, encode, store chunks, gather) in img/s."""
    cells = [{"bytes": jpegs[i % len(jpegs)], "path": None} for i in range(images)]
    chunks = [
        Chunk(f"unit-{start // CHUNK_ROWS:05d}", np.arange(start, min(start + CHUNK_ROWS, images), dtype=np.int64),
              lambda start=start: cells[start : start + CHUNK_ROWS])
        for start in range(0, images, CHUNK_ROWS)
    ]
    started = time.perf_counter()
    store = ChunkStore(directory)
    label_chunks(prior, chunks, store, batch_size=batch_size, workers=workers, decode=decode)
    collect_chunks(store, [c.name for c in chunks], SingleProcess())
    for chunk in chunks:
        store.read(chunk.name)
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes / threads")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", action="store_true", help="run the prior through torch.compile")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available: this benchmark needs a GPU.")
        print("pipeline/ceiling ratio: skipped")
        return
    device = torch.device(args.device)

    prior = load_job_prior(PriorSpec(model="ViT-B-32"), args.device, "bf16", args.compile)
    jpegs = make_jpegs(UNIQUE_IMAGES)
    path = decode_path(prior)
    print(f"ViT-B-32 bf16{' compiled' if prior.compiled else ''} on {torch.cuda.get_device_name(device)}; "
          f"{args.images} JPEGs 500x375 (~{sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KB), batch "
          f"{args.batch_size}, {args.workers} workers; decode path chosen: {path}")
    with tempfile.TemporaryDirectory(prefix="coopt-gpu-bench-") as scratch:
        scratch_dir = Path(scratch)
        jpegs_path = scratch_dir / "jpegs.parquet"
        pq.write_table(pa.table({"bytes": pa.array(jpegs, pa.binary())}), jpegs_path)

        encode = forward_ceiling(prior, jpegs, device, args.batch_size)
        print(f"encode ceiling (bf16 encoder alone, pre-decoded batches of {args.batch_size}): {encode:.0f} img/s")
        gpu_decode = gpu_decode_ceiling(jpegs, GpuDecoder(prior.preprocessing, device), args.images, args.batch_size)
        print(f"decode ceiling (decode_jpeg + resize on {device}): {gpu_decode:.0f} img/s")
        cpu_decode = cpu_decode_ceiling(jpegs_path, prior.preprocessing, args.images, args.workers)
        print(f"CPU decode ceiling (PIL in {args.workers} processes): {cpu_decode:.0f} img/s")

        processes = labeling_pipeline(prior, jpegs, args.images, args.batch_size, args.workers,
                                      scratch_dir / "processes", "processes")
        print(f"labeling pipeline, CPU decoding in {args.workers} processes: {processes:.0f} img/s = "
              f"{processes / min(cpu_decode, encode):.3f} of min(CPU decode, encode)")
        pipeline = labeling_pipeline(prior, jpegs, args.images, args.batch_size, args.workers,
                                     scratch_dir / "default", path)
        ceiling = min(gpu_decode if path == "gpu" else cpu_decode, encode)
        print(f"labeling pipeline, decode path {path}: {pipeline:.0f} img/s; ceiling min(decode, encode) "
              f"{ceiling:.0f} img/s")
        print(f"pipeline/ceiling ratio: {pipeline / ceiling:.3f}")


if __name__ == "__main__":
    main()
