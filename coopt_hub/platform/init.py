"""`coopt-hub init`: publish the plan (pinned source, shards, anchors) to the CoOpt repo's main.

The plan and the anchor rows land in one commit. The anchors are materialised as one small parquet
file so that every participant fetches S in one download instead of touching the row groups S is
scattered over. Every anchor image is decoded first: one that does not decode would be skipped by
every participant and block every merge, so it is replaced by the next row of the plan's seeded
anchor order. The platform is also told, with numbers, when its anchors are too few per dimension.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from huggingface_hub import CommitOperation, CommitOperationAdd

from coopt_hub import __version__
from coopt_hub.core.layout import ANCHORS_PATH, PLAN_PATH
from coopt_hub.core.plan import DEFAULT_PROJECTION, Plan, Unit, make_plan
from coopt_hub.core.progress import LogProgress, Progress
from coopt_hub.errors import BadImageError, PlanError, id_list
from coopt_hub.hub.client import Hub
from coopt_hub.hub.source import SourceLayout, read_unit, resolve_source
from coopt_hub.priors import decode_image

# Below this many anchors per target dimension the alignment errs on rows outside the anchors more
# than 10% above what many anchors reach. Measured with core/align.select_alignment (CV ridge) on
# synthetic prior pairs (a shared latent through two random tanh maps plus noise; d = 128 and 256;
# relative error on 4,000 fresh rows, 3 seeds), excess over a 40,000-anchor fit: 25-27% at 1 anchor
# per dimension, 15-16% at 2, 11% at 3, 6-9% at 4, 4-5% at 8 (with noisier priors 11, 9, 7, 6, 4%).
# The old fixed ridge erred 11-16x the target's norm at exactly 1 per dimension.
STABLE_ANCHORS_PER_DIM = 4

README_STUB = """---
tags:
- coopt
- coopt-hub
configs:
- config_name: anchors
  data_files:
  - split: anchors
    path: {anchors}
---
# CoOpt collaboration on {source}

This repo is a collaborative data optimization ([CoOpt](https://arxiv.org/abs/2505.14117)) run,
managed with coopt-hub {version}. The source `{source}` is pinned to commit `{revision}`
(split `{split}`, {rows} rows) and split into {shards} shards ({granularity} granularity); {anchors_count}
anchor samples are shared by every participant.

Join with:

    coopt-hub join {repo} --model ViT-B-32 --pretrained openai
    coopt-hub optimize --shard K --push

`coopt-hub status {repo}` shows the progress; `coopt-hub merge {repo}` publishes the dataset as vN.
"""


@dataclass(frozen=True)
class InitResult:
    plan: Plan
    commit: str | None
    created: bool
    undecodable_anchors: tuple[int, ...] = ()  # drawn as anchors, replaced: their images do not decode
    warnings: tuple[str, ...] = ()  # guidance the platform was given (also through its progress)


def initialize(
    hub: Hub,
    repo: str,
    *,
    source: str,
    source_revision: str | None,
    split: str,
    image_column: str,
    shards: int,
    anchors: float,
    dim: int,
    seed: int,
    temperature: float,
    projection: str = DEFAULT_PROJECTION,
    private: bool = False,
    progress: Progress | None = None,
) -> InitResult:
    """Publish the plan to `repo`'s main; a no-op when the same plan is already there."""
    if shards < 1:
        raise PlanError(f"--shards must be at least 1, got {shards}.", hint="Pass the number of participants' shards.")
    progress = progress or LogProgress()
    layout = resolve_source(source, source_revision, split, image_column, hub.token)

    def plan_excluding(undecodable: Sequence[int]) -> Plan:
        return make_plan(source_repo=source, source_revision=layout.revision, split=split,
                         image_column=image_column, units=layout.units, num_shards=shards, anchors=anchors,
                         dim=dim, seed=seed, temperature=temperature, projection=projection,
                         excluded_anchors=undecodable)

    advice = []
    plan_excluding(())  # the settings' own errors, before any anchor row is read
    hub.ensure_repo(repo, private=private)
    with tempfile.TemporaryDirectory(prefix="coopt-init-") as scratch:
        anchors_file = Path(scratch) / "anchors.parquet"
        plan, undecodable = _decodable_anchors(layout, plan_excluding, anchors_file, hub.token, progress)
        if undecodable:
            advice.append(f"{len(undecodable)} anchor image(s) do not decode (ids {id_list(undecodable)}); each was "
                            "replaced by the next row of the seeded anchor order.")
        build = _PlanCommit(hub, repo, layout, plan, anchors_file)
        message = f"coopt-hub init: {shards} shards of {source}@{layout.revision[:8]}"
        commit = hub.commit(repo, "main", build, message=message)
    guidance = anchor_guidance(len(plan.anchor_ids), plan.dim, plan.num_rows)
    advice += [guidance] if guidance else []
    for warning in advice:
        progress.warn(warning)
    return InitResult(plan=plan, commit=commit if build.created else None, created=build.created,
                      undecodable_anchors=tuple(undecodable), warnings=tuple(advice))


def anchor_guidance(anchors: int, dim: int, num_rows: int) -> str | None:
    """A warning, with its reason and the settings that would avoid it, when the anchors per target
    dimension are in the zone where the alignment is unstable; None when they are enough."""
    if anchors >= STABLE_ANCHORS_PER_DIM * dim:
        return None
    if anchors < dim:
        reason = ("fewer anchors than dimensions leave the alignment under-determined: part of the best prior's "
                  "information is lost")
    else:
        reason = ("an alignment fitted on so few errs on rows outside the anchors over 10% more than with many "
                  "anchors (measured on synthetic priors: ~15% at 2 per dimension, 6-9% at 4)")
    needed = math.ceil(STABLE_ANCHORS_PER_DIM * dim)
    smaller = math.floor(anchors / STABLE_ANCHORS_PER_DIM)
    options = ([f"--anchors {needed}"] if needed <= num_rows else []) + ([f"--dim {smaller}"] if smaller >= 1 else [])
    suggestion = f" Use {' or '.join(options)}." if options else ""
    return f"{anchors} anchors for --dim {dim} ({anchors / dim:.2f} per dimension): {reason}.{suggestion}"


def _decodable_anchors(layout: SourceLayout, plan_excluding: Callable[[Sequence[int]], Plan], anchors_file: Path,
                       token: str | None, progress: Progress) -> tuple[Plan, list[int]]:
    """The plan whose anchor images all decode, with its anchor rows written to `anchors_file`, and the
    ids passed over. Only the rows not read yet are read on each round (the replacements)."""
    undecodable: list[int] = []
    pieces: list[pa.Table] = []
    read = np.zeros(0, dtype=np.int64)
    while True:
        plan = plan_excluding(undecodable)
        ids = np.asarray(plan.anchor_ids, dtype=np.int64)
        new = ids[~np.isin(ids, read)]
        if new.size == 0:
            break
        table = rows_by_id(layout.repo, layout.revision, layout.units, new, layout.image_column, token, progress)
        bad = _undecodable(table, layout.image_column)
        read = np.union1d(read, new)
        undecodable += bad
        pieces.append(table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(bad, pa.int64())))))
    pq.write_table(pa.concat_tables(pieces).sort_by("id"), anchors_file)
    return plan, sorted(undecodable)


