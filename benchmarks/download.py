"""Each participant downloads only its own shard.

A source of incompressible images in 16 parquet row groups, split into 4 shards, on an embedded
hub. Every participant runs the real `optimize` read path (plan, anchors file, its row groups
through HfFileSystem range reads) with a cheap deterministic prior, and the server counts the
response bytes it sent during that participant's run. A participant's share is the source split's
bytes times its fraction of the rows.

Last line: `max participant bytes / shard share: <x>` (goal <= 1.2).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(tempfile.mkdtemp(prefix="coopt-download-bench-"))


def start_server():
    """The hub, and the client environment set before huggingface_hub is imported."""
    from coopt_hub.server import HubServer

    server = HubServer(ROOT / "hub", tokens=["bench-token"]).start()
    os.environ.update(server.env())
    os.environ.update({"HF_HOME": str(ROOT / "hf-home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    return server


def publish_noise_source(repo: str, row_groups: int, rows_per_group: int, size: int, seed: int = 0) -> int:
    """A `train` split of random-noise PNGs in `row_groups` row groups; returns the file's bytes."""
    import datasets
    from huggingface_hub import CommitOperationAdd, HfApi
    from PIL import Image

    rng = np.random.default_rng(seed)
    count = row_groups * rows_per_group
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    table = datasets.Dataset.from_dict({"image": images, "label": list(range(count))}, features=features)
    buffer = io.BytesIO()
    table.to_parquet(buffer, batch_size=rows_per_group)
    api = HfApi()
    api.create_repo(repo, repo_type="dataset", exist_ok=True)
    api.create_commit(repo, [CommitOperationAdd("data/train-00000-of-00001.parquet", buffer.getvalue())],
                      commit_message="noise source", repo_type="dataset")
    return buffer.getbuffer().nbytes


def cheap_prior():
    """A deterministic linear map of 8x8 pixels: the prior is not what this benchmark measures."""
    import torch

    from coopt_hub.priors import Preprocessing, Prior, PriorSpec

    class PixelPrior(Prior):
        def __init__(self):
            self.spec = PriorSpec(model="pixel-linear")
            self.preprocessing = Preprocessing(image_size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3,
                                               interpolation="bilinear", resize_mode="squash")
            self.output_dim = 32
            self.fingerprint = hashlib.sha256(b"pixel-linear").hexdigest()
            self.random_init = True
            self.weights = torch.randn(192, 32, generator=torch.Generator().manual_seed(0))

        def preprocess(self, image):
            array = np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0
            return torch.from_numpy(array).permute(2, 0, 1).contiguous()

        def encode_batch(self, pixels):
            return pixels.reshape(len(pixels), -1) @ self.weights

    return PixelPrior()


def participant_bytes(server, repo: str, shards: int, workdir: Path) -> list[int]:
    """Bytes the server sent while each participant labelled (without pushing) its shard."""
    from coopt_hub.hub.client import Hub
    from coopt_hub.core.progress import Silent
    from coopt_hub.participant.job import OptimizeOptions, optimize_shard

    fetched = []
    for shard in range(shards):
        before = server.bytes_sent
        optimize_shard(Hub(), repo, shard, cheap_prior(), workdir=workdir / f"p{shard}",
                       options=OptimizeOptions(batch_size=64, workers=2), progress=Silent())
        fetched.append(server.bytes_sent - before)
    return fetched


def run(row_groups: int, rows_per_group: int, shards: int, anchors: int, size: int) -> float:
    server = start_server()
    try:
        from coopt_hub.hub.client import Hub
        from coopt_hub.platform.init import initialize

        source_bytes = publish_noise_source("bench/noise", row_groups, rows_per_group, size)
        plan = initialize(Hub(), "bench/noise-coopt", source="bench/noise", source_revision=None, split="train",
                          image_column="image", shards=shards, anchors=anchors, dim=16, seed=0,
                          temperature=2.0).plan
        print(f"source: {row_groups} row groups x {rows_per_group} rows of {size}x{size} noise PNGs, "
              f"{source_bytes / 2**20:.1f} MiB; {shards} shards ({plan.granularity}), {anchors} anchors")
        started = time.perf_counter()
        fetched = participant_bytes(server, "bench/noise-coopt", shards, ROOT / "work")
        ratios = []
        for shard, nbytes in enumerate(fetched):
            share = source_bytes * len(plan.shard_ids(shard)) / plan.num_rows
            ratios.append(nbytes / share)
            print(f"participant {shard}: fetched {nbytes / 2**20:.2f} MiB, share {share / 2**20:.2f} MiB, "
                  f"ratio {ratios[-1]:.3f}")
        print(f"participants took {time.perf_counter() - started:.1f}s")
        return max(ratios)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row-groups", type=int, default=16)
    parser.add_argument("--rows-per-group", type=int, default=200)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--anchors", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args(argv)
    worst = run(args.row_groups, args.rows_per_group, args.shards, args.anchors, args.size)
    print(f"max participant bytes / shard share: {worst:.3f}")


if __name__ == "__main__":
    if "huggingface_hub" in sys.modules:
        raise SystemExit("run this benchmark as its own process")
    main()
