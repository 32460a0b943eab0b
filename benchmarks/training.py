"""Training throughput of `--objective coopt` against `--objective supervised`, same backbone and batch.

    python benchmarks/training.py [--arch resnet18] [--image-size 32] [--batch-size 32] [--steps 6] [--rounds 5]

Synthetic data: random uint8 images and fp16 targets. The targets go through the real path: a
safetensors file written in a shuffled id order, read with `read_targets_file` and joined on id.
Each round trains both objectives for --steps steps, interleaved, after one untimed warm-up round,
and the best round of each is kept (other jobs only ever slow a round down). Two figures per run:
- wall samples/s, the trainer's own figure (two views per sample, probe and checkpoints excluded);
- on CPU, samples per CPU-second of this process, which other jobs on a shared host barely move.
  CPU runs use --threads intra-op threads (default 1, so no thread spins while waiting on another).
The ratio line uses CPU-seconds on a CPU and wall time on a GPU. The defaults are sized for 2 CPU
cores; on a GPU raise --batch-size and --steps. Also times reading and joining a targets file of
CIFAR size (--join-rows x --dim).

The last line is `coopt/supervised training throughput ratio: <x>` (the goal is >= 0.9).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from coopt_hub.training import TrainConfig, TrainingData, join_on_id, read_targets_file, train


def write_targets(path: Path, rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """A targets file with ids in shuffled order; returns the ids of the train rows (in row order)."""
    order = rng.permutation(rows).astype(np.int64)
    targets = rng.standard_normal((rows, dim), dtype=np.float32).astype(np.float16)
    save_file({"ids": order, "targets": targets, "raw": targets}, str(path))
    return np.arange(rows, dtype=np.int64)


def synthetic_data(path: Path, rows: int, dim: int, size: int, rng: np.random.Generator) -> TrainingData:
    ids = write_targets(path, rows, dim, rng)
    joined = join_on_id(ids, read_targets_file(path))
    return TrainingData(
        ids=torch.from_numpy(ids),
        images=torch.from_numpy(rng.integers(0, 256, (rows, 3, size, size), dtype=np.uint8)),
        targets={"aligned": torch.from_numpy(joined.aligned), "raw": torch.from_numpy(joined.raw)},
        labels=torch.from_numpy(rng.integers(0, 10, rows)),
        test=None,
        num_classes=10,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=512, help="target width (a CLIP ViT-B embedding)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per objective per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--join-rows", type=int, default=50_000, help="rows of the read+join timing")
    parser.add_argument("--threads", type=int, default=1, help="CPU only: torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "join.safetensors"
        ids = write_targets(big, args.join_rows, args.dim, rng)
        started = time.perf_counter()
        join_on_id(ids, read_targets_file(big))
        join_seconds = time.perf_counter() - started
        print(f"targets read+join: {join_seconds:.3f} s for {args.join_rows} x {args.dim} fp16 (shuffled ids)")

        data = synthetic_data(Path(tmp) / "train.safetensors", args.steps * args.batch_size, args.dim,
                              args.image_size, rng)

    def rates(objective: str) -> tuple[float, float]:
        """(wall samples/s, samples per CPU-second) of one short run."""
        config = TrainConfig(arch=args.arch, objective=objective, epochs=1, batch_size=args.batch_size,
                             eval_points=0, seed=args.seed, log_every=10**9)
        cpu_started = time.process_time()  # includes building the model: the same for both objectives
        result = train(config, data)
        return result.samples_per_s, result.samples / (time.process_time() - cpu_started)

    runs: dict[str, list[tuple[float, float]]] = {"coopt": [], "supervised": []}
    for objective in runs:  # warm-up: thread pools, allocator, first-call kernel selection
        rates(objective)
    for round_index in range(args.rounds):
        for objective in runs:
            runs[objective].append(rates(objective))
        print(f"round {round_index + 1}: " + ", ".join(
            f"{k} {v[-1][0]:.1f} samples/s ({v[-1][1]:.1f} per CPU-s)" for k, v in runs.items()))
    wall = {k: max(r[0] for r in v) for k, v in runs.items()}
    cpu = {k: max(r[1] for r in v) for k, v in runs.items()}
    device = "cuda" if cuda else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"{args.arch} {args.image_size}px batch {args.batch_size} on {device}, best of {args.rounds}: "
          + ", ".join(f"{k} {wall[k]:.1f} samples/s ({cpu[k]:.1f} per CPU-s)" for k in runs))
    print(f"wall-clock ratio: {wall['coopt'] / wall['supervised']:.3f}")
    chosen = wall if cuda else cpu
    print(f"coopt/supervised training throughput ratio: {chosen['coopt'] / chosen['supervised']:.3f}")


if __name__ == "__main__":
    main()
