"""A shard's report.json: what was labeled with which prior, how the prior was judged and aligned,
and how the run went. It is written last: its presence marks a result as complete, and the
platform reads it from the branch to see who labeled the shard and with what.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from coopt_hub.core.files import write_text_atomically
from coopt_hub.core.layout import ANCHORS_FILE, TARGETS_FILE, remote_paths, shard_branch
from coopt_hub.core.plan import Plan
from coopt_hub.core.shardfile import ShardHeader
from coopt_hub.participant.chunks import JobOutputs
from coopt_hub.participant.labeling import LabelingStats
from coopt_hub.participant.reference import ReferenceChoice
from coopt_hub.priors import Prior


@dataclass(frozen=True)
class RunSummary:
    """How the run went, as the report records it."""

    participant: str | None
    batch_size: int
    workers: int
    chunks: int  # the job's chunks, shard and anchors
    stats: list[LabelingStats]  # one per rank
    labeling_seconds: float
    alignment_seconds: float


def build_report(
    repo: str, plan: Plan, prior: Prior, header: ShardHeader, choice: ReferenceChoice,
    outputs: JobOutputs, run: RunSummary, files: Path,
) -> dict[str, Any]:
    """The report of the shard whose targets and anchors files (described by `header`) lie in `files`.

    Its figures are the header's, plus how the priors were ranked; nobody chooses a reference by
    them (the stored anchor outputs are judged instead), they say what the participant saw.
    """
    shard, anchors = outputs.shard, outputs.anchors
    reference = choice.reference
    return {
        "tool_version": header.tool_version,
        "repo": repo,
        "shard": header.shard,
        "branch": shard_branch(header.shard),
        "participant": run.participant,
        "plan_hash": plan.plan_hash,
        "source": {"repo": plan.source_repo, "revision": plan.source_revision, "split": plan.split},
        "prior": header.prior,  # a local checkpoint by file name only (ShardHeader keeps no local path)
        "preprocessing": header.preprocessing,
        "precision": header.precision,
        "precision_deviation": header.precision_deviation,
        "fingerprint": prior.fingerprint,
        "random_init": bool(prior.random_init),
        "output_dim": prior.output_dim,
        "dim": plan.dim,
        "schema_version": header.schema_version,
        "projection": header.projection,
        "uniformity": header.uniformity,
        "uniformity_native": header.uniformity_native,
        "temperature": plan.temperature,
        "noise_like": choice.own.noise_like,
        "ranking": choice.to_dict(),
        "reference": None if reference is None else {**reference.to_header(),
                                                     "uniformity": choice.chosen.common_uniformity},
        "residual": header.residual,
        "alignment": header.alignment,
        "counts": {
            "shard_rows": int(len(plan.shard_ids(header.shard))),
            "rows": int(shard.ids.size),
            "anchors": len(plan.anchor_ids),
            "anchor_rows": int(anchors.ids.size),
            "skipped": int(shard.bad_ids.size + anchors.bad_ids.size),
        },
        "skipped_ids": {"shard": [int(i) for i in shard.bad_ids], "anchors": [int(i) for i in anchors.bad_ids]},
        **_run_sections(run),
        "checksums": header.checksums,
        "files": {name: file_sha256(files / name) for name in (TARGETS_FILE, ANCHORS_FILE)},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _run_sections(run: RunSummary) -> dict[str, Any]:
    images = sum(s.images for s in run.stats)
    seconds = run.labeling_seconds
    return {
        "chunks": {
            "total": run.chunks,
            "computed": sum(len(s.computed) for s in run.stats),
            "reused": sum(len(s.reused) for s in run.stats),
        },
        "run": {"world_size": len(run.stats), "batch_size": run.batch_size, "workers": run.workers},
        "timings": {"labeling_s": round(seconds, 3), "alignment_s": round(run.alignment_seconds, 3)},
        "images_per_s": round(images / seconds, 2) if images and seconds > 0 else None,
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(report, indent=2, sort_keys=True) + "\n")


def read_report(directory: Path, shard: int) -> dict[str, Any]:
    """The report of shard `shard` in a directory laid out as its branch."""
    return json.loads((Path(directory) / remote_paths(shard).report).read_text())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
