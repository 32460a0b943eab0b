"""Time the per-round alignment work at paper scale: uniformity of one prior on |S| anchors, then
the cross-validated choice of its alignment T, as a participant or merge runs them.

    python benchmarks/alignment.py [--rows 10000] [--dim 1024] [--methods auto]

Steps timed, each printed before the last line:
  uniformity         V of the prior on the anchors (coopt_hub.core.align.uniformity, float32; row
                     blocks on every core)
  select_alignment   the whole selection with its defaults (5 seeded folds, methods "auto"): the
                     float64 copies of both inputs; fold sums X_k^T X_k, X_k^T Y_k (float64) in one
                     pass; per fold one eigendecomposition of the downdated training Gram that
                     scores every ridge strength on the grid (and the other methods when compared),
                     in the anchors' float32, the folds on every core; the float64 refit on every
                     anchor with its in-sample residual, beside the held-out cosines
Not timed: drawing the random data (float32, as participants' and merge's anchor outputs are). The last line is `uniformity+alignment seconds: <x>`, the sum of
both (the goal is <= 3 s on 2 CPU cores). CPU seconds, the BLAS threads and the load average are
printed too: on a shared machine wall time includes waiting for the other processes.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager

import numpy as np
from threadpoolctl import threadpool_info

from coopt_hub.core.align import select_alignment, uniformity


@contextmanager
def _step(name: str, times: dict[str, tuple[float, float]]):
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    times[name] = (time.perf_counter() - wall, time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000, help="anchor rows |S|")
    parser.add_argument("--dim", type=int, default=1024, help="common target dimension n")
    parser.add_argument("--methods", default="auto", help="'auto' or comma-separated names from align.METHODS")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    methods = args.methods if args.methods == "auto" else tuple(args.methods.split(","))

    rng = np.random.default_rng(args.seed)
    source = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    # float32 like the anchor outputs participants and merge align (model outputs, shard files).
    target = source @ (rng.standard_normal((args.dim, args.dim), dtype=np.float32) / np.float32(np.sqrt(args.dim)))
    target += np.float32(0.1) * rng.standard_normal(target.shape, dtype=np.float32)
    assert source.dtype == target.dtype == np.float32

    times: dict[str, tuple[float, float]] = {}
    with _step("uniformity", times):
        value = uniformity(source, t=2.0)
    with _step("select_alignment", times):
        fit = select_alignment(source, target, methods=methods, seed=args.seed)

    blas = ", ".join(f"{lib['internal_api']} {lib['num_threads']} thread(s)" for lib in threadpool_info()
                     if lib["user_api"] == "blas")
    print(f"rows={args.rows} dim={args.dim} uniformity {value:.4f}; BLAS: {blas}; load average "
          f"{' '.join(f'{load:.2f}' for load in os.getloadavg())} after the run")
    for candidate in fit.candidates:
        print(f"  {candidate.method} {candidate.params}: cv residual {candidate.cv_residual:.4f}, "
              f"cv cosine {candidate.cv_cosine:.4f}")
    print(f"chosen {fit.method}: residual in-sample {fit.residual:.4f}, cross-validated {fit.cv_residual:.4f}")
    for name, (wall, cpu) in times.items():
        print(f"{name}: {wall:.2f} s (CPU {cpu:.2f} s)")
    print(f"uniformity+alignment seconds: {sum(wall for wall, _ in times.values()):.2f}")


if __name__ == "__main__":
    main()
