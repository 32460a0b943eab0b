"""Training throughput of `--objective coopt` against `--objective supervised`, same backbone and batch;
and the demo's comparison over 3 seeds, with the speedup of CoOpt over BYOL.

    python benchmarks/training.py [--arch resnet18] [--image-size 32] [--batch-size 32] [--steps 6] [--rounds 5]
                                  [--seeds 3 | --skip-comparison]

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

The comparison runs `coopt-hub demo`'s whole collaboration (embedded hub, three random-init
priors, merge) in its own process, then trains the student four ways with --seeds seeds, at equal
epochs and equal wall-clock with the participants' labelling seconds on CoOpt's clock. It prints
the table (means with 95% intervals), the verdicts, and `coopt speedup over byol: <x>` (CoOpt's
time to reach BYOL's final probe accuracy; `never reached` when it does not). It takes about
--seeds times the demo's training phase (minutes per seed on 2 CPU cores).

The last line is `coopt/supervised training throughput ratio: <x>` (the goal is >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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


# The demo points the Hub clients at its embedded hub before they are imported, which this process
# (importing coopt_hub.training) has already done: it runs in a child process.
DEMO = """
import json, logging
from coopt_hub.demo.demo import DemoConfig, run_demo
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
print(json.dumps(run_demo(DemoConfig(seeds={seeds})).to_dict()))
"""


def demo_comparison(seeds: int) -> None:
    """Run the demo with `seeds` seeds and print its comparison, its findings and the speedup line."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", DEMO.format(seeds=seeds)], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the demo failed (exit {done.returncode}); its log is above")
    report = json.loads(done.stdout)
    print(f"demo comparison, {seeds} seed(s), {time.perf_counter() - started:.0f} s:")
    for row in report["comparison"]:
        interval = "no interval" if row["interval"] is None else f"± {row['interval']:.3f}"
        print(f"  {row['objective']:<10} {row['budget']:<6} {row['epochs']:5.2f} epochs {row['seconds']:7.1f} s  "
              f"probe accuracy {row['accuracy']:.3f} {interval}")
    for line in report["findings"]:
        print(f"  {line}")
    print(f"results: {report['results'].get('markdown')}")
    speedup = report["speedup"]
    print(f"coopt speedup over byol: {'never reached' if speedup is None else f'{speedup:.2f}'}")


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
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the demo comparison")
    parser.add_argument("--skip-comparison", action="store_true", help="measure throughput only")
    args = parser.parse_args()
    if not args.skip_comparison:
        demo_comparison(args.seeds)
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