def _undecodable(table: pa.Table, column: str) -> list[int]:
    bad = []
    for sample_id, cell in zip(table.column("id").to_pylist(), table.column(column).to_pylist()):
        try:
            decode_image(cell, sample_id)
        except BadImageError:
            bad.append(sample_id)
    return bad


class _PlanCommit:
    """The init commit (plan, anchor rows read already, README), built from the head Hub.commit gives it on each try;
    nothing when main holds this plan already. `created`: a try built the commit (a retry that finds it
    went through before the connection dropped leaves it True)."""

    def __init__(self, hub: Hub, repo: str, layout: SourceLayout, plan: Plan, anchors_file: Path):
        self.hub, self.repo, self.layout, self.plan = hub, repo, layout, plan
        self.anchors_file = anchors_file
        self.created = False

    def __call__(self, head: str | None) -> list[CommitOperation] | None:
        if self._holds_this_plan(head):
            return None
        self.created = True
        return [
            CommitOperationAdd(PLAN_PATH, self.plan.to_json().encode()),
            CommitOperationAdd(ANCHORS_PATH, str(self.anchors_file)),
            CommitOperationAdd("README.md", self._readme().encode()),
        ]

    def _holds_this_plan(self, head: str | None) -> bool:
        """True when main holds this very plan; a PlanError when it holds another one."""
        existing = self.hub.read_json(self.repo, PLAN_PATH, head) if head else None
        if existing is None:
            return False
        current = Plan.from_json(json.dumps(existing))
        if current.plan_hash == self.plan.plan_hash:
            return True
        raise PlanError(
            f"{self.repo} already holds a different plan (differs in: {', '.join(_diff(current, self.plan))}).",
            hint=f"Re-run with the arguments of the existing plan (see {PLAN_PATH} on main), "
            "or start a new collaboration in a new repo.",
        )

    def _readme(self) -> str:
        layout, plan = self.layout, self.plan
        return README_STUB.format(
            anchors=ANCHORS_PATH,
            source=plan.source_repo,
            revision=layout.revision,
            split=plan.split,
            rows=layout.num_rows,
            shards=plan.num_shards,
            granularity=plan.granularity,
            anchors_count=len(plan.anchor_ids),
            version=__version__,
            repo=self.repo,
        )


def rows_by_id(
    repo: str,
    revision: str,
    units: Sequence[Unit],
    ids: np.ndarray,
    column: str,
    token: str | None = None,
    progress: Progress | None = None,
) -> pa.Table:
    """`id` and `column` of the sorted sample `ids`, in that order, reading only the storage units that
    hold them (with range reads: the rest of the source never travels)."""
    spans = [(unit, *np.searchsorted(ids, [unit.start, unit.stop])) for unit in units]
    holding = [(unit, lo, hi) for unit, lo, hi in spans if hi > lo]
    pieces = []
    with (progress or LogProgress()).bar(len(holding), f"Reading {ids.size} rows of {repo}", unit="row group") as bar:
        for unit, lo, hi in holding:
            rows = read_unit(repo, revision, unit, [column], token)
            pieces.append(rows.take(ids[lo:hi] - unit.start).append_column("id", pa.array(ids[lo:hi], pa.int64())))
            bar.update(1)
    return pa.concat_tables(pieces).select(["id", column])


def _diff(old: Plan, new: Plan) -> list[str]:
    old_fields, new_fields = json.loads(old.to_json()), json.loads(new.to_json())
    return sorted(key for key in new_fields if old_fields.get(key) != new_fields[key])
