"""Building sources and realistic collaborations on the embedded hub, for tests that need them.

The sources are scikit-learn's digits as RGB PNGs: the sample dataset (train/test, 100-row row
groups) or the first rows in row groups of a chosen size, some of them broken. The plan is
published by `initialize` exactly as `coopt-hub init` does, and participants are synthetic but
faithful: each prior is a different random linear map (with its own output size) of one latent
vector per sample, so the priors disagree the way real ones do while sharing the information that
alignment recovers. Their outputs go through the real projection, uniformity, alignment and
storage code, and each shard is pushed to its branch in one commit.
"""

from __future__ import annotations

import io
import json
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fakes import LATENT_DIM, FakePrior

from coopt_hub import __version__
from coopt_hub.core.align import apply_alignment, fit_alignment, uniformity
from coopt_hub.core.layout import remote_paths, shard_branch
from coopt_hub.core.plan import Plan
from coopt_hub.core.shardfile import AnchorOutputs, ShardHeader, ShardResult, write_shard
from coopt_hub.demo.sample_data import digits_images, publish_digits
from coopt_hub.hub.client import Hub
from coopt_hub.platform.init import initialize


@dataclass
class Collaboration:
    hub: Hub
    repo: str
    source: str
    plan: Plan
    latent: np.ndarray  # [num_rows, LATENT_DIM], the information every prior sees part of

    def projected(self, prior: FakePrior, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features = prior.encode(self.latent[ids])
        return features, features @ self.plan.projection(prior.output_dim)

    def uniformity(self, prior: FakePrior) -> float:
        features, _ = self.projected(prior, np.asarray(self.plan.anchor_ids))
        return uniformity(features, self.plan.temperature)

    def shard_files(
        self,
        shard: int,
        prior: FakePrior,
        directory: Path,
        reference: tuple[int, FakePrior, str] | None = None,
        edit: Callable[[ShardResult, AnchorOutputs], None] | None = None,
    ) -> tuple[ShardResult, AnchorOutputs]:
        """Label shard `shard` with `prior`, aligned to `reference` = (shard, prior, commit), or to itself.

        `edit` may change the result before it is written, to make a shard that is wrong but well-formed.
        """
        plan = self.plan
        ids = plan.shard_ids(shard)
        anchor_ids = np.asarray(plan.anchor_ids, dtype=np.int64)
        _, raw = self.projected(prior, ids)
        anchor_features, anchor_projected = self.projected(prior, anchor_ids)
        if reference is None:
            target, header_reference = anchor_projected, None
        else:
            ref_shard, ref_prior, ref_commit = reference
            target = self.projected(ref_prior, anchor_ids)[1]
            header_reference = {
                "shard": ref_shard,
                "branch": shard_branch(ref_shard),
                "commit": ref_commit,
                "fingerprint": ref_prior.fingerprint,
            }
        transform, residual = fit_alignment(anchor_projected, target)
        header = ShardHeader(
            shard=shard,
            plan_hash=plan.plan_hash,
            source_revision=plan.source_revision,
            prior=prior.spec(),
            preprocessing={},
            fingerprint=prior.fingerprint,
            output_dim=prior.output_dim,
            dim=plan.dim,
            uniformity=self.uniformity(prior),
            reference=header_reference,
            residual=residual,
            num_rows=len(ids),
            tool_version=__version__,
            checksums={},
        )
        result = ShardResult(header=header, ids=ids, raw=raw, aligned=apply_alignment(raw, transform))
        anchors = AnchorOutputs(ids=anchor_ids, features=anchor_features, projected=anchor_projected)
        if edit is not None:
            edit(result, anchors)
        write_shard(directory, result, anchors)
        report = {"prior": prior.spec(), "fingerprint": prior.fingerprint, "uniformity": header.uniformity,
                  "reference": header_reference, "residual": residual, "counts": {"rows": len(ids)}}
        (directory / "report.json").write_text(json.dumps(report))
        return result, anchors

    def push(
        self,
        shard: int,
        prior: FakePrior,
        reference: tuple[int, FakePrior, str] | None = None,
        edit: Callable[[ShardResult, AnchorOutputs], None] | None = None,
        tamper: Callable[[Path], None] | None = None,
    ) -> str:
        """Label and push shard `shard` in one commit; `tamper(directory)` may damage the written files."""
        from huggingface_hub import CommitOperationAdd

        with tempfile.TemporaryDirectory() as scratch:
            directory = Path(scratch)
            self.shard_files(shard, prior, directory, reference, edit)
            if tamper is not None:
                tamper(directory)
            branch = shard_branch(shard)
            self.hub.ensure_branch(self.repo, branch)
            paths = remote_paths(shard)
            local = {paths.targets: "targets.safetensors", paths.anchors: "anchors.safetensors",
                     paths.report: "report.json"}
            operations = [CommitOperationAdd(path, (directory / name).read_bytes()) for path, name in local.items()]
            return self.hub.commit(self.repo, branch, lambda head: operations, message=f"shard {shard} by {prior.name}")


def skipping(*ids: int) -> Callable[[ShardResult, AnchorOutputs], None]:
    """An `edit` that leaves out the rows of `ids`, as optimize --on-bad-image skip does for undecodable images."""

    def edit(result: ShardResult, anchors: AnchorOutputs) -> None:
        keep = ~np.isin(result.ids, ids)
        result.ids, result.raw, result.aligned = result.ids[keep], result.raw[keep], result.aligned[keep]
        result.header.num_rows = int(keep.sum())
        result.header.skipped_ids = sorted(ids)

    return edit


def start_collaboration(
    hub: Hub, repo: str, source: str, *, shards: int = 3, anchors: int = 96, dim: int = 16, seed: int = 0
) -> Collaboration:
    """Publish a plan over `source` (already on the hub) and draw the latent every prior sees."""
    result = initialize(
        hub, repo, source=source, source_revision=None, split="train", image_column="image",
        shards=shards, anchors=anchors, dim=dim, seed=seed, temperature=2.0,
    )
    latent = np.random.default_rng(seed).standard_normal((result.plan.num_rows, LATENT_DIM))
    return Collaboration(hub=hub, repo=repo, source=source, plan=result.plan, latent=latent)


def digits_source(repo: str, token: str | None = None) -> str:
    """Publish the digits source (train and test splits, labels, 16 px PNGs) to `repo`; returns the repo id."""
    publish_digits(repo, image_size=16, token=token)
    return repo


def publish_digit_rows(hub: Hub, rows: int, rows_per_group: int, broken: tuple[int, ...] = (),
                       name: str = "digits") -> str:
    """The first `rows` digits (16 px RGB PNGs, with labels) as one train file in row groups of
    `rows_per_group`; the rows in `broken` hold bytes that are no image. Returns the new repo's id."""
    from huggingface_hub import CommitOperationAdd

    images, labels = digits_images(16)
    cells = []
    for row, image in enumerate(images[:rows]):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        cells.append({"bytes": b"\x89PNG truncated" if row in broken else buffer.getvalue(), "path": None})
    table = pa.table({"image": pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array(labels[:rows])})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=rows_per_group)
    repo = f"org/{name}-{uuid.uuid4().hex[:8]}"
    hub.ensure_repo(repo)
    hub.commit(repo, "main", lambda head: [CommitOperationAdd("data/train-00000-of-00001.parquet",
                                                              buffer.getvalue())], "digits")
    return repo
