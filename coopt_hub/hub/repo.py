"""What a CoOpt repo holds, read through the Hub client: the plan, the anchors, the manifest and
the headers and anchor outputs of pushed shards."""

from __future__ import annotations

import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub.errors import RemoteEntryNotFoundError, RevisionNotFoundError

from coopt_hub.core.layout import ANCHORS_PATH, MANIFEST_PATH, PLAN_PATH, remote_paths, shard_branch
from coopt_hub.core.manifest import Manifest
from coopt_hub.core.plan import Plan
from coopt_hub.core.shardfile import AnchorOutputs, ShardHeader, header_from_file_header, header_problems, read_anchor_file
from coopt_hub.errors import PlanError, ShardFileError, SourceError
from coopt_hub.hub.client import Hub
from coopt_hub.hub.source import pin_revision


def load_plan(hub: Hub, repo: str, revision: str = "main") -> Plan:
    """The plan on `repo`'s main, or a PlanError that says how to create one."""
    data = hub.read_json(repo, PLAN_PATH, revision)
    if data is None:
        raise PlanError(
            f"No CoOpt plan in {repo} (no {PLAN_PATH} at {revision}).",
            hint=f"Create it with `coopt-hub init {repo} --source ORG/DATASET --shards K --anchors A`.",
        )
    return Plan.from_json(json.dumps(data))


def load_anchors(hub: Hub, repo: str, plan: Plan) -> pa.Table:
    """The anchor rows (`id` + image column) published by `init`, checked against the plan."""
    # ParquetFile, not read_table: read_table goes through pyarrow.dataset, whose import pulls in
    # pandas (~0.9 s of every participant's start-up) for a file read whole anyway.
    with pq.ParquetFile(hub.download(repo, ANCHORS_PATH, "main")) as anchors:
        table = anchors.read()
    ids = table.column("id").to_numpy()
    if plan.image_column not in table.column_names or not np.array_equal(ids, np.asarray(plan.anchor_ids, np.int64)):
        raise PlanError(
            f"{ANCHORS_PATH} in {repo} does not hold the plan's anchor ids and image column {plan.image_column!r}.",
            hint="The repo was edited by hand; re-run `coopt-hub init` on a fresh repo.",
        )
    return table


def check_source_pin(plan: Plan, token: str | None = None) -> str | None:
    """None when the source's main still is the pinned commit, else a note; raises when the pin is gone."""
    try:
        pinned, _ = pin_revision(plan.source_repo, plan.source_revision, token)
    except SourceError as err:
        raise SourceError(
            f"The plan's pinned source commit {plan.source_repo}@{plan.source_revision} can no longer be read.",
            hint="The source's history was rewritten or the repo removed; the platform must publish a new plan.",
        ) from err
    current, _ = pin_revision(plan.source_repo, None, token)
    if current != pinned:
        return (
            f"Source {plan.source_repo} has moved on to {current[:8]}; reading stays at the plan's pinned "
            f"commit {pinned[:8]}."
        )
    return None


# A coopt header is a few KB; anything far larger is not a shard file.
_MAX_REMOTE_HEADER_BYTES = 1 << 24
# One range read normally covers the length prefix and the whole header.
_READ_BLOCK = 1 << 16


def read_remote_header(hub: Hub, repo: str, commit: str, path: str) -> ShardHeader:
    """The coopt header of a safetensors file on the Hub, from two range reads of its start.

    Raises FileNotFoundError when the file is absent and ValueError when it is not a shard file.
    """
    with hub.open(repo, commit, path, block_size=_READ_BLOCK) as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError("truncated: no safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_REMOTE_HEADER_BYTES:
            raise ValueError(f"not a safetensors file (header length {length})")
        raw = handle.read(length)
    return header_from_file_header(raw)


def read_shard_anchors(hub: Hub, repo: str, plan: Plan, shard: int, commit: str) -> tuple[ShardHeader, AnchorOutputs]:
    """Shard `shard`'s anchors file as pushed at `commit`, checked: its own checksums, and that it was
    made for this plan and shard. ShardFileError otherwise.

    These stored outputs, not what a header or report says, are what priors are judged by.
    """
    where = f"shard {shard} ({shard_branch(shard)}@{commit[:12]})"
    hint = f"Ask the owner of shard {shard} to run `coopt-hub optimize --shard {shard} --push` again."
    try:
        path = hub.download(repo, remote_paths(shard).anchors, commit)
    except (RemoteEntryNotFoundError, RevisionNotFoundError) as err:
        raise ShardFileError(f"{remote_paths(shard).anchors} does not exist at {where}.", hint=hint) from err
    try:
        header, anchors = read_anchor_file(path)
    except ShardFileError as err:
        raise ShardFileError(f"The anchors of {where} are damaged: {err}", hint=hint) from err
    problems = header_problems(plan, shard, header)
    if problems:
        raise ShardFileError(f"The anchors of {where} do not fit the plan: {'; '.join(problems)}.", hint=hint)
    return header, anchors


def read_reference_anchors(
    hub: Hub, repo: str, plan: Plan, shard: int, commit: str, fingerprint: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A reference shard's anchor ids and projected anchor outputs at `commit`, checked as
    read_shard_anchors checks them, and (when given) the prior's fingerprint. ShardFileError otherwise."""
    header, anchors = read_shard_anchors(hub, repo, plan, shard, commit)
    if fingerprint is not None and header.fingerprint != fingerprint:
        raise ShardFileError(f"The prior of reference shard {shard} ({shard_branch(shard)}@{commit[:12]}) has "
                             f"fingerprint {header.fingerprint[:12]}, not the declared {str(fingerprint)[:12]}.",
                             hint=f"Ask the owner of shard {shard} to run `coopt-hub optimize --shard {shard} "
                             "--push` again.")
    return anchors.ids, anchors.projected


def read_manifest(hub: Hub, repo: str, revision: str) -> Manifest | None:
    """The manifest of the merged version `revision` holds, or None before the first merge."""
    data = hub.read_json(repo, MANIFEST_PATH, revision)
    return Manifest.from_dict(data) if data else None
