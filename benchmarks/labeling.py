"""Labeling throughput: the whole pipeline against the bare forward pass (same model, images, batches).

    python benchmarks/labeling.py [--model ViT-S-32] [--images 384] [--size 320x240] [--batch-size 64]
                                  [--workers 2] [--repeats 3]

The pipeline reads JPEGs from a local parquet file row group by row group, decodes and preprocesses
them on worker threads, encodes them, stores each chunk with its completion marker, then gathers
the chunks and writes the concatenated outputs. The bare forward pass encodes the same batches,
preprocessed beforehand. The two are timed alternately, `--repeats` times each. On a machine shared
with other jobs, their load comes and goes within a run, so the ratio is taken between the best run
of each (the closest to an idle machine); the CPU seconds per image of each are printed as well.

The last line is `pipeline/forward throughput ratio: <x>` (goal: >= 0.85 on a 2-core CPU machine).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.numpy import save_file

from coopt_hub.participant.collective import SingleProcess
from coopt_hub.participant.labeling import Chunk, ChunkStore, collect_chunks, label_chunks
from coopt_hub.priors import PriorSpec, decode_image, load_prior


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, noise: float = 8.0) -> bytes:
    """A photo-like JPEG: smooth colour regions plus sensor-like noise, so it compresses like a photo
    (500x375 at noise 13 is ~80 KB, an average ImageNet JPEG)."""
    coarse = rng.integers(0, 256, size=(max(height // 24, 2), max(width // 24, 2), 3), dtype=np.uint8)
    smooth = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.Resampling.BICUBIC), np.int16)
    noisy = np.clip(smooth + rng.normal(0, noise, size=smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_source(path: Path, images: int, width: int, height: int, rows_per_group: int) -> None:
    rng = np.random.default_rng(0)
    cells = [{"bytes": synthetic_jpeg(rng, width, height), "path": None} for _ in range(images)]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array(cells, image_type)}), path, row_group_size=rows_per_group)


def parquet_chunks(path: Path) -> list[Chunk]:
    """One chunk per row group, read only when the pipeline gets to it, as a participant reads units."""
    metadata = pq.ParquetFile(path).metadata
    chunks, start = [], 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows

        def load(group=group):
            return pq.ParquetFile(path).read_row_group(group, columns=["image"]).column("image").to_pylist()

        chunks.append(Chunk(f"unit-{group:05d}", np.arange(start, start + rows, dtype=np.int64), load))
        start += rows
    return chunks


def run_pipeline(prior, chunks: list[Chunk], directory: Path, batch_size: int, workers: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    store = ChunkStore(directory)
    label_chunks(prior, chunks, store, batch_size=batch_size, workers=workers)
    collect_chunks(store, [c.name for c in chunks], SingleProcess())
    outputs = [store.read(c.name) for c in chunks]
    save_file({"ids": np.concatenate([o.ids for o in outputs]),
               "features": np.concatenate([o.features for o in outputs]).astype(np.float16)},
              str(directory / "targets.safetensors"))
    return time.perf_counter() - started, time.process_time() - cpu_started


def run_forward(prior, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    for pixels in batches:
        prior.encode_batch(pixels)
    return time.perf_counter() - started, time.process_time() - cpu_started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-S-32")
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the synthetic JPEGs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    prior = load_prior(PriorSpec(model=args.model))
    with tempfile.TemporaryDirectory(prefix="coopt-bench-") as scratch:
        scratch_dir = Path(scratch)
        source = scratch_dir / "source.parquet"
        # Row groups of one batch each: the pipeline's batches then equal the pre-made ones.
        write_source(source, args.images, width, height, rows_per_group=args.batch_size)
        chunks = parquet_chunks(source)
        batches = [torch.stack([prior.preprocess(decode_image(cell)) for cell in chunk.load()]) for chunk in chunks]
        mean_kb = source.stat().st_size / args.images / 1024
        print(f"{args.model} at {prior.preprocessing.image_size[0]} px, {args.images} JPEGs {args.size} "
              f"(~{mean_kb:.0f} KB), batch {args.batch_size}, {args.workers} workers, "
              f"{torch.get_num_threads()} torch threads")
        run_forward(prior, batches[:1])  # warm-up: first-call allocations and kernel selection

        forward_rates, pipeline_rates, forward_cpu, pipeline_cpu = [], [], [], []
        for repeat in range(args.repeats):
            wall, cpu = run_forward(prior, batches)
            forward_rates.append(args.images / wall)
            forward_cpu.append(cpu / args.images)
            wall, cpu = run_pipeline(prior, chunks, scratch_dir / f"run-{repeat}", args.batch_size, args.workers)
            pipeline_rates.append(args.images / wall)
            pipeline_cpu.append(cpu / args.images)
            print(f"repeat {repeat}: forward {forward_rates[-1]:.1f} img/s, pipeline {pipeline_rates[-1]:.1f} img/s")
        print(f"forward: best {max(forward_rates):.1f} img/s, median {statistics.median(forward_rates):.1f}; "
              f"CPU {1000 * statistics.median(forward_cpu):.1f} ms/img")
        print(f"pipeline: best {max(pipeline_rates):.1f} img/s, median {statistics.median(pipeline_rates):.1f}; "
              f"CPU {1000 * statistics.median(pipeline_cpu):.1f} ms/img")
        print(f"pipeline/forward throughput ratio: {max(pipeline_rates) / max(forward_rates):.3f}")


if __name__ == "__main__":
    main()
