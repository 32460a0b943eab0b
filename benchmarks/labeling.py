"""Labeling throughput: the whole pipeline, and `coopt-hub optimize` end to end, against the bare forward pass.

    python benchmarks/labeling.py [--model ViT-S-32] [--images 384] [--size 320x240] [--batch-size 64]
                                  [--workers 2] [--repeats 5] [--optimize-images 1024] [--optimize-repeats 3]

The pipeline reads JPEGs from a local parquet file row group by row group, decodes and preprocesses
them on worker threads, encodes them, stores each chunk with its completion marker, then gathers
the chunks and writes the concatenated outputs. The bare forward pass encodes the same batches,
preprocessed beforehand. The two are timed alternately, `--repeats` times each. On a machine shared
with other jobs, their load comes and goes within a run, so the ratio is taken between the best run
of each (the closest to an idle machine); the CPU seconds per image of each are printed as well.

End to end: `--optimize-images` of the same JPEGs are published as a source on an embedded hub, a
one-shard collaboration is initialised on it, and the real `coopt-hub optimize` runs in its own
process with its defaults (only the repo, shard, model and workdir given), from a fresh workdir
each time: start-up, model load, plan and anchor fetch, labeling of the shard and the anchors,
alignment and the result files. It is timed alternately with an eager fp32 forward pass over the
images it encodes (its rows and its anchors), at the batch size its report records.

The last two lines are `optimize end-to-end img/s vs eager forward: <x>` (goal: >= 1.2 on CPU) and
`pipeline/forward throughput ratio: <x>` (goal: >= 0.85 on a 2-core CPU machine).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
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

# A collaboration of one shard holding every row; 4 anchors per target dimension keep init quiet.
END_TO_END_ANCHORS = 64
END_TO_END_DIM = 16


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, noise: float = 8.0) -> bytes:
    """A photo-like JPEG: smooth colour regions plus sensor-like noise, so it compresses like a photo
    (500x375 at noise 13 is ~80 KB, an average ImageNet JPEG)."""
    coarse = rng.integers(0, 256, size=(max(height // 24, 2), max(width // 24, 2), 3), dtype=np.uint8)
    smooth = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.Resampling.BICUBIC), np.int16)
    noisy = np.clip(smooth + rng.normal(0, noise, size=smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_source(path: Path, jpegs: list[bytes], rows_per_group: int) -> None:
    cells = [{"bytes": jpeg, "path": None} for jpeg in jpegs]
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


def pixel_batches(prior, jpegs: list[bytes], batch_size: int) -> list[torch.Tensor]:
    return [torch.stack([prior.preprocess(decode_image(jpeg)) for jpeg in jpegs[start : start + batch_size]])
            for start in range(0, len(jpegs), batch_size)]


# `coopt-hub optimize` on an embedded hub (shared with clip_retrieval_side_by_side.py) ----------


@contextlib.contextmanager
def embedded_hub(root: Path) -> Iterator[None]:
    """A hub serving from `root`, with this process's clients and the commands it starts pointed at it."""
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("huggingface_hub was imported before the hub's endpoint was set; import it later.")
    from coopt_hub.server import HubServer

    server = HubServer(root / "hub", tokens=["bench-token"]).start()
    os.environ.update(server.env())
    os.environ.update({"HF_HOME": str(root / "hf-home"), "COOPT_HUB_HOME": str(root / "coopt-home"),
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                       "HF_HUB_DISABLE_TELEMETRY": "1"})
    try:
        yield
    finally:
        server.stop()


def publish_source(repo: str, images: list[bytes], rows_per_group: int) -> None:
    """`images` (encoded image files) as the `train` split of `repo`, in row groups of `rows_per_group`."""
    import datasets
    from huggingface_hub import CommitOperationAdd

    from coopt_hub.hub.client import Hub

    features = datasets.Features({"image": datasets.Image()})
    table = datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None} for data in images]},
                                       features=features)
    buffer = io.BytesIO()
    table.to_parquet(buffer, batch_size=rows_per_group)
    hub = Hub()
    hub.ensure_repo(repo)
    hub.commit(repo, "main", lambda head: [CommitOperationAdd("data/train-00000-of-00001.parquet", buffer.getvalue())],
               message="benchmark source")


def start_collaboration(repo: str, source: str) -> list[int]:
    """A collaboration `repo` of one shard holding every row of `source`; returns its anchor ids."""
    from coopt_hub.core.progress import Silent
    from coopt_hub.hub.client import Hub
    from coopt_hub.platform.init import initialize

    plan = initialize(Hub(), repo, source=source, source_revision=None, split="train", image_column="image",
                      shards=1, anchors=END_TO_END_ANCHORS, dim=END_TO_END_DIM, seed=0, temperature=2.0,
                      progress=Silent()).plan
    return list(plan.anchor_ids)


