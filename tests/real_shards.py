"""Shards made the way a participant makes them, with real random-init open_clip priors, and pushed by
hand: prior outputs, L2-normalised, projected with the plan's W, aligned to a reference on the
anchors. `tampered` pushes an edited copy of an honest shard with valid checksums, so that only
re-encoding can tell it apart (tests/test_verify.py, and `merge --verify` in tests/test_merge.py).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from coopt_hub import __version__
from coopt_hub.core.align import AlignmentWarning, apply_alignment, fit_alignment, normalize, uniformity
from coopt_hub.core.layout import remote_paths, shard_branch
from coopt_hub.core.plan import Plan
from coopt_hub.core.shardfile import AnchorOutputs, ShardHeader, ShardResult, write_shard
from coopt_hub.hub.client import Hub
from coopt_hub.hub.repo import load_anchors
from coopt_hub.hub.source import read_plan_unit
from coopt_hub.platform.verify import PriorLoader, ShardVerification, verify_shard
from coopt_hub.priors import Prior, PriorSpec, decode_image

# Same architecture and size, different seeds: the "other model" differs only in its weights.
PRIOR_A = PriorSpec(model="ViT-S-32", seed=0, image_size=32)
PRIOR_B = PriorSpec(model="ViT-S-32", seed=1, image_size=32)


@dataclass
class Pushed:
    """An honest shard as pushed: its commit and the files' contents."""

    shard: int
    commit: str
    result: ShardResult
    anchors: AnchorOutputs


@dataclass
class RealCollaboration:
    hub: Hub
    repo: str
    plan: Plan
    priors: PriorLoader
    shards: dict[int, Pushed]

    def push(self, shard: int, result: ShardResult, anchors: AnchorOutputs) -> str:
        from huggingface_hub import CommitOperationAdd

        with tempfile.TemporaryDirectory() as scratch:
            write_shard(Path(scratch), result, anchors)
            paths = remote_paths(shard)
            operations = [CommitOperationAdd(paths.targets, (Path(scratch) / "targets.safetensors").read_bytes()),
                          CommitOperationAdd(paths.anchors, (Path(scratch) / "anchors.safetensors").read_bytes()),
                          CommitOperationAdd(paths.report, json.dumps({"shard": shard}).encode())]
        self.hub.ensure_branch(self.repo, shard_branch(shard))
        return self.hub.commit(self.repo, shard_branch(shard), lambda head: operations, message=f"shard {shard}")

    def tampered(self, shard: int, edit: Callable[[ShardResult, AnchorOutputs], None]) -> str:
        """Push an edited copy of the honest shard (checksums recomputed); returns the commit."""
        honest = self.shards[shard]
        result = ShardResult(replace(honest.result.header, checksums={}), honest.result.ids.copy(),
                             honest.result.raw.copy(), honest.result.aligned.copy())
        anchors = AnchorOutputs(honest.anchors.ids.copy(), honest.anchors.features.copy(),
                                honest.anchors.projected.copy())
        edit(result, anchors)
        return self.push(shard, result, anchors)

    def verify(self, shard: int, commit: str, **kwargs) -> ShardVerification:
        return verify_shard(self.hub, self.repo, self.plan, shard, commit=commit, priors=self.priors, **kwargs)


def encode(prior: Prior, cells: list, ids: np.ndarray) -> np.ndarray:
    pixels = torch.stack([prior.preprocess(decode_image(cell, int(i))) for cell, i in zip(cells, ids)])
    return normalize(np.concatenate([prior.encode_batch(batch).numpy() for batch in pixels.split(64)]))


def label(collab: RealCollaboration, shard: int, spec: PriorSpec,
          reference: Pushed | None) -> tuple[ShardResult, AnchorOutputs]:
    """What a participant computes for `shard` with the prior of `spec`, aligned to `reference` (or itself)."""
    plan, prior = collab.plan, collab.priors(spec)
    ids = plan.shard_ids(shard)
    cells = [cell for unit in plan.shard_units(shard)
             for cell in read_plan_unit(plan, unit, [plan.image_column]).column(plan.image_column).to_pylist()]
    anchor_ids = np.asarray(plan.anchor_ids, dtype=np.int64)
    anchor_features = encode(prior, load_anchors(collab.hub, collab.repo, plan).column("image").to_pylist(), anchor_ids)
    projection = plan.projection(prior.output_dim)
    raw, projected = encode(prior, cells, ids) @ projection, anchor_features @ projection
    if reference is None:
        aligned, residual, header_reference = raw, 0.0, None
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AlignmentWarning)
            transform, residual = fit_alignment(projected, reference.anchors.projected)
        aligned = apply_alignment(raw, transform)
        header_reference = {"shard": reference.shard, "branch": shard_branch(reference.shard),
                            "commit": reference.commit, "fingerprint": reference.result.header.fingerprint}
    header = ShardHeader(
        shard=shard, plan_hash=plan.plan_hash, source_revision=plan.source_revision, prior=spec.to_dict(),
        preprocessing=prior.preprocessing.to_dict(), fingerprint=prior.fingerprint, output_dim=prior.output_dim,
        dim=plan.dim, uniformity=uniformity(anchor_features, t=plan.temperature), reference=header_reference,
        residual=residual, num_rows=len(ids), tool_version=__version__, checksums={},
    )
    return (ShardResult(header, ids, raw, aligned),
            AnchorOutputs(ids=anchor_ids, features=anchor_features, projected=projected))
