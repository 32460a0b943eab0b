"""Time the per-round alignment work at paper scale: uniformity of one prior on |S| anchors, then the T fit.

    python benchmarks/alignment.py [--rows 10000] [--dim 1024]

The last line is `uniformity+alignment seconds: <x>` (the goal is <= 3 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from coopt_hub.core.align import fit_alignment, uniformity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000, help="anchor rows |S|")
    parser.add_argument("--dim", type=int, default=1024, help="common target dimension n")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    source = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    target = source @ rng.standard_normal((args.dim, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    target += 0.1 * rng.standard_normal(target.shape, dtype=np.float32)

    started = time.perf_counter()
    value = uniformity(source, t=2.0)
    after_uniformity = time.perf_counter()
    _, residual = fit_alignment(source, target)
    finished = time.perf_counter()

    print(f"rows={args.rows} dim={args.dim}")
    print(f"uniformity {value:.4f}: {after_uniformity - started:.2f} s")
    print(f"alignment fit (residual {residual:.4f}): {finished - after_uniformity:.2f} s")
    print(f"uniformity+alignment seconds: {finished - started:.2f}")


if __name__ == "__main__":
    main()