@dataclass(frozen=True)
class OptimizeRun:
    seconds: float  # wall clock of the whole command, its start-up included
    images: int  # images encoded: the shard's rows and the anchors
    report: dict  # the shard's report, as `--json` prints it


def run_optimize(repo: str, model: str, workdir: Path, *options: str) -> OptimizeRun:
    """`coopt-hub optimize REPO --shard 0` in its own process, from an empty `workdir`."""
    command = [sys.executable, "-m", "coopt_hub", "optimize", repo, "--shard", "0", "--model", model,
               "--workdir", str(workdir), "--json", *options]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout)["report"]
    return OptimizeRun(seconds, report["counts"]["rows"] + report["counts"]["anchor_rows"], report)


def describe_optimize(run: OptimizeRun) -> str:
    timings = ", ".join(f"{name} {value:.1f}s" for name, value in run.report["timings"].items())
    settings = ", ".join(f"{name} {value}" for name, value in run.report["run"].items())
    deviation = run.report.get("precision_deviation") or {}
    precision = run.report.get("precision", "fp32") + (
        f" (max cosine distance from fp32 {deviation['max_cosine_distance']:.1e} on {deviation['anchors']} anchors)"
        if deviation else "")
    # Outside the job's own clock: interpreter start, imports (torch, open_clip, ...) and exit.
    outside = run.seconds - run.report["timings"]["total_s"]
    return (f"{run.seconds:.1f}s for {run.images} images (precision {precision}, {settings}; in the job: {timings}; "
            f"start-up and exit outside it {outside:.1f}s)")


def measure_end_to_end(args: argparse.Namespace, prior, jpegs: list[bytes], scratch: Path) -> float:
    """Best end-to-end img/s of `coopt-hub optimize` over best eager forward img/s on the images it encodes
    (the hub of `embedded_hub` must be up)."""
    from coopt_hub.participant.chunks import ANCHOR_CHUNK_ROWS

    publish_source("bench/jpegs", jpegs, rows_per_group=args.batch_size)
    anchor_ids = start_collaboration("bench/jpegs-coopt", "bench/jpegs")
    runs = [run_optimize("bench/jpegs-coopt", args.model, scratch / "work-0")]
    # The forward gets the batches the job cuts, each from one chunk: the units (row groups), then the
    # anchors in their slices.
    batch_size = runs[0].report["run"]["batch_size"]
    anchors = [jpegs[i] for i in anchor_ids]
    chunks = ([jpegs[start : start + args.batch_size] for start in range(0, len(jpegs), args.batch_size)]
              + [anchors[start : start + ANCHOR_CHUNK_ROWS] for start in range(0, len(anchors), ANCHOR_CHUNK_ROWS)])
    batches = [batch for chunk in chunks for batch in pixel_batches(prior, chunk, batch_size)]
    images = sum(len(b) for b in batches)
    forward_rates = []
    for repeat in range(args.optimize_repeats):
        forward_rates.append(images / run_forward(prior, batches)[0])
        if repeat:
            runs.append(run_optimize("bench/jpegs-coopt", args.model, scratch / f"work-{repeat}"))
        print(f"end to end {repeat}: forward {forward_rates[-1]:.1f} img/s, optimize "
              f"{runs[-1].images / runs[-1].seconds:.1f} img/s ({describe_optimize(runs[-1])})")
    best = min(runs, key=lambda r: r.seconds)
    best_rate, forward = best.images / best.seconds, max(forward_rates)
    print(f"optimize: best {best_rate:.1f} img/s end to end, {best.report['counts']['rows']} rows and "
          f"{best.report['counts']['anchor_rows']} anchors; eager forward best {forward:.1f} img/s")
    return best_rate / forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-S-32")
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the synthetic JPEGs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--optimize-images", type=int, default=1024, help="rows of the end-to-end source")
    parser.add_argument("--optimize-repeats", type=int, default=3)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    rng = np.random.default_rng(0)
    jpegs = [synthetic_jpeg(rng, width, height) for _ in range(max(args.images, args.optimize_images))]
    with tempfile.TemporaryDirectory(prefix="coopt-bench-") as scratch, embedded_hub(Path(scratch) / "e2e"):
        scratch_dir = Path(scratch)
        prior = load_prior(PriorSpec(model=args.model))  # after the hub: it imports huggingface_hub
        source = scratch_dir / "source.parquet"
        # Row groups of one batch each: the pipeline's batches then equal the pre-made ones.
        write_source(source, jpegs[: args.images], rows_per_group=args.batch_size)
        chunks = parquet_chunks(source)
        batches = pixel_batches(prior, jpegs[: args.images], args.batch_size)
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
        del batches
        end_to_end = measure_end_to_end(args, prior, jpegs[: args.optimize_images], scratch_dir / "e2e")
        print(f"optimize end-to-end img/s vs eager forward: {end_to_end:.3f}")
        print(f"pipeline/forward throughput ratio: {max(pipeline_rates) / max(forward_rates):.3f}")


if __name__ == "__main__":
    main()
