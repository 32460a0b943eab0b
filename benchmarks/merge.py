"""Time and memory of `coopt-hub merge --images reference` on synthetic targets at scale.

    python benchmarks/merge.py [--rows 1000000] [--dim 512] [--shards 8] [--realigned half|all] [--no-evaluate]
                               [--workdir DIR] [--profile FILE]

Starts its own embedded Hub over a temp dir, publishes a source split of --rows rows (a label column
and a placeholder image column, in row groups), the plan, and --shards shard branches whose
targets/anchors files are written with coopt_hub.storage. The synthetic priors share structure on
the anchors (a common latent seen through each prior's own map, plus noise that grows with the shard
index), so the merge ranks the last shard's prior best and none looks like noise. With --realigned
half (the default), the shards below half were aligned by their participants to shard 0's prior, not
the best, so the merge re-aligns them and keeps the others as pushed; with --realigned all, every
shard was aligned to shard 0's prior: the merge fits a map for each but the best (the worst case).
Then `coopt-hub merge` runs in a subprocess, so that setup does not count, and its peak resident
memory (VmHWM, Linux) is recorded as it exits.
The source has a label column, so the merge measures the targets' quality (platform.evaluate)
unless --no-evaluate; the output says which. The CPU seconds are the merge process's own (user +
system) and, apart, the embedded hub's while the merge runs (it serves the downloads and takes the
uploads on the same cores); the load average is printed with them: on a shared machine the wall
time is not the merge's alone. Their sum over the machine's cores (`CPU floor:`) is the least wall
time in which that work could finish, however well its stages overlapped.

The goal at 1,000,000 x 512: <= 35 s and <= 600 MiB, the memory flat in the rows (check at 4x).
The last two lines are `merge seconds: <x>` and `peak RSS MiB: <x>`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKEN = "benchmark-token"
ROWS_PER_GROUP = 50_000
ROWS_PER_FILE = 500_000
TEST_ROWS = 10_000
ANCHORS = 1024
LATENT_DIM = 32  # what the synthetic priors share on the anchors


def write_source(directory: Path, rows: int) -> dict[str, Path]:
    """Parquet files of a train split of `rows` rows and a small test split, written in row groups."""
    import io

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    # One 1x1 PNG for every row: the image column exists (the plan needs it) without a large source.
    png = io.BytesIO()
    Image.new("RGB", (1, 1)).save(png, format="PNG")
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    schema = features.arrow_schema
    rng = np.random.default_rng(0)
    files = {}
    for split, count in (("train", rows), ("test", TEST_ROWS)):
        num_files = max(1, -(-count // ROWS_PER_FILE))
        for index in range(num_files):
            path = directory / f"{split}-{index:05d}-of-{num_files:05d}.parquet"
            start, stop = index * count // num_files, (index + 1) * count // num_files
            with pq.ParquetWriter(path, schema) as writer:
                for first in range(start, stop, ROWS_PER_GROUP):
                    n = min(ROWS_PER_GROUP, stop - first)
                    image = pa.StructArray.from_arrays(
                        [pa.array([png.getvalue()] * n, pa.binary()), pa.nulls(n, pa.string())], names=["bytes", "path"]
                    )
                    label = pa.array(rng.integers(0, 10, n), pa.int64())
                    writer.write_table(pa.Table.from_arrays([image, label], schema=schema))
            files[f"data/{path.name}"] = path
    return files


def push(hub, repo: str, branch: str, files: dict[str, Path], message: str) -> str:
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(path, str(local)) for path, local in files.items()]
    return hub.commit(repo, branch, lambda head: operations, message=message)


def write_shards(hub, repo: str, plan, directory: Path, seed: int, realigned: str = "half") -> None:
    """One branch per shard. Each prior's anchor outputs are a shared latent seen through the prior's
    own random map, plus noise growing with k: every prior agrees with the others on neighbours, and
    the last is the most uniform (lowest V), so the merge takes it as the reference. The shards below
    half (`realigned` "half"), or all of them ("all"), say they were aligned to shard 0's prior."""
    from coopt_hub.core.layout import remote_paths, shard_branch
    from coopt_hub.core.shardfile import AnchorOutputs, ShardHeader, ShardResult, write_shard

    rng = np.random.default_rng(seed)
    best = plan.num_shards - 1
    fingerprint = [f"{k:02d}" * 32 for k in range(plan.num_shards)]
    latent = rng.standard_normal((ANCHORS, LATENT_DIM), dtype=np.float32)
    for k in range(plan.num_shards):
        ids = plan.shard_ids(k)
        raw = np.empty((ids.size, plan.dim), np.float16)
        aligned = np.empty_like(raw)
        for start in range(0, ids.size, 65536):
            block = rng.standard_normal((min(65536, ids.size - start), plan.dim), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            raw[start : start + len(block)] = block
            aligned[start : start + len(block)] = block
        output_dim = 256 * (1 + k % 3)
        mixing = rng.standard_normal((LATENT_DIM, output_dim), dtype=np.float32) / np.sqrt(LATENT_DIM)
        features = latent @ mixing + (0.5 + 0.15 * k) * rng.standard_normal((ANCHORS, output_dim), dtype=np.float32)
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        reference_shard = 0 if realigned == "all" or k < plan.num_shards // 2 else best
        header = ShardHeader(
            shard=k,
            plan_hash=plan.plan_hash,
            source_revision=plan.source_revision,
            prior={"model": f"prior-{k}", "pretrained": None, "checkpoint": None, "seed": k, "image_size": None},
            preprocessing={},
            fingerprint=fingerprint[k],
            output_dim=output_dim,
            dim=plan.dim,
            uniformity=-2.0 - 0.1 * k,
            reference=None
            if reference_shard == k
            else {"shard": reference_shard, "branch": shard_branch(reference_shard), "commit": "0" * 40,
                  "fingerprint": fingerprint[reference_shard]},
            residual=0.1,
            num_rows=int(ids.size),
            tool_version="benchmark",
            checksums={},
        )
        anchors = AnchorOutputs(
            ids=np.asarray(plan.anchor_ids, np.int64),
            features=features,
            projected=features @ plan.projection(output_dim),
        )
        local = directory / f"shard-{k}"
        write_shard(local, ShardResult(header, ids, raw, aligned), anchors)
        del raw, aligned
        paths = remote_paths(k)
        hub.ensure_branch(repo, shard_branch(k))
        push(hub, repo, shard_branch(k), {paths.targets: local / "targets.safetensors",
                                          paths.anchors: local / "anchors.safetensors"}, f"shard {k}")
        shutil.rmtree(local)


# Runs `coopt-hub merge` and, at exit, records the process's own high-water mark. VmHWM belongs to the
# address space exec() created; ru_maxrss (getrusage, wait4) would also count the pages of the
# parent it was forked from, which holds the server and the setup.
_MERGE_WITH_HWM = """
import atexit, os, sys
from coopt_hub.cli import main

def record():
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["COOPT_BENCH_HWM_FILE"], "w") as out:
        out.write(kib)

atexit.register(record)
profile = os.environ.get("COOPT_BENCH_PROFILE")
if profile:
    import cProfile
    profiler = cProfile.Profile()
    atexit.register(lambda: profiler.dump_stats(profile))  # before record (atexit runs last-in first)
    profiler.enable()
main(sys.argv[1:])
"""


@dataclass(frozen=True)
class MergeRun:
    seconds: float
    cpu_seconds: float  # the merge process's user + system time
    system_seconds: float  # of which system (page faults, copies in and out of the kernel)
    server_cpu_seconds: float  # this process's meanwhile: the embedded hub serving the merge
    peak_mib: float
    page_faults: int  # the merge process's minor page faults: on a VM each costs microseconds of system time
    summary: dict  # merge --json


def run_merge(repo: str, env: dict[str, str], scratch: Path, evaluate: bool, profile: Path | None = None) -> MergeRun:
    """`coopt-hub merge` in its own process: its wall and CPU time, peak RSS and --json summary."""
    hwm_file = scratch / "merge-hwm-kib"
    command = [sys.executable, "-c", _MERGE_WITH_HWM, "merge", repo, "--images", "reference", "--json"]
    before, server_before = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    completed = subprocess.run(command + ([] if evaluate else ["--no-evaluate"]), check=False,
                               env={**env, "COOPT_BENCH_HWM_FILE": str(hwm_file),
                                    **({"COOPT_BENCH_PROFILE": str(profile)} if profile else {})},
                               stdout=subprocess.PIPE)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the only child process is the merge
    server_after = resource.getrusage(resource.RUSAGE_SELF)
    if completed.returncode != 0:
        sys.exit(f"merge failed with exit code {completed.returncode}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    system = after.ru_stime - before.ru_stime
    server = (server_after.ru_utime - server_before.ru_utime + server_after.ru_stime - server_before.ru_stime)
    faults = after.ru_minflt - before.ru_minflt
    return MergeRun(seconds, cpu, system, server, int(hwm_file.read_text()) / 1024, faults,
                    json.loads(completed.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the merged split")
    parser.add_argument("--dim", type=int, default=512, help="target dimension")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--realigned", choices=("half", "all"), default="half",
                        help="which shards were aligned by their participants to a prior other than the best, so "
                             "that the merge re-aligns them: the lower half, or all (the worst case)")
    parser.add_argument("--no-evaluate", action="store_true", help="merge without measuring the targets' quality")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the hub and scratch files go (default: a temp dir)"
    )
    parser.add_argument("--profile", type=Path, default=None,
                        help="write the merge process's cProfile stats here (python -m pstats FILE); slows it")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="coopt-merge-bench-", dir=args.workdir))
    try:
        from coopt_hub.server import HubServer

        server = HubServer(root / "hub", tokens=[TOKEN]).start()
        env = {**os.environ, **server.env(), "HF_HOME": str(root / "hf-home"),
               "HF_DATASETS_CACHE": str(root / "datasets-cache"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        os.environ.update(env)

        from coopt_hub.hub.client import Hub
        from coopt_hub.platform.init import initialize

        hub = Hub(token=TOKEN)
        started = time.perf_counter()
        scratch = root / "scratch"
        scratch.mkdir()
        hub.ensure_repo("bench/source")
        push(hub, "bench/source", "main", write_source(scratch, args.rows), "source")
        plan = initialize(
            hub, "bench/coopt", source="bench/source", source_revision=None, split="train", image_column="image",
            shards=args.shards, anchors=ANCHORS, dim=args.dim, seed=args.seed, temperature=2.0,
        ).plan
        write_shards(hub, "bench/coopt", plan, scratch, args.seed, args.realigned)
        print(f"setup: {args.rows:,} rows x {args.dim} in {args.shards} shards ({plan.granularity} units), "
              f"{time.perf_counter() - started:.1f} s", flush=True)

        merged = run_merge("bench/coopt", env, scratch, evaluate=not args.no_evaluate,
                           profile=args.profile and args.profile.resolve())
        summary = merged.summary
        print(f"merged {summary['rows']:,} rows as {summary['tag']} (re-aligned shards {summary['realigned']}), "
              f"images={summary['images']}, target-quality evaluation {'off' if args.no_evaluate else 'on'}")
        print(f"merge CPU seconds: {merged.cpu_seconds:.1f} ({merged.system_seconds:.1f} system, "
              f"{merged.page_faults / 1e6:.2f}M page faults), "
              f"the embedded hub's meanwhile {merged.server_cpu_seconds:.1f} "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        cores = os.cpu_count() or 1
        print(f"CPU floor: (merge + hub CPU seconds) / {cores} cores = "
              f"{(merged.cpu_seconds + merged.server_cpu_seconds) / cores:.1f} s, the least wall time of this work "
              "however it were overlapped")
        print(f"merge seconds: {merged.seconds:.1f}")
        print(f"peak RSS MiB: {merged.peak_mib:.0f}")
        server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
